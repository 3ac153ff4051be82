"""checksum-export against the real stack: after a copy by nbdcopy or qemu-img onto a used
volume, the worker's checksum equals ovirt-imageio's (`ovirt_imageio.client.checksum()`
of the source image, through qemu-nbd); a worker killed mid-hash answers once after its
restart; a release during a hash ends it with export_changed; reuses go on beside it.
Longer runs (a broker's consumer timeout, 200 reuses beside 2 GiB): test_checksum_load.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from ovirt_imageio import client as imageio_client

from harness.worker_process import WorkerProcess, env_for
from tests.conftest import (
    AMQP_URL,
    NODE,
    RunningWorker,
    Scheduler,
    job,
    run_worker_cli,
    running_worker,
    scheduler_for,
)
from tests.integration.test_data_path import (
    _loop_device_on,
    image_with_long_zero_runs,
    nbd_uri,
    prefilled_volume,
    run_tool,
)
from worker import blkhash
from worker.blkhash import HashResult
from worker.client import ExportNotFound, SchedulerClient
from worker.settings import Settings

pytestmark = pytest.mark.integration

MIB = 1 << 20


def checksum_job(ready: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "type": "checksum-export",
        "job_id": f"sum-{uuid.uuid4().hex[:12]}",
        "vm_id": ready["vm_id"],
        "disk_unit_number": ready["disk_unit_number"],
        **extra,
    }


async def imageio_checksum(path: Path, **params: Any) -> dict[str, Any]:
    """ovirt-imageio's client, as a scheduler would run it on the source (it starts
    qemu-nbd: off the event loop)."""
    result: dict[str, Any] = await asyncio.to_thread(imageio_client.checksum, str(path), **params)
    return result


class Replies:
    """A reply queue of the test's own that keeps every reply, to count them."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, dict[str, Any]]] = []
        self.queue_name = ""
        self._arrived = asyncio.Event()

    async def start(self, channel: aio_pika.abc.AbstractChannel) -> None:
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        self.queue_name = queue.name
        await queue.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        self.bodies.append((message.correlation_id or "", json.loads(message.body)))
        self._arrived.set()

    def of(self, corr: str) -> list[dict[str, Any]]:
        return [body for c, body in self.bodies if c == corr]

    async def first(self, corr: str, timeout_s: float = 30) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            while not self.of(corr):
                self._arrived.clear()
                await self._arrived.wait()
        return self.of(corr)[0]


async def publish(
    channel: aio_pika.abc.AbstractChannel, queue: str, body: dict[str, Any], reply_to: str
) -> str:
    corr = uuid.uuid4().hex
    await channel.default_exchange.publish(
        aio_pika.Message(
            json.dumps(body).encode(),
            correlation_id=corr,
            reply_to=reply_to,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        routing_key=queue,
    )
    return corr


async def copied_export(
    scheduler: Scheduler, disks_dir: Path, tmp_path: Path, tool: str
) -> tuple[Path, Path, dict[str, Any]]:
    """A used volume served by a worker-made export, and a source image with zero runs
    longer than 128 MiB copied onto it by `tool`, as a migration does."""
    volume = prefilled_volume(disks_dir / f"vol-{tool}")
    image = image_with_long_zero_runs(tmp_path / "source.img")
    ready = await scheduler.request(job(device=volume))
    assert ready["status"] == "ready", ready
    if tool == "nbdcopy":
        argv = ["nbdcopy", "--flush", str(image), nbd_uri(ready)]
    else:
        argv = ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), nbd_uri(ready)]
    copy = await run_tool(*argv)
    assert copy.returncode == 0, copy.stderr
    return image, volume, ready


