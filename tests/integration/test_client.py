"""SchedulerClient against a real worker: RabbitMQ, MariaDB and nbd-server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aio_pika.abc import AbstractConnection

from harness.nbd import NbdConnection, NbdError, NbdServerProcess
from harness.tcp_proxy import TcpProxy
from tests.conftest import AMQP_URL, NODE, RunningWorker, make_disk, unique
from tests.integration.test_data_path import same_content
from tests.integration.test_live_view import (
    finished,
    rate_for,
    slow_source,
    sparse_image,
    start_copy,
)
from worker.client import (
    ExportInUse,
    NotPublished,
    ReplyTimeout,
    SchedulerClient,
    StaleGeneration,
)
from worker.messages import (
    Action,
    ExportFlushed,
    ExportReady,
    ExportReleased,
    ExportStatus,
)

pytestmark = pytest.mark.integration

MIB = 1 << 20


@pytest.fixture
async def client(worker: RunningWorker) -> AsyncIterator[SchedulerClient]:
    """Addresses the worker's node on its exchange, as a scheduler of several appliances."""
    async with await SchedulerClient.connect(
        AMQP_URL, exchange=worker.settings.exchange, node_id=NODE, timeout_s=15
    ) as client:
        yield client


async def prepared(client: SchedulerClient, disks_dir: Path) -> ExportReady:
    disk = make_disk(disks_dir, unique("disk"), b"client-bytes")
    return await client.prepare(str(uuid.uuid4()), 0, vm_name="pgtest2", device_path=str(disk))


