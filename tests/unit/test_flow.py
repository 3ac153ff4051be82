from __future__ import annotations

import ast
import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

import worker.flow
from tests.fakes import FakeExportServer, InMemoryMappings
from worker.devices import DevicePolicy
from worker.errors import DeviceInUse, DeviceNotFound, ServerUnavailable, Superseded
from worker.flow import ExportFlow, KeyedLocks, decide
from worker.mappings import Mapping
from worker.messages import Action, PrepareExport, ReleaseExport

VM = "4205784a-098a-40f1-1f1e-a5cd2597fd59"


def request(device: Path | str, *, vm: str = VM, disk: int = 0, job: str = "j") -> PrepareExport:
    return PrepareExport(
        job_id=job, vm_id=vm, vm_name="vm", disk_unit_number=disk, device_path=str(device)
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
    assert decide(row, request(device), live) is expected


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
        nbd_host="h",
        nbd_port=1,
        node_id="n",
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
    server.listed.clear()  # the server restarted without the snippet
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
    assert (await flow.release_export(release)).was_active is False
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
        await mappings.claim(other, policy.check(str(disk)).device_id)
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
