"""The fault suite: each fault against the real RabbitMQ, MariaDB and nbd-server, counting
jobs sent, replied, dead-lettered and lost (lost must be 0), and checking that a client's
NBD connection to an export made before the fault keeps working through it.

Each test adds its row to tests/fault_table.py; the table is printed at the end of the run
and kept in RELIABILITY.md.

Over 400 lines (budget 840) as one capability's tests, with the helpers they share.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection
from pydantic import AnyUrl

from harness.clusters import rabbit_cluster
from harness.mariadb import running_mariadb
from harness.nbd import NbdConnection, NbdServerProcess
from harness.processes import pid_running
from harness.tcp_proxy import TcpProxy
from harness.worker_process import WorkerProcess
from tests.conftest import (
    AMQP_URL,
    DEAD_LETTERED_CODES,
    delete_broker_objects,
    job,
    make_disk,
    running_worker,
    take_dead_letters,
    unique,
)
from tests.fault_run import (
    FAULT_SETTINGS,
    HELD_BYTES,
    FaultRun,
    Held,
    assert_all_ready,
    check_consistent,
    cut_after_some_replies,
    held_export,
    publish_mix,
    repaired_and_consistent,
)
from tests.fault_table import ROWS, FaultRow
from worker.faults import CRASH_POINTS
from worker.repository import migrate
from worker.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
async def held(
    fault_settings: Settings,
    amqp: AbstractConnection,
    disks_dir: Path,
    nbd_server: NbdServerProcess,
) -> AsyncIterator[Held]:
    """An export made by a worker that is then stopped, with a client connected to it."""
    connection = await held_export(fault_settings, amqp, disks_dir, nbd_server.port)
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture
def fault_settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    # FAULT_SETTINGS; a test's fault_settings marker changes them for every fixture it
    # uses (the queue's arguments are fixed by whoever declares it first).
    marker = request.node.get_closest_marker("fault_settings")
    return settings.model_copy(update={**FAULT_SETTINGS, **(marker.kwargs if marker else {})})


@pytest.mark.parametrize("point", CRASH_POINTS)
async def test_worker_killed_at_each_step_of_a_create(
    point: str,
    fault_settings: Settings,
    amqp: AbstractConnection,
    nbd_server: NbdServerProcess,
    disks_dir: Path,
    held: Held,
) -> None:
    run = await FaultRun.start(amqp, fault_settings)
    scheduler = run.scheduler
    doomed = WorkerProcess(fault_settings, EXPORT_WORKER_CRASH_AT=point)
    survivor = WorkerProcess(fault_settings)
    try:
        await doomed.start()
        create = job(device=make_disk(disks_dir, "new", b"new-disk"))
        create_corr = await run.publish(create)
        for _ in range(3):
            await run.publish({**held.request, "job_id": f"reuse-{os.urandom(4).hex()}"})
        assert await doomed.wait(60) == -signal.SIGKILL
        assert create_corr not in scheduler.replies
        await survivor.start()
        row = await run.row(f"worker killed (kill -9) {point.replace('_', ' ')}", held)
    finally:
        await doomed.stop()
        await survivor.stop()
        await scheduler.channel.close()
    assert row.lost == 0
    assert row.held_connection == "survived"
    reply = scheduler.replies[create_corr]
    # The same outcome as the first delivery would have had.
    assert (reply["status"], reply["action"], reply["reused"]) == ("ready", "created", False)
    with NbdConnection(nbd_server.port, reply["export_name"]) as conn:
        assert conn.read(0, 8) == b"new-disk"
    await check_consistent(fault_settings)


async def test_broker_connection_cut_mid_run(
    fault_settings: Settings,
    amqp: AbstractConnection,
    nbd_server: NbdServerProcess,
    disks_dir: Path,
    held: Held,
) -> None:
    proxy = TcpProxy("127.0.0.1", 5672)
    port = await proxy.start()
    proxied = fault_settings.model_copy(update={"amqp_url": AMQP_URL.replace(":5672", f":{port}")})
    run = await FaultRun.start(amqp, proxied)
    scheduler = run.scheduler
    try:
        async with running_worker(proxied) as worker:
            await publish_mix(run, disks_dir, held.request, "b", 30)
            await cut_after_some_replies(proxy, run, 1.0)  # in-flight acks are lost
            row = await run.row("broker connection cut mid-run", held)
            reconnects = worker.sample("nbd_export_broker_reconnects_total")
    finally:
        await proxy.stop()
        await scheduler.channel.close()
    assert row.lost == 0
    assert row.held_connection == "survived"
    assert reconnects >= 1
    assert_all_ready(scheduler)
    await check_consistent(fault_settings)


async def test_database_connection_cut_mid_run(
    fault_settings: Settings,
    amqp: AbstractConnection,
    nbd_server: NbdServerProcess,
    disks_dir: Path,
    held: Held,
) -> None:
    proxy = TcpProxy("127.0.0.1", 3306)
    port = await proxy.start()
    url = str(fault_settings.database_url).replace(":3306", f":{port}")
    proxied = fault_settings.model_copy(
        update={
            "database_url": type(fault_settings.database_url)(url),
            "db_connect_timeout_s": 1.0,
        }
    )
    run = await FaultRun.start(amqp, proxied)
    scheduler = run.scheduler
    try:
        async with running_worker(proxied):
            await publish_mix(run, disks_dir, held.request, "d", 30)
            # Every pooled connection dies; new ones are refused.
            await cut_after_some_replies(proxy, run, 2.0)
            row = await run.row("database connection cut mid-run", held)
    finally:
        await proxy.stop()
        await scheduler.channel.close()
    assert row.lost == 0
    assert row.held_connection == "survived"
    assert_all_ready(scheduler)
    await check_consistent(fault_settings)


async def test_nbd_server_killed_and_restarted(
    fault_settings: Settings,
    amqp: AbstractConnection,
    nbd_server: NbdServerProcess,
    disks_dir: Path,
    held: Held,
) -> None:
    held.close()  # before the server dies: nothing to hold through this fault
    patient = fault_settings
    run = await FaultRun.start(amqp, patient)
    scheduler = run.scheduler
    try:
        async with running_worker(patient):
            before = await scheduler.request({**held.request, "job_id": "reuse-before"})
            os.kill(nbd_server.pid, signal.SIGKILL)
            old_pid = nbd_server.pid
            while pid_running(old_pid):
                await asyncio.sleep(0.01)
            for i in range(5):
                await run.publish(job(device=make_disk(disks_dir, f"k{i}", b"k")))
                await run.publish({**held.request, "job_id": f"reuse-k{i}"})
            await asyncio.sleep(1.0)
            nbd_server.start()  # same config, same port: a new main pid
            row = await run.row("nbd-server killed and restarted", None)
    finally:
        await scheduler.channel.close()
    assert before["action"] == "reused"
    assert row.lost == 0
    assert_all_ready(scheduler)
    await check_consistent(fault_settings)


# Every try waits out a probe timeout: fewer of them, so the test ends sooner.
@pytest.mark.fault_settings(delivery_limit=1, job_attempts=2)
async def test_nbd_server_hung(
    fault_settings: Settings,
    amqp: AbstractConnection,
    nbd_server: NbdServerProcess,
    disks_dir: Path,
    held: Held,
) -> None:
    run = await FaultRun.start(amqp, fault_settings)
    scheduler = run.scheduler
    try:
        async with running_worker(fault_settings):
            # Stopped, the main process still has its socket: the kernel accepts
            # connections, and nobody answers them.
            os.kill(nbd_server.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(fault_settings.answer_ttl_s)  # no answer to trust
                creates = [
                    await run.publish(job(device=make_disk(disks_dir, f"h{i}"))) for i in range(3)
                ]
                await run.publish({**held.request, "job_id": "reuse-hung"})
                await run.replies()
                held_during_hang = held.survived()
            finally:
                os.kill(nbd_server.pid, signal.SIGCONT)
            # Back by itself: no restart of the worker.
            after = await run.publish(job(device=make_disk(disks_dir, "after", b"a")))
            row = await run.row("nbd-server hung (accepts, never answers)", held)
    finally:
        await scheduler.channel.close()
    assert row.lost == 0
    assert held_during_hang
    for corr in creates:
        error = scheduler.replies[corr]["error"]
        assert (error["code"], error["cause"]) == ("retries_exhausted", "nbd_server_unavailable")
    assert row.dead_lettered >= len(creates)
    assert scheduler.replies[after]["status"] == "ready"
    await check_consistent(fault_settings)


async def test_duplicate_publishes(
    fault_settings: Settings,
    amqp: AbstractConnection,
    nbd_server: NbdServerProcess,
    disks_dir: Path,
    held: Held,
) -> None:
    run = await FaultRun.start(amqp, fault_settings)
    scheduler = run.scheduler
    create = job(device=make_disk(disks_dir, "dup"))
    reuse = {**held.request, "job_id": "reuse-dup"}
    try:
        async with running_worker(fault_settings) as worker:
            create_corrs = [await run.publish(create) for _ in range(5)]
            reuse_corrs = [await run.publish(reuse) for _ in range(3)]
            row = await run.row("duplicate publishes (5 of a create, 3 of a reuse)", held)
            sighups = worker.sample("nbd_server_sighups_total")
    finally:
        await scheduler.channel.close()
    assert row.lost == 0
    assert row.held_connection == "survived"
    create_replies = [scheduler.replies[c] for c in create_corrs]
    assert all(r == create_replies[0] for r in create_replies)
    assert (create_replies[0]["action"], create_replies[0]["reused"]) == ("created", False)
    reuse_replies = [scheduler.replies[c] for c in reuse_corrs]
    assert all(r == reuse_replies[0] for r in reuse_replies)
    assert reuse_replies[0]["action"] == "reused"
    assert sighups == 1
    await check_consistent(fault_settings)


POISON: list[bytes] = [
    b"not json",
    b"\xff\xfe\x00binary",
    b"[1, 2, 3]",
    b"{}",
    b'{"job_id": "p1", "vm_id": "4205784a-098a-40f1-1f1e-a5cd2597fd59"}',
    b'{"job_id": "p2", "vm_id": "4205784a-098a-40f1-1f1e-a5cd2597fd59", "vm_name": "x", '
    b'"disk_unit_number": 0, "device_path": "/dev/../etc/passwd"}',
    b'{"job_id": "p3", "vm_id": "4205784a-098a-40f1-1f1e-a5cd2597fd59", "vm_name": "x", '
    b'"disk_unit_number": 0, "device_path": "/dev/vdb]\\n[evil]\\nexportname = /etc/shadow"}',
    b'{"job_id": "p4\\u0000", "vm_id": "x=1", "vm_name": "x", "disk_unit_number": "0"}',
    b'{"type": "drop-everything", "job_id": "p5"}',
    b'{"job_id": "p6", "vm_id": "4205784a-098a-40f1-1f1e-a5cd2597fd59", "vm_name": "x", '
    b'"disk_unit_number": 0, "volume_id": "../../../../etc/passwd"}',
    b'{"job_id": "' + b"x" * 70_000 + b'"}',
    b"[" * 5000,  # too deep for pydantic, and for json.loads: a RecursionError
]


async def test_poison_messages(
    fault_settings: Settings,
    amqp: AbstractConnection,
    nbd_server: NbdServerProcess,
    disks_dir: Path,
    held: Held,
) -> None:
    run = await FaultRun.start(amqp, fault_settings)
    scheduler = run.scheduler
    try:
        async with running_worker(fault_settings):
            for body in POISON:
                await run.publish(body)
            replies = await run.replies()
            valid = await scheduler.request(job(device=make_disk(disks_dir, "ok")))
            row = await run.row(f"poison messages ({len(POISON)} kinds)", held)
    finally:
        await scheduler.channel.close()
    assert row.lost == 0
    assert row.held_connection == "survived"
    assert row.dead_lettered == len(POISON)
    assert {r["error"]["code"] for r in replies.values()} == {"invalid_request"}
    assert valid["status"] == "ready"
    files = {p.name for p in fault_settings.nbd_conf_dir.iterdir()}
    assert all(name.startswith("migration-vm-") for name in files - {".nbd-export-worker.lock"})
    await check_consistent(fault_settings)


async def test_consumer_cancelled_by_the_broker(
    fault_settings: Settings,
    amqp: AbstractConnection,
    nbd_server: NbdServerProcess,
    disks_dir: Path,
    held: Held,
) -> None:
    run = await FaultRun.start(amqp, fault_settings)
    scheduler = run.scheduler
    try:
        async with running_worker(fault_settings) as worker:
            # Deleting the queue makes the broker cancel the worker's consumer (basic.cancel)
            # on a channel that stays open.
            channel = await amqp.channel()
            await channel.queue_delete(fault_settings.request_queue)
            await channel.close()
            while worker.sample("nbd_export_consumer_cancels_total") < 1:
                await asyncio.sleep(0.05)
            # The worker declares the queue again and consumes: jobs sent now are served.
            while not worker.sample("nbd_export_broker_reconnects_total"):
                await asyncio.sleep(0.05)
            await run.publish(job(device=make_disk(disks_dir, "c1")))
            await run.publish({**held.request, "job_id": "reuse-c"})
            row = await run.row("consumer cancelled by the broker (queue deleted)", held)
    finally:
        await scheduler.channel.close()
    assert row.lost == 0
    assert row.held_connection == "survived"
    assert_all_ready(scheduler)


async def test_sigterm_with_jobs_in_flight(
    fault_settings: Settings,
    amqp: AbstractConnection,
    nbd_server: NbdServerProcess,
    disks_dir: Path,
    held: Held,
) -> None:
    settings = fault_settings.model_copy(update={"shutdown_grace_s": 1.0})
    run = await FaultRun.start(amqp, settings)
    scheduler = run.scheduler
    first, second = WorkerProcess(settings), WorkerProcess(settings)
    try:
        await first.start()
        served = await run.publish({**held.request, "job_id": "reuse-before-term"})
        await run.replies_to([served])
        # A hung server keeps the creates in flight past the grace period.
        os.kill(nbd_server.pid, signal.SIGSTOP)
        try:
            stuck = [await run.publish(job(device=make_disk(disks_dir, f"t{i}"))) for i in range(3)]
            await asyncio.sleep(0.5)
            assert first.proc is not None
            started = asyncio.get_running_loop().time()
            first.proc.send_signal(signal.SIGTERM)
            code = await first.wait(30)
            took_s = asyncio.get_running_loop().time() - started
        finally:
            os.kill(nbd_server.pid, signal.SIGCONT)
        assert not any(c in scheduler.replies for c in stuck)
        await second.start()  # the requeued jobs come back to the next worker
        row = await run.row("SIGTERM with jobs in flight (grace 1 s)", held)
    finally:
        await first.stop()
        await second.stop()
        await scheduler.channel.close()
    assert code == 0
    assert took_s < 10
    assert any("Stopping: no new jobs" in line for line in first.log)
    assert row.lost == 0
    assert row.held_connection == "survived"
    assert all(scheduler.replies[c]["status"] == "ready" for c in stuck)
    await check_consistent(settings)


async def test_broker_cut_while_a_create_is_in_flight(
    fault_settings: Settings,
    amqp: AbstractConnection,
    nbd_server: NbdServerProcess,
    disks_dir: Path,
    held: Held,
) -> None:
    """The connection drops while a create waits on the server: the job is cut short with
    its channel, and its redelivery finishes it without a second SIGHUP."""
    proxy = TcpProxy("127.0.0.1", 5672)
    port = await proxy.start()
    proxied = fault_settings.model_copy(
        update={"amqp_url": AMQP_URL.replace(":5672", f":{port}"), "probe_timeout_s": 5.0}
    )
    run = await FaultRun.start(amqp, proxied)
    scheduler = run.scheduler
    try:
        async with running_worker(proxied) as worker:
            os.kill(nbd_server.pid, signal.SIGSTOP)  # holds the create in a probe
            try:
                corr = await run.publish(job(device=make_disk(disks_dir, "inflight", b"if")))
                while not worker.sample("nbd_export_jobs_in_flight"):
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)
                await proxy.stop()
            finally:
                os.kill(nbd_server.pid, signal.SIGCONT)
            await asyncio.sleep(0.5)
            await proxy.start()
            row = await run.row("broker cut while a create is in flight", held)
            sighups = worker.sample("nbd_server_sighups_total")
            reconnects = worker.sample("nbd_export_broker_reconnects_total")
    finally:
        await proxy.stop()
        await scheduler.channel.close()
    assert row.lost == 0
    assert row.held_connection == "survived"
    assert reconnects >= 1
    reply = scheduler.replies[corr]
    assert (reply["status"], reply["action"]) == ("ready", "created")
    assert sighups == 1  # the redelivery found the export made and changed nothing
    await check_consistent(fault_settings)


# --- full restarts, full and read-only directories, a reload cut short ------------------


class DurableReplies:
    """A scheduler whose reply queue outlives a broker restart: a durable queue, read
    again on a new connection after the restart."""

    def __init__(self, url: str, settings: Settings) -> None:
        self.url = url
        self.settings = settings
        self.queue = unique("test.durable-replies")
        self.sent: dict[str, dict[str, Any]] = {}
        self.replies: dict[str, dict[str, Any]] = {}

    async def publish(self, bodies: list[dict[str, Any]]) -> None:
        connection = await aio_pika.connect(self.url, timeout=10)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(self.queue, durable=True)
            for body in bodies:
                corr = uuid.uuid4().hex
                self.sent[corr] = body
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        json.dumps(body).encode(), correlation_id=corr, reply_to=self.queue,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=self.settings.request_queue,
                )  # fmt: skip

    async def answered(self) -> int:
        """How many replies wait in the queue now (without taking them)."""
        connection = await aio_pika.connect(self.url, timeout=10)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(self.queue, durable=True, passive=True)
            return queue.declaration_result.message_count or 0

    async def collect(self, timeout_s: float = 90) -> FaultRow:
        """Every reply (a job answered twice must be answered alike), and the dead letters."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while set(self.sent) - set(self.replies) and loop.time() < deadline:
            with contextlib.suppress(OSError, aio_pika.exceptions.AMQPError):
                connection = await aio_pika.connect(self.url, timeout=5)
                async with connection:
                    channel = await connection.channel()
                    queue = await channel.declare_queue(self.queue, durable=True)
                    while (message := await queue.get(fail=False)) is not None:
                        body = json.loads(message.body)
                        corr = message.correlation_id or ""
                        assert self.replies.setdefault(corr, body) == body, (
                            "answered twice, unalike"
                        )
                        await message.ack()
            await asyncio.sleep(0.2)
        connection = await aio_pika.connect(self.url, timeout=10)
        async with connection:
            expected = [
                r
                for r in self.replies.values()
                if r.get("error", {}).get("code") in DEAD_LETTERED_CODES
            ]
            dead = await take_dead_letters(
                connection, self.settings.request_queue, at_least=len(expected)
            )
            await delete_broker_objects(connection, [self.queue], [])
        return FaultRow("", len(self.sent), len(self.replies), len(dead), "")


