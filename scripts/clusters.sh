#!/usr/bin/env bash
# Private RabbitMQ (3 nodes, quorum queues) and Galera (3 MariaDB nodes, HAProxy in
# front) clusters on 127.0.0.1, for trying the worker on clusters and for bench/soak.py:
#   scripts/clusters.sh up              # about a minute; prints URLs and pids
#   scripts/clusters.sh status
#   scripts/clusters.sh kill rabbitmq 1 # SIGKILL one node; `restart` starts it again
#   scripts/clusters.sh down            # stops everything by pid; idempotent
# State lives in --root (default /tmp/nbd-export-worker-clusters). Never touches the
# machine's own RabbitMQ, MariaDB or epmd. Needs scripts/bootstrap.sh --with-test-tools.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m harness.clusters "$@"
