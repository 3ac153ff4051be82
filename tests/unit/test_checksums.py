"""worker/checksums.py on the flow's fakes: a checksum-export is accepted (flushed,
recorded), hashed, recorded in the ledger, published to where its latest delivery asked,
and its row dropped; duplicates and restarts never run it twice nor answer it twice."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, cast

import pytest

from tests.fakes import FakeExportServer, InMemoryMappings
from worker.blkhash import hash_fd
from worker.checksums import Checksums
from worker.devices import DevicePolicy, device_identity
from worker.errors import ExportNotFound, InvalidRequest
from worker.flow import ExportFlow
from worker.jobs import JobLedger
from worker.mappings import ChecksumJob, JobRecord
from worker.messages import (
    ChecksumExport,
    ExportChecksum,
    FlushExport,
    PrepareExport,
    export_name,
)
from worker.metrics import build_metrics
from worker.publisher import BasicProperties, ConfirmedPublisher

VM = "4205784a-098a-40f1-1f1e-a5cd2597fd59"
MIB = 1 << 20


class Store(InMemoryMappings):
    """InMemoryMappings plus export_checksums, with the SQL's rules."""

    def __init__(self) -> None:
        super().__init__()
        self.checksums: dict[str, ChecksumJob] = {}

    async def add_checksum(self, job: ChecksumJob) -> bool:
        found = self.checksums.get(job.job_id)
        if found is None:
            self.checksums[job.job_id] = job
            return True
        if found.reply is None:
            self.checksums[job.job_id] = ChecksumJob(
                **{**found.__dict__, "reply_to": job.reply_to, "correlation_id": job.correlation_id}
            )
        return False

    async def checksum_jobs(self, job_id: str | None = None) -> list[ChecksumJob]:
        return [j for j in self.checksums.values() if job_id in (None, j.job_id)]

    async def finish_checksum(self, job: ChecksumJob, record: JobRecord) -> bool:
        found = self.checksums.get(job.job_id)
        if found is None or found.reply is not None:
            return False
        self.checksums[job.job_id] = ChecksumJob(
            **{**found.__dict__, "reply": json.dumps(record.reply)}
        )
        self.jobs.setdefault(job.job_id, record)
        return True

    async def drop_checksum(self, job_id: str) -> None:
        self.checksums.pop(job_id, None)


class Publisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str | None, dict[str, Any]]] = []
        self.arrived = asyncio.Event()

    async def publish_body(
        self, body: bytes, properties: BasicProperties, routing_key: str, **_: Any
    ) -> None:
        self.sent.append((routing_key, properties.correlation_id, json.loads(body)))
        self.arrived.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.sent) < count:
                self.arrived.clear()
                await self.arrived.wait()


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.store = Store()
        self.server = FakeExportServer()
        self.flow = ExportFlow(
            self.store,
            self.server,
            DevicePolicy((tmp_path,), allow_regular_files=True),
            JobLedger(self.store),
            nbd_host="h",
            nbd_port=1,
            node_id="n",
            client_addresses=("127.0.0.1",),
        )
        self.links = tmp_path / "links"
        self.links.mkdir()
        self.metrics = build_metrics("n")
        self.publisher = Publisher()
        self.checksums = self.make()
        self.disk = tmp_path / "vdb"
        with self.disk.open("wb") as f:
            f.truncate(24 * MIB)
            f.seek(5 * MIB)
            f.write(os.urandom(MIB))

    def make(self) -> Checksums:
        checksums = Checksums(
            self.store,
            self.flow,
            link_for=lambda name: self.links / name,
            node_id="n",
            reply_queue="replies",
            metrics=self.metrics,
            retry_s=0.01,
        )
        checksums.attach(cast(ConfirmedPublisher, self.publisher))
        return checksums

    async def prepare(self) -> None:
        await self.flow.prepare_export(
            PrepareExport(
                job_id=uuid.uuid4().hex,
                vm_id=VM,
                vm_name="vm",
                disk_unit_number=0,
                device_path=str(self.disk),
            )
        )
        (self.links / export_name(VM, 0)).symlink_to(self.disk)

    def expected(self) -> str:
        fd = os.open(self.disk, os.O_RDONLY)
        try:
            return hash_fd(
                fd, block_size=4 * MIB, algorithm="blake2b", on_block=lambda d, n: None
            ).checksum
        finally:
            os.close(fd)


def checksum_request(job_id: str = "sum-1") -> ChecksumExport:
    return ChecksumExport(type="checksum-export", job_id=job_id, vm_id=VM, disk_unit_number=0)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


