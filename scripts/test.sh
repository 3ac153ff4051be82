#!/usr/bin/env bash
# The test suite, in two tiers (docs/development.md#running-the-tests). Extra arguments go
# to pytest.
#
#   ./scripts/test.sh          the whole suite, as CI runs it (.ci/run): set-up, lint, types,
#                              unit and integration tests against the real RabbitMQ, MariaDB
#                              and nbd-server; the slowest tests are named with their times
#   ./scripts/test.sh --fast   set-up, lint, types and the unit tests only: for development,
#                              in under 2 minutes
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

fast=
if [ "${1:-}" = "--fast" ]; then
  fast=1
  shift
fi

bash scripts/bootstrap.sh --with-test-tools
export PATH="$ROOT/.venv/bin:$PATH"

bash scripts/lint.sh

# pytest's exit code 5 says it ran no test.
if [ -n "$fast" ]; then
  rc=0
  pytest -m "unit and not slow" "$@" || rc=$?
  if [ "$rc" -eq 5 ] && [ $# -gt 0 ]; then
    # A filter of the caller's (`--fast -k reuse`) that matches no unit test: nothing failed.
    echo "test.sh --fast: no unit test matches $*; the integration tests are in the full run"
    exit 0
  fi
  exit "$rc"
fi
# Three processes, each test file wholly on one (--dist loadfile: a module's clusters, image
# or server start once): on two cores the integration tests mostly wait on their services
# (measured: 11.4 min of tests on two processes, 9.0 on three).
# `-n 0` as an argument runs everything in this process (for --pdb, say).
rc=0
pytest -n 3 --dist loadfile --durations=25 "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  # Never green with nothing run: without arguments (CI) the suite itself is missing.
  echo "test.sh: pytest ran no test${*:+ for $*}" >&2
fi
exit "$rc"
