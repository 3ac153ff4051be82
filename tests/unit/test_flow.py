"""The flow on fakes (tests/fakes.py): reuse, create, recreate, relink, release, flush,
volumes, duplicates and races, and the imports it must not have.

Over 400 lines (budget 630) as one capability's tests, with the helpers they share.
"""

from __future__ import annotations

import ast
import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

import worker.flow
from tests.fakes import FakeExportServer, InMemoryMappings
from worker.after_reply import reply_scope, run_deferred
from worker.devices import DevicePolicy
from worker.errors import (
    DeviceInUse,
    DeviceNotFound,
    ExportNotFound,
    FlushFailed,
    InvalidRequest,
    ServerUnavailable,
    Superseded,
    TransientDatabaseError,
)
from worker.flow import ExportFlow, decide
from worker.jobs import JobLedger
from worker.keyed_locks import KeyedLocks
from worker.mappings import Mapping
from worker.messages import Action, ExportReleased, FlushExport, PrepareExport, ReleaseExport

VM = "4205784a-098a-40f1-1f1e-a5cd2597fd59"


def request(
    device: Path | str, *, vm: str = VM, disk: int = 0, job: str | None = None
) -> PrepareExport:
    return PrepareExport(
        job_id=job or f"job-{uuid.uuid4().hex[:12]}",
        vm_id=vm,
        vm_name="vm",
        disk_unit_number=disk,
        device_path=str(device),
    )


def mapping(device: str, status: str = "active") -> Mapping:
    now = datetime.now(UTC)
    return Mapping.model_validate(
        {
            "id": 1,
            "node_id": "n",
            "vm_id": VM,
            "disk_unit_number": 0,
            "vm_name": "vm",
            "export_name": "e",
            "device_path": device,
            "device_id": "blk:8:16",
            "status": status,
            "created_at": now,
            "updated_at": now,
        }
    )


@pytest.mark.parametrize(
    ("row", "device", "live", "expected"),
    [
        (None, "/dev/vdb", False, Action.CREATED),
        (None, "/dev/vdb", True, Action.CREATED),
        (mapping("/dev/vdb", "inactive"), "/dev/vdb", True, Action.CREATED),
        (mapping("/dev/vdb"), "/dev/vdb", True, Action.REUSED),
        (mapping("/dev/vdb"), "/dev/vdb", False, Action.RECREATED),
        (mapping("/dev/vdb"), "/dev/vdc", True, Action.RELINKED),
        (mapping("/dev/vdb"), "/dev/vdc", False, Action.RELINKED),
    ],
)
def test_decide(row: Mapping | None, device: str, live: bool, expected: Action) -> None:
    assert decide(row, device, live) is expected


