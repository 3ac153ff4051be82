"""The live view of exports (worker/live.py), judged with copy tools nobody here wrote:
nbdcopy from a source that nbdkit's rate filter serves slowly, so that samples land while
the copy is under way; inspect-export, export-events and the per-export metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection, AbstractQueue

from harness.nbd import NbdConnection, NbdServerProcess
from tests.conftest import Scheduler, job, running_worker, scheduler_for
from tests.integration.test_data_path import _loop_device_on, nbd_uri, tool
from worker.settings import Settings

pytestmark = pytest.mark.integration

MIB = 1 << 20
#: In bits a second (nbdkit's rate filter): 100 MB/s makes a copy of 512 MiB last about
#: 5 s, so that samples every 0.2 s land in it.
SOURCE_RATE = "800M"


def sparse_image(path: Path, size: int, data_every: int = 16 * MIB) -> int:
    """A raw image of `size` bytes, data in every other `data_every` chunk (holes between,
    which copy tools send as zeroes); the data bytes it holds."""
    chunk = os.urandom(data_every)
    data = 0
    with path.open("wb") as f:
        f.truncate(size)
        for offset in range(0, size, 2 * data_every):
            f.seek(offset)
            f.write(chunk)
            data += data_every
    return data


def used_backing(path: Path, size: int) -> Path:
    """A volume that already holds data everywhere."""
    block = bytes(range(256)) * (MIB // 256)
    with path.open("wb") as f:
        for _ in range(size // MIB):
            f.write(block)
    return path


@contextlib.contextmanager
def slow_source(image: Path, socket: Path, rate: str = SOURCE_RATE) -> Iterator[str]:
    """`image` served by nbdkit through its rate filter, on a Unix socket: its URI."""
    process = subprocess.Popen(
        [tool("nbdkit"), "--foreground", "--unix", str(socket), "--filter=rate", "file",
         str(image), f"rate={rate}"],
    )  # fmt: skip
    try:
        for _ in range(500):
            if socket.exists():
                break
            assert process.poll() is None, "nbdkit exited"
            subprocess.run(["sleep", "0.01"], check=True)
        yield f"nbd+unix:///?socket={socket}"
    finally:
        process.terminate()
        process.wait(10)


async def start_copy(source: str, target: str, connections: int = 4) -> asyncio.subprocess.Process:
    # --threads: nbdcopy opens no more connections than threads (the CPUs by default).
    return await asyncio.create_subprocess_exec(
        tool("nbdcopy"), "--flush", f"--connections={connections}", f"--threads={connections}",
        source, target, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def inspect(scheduler: Scheduler, reply: dict[str, Any]) -> dict[str, Any]:
    status = await scheduler.request(
        {"type": "inspect-export", "job_id": f"inspect-{os.urandom(4).hex()}",
         "vm_id": reply["vm_id"], "disk_unit_number": reply["disk_unit_number"]}
    )  # fmt: skip
    assert status["status"] == "inspected", status
    return status


@contextlib.asynccontextmanager
async def event_queue(amqp: AbstractConnection, settings: Settings) -> AsyncIterator[AbstractQueue]:
    """A scheduler's queue bound to this node's export-events."""
    channel = await amqp.channel()
    exchange = await channel.declare_exchange(
        settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, routing_key=f"event.{settings.node_id}.*")
    try:
        yield queue
    finally:
        await channel.close()


async def drain(queue: AbstractQueue) -> list[dict[str, Any]]:
    events = []
    while (message := await queue.get(fail=False, no_ack=True)) is not None:
        events.append(json.loads(message.body))
    return events


def live_settings(settings: Settings, disks_dir: Path) -> Settings:
    return settings.model_copy(
        update={"device_roots": (disks_dir, Path("/dev")), "live_sample_s": 0.2}
    )


async def test_a_copy_onto_a_used_block_device_is_seen_live_and_counted(
    settings: Settings,
    amqp: AbstractConnection,
    nbd_server: NbdServerProcess,
    disks_dir: Path,
    tmp_path: Path,
) -> None:
    """4 connections seen while nbdcopy writes 512 MiB of a 1 GiB image; bytes written
    growing, then within 5 % of the data; events for every connection, in order; idle time
    growing afterwards; no signal to any nbd-server process, a held connection to another
    export unharmed; no per-export series left after the release."""
    image = tmp_path / "source.img"
    data = sparse_image(image, 1024 * MIB)
    backing = used_backing(tmp_path / "backing.img", 1024 * MIB)
    other = disks_dir / "other"
    other.write_bytes(b"x" * MIB)
    main_pid = nbd_server.pid_file.read_text()
    live = live_settings(settings, disks_dir)
    with _loop_device_on(backing) as device:
        async with running_worker(live) as worker, event_queue(amqp, live) as events:
            scheduler = await scheduler_for(amqp, live)
            held_reply = await scheduler.request(job(device=other))
            ready = await scheduler.request(job(device=device, planned_bytes=data))
            assert ready["status"] == "ready", ready
            name = ready["export_name"]
            with NbdConnection(nbd_server.port, held_reply["export_name"]) as held:
                with slow_source(image, tmp_path / "src.sock") as source:
                    copy = await start_copy(source, nbd_uri(ready))
                    seen_four, written = False, []
                    while copy.returncode is None:
                        status = await inspect(scheduler, ready)
                        state = status["live"]
                        if len(state["connections"]) == 4:
                            seen_four = True
                            assert {c["client_address"] for c in state["connections"]} == {
                                "127.0.0.1"
                            }
                            assert all(c["device"] == "current" for c in state["connections"])
                            written.append(state["bytes_written"])
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(copy.wait(), 0.3)
                    _, stderr = await copy.communicate()
                    assert copy.returncode == 0, stderr
                assert seen_four, "no sample saw the 4 connections"
                assert len(written) >= 2, written
                assert written[-1] > written[0], written
                assert written == sorted(written), "bytes written went back"
                assert held.read(0, 512) == b"x" * 512  # the other export's client is fine

            after = (await inspect(scheduler, ready))["live"]
            assert after["connections"] == []
            assert after["connections_total"] == 4
            assert abs(after["bytes_written"] - data) <= 0.05 * data, (after, data)
            assert after["progress"] == pytest.approx(min(1.0, after["bytes_written"] / data))
            assert after["device_size"] == 1024 * MIB
            await asyncio.sleep(1.0)
            later = (await inspect(scheduler, ready))["live"]
            assert later["idle_seconds"] > after["idle_seconds"]
            assert later["bytes_written"] == after["bytes_written"]

            await asyncio.sleep(0.5)  # the last events are published beside the jobs
            got = [e for e in await drain(events) if e["export_name"] == name]
            assert [e["seq"] for e in got] == list(range(1, 9)), got
            assert [e["kind"] for e in got].count("connected") == 4
            assert [e["kind"] for e in got].count("disconnected") == 4
            for event in got:  # each connection: connected before disconnected
                if event["kind"] == "disconnected":
                    port = event["connection"]["client_port"]
                    assert any(
                        e["kind"] == "connected" and e["connection"]["client_port"] == port
                        for e in got[: got.index(event)]
                    )
            assert got[-1]["bytes_written"] == after["bytes_written"]

            assert worker.sample("nbd_export_written_bytes_total", {"export": name}) > 0
            released = await scheduler.request(
                {"type": "release-export", "job_id": "rel", "vm_id": ready["vm_id"],
                 "disk_unit_number": ready["disk_unit_number"]}
            )  # fmt: skip
            assert released["status"] == "released"
            for _ in range(100):  # the view follows the mappings every few seconds
                if worker.sample("nbd_export_connections", {"export": name}) == 0 and not [
                    m
                    for m in worker.metrics.registry.collect()
                    for s in m.samples
                    if s.labels.get("export") == name
                ]:
                    break
                await asyncio.sleep(0.1)
            leftover = [
                s.name for m in worker.metrics.registry.collect() for s in m.samples
                if s.labels.get("export") == name
            ]  # fmt: skip
            assert leftover == []
            await scheduler.channel.close()
    assert nbd_server.pid_file.read_text() == main_pid
