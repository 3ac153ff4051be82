#!/usr/bin/env bash
# Installs what the worker and its tests need from the system on Debian 12 or newer:
# nbd-client (listing), the copy tools the tests judge the data path with (libnbd-bin:
# nbdcopy, nbdinfo; qemu-utils: qemu-img, qemu-io; nbdkit, whose rate filter serves a
# source slowly enough for the live view's tests to sample a copy under way), and what nbd-server/build.sh needs to
# build the project's nbd-server from Debian's source. bootstrap.sh then builds that server.
#
# Idempotent (only missing packages are installed); needs root (apt-get). Never touches the
# machine's own apt source lists.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${NBD_BUILD_CACHE:-/var/cache/nbd-export-worker}

# --with-test-tools: also what only the tests use: Debian 12's nbd-server 3.24 and
# Prometheus's promtool, both unpacked (not installed: no service starts) under $CACHE,
# Debian's docker.io, docker-compose and debootstrap to build the image and run its stack
# (tests/containers.py starts a private daemon and stops it by pid; the packages start
# none), openssl and stunnel4 for the TLS tests, galera-4, rsync and haproxy for the
# cluster tests and the soak (harness/clusters.py starts private nodes; no service starts),
# and Debian's nbd-server source built without the project's patches (to show that the
# worker refuses it).
WITH_TEST_TOOLS=
[ "${1:-}" = "--with-test-tools" ] && WITH_TEST_TOOLS=1

log() { printf 'install-system-deps: %s\n' "$*" >&2; }

# Not `dpkg -s`: it succeeds for a removed package whose config files are left.
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

apt_updated=
apt_install() {
  local missing=()
  for p in "$@"; do installed "$p" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ -z "$apt_updated" ]; then apt-get update -qq; apt_updated=1; fi
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# nbd-client only lists exports (-l): Debian 12's version is fine for that.
apt_install nbd-client libnbd-bin qemu-utils nbdkit \
  dpkg-dev patch libglib2.0-dev libgnutls28-dev bison flex pkg-config gcc make

unpack() {  # $1 = apt package (with an optional =version), $2 = directory to unpack into
  if [ -z "$apt_updated" ]; then apt-get update -qq; apt_updated=1; fi
  local tmp
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get -o APT::Sandbox::User=root download -qq "$1" >/dev/null)
  rm -rf "$2" && mkdir -p "$2"
  dpkg-deb -x "$tmp"/*.deb "$2"
  rm -rf "$tmp"
  log "unpacked $1 under $2"
}

if [ -n "$WITH_TEST_TOOLS" ]; then
  [ -x "$CACHE/nbd-server-3.24/bin/nbd-server" ] || unpack 'nbd-server=1:3.24*' "$CACHE/nbd-server-3.24"
  [ -x "$CACHE/prometheus/usr/bin/promtool" ] || unpack prometheus "$CACHE/prometheus"
  # Installing docker.io must not start the system's daemon (its default bridge takes
  # 172.17.x addresses), nor haproxy its own: no service starts while a policy-rc.d says 101.
  if { ! installed docker.io || ! installed haproxy; } && [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt_install docker.io docker-compose debootstrap
  # TLS tests: a CA made with openssl, and stunnel as a TLS listener in front of RabbitMQ.
  apt_install openssl stunnel4
  # Cluster tests: Galera replication with rsync state transfer, HAProxy in front of it.
  apt_install galera-4 rsync haproxy
  # The AsyncAPI parser the unit tests validate schema/asyncapi.yaml with: tools/asyncapi/,
  # pinned by its package-lock.json. Debian's node and npm unless a node is there already.
  # `npm ci` runs once per package.json and lockfile on this machine, into
  # $CACHE/asyncapi-KEY; a clone's node_modules is a copy of that (hard links: a second,
  # where npm ci takes half a minute), stamped with the key, so it is copied again only
  # when either file changed. No install scripts: the parser needs none, and a
  # dependency's (@scarf/scarf) only phones home.
  command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
  asyncapi="$ROOT/tools/asyncapi"
  npm_key=$(cat "$asyncapi/package.json" "$asyncapi/package-lock.json" | sha256sum | cut -c1-16)
  if [ ! -f "$asyncapi/node_modules/.installed-$npm_key" ]; then
    npm_cache="$CACHE/asyncapi-$npm_key"
    mkdir -p "$CACHE"
    (
      flock 9
      if [ ! -f "$npm_cache/node_modules/.installed-$npm_key" ]; then
        log "npm ci for tools/asyncapi into $npm_cache"
        tmp=$(mktemp -d "$npm_cache.tmp.XXXXXX")
        cp "$asyncapi/package.json" "$asyncapi/package-lock.json" "$tmp/"
        npm ci --prefix "$tmp" --ignore-scripts --no-audit --no-fund --loglevel=error
        touch "$tmp/node_modules/.installed-$npm_key"
        rm -rf "$npm_cache" && mv "$tmp" "$npm_cache"
      fi
    ) 9>"$CACHE/.asyncapi.lock"
    rm -rf "$asyncapi/node_modules"
    if ! cp -al "$npm_cache/node_modules" "$asyncapi/node_modules" 2>/dev/null; then
      rm -rf "$asyncapi/node_modules"  # another file system: a plain copy
      cp -a "$npm_cache/node_modules" "$asyncapi/node_modules"
    fi
  fi
  bash "$ROOT/nbd-server/build.sh" --unpatched --dest "$CACHE/nbd-server-unpatched/nbd-server"
fi
