# The worker's image; docker-compose.yml also runs nbd-server from it.
# Debian trixie: apt's nbd-server is 3.26.1-6.1, SIGHUP-safe (>= 3.25) and with the
# includedir reload fix (see shared nbd-server facts); nbd-client lists exports.
FROM python:3.12-slim-trixie

# The same script the tests' set-up runs: on trixie it installs apt's nbd-server (>= 3.25)
# and nbd-client; on an older base it would build a good nbd-server instead.
COPY scripts/install-system-deps.sh /tmp/install-system-deps.sh
RUN bash /tmp/install-system-deps.sh && rm -rf /var/lib/apt/lists/* /tmp/install-system-deps.sh

WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY schema ./schema
RUN pip install --no-cache-dir . && rm -rf /src

# One unprivileged user for the worker and nbd-server: signalling the server's main
# process and reading /proc/PID/exe then need no capability.
RUN useradd --system --uid 10809 --home-dir /var/lib/nbd-export-worker nbdexport \
    && install -d -o nbdexport -g nbdexport \
        /var/lib/nbd-export-worker/links /etc/nbd-server/conf.d /run/nbd-server /srv/disks
USER nbdexport
WORKDIR /var/lib/nbd-export-worker

EXPOSE 9108
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=4)"]
ENTRYPOINT ["nbd-export-worker"]
CMD ["run"]
