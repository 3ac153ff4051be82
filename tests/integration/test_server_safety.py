"""Signals reach nbd-server's main process only; probes never hang; two workers on one
host never interleave config edits."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection

from harness.nbd import NbdConnection, NbdServerProcess
from harness.processes import pid_running
from tests.conftest import RunningWorker, Scheduler, job, make_disk, running_worker
from worker.errors import ServerUnavailable
from worker.mappings import CommittedExport
from worker.metrics import build_metrics
from worker.nbd.probe import list_exports
from worker.nbd.server import NbdServer
from worker.settings import Settings

pytestmark = pytest.mark.integration


def children_of(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


async def test_pid_file_naming_a_connection_child_is_never_signalled(
    worker: RunningWorker, scheduler: Scheduler, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    pattern = b"child must live"
    first = await scheduler.request(job(device=make_disk(disks_dir, "a", pattern)))
    conn = NbdConnection(nbd_server.port, first["export_name"])
    child = next(c for c in children_of(nbd_server.pid) if pid_running(c))
    # A stale or tampered pid file that names the per-connection child: same command line,
    # same config, but not a session leader.
    wrong_pid_file = nbd_server.root / "wrong.pid"
    wrong_pid_file.write_text(f"{child}\n")
    server = NbdServer(
        worker.settings.model_copy(update={"nbd_pid_file": wrong_pid_file}),
        build_metrics("test-node"),
    )

    with pytest.raises(ServerUnavailable, match="not a session leader"):
        await server.process.send_reload()

    async def committed(name: str) -> CommittedExport:
        return CommittedExport(device_path=str(disks_dir / "b"), client_addresses=None)

    make_disk(disks_dir, "b")
    with pytest.raises(ServerUnavailable, match="not a session leader"):
        await server.ensure_export("migration-vm-x-disk0", str(disks_dir / "b"), committed)

    assert pid_running(child)
    assert conn.read(0, len(pattern)) == pattern
    conn.close()


async def test_pid_file_naming_another_program_is_refused(
    settings: Settings, nbd_server: NbdServerProcess
) -> None:
    other = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        pid_file = nbd_server.root / "other.pid"
        pid_file.write_text(str(other.pid))
        server = NbdServer(
            settings.model_copy(update={"nbd_pid_file": pid_file}), build_metrics("test-node")
        )
        with pytest.raises(ServerUnavailable, match="not nbd-server"):
            await server.process.send_reload()
        assert other.poll() is None, "the other program must not have been signalled"
    finally:
        other.kill()
        other.wait()


async def test_a_server_with_another_config_is_refused(
    settings: Settings, nbd_server: NbdServerProcess
) -> None:
    server = NbdServer(
        settings.model_copy(update={"nbd_config_file": Path("/etc/other/config")}),
        build_metrics("test-node"),
    )
    with pytest.raises(ServerUnavailable, match="refusing to signal"):
        await server.process.send_reload()


async def test_probe_of_a_server_that_never_answers_times_out() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(ServerUnavailable, match="did not answer"):
            await list_exports("nbd-client", "127.0.0.1", port, timeout_s=0.5)
        assert time.monotonic() - started < 5
    finally:
        listener.close()


async def test_probe_of_a_closed_port_fails_fast() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    with pytest.raises(ServerUnavailable, match="failed"):
        await list_exports("nbd-client", "127.0.0.1", port, timeout_s=5)


async def test_two_workers_on_one_host_share_the_server_safely(
    settings: Settings, amqp: AbstractConnection, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    # Two serve() instances: separate asyncio locks, so only the flock keeps them apart.
    async with running_worker(settings) as one, running_worker(settings) as two:
        channel = await amqp.channel()
        scheduler = Scheduler(channel, settings.request_queue)
        await scheduler.start()
        devices = [make_disk(disks_dir, f"d{i}", f"disk {i:02d}".encode()) for i in range(30)]
        corrs = [await scheduler.publish(job(device=d)) for d in devices]
        replies = await asyncio.gather(*(scheduler.reply(c, 60) for c in corrs))
        await channel.close()
        served = one.sample("nbd_export_jobs_total", {"outcome": "created"}) + two.sample(
            "nbd_export_jobs_total", {"outcome": "created"}
        )
    assert [r["action"] for r in replies] == ["created"] * 30
    assert served == 30
    assert len(list(settings.nbd_conf_dir.glob("*.conf"))) == 30
    assert not list(settings.nbd_conf_dir.glob("*.tmp"))

    for i, reply in enumerate(replies):
        assert nbd_server.knows(reply["export_name"])
        with NbdConnection(nbd_server.port, reply["export_name"]) as conn:
            assert conn.read(0, 7) == f"disk {i:02d}".encode()


async def test_unroutable_reply_to_falls_back_to_the_reply_queue(
    worker: RunningWorker, scheduler: Scheduler, amqp: AbstractConnection, disks_dir: Path
) -> None:
    request = job(device=make_disk(disks_dir, "gone"))
    await scheduler.channel.default_exchange.publish(
        aio_pika.Message(json.dumps(request).encode(), reply_to="no-such-queue-for-replies"),
        routing_key=worker.settings.request_queue,
    )
    channel = await amqp.channel()
    queue = await channel.declare_queue(worker.settings.reply_queue, passive=True)
    message = None
    for _ in range(200):
        message = await queue.get(fail=False)
        if message is not None:
            break
        await asyncio.sleep(0.05)
    assert message is not None
    assert json.loads(message.body)["job_id"] == request["job_id"]
    await message.ack()
    await channel.close()


async def test_a_restarted_server_is_probed_again_before_the_next_reuse(
    worker: RunningWorker, scheduler: Scheduler, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    reply = await scheduler.request(job(device=make_disk(disks_dir, "r")))
    # The server's answers trusted for ten minutes: only a new main pid may drop them.
    trusting = worker.settings.model_copy(update={"answer_ttl_s": 600.0})
    metrics = build_metrics("probe-count")
    server = NbdServer(trusting, metrics)

    def probes() -> float:
        sample = metrics.registry.get_sample_value(
            "nbd_server_probe_duration_seconds_count", {"node": "probe-count"}
        )
        return sample or 0.0

    name, device = reply["export_name"], reply["device_path"]
    # Ten jobs asking at once share one probe that the server answers and one that it
    # knows the name (single flight)...
    answers = await asyncio.gather(*(server.is_live(name, device, fresh=False) for _ in range(10)))
    assert answers == [True] * 10
    assert probes() == 2
    # ...and a later one is answered from what is remembered.
    assert await server.is_live(name, device, fresh=False)
    assert probes() == 2

    old_pid = nbd_server.pid
    nbd_server.stop()
    nbd_server.start()
    assert nbd_server.pid != old_pid
    assert await server.is_live(name, device, fresh=False)
    assert probes() == 4  # the new server was asked, not the old one's answers trusted
