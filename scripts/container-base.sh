#!/usr/bin/env bash
# Makes sure the Docker daemon has the image's base, debian:trixie-slim: already there,
# pulled from a registry, or, when no registry answers, made here from Debian's mirror with
# debootstrap and `docker import`ed under the same name. The tarball is cached, so later
# runs (and a wiped daemon) import it in seconds.
#
# Made locally, it is what the official image is: Debian trixie's minbase, with the slim
# image's dpkg path excludes and apt clean-up, and trixie, trixie-updates and
# trixie-security as its sources. Needs root (debootstrap). Uses $DOCKER (default docker)
# and whatever DOCKER_HOST says.
set -euo pipefail

IMAGE=debian:trixie-slim
DOCKER=${DOCKER:-docker}
CACHE=${NBD_BUILD_CACHE:-/var/cache/nbd-export-worker}/base
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
TARBALL=$CACHE/debian-trixie-slim.tar

say() { printf 'container-base: %s\n' "$*" >&2; }

"$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1 && exit 0
if [ ! -s "$TARBALL" ] && timeout 60 "$DOCKER" pull -q "$IMAGE" >/dev/null 2>&1; then
  say "pulled $IMAGE"
  exit 0
fi

if [ ! -s "$TARBALL" ]; then
  command -v debootstrap >/dev/null || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
  }
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  say "no registry gave $IMAGE: making it from $MIRROR"
  debootstrap --variant=minbase trixie "$root" "$MIRROR" >/dev/null
  # The official slim image's settings: no documentation, manuals or translations from
  # later installs (copyright files stay), and no apt caches left in layers.
  cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
  cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  rm -f "$root/etc/apt/sources.list"
  cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: trixie trixie-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: trixie-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  rm -rf "$root"/usr/share/{man,groff,info,lintian,linda,locale}/* \
    "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/*.log \
    "$root"/var/cache/debconf/*-old
  mkdir -p "$CACHE"
  tar -C "$root" --numeric-owner -cf "$TARBALL.tmp" .
  mv "$TARBALL.tmp" "$TARBALL"
fi
"$DOCKER" import --change 'CMD ["bash"]' "$TARBALL" "$IMAGE" >/dev/null
say "imported $IMAGE from $TARBALL"
