"""The operations endpoint: /metrics, /healthz and /readyz on one port.

Served from a thread (prometheus-client's WSGI app), so a scrape never waits on a busy
event loop; health checks run *in* the loop, which is exactly what /healthz must prove.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

log = logging.getLogger(__name__)

#: Readiness: component name -> None when ready, else why not.
ReadinessCheck = Callable[[], Awaitable[dict[str, str | None]]]
StartResponse = Callable[..., Any]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would drown the worker's own log


class OpsServer:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        registry: CollectorRegistry,
        readiness: ReadinessCheck,
        *,
        host: str,
        port: int,
        check_timeout_s: float = 3.0,
    ) -> None:
        self._loop = loop
        self._metrics_app = make_wsgi_app(registry)
        self._readiness = readiness
        self._check_timeout_s = check_timeout_s
        self._server = make_server(
            host, port, self._app, server_class=_ThreadingServer, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="ops-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _in_loop(self, coro: Awaitable[Any]) -> Any:
        async def run() -> Any:
            return await coro

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            return future.result(self._check_timeout_s)
        except TimeoutError:
            future.cancel()
            raise

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            body: Iterable[bytes] = self._metrics_app(environ, start_response)
            return body
        if path == "/healthz":
            try:
                self._in_loop(asyncio.sleep(0))
            except Exception:
                return _json(start_response, 503, {"status": "fail", "event_loop": "blocked"})
            return _json(start_response, 200, {"status": "ok"})
        if path == "/readyz":
            try:
                problems: dict[str, str | None] = self._in_loop(self._readiness())
            except Exception as exc:
                problems = {"checks": f"did not finish: {type(exc).__name__}"}
            ready = all(reason is None for reason in problems.values())
            checks = {name: reason or "ok" for name, reason in problems.items()}
            return _json(
                start_response,
                200 if ready else 503,
                {"status": "ok" if ready else "fail", "checks": checks},
            )
        return _json(start_response, 404, {"status": "not found"})


def _json(start_response: StartResponse, code: int, payload: dict[str, Any]) -> list[bytes]:
    reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[code]
    body = json.dumps(payload).encode()
    start_response(
        f"{code} {reason}",
        [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
    )
    return [body]
