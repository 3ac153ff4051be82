#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, lint, types, unit and integration tests
# against the real RabbitMQ, MariaDB and nbd-server. Extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

bash scripts/bootstrap.sh --with-test-tools
export PATH="$ROOT/.venv/bin:$PATH"

ruff check worker harness tests bench
ruff format --check worker harness tests bench
mypy
pytest "$@"
