"""The stack the benchmark drives, all of it its own and all of it removed at the end:
an nbd-server on a free loopback port with sparse files as disks, a database with a unique
name, unique queue names, and worker / floor processes started and stopped by pid."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiomysql
from aio_pika.abc import AbstractConnection
from pydantic import AnyUrl

from harness.nbd import NbdServerProcess, free_port
from harness.processes import ManagedProcess, StartFailed, log_tail
from harness.sql import execute_sql
from worker.devices import DevicePolicy
from worker.mappings import stored_addresses
from worker.messages import export_name
from worker.nbd.authfiles import authfile_path, render_authfile, write_authfile
from worker.nbd.files import SNIPPET_SUFFIX, ExportSpec, point_link, write_snippet
from worker.repository import migrate

log = logging.getLogger("bench")

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Sparse: nothing is read or written, the server only opens them and reports their size.
DISK_SIZE = 1024 * 1024
#: Rows per INSERT when pre-populating mappings.
INSERT_CHUNK = 500
#: Who may connect to the prepopulated exports: the worker's default.
CLIENT_ADDRESSES = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class Pair:
    """One (VM, disk) with the sparse file standing in for its device."""

    vm_id: str
    disk: int
    vm_name: str
    device_path: str

    @property
    def export_name(self) -> str:
        return export_name(self.vm_id, self.disk)

    def job(self, job_id: str) -> dict[str, Any]:
        return {
            "job_id": job_id,
            "vm_id": self.vm_id,
            "vm_name": self.vm_name,
            "disk_unit_number": self.disk,
            "device_path": self.device_path,
        }


class Stack:
    def __init__(self, root: Path, logs: Path, *, amqp_url: str, mysql_url: str) -> None:
        self.root = root
        self.logs = logs
        self.amqp_url = amqp_url
        token = uuid.uuid4().hex[:10]
        self.db_name = f"nbdbench_{token}"
        self.mysql_url = mysql_url.rstrip("/")
        self.database_url = f"{self.mysql_url}/{self.db_name}"
        self.node_id = f"bench-{token}"
        self.request_queue = f"bench.{token}.prepare-export"
        self.reply_queue = f"bench.{token}.export-ready"
        self.floor_queue = f"bench.{token}.floor"
        self.exchange = f"bench.{token}.exports"
        self.disks_dir = root / "disks"
        self.link_dir = root / "links"
        self.auth_dir = root / "auth"
        self.nbd = NbdServerProcess(root / "nbd")
        self.connection: AbstractConnection | None = None
        self.processes: list[ManagedProcess] = []
        self._database_created = False
        self._disk_count = 0
        self._vm_count = 0

    # --- set-up and tear-down ------------------------------------------------------------

    async def setup(self) -> None:
        """Directories, the database (migrated) and the broker connection; the nbd-server is
        started separately, once its snippets are written."""
        for directory in (self.disks_dir, self.link_dir, self.auth_dir, self.nbd.root):
            directory.mkdir(parents=True, exist_ok=True)
        self.nbd.write_base_config()
        self._database_created = True
        await migrate(AnyUrl(self.database_url), node_id=self.node_id, timeout_s=10.0)
        self.connection = await aio_pika.connect(self.amqp_url, timeout=10)

    async def cleanup(self) -> None:
        """Stops every process started (by pid), deletes the queues, drops the database.
        Each step runs even if an earlier one fails."""
        for proc in reversed(self.processes):
            try:
                await proc.stop(timeout_s=20)
            except Exception:
                log.exception("could not stop %s (pid %d)", proc.label, proc.pid)
        try:
            await asyncio.to_thread(self.nbd.stop)
        except Exception:
            log.exception("could not stop nbd-server (pid %d)", self.nbd.pid)
        if self.connection is not None:
            try:
                channel = await self.connection.channel()
                for queue in (
                    self.request_queue,
                    f"{self.request_queue}.dead",
                    self.reply_queue,
                    self.floor_queue,
                ):
                    with contextlib.suppress(Exception):
                        await channel.queue_delete(queue)
                with contextlib.suppress(Exception):
                    await channel.exchange_delete(self.exchange)
                with contextlib.suppress(Exception):
                    await channel.close()
            except Exception:
                log.exception("could not delete the benchmark's queues")
        if self._database_created:
            try:
                await self._execute(f"DROP DATABASE IF EXISTS `{self.db_name}`", use_db=False)
            except Exception:
                log.exception("could not drop database %s", self.db_name)
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await self.connection.close()

    def cleanup_now(self) -> None:
        """Synchronous last resort for processes when the event loop is gone."""
        for proc in reversed(self.processes):
            with contextlib.suppress(Exception):
                proc.stop_now()
        with contextlib.suppress(Exception):
            self.nbd.stop()

    # --- database -------------------------------------------------------------------------

    async def _connect_db(self, *, use_db: bool = True) -> Any:
        url = AnyUrl(self.database_url)
        return await aiomysql.connect(
            host=url.host or "127.0.0.1",
            port=url.port or 3306,
            user=url.username or "root",
            password=url.password or "",
            db=self.db_name if use_db else None,
            autocommit=True,
            charset="utf8mb4",
        )

    async def _execute(self, sql: str, *, use_db: bool = True) -> list[tuple[Any, ...]]:
        return await execute_sql(AnyUrl(self.database_url if use_db else self.mysql_url), sql)

    async def mariadb_version(self) -> str:
        rows = await self._execute("SELECT VERSION()", use_db=False)
        return str(rows[0][0]) if rows else "?"

    # --- disks and mappings ---------------------------------------------------------------

    def new_pair(self) -> Pair:
        """A (VM, disk) never seen before, with a fresh sparse file as its device."""
        self._disk_count += 1
        path = self.disks_dir / f"disk-{self._disk_count:06d}"
        with path.open("wb") as f:
            f.truncate(DISK_SIZE)
        # Two disks per VM, so jobs exercise disk numbers other than 0.
        if self._disk_count % 2 == 1:
            self._vm_count += 1
        vm_id = str(uuid.UUID(int=(0xBE << 120) | (self._vm_count << 32) | 0x5EED))
        return Pair(vm_id, (self._disk_count + 1) % 2, f"bench-vm-{self._vm_count}", str(path))

    def exports_on_disk(self) -> int:
        """Snippets in the includedir: the exports the server has after a restart."""
        return sum(1 for _ in self.nbd.conf_dir.glob(f"*{SNIPPET_SUFFIX}"))

    async def prepopulate(self, count: int) -> list[Pair]:
        """`count` active mappings as the worker would have left them: rows, links and
        snippets (written by the worker's own functions). The server sees them once it is
        (re)started; the worker must not be running."""
        pairs = [self.new_pair() for _ in range(count)]
        policy = DevicePolicy((self.disks_dir,), allow_regular_files=True)
        conf_dir, link_dir, auth_dir = self.nbd.conf_dir, self.link_dir, self.auth_dir

        def write_files() -> list[dict[str, Any]]:
            rows = []
            for pair in pairs:
                device = policy.check(pair.device_path)
                spec = ExportSpec(
                    name=pair.export_name,
                    link_path=link_dir / pair.export_name,
                    authfile=authfile_path(auth_dir, pair.export_name),
                )
                assert spec.authfile is not None
                # Loopback clients, and the worker's probes (from 127.0.0.1).
                admitted = [*CLIENT_ADDRESSES, "127.0.0.1"]
                write_authfile(spec.authfile, render_authfile(pair.export_name, admitted))
                point_link(spec.link_path, pair.device_path)
                write_snippet(conf_dir, spec)
                rows.append(
                    {
                        "node_id": self.node_id,
                        "vm_id": pair.vm_id,
                        "disk_unit_number": pair.disk,
                        "vm_name": pair.vm_name,
                        "export_name": pair.export_name,
                        "device_path": pair.device_path,
                        "device_id": device.device_id,
                        "status": "active",
                        "client_addresses": stored_addresses(CLIENT_ADDRESSES),
                    }
                )
            return rows

        rows = await asyncio.to_thread(write_files)
        conn = await self._connect_db()
        try:
            async with conn.cursor() as cur:
                columns = list(rows[0]) if rows else []
                sql = (
                    f"INSERT INTO vm_export_mappings ({', '.join(columns)}) "  # noqa: S608
                    f"VALUES ({', '.join(['%s'] * len(columns))})"
                )
                for start in range(0, len(rows), INSERT_CHUNK):
                    chunk = rows[start : start + INSERT_CHUNK]
                    await cur.executemany(sql, [tuple(r[c] for c in columns) for r in chunk])
        finally:
            conn.close()
        return pairs

    # --- nbd-server -----------------------------------------------------------------------

    async def start_server(self) -> int:
        try:
            return await asyncio.to_thread(self.nbd.start)
        except Exception as exc:
            raise StartFailed(
                f"nbd-server did not start: {exc}\n{log_tail(self.nbd.log_file)}"
            ) from exc

    async def stop_server(self) -> None:
        await asyncio.to_thread(self.nbd.stop)

    async def restart_server(self, *, allowlist: bool | None = None) -> int:
        """Restarts nbd-server (with `allowlist` changed, if given: read at start-up only)."""
        await asyncio.to_thread(self.nbd.stop)
        if allowlist is not None and allowlist != self.nbd.allowlist:
            self.nbd.allowlist = allowlist
            self.nbd.write_base_config()
        return await self.start_server()

    # --- worker and floor processes -------------------------------------------------------

    def worker_env(self, metrics_port: int, extra: Mapping[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXPORT_WORKER_")}
        env.update(
            {
                "EXPORT_WORKER_AMQP_URL": self.amqp_url,
                "EXPORT_WORKER_DATABASE_URL": self.database_url,
                "EXPORT_WORKER_NODE_ID": self.node_id,
                "EXPORT_WORKER_EXCHANGE": self.exchange,
                "EXPORT_WORKER_REQUEST_QUEUE": self.request_queue,
                "EXPORT_WORKER_REPLY_QUEUE": self.reply_queue,
                "EXPORT_WORKER_PREFETCH": "64",
                "EXPORT_WORKER_NBD_CONF_DIR": str(self.nbd.conf_dir),
                "EXPORT_WORKER_NBD_CONFIG_FILE": str(self.nbd.config_file),
                "EXPORT_WORKER_NBD_PID_FILE": str(self.nbd.pid_file),
                "EXPORT_WORKER_NBD_HOST": "127.0.0.1",
                "EXPORT_WORKER_NBD_PORT": str(self.nbd.port),
                "EXPORT_WORKER_LINK_DIR": str(self.link_dir),
                "EXPORT_WORKER_AUTH_DIR": str(self.auth_dir),
                "EXPORT_WORKER_DEVICE_ROOTS": str(self.disks_dir),
                "EXPORT_WORKER_ALLOW_REGULAR_FILES": "true",
                "EXPORT_WORKER_METRICS_PORT": str(metrics_port),
                "EXPORT_WORKER_METRICS_HOST": "127.0.0.1",
                "EXPORT_WORKER_RECONCILE_ON_START": "false",
                # No periodic reconciliation in the middle of a measurement.
                "EXPORT_WORKER_RECONCILE_INTERVAL_S": "0",
                "EXPORT_WORKER_SHUTDOWN_GRACE_S": "10",
            }
        )
        env.update(extra)
        return env

    def show_config(self, extra: Mapping[str, str]) -> dict[str, Any] | None:
        """The worker's effective settings with `extra` (`show-config`), or None if it
        refuses them."""
        proc = subprocess.run(
            [sys.executable, "-m", "worker", "show-config"],
            env=self.worker_env(0, extra),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            return None
        try:
            data = json.loads(proc.stdout)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    async def start_worker(
        self, label: str, extra: Mapping[str, str] | None = None
    ) -> tuple[ManagedProcess, int]:
        """`python -m worker run` as its own process; returns it and its metrics port once
        it logged "Worker ready"."""
        metrics_port = free_port()
        proc = ManagedProcess(
            label,
            [sys.executable, "-m", "worker", "run"],
            self.worker_env(metrics_port, extra or {}),
            self.logs / f"worker-{label}.log",
            cwd=REPO_ROOT,
        )
        self.processes.append(proc)
        await proc.wait_for_line("Worker ready", timeout_s=60)
        return proc, metrics_port

    async def start_floor(self, prefetch: int = 64) -> ManagedProcess:
        proc = ManagedProcess(
            "floor",
            [
                sys.executable,
                "-m",
                "bench.floor",
                "--amqp-url",
                self.amqp_url,
                "--database-url",
                self.database_url,
                "--queue",
                self.floor_queue,
                "--prefetch",
                str(prefetch),
            ],
            dict(os.environ),
            self.logs / "floor.log",
            cwd=REPO_ROOT,
        )
        self.processes.append(proc)
        await proc.wait_for_line("Floor ready", timeout_s=60)
        return proc


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - fixed http URL
        body: bytes = response.read()
    return body.decode()


async def scrape(port: int) -> dict[str, float]:
    """The worker's /metrics as {'name{labels}': value}."""
    text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            samples[name] = float(value)
    return samples


def total(samples: Mapping[str, float], name: str) -> float:
    """The sum of `name` over all its label sets (the worker may label by node)."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))
