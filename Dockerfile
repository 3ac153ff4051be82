# The worker's image; docker-compose.yml runs nbd-server from it too.
#
#   DOCKER_BUILDKIT=1 docker build -t nbd-export-worker .
#
# Base: debian:trixie-slim with Debian's own python3 in a venv. A base image made locally
# from Debian's mirror (scripts/container-base.sh: debootstrap, then `docker import`) is the
# same thing, so the image builds where no registry but Debian's mirror and PyPI answers,
# and its nbd-server is built against the very libraries it runs with.
#
# BuildKit (the default builder since Docker 23) is needed for one optional secret: where
# HTTPS egress is re-signed by a site CA, pass the host's bundle for pip, which is used
# during the build only and never stored in a layer:
#   docker build --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt ...

# --- nbd-server: Debian trixie's source with the project's patches (nbd-server/patches/).
# apt's nbd-server zeroes only the first 64 MiB of a longer WRITE_ZEROES and says success.
FROM debian:trixie-slim AS nbd-server-build
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates dpkg-dev patch \
        libglib2.0-dev libgnutls28-dev bison flex pkg-config gcc make \
    && rm -rf /var/lib/apt/lists/*
COPY nbd-server /src/nbd-server
# Self-tested in the last stage, where the worker is installed.
RUN NBD_BUILD_CACHE=/build bash /src/nbd-server/build.sh --no-self-test --dest /out/nbd-server

# --- the worker, and the server binary it has tested.
FROM debian:trixie-slim
# tini: PID 1 when the image runs in a PID namespace of its own, so that the orphans of
# the self-test's private server instances are reaped.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv tini \
        libglib2.0-0t64 libgnutls30t64 \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/nbd-export-worker
ENV PATH=/opt/nbd-export-worker/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY schema ./schema
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
    && pip install --no-cache-dir --disable-pip-version-check '.[fast]' && rm -rf /src

# Installed only once the worker's data-path self-test passed on it (a private instance on
# a loopback port and a scratch file: write, WRITE_ZEROES over 64 MiB, FLUSH, TRIM, read back).
COPY --from=nbd-server-build /out/nbd-server /usr/local/sbin/nbd-server.untested
RUN nbd-export-worker self-test --binary /usr/local/sbin/nbd-server.untested \
    && mv /usr/local/sbin/nbd-server.untested /usr/local/sbin/nbd-server

# One unprivileged user for the worker and nbd-server: signalling the server's main
# process and reading /proc/PID/exe then need no capability. /var/lib/nbd-export-worker
# is the worker's state (its node id) and holds the link and authfile directories.
RUN useradd --system --uid 10809 --home-dir /var/lib/nbd-export-worker nbdexport \
    && install -d -o nbdexport -g nbdexport /var/lib/nbd-export-worker \
        /var/lib/nbd-export-worker/links /var/lib/nbd-export-worker/auth \
        /etc/nbd-server/conf.d /run/nbd-server /srv/disks
USER nbdexport
WORKDIR /var/lib/nbd-export-worker

EXPOSE 9108
# Reads the worker's own settings (EXPORT_WORKER_METRICS_HOST/PORT): no port written here.
HEALTHCHECK --interval=15s --timeout=10s --start-period=30s \
    CMD ["nbd-export-worker", "healthcheck"]
ENTRYPOINT ["tini", "-s", "--", "nbd-export-worker"]
CMD ["run"]
