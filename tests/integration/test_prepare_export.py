"""The prepare-export path end to end: real RabbitMQ, MariaDB and nbd-server.

Over 400 lines (budget 540) as one capability's tests, with the helpers they share.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import uuid
from pathlib import Path

import pytest
from aio_pika.abc import AbstractConnection

from harness.nbd import NbdConnection, NbdError, NbdServerProcess
from harness.sql import execute_sql
from harness.worker_process import env_for
from tests.conftest import (
    RunningWorker,
    Scheduler,
    job,
    make_disk,
    run_worker_cli,
    running_worker,
    scheduler_for,
    take_dead_letters,
)
from worker.settings import Settings

pytestmark = pytest.mark.integration


async def node_of_rows(settings: Settings) -> set[str]:
    rows = await execute_sql(
        settings.database_url, "SELECT DISTINCT node_id FROM vm_export_mappings"
    )
    return {row[0] for row in rows}


async def job_record(settings: Settings, job_id: str, timeout_s: float = 5.0) -> object:
    """The reply recorded for `job_id`, once written (a reuse's is written in the
    background)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        rows = await execute_sql(
            settings.database_url, "SELECT reply FROM export_jobs WHERE job_id = %s", (job_id,)
        )
        if rows:
            return json.loads(rows[0][0])
        assert loop.time() < deadline, f"no record of {job_id}"
        await asyncio.sleep(0.05)


def snippets(settings: Settings) -> list[str]:
    return sorted(p.name for p in settings.nbd_conf_dir.glob("*.conf"))


def sighups(worker: RunningWorker) -> float:
    return worker.sample("nbd_server_sighups_total")


async def mapping_rows(settings: Settings) -> list[tuple[object, ...]]:
    return await execute_sql(
        settings.database_url,
        "SELECT vm_id, disk_unit_number, export_name, device_path, status "
        "FROM vm_export_mappings ORDER BY id",
    )


