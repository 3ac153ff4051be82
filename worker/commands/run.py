"""`run` (the service until SIGTERM or SIGINT) and `migrate`."""

from __future__ import annotations

import asyncio
import logging
import signal

from worker.assembly import database_tls
from worker.commands import ExitCode
from worker.errors import UnsupportedServer, WorkerError
from worker.repository import migrate
from worker.service import serve
from worker.settings import Settings

log = logging.getLogger("worker")


async def run(settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await serve(settings, stop)
    except UnsupportedServer as exc:
        log.critical("Refusing to start: %s", exc)
        return ExitCode.UNSUPPORTED_SERVER
    except WorkerError as exc:
        log.critical("Cannot start: %s", exc)
        return ExitCode.FAILURE
    return ExitCode.OK


async def migrate_database(settings: Settings) -> int:
    try:
        applied = await migrate(
            settings.database_url,
            node_id=settings.node_id,
            timeout_s=settings.db_connect_timeout_s,
            tls=database_tls(settings),
        )
    except WorkerError as exc:
        log.critical("Migration failed: %s", exc)
        return ExitCode.FAILURE
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
    return ExitCode.OK
