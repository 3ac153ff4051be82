"""The worker's settings for a harness nbd-server, and the worker as a process of its own,
as an appliance runs it: for tests that kill it, and for the soak."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any

from harness.nbd import NbdServerProcess
from harness.services import clean_environ
from worker.settings import Settings


def worker_settings(server: NbdServerProcess, work: Path, disks: Path, **fields: Any) -> Settings:
    """Settings for a worker of `server`, whose disks are sparse files under `disks`, with
    its links and authfiles under `work`, no ops port, and `fields` for the rest (node id,
    broker and database URLs, queue names, retries)."""
    serving: dict[str, Any] = {
        "nbd_conf_dir": server.conf_dir,
        "nbd_config_file": server.config_file,
        "nbd_pid_file": server.pid_file,
        "nbd_host": "127.0.0.1",
        "nbd_port": server.port,
        "link_dir": work / "links",
        "auth_dir": work / "auth",
        "device_roots": (disks,),
        "allow_regular_files": True,
        "metrics_port": 0,
        "prefetch": 32,
    }
    return Settings(**{**serving, **fields})


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    """The EXPORT_WORKER_* environment that gives a worker process these settings."""
    env = clean_environ(**extra)
    for key, value in settings.model_dump(mode="json").items():
        if value is None:
            continue  # unset: the default
        if key in ("device_roots", "client_addresses"):
            value = ",".join(value)
        env[f"EXPORT_WORKER_{key.upper()}"] = (
            str(value).lower() if isinstance(value, bool) else str(value)
        )
    return env


class WorkerProcess:
    """`nbd-export-worker run`, started and stopped (or killed) by its PID."""

    def __init__(self, settings: Settings, **env: str) -> None:
        self.settings = settings
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self, timeout_s: float = 30) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            "run",
            env=env_for(self.settings, **self.env),
            stderr=asyncio.subprocess.PIPE,
        )
        assert self.proc.stderr is not None
        while True:
            line = await asyncio.wait_for(self.proc.stderr.readline(), timeout_s)
            assert line, f"the worker exited at start-up: {''.join(self.log)[-2000:]}"
            self.log.append(line.decode(errors="replace"))
            if b"Worker ready" in line:
                break
        # Keep reading its log so a full pipe never blocks it.
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.log.append(line.decode(errors="replace"))

    async def wait(self, timeout_s: float = 60) -> int:
        """Its exit status once it has exited (-9: killed by SIGKILL)."""
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout_s)
        if self._reader is not None:
            await self._reader
        return code

    async def stop(self) -> int | None:
        """SIGTERM, and the exit status; a no-op if it has exited already."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
        return await self.wait()