def reuses_and_creates(held: Held, disks_dir: Path, tag: str, pairs: int) -> list[dict[str, Any]]:
    return [
        body
        for i in range(pairs)
        for body in (
            job(device=make_disk(disks_dir, f"{tag}{i}")),
            {**held.request, "job_id": f"reuse-{tag}{i}"},
        )
    ]


def record(row: FaultRow, fault: str, held: Held | None) -> FaultRow:
    state = "n/a (server killed)" if held is None else "survived" if held.survived() else "LOST"
    done = dataclasses.replace(row, fault=fault, held_connection=state)
    ROWS.append(done)
    return done


@pytest.mark.slow
@pytest.mark.timeout(300)  # a RabbitMQ node of its own to start first
async def test_broker_restarted_with_jobs_in_flight(
    tmp_path: Path, fault_settings: Settings, disks_dir: Path, nbd_server: NbdServerProcess,
) -> None:  # fmt: skip
    """`rabbitmqctl stop_app` / `start_app` on a broker of the test's own: every client
    connection is closed, the durable queues and their messages stay."""
    with rabbit_cluster(tmp_path / "broker", size=1) as broker:
        settings = fault_settings.model_copy(update={"amqp_url": broker.node(1).url})
        async with running_worker(settings):
            scheduler = DurableReplies(broker.node(1).url, settings)
            first = job(device=make_disk(disks_dir, "held", HELD_BYTES))
            await scheduler.publish([first])
            await scheduler.collect()
            reply = next(iter(scheduler.replies.values()))
            held = Held(nbd_server.port, reply["export_name"], first)
            scheduler.sent.clear()
            scheduler.replies.clear()
            try:
                await scheduler.publish(reuses_and_creates(held, disks_dir, "r", 30))
                while await scheduler.answered() < 5:
                    await asyncio.sleep(0.02)
                in_flight = len(scheduler.sent) - await scheduler.answered()
                broker.ctl(1, "stop_app")
                await asyncio.sleep(1.0)
                broker.ctl(1, "start_app")
                row = record(
                    await scheduler.collect(), "broker restarted (stop_app, start_app)", held
                )
            finally:
                held.close()
    assert in_flight > 0, "the restart came after every job was answered"
    assert row.lost == 0, row
    assert row.held_connection == "survived"
    assert [r for r in scheduler.replies.values() if r["status"] != "ready"] == []
    await check_consistent(settings)


