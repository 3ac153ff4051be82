"""Shared fixtures. Integration fixtures use the real RabbitMQ, MariaDB and an nbd-server
started per test; a missing service makes the test fail, never skip."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection
from pydantic import AnyUrl

from harness.nbd import NbdServerProcess
from harness.services import (
    AMQP_URL as AMQP_URL,
)
from harness.services import (
    DISK_SIZE as DISK_SIZE,
)
from harness.services import (
    MYSQL_URL as MYSQL_URL,
)
from harness.services import (
    clean_environ as clean_environ,
)
from harness.services import (
    delete_broker_objects as delete_broker_objects,
)
from harness.services import (
    make_disk as make_disk,
)
from harness.sql import execute_sql
from harness.worker_process import worker_settings
from worker.metrics import Metrics, build_metrics
from worker.repository import migrate
from worker.service import serve
from worker.settings import Settings

#: The markers that make the tiers (unit, integration, slow, cluster, containers); each
#: test's garbage freed before the next (a CPython 3.11 bug, see the module); pytester.
pytest_plugins = ("tests.tiers", "tests.collect_between_tests", "pytester")

#: The node id of single-node tests.
NODE = "test-node"


def run_worker_cli(
    *args: str, env: dict[str, str], timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """`nbd-export-worker ARGS` as an operator runs it: a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def nbd_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NbdServerProcess]:
    """allowlist = false, as deployed; parametrize indirectly with True for a server that
    lists its exports (everything must work with either)."""
    allowlist = bool(getattr(request, "param", False))
    with NbdServerProcess.running(tmp_path / "nbd", allowlist=allowlist) as server:
        yield server


