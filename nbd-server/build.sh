#!/usr/bin/env bash
# Builds nbd-server from Debian's source package with the project's patches (patches/*.patch,
# each with a header: what, why, how it was found, upstream) and GnuTLS, and installs it only
# after it passed the worker's data-path self-test.
#
#   nbd-server/build.sh --python .venv/bin/python         build, self-test, install (PREFIX/sbin)
#   nbd-server/build.sh --unpatched --dest FILE           Debian's source as it is, for the tests
#                                                         that show such a build is refused
#   nbd-server/build.sh --no-self-test --dest FILE        build only (the Docker build stage:
#                                                         the image's last stage self-tests it)
# A build that was not self-tested is never installed as PREFIX/sbin/nbd-server.
#
# Why build at all: every nbd-server Debian ships (3.24 in bookworm, 3.26.1 in trixie, and
# 3.27.1 in sid) zeroes only the first 64 MiB of a longer WRITE_ZEROES and says success, which
# corrupts copies onto volumes that are not already zero (patch 0001). The newest Debian source
# this machine's mirror serves is trixie's 3.26.1-6.1 (which carries the includedir-reload fix);
# sid's 3.27.1 sources are listed but not downloadable, so the TLS fix of 3.27.0 is backported.
#
# Idempotent and cached: a build is kept under $CACHE keyed by the source suite, the patches,
# the configure flags and this script; when FILE already is that build, it returns at once.
# Needs the build dependencies (scripts/install-system-deps.sh installs them) and root for
# PREFIX. Never touches the machine's own apt source lists.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SUITE=${NBD_SOURCE_SUITE:-trixie}
# Pinned: the patches are made against this source; a new Debian upload is a deliberate bump.
VERSION=${NBD_SOURCE_VERSION:-1:3.26.1-6.1}
PREFIX=${NBD_SERVER_PREFIX:-/usr/local}
CACHE=${NBD_BUILD_CACHE:-/var/cache/nbd-export-worker}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CONFIGURE=(--disable-maintainer-mode --disable-manpages --with-gnutls)

patched=1 self_test=1 dest="" python=""
while [ $# -gt 0 ]; do
  case "$1" in
    --unpatched) patched=; self_test=; shift ;;
    --no-self-test) self_test=; shift ;;
    --dest) dest=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    *) echo "usage: $0 [--unpatched] [--no-self-test] [--dest FILE] [--python PYTHON]" >&2; exit 2 ;;
  esac
done
[ -n "$dest" ] || dest=$PREFIX/sbin/nbd-server
if [ -z "$self_test" ] && [ "$(realpath -m "$dest")" = "$(realpath -m "$PREFIX/sbin/nbd-server")" ]; then
  echo "build.sh: an untested or unpatched build needs another --dest than $dest" >&2
  exit 2
fi
if [ -n "$self_test" ] && [ -z "$python" ]; then
  echo "build.sh: --python (a Python with the worker installed) is needed for the self-test" >&2
  exit 2
fi

log() { printf 'nbd-server/build: %s\n' "$*" >&2; }

patches=()
if [ -n "$patched" ]; then
  mapfile -t patches < <(find "$HERE/patches" -name '*.patch' | sort)
fi
key=$( { echo "$SUITE $VERSION ${CONFIGURE[*]}"; cat "${BASH_SOURCE[0]}"; cat "${patches[@]}" /dev/null; } |
      sha256sum | cut -c1-16)

# One build at a time per cache (they share the source directory and the apt lists).
mkdir -p "$CACHE"
exec 9>"$CACHE/.build.lock"
flock 9
build="$CACHE/build-$key"
if [ -x "$dest" ] && cmp -s "$build/nbd-server" "$dest"; then
  log "$dest is build $key already"
  exit 0
fi
if [ ! -x "$build/nbd-server" ]; then
  mkdir -p "$CACHE/lists-$SUITE/partial" "$CACHE/src-$SUITE"
  sources="$CACHE/$SUITE-src.list"
  echo "deb-src $MIRROR $SUITE main" >"$sources"
  apt_opts=(-o "Dir::Etc::sourcelist=$sources" -o "Dir::Etc::sourceparts=-"
            -o "Dir::State::Lists=$CACHE/lists-$SUITE" -o "APT::Sandbox::User=root")
  log "fetching Debian $SUITE's nbd source package $VERSION"
  apt-get "${apt_opts[@]}" update -qq
  if ! (cd "$CACHE/src-$SUITE" && rm -f nbd_* &&
         apt-get "${apt_opts[@]}" source -qq --download-only "nbd=$VERSION" >/dev/null); then
    log "Debian $SUITE no longer has nbd $VERSION: check that the patches apply to its current"
    log "version, then set NBD_SOURCE_VERSION (and update the pin in this script)"
    exit 1
  fi
  rm -rf "$build.tmp" && mkdir -p "$build.tmp"
  dpkg-source -x --no-check "$CACHE/src-$SUITE"/nbd_*.dsc "$build.tmp/src" >/dev/null
  for patch in "${patches[@]}"; do
    log "applying $(basename "$patch")"
    patch -d "$build.tmp/src" -p1 --forward --fuzz=0 --quiet <"$patch"
  done
  (cd "$build.tmp/src" && ./configure -q "${CONFIGURE[@]}" >/dev/null && make -s nbd-server >/dev/null)
  install -m 0755 "$build.tmp/src/nbd-server" "$build.tmp/nbd-server"
  rm -rf "$build.tmp/src" "$build" && mv "$build.tmp" "$build"
  log "built $("$build/nbd-server" -V 2>&1 | head -n1) as $build/nbd-server"
fi

if [ -n "$self_test" ]; then
  # The worker's own check (write, WRITE_ZEROES over 64 MiB, FLUSH, FUA, TRIM, read back) on a
  # private instance of this binary: a build that loses writes is never installed.
  "$python" -m worker self-test --binary "$build/nbd-server"
fi
install -D -m 0755 "$build/nbd-server" "$dest.new"
mv -f "$dest.new" "$dest"  # atomic: a server starting meanwhile runs the old or the new one
log "installed $dest (build $key)"
