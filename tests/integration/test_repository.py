"""Repository.lookup against MariaDB: what one round trip brings back is what was stored,
whatever characters the stored text holds (the lookup returns it as one JSON array)."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import AnyUrl

from harness.sql import execute_sql
from tests.conftest import NODE
from worker.mappings import JobRecord
from worker.repository import Repository

VM = "4205784a-098a-40f1-1f1e-a5cd2597fd59"
#: Quotes, a backslash, a tab, non-ASCII and a character outside the BMP.
AWKWARD_NAME = 'db "prod" \\ eu\tÜberseeweg 🙂'


async def _insert_mapping(url: AnyUrl, **values: object) -> None:
    columns = ", ".join(values)
    placeholders = ", ".join(["%s"] * len(values))
    await execute_sql(
        url,
        f"INSERT INTO vm_export_mappings ({columns}) VALUES ({placeholders})",
        list(values.values()),
    )


async def test_lookup_returns_mapping_and_record_as_stored(database_url: AnyUrl) -> None:
    await _insert_mapping(
        database_url,
        node_id=NODE,
        vm_id=VM,
        disk_unit_number=3,
        vm_name=AWKWARD_NAME,
        export_name=f"migration-vm-{VM}-disk3",
        device_path="/dev/disk/by-id/virtio-0123456789abcdef0123",
        device_id="blk:252:16",
        status="inactive",
        last_job_id="job-A",
        last_action="relinked",
    )
    reply = {"status": "ready", "vm_id": VM, "disk_unit_number": 3, "note": AWKWARD_NAME}
    repo = await Repository.connect(database_url, node_id=NODE, pool_size=2, timeout_s=5)
    try:
        await repo.record_jobs(
            [JobRecord(job_id="job-A", vm_id=VM, disk_unit_number=3, reply=reply)]
        )
        mapping, record = await repo.lookup(VM, 3, "job-A")
        assert mapping is not None
        assert record is not None
        assert mapping.vm_name == AWKWARD_NAME
        assert mapping.device_path == "/dev/disk/by-id/virtio-0123456789abcdef0123"
        assert mapping.device_id == "blk:252:16"
        assert mapping.status == "inactive"
        assert not mapping.is_active
        assert (mapping.last_job_id, mapping.last_action) == ("job-A", "relinked")
        assert isinstance(mapping.id, int)
        assert mapping.id > 0
        assert record.reply == reply
        assert (record.vm_id, record.disk_unit_number) == (VM, 3)

        # Another job for the same disk: the mapping, no record. Another disk: neither.
        mapping, record = await repo.lookup(VM, 3, "job-B")
        assert mapping is not None
        assert mapping.vm_name == AWKWARD_NAME
        assert record is None
        assert await repo.lookup(VM, 4, "job-B") == (None, None)
        # job_id is compared exactly (ascii_bin): job-a is not job-A.
        assert (await repo.lookup(VM, 4, "job-a"))[1] is None
        # A record with no mapping (a job for a disk never prepared, answered): found too.
        released = {"status": "released", "vm_id": VM, "disk_unit_number": 4, "note": AWKWARD_NAME}
        await repo.record_jobs(
            [JobRecord(job_id="job-C", vm_id=VM, disk_unit_number=4, reply=released)]
        )
        mapping, record = await repo.lookup(VM, 4, "job-C")
        assert mapping is None
        assert record is not None
        assert record.reply == released
    finally:
        await repo.close()


async def test_a_claims_answer_is_settled_once_by_whichever_delivery_comes_first(
    database_url: AnyUrl,
) -> None:
    """The same job delivered to two workers at once: one proposes "reused" (it found the
    export in place), the other "created" (resuming the claim); both answer the first.
    The soak once saw such a job answered twice, unalike, before answers were settled."""
    await _insert_mapping(
        database_url,
        node_id=NODE, vm_id=VM, disk_unit_number=1, vm_name="vm",
        export_name=f"migration-vm-{VM}-disk1", device_path="/dev/vdb", device_id="blk:8:16",
        status="active", last_job_id="job-J", last_action="created+reused",
    )  # fmt: skip
    repo = await Repository.connect(database_url, node_id=NODE, pool_size=2, timeout_s=5)
    try:
        first, second = await asyncio.gather(
            repo.settle_answer(VM, 1, "job-J", "reused+reused"),
            repo.settle_answer(VM, 1, "job-J", "created+reused"),
        )
        assert first == second
        assert first in ("reused+reused!", "created+reused!")
        assert await repo.settle_answer(VM, 1, "job-J", "relinked") == first
        # Another job's claim of the row is not this job's to settle.
        assert await repo.settle_answer(VM, 1, "job-K", "reused+reused") is None
        mapping, _ = await repo.lookup(VM, 1, "job-J")
        assert mapping is not None
        assert mapping.last_action == first
    finally:
        await repo.close()


async def test_a_reuses_generation_reaches_its_row_with_its_record(database_url: AnyUrl) -> None:
    """A reuse answers before its generation is written: the batch of records carries it
    to the rows (never backwards), one statement for the batch."""
    for disk in (5, 6):
        await _insert_mapping(
            database_url,
            node_id=NODE, vm_id=VM, disk_unit_number=disk, vm_name="vm",
            export_name=f"migration-vm-{VM}-disk{disk}", device_path=f"/dev/vd{disk}",
            device_id=f"blk:8:{disk}", status="active", generation=4,
        )  # fmt: skip

    def ready(job_id: str, disk: int, generation: int) -> JobRecord:
        reply = {"status": "ready", "vm_id": VM, "disk_unit_number": disk, "generation": generation}
        return JobRecord(job_id=job_id, vm_id=VM, disk_unit_number=disk, reply=reply)

    repo = await Repository.connect(database_url, node_id=NODE, pool_size=2, timeout_s=5)
    try:
        await repo.record_jobs([ready("r1", 5, 5), ready("r2", 5, 7), ready("r3", 6, 3)])
        five, _ = await repo.lookup(VM, 5, "")
        six, _ = await repo.lookup(VM, 6, "")
        assert five is not None
        assert six is not None
        assert (five.generation, six.generation) == (7, 4)  # the highest; never backwards
    finally:
        await repo.close()


async def test_concurrent_lookups_share_statements_and_each_gets_its_own_row(
    database_url: AnyUrl,
) -> None:
    """Lookups asked while one is in flight go together in the next statement: each still
    gets its own (vm, disk)'s mapping and its own job's record, the same as asked alone."""
    for disk in range(10, 16):
        await _insert_mapping(
            database_url,
            node_id=NODE, vm_id=VM, disk_unit_number=disk, vm_name=f"vm {disk}",
            export_name=f"migration-vm-{VM}-disk{disk}", device_path=f"/dev/vd{disk}",
            device_id=f"blk:8:{disk}", status="active", generation=disk,
        )  # fmt: skip
    repo = await Repository.connect(database_url, node_id=NODE, pool_size=4, timeout_s=5)
    batches: list[int] = []
    run_many = repo._lookups._run_many

    async def counted(keys: list[tuple[str, int, str]]) -> list[Any]:
        batches.append(len(keys))
        return await run_many(keys)

    repo._lookups._run_many = counted
    try:
        records = [
            JobRecord(
                job_id=f"job-{disk}",
                vm_id=VM,
                disk_unit_number=disk,
                reply={"vm_id": VM, "disk_unit_number": disk, "generation": disk},
            )
            for disk in range(10, 13)
        ]
        await repo.record_jobs(records)
        # Disks with and without a mapping, jobs with and without a record, one key twice.
        keys = [(VM, disk, f"job-{disk % 14}") for disk in range(8, 18)] + [(VM, 11, "job-11")]
        alone = [await repo.lookup(*key) for key in keys]
        batches.clear()
        together = await asyncio.gather(*(repo.lookup(*key) for key in keys))
        assert together == alone
        assert max(batches) > 1, f"no statement was shared: {batches}"
        assert sum(batches) == len(keys)
        for (_, disk, job_id), (mapping, record) in zip(keys, together, strict=True):
            assert (mapping is not None) == (10 <= disk < 16)
            assert mapping is None or (mapping.disk_unit_number, mapping.vm_name) == (
                disk,
                f"vm {disk}",
            )
            assert (record is not None) == (job_id in {"job-10", "job-11", "job-12"})
            assert record is None or record.reply["disk_unit_number"] == int(job_id[4:])
    finally:
        await repo.close()


async def _connection_id(repo: Repository) -> int:
    """The server's id of the connection lookups run on (the one the repository holds)."""
    held = repo._held
    assert held is not None, "no connection held after a lookup"
    return int(held.thread_id())