async def test_database_restarted_with_jobs_in_flight(
    tmp_path: Path, fault_settings: Settings, amqp: AbstractConnection, disks_dir: Path,
    nbd_server: NbdServerProcess,
) -> None:  # fmt: skip
    """The database server of the test's own stopped (SIGTERM, a clean shutdown) and
    started again on the same datadir and port while jobs run."""
    with running_mariadb(tmp_path / "mariadb") as database:
        url = AnyUrl(f"mysql://root@127.0.0.1:{database.port}/nbd_restart")
        database.sql(
            "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'; GRANT ALL ON *.* TO 'root'@'127.0.0.1'"
        )
        await migrate(url, node_id=fault_settings.node_id, timeout_s=10)
        settings = fault_settings.model_copy(
            update={"database_url": url, "db_connect_timeout_s": 1.0}
        )
        run = await FaultRun.start(amqp, settings)
        try:
            async with running_worker(settings):
                first = job(device=make_disk(disks_dir, "held", HELD_BYTES))
                reply = await run.scheduler.request(first)
                held = Held(nbd_server.port, reply["export_name"], first)
                try:
                    await publish_mix(run, disks_dir, first, "m", 30)
                    while len(run.scheduler.replies) < 10:
                        await asyncio.sleep(0.01)
                    in_flight = len(run.sent) - len(run.scheduler.replies)
                    await asyncio.to_thread(database.stop)
                    await asyncio.to_thread(database.start)
                    row = await run.row("database server restarted", held)
                finally:
                    held.close()
        finally:
            await run.scheduler.channel.close()
        assert in_flight > 0, "the restart came after every job was answered"
        assert row.lost == 0, row
        assert row.held_connection == "survived"
        assert_all_ready(run.scheduler)
        await check_consistent(settings)


