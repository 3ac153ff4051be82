"""A redelivered job is answered as its first delivery would have been, for every action.

Each test sets up two twins: the same situation on two (VM, disk)s. The control twin's job is
served by a worker that runs undisturbed. The tested twin's job is served by a worker process
that `kill -9`s itself at a crash point once the job's work is done and before its reply
(worker/faults.py), and then by a survivor, which gets the redelivery. The survivor's reply
must be the control's, field by field, but for what names the twin (job id, VM, export,
device). Both jobs meet a worker just started, so what each worker remembers of the server is
alike too.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aio_pika.abc import AbstractConnection

from harness.nbd import NbdServerProcess
from harness.worker_process import WorkerProcess
from tests.conftest import Scheduler, make_disk, running_worker, scheduler_for
from tests.fault_run import FAULT_SETTINGS, FaultRun, check_consistent
from tests.integration.test_data_path import failing_block_device
from worker.faults import CrashPoint
from worker.settings import Settings

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


@dataclass(frozen=True)
class Twin:
    """One (VM, disk) of a twin situation: `tag` starts its job ids and its disks' names."""

    tag: str
    vm_id: str
    disks: Path

    def disk(self, name: str) -> Path:
        path = self.disks / f"{self.tag}-{name}"
        return path if path.exists() else make_disk(self.disks, f"{self.tag}-{name}")

    def job(self, kind: str, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "job_id": f"{self.tag}-{kind}",
            "vm_id": self.vm_id,
            "disk_unit_number": 0,
            **fields,
        }
        if kind.startswith(("flush", "release")):
            body["type"] = f"{kind.split('-')[0]}-export"
        else:
            body["vm_name"] = "pgtest2"
        return body

    def prepare(self, kind: str, device: Path) -> dict[str, Any]:
        return self.job(kind, device_path=str(device))


#: A step of a twin situation, run by a worker that answers every job.
Step = Callable[[Scheduler, Twin], Awaitable[None]]


def as_twin(reply: dict[str, Any], control: Twin, tested: Twin) -> dict[str, Any]:
    """The control's reply with its own names (job ids, VM, export, disks) as the tested
    twin's: what the tested twin's reply must be, every other field alike."""
    text = json.dumps(reply).replace(control.vm_id, tested.vm_id)
    return dict(json.loads(text.replace(f"{control.tag}-", f"{tested.tag}-")))


@pytest.fixture
def redelivery_settings(settings: Settings) -> Settings:
    # The fault suite's: a job outlasts a probe or two that fail while a worker starts.
    return settings.model_copy(update=FAULT_SETTINGS)


async def answered(scheduler: Scheduler, body: dict[str, Any]) -> dict[str, Any]:
    reply = await scheduler.request(body, 60)
    assert reply["status"] != "error", reply
    return reply


async def control_and_redelivered(
    settings: Settings,
    amqp: AbstractConnection,
    disks: Path,
    point: CrashPoint,
    job: Callable[[Twin], dict[str, Any]],
    *,
    setup: Step | None = None,
    before: Step | None = None,
) -> tuple[dict[str, Any], dict[str, Any], Twin, Twin]:
    """The control twin's reply to `job` from a worker that runs undisturbed, and the tested
    twin's from the survivor of a worker killed at `point`. `setup` runs for both twins on
    a worker stopped before; `before` runs on each job's own worker, just before the job."""
    control = Twin("ctl", str(uuid.uuid4()), disks)
    tested = Twin("tst", str(uuid.uuid4()), disks)
    if setup is not None:
        async with running_worker(settings):
            scheduler = await scheduler_for(amqp, settings)
            for twin in (control, tested):
                await setup(scheduler, twin)
            await scheduler.channel.close()

    async with running_worker(settings):
        scheduler = await scheduler_for(amqp, settings)
        if before is not None:
            await before(scheduler, control)
        expected = await scheduler.request(job(control), 60)
        await scheduler.channel.close()

    run = await FaultRun.start(amqp, settings)
    doomed = WorkerProcess(settings, EXPORT_WORKER_CRASH_AT=point)
    try:
        await doomed.start()
        if before is not None:
            await before(run.scheduler, tested)
        corr = await run.publish(job(tested))
        assert await doomed.wait(60) == -signal.SIGKILL, "".join(doomed.log)[-2000:]
        assert corr not in run.scheduler.replies  # died after the work, before the reply
        async with running_worker(settings):
            redelivered = await run.scheduler.reply(corr, 60)
    finally:
        await doomed.stop()
        await run.scheduler.channel.close()
    return expected, redelivered, control, tested


async def create(scheduler: Scheduler, twin: Twin) -> None:
    await answered(scheduler, twin.prepare("create", twin.disk("a")))


@pytest.mark.parametrize("again", [False, True], ids=["new", "after-a-release"])
async def test_created(
    again: bool, redelivery_settings: Settings, amqp: AbstractConnection, disks_dir: Path
) -> None:
    """A create, of a new disk or of one released just before by the same worker (whose
    server still has the export's name: no SIGHUP, `reused`)."""

    async def release(scheduler: Scheduler, twin: Twin) -> None:
        await answered(scheduler, twin.job("prepare-0", device_path=str(twin.disk("a"))))
        await answered(scheduler, twin.job("release-0"))

    expected, reply, control, tested = await control_and_redelivered(
        redelivery_settings,
        amqp,
        disks_dir,
        "before_record",
        lambda twin: twin.prepare("create-again" if again else "create", twin.disk("a")),
        setup=create if again else None,
        before=release if again else None,
    )
    assert (expected["action"], expected["reused"]) == ("created", again)
    assert reply == as_twin(expected, control, tested)
    await check_consistent(redelivery_settings)