async def test_lookups_keep_one_connection_and_replace_it_once_the_server_drops_it(
    database_url: AnyUrl,
) -> None:
    """Lookups run on a connection kept between them; one the server has closed meanwhile
    (killed, timed out, restarted) is replaced before the next lookup, which does not fail."""
    await _insert_mapping(
        database_url, node_id=NODE, vm_id=VM, disk_unit_number=20, vm_name="held",
        export_name=f"migration-vm-{VM}-disk20", device_path="/dev/vdc",
        device_id="blk:252:32", status="active",
    )  # fmt: skip
    repo = await Repository.connect(database_url, node_id=NODE, pool_size=4, timeout_s=5)
    try:
        first, _ = await repo.lookup(VM, 20, "job-1")
        held = await _connection_id(repo)
        await repo.lookup(VM, 20, "job-2")
        assert await _connection_id(repo) == held  # kept, not taken from the pool anew

        await execute_sql(database_url, f"KILL CONNECTION {held}")
        for _ in range(100):  # the server closes it a moment after KILL returns
            if not await execute_sql(
                database_url, "SELECT id FROM information_schema.processlist WHERE id = %s", [held]
            ):
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)  # and the client reads its end of the socket
        again, record = await repo.lookup(VM, 20, "job-3")
        assert again == first
        assert record is None
        assert await _connection_id(repo) != held
        # Other statements still have connections of their own meanwhile.
        reply = {"vm_id": VM, "disk_unit_number": 20}
        await repo.record_jobs(
            [JobRecord(job_id="job-3", vm_id=VM, disk_unit_number=20, reply=reply)]
        )
        assert (await repo.lookup(VM, 20, "job-3"))[1] is not None
    finally:
        await asyncio.wait_for(repo.close(), 10)  # the held connection does not hold it up


async def test_with_a_pool_of_one_lookups_hold_no_connection(database_url: AnyUrl) -> None:
    """A pool of one connection is every statement's: a lookup gives it back, so the
    statements that follow (here a job's record) are not left waiting for it."""
    repo = await Repository.connect(database_url, node_id=NODE, pool_size=1, timeout_s=5)
    try:
        assert await repo.lookup(VM, 21, "job-1") == (None, None)
        assert repo._held is None
        record = JobRecord(job_id="job-1", vm_id=VM, disk_unit_number=21,
                           reply={"vm_id": VM, "disk_unit_number": 21})  # fmt: skip
        await asyncio.wait_for(repo.record_jobs([record]), 10)
        assert (await repo.lookup(VM, 21, "job-1"))[1] == record
    finally:
        await asyncio.wait_for(repo.close(), 10)