@contextlib.contextmanager
def mounted(target: Path, *options: str) -> Iterator[None]:
    """`mount` on `target` (a tmpfs, or a read-only bind of itself), unmounted on exit."""
    subprocess.run(["mount", *options, str(target)], check=True, capture_output=True, timeout=10)
    try:
        yield None
    finally:
        subprocess.run(["umount", str(target)], check=True, capture_output=True, timeout=30)


def fill(directory: Path) -> Path:
    """Writes a file into `directory` until its filesystem is full; the file."""
    filler = directory / ".filler"
    with contextlib.suppress(OSError), filler.open("wb", buffering=0) as f:
        while True:
            f.write(b"\0" * 4096)
    with contextlib.suppress(OSError):  # and the inodes: small files in a tmpfs
        for i in range(100_000):
            (directory / f".filler{i}").touch()
    return filler


async def creates_fail_while(
    broken: Callable[[], contextlib.AbstractContextManager[object]],
    why: str,
    fault: str,
    settings: Settings,
    amqp: AbstractConnection,
    nbd_server: NbdServerProcess,
    disks_dir: Path,
) -> None:
    """While `broken()` is entered (after the held export was made), creates fail with
    `why`: each is answered retries_exhausted and kept as a dead letter; reuses, which
    write nothing, go on. After it, creates work again and nothing is left half-made."""
    run = await FaultRun.start(amqp, settings)
    try:
        async with running_worker(settings):
            first = job(device=make_disk(disks_dir, "held", HELD_BYTES))
            reply = await run.scheduler.request(first)
            held = Held(nbd_server.port, reply["export_name"], first)
            try:
                with broken():
                    creates = [
                        await run.publish(job(device=make_disk(disks_dir, f"c{i}")))
                        for i in range(3)
                    ]
                    reuses = [
                        await run.publish({**first, "job_id": f"reuse-c{i}"}) for i in range(3)
                    ]
                    await run.replies_to(creates + reuses, 60)
                after = await run.publish(job(device=make_disk(disks_dir, "after", b"a")))
                row = await run.row(fault, held)
            finally:
                held.close()
    finally:
        await run.scheduler.channel.close()
    errors = [run.scheduler.replies[c]["error"] for c in creates]
    assert {(e["code"], e["cause"]) for e in errors} == {
        ("retries_exhausted", "config_write_failed")
    }, errors
    assert all(why in e["message"] for e in errors), errors
    assert all(run.scheduler.replies[c]["action"] == "reused" for c in reuses)
    assert run.scheduler.replies[after]["status"] == "ready"
    assert row.lost == 0, row
    assert row.dead_lettered == len(creates)
    assert row.held_connection == "survived"
    await repaired_and_consistent(settings)