@pytest.mark.parametrize("tool", ["nbdcopy", "qemu-img"])
async def test_checksum_after_a_copy_equals_ovirt_imageios(
    tool: str,
    worker: RunningWorker,
    scheduler: Scheduler,
    disks_dir: Path,
    tmp_path: Path,
) -> None:
    image, volume, ready = await copied_export(scheduler, disks_dir, tmp_path, tool)
    expected = await imageio_checksum(image)

    reply = await scheduler.request(checksum_job(ready), timeout_s=60)
    assert reply["status"] == "checksummed", reply
    assert {k: reply[k] for k in ("algorithm", "block_size", "checksum")} == expected
    size = volume.stat().st_size
    assert reply["size"] == size
    # The image's zero runs (272 MiB) are whole 4 MiB blocks of zeros on the volume now.
    assert 256 * MIB <= reply["zero_bytes"] < size
    assert worker.sample("nbd_export_checksum_bytes_total") == size
    assert worker.sample("nbd_export_checksums_running") == 0

    # Other parameters, ovirt-imageio's way too; from the command line (a process of its
    # own) for nbdcopy's copy.
    params = {"algorithm": "sha256", "block_size": 1 * MIB}
    if tool == "nbdcopy":
        cli = await asyncio.to_thread(
            run_worker_cli,
            *("checksum", "--vm-id", ready["vm_id"], "--disk", "0"),
            *("--algorithm", "sha256", "--block-size", str(MIB)),
            env=env_for(worker.settings),
        )
        assert cli.returncode == 0, cli.stderr
        other = json.loads(cli.stdout)
    else:
        other = await scheduler.request(checksum_job(ready, **params), timeout_s=60)
    assert other["checksum"] == (await imageio_checksum(image, **params))["checksum"]

    # One byte of the device changed: another checksum, the changed volume's.
    fd = os.open(volume, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x01", 200 * MIB + 7)  # inside the long zero run
    finally:
        os.close(fd)
    changed = await scheduler.request(checksum_job(ready), timeout_s=60)
    assert changed["checksum"] != expected["checksum"]
    assert changed["checksum"] == (await imageio_checksum(volume))["checksum"]


def gib_image_with_long_runs(path: Path) -> Path:
    """A sparse raw 1 GiB image whose data and zero runs are longer than nbdcopy's 128 MiB
    requests: 160 MiB of data, 300 MiB of zeros, 144 MiB of data, zeros to the end."""
    with path.open("wb") as f:
        f.truncate(1024 * MIB)
        for offset, length in ((0, 160 * MIB), (460 * MIB, 144 * MIB)):
            f.seek(offset)
            for _ in range(length // (16 * MIB)):
                f.write(os.urandom(16 * MIB))
    return path


@pytest.mark.slow  # a 1 GiB device written, copied onto and read three times: 10-16 s
async def test_checksum_of_a_block_device_equals_ovirt_imageios(
    settings: Settings, amqp: AbstractConnection, disks_dir: Path, tmp_path: Path
) -> None:
    """A used loop device, as a volume on an appliance (no holes to skip, every block read),
    after nbdcopy --flush of a 1 GiB image: the checksum equals ovirt-imageio's of the
    image; one byte of the device changed, it differs (and equals the changed device's)."""
    backing = prefilled_volume(tmp_path / "backing.img", 1024 * MIB)
    image = gib_image_with_long_runs(tmp_path / "source.img")
    expected = await imageio_checksum(image)
    with _loop_device_on(backing) as device:
        block_settings = settings.model_copy(update={"device_roots": (disks_dir, Path("/dev"))})
        async with running_worker(block_settings):
            scheduler = await scheduler_for(amqp, block_settings)
            ready = await scheduler.request(job(device=device))
            copy = await run_tool("nbdcopy", "--flush", str(image), nbd_uri(ready))
            assert copy.returncode == 0, copy.stderr
            reply = await scheduler.request(checksum_job(ready), timeout_s=60)
            fd = os.open(device, os.O_WRONLY)
            try:
                os.pwrite(fd, b"\x01", 300 * MIB + 7)  # inside the 300 MiB zero run
                os.fsync(fd)  # through the loop device to its backing file
            finally:
                os.close(fd)
            changed = await scheduler.request(checksum_job(ready), timeout_s=60)
            await scheduler.channel.close()
    assert reply["status"] == "checksummed", reply
    assert reply["checksum"] == expected["checksum"]
    assert reply["size"] == 1024 * MIB
    assert reply["zero_bytes"] >= 720 * MIB  # found by reading: a device reports no holes
    assert changed["status"] == "checksummed", changed
    assert changed["checksum"] != expected["checksum"]
    assert changed["checksum"] == (await imageio_checksum(backing))["checksum"]


async def test_a_worker_killed_mid_checksum_answers_it_once_after_its_restart(
    settings: Settings, amqp: AbstractConnection, disks_dir: Path, tmp_path: Path
) -> None:
    doomed = WorkerProcess(settings, EXPORT_WORKER_CRASH_AT="checksum_half_hashed")
    channel = await amqp.channel()
    replies = Replies()
    await replies.start(channel)
    try:
        await doomed.start()
        scheduler = await scheduler_for(amqp, settings)
        image, _, ready = await copied_export(scheduler, disks_dir, tmp_path, "nbdcopy")
        expected = await imageio_checksum(image)
        request = checksum_job(ready)
        corr = await publish(channel, settings.request_queue, request, replies.queue_name)
        assert await doomed.wait(60) == -signal.SIGKILL, "".join(doomed.log)[-2000:]
        assert replies.of(corr) == []  # killed half way, after the request was acked

        async with running_worker(settings) as restarted:
            answer = await replies.first(corr, timeout_s=30)
            assert answer["status"] == "checksummed", answer
            assert answer["checksum"] == expected["checksum"]
            # The same job again (a duplicate): the recorded answer, not a new hash.
            again = await publish(channel, settings.request_queue, request, replies.queue_name)
            assert (await replies.first(again))["checksum"] == expected["checksum"]
            await asyncio.sleep(1)  # room for a second answer, which must not come
            assert restarted.sample("nbd_export_checksum_bytes_total") == answer["size"]
        assert len(replies.of(corr)) == 1
        assert len(replies.of(again)) == 1
        await scheduler.channel.close()
    finally:
        await doomed.stop()
        await channel.close()


def slowed_hash(per_block_s: float) -> Callable[..., HashResult]:
    """hash_fd with a pause after each block: a checksum long enough to be released
    under (the data and the hash are the real ones)."""
    real = blkhash.hash_fd

    def hash_fd(fd: int, **kwargs: Any) -> HashResult:
        on_block = kwargs.pop("on_block")

        def slow(done: int, length: int) -> None:
            on_block(done, length)
            time.sleep(per_block_s)  # in the hashing thread

        return real(fd, on_block=slow, **kwargs)

    return hash_fd


@pytest.mark.parametrize("change", ["release", "relink"])
async def test_a_release_or_relink_during_a_checksum_ends_it_with_export_changed(
    change: str,
    monkeypatch: pytest.MonkeyPatch,
    worker: RunningWorker,
    scheduler: Scheduler,
    disks_dir: Path,
) -> None:
    monkeypatch.setattr("worker.checksums.hash_fd", slowed_hash(0.02))
    volume = prefilled_volume(disks_dir / "vol-release", 160 * MIB)
    ready = await scheduler.request(job(device=volume))
    request = checksum_job(ready)
    corr = await scheduler.publish(request)

    # Under way: inspect-export shows its progress.
    inspect = {"type": "inspect-export", "vm_id": ready["vm_id"], "disk_unit_number": 0}
    async with asyncio.timeout(10):
        while True:
            status = await scheduler.request({**inspect, "job_id": uuid.uuid4().hex})
            progress = status["checksum"]
            if progress is not None and progress["bytes_hashed"] > 0:
                break
            await asyncio.sleep(0.05)
    assert progress["size"] == 160 * MIB
    assert progress["bytes_hashed"] < progress["size"]
    assert worker.sample("nbd_export_checksums_running") == 1

    if change == "release":
        release = {"type": "release-export", "job_id": uuid.uuid4().hex, "vm_id": ready["vm_id"]}
        released = await scheduler.request({**release, "disk_unit_number": 0})
        assert released["status"] == "released", released
        assert (released["was_active"], released["flushed"]) == (True, True)
    else:
        other = prefilled_volume(disks_dir / "vol-other", 8 * MIB)
        relinked = await scheduler.request({**job(device=other), "vm_id": ready["vm_id"]})
        assert relinked["action"] == "relinked", relinked

    answer = await scheduler.reply(corr, timeout_s=10)
    assert answer["status"] == "error", answer
    assert answer["error"]["code"] == "export_changed"
    assert (answer["job_id"], answer["vm_id"]) == (request["job_id"], ready["vm_id"])
    assert worker.sample("nbd_export_checksums_total", {"outcome": "export_changed"}) == 1


async def test_every_job_is_answered_while_a_checksum_runs(
    worker: RunningWorker, scheduler: Scheduler, disks_dir: Path
) -> None:
    volume = prefilled_volume(disks_dir / "vol-busy", 256 * MIB)
    ready = await scheduler.request(job(device=volume))
    others = [job(device=disks_dir / f"other-{i}") for i in range(4)]
    for other in others:
        Path(other["device_path"]).write_bytes(bytes(MIB))
        assert (await scheduler.request(other))["action"] == "created"

    checksum = await scheduler.publish(checksum_job(ready))
    # Reuses of every export, the one being hashed included, while it is hashed.
    reuses = [
        await scheduler.publish({**other, "job_id": uuid.uuid4().hex})
        for _ in range(5)
        for other in [*others, {**job(device=volume), "vm_id": ready["vm_id"]}]
    ]
    answers = [await scheduler.reply(corr, timeout_s=30) for corr in reuses]
    assert {a["action"] for a in answers} == {"reused"}, answers
    first = await scheduler.reply(checksum, timeout_s=60)
    assert first["status"] == "checksummed"

    # The scheduler's client, by the node's routing key: the same value, typed; a disk the
    # node does not serve raises the error's class.
    async with await SchedulerClient.connect(
        AMQP_URL, exchange=worker.settings.exchange, node_id=NODE, timeout_s=30
    ) as client:
        typed = await client.checksum(ready["vm_id"], 0)
        assert typed.checksum == first["checksum"]
        assert (typed.algorithm, typed.block_size) == ("blake2b", 4 * MIB)
        with pytest.raises(ExportNotFound):
            await client.checksum(ready["vm_id"], 1)
