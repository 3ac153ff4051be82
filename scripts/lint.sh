#!/usr/bin/env bash
# Lint and types, as CI checks them: the one place for the commands that scripts/test.sh
# and the pre-commit hooks (.pre-commit-config.yaml) run, with the versions pinned in
# pyproject.toml's dev extras (the tools in .venv, never whatever is on PATH).
#
#   scripts/lint.sh                 ruff check, ruff format --check, mypy
#   scripts/lint.sh ruff|format|mypy ...   only those
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BIN=${VENV:-$ROOT/.venv}/bin
PATHS=(worker harness tests bench)

if [ ! -x "$BIN/ruff" ] || [ ! -x "$BIN/mypy" ]; then
  echo "lint.sh: no ruff or mypy in $BIN: run scripts/bootstrap.sh first" >&2
  exit 2
fi

[ $# -gt 0 ] || set -- ruff format mypy
for check in "$@"; do
  case "$check" in
    ruff) "$BIN/ruff" check "${PATHS[@]}" ;;
    format) "$BIN/ruff" format --check "${PATHS[@]}" ;;
    mypy) "$BIN/mypy" ;;  # what and how strictly: [tool.mypy] in pyproject.toml
    *) echo "usage: $0 [ruff|format|mypy]..." >&2; exit 2 ;;
  esac
done
