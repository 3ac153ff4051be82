#!/usr/bin/env bash
# Runs the worker for development against the local RabbitMQ and MariaDB and an
# nbd-server this script starts under .dev/ (sparse files as disks), until Ctrl-C.
# Then it stops that nbd-server again. Settings: any EXPORT_WORKER_* variable you set wins.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/bootstrap.sh

DEV="$ROOT/.dev"
PORT=${DEV_NBD_PORT:-10809}
mkdir -p "$DEV/conf.d" "$DEV/links" "$DEV/auth" "$DEV/disks"
for disk in disk-a disk-b disk-c; do
  [ -f "$DEV/disks/$disk" ] || truncate -s 1G "$DEV/disks/$disk"
done
truncate -s 1M "$DEV/placeholder.img"
# allowlist = false: the server lists its exports (the VM disks it serves) to nobody; the
# worker asks for each by name. includedir: where it writes snippets (absolute: the daemon
# chdirs to /); a placeholder, since a server with no export won't start.
cat >"$DEV/config" <<CONF
[generic]
    allowlist = false
    includedir = $DEV/conf.d
    port = $PORT
    listenaddr = 127.0.0.1
[placeholder]
    exportname = $DEV/placeholder.img
    readonly = true
CONF

export EXPORT_WORKER_NBD_CONFIG_FILE=${EXPORT_WORKER_NBD_CONFIG_FILE:-$DEV/config}
export EXPORT_WORKER_NBD_CONF_DIR=${EXPORT_WORKER_NBD_CONF_DIR:-$DEV/conf.d}
export EXPORT_WORKER_NBD_PID_FILE=${EXPORT_WORKER_NBD_PID_FILE:-$DEV/nbd-server.pid}
export EXPORT_WORKER_NBD_PORT=${EXPORT_WORKER_NBD_PORT:-$PORT}
export EXPORT_WORKER_LINK_DIR=${EXPORT_WORKER_LINK_DIR:-$DEV/links}
export EXPORT_WORKER_AUTH_DIR=${EXPORT_WORKER_AUTH_DIR:-$DEV/auth}
export EXPORT_WORKER_STATE_DIR=${EXPORT_WORKER_STATE_DIR:-$DEV/state}
export EXPORT_WORKER_DEVICE_ROOTS=${EXPORT_WORKER_DEVICE_ROOTS:-$DEV/disks}
export EXPORT_WORKER_ALLOW_REGULAR_FILES=${EXPORT_WORKER_ALLOW_REGULAR_FILES:-true}

# The same settings for the operator commands in another terminal: `. .dev/env`.
for var in "${!EXPORT_WORKER_@}"; do printf 'export %s=%q\n' "$var" "${!var}"; done >"$DEV/env"

server_pid=""
if [ -f "$DEV/nbd-server.pid" ] && kill -0 "$(cat "$DEV/nbd-server.pid")" 2>/dev/null; then
  echo "dev: nbd-server already running, pid $(cat "$DEV/nbd-server.pid")" >&2
else
  # The project's build (scripts/bootstrap.sh installed it): apt's nbd-server corrupts copies.
  "${NBD_SERVER_BIN:-/usr/local/sbin/nbd-server}" -C "$DEV/config" -p "$DEV/nbd-server.pid"
  for _ in $(seq 1 50); do [ -s "$DEV/nbd-server.pid" ] && break; sleep 0.1; done
  server_pid=$(cat "$DEV/nbd-server.pid")
  echo "dev: started nbd-server pid $server_pid on 127.0.0.1:$PORT" >&2
fi

stop_server() {
  # Only the main process, by its pid: it ends its own children.
  if [ -n "$server_pid" ]; then kill -TERM "$server_pid" 2>/dev/null || true; fi
}
trap stop_server EXIT

.venv/bin/nbd-export-worker migrate
echo "dev: disks you can export: $(ls "$DEV"/disks | sed "s|^|$DEV/disks/|" | tr '\n' ' ')" >&2
.venv/bin/nbd-export-worker run &
worker=$!
trap 'kill -TERM $worker 2>/dev/null || true' INT TERM
wait $worker || true
wait $worker 2>/dev/null || true