@pytest.mark.parametrize("nbd_server", [False, True], ids=["no-list", "allowlist"], indirect=True)
async def test_first_job_creates_then_reuses_without_sighup(
    worker: RunningWorker, scheduler: Scheduler, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    disk = make_disk(disks_dir, "vdb", b"migration-bytes-0123456789")
    request = job(vm_id="4205784A-098A-40F1-1F1E-A5CD2597FD59", device=disk)

    first = await scheduler.request(request)

    name = "migration-vm-4205784a-098a-40f1-1f1e-a5cd2597fd59-disk0"
    assert first == {
        "job_id": request["job_id"],
        "vm_id": "4205784a-098a-40f1-1f1e-a5cd2597fd59",
        "disk_unit_number": 0,
        "status": "ready",
        "export_name": name,
        "device_path": str(disk),
        "kernel_device": str(disk),
        "volume_id": None,
        "reused": False,
        "action": "created",
        "nbd_host": "127.0.0.1",
        "nbd_port": nbd_server.port,
        "node_id": "test-node",
        "client_addresses": ["127.0.0.1", "::1"],
        "tls": False,
        "generation": 1,
        "lease_expires_at": None,
    }
    assert sighups(worker) == 1
    assert nbd_server.knows(name)
    assert snippets(worker.settings) == [f"{name}.conf"]
    with NbdConnection(nbd_server.port, name) as conn:
        assert conn.size == disk.stat().st_size
        assert conn.read(0, 26) == b"migration-bytes-0123456789"

    second = await scheduler.request({**request, "job_id": "job-2"})
    assert second["action"] == "reused"
    assert second["reused"] is True
    assert second["export_name"] == name
    assert sighups(worker) == 1, "a reuse must not signal the server"
    assert await worker.settled_sample("nbd_export_jobs_total", {"outcome": "reused"}, 1) == 1
    assert worker.sample("nbd_export_jobs_total", {"outcome": "created"}) == 1
    rows = await mapping_rows(worker.settings)
    assert rows == [("4205784a-098a-40f1-1f1e-a5cd2597fd59", 0, name, str(disk), "active")]
    assert await node_of_rows(worker.settings) == {"test-node"}
    # The reuse's record, made once its reply was out (worker/after_reply.py), is written.
    assert await job_record(worker.settings, "job-2") == second


async def test_disks_of_one_vm_and_twenty_vms_at_once(
    worker: RunningWorker, scheduler: Scheduler, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    vm = str(uuid.uuid4())
    d0 = make_disk(disks_dir, "vm-d0", b"disk zero")
    d1 = make_disk(disks_dir, "vm-d1", b"disk one!")
    r0 = await scheduler.request(job(vm, 0, d0))
    r1 = await scheduler.request(job(vm, 1, d1))
    assert (r0["export_name"], r1["export_name"]) == (
        f"migration-vm-{vm}-disk0",
        f"migration-vm-{vm}-disk1",
    )

    vms = [str(uuid.uuid4()) for _ in range(20)]
    devices = [make_disk(disks_dir, f"many-{i}", f"vm {i:02d}".encode()) for i in range(20)]
    before = sighups(worker)
    corrs = [await scheduler.publish(job(v, 0, d)) for v, d in zip(vms, devices, strict=True)]
    replies = await asyncio.gather(*(scheduler.reply(c, timeout_s=60) for c in corrs))
    # Creates that arrive while a reload is prepared share it: fewer SIGHUPs than jobs.
    print(f"20 concurrent creates took {sighups(worker) - before:g} SIGHUPs")
    assert sighups(worker) - before < 20

    for i, (vm_id, reply) in enumerate(zip(vms, replies, strict=True)):
        assert reply["status"] == "ready", reply
        assert reply["action"] == "created"
        assert reply["export_name"] == f"migration-vm-{vm_id}-disk0"
        assert reply["device_path"] == str(devices[i])
    expected = {f"migration-vm-{v}-disk0.conf" for v in vms} | {
        f"migration-vm-{vm}-disk0.conf",
        f"migration-vm-{vm}-disk1.conf",
    }
    assert set(snippets(worker.settings)) == expected
    for i, vm_id in enumerate(vms):
        name = f"migration-vm-{vm_id}-disk0"
        assert nbd_server.knows(name)
        with NbdConnection(nbd_server.port, name) as conn:
            assert conn.read(0, 5) == f"vm {i:02d}".encode()
    for name, data in ((r0["export_name"], b"disk zero"), (r1["export_name"], b"disk one!")):
        with NbdConnection(nbd_server.port, name) as conn:
            assert conn.read(0, 9) == data


async def test_concurrent_jobs_for_one_disk_make_one_create(
    worker: RunningWorker, scheduler: Scheduler, disks_dir: Path
) -> None:
    disk = make_disk(disks_dir, "same")
    request = job(device=disk)
    corrs = [await scheduler.publish({**request, "job_id": f"dup-{i}"}) for i in range(8)]
    replies = await asyncio.gather(*(scheduler.reply(c) for c in corrs))

    actions = sorted(r["action"] for r in replies)
    assert actions == ["created"] + ["reused"] * 7
    assert sighups(worker) == 1
    assert len(snippets(worker.settings)) == 1
    assert len(await mapping_rows(worker.settings)) == 1


@pytest.mark.parametrize("nbd_server", [False, True], ids=["no-list", "allowlist"], indirect=True)
async def test_held_connection_survives_twenty_creates(
    worker: RunningWorker, scheduler: Scheduler, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    pattern = b"held-connection-pattern"
    first = await scheduler.request(job(device=make_disk(disks_dir, "held", pattern)))
    main_pid = nbd_server.pid
    conn = NbdConnection(nbd_server.port, first["export_name"])
    stop = threading.Event()
    reads: list[int] = [0]
    errors: list[BaseException] = []

    def read_continuously() -> None:
        try:
            while not stop.is_set():
                if conn.read(0, len(pattern)) != pattern:
                    raise AssertionError("read returned other bytes")
                reads[0] += 1
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=read_continuously)
    reader.start()
    try:
        for i in range(20):
            reply = await scheduler.request(job(device=make_disk(disks_dir, f"more-{i}")))
            assert reply["action"] == "created"
        reads_during_creates = reads[0]
    finally:
        stop.set()
        await asyncio.to_thread(reader.join, 10)
    assert errors == []
    assert reads_during_creates > 20
    assert conn.read(0, len(pattern)) == pattern
    conn.close()
    assert sighups(worker) == 21
    assert int(nbd_server.pid_file.read_text()) == main_pid
    assert os.path.exists(f"/proc/{main_pid}")


@pytest.mark.parametrize("nbd_server", [False, True], ids=["no-list", "allowlist"], indirect=True)
async def test_restarted_server_without_snippets_is_recreated(
    worker: RunningWorker, scheduler: Scheduler, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    disk = make_disk(disks_dir, "restart", b"before restart")
    request = job(device=disk)
    assert (await scheduler.request(request))["action"] == "created"

    nbd_server.stop()
    for snippet in worker.settings.nbd_conf_dir.glob("*.conf"):
        snippet.unlink()
    nbd_server.start()
    name = f"migration-vm-{request['vm_id']}-disk0"
    assert not nbd_server.knows(name)

    reply = await scheduler.request({**request, "job_id": "after-restart"})
    assert reply["action"] == "recreated"
    assert reply["reused"] is False
    assert nbd_server.knows(name)
    with NbdConnection(nbd_server.port, name) as conn:
        assert conn.read(0, 14) == b"before restart"


async def test_device_change_relinks_without_restart(
    worker: RunningWorker, scheduler: Scheduler, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    old = make_disk(disks_dir, "old", b"OLD DEVICE")
    new = make_disk(disks_dir, "new", b"NEW DEVICE")
    request = job(device=old)
    created = await scheduler.request(request)
    held = NbdConnection(nbd_server.port, created["export_name"])
    main_pid = nbd_server.pid

    reply = await scheduler.request({**request, "job_id": "moved", "device_path": str(new)})

    assert reply["action"] == "relinked"
    assert reply["reused"] is True  # no SIGHUP: the export already existed
    assert reply["device_path"] == str(new)
    assert sighups(worker) == 1
    fresh = NbdConnection(nbd_server.port, created["export_name"])
    try:
        assert fresh.read(0, 10) == b"NEW DEVICE"
        assert held.read(0, 10) == b"OLD DEVICE", "an established connection keeps its device"
    finally:
        fresh.close()
        held.close()
    assert nbd_server.pid == main_pid
    rows = await mapping_rows(worker.settings)
    assert [(r[3], r[4]) for r in rows] == [(str(new), "active")]
    again = await scheduler.request({**request, "job_id": "again", "device_path": str(new)})
    assert again["action"] == "reused"


async def test_device_in_use_by_another_mapping_is_refused(
    worker: RunningWorker, scheduler: Scheduler, disks_dir: Path
) -> None:
    disk = make_disk(disks_dir, "shared")
    first = await scheduler.request(job(device=disk))
    before = snippets(worker.settings)

    other = job(device=disk)
    reply = await scheduler.request(other)

    assert reply["status"] == "error"
    assert reply["job_id"] == other["job_id"]
    assert reply["error"]["code"] == "device_in_use"
    assert first["export_name"] in reply["error"]["message"]
    assert snippets(worker.settings) == before
    assert len(await mapping_rows(worker.settings)) == 1


async def test_missing_device_is_device_not_found(
    worker: RunningWorker, scheduler: Scheduler, disks_dir: Path
) -> None:
    reply = await scheduler.request(job(device=disks_dir / "not-attached"))
    assert reply["status"] == "error"
    assert reply["error"]["code"] == "device_not_found"
    assert snippets(worker.settings) == []


BAD_VM = "4205784a-098a-40f1-1f1e-a5cd2597fd59"


@pytest.mark.parametrize(
    ("body", "job_id"),
    [
        pytest.param(b"{not json", None, id="invalid-json"),
        pytest.param(b"\xff\xfe\x00binary", None, id="not-utf8"),
        pytest.param(b"[]", None, id="not-an-object"),
        pytest.param(
            {"job_id": "j-missing", "vm_id": BAD_VM, "vm_name": "x", "device_path": "/dev/vdb"},
            "j-missing",
            id="missing-field",
        ),
        pytest.param(
            {
                "job_id": "j-newline",
                "vm_id": BAD_VM + "\n[evil]",
                "vm_name": "x",
                "disk_unit_number": 0,
                "device_path": "/dev/vdb",
            },
            "j-newline",
            id="vm-id-newline",
        ),
        pytest.param(
            {
                "job_id": "j-bracket",
                "vm_id": "4205784a-098a-40f1-1f1e-a5cd2597fd5]",
                "vm_name": "x",
                "disk_unit_number": 0,
                "device_path": "/dev/vdb",
            },
            "j-bracket",
            id="vm-id-bracket",
        ),
        pytest.param(
            {
                "job_id": "j-dotdot",
                "vm_id": BAD_VM,
                "vm_name": "x",
                "disk_unit_number": 0,
                "device_path": "/dev/../etc/passwd",
            },
            "j-dotdot",
            id="device-dotdot",
        ),
        pytest.param(
            {
                "job_id": "j-outside",
                "vm_id": BAD_VM,
                "vm_name": "x",
                "disk_unit_number": 0,
                "device_path": "/etc/passwd",
            },
            "j-outside",
            id="device-outside-roots",
        ),
        pytest.param(
            {
                "job_id": "j-disk",
                "vm_id": BAD_VM,
                "vm_name": "x",
                "disk_unit_number": 256,
                "device_path": "/dev/vdb",
            },
            "j-disk",
            id="disk-out-of-range",
        ),
        pytest.param(b"{" + b'"pad": "' + b"x" * 70000 + b'"}', None, id="oversized"),
    ],
)
async def test_invalid_requests_get_error_replies_and_change_nothing(
    worker: RunningWorker,
    scheduler: Scheduler,
    amqp: AbstractConnection,
    disks_dir: Path,
    body: bytes | dict[str, object],
    job_id: str | None,
) -> None:
    reply = await scheduler.request(body)

    assert reply["status"] == "error"
    assert reply["job_id"] == job_id
    assert reply["error"]["code"] == "invalid_request"
    assert "\n" not in reply["error"]["message"]
    assert snippets(worker.settings) == []
    assert not worker.settings.link_dir.exists() or not any(worker.settings.link_dir.iterdir())
    assert await mapping_rows(worker.settings) == []
    # Rejected without requeue: the message is kept in the dead-letter queue.
    dead = await take_dead_letters(amqp, worker.settings.request_queue, at_least=1)
    assert len(dead) == 1
    assert dead[0] == (body if isinstance(body, bytes) else json.dumps(body).encode())
    # The worker keeps serving.
    ok = await scheduler.request(job(device=make_disk(disks_dir, "after-bad")))
    assert ok["action"] == "created"


async def test_reply_without_reply_to_goes_to_the_reply_queue(
    worker: RunningWorker, scheduler: Scheduler, amqp: AbstractConnection, disks_dir: Path
) -> None:
    request = job(device=make_disk(disks_dir, "noreply"))
    corr = await scheduler.publish(request, reply_to=False)
    channel = await amqp.channel()
    queue = await channel.declare_queue(worker.settings.reply_queue, passive=True)
    deadline = asyncio.get_running_loop().time() + 20
    message = None
    while message is None and asyncio.get_running_loop().time() < deadline:
        message = await queue.get(timeout=5, fail=False)
        if message is None:
            await asyncio.sleep(0.05)
    assert message is not None
    assert message.correlation_id == corr
    await message.ack()
    await channel.close()
    assert json.loads(message.body)["job_id"] == request["job_id"]


async def test_release_export_job_stops_new_connections_until_prepared_again(
    worker: RunningWorker, scheduler: Scheduler, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    """A release (mode safe, the default) with a client still connected changes nothing and
    says so; once the client left, it releases, and new connections fail at once."""
    request = job(device=make_disk(disks_dir, "released", b"RELEASE ME"))
    created = await scheduler.request(request)
    held = NbdConnection(nbd_server.port, created["export_name"])
    release = {
        "type": "release-export",
        "job_id": "rel-1",
        "vm_id": request["vm_id"],
        "disk_unit_number": 0,
    }
    in_use = await scheduler.request(release)
    assert in_use["error"]["code"] == "export_in_use", in_use
    assert [c["client_address"] for c in in_use["error"]["connections"]] == ["127.0.0.1"]
    assert held.read(0, 10) == b"RELEASE ME", "nothing changed for the connected client"
    with NbdConnection(nbd_server.port, created["export_name"]) as another:
        assert another.read(0, 7) == b"RELEASE", "nor for a new one: it was not fenced"
    held.close()

    # Routed by node on the exchange, as a scheduler of several appliances would. The same
    # job_id again: an export_in_use answer is not recorded, the job is simply sent again.
    corr = await scheduler.publish(
        release, exchange=worker.settings.exchange, routing_key="release-export.test-node"
    )
    released = await scheduler.reply(corr)
    assert released == {
        "job_id": "rel-1",
        "vm_id": request["vm_id"],
        "disk_unit_number": 0,
        "status": "released",
        "export_name": created["export_name"],
        "was_active": True,
        "flushed": True,
        "node_id": "test-node",
        "mode": "safe",
        "cut": 0,
    }
    with pytest.raises(NbdError):
        NbdConnection(nbd_server.port, created["export_name"])
    assert snippets(worker.settings) == []
    rows = await mapping_rows(worker.settings)
    assert [r[4] for r in rows] == ["inactive"]

    again = await scheduler.request({**release, "job_id": "rel-2"})
    assert (again["status"], again["was_active"]) == ("released", False)

    back = await scheduler.request({**request, "job_id": "back"})
    assert back["status"] == "ready"
    assert back["generation"] == created["generation"] + 1
    with NbdConnection(nbd_server.port, created["export_name"]) as conn:
        assert conn.read(0, 10) == b"RELEASE ME"


async def test_a_volume_id_is_served_by_its_by_id_link(
    settings: Settings, amqp: AbstractConnection, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    by_id = disks_dir / "by-id"
    by_id.mkdir()
    disk = make_disk(disks_dir, "vdc", b"volume-bytes")
    volume = "0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d"
    link = by_id / "virtio-0a1b2c3d4e5f6a7b8c9d"
    link.symlink_to(disk)
    by_volume = settings.model_copy(update={"by_id_dir": by_id, "udev_wait_s": 0.2})
    async with running_worker(by_volume):
        request = {k: v for k, v in job(device=disk).items() if k != "device_path"}
        scheduler = await scheduler_for(amqp, by_volume)
        ready = await scheduler.request({**request, "volume_id": volume.upper()})
        missing = await scheduler.request(
            {**request, "job_id": "missing", "disk_unit_number": 1, "volume_id": str(uuid.uuid4())}
        )
        await scheduler.channel.close()
        # The operator's smoke test names a volume the same way.
        cli = await asyncio.to_thread(
            run_worker_cli,
            *("request", "--vm-id", request["vm_id"], "--vm-name", "v", "--disk", "0"),
            *("--volume", volume),
            env=env_for(by_volume),
        )
    assert (ready["status"], ready["action"]) == ("ready", "created")
    assert ready["device_path"] == str(link)
    assert ready["kernel_device"] == str(disk)
    assert ready["volume_id"] == volume
    with NbdConnection(nbd_server.port, ready["export_name"]) as conn:
        assert conn.read(0, 12) == b"volume-bytes"
    assert missing["error"]["code"] == "device_not_found"
    assert "virtio-" in missing["error"]["message"]
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["action"] == "reused"


async def test_job_ids_differing_in_case_are_two_jobs(
    worker: RunningWorker, scheduler: Scheduler, disks_dir: Path
) -> None:
    vm = str(uuid.uuid4())
    first = await scheduler.request(
        job(vm_id=vm, device=make_disk(disks_dir, "c0"), job_id="Job-1")
    )
    second = await scheduler.request(
        job(vm_id=vm, disk=1, device=make_disk(disks_dir, "c1"), job_id="job-1")
    )
    assert (first["status"], second["status"]) == ("ready", "ready")
    assert (first["disk_unit_number"], second["disk_unit_number"]) == (0, 1)