@pytest.fixture
async def database_url() -> AsyncIterator[AnyUrl]:
    name = unique("nbdtest")
    url = AnyUrl(f"{MYSQL_URL}/{name}")
    await migrate(url, node_id=NODE, timeout_s=5)
    try:
        yield url
    finally:
        await execute_sql(AnyUrl(MYSQL_URL), f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture
async def amqp() -> AsyncIterator[AbstractConnection]:
    connection = await aio_pika.connect(AMQP_URL, timeout=5)
    async with connection:
        yield connection


@pytest.fixture
def disks_dir(tmp_path: Path) -> Path:
    path = tmp_path / "disks"
    path.mkdir()
    return path


@pytest.fixture
async def settings(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    nbd_server: NbdServerProcess,
    database_url: AnyUrl,
    disks_dir: Path,
    amqp: AbstractConnection,
) -> AsyncIterator[Settings]:
    request_queue = unique("test.prepare-export")
    reply_queue = unique("test.export-ready")
    settings = worker_settings(
        nbd_server,
        tmp_path,
        disks_dir,
        node_id=NODE,
        exchange=unique("test.exports"),
        amqp_url=AMQP_URL,
        database_url=database_url,
        request_queue=request_queue,
        reply_queue=reply_queue,
        shutdown_grace_s=10,
        # Transient failures: two tries per delivery, two deliveries, short backoff.
        job_attempts=2,
        delivery_limit=1,
        retry_backoff_s=0.01,
        retry_backoff_max_s=0.05,
    )
    try:
        yield settings
    finally:
        await delete_broker_objects(
            amqp, [request_queue, f"{request_queue}.dead", reply_queue], [settings.exchange]
        )


@dataclass
class RunningWorker:
    settings: Settings
    metrics: Metrics
    task: asyncio.Task[None]

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        labels = {**(labels or {}), "node": self.settings.node_id}
        value = self.metrics.registry.get_sample_value(name, labels)
        return value or 0.0

    async def settled_sample(
        self, name: str, labels: dict[str, str], expected: float, timeout_s: float = 5
    ) -> float:
        """The sample once it reaches `expected` or the timeout passes: job counters move
        just after the reply is confirmed, so a test may see the reply first."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.sample(name, labels) != expected:
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.01)
        return self.sample(name, labels)


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[RunningWorker]:
    """The worker's real `serve` in this event loop, stopped and drained on exit."""
    stop = asyncio.Event()
    started = asyncio.Event()
    metrics = build_metrics(settings.node_id)
    task = asyncio.create_task(serve(settings, stop, metrics=metrics, started=started))
    waiter = asyncio.create_task(started.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        task.result()  # raises the start-up error
    if waiter not in done:
        task.cancel()
        raise TimeoutError("worker did not start")
    try:
        yield RunningWorker(settings, metrics, task)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def worker(settings: Settings) -> AsyncIterator[RunningWorker]:
    async with running_worker(settings) as running:
        yield running


class Scheduler:
    """Plays the migration scheduler: publishes jobs, collects replies by correlation id."""

    def __init__(self, channel: AbstractChannel, request_queue: str) -> None:
        self.channel = channel
        self.request_queue = request_queue
        self.replies: dict[str, dict[str, Any]] = {}
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.reply_queue_name = ""

    async def start(self) -> None:
        queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        self.reply_queue_name = queue.name
        await queue.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        corr = message.correlation_id or ""
        body = json.loads(message.body)
        self.replies[corr] = body
        waiter = self._waiters.get(corr)
        if waiter is not None and not waiter.done():
            waiter.set_result(body)

    async def publish(
        self,
        body: bytes | dict[str, Any],
        *,
        reply_to: bool = True,
        exchange: str | None = None,
        routing_key: str | None = None,
    ) -> str:
        """Publishes to the request queue, or to `exchange` with `routing_key`."""
        corr = uuid.uuid4().hex
        self._waiters[corr] = asyncio.get_running_loop().create_future()
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        target = (
            await self.channel.get_exchange(exchange) if exchange else self.channel.default_exchange
        )
        await target.publish(
            aio_pika.Message(
                raw,
                correlation_id=corr,
                reply_to=self.reply_queue_name if reply_to else None,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=routing_key or self.request_queue,
        )
        return corr

    async def reply(self, corr: str, timeout_s: float = 30) -> dict[str, Any]:
        return await asyncio.wait_for(self._waiters[corr], timeout_s)

    async def request(self, body: bytes | dict[str, Any], timeout_s: float = 30) -> dict[str, Any]:
        return await self.reply(await self.publish(body), timeout_s)


#: Error codes whose request the worker rejects to the dead-letter queue.
DEAD_LETTERED_CODES = frozenset({"invalid_request", "retries_exhausted", "internal_error"})


async def take_dead_letters(
    amqp: AbstractConnection, request_queue: str, *, at_least: int, timeout_s: float = 10.0
) -> list[bytes]:
    """Takes the messages out of `<request_queue>.dead`: at least `at_least` of them (a
    job is rejected just after its reply is confirmed, so a test sees the reply first),
    then whatever else arrives before the queue has been quiet for a moment."""
    channel = await amqp.channel()
    try:
        queue = await channel.declare_queue(f"{request_queue}.dead", passive=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        bodies: list[bytes] = []
        quiet_since = loop.time()
        while True:
            message = await queue.get(fail=False)
            if message is not None:
                bodies.append(message.body)
                await message.ack()
                quiet_since = loop.time()
                continue
            now = loop.time()
            if (len(bodies) >= at_least and now - quiet_since >= 0.3) or now > deadline:
                return bodies
            await asyncio.sleep(0.02)
    finally:
        await channel.close()


async def scheduler_for(amqp: AbstractConnection, settings: Settings) -> Scheduler:
    """A scheduler on its own channel (the caller closes it) for `settings`' queue."""
    scheduler = Scheduler(await amqp.channel(), settings.request_queue)
    await scheduler.start()
    return scheduler


@pytest.fixture
async def scheduler(amqp: AbstractConnection, worker: RunningWorker) -> AsyncIterator[Scheduler]:
    channel = await amqp.channel()
    sched = Scheduler(channel, worker.settings.request_queue)
    await sched.start()
    try:
        yield sched
    finally:
        await channel.close()


def job(
    vm_id: str | None = None, disk: int = 0, device: Path | str = "/dev/vdb", **extra: Any
) -> dict[str, Any]:
    return {
        "job_id": unique("job"),
        "vm_id": vm_id or str(uuid.uuid4()),
        "vm_name": "pgtest2",
        "disk_unit_number": disk,
        "device_path": str(device),
        **extra,
    }


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """The fault rows a test recorded travel on its teardown report too: under pytest-xdist
    the tests run in worker processes, and the table is printed by the controller."""
    from tests import fault_table

    report = yield
    if call.when == "setup":
        item.stash[_ROWS_BEFORE] = len(fault_table.ROWS)
    elif call.when == "teardown":
        rows = fault_table.ROWS[item.stash.get(_ROWS_BEFORE, len(fault_table.ROWS)) :]
        if rows:
            report.user_properties.append(("fault_rows", [dataclasses.asdict(r) for r in rows]))
    return report


_ROWS_BEFORE = pytest.StashKey[int]()
#: The rows as the reports brought them (in whichever process prints the summary).
_REPORTED_ROWS: list[dict[str, Any]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for name, rows in report.user_properties:
        if name == "fault_rows":
            _REPORTED_ROWS.extend(cast(list[dict[str, Any]], rows))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Prints the fault suite's table when it ran (tests/integration/test_faults.py)."""
    from tests import fault_table

    if not fault_table.ROWS:  # run by xdist's workers: the rows came on the reports
        fault_table.ROWS.extend(fault_table.FaultRow(**row) for row in _REPORTED_ROWS)
    if fault_table.ROWS:
        terminalreporter.section("fault suite")
        terminalreporter.write_line(fault_table.render())
        fault_table.write_if_asked()
