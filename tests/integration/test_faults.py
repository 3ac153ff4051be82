"""The fault suite: each fault against the real RabbitMQ, MariaDB and nbd-server, counting
jobs sent, replied, dead-lettered and lost (lost must be 0), and checking that a client's
NBD connection to an export made before the fault keeps working through it.

Each test adds its row to tests/fault_table.py; the table is printed at the end of the run
and kept in RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aio_pika.abc import AbstractConnection

from tests.conftest import (
    AMQP_URL,
    DEAD_LETTERED_CODES,
    Scheduler,
    job,
    make_disk,
    running_worker,
    scheduler_for,
    take_dead_letters,
)
from tests.fault_table import ROWS, FaultRow
from tests.nbd_harness import NbdConnection, NbdServerProcess, pid_running
from tests.tcp_proxy import TcpProxy
from tests.worker_process import WorkerProcess
from worker.faults import CRASH_POINTS
from worker.metrics import build_metrics
from worker.nbd.server import NbdServer
from worker.reconcile import reconcile
from worker.repository import Repository
from worker.settings import Settings

pytestmark = pytest.mark.integration

HELD_BYTES = b"held-connection-bytes"


class Held:
    """A client connected to an export before the fault, like a copy in progress."""

    def __init__(self, port: int, export_name: str, request: dict[str, Any]) -> None:
        self.export_name = export_name
        #: The job that made the export: reuses of it are this with another job_id.
        self.request = request
        self.conn = NbdConnection(port, export_name)

    def survived(self) -> bool:
        try:
            return self.conn.read(0, len(HELD_BYTES)) == HELD_BYTES
        except OSError:
            return False

    def close(self) -> None:
        self.conn.close()


class FaultRun:
    """One fault's jobs: publishes them, waits for replies, counts dead letters."""

    def __init__(self, amqp: AbstractConnection, scheduler: Scheduler, settings: Settings) -> None:
        self.amqp = amqp
        self.scheduler = scheduler
        self.settings = settings
        self.sent: dict[str, dict[str, Any] | bytes] = {}

    @classmethod
    async def start(cls, amqp: AbstractConnection, settings: Settings) -> FaultRun:
        return cls(amqp, await scheduler_for(amqp, settings), settings)

    async def publish(self, body: dict[str, Any] | bytes) -> str:
        corr = await self.scheduler.publish(body)
        self.sent[corr] = body
        return corr

    async def replies(self, timeout_s: float = 90) -> dict[str, dict[str, Any]]:
        """Every sent job's reply; a job with none by the timeout counts as lost."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while any(c not in self.scheduler.replies for c in self.sent) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return {c: self.scheduler.replies[c] for c in self.sent if c in self.scheduler.replies}

    async def replies_to(self, corrs: list[str], timeout_s: float = 30) -> None:
        for corr in corrs:
            await self.scheduler.reply(corr, timeout_s)

    async def row(self, fault: str, held: Held | None) -> FaultRow:
        replies = await self.replies()
        expected = [
            r for r in replies.values() if r.get("error", {}).get("code") in DEAD_LETTERED_CODES
        ]
        dead = await take_dead_letters(
            self.amqp, self.settings.request_queue, at_least=len(expected)
        )
        row = FaultRow(
            fault=fault,
            sent=len(self.sent),
            replied=len(replies),
            dead_lettered=len(dead),
            held_connection=(
                "n/a (server killed)" if held is None else "survived" if held.survived() else "LOST"
            ),
        )
        ROWS.append(row)
        return row


@pytest.fixture
async def held(
    fault_settings: Settings,
    amqp: AbstractConnection,
    disks_dir: Path,
    nbd_server: NbdServerProcess,
) -> AsyncIterator[Held]:
    """An export made by a worker that is then stopped, with a client connected to it."""
    async with running_worker(fault_settings):
        scheduler = await scheduler_for(amqp, fault_settings)
        request = job(device=make_disk(disks_dir, "held", HELD_BYTES))
        reply = await scheduler.request(request)
        await scheduler.channel.close()
    assert reply["status"] == "ready"
    connection = Held(nbd_server.port, reply["export_name"], request)
    try:
        yield connection
    finally:
        connection.close()


async def check_consistent(settings: Settings) -> None:
    """Exactly one snippet per active mapping, every active export servable, and nothing
    for reconciliation to repair or explain."""
    repository = await Repository.connect(
        settings.database_url, node_id=settings.node_id, pool_size=1, timeout_s=5
    )
    try:
        active = {m.export_name for m in await repository.list_mappings(active_only=True)}
        snippets = {p.stem for p in settings.nbd_conf_dir.glob("migration-vm-*.conf")}
        assert snippets == active
        server = NbdServer(settings, build_metrics(settings.node_id))
        report = await reconcile(repository, server, dry_run=True)
        assert report.drift() == dict.fromkeys(report.drift(), 0), report.lines()
        for name in active:
            with NbdConnection(settings.nbd_port, name):
                pass  # it opens (NBD_OPT_GO): servable
    finally:
        await repository.close()


async def publish_mix(
    run: FaultRun, disks_dir: Path, held_request: dict[str, Any], tag: str, pairs: int
) -> None:
    """`pairs` creates of new disks, each with a reuse of the held export."""
    for i in range(pairs):
        await run.publish(job(device=make_disk(disks_dir, f"{tag}{i}")))
        await run.publish({**held_request, "job_id": f"reuse-{tag}{i}"})


async def cut_after_some_replies(proxy: TcpProxy, run: FaultRun, outage_s: float) -> None:
    """Once a few jobs are answered, drops the proxied connections and refuses new ones
    for `outage_s`, then lets them through again (on the same port)."""
    while len(run.scheduler.replies) < 10:
        await asyncio.sleep(0.01)
    await proxy.stop()
    await asyncio.sleep(outage_s)
    await proxy.start()


def assert_all_ready(scheduler: Scheduler) -> None:
    replies = list(scheduler.replies.values())
    assert [r["error"] for r in replies if r["status"] != "ready"] == []


@pytest.fixture
def fault_settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    # Per delivery, four tries 0.2, 0.4 and 0.8 s apart (plus jitter); six deliveries: a
    # job outlasts about 8 s of outage, where the faults below last 1 to 2 s. A test's
    # fault_settings marker changes these for every fixture it uses (the queue's arguments
    # are fixed by whoever declares it first).
    marker = request.node.get_closest_marker("fault_settings")
    return settings.model_copy(
        update={
            "probe": "native",
            "probe_timeout_s": 1.0,
            "delivery_limit": 5,
            "job_attempts": 4,
            "retry_backoff_s": 0.2,
            "retry_backoff_max_s": 1.0,
            **(marker.kwargs if marker else {}),
        }
    )


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