async def test_accepted_then_answered_once_through_the_ledger(rig: Rig) -> None:
    await rig.prepare()
    assert (
        await rig.checksums.accept(checksum_request(), reply_to="q1", correlation_id="c1") is None
    )
    assert rig.server.flushed, "flushed before it was accepted"
    await rig.publisher.wait_for(1)
    routing_key, corr, body = rig.publisher.sent[0]
    assert (routing_key, corr, body["status"]) == ("q1", "c1", "checksummed")
    assert body["checksum"] == rig.expected()
    assert (body["size"], body["zero_bytes"]) == (24 * MIB, 20 * MIB)
    assert rig.store.jobs["sum-1"].reply == body
    await asyncio.sleep(0.05)
    assert rig.store.checksums == {}  # dropped once published

    # A duplicate: the recorded answer, nothing hashed again.
    again = await rig.checksums.accept(checksum_request(), reply_to="q2", correlation_id="c2")
    assert again is not None
    assert again.model_dump(mode="json") == body
    assert len(rig.publisher.sent) == 1


async def test_a_duplicate_while_it_runs_is_not_run_again_and_is_answered_where_it_asks(
    rig: Rig,
) -> None:
    await rig.prepare()
    rig.publisher.sent.clear()
    rig.checksums.attach(None)  # no broker: the answer waits
    assert (
        await rig.checksums.accept(checksum_request(), reply_to="q1", correlation_id="c1") is None
    )
    assert (
        await rig.checksums.accept(checksum_request(), reply_to="q2", correlation_id="c2") is None
    )
    rig.checksums.attach(cast(ConfirmedPublisher, rig.publisher))
    await rig.publisher.wait_for(1)
    await asyncio.sleep(0.1)
    assert [(q, c) for q, c, _ in rig.publisher.sent] == [("q2", "c2")]
    assert (
        rig.metrics.registry.get_sample_value("nbd_export_checksum_bytes_total", {"node": "n"})
        == 24 * MIB
    )


async def test_a_restart_hashes_unfinished_rows_and_publishes_finished_ones(rig: Rig) -> None:
    await rig.prepare()
    device_id = device_identity(os.stat(rig.disk))
    base = {
        "vm_id": VM,
        "disk_unit_number": 0,
        "device_path": str(rig.disk),
        "device_id": device_id,
        "algorithm": "blake2b",
        "block_size": 4 * MIB,
        "correlation_id": None,
    }
    done = ExportChecksum(
        job_id="done",
        vm_id=VM,
        disk_unit_number=0,
        export_name=export_name(VM, 0),
        device_path=str(rig.disk),
        node_id="n",
        algorithm="blake2b",
        block_size=4 * MIB,
        checksum="ab" * 32,
        size=24 * MIB,
        zero_bytes=0,
        elapsed_s=1.0,
    ).model_dump(mode="json")
    rig.store.checksums = {
        "left": ChecksumJob(job_id="left", reply_to="q1", **base),  # type: ignore[arg-type]
        "done": ChecksumJob(job_id="done", reply_to="q2", reply=json.dumps(done), **base),  # type: ignore[arg-type]
    }
    assert await rig.make().resume() == 2
    await rig.publisher.wait_for(2)
    sent = {q: body for q, _, body in rig.publisher.sent}
    assert sent["q1"]["checksum"] == rig.expected()
    assert sent["q2"] == done  # as it was kept, not hashed again
    await asyncio.sleep(0.05)
    assert rig.store.checksums == {}


async def test_refusals(rig: Rig) -> None:
    with pytest.raises(ExportNotFound):
        await rig.checksums.accept(checksum_request(), reply_to=None, correlation_id=None)
    await rig.prepare()
    flush = FlushExport(type="flush-export", job_id="used", vm_id=VM, disk_unit_number=0)
    await rig.flow.flush_export(flush)
    with pytest.raises(InvalidRequest):
        await rig.checksums.accept(checksum_request("used"), reply_to=None, correlation_id=None)
    assert rig.store.checksums == {}


async def test_no_more_hash_at_once_than_the_concurrency(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    await rig.prepare()
    at_once, most = 0, 0
    real = hash_fd

    def counted(fd: int, **kwargs: Any) -> Any:
        nonlocal at_once, most
        at_once += 1
        most = max(most, at_once)
        try:
            time.sleep(0.05)  # long enough for the others to start, were they allowed to
            return real(fd, **kwargs)
        finally:
            at_once -= 1

    monkeypatch.setattr("worker.checksums.hash_fd", counted)
    for n in range(3):
        request = checksum_request(f"sum-{n}")
        assert await rig.checksums.accept(request, reply_to="q", correlation_id=str(n)) is None
    await rig.publisher.wait_for(3)
    assert most == 1  # the default concurrency
    assert {body["checksum"] for _, _, body in rig.publisher.sent} == {rig.expected()}