def test_flow_imports_no_io_libraries() -> None:
    tree = ast.parse(Path(worker.flow.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported |= {f"{node.module}.{alias.name}" for alias in node.names}
    forbidden = {"aio_pika", "aiomysql", "pymysql", "asyncio.subprocess", "os.kill", "signal"}
    assert not {name for name in imported if name.split(".")[0] in forbidden or name in forbidden}
    assert "worker.repository" not in imported
    assert not any(name.startswith("worker.nbd") for name in imported)


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "vdb"
    path.write_bytes(b"")
    return path


def make_flow(tmp_path: Path) -> tuple[ExportFlow, InMemoryMappings, FakeExportServer]:
    mappings, server = InMemoryMappings(), FakeExportServer()
    flow = ExportFlow(
        mappings,
        server,
        DevicePolicy((tmp_path,), allow_regular_files=True),
        JobLedger(mappings),
        nbd_host="h",
        nbd_port=1,
        node_id="n",
        client_addresses=("127.0.0.1", "::1"),
    )
    return flow, mappings, server


async def test_create_then_reuse(tmp_path: Path, disk: Path) -> None:
    flow, mappings, server = make_flow(tmp_path)
    first = await flow.prepare_export(request(disk))
    second = await flow.prepare_export(request(disk))
    assert (first.action, first.reused) == (Action.CREATED, False)
    assert (second.action, second.reused) == (Action.REUSED, True)
    assert server.sighups == 1
    assert mappings.claims == 1


async def test_a_reuse_logs_and_records_only_once_its_reply_is_out(
    tmp_path: Path, disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Inside a job's scope (the consumer's), a reuse's log line and record wait for the
    reply; a duplicate meanwhile still answers the same, from memory."""
    flow, mappings, _ = make_flow(tmp_path)
    await flow.prepare_export(request(disk))
    caplog.set_level("INFO", logger="worker.flow")
    reuse = request(disk, job="job-reuse")
    with reply_scope() as deferred:
        ready = await flow.prepare_export(reuse)
    assert ready.action is Action.REUSED
    assert len(deferred) == 1
    again = await flow.prepare_export(reuse)  # a duplicate before the record is written
    assert again == ready
    await asyncio.sleep(0.1)  # past the ledger's batching delay
    assert "job-reuse" not in mappings.jobs
    assert "Found existing VM export mapping" not in caplog.text
    run_deferred(deferred)
    assert deferred == []
    assert "Found existing VM export mapping - reuse without SIGHUP job_id=job-reuse" in caplog.text
    await asyncio.sleep(0.1)
    assert mappings.jobs["job-reuse"].reply["generation"] == ready.generation


async def test_concurrent_jobs_for_one_disk_make_one_create(tmp_path: Path, disk: Path) -> None:
    flow, mappings, server = make_flow(tmp_path)
    server.delay_s = 0.01
    replies = await asyncio.gather(*(flow.prepare_export(request(disk)) for _ in range(10)))
    assert sorted(r.action for r in replies) == [Action.CREATED] + [Action.REUSED] * 9
    assert server.ensure_calls == 1
    assert mappings.claims == 1


async def test_device_in_use_changes_nothing(tmp_path: Path, disk: Path) -> None:
    flow, mappings, server = make_flow(tmp_path)
    await flow.prepare_export(request(disk))
    other = "11111111-2222-3333-4444-555555555555"
    with pytest.raises(DeviceInUse, match="migration-vm-4205784a"):
        await flow.prepare_export(request(disk, vm=other))
    assert len(mappings.rows) == 1
    assert server.ensure_calls == 1


async def test_missing_device_touches_nothing(tmp_path: Path) -> None:
    flow, mappings, server = make_flow(tmp_path)
    with pytest.raises(DeviceNotFound):
        await flow.prepare_export(request(tmp_path / "absent"))
    assert mappings.claims == 0
    assert server.ensure_calls == 0


async def test_relink_and_recreate(tmp_path: Path, disk: Path) -> None:
    flow, _mappings, server = make_flow(tmp_path)
    other = tmp_path / "vdc"
    other.write_bytes(b"")
    await flow.prepare_export(request(disk))
    moved = await flow.prepare_export(request(other))
    assert (moved.action, moved.reused) == (Action.RELINKED, True)
    assert server.links[moved.export_name] == str(other)
    server.known.clear()  # the server restarted without the snippet
    again = await flow.prepare_export(request(other))
    assert (again.action, again.reused) == (Action.RECREATED, False)


async def test_keyed_locks_are_dropped_when_free() -> None:
    locks = KeyedLocks()
    order: list[int] = []

    async def hold(i: int) -> None:
        async with locks.hold(("vm", 0)):
            order.append(i)
            await asyncio.sleep(0.001)
            order.append(i)

    await asyncio.gather(*(hold(i) for i in range(3)))
    assert order == [0, 0, 1, 1, 2, 2]
    assert len(locks) == 0


async def test_same_device_by_another_path_is_in_use(tmp_path: Path, disk: Path) -> None:
    flow, mappings, _server = make_flow(tmp_path)
    await flow.prepare_export(request(disk))
    alias = tmp_path / "by-id-alias"
    alias.symlink_to(disk)
    other = "11111111-2222-3333-4444-555555555555"
    with pytest.raises(DeviceInUse):
        await flow.prepare_export(request(alias, vm=other))
    assert len(mappings.rows) == 1


async def test_failed_relink_puts_row_and_link_back(tmp_path: Path, disk: Path) -> None:
    flow, mappings, server = make_flow(tmp_path)
    first = await flow.prepare_export(request(disk))
    other = tmp_path / "vdc"
    other.write_bytes(b"")
    server.fail_with = ServerUnavailable("down")
    with pytest.raises(ServerUnavailable):
        await flow.prepare_export(request(other))
    row = mappings.rows[(VM, 0)]
    assert row.device_path == str(disk)
    assert server.links[first.export_name] == str(disk)


async def test_release_then_prepare_again(tmp_path: Path, disk: Path) -> None:
    flow, mappings, server = make_flow(tmp_path)
    created = await flow.prepare_export(request(disk))
    release = ReleaseExport(type="release-export", job_id="r", vm_id=VM, disk_unit_number=0)
    released = await flow.release_export(release)
    assert released.was_active is True
    assert mappings.rows[(VM, 0)].status == "inactive"
    assert created.export_name not in server.links
    # The same job again repeats its answer; a new release finds nothing to release.
    assert (await flow.release_export(release)).was_active is True
    again = release.model_copy(update={"job_id": "r2"})
    assert (await flow.release_export(again)).was_active is False
    back = await flow.prepare_export(request(disk))
    assert back.action is Action.CREATED
    assert server.links[back.export_name] == str(disk)


async def test_a_superseded_relink_undoes_nothing(tmp_path: Path, disk: Path) -> None:
    flow, mappings, server = make_flow(tmp_path)
    await flow.prepare_export(request(disk))
    other = tmp_path / "vdc"
    other.write_bytes(b"")
    server.fail_with = Superseded("a newer job changed the export")
    with pytest.raises(Superseded):
        await flow.prepare_export(request(other))
    # The row stays as this job's claim (or the newer job) left it: no stale snapshot back.
    assert mappings.rows[(VM, 0)].device_path == str(other)


async def test_failed_relink_whose_old_device_was_taken_follows_the_row(
    tmp_path: Path, disk: Path
) -> None:
    flow, mappings, server = make_flow(tmp_path)
    first = await flow.prepare_export(request(disk))
    new = tmp_path / "vdc"
    new.write_bytes(b"")
    other_vm = "11111111-2222-3333-4444-555555555555"

    async def fail_after_another_claims_the_old_device(*_: object) -> None:
        # Meanwhile another VM's job claims the device this relink just freed.
        other = request(disk, vm=other_vm, job="other")
        policy = DevicePolicy((tmp_path,), allow_regular_files=True)
        await mappings.claim(other, policy.check(str(disk)), "created", "127.0.0.1,::1")
        raise ServerUnavailable("lock not free")

    server.ensure_hook = fail_after_another_claims_the_old_device
    with pytest.raises(ServerUnavailable):
        await flow.prepare_export(request(new))
    # The old device is another mapping's now: the row keeps the new one, and so does the link.
    assert mappings.rows[(VM, 0)].device_path == str(new)
    assert server.links[first.export_name] == str(new)


async def test_a_reuse_waits_for_a_release_of_the_same_disk_under_way(
    tmp_path: Path, disk: Path
) -> None:
    flow, _mappings, server = make_flow(tmp_path)
    await flow.prepare_export(request(disk))
    # The prepare's probe sees the export live, and answers only after the release has
    # started (and, still holding the disk's lock, is removing the export's files).
    server.probe_delay_s = 0.01
    server.delay_s = 0.03
    release = ReleaseExport(type="release-export", job_id="r", vm_id=VM, disk_unit_number=0)
    after, released = await asyncio.gather(
        flow.prepare_export(request(disk)), flow.release_export(release)
    )
    assert released.was_active is True
    # The prepare came second: it must not answer "reused" for the export just released.
    assert after.action is Action.CREATED


async def test_a_duplicate_job_repeats_its_answer_and_changes_nothing(
    tmp_path: Path, disk: Path
) -> None:
    flow, mappings, server = make_flow(tmp_path)
    job = request(disk, job="create-1")
    first = await flow.prepare_export(job)
    # Another job relinks the disk meanwhile; the late duplicate must not relink it back.
    new = tmp_path / "vdc"
    new.write_bytes(b"")
    await flow.prepare_export(request(new))
    again = await flow.prepare_export(job)
    assert again == first
    assert (again.action, again.reused) == (Action.CREATED, False)
    assert mappings.rows[(VM, 0)].device_path == str(new)
    assert server.ensure_calls == 2


@pytest.mark.parametrize("died_after_sighup", [False, True])
async def test_a_job_redelivered_after_its_claim_finishes_and_answers_as_created(
    tmp_path: Path, disk: Path, died_after_sighup: bool
) -> None:
    flow, mappings, server = make_flow(tmp_path)
    job = request(disk, job="crashed-1")
    # The first delivery claimed the row, then the worker died before the snippet, or
    # after the SIGHUP (the export is live; only the record and the reply are missing).
    policy = DevicePolicy((tmp_path,), allow_regular_files=True)
    await mappings.claim(job, policy.check(str(disk)), "created", "127.0.0.1,::1")
    if died_after_sighup:
        server.known.add(job.export_name)
        server.links[job.export_name] = str(disk)
    ready = await flow.prepare_export(job)
    assert (ready.action, ready.reused) == (Action.CREATED, False)
    assert server.sighups == (0 if died_after_sighup else 1)
    assert "crashed-1" in mappings.jobs


async def test_a_job_id_used_again_for_another_disk_is_refused(tmp_path: Path, disk: Path) -> None:
    flow, _mappings, _server = make_flow(tmp_path)
    await flow.prepare_export(request(disk, job="same"))
    other = tmp_path / "vdc"
    other.write_bytes(b"")
    with pytest.raises(InvalidRequest, match="already used"):
        await flow.prepare_export(request(other, disk=1, job="same"))


async def test_a_release_redelivered_repeats_was_active(tmp_path: Path, disk: Path) -> None:
    flow, mappings, _server = make_flow(tmp_path)
    await flow.prepare_export(request(disk))
    release = ReleaseExport(type="release-export", job_id="rel-1", vm_id=VM, disk_unit_number=0)
    first = await flow.release_export(release)
    # Redelivered after its record was lost (crash before the record): still was_active.
    del mappings.jobs["rel-1"]
    again = await flow.release_export(release)
    assert first.was_active is again.was_active is True


def volume_request(volume_id: str) -> PrepareExport:
    return PrepareExport(
        job_id=f"job-{uuid.uuid4().hex[:12]}",
        vm_id=VM,
        vm_name="vm",
        disk_unit_number=0,
        volume_id=volume_id,
    )


VOLUME = "0A1B2C3D-4E5F-6A7B-8C9D-0E1F2A3B4C5D"


@pytest.mark.parametrize("prefix", ["virtio-", "scsi-0QEMU_QEMU_HARDDISK_"])
async def test_a_volume_id_resolves_to_its_by_id_link(
    tmp_path: Path, disk: Path, prefix: str
) -> None:
    by_id = tmp_path / "by-id"
    by_id.mkdir()
    (by_id / f"{prefix}0a1b2c3d4e5f6a7b8c9d").symlink_to(disk)
    mappings, server = InMemoryMappings(), FakeExportServer()
    flow = ExportFlow(
        mappings,
        server,
        DevicePolicy((tmp_path,), allow_regular_files=True, by_id_dir=by_id, udev_wait_s=0),
        JobLedger(mappings),
        nbd_host="h",
        nbd_port=1,
        node_id="n",
        client_addresses=("127.0.0.1", "::1"),
    )
    ready = await flow.prepare_export(volume_request(VOLUME))
    assert ready.device_path == str(by_id / f"{prefix}0a1b2c3d4e5f6a7b8c9d")
    assert ready.kernel_device == str(disk)
    assert ready.volume_id == VOLUME.lower()
    assert server.links[ready.export_name] == ready.device_path


async def test_a_volume_whose_link_appears_late_is_waited_for(tmp_path: Path, disk: Path) -> None:
    by_id = tmp_path / "by-id"
    by_id.mkdir()
    policy = DevicePolicy((tmp_path,), allow_regular_files=True, by_id_dir=by_id, udev_wait_s=5)

    async def udev() -> None:
        await asyncio.sleep(0.1)
        (by_id / "virtio-0a1b2c3d4e5f6a7b8c9d").symlink_to(disk)

    device, _ = await asyncio.gather(policy.resolve(None, VOLUME.lower()), udev())
    assert device.resolved == str(disk)


async def test_a_missing_volume_is_device_not_found(tmp_path: Path) -> None:
    policy = DevicePolicy((tmp_path,), by_id_dir=tmp_path, udev_wait_s=0.05)
    with pytest.raises(DeviceNotFound, match="virtio-0a1b2c3d4e5f6a7b8c9d"):
        await policy.resolve(None, VOLUME.lower())


async def test_a_volume_link_leading_outside_the_roots_is_refused(tmp_path: Path) -> None:
    by_id = tmp_path / "by-id"
    by_id.mkdir()
    (by_id / "virtio-0a1b2c3d4e5f6a7b8c9d").symlink_to("/etc/passwd")
    policy = DevicePolicy((tmp_path,), allow_regular_files=True, by_id_dir=by_id, udev_wait_s=0)
    with pytest.raises(InvalidRequest, match="outside the allowed roots"):
        await policy.resolve(None, VOLUME.lower())


async def test_a_duplicate_is_answered_from_its_record_even_if_its_device_has_gone(
    tmp_path: Path, disk: Path
) -> None:
    flow, _mappings, _server = make_flow(tmp_path)
    job = request(disk, job="gone-1")
    first = await flow.prepare_export(job)
    disk.unlink()
    assert await flow.prepare_export(job) == first


async def test_a_reuse_does_not_answer_for_a_release_done_during_its_probe(
    tmp_path: Path, disk: Path
) -> None:
    flow, _mappings, server = make_flow(tmp_path)
    await flow.prepare_export(request(disk))
    # The release starts and finishes while the prepare waits for its probe: when the
    # answer comes back, no lock is held, yet what the prepare read is stale.
    server.probe_delay_s = 0.05
    release = ReleaseExport(type="release-export", job_id="r-x", vm_id=VM, disk_unit_number=0)

    async def release_soon() -> None:
        await asyncio.sleep(0.01)
        await flow.release_export(release)

    after, _ = await asyncio.gather(flow.prepare_export(request(disk)), release_soon())
    assert after.action is Action.CREATED


def flush_job(job_id: str) -> FlushExport:
    return FlushExport(type="flush-export", job_id=job_id, vm_id=VM, disk_unit_number=0)


async def test_flush_fsyncs_the_mapped_device_and_repeats_its_answer(
    tmp_path: Path, disk: Path
) -> None:
    flow, _, server = make_flow(tmp_path)
    created = await flow.prepare_export(request(disk))
    flushed = await flow.flush_export(flush_job("f-1"))
    assert (flushed.export_name, flushed.device_path) == (created.export_name, str(disk))
    assert server.flushed == [(created.export_name, str(disk))]
    assert await flow.flush_export(flush_job("f-1")) == flushed  # recorded: no second fsync
    assert len(server.flushed) == 1


async def test_flush_of_nothing_is_export_not_found(tmp_path: Path, disk: Path) -> None:
    flow, _, server = make_flow(tmp_path)
    with pytest.raises(ExportNotFound):
        await flow.flush_export(flush_job("f-1"))
    await flow.prepare_export(request(disk))
    await flow.release_export(
        ReleaseExport(type="release-export", job_id="r", vm_id=VM, disk_unit_number=0)
    )
    with pytest.raises(ExportNotFound):
        await flow.flush_export(flush_job("f-2"))
    assert len(server.flushed) == 1  # the release's own


async def test_a_failed_flush_sticks_until_a_new_prepare_export(tmp_path: Path, disk: Path) -> None:
    flow, mappings, server = make_flow(tmp_path)
    await flow.prepare_export(request(disk))
    server.flush_errors = ["EIO"]
    with pytest.raises(FlushFailed) as first:
        await flow.flush_export(flush_job("f-1"))
    assert first.value.errno_name == "EIO"
    # The next fsync would succeed, but what was written before may be lost.
    with pytest.raises(FlushFailed, match="an earlier flush") as second:
        await flow.flush_export(flush_job("f-2"))
    assert second.value.errno_name == "EIO"
    release = ReleaseExport(type="release-export", job_id="r-1", vm_id=VM, disk_unit_number=0)
    with pytest.raises(FlushFailed):
        await flow.release_export(release)
    assert mappings.rows[(VM, 0)].status == "active"
    assert server.flushed == []
    # A new prepare-export (a reuse here) starts a new copy: flushes count again.
    assert (await flow.prepare_export(request(disk))).action is Action.REUSED
    assert mappings.rows[(VM, 0)].flush_error is None
    await flow.flush_export(flush_job("f-3"))
    released = await flow.release_export(release.model_copy(update={"job_id": "r-2"}))
    assert (released.was_active, released.flushed) == (True, True)
    assert mappings.rows[(VM, 0)].status == "inactive"


async def test_a_release_whose_fsync_fails_changes_nothing(tmp_path: Path, disk: Path) -> None:
    flow, mappings, server = make_flow(tmp_path)
    created = await flow.prepare_export(request(disk))
    server.flush_errors = ["ENOSPC"]
    release = ReleaseExport(type="release-export", job_id="r-1", vm_id=VM, disk_unit_number=0)
    with pytest.raises(FlushFailed):
        await flow.release_export(release)
    assert mappings.rows[(VM, 0)].status == "active"
    assert server.links[created.export_name] == str(disk)
    assert "r-1" not in mappings.jobs


async def test_a_flush_whose_outcome_was_not_recorded_fails_closed(
    tmp_path: Path, disk: Path
) -> None:
    """The fsync failed and the database went away before the failure was kept: the job is
    retried (a transient error), and the retry must not answer flushed although its own
    fsync would succeed (the kernel reports a writeback error once)."""
    flow, mappings, server = make_flow(tmp_path)
    await flow.prepare_export(request(disk))
    server.flush_errors = ["EIO"]
    mappings.fail_flush_error_writes = 2  # the UNFINISHED mark lands, the EIO note does not
    with pytest.raises(TransientDatabaseError):
        await flow.flush_export(flush_job("f-1"))
    assert (mappings.rows[(VM, 0)].flush_error or "").startswith("UNFINISHED")
    with pytest.raises(FlushFailed, match="did not finish") as retried:
        await flow.flush_export(flush_job("f-1"))
    assert retried.value.errno_name is None
    assert server.flushed == []


async def test_a_detached_device_is_released_unflushed_and_says_so(
    tmp_path: Path, disk: Path
) -> None:
    flow, mappings, server = make_flow(tmp_path)
    await flow.prepare_export(request(disk))
    server.flush_errors = ["ENOENT"]  # cannot open: the volume was detached
    with pytest.raises(FlushFailed):
        await flow.flush_export(flush_job("f-1"))
    assert mappings.rows[(VM, 0)].flush_error is None  # nothing was lost by this flush
    server.flush_errors = ["ENOENT"]
    release = ReleaseExport(type="release-export", job_id="r-1", vm_id=VM, disk_unit_number=0)
    released = await flow.release_export(release)
    assert (released.was_active, released.flushed) == (True, False)
    assert mappings.rows[(VM, 0)].status == "inactive"
    assert mappings.rows[(VM, 0)].last_action == "released"
    assert await flow.release_export(release) == released  # its record repeats it


async def test_every_prepared_export_has_its_device_held(tmp_path: Path, disk: Path) -> None:
    flow, _, server = make_flow(tmp_path)
    created = await flow.prepare_export(request(disk))
    server.held.clear()
    await flow.prepare_export(request(disk))  # a reuse, on the fast path
    assert server.held == {created.export_name: f"file:{disk.stat().st_dev}:{disk.stat().st_ino}"}


def test_a_release_recorded_before_releases_flushed_still_repeats() -> None:
    old = {
        "job_id": "r", "vm_id": VM, "disk_unit_number": 0, "status": "released",
        "export_name": "e", "was_active": True, "node_id": "n",
    }  # fmt: skip
    assert ExportReleased.model_validate(old).flushed is False


def with_clients(job: PrepareExport, *addresses: str) -> PrepareExport:
    return job.model_copy(update={"client_addresses": addresses})


async def test_other_clients_switch_the_authfile_without_a_reload(
    tmp_path: Path, disk: Path
) -> None:
    flow, mappings, server = make_flow(tmp_path)
    first = await flow.prepare_export(with_clients(request(disk), "10.0.0.1"))
    assert first.client_addresses == ["10.0.0.1"]
    name = first.export_name
    assert server.authfiles[name] == ("10.0.0.1",)
    writes = server.authfile_writes

    same = await flow.prepare_export(with_clients(request(disk), "10.0.0.1"))
    assert server.authfile_writes == writes  # the fast path: nothing written

    other = await flow.prepare_export(with_clients(request(disk), "10.0.0.2"))
    assert (other.action, other.reused) == (Action.REUSED, True)
    assert other.client_addresses == ["10.0.0.2"]
    assert server.authfiles[name] == ("10.0.0.2",)
    assert mappings.rows[(VM, 0)].client_addresses == "10.0.0.2"
    assert server.sighups == 1
    assert same.action is Action.REUSED

    default = await flow.prepare_export(request(disk))
    assert default.client_addresses == ["127.0.0.1", "::1"]
    assert server.authfiles[name] == ("127.0.0.1", "::1")


async def test_a_switch_raced_by_a_release_is_not_answered_reused(
    tmp_path: Path, disk: Path
) -> None:
    flow, mappings, server = make_flow(tmp_path)
    await flow.prepare_export(with_clients(request(disk), "10.0.0.1"))
    real_set = mappings.set_client_addresses

    async def released_meanwhile(vm_id: str, disk_unit_number: int, addresses: str) -> None:
        await real_set(vm_id, disk_unit_number, addresses)
        await mappings.deactivate(vm_id, disk_unit_number, "rel", flushed=True)

    mappings.set_client_addresses = released_meanwhile  # type: ignore[method-assign,assignment]
    with pytest.raises(Superseded):
        await flow.prepare_export(with_clients(request(disk), "10.0.0.2"))
    assert server.authfiles[request(disk).export_name] is None  # closed: nobody
