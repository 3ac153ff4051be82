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
#
# The wheels of an install are kept under $CACHE/wheels, keyed by the dependencies and the
# Python, so that a fresh clone on this machine (CI's) installs from them without the index:
# seconds instead of the minute or more of resolving and downloading (pip's own HTTP cache
# keeps nothing on these machines). A new key, or a wheelhouse that fails to install from,
# is made again from the index; the same key keeps the versions it first resolved.
stamp="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  say "installing the package into $VENV"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  pip=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
  CACHE=${NBD_BUILD_CACHE:-/var/cache/nbd-export-worker}
  # The key: the Python, and only the tables that decide what is installed (an edit of the
  # pytest or ruff settings does not send it back to the index).
  wheels="$CACHE/wheels/$("$VENV/bin/python" -c 'import json, sys, sysconfig, tomllib
t = tomllib.load(open(sys.argv[1], "rb"))
p = t["project"]
print(sys.version, sysconfig.get_platform(), json.dumps(
    [t["build-system"], p.get("dependencies"), p.get("optional-dependencies")], sort_keys=True))' \
    "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
  # --no-compile: half of the install's CPU was byte-compiling every module, most of which
  # no command here imports; Python compiles what is imported on first use.
  offline=("${pip[@]}" install --no-compile --no-index --find-links "$wheels" -e "$ROOT[dev,fast]")
  from_wheels() {  # quiet: a failure here only means the wheelhouse is made again
    [ -f "$wheels/.complete" ] && "${offline[@]}" >"$VENV/.wheelhouse.log" 2>&1
  }
  if ! from_wheels; then
    mkdir -p "$CACHE/wheels"
    (
      flock 9  # one maker per key; another bootstrap waits, then finds it made
      if ! from_wheels; then
        say "making the wheelhouse $wheels from the index"
        mapfile -t build_requires < <("$VENV/bin/python" -c 'import sys, tomllib
print(*tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"], sep="\n")' \
          "$ROOT/pyproject.toml")
        tmp=$(mktemp -d "$wheels.tmp.XXXXXX")
        # With what the build backend asks for an editable install (hatchling: editables).
        "${pip[@]}" wheel -w "$tmp" "$ROOT[dev,fast]" "${build_requires[@]}" editables
        rm -f "$tmp"/nbd_export_worker-*.whl  # the project itself is installed editable
        touch "$tmp/.complete"
        rm -rf "$wheels" && mv "$tmp" "$wheels"
        "${offline[@]}"
      fi
    ) 9>"$CACHE/wheels/.lock"
  fi
  rm -f "$VENV"/.installed-* && touch "$stamp"
fi

# After the venv: the build is installed only once the worker's self-test passed on it.
bash "$ROOT/nbd-server/build.sh" --python "$VENV/bin/python"
