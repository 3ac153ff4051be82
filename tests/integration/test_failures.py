"""What goes wrong on an appliance, on the real services: the answer is always a reply,
and the server is never signalled unsafely."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
from aio_pika.abc import AbstractConnection

from harness.nbd import OLD_SERVER_BIN, NbdConnection, NbdServerProcess
from harness.processes import pid_running
from tests.conftest import (
    Scheduler,
    job,
    make_disk,
    running_worker,
    scheduler_for,
    take_dead_letters,
)
from worker.settings import Settings

pytestmark = pytest.mark.integration


async def test_same_disk_on_two_workers_is_created_once(
    settings: Settings, amqp: AbstractConnection, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    disk = make_disk(disks_dir, "shared-disk", b"one disk")
    request = job(device=disk)
    async with running_worker(settings) as one, running_worker(settings) as two:
        scheduler = await scheduler_for(amqp, settings)
        corrs = [await scheduler.publish({**request, "job_id": f"j{i}"}) for i in range(16)]
        replies = await asyncio.gather(*(scheduler.reply(c) for c in corrs))
        await scheduler.channel.close()
        sighups = one.sample("nbd_server_sighups_total") + two.sample("nbd_server_sighups_total")

        def counted() -> list[float]:
            return [
                w.sample("nbd_export_jobs_total", {"outcome": o})
                for w in (one, two)
                for o in ("created", "reused")
            ]

        # Job counters move just after each reply is confirmed.
        for _ in range(500):
            if sum(handled := counted()) == 16:
                break
            await asyncio.sleep(0.01)
    assert all(r["status"] == "ready" for r in replies), replies
    assert sorted(r["action"] for r in replies) == ["created"] + ["reused"] * 15
    assert sighups == 1
    assert sum(handled) == 16
    assert handled[0] + handled[1] > 0, "worker one took no job: the test proves nothing"
    assert handled[2] + handled[3] > 0, "worker two took no job: the test proves nothing"
    assert [p.name for p in settings.nbd_conf_dir.glob("*.conf")] == [
        f"{replies[0]['export_name']}.conf"
    ]


async def test_the_same_device_by_another_path_is_in_use(
    worker: object, scheduler: Scheduler, disks_dir: Path
) -> None:
    disk = make_disk(disks_dir, "real")
    alias = disks_dir / "by-id-alias"
    alias.symlink_to(disk)
    first = await scheduler.request(job(device=disk))
    assert first["action"] == "created"
    second = await scheduler.request(job(device=alias))
    assert second["status"] == "error"
    assert second["error"]["code"] == "device_in_use"
    assert first["export_name"] in second["error"]["message"]


async def test_a_reload_that_adds_nothing_is_export_not_visible(
    settings: Settings, amqp: AbstractConnection, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    # A section without exportname makes the whole reload add nothing (nbd-server-facts.md).
    broken = nbd_server.conf_dir / "broken.conf"
    broken.write_text("[broken]\n    readonly = true\n")
    fast = settings.model_copy(update={"reload_timeout_s": 1.0, "reconcile_on_start": False})
    async with running_worker(fast):
        scheduler = await scheduler_for(amqp, fast)
        request = job(device=make_disk(disks_dir, "x", b"xx"))
        reply = await scheduler.request(request)
        # Retried (twice in each of two deliveries), then answered and dead-lettered.
        assert reply["status"] == "error"
        assert reply["error"]["code"] == "retries_exhausted"
        assert reply["error"]["cause"] == "export_not_visible"
        assert "after 2 deliveries" in reply["error"]["message"]
        assert "unparsable" in reply["error"]["message"]
        dead = await take_dead_letters(amqp, fast.request_queue, at_least=1)
        assert [json.loads(body) for body in dead] == [request]
        assert pid_running(nbd_server.pid)

        broken.unlink()
        again = await scheduler.request({**request, "job_id": "after-fix"})
        await scheduler.channel.close()
    assert again["status"] == "ready"
    assert again["action"] == "recreated"
    with NbdConnection(nbd_server.port, again["export_name"]) as conn:
        assert conn.read(0, 2) == b"xx"


async def test_a_hung_server_gets_nbd_server_unavailable(
    settings: Settings, amqp: AbstractConnection, disks_dir: Path
) -> None:
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen()  # accepts (the kernel does) and never answers
    try:
        hung_settings = settings.model_copy(
            update={"nbd_port": hung.getsockname()[1], "probe_timeout_s": 0.5}
        )
        async with running_worker(hung_settings):
            scheduler = await scheduler_for(amqp, hung_settings)
            reply = await scheduler.request(job(device=make_disk(disks_dir, "hung")))
            await scheduler.channel.close()
        assert reply["status"] == "error"
        assert reply["error"]["code"] == "retries_exhausted"
        assert reply["error"]["cause"] == "nbd_server_unavailable"
        assert "did not answer" in reply["error"]["message"]
    finally:
        hung.close()


async def test_a_server_restarted_as_3_24_is_never_signalled(
    worker: object, scheduler: Scheduler, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    assert (await scheduler.request(job(device=make_disk(disks_dir, "a"))))["status"] == "ready"
    nbd_server.stop()
    old = NbdServerProcess(nbd_server.root, binary=str(OLD_SERVER_BIN), port=nbd_server.port)
    old.start()
    try:
        reply = await scheduler.request(job(device=make_disk(disks_dir, "b")))
        assert reply["status"] == "error"
        assert reply["error"]["code"] == "nbd_server_unavailable"
        assert "nbd-server 3.24" in reply["error"]["message"]
        assert pid_running(old.pid), "3.24 must not have been sent a SIGHUP"
    finally:
        old.stop()
