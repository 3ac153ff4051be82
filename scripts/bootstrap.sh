#!/usr/bin/env bash
# Prepares this machine for the worker and its tests, idempotently: system packages,
# RabbitMQ and MariaDB running, the virtualenv .venv with the package installed editable
# (with dev tools), and the project's nbd-server build (nbd-server/build.sh: Debian's
# source with the project's patches, installed as /usr/local/sbin/nbd-server once it passed
# the worker's data-path self-test). Run by scripts/dev.sh and scripts/test.sh; safe to run
# by itself.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}

say() { printf 'bootstrap: %s\n' "$*" >&2; }

bash "$ROOT/scripts/install-system-deps.sh" "$@"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # $1 port, $2 name
  for _ in $(seq 1 120); do port_open "$1" && return 0; sleep 0.5; done
  say "$2 did not come up on port $1"; return 1
}

if ! port_open 5672; then
  say "starting RabbitMQ"
  rabbitmq-server -detached
  wait_port 5672 RabbitMQ
fi
if ! port_open 3306; then
  say "starting MariaDB"
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
  wait_port 3306 MariaDB
fi

# Reinstall only when pyproject.toml changed since the last install into this venv.
stamp="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  say "installing the package into $VENV"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[dev]"
  rm -f "$VENV"/.installed-* && touch "$stamp"
fi

# After the venv: the build is installed only once the worker's self-test passed on it.
bash "$ROOT/nbd-server/build.sh" --python "$VENV/bin/python"
