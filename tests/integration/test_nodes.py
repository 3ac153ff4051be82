"""Several appliances (nodes) sharing one broker and one database, on one machine: each
with its own nbd-server, its own directories and its own request queue."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aio_pika.abc import AbstractConnection
from pydantic import AnyUrl

from harness.nbd import NbdServerProcess
from harness.sql import execute_sql
from harness.tcp_proxy import TcpProxy
from harness.worker_process import WorkerProcess
from tests.conftest import (
    AMQP_URL,
    MYSQL_URL,
    Scheduler,
    delete_broker_objects,
    job,
    make_disk,
    running_worker,
    unique,
)
from worker.repository import migrate, migrations_dir
from worker.settings import Settings

pytestmark = pytest.mark.integration


@dataclass
class Node:
    settings: Settings
    server: NbdServerProcess


def node_settings(base: Settings, node_id: str, server: NbdServerProcess, root: Path) -> Settings:
    return base.model_copy(
        update={
            "node_id": node_id,
            "request_queue": unique(f"test.prepare-export.{node_id}"),
            "nbd_conf_dir": server.conf_dir,
            "nbd_config_file": server.config_file,
            "nbd_pid_file": server.pid_file,
            "nbd_port": server.port,
            "link_dir": root / "links",
        }
    )


@pytest.fixture
async def nodes(
    settings: Settings, nbd_server: NbdServerProcess, tmp_path: Path, amqp: AbstractConnection
) -> AsyncIterator[dict[str, Node]]:
    server_b = NbdServerProcess(tmp_path / "nbd-b")
    server_b.root.mkdir()
    server_b.start()
    a = Node(node_settings(settings, "a", nbd_server, tmp_path / "a"), nbd_server)
    b = Node(node_settings(settings, "b", server_b, tmp_path / "b"), server_b)
    try:
        yield {"a": a, "b": b}
    finally:
        server_b.stop()
        queues = [n.settings.request_queue for n in (a, b)]
        await delete_broker_objects(amqp, queues + [f"{q}.dead" for q in queues], [])


async def test_jobs_are_served_by_the_node_they_are_routed_to(
    nodes: dict[str, Node], amqp: AbstractConnection, disks_dir: Path
) -> None:
    a, b = nodes["a"], nodes["b"]
    async with running_worker(a.settings), running_worker(b.settings):
        scheduler = Scheduler(await amqp.channel(), a.settings.request_queue)
        await scheduler.start()
        exchange = a.settings.exchange
        vm = str(uuid.uuid4())
        disk = make_disk(disks_dir, "same-path-on-both")
        on_a = await scheduler.reply(
            await scheduler.publish(
                job(vm, 0, disk), exchange=exchange, routing_key="prepare-export.a"
            )
        )
        # The same VM, disk and device path on the other appliance: an independent mapping.
        on_b = await scheduler.reply(
            await scheduler.publish(
                job(vm, 0, disk), exchange=exchange, routing_key="prepare-export.b"
            )
        )
        await scheduler.channel.close()
    assert (on_a["status"], on_a["action"], on_a["node_id"]) == ("ready", "created", "a")
    assert (on_b["status"], on_b["action"], on_b["node_id"]) == ("ready", "created", "b")
    assert on_a["nbd_port"] == a.server.port
    assert on_b["nbd_port"] == b.server.port
    name = f"migration-vm-{vm}-disk0"
    assert a.server.knows(name)
    assert b.server.knows(name)
    rows = await fetch(
        a.settings, "SELECT node_id, vm_id, status FROM vm_export_mappings ORDER BY node_id"
    )
    assert rows == [("a", vm, "active"), ("b", vm, "active")]


@pytest.mark.slow  # 200 jobs, a worker process killed and another started
async def test_two_hundred_jobs_over_two_nodes_with_a_worker_killed_midway(
    nodes: dict[str, Node], amqp: AbstractConnection, disks_dir: Path
) -> None:
    a, b = nodes["a"], nodes["b"]
    procs = {"a": WorkerProcess(a.settings), "b": WorkerProcess(b.settings)}

    await procs["a"].start()
    await procs["b"].start()
    scheduler = Scheduler(await amqp.channel(), a.settings.request_queue)
    await scheduler.start()
    routed: dict[str, str] = {}
    try:
        for i in range(200):
            target = "a" if i % 2 == 0 else "b"
            corr = await scheduler.publish(
                job(device=make_disk(disks_dir, f"d{i}")),
                exchange=a.settings.exchange,
                routing_key=f"prepare-export.{target}",
            )
            routed[corr] = target

        def answered_by_a() -> int:
            return sum(1 for r in scheduler.replies.values() if r.get("node_id") == "a")

        deadline = asyncio.get_running_loop().time() + 30
        while answered_by_a() < 10:
            assert asyncio.get_running_loop().time() < deadline, "node a answered nothing"
            await asyncio.sleep(0.005)
        assert procs["a"].proc is not None
        procs["a"].proc.send_signal(signal.SIGKILL)  # mid-run, whatever it is doing
        assert await procs["a"].wait() == -signal.SIGKILL
        # Node b goes on meanwhile; what matters is that a had jobs left when it died.
        a_before_restart = answered_by_a()
        procs["a"] = WorkerProcess(a.settings)
        await procs["a"].start()
        replies = await asyncio.gather(*(scheduler.reply(c, timeout_s=120) for c in routed))
    finally:
        for proc in procs.values():
            await proc.stop()
        await scheduler.channel.close()

    assert a_before_restart < 100, "the kill came too late to test anything"
    lost = [c for c in routed if c not in scheduler.replies]
    assert lost == []
    failed = [r for r in replies if r["status"] != "ready"]
    assert failed == []
    for corr, reply in zip(routed, replies, strict=True):
        assert reply["node_id"] == routed[corr]
    servers = {"a": a.server, "b": b.server}
    for corr, reply in zip(routed, replies, strict=True):
        here, there = routed[corr], "b" if routed[corr] == "a" else "a"
        assert servers[here].knows(reply["export_name"])
        assert not servers[there].knows(reply["export_name"])
    for node in (a, b):
        snippets = {p.name for p in node.settings.nbd_conf_dir.glob("migration-vm-*.conf")}
        assert len(snippets) == 100, node.settings.node_id


async def test_broker_failover_to_the_next_url(
    settings: Settings, amqp: AbstractConnection, disks_dir: Path
) -> None:
    proxy = TcpProxy("127.0.0.1", 5672)
    port = await proxy.start()
    via_proxy = AMQP_URL.replace(":5672", f":{port}")
    failover = settings.model_copy(update={"amqp_url": f"{via_proxy},{AMQP_URL}"})
    try:
        async with running_worker(failover) as worker:
            scheduler = Scheduler(await amqp.channel(), settings.request_queue)
            await scheduler.start()
            first = await scheduler.request(job(device=make_disk(disks_dir, "f1")))
            await proxy.stop()  # the first broker goes away
            second = await scheduler.request(job(device=make_disk(disks_dir, "f2")), timeout_s=60)
            await scheduler.channel.close()
            reconnects = worker.sample("nbd_export_broker_reconnects_total")
    finally:
        await proxy.stop()
    assert first["status"] == "ready"
    assert second["status"] == "ready"
    assert reconnects == 1


async def test_a_single_node_database_is_upgraded_with_its_mappings(tmp_path: Path) -> None:
    name = unique("nbdupgrade")
    url = AnyUrl(f"{MYSQL_URL}/{name}")
    only_first = tmp_path / "migrations"
    only_first.mkdir()
    first = migrations_dir() / "0001_vm_export_mappings.sql"
    (only_first / first.name).write_text(first.read_text())
    try:
        assert await migrate(url, node_id="ignored", timeout_s=5, directory=only_first) == [
            first.name
        ]
        await execute_sql(
            url,
            "INSERT INTO vm_export_mappings (vm_id, disk_unit_number, vm_name, export_name, "
            "device_path, device_id) VALUES "
            "('4205784a-098a-40f1-1f1e-a5cd2597fd59', 0, 'pg', 'e0', '/dev/vdb', 'blk:8:16'),"
            "('4205784a-098a-40f1-1f1e-a5cd2597fd59', 1, 'pg', 'e1', '/dev/vdc', 'blk:8:32')",
        )
        assert await migrate(url, node_id="appliance-1", timeout_s=5) == [
            "0002_node_id.sql",
            "0003_export_jobs.sql",
            "0004_flush_error.sql",
            "0005_client_addresses.sql",
            "0006_export_usage.sql",
            "0007_leases.sql",
            "0008_export_checksums.sql",
        ]
        rows = await execute_sql(
            url,
            "SELECT node_id, vm_id, disk_unit_number, export_name, device_path, status "
            "FROM vm_export_mappings ORDER BY disk_unit_number",
        )
        assert rows == [
            ("appliance-1", "4205784a-098a-40f1-1f1e-a5cd2597fd59", 0, "e0", "/dev/vdb", "active"),
            ("appliance-1", "4205784a-098a-40f1-1f1e-a5cd2597fd59", 1, "e1", "/dev/vdc", "active"),
        ]
        keys = {row[2] for row in await execute_sql(url, "SHOW INDEX FROM vm_export_mappings")}
        assert {"uq_node_vm_disk", "uq_node_export_name", "uq_node_active_device_id"} <= keys
        assert not keys & {"uq_vm_disk", "uq_export_name", "uq_active_device_id"}
    finally:
        await execute_sql(AnyUrl(f"{MYSQL_URL}/mysql"), f"DROP DATABASE IF EXISTS `{name}`")


async def fetch(settings: Settings, sql: str) -> list[tuple[object, ...]]:
    return await execute_sql(settings.database_url, sql)
