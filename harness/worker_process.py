"""The worker's settings for a harness nbd-server, and the worker as a process of its own,
as an appliance runs it: for tests that kill it, and for the soak."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from harness.nbd import NbdServerProcess
from harness.processes import ManagedProcess
from harness.services import clean_environ
from worker.settings import SecretUrl, Settings


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
        secret = getattr(settings, key)
        if isinstance(secret, SecretStr | SecretUrl):  # dumped masked: the real value
            value = secret.get_secret_value() if isinstance(secret, SecretStr) else str(secret)
        if value is None:
            continue  # unset: the default
        if key in ("device_roots", "client_addresses"):
            value = ",".join(value)
        env[f"EXPORT_WORKER_{key.upper()}"] = (
            str(value).lower() if isinstance(value, bool) else str(value)
        )
    return env


class WorkerProcess:
    """`nbd-export-worker run`, started and stopped (or killed) by its PID: a
    ManagedProcess in the caller's process group, its log read back by `log`."""

    def __init__(self, settings: Settings, **env: str) -> None:
        self.settings = settings
        self.env = env
        self.proc: ManagedProcess | None = None

    @property
    def log(self) -> list[str]:
        """Its log so far (stdout and stderr), line by line."""
        return [] if self.proc is None else self.proc.lines()

    async def start(self, timeout_s: float = 30) -> None:
        """Returns once it logged "Worker ready"; raises StartFailed if it exits first."""
        self.proc = ManagedProcess(
            "the worker",
            [sys.executable, "-m", "worker", "run"],
            env_for(self.settings, **self.env),
            own_session=False,
        )
        await self.proc.wait_for_line("Worker ready", timeout_s)

    async def wait(self, timeout_s: float = 60) -> int:
        """Its exit status once it has exited (-9: killed by SIGKILL)."""
        assert self.proc is not None
        return await self.proc.wait(timeout_s)

    async def stop(self) -> int | None:
        """SIGTERM, and the exit status (SIGKILL after 60 s); a no-op if it has exited
        already."""
        if self.proc is None:
            return None
        return await self.proc.stop(timeout_s=60)
