# The worker's image; docker-compose.yml also runs nbd-server from it.
#
# Base: debian:trixie-slim and Debian's own python3 in a venv, so that a base image made
# locally from Debian's mirror (debootstrap/mmdebstrap, then `docker import`) is the same
# thing when no registry can be reached.

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
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv nbd-client \
        libglib2.0-0t64 libgnutls30t64 \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/nbd-export-worker
ENV PATH=/opt/nbd-export-worker/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY schema ./schema
RUN pip install --no-cache-dir . && rm -rf /src

# Installed only once the worker's data-path self-test passed on it (a private instance on
# a loopback port and a scratch file: write, WRITE_ZEROES over 64 MiB, FLUSH, TRIM, read back).
COPY --from=nbd-server-build /out/nbd-server /usr/local/sbin/nbd-server.untested
RUN nbd-export-worker self-test --binary /usr/local/sbin/nbd-server.untested \
    && mv /usr/local/sbin/nbd-server.untested /usr/local/sbin/nbd-server

# One unprivileged user for the worker and nbd-server: signalling the server's main
# process and reading /proc/PID/exe then need no capability.
RUN useradd --system --uid 10809 --home-dir /var/lib/nbd-export-worker nbdexport \
    && install -d -o nbdexport -g nbdexport \
        /var/lib/nbd-export-worker/links /etc/nbd-server/conf.d /run/nbd-server /srv/disks
USER nbdexport
WORKDIR /var/lib/nbd-export-worker

EXPOSE 9108
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=4)"]
ENTRYPOINT ["nbd-export-worker"]
CMD ["run"]
