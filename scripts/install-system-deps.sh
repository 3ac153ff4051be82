#!/usr/bin/env bash
# Installs what the worker and its tests need from the system on Debian 12 or newer:
# nbd-client from apt, and an nbd-server >= 3.25 (Debian 12's 3.24 corrupts its heap
# on SIGHUP: shared/docs/nbd-server-facts.md, upstream issue #143).
#
# When apt's candidate nbd-server is too old, Debian trixie's source package is built
# once and installed as /usr/local/sbin/nbd-server; a later run finds it and returns at once.
# Idempotent; needs root (apt-get). Never touches the machine's own apt source lists.
set -euo pipefail

MIN_VERSION=3.25
PREFIX=${NBD_SERVER_PREFIX:-/usr/local}
CACHE=${NBD_BUILD_CACHE:-/var/cache/nbd-export-worker}

# --with-test-tools: also what only the tests use: Debian 12's nbd-server 3.24 and
# Prometheus's promtool, both unpacked (not installed: no service starts) under $CACHE, and
# docker-compose to validate docker-compose.yml.
WITH_TEST_TOOLS=
[ "${1:-}" = "--with-test-tools" ] && WITH_TEST_TOOLS=1

log() { printf 'install-system-deps: %s\n' "$*" >&2; }

version_of() {  # prints the X.Y[.Z] version of an nbd-server binary, or nothing
  "$1" -V 2>&1 | sed -n 's/.*nbd-server version \([0-9][0-9.]*\).*/\1/p' | head -n1
}

is_new_enough() {  # $1 = version
  [ -n "$1" ] && [ "$(printf '%s\n%s\n' "$MIN_VERSION" "$1" | sort -V | head -n1)" = "$MIN_VERSION" ]
}

apt_updated=
apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ -z "$apt_updated" ]; then apt-get update -qq; apt_updated=1; fi
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# nbd-client only lists exports (-l): Debian 12's version is fine for that.
apt_install nbd-client

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
  apt_install docker-compose
fi

existing=$(command -v nbd-server || true)
if [ -n "$existing" ] && is_new_enough "$(version_of "$existing")"; then
  log "nbd-server $(version_of "$existing") at $existing is new enough"
  exit 0
fi

if [ -z "$apt_updated" ]; then apt-get update -qq; apt_updated=1; fi
candidate=$(apt-cache policy nbd-server 2>/dev/null | sed -n 's/^ *Candidate: *[0-9]*:\{0,1\}\([0-9][0-9.]*\).*/\1/p')
if is_new_enough "$candidate"; then
  apt_install nbd-server
  exit 0
fi

log "apt offers nbd-server '${candidate:-none}' (< $MIN_VERSION): building Debian trixie's source package"
apt_install dpkg-dev libglib2.0-dev bison flex pkg-config gcc make

mkdir -p "$CACHE/lists/partial" "$CACHE/src"
sources="$CACHE/trixie-src.list"
echo "deb-src http://deb.debian.org/debian trixie main" >"$sources"
apt_opts=(-o "Dir::Etc::sourcelist=$sources" -o "Dir::Etc::sourceparts=-" -o "Dir::State::Lists=$CACHE/lists"
          -o "APT::Sandbox::User=root")
apt-get "${apt_opts[@]}" update -qq
cd "$CACHE/src"
rm -rf nbd-*/
apt-get "${apt_opts[@]}" source -qq --download-only nbd/trixie >/dev/null
dpkg-source -x --no-check nbd_*.dsc >/dev/null
tree=$(find . -maxdepth 1 -type d -name 'nbd-*' | head -n1)
cd "$tree"
# Debian's patch touches configure.ac only in ways that need no autotools re-run
# (a fixed version string, the man-page switch), so maintainer mode stays off.
./configure -q --disable-maintainer-mode --disable-manpages --without-gnutls >/dev/null
make -s nbd-server >/dev/null
install -D -m 0755 nbd-server "$PREFIX/sbin/nbd-server"
log "installed nbd-server $(version_of "$PREFIX/sbin/nbd-server") as $PREFIX/sbin/nbd-server"
