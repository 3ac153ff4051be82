#!/usr/bin/env bash
# The benchmark (issue 5): drives the real stack (RabbitMQ, MariaDB, an nbd-server and the
# worker as its own process, all started and removed by the benchmark) and prints a
# Markdown table; results.json and results.md go to --out (default bench/out/).
#   ./scripts/bench.sh            the full run (several minutes)
#   ./scripts/bench.sh --small    a smoke run of well under a minute, for CI
#   ./scripts/bench.sh --copy     copy throughput through an export against straight to the
#                                 device (bench/copy.py; --copy --small for a smoke run)
#   ./scripts/bench.sh --live     the live view's CPU cost with 100 exports and 50 connections
#                                 (bench/live.py; --live --small for a smoke run)
#   ./scripts/bench.sh --checksum checksum-export's hashing against b2sum and ovirt-imageio's
#                                 client on a 1 GiB image, and reuses beside a checksum
#                                 (bench/checksum.py; --small, --beside)
#   ./scripts/bench.sh --profile  where the worker's CPU goes on the reuse path (py-spy;
#                                 bench/profile.py; --profile --small for a smoke run)
# It never fails on a timing: exit 0 when it ran, 1 when the stack could not start.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

bash scripts/bootstrap.sh
if [ "${1:-}" = "--copy" ]; then
  shift
  exec .venv/bin/python -m bench.copy "$@"
fi
if [ "${1:-}" = "--profile" ]; then
  shift
  exec .venv/bin/python -m bench.profile "$@"
fi
if [ "${1:-}" = "--live" ]; then
  shift
  exec .venv/bin/python -m bench.live "$@"
fi
if [ "${1:-}" = "--checksum" ]; then
  shift
  exec .venv/bin/python -m bench.checksum "$@"
fi
exec .venv/bin/python -m bench "$@"
