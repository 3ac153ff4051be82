"""`healthcheck`: a container's HEALTHCHECK, from the worker's own settings."""

from __future__ import annotations

import argparse
import asyncio
import http.client
import sys
import urllib.error
import urllib.request

from worker.commands import ExitCode
from worker.errors import WorkerError
from worker.nbd.probes import HEALTH_PROBE_NAME, nbd_tls_session
from worker.nbd.wire import export_state
from worker.settings import Settings


async def healthcheck(settings: Settings, args: argparse.Namespace) -> int:
    """A container's HEALTHCHECK: the worker's /healthz (or /readyz) on the host and port
    its own settings give, or, with --nbd-server, an NBD handshake with the server."""
    if args.nbd_server:
        try:
            await export_state(
                settings.nbd_host,
                settings.nbd_port,
                HEALTH_PROBE_NAME,
                settings.probe_timeout_s,
                source=settings.probe_source_address or None,
                # As the worker's probes do: a server whose TLS is broken is not healthy.
                tls=nbd_tls_session(settings),
            )
        except WorkerError as exc:
            print(f"unhealthy: {exc}", file=sys.stderr)
            return ExitCode.FAILURE
        print(f"nbd-server answers at {settings.nbd_host}:{settings.nbd_port}")
        return ExitCode.OK
    if not settings.metrics_port:
        print("unhealthy: EXPORT_WORKER_METRICS_PORT is 0, so no health endpoint", file=sys.stderr)
        return ExitCode.FAILURE
    # A wildcard listener is reached on loopback.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(  # noqa: S104
        settings.metrics_host, settings.metrics_host
    )
    url = f"http://{f'[{host}]' if ':' in host else host}:{settings.metrics_port}/"
    url += "readyz" if args.ready else "healthz"

    def get() -> str:
        with urllib.request.urlopen(url, timeout=settings.probe_timeout_s) as response:  # noqa: S310
            return f"{response.status} {response.reason}"

    try:
        status = await asyncio.to_thread(get)
    except urllib.error.HTTPError as exc:
        print(f"unhealthy: {url} answered {exc.code}: {exc.read()[:300]!r}", file=sys.stderr)
        return ExitCode.FAILURE
    except (OSError, http.client.HTTPException) as exc:  # URLError; not HTTP at all
        print(f"unhealthy: {url}: {exc!r}", file=sys.stderr)
        return ExitCode.FAILURE
    print(f"{url}: {status}")
    return ExitCode.OK