async def test_prepare_inspect_flush_release(
    client: SchedulerClient, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    disk = make_disk(disks_dir, "vdb", b"client-bytes")
    vm = str(uuid.uuid4())

    ready = await client.prepare(
        vm.upper(), 0, vm_name="pgtest2", device_path=str(disk), planned_bytes=1024
    )
    assert isinstance(ready, ExportReady)
    assert (ready.vm_id, ready.action, ready.generation) == (vm, Action.CREATED, 1)
    assert (ready.nbd_port, ready.node_id) == (nbd_server.port, NODE)
    with NbdConnection(nbd_server.port, ready.export_name) as conn:
        assert conn.read(0, 12) == b"client-bytes"

    status = await client.inspect(vm, 0, generation=ready.generation)
    assert isinstance(status, ExportStatus)
    assert (status.export_status, status.generation) == ("active", 1)
    assert status.live is not None
    assert status.live.planned_bytes == 1024

    flushed = await client.flush(vm, 0, generation=ready.generation)
    assert isinstance(flushed, ExportFlushed)
    assert flushed.device_path == str(disk)

    released = await client.release(vm, 0, generation=ready.generation)
    assert isinstance(released, ExportReleased)
    assert (released.was_active, released.flushed, released.mode) == (True, True, "safe")
    assert (await client.inspect(vm, 0)).export_status == "released"


async def test_a_safe_release_with_a_connection_open_is_export_in_use(
    worker: RunningWorker, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    # Straight to the request queue this time, as with a single appliance.
    async with await SchedulerClient.connect(
        AMQP_URL, request_queue=worker.settings.request_queue, timeout_s=15
    ) as client:
        ready = await prepared(client, disks_dir)
        with (
            NbdConnection(nbd_server.port, ready.export_name),
            pytest.raises(ExportInUse) as raised,
        ):
            await client.release(ready.vm_id, 0, generation=ready.generation)
        assert len(raised.value.connections) == 1
        assert raised.value.connections[0].client_address == "127.0.0.1"
        released = await client.release(ready.vm_id, 0, generation=ready.generation)
        assert released.was_active


async def test_a_second_prepare_makes_the_first_generation_stale(
    client: SchedulerClient, disks_dir: Path
) -> None:
    first = await prepared(client, disks_dir)
    second = await client.prepare(first.vm_id, 0, vm_name="pgtest2", device_path=first.device_path)
    assert (second.generation, second.action) == (first.generation + 1, Action.REUSED)
    for call in (client.inspect, client.flush, client.release):
        with pytest.raises(StaleGeneration):
            await call(first.vm_id, 0, generation=first.generation)
    status = await client.inspect(first.vm_id, 0, generation=second.generation)
    assert status.export_status == "active"


async def test_no_consumer_is_a_reply_timeout(amqp: AbstractConnection) -> None:
    nobody = unique("test.nobody-consumes")
    channel = await amqp.channel()
    await channel.declare_queue(nobody, auto_delete=False)
    try:
        async with await SchedulerClient.connect(AMQP_URL, request_queue=nobody) as client:
            started = asyncio.get_running_loop().time()
            with pytest.raises(ReplyTimeout, match="inspect-export"):
                await client.inspect(str(uuid.uuid4()), 0, timeout_s=1)
            assert asyncio.get_running_loop().time() - started < 3
    finally:
        await channel.queue_delete(nobody)
        await channel.close()


async def test_a_node_nobody_serves_is_not_published(worker: RunningWorker) -> None:
    async with await SchedulerClient.connect(
        AMQP_URL, exchange=worker.settings.exchange, node_id="no-such-node", timeout_s=5
    ) as client:
        with pytest.raises(NotPublished, match=r"inspect-export\.no-such-node"):
            await client.inspect(str(uuid.uuid4()), 0)


@pytest.mark.slow
async def test_a_lease_is_renewed_while_held_and_released_on_exit(
    client: SchedulerClient, disks_dir: Path, tmp_path: Path
) -> None:
    """client.lease() around an nbdcopy that lasts three lease lengths: renewed all along
    (never fenced, never lost), the copy byte-identical, released (drain) on exit."""
    disk = disks_dir / "leased"
    disk.write_bytes(b"\xee" * (32 * MIB))
    image = tmp_path / "source.img"
    data = sparse_image(image, 32 * MIB, data_every=4 * MIB)
    vm = str(uuid.uuid4())
    lease = client.lease(vm, 0, vm_name="pgtest2", device_path=str(disk), lease_s=5)
    async with lease as ready:
        assert ready.lease_expires_at is not None
        seen = [ready.lease_expires_at]
        uri = f"nbd://{ready.nbd_host}:{ready.nbd_port}/{ready.export_name}"
        with slow_source(image, tmp_path / "src.sock", rate_for(data, 15), 0.5) as source:
            copy = await start_copy(source, uri, connections=2)
            while copy.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(copy.wait(), 2.5)
                status = await client.inspect(vm, 0)
                assert (status.export_status, status.fenced) == ("active", False), status
                assert status.lease_expires_at is not None
                seen.append(status.lease_expires_at)
            await finished(copy)
        assert not lease.lost.is_set()
        assert same_content(image, disk)
    assert seen[-1] > seen[0], "the lease must move forward"
    assert seen == sorted(seen)
    assert lease.renewals >= 7  # every 5/3 s for ~15 s
    assert lease.released is not None
    assert (lease.released.was_active, lease.released.mode) == (True, "drain")
    assert (await client.inspect(vm, 0)).export_status == "released"


@pytest.mark.slow
async def test_a_scheduler_killed_with_sigkill_lets_its_lease_expire(
    worker: RunningWorker, disks_dir: Path
) -> None:
    """A scheduler process holding a lease (5 s) is SIGKILLed: nobody renews, so the
    export expires (fenced, flushed, released) and no client can open it any more."""
    disk = make_disk(disks_dir, "orphan")
    vm = str(uuid.uuid4())
    script = (
        "import asyncio, sys\n"
        "from worker.client import SchedulerClient\n"
        "async def main():\n"
        f"    client = await SchedulerClient.connect({AMQP_URL!r}, "
        f"exchange={worker.settings.exchange!r}, node_id={NODE!r})\n"
        f"    async with client.lease({vm!r}, 0, vm_name='x', device_path={str(disk)!r}, "
        "lease_s=5):\n"
        "        print('leased', flush=True)\n"
        "        await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    scheduler = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert scheduler.stdout is not None
        line = await asyncio.wait_for(scheduler.stdout.readline(), 30)
        assert line.strip() == b"leased"
        await asyncio.sleep(2)  # at least one renewal
    finally:
        scheduler.kill()  # SIGKILL: no release, no more renewals
        await scheduler.wait()
    async with await SchedulerClient.connect(
        AMQP_URL, exchange=worker.settings.exchange, node_id=NODE, timeout_s=15
    ) as client:
        deadline = asyncio.get_running_loop().time() + 25
        status = await client.inspect(vm, 0)
        while status.export_status == "active":
            assert asyncio.get_running_loop().time() < deadline, status
            await asyncio.sleep(0.5)
            status = await client.inspect(vm, 0)
        assert status.export_status == "released"
    ready_name = f"migration-vm-{vm}-disk0"
    with pytest.raises(NbdError):
        NbdConnection(worker.settings.nbd_port, ready_name)


async def test_a_lease_taken_over_is_lost_and_left_to_its_new_holder(
    client: SchedulerClient, disks_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="worker.client")
    disk = make_disk(disks_dir, "taken")
    lease = client.lease(str(uuid.uuid4()), 0, vm_name="pgtest2", device_path=str(disk), lease_s=5)
    async with lease as ready:
        # Another scheduler prepares the disk: the renewal's generation is stale now.
        await client.prepare(ready.vm_id, 0, vm_name="pgtest2", device_path=str(disk))
        await asyncio.wait_for(lease.lost.wait(), 5)
        assert lease.lost_reason is not None
        assert lease.lost_reason.startswith("taken over")
    assert lease.released is None  # the release was fenced off too
    assert (await client.inspect(ready.vm_id, 0)).export_status == "active"
    assert "Lease lost" in caplog.text
    assert "stale_generation" in caplog.text


async def test_a_lease_left_with_a_client_connected_raises_the_block_s_error(
    client: SchedulerClient,
    nbd_server: NbdServerProcess,
    disks_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="worker.client")
    disk = make_disk(disks_dir, "busy")
    lease = client.lease(
        str(uuid.uuid4()), 0, vm_name="pgtest2", device_path=str(disk), lease_s=60,
        release_wait_s=0.5,
    )  # fmt: skip
    held: list[NbdConnection] = []

    async def a_copy_that_fails() -> None:
        async with lease as ready:
            held.append(NbdConnection(nbd_server.port, ready.export_name))
            raise RuntimeError("the block's own error")

    with pytest.raises(RuntimeError, match="the block's own"):
        await a_copy_that_fails()
    held[0].close()
    assert lease.released is None
    assert "export_in_use" in caplog.text
    assert lease.ready is not None
    status = await client.inspect(lease.ready.vm_id, 0)
    assert (status.export_status, status.fenced) == ("active", True)  # drained: still fenced


async def test_a_request_outlives_a_dropped_connection(
    worker: RunningWorker, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    """A drain release is in flight when the connection drops: the client reconnects,
    publishes it again with its new reply queue, and takes the (identical) answer."""
    proxy = TcpProxy("127.0.0.1", 5672, record=False)
    port = await proxy.start()
    try:
        async with await SchedulerClient.connect(
            f"amqp://guest:guest@127.0.0.1:{port}/",
            request_queue=worker.settings.request_queue,
            timeout_s=20,
        ) as client:
            ready = await prepared(client, disks_dir)
            conn = NbdConnection(nbd_server.port, ready.export_name)
            release = asyncio.create_task(
                client.release(ready.vm_id, 0, mode="drain", wait_s=15, job_id=unique("rel"))
            )
            await asyncio.sleep(0.5)  # the worker is draining
            proxy.cut()
            async with asyncio.timeout(10):
                while client.reconnects == 0:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # the job is published again
            conn.close()
            released = await release
            assert (released.was_active, released.mode) == (True, "drain")
            assert (await client.inspect(ready.vm_id, 0)).export_status == "released"
    finally:
        await proxy.stop()