# Every try of a create fails alike: fewer of them, so the tests end sooner.
@pytest.mark.fault_settings(delivery_limit=1, job_attempts=2)
async def test_config_directory_full(
    fault_settings: Settings, amqp: AbstractConnection, nbd_server: NbdServerProcess,
    disks_dir: Path,
) -> None:  # fmt: skip
    """The includedir on a 1 MiB tmpfs, filled up (blocks and inodes), then freed."""
    conf_dir = fault_settings.nbd_conf_dir

    @contextlib.contextmanager
    def full() -> Iterator[object]:
        fill(conf_dir)
        yield None
        for path in conf_dir.glob(".filler*"):
            path.unlink()

    with mounted(conf_dir, "-t", "tmpfs", "-o", "size=1m,nr_inodes=256", "tmpfs"):
        await creates_fail_while(
            full, "No space left on device", "config directory full (ENOSPC, 1 MiB tmpfs)",
            fault_settings, amqp, nbd_server, disks_dir,
        )  # fmt: skip


@pytest.mark.fault_settings(delivery_limit=1, job_attempts=2)
async def test_link_directory_read_only(
    fault_settings: Settings, amqp: AbstractConnection, nbd_server: NbdServerProcess,
    disks_dir: Path,
) -> None:  # fmt: skip
    """The link directory remounted read-only (a bind mount of itself) under a running
    worker, then writable again."""
    link_dir = fault_settings.link_dir

    @contextlib.contextmanager
    def read_only() -> Iterator[object]:
        with mounted(link_dir, "--bind", str(link_dir)):
            subprocess.run(
                ["mount", "-o", "remount,bind,ro", str(link_dir)], check=True, timeout=10
            )
            yield None

    await creates_fail_while(
        read_only, "Read-only file system", "link directory read-only (remounted ro)",
        fault_settings, amqp, nbd_server, disks_dir,
    )  # fmt: skip