async def test_reused(
    redelivery_settings: Settings, amqp: AbstractConnection, disks_dir: Path
) -> None:
    expected, reply, control, tested = await control_and_redelivered(
        redelivery_settings,
        amqp,
        disks_dir,
        "reuse_before_record",
        lambda twin: twin.prepare("reuse", twin.disk("a")),
        setup=create,
    )
    assert (expected["action"], expected["reused"]) == ("reused", True)
    assert reply == as_twin(expected, control, tested)


@pytest.mark.parametrize("point", ["before_record", "before_reply"])
async def test_relinked(
    point: CrashPoint, redelivery_settings: Settings, amqp: AbstractConnection, disks_dir: Path
) -> None:
    """A relink of a live export: the link re-pointed, no SIGHUP, so `reused`. Cut short
    before its record (the redelivery finishes it) or after (it repeats the record)."""
    expected, reply, control, tested = await control_and_redelivered(
        redelivery_settings,
        amqp,
        disks_dir,
        point,
        lambda twin: twin.prepare("relink", twin.disk("b")),
        setup=create,
    )
    assert (expected["action"], expected["reused"]) == ("relinked", True)
    assert reply == as_twin(expected, control, tested)
    await check_consistent(redelivery_settings)


@pytest.mark.parametrize("lost", ["link", "snippet-and-server-memory"])
async def test_recreated(
    lost: str,
    redelivery_settings: Settings,
    amqp: AbstractConnection,
    disks_dir: Path,
    nbd_server: NbdServerProcess,
) -> None:
    """An active mapping whose export is not live: its link lost (the server still has the
    export: no SIGHUP, `reused`), or its snippet lost and the server restarted since."""
    settings = redelivery_settings

    async def break_export(scheduler: Scheduler, twin: Twin) -> None:
        name = f"migration-vm-{twin.vm_id}-disk0"
        if lost == "link":
            (settings.link_dir / name).unlink()
        else:
            (settings.nbd_conf_dir / f"{name}.conf").unlink()
            nbd_server.stop()
            nbd_server.start()

    expected, reply, control, tested = await control_and_redelivered(
        settings,
        amqp,
        disks_dir,
        "before_record",
        lambda twin: twin.prepare("recreate", twin.disk("a")),
        setup=create,
        before=break_export,
    )
    assert (expected["action"], expected["reused"]) == ("recreated", lost == "link")
    assert reply == as_twin(expected, control, tested)
    await check_consistent(settings)


async def test_flushed(
    redelivery_settings: Settings, amqp: AbstractConnection, disks_dir: Path
) -> None:
    expected, reply, control, tested = await control_and_redelivered(
        redelivery_settings,
        amqp,
        disks_dir,
        "flush_before_record",
        lambda twin: twin.job("flush"),
        setup=create,
    )
    assert expected["status"] == "flushed"
    assert reply == as_twin(expected, control, tested)


async def test_released(
    redelivery_settings: Settings, amqp: AbstractConnection, disks_dir: Path
) -> None:
    expected, reply, control, tested = await control_and_redelivered(
        redelivery_settings,
        amqp,
        disks_dir,
        "release_before_record",
        lambda twin: twin.job("release"),
        setup=create,
    )
    assert (expected["status"], expected["was_active"], expected["flushed"]) == (
        "released",
        True,
        True,
    )
    assert reply == as_twin(expected, control, tested)
    await check_consistent(redelivery_settings)


async def test_flush_failed(
    redelivery_settings: Settings, amqp: AbstractConnection, disks_dir: Path, tmp_path: Path
) -> None:
    """An fsync that fails: the failure is kept on the mapping (every later flush fails
    too), and the job's own redelivery answers the error its first delivery met."""
    settings = redelivery_settings.model_copy(update={"device_roots": (disks_dir, Path("/dev"))})
    devices: dict[str, Path] = {}

    async def prepare(scheduler: Scheduler, twin: Twin) -> None:
        await answered(scheduler, twin.prepare("create", devices[twin.tag]))

    async def dirty(scheduler: Scheduler, twin: Twin) -> None:
        # Written past the volume's room and not flushed, as a copy tool that never
        # flushes leaves it: the loop device cannot write it back.
        fd = os.open(devices[twin.tag], os.O_WRONLY)
        try:
            os.write(fd, os.urandom(32 * MIB))
        finally:
            os.close(fd)

    (tmp_path / "ctl").mkdir()
    (tmp_path / "tst").mkdir()
    with (
        failing_block_device(tmp_path / "ctl") as (devices["ctl"], _),
        failing_block_device(tmp_path / "tst") as (devices["tst"], _),
    ):
        expected, reply, control, tested = await control_and_redelivered(
            settings,
            amqp,
            disks_dir,
            "flush_failure_kept",
            lambda twin: twin.job("flush"),
            setup=prepare,
            before=dirty,
        )
    assert (expected["status"], expected["error"]["code"]) == ("error", "flush_failed")
    assert expected["error"]["errno"] == "EIO"
    assert reply == as_twin(expected, control, tested)