def sighup_pending(pid: int) -> bool:
    """Whether SIGHUP waits, undelivered, for process `pid` (stopped, it cannot take it)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & (
            1 << (signal.SIGHUP - 1)
        ):
            return True
    return False


async def test_nbd_server_killed_mid_reload(
    fault_settings: Settings, amqp: AbstractConnection, nbd_server: NbdServerProcess,
    disks_dir: Path, held: Held,
) -> None:  # fmt: skip
    """The server stopped, so the worker's SIGHUP waits undelivered; killed then, between
    the SIGHUP and the new export being visible, and started again: the create finishes
    on the new server, once, and nothing is left half-made."""
    run = await FaultRun.start(amqp, fault_settings)
    try:
        async with running_worker(fault_settings) as worker:
            old_pid = nbd_server.pid
            os.kill(old_pid, signal.SIGSTOP)
            create = await run.publish(job(device=make_disk(disks_dir, "mid", b"mid-reload")))
            reuses = [
                await run.publish({**held.request, "job_id": f"reuse-mid{i}"}) for i in range(3)
            ]
            deadline = asyncio.get_running_loop().time() + 30
            while not sighup_pending(old_pid):
                assert asyncio.get_running_loop().time() < deadline, "no SIGHUP was sent"
                await asyncio.sleep(0.01)
            os.kill(old_pid, signal.SIGKILL)
            while pid_running(old_pid):
                await asyncio.sleep(0.01)
            nbd_server.start()  # same config and includedir: a new main pid
            row = await run.row("nbd-server killed mid-reload (after the SIGHUP)", held)
            sighups = worker.sample("nbd_server_sighups_total")
    finally:
        await run.scheduler.channel.close()
    assert row.lost == 0, row
    assert row.held_connection == "survived"  # its child outlives the killed main process
    reply = run.scheduler.replies[create]
    assert (reply["status"], reply["action"]) == ("ready", "created"), reply
    assert all(run.scheduler.replies[c]["status"] == "ready" for c in reuses)
    assert sighups == 1  # the new server read the snippet at start: no second SIGHUP
    with NbdConnection(nbd_server.port, reply["export_name"]) as conn:
        assert conn.read(0, 10) == b"mid-reload"
    await repaired_and_consistent(fault_settings)
