"""The worker on real clusters (harness/clusters/): three RabbitMQ nodes with the request
queue a quorum queue of three members, and three Galera nodes behind HAProxy. Every job
path, `migrate` from three nodes at once, two appliances writing through two Galera nodes
at once, and the loss of the broker node the worker uses, of the quorum queue's leader
and of the Galera node the worker uses (rows of the fault table).

The clusters start once for this module (about a minute) and every test leaves them whole.

Over 400 lines (budget 630) as one capability's tests, with the helpers they share.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiomysql
import pymysql
import pytest
from aio_pika.abc import AbstractConnection
from pydantic import AnyUrl

from bench.soak import soak
from harness.clusters import GaleraCluster, RabbitCluster, galera_cluster, rabbit_cluster
from harness.nbd import NbdConnection, NbdServerProcess, wait_for
from harness.sql import execute_sql
from harness.worker_process import worker_settings
from tests.conftest import NODE, delete_broker_objects, job, make_disk, running_worker, unique
from tests.fault_run import (
    FaultRun,
    Held,
    assert_all_ready,
    check_consistent,
    held_export,
    publish_mix,
)
from worker.errors import TransactionConflict
from worker.repository import migrate, migrations_dir, translate_error
from worker.settings import Settings
from worker.topology import request_queue_arguments

# The clusters' start (about a minute) counts against the first test's time.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def clusters_root() -> Iterator[Path]:
    # Not pytest's tmp_path: the Galera nodes run as mysql, which must reach their files.
    root = Path(tempfile.mkdtemp(prefix="nbd-clusters-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def rabbit(clusters_root: Path) -> Iterator[RabbitCluster]:
    with rabbit_cluster(clusters_root) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def galera(clusters_root: Path) -> Iterator[GaleraCluster]:
    with galera_cluster(clusters_root) as cluster:
        yield cluster


@pytest.fixture
def whole(rabbit: RabbitCluster, galera: GaleraCluster) -> Iterator[None]:
    """Every node up again after a test that killed one (and HAProxy on node 1)."""
    yield
    for index in range(1, rabbit.size + 1):
        rabbit.start_node(index)
    wait_for(lambda: len(rabbit.running_nodes()) == rabbit.size, 60, "RabbitMQ whole", 0.2)
    for index in range(1, galera.size + 1):
        galera.start_node(index)
    wait_for(lambda: galera.proxy_backend() == 1, 30, "HAProxy back on galera1", 0.2)


@pytest.fixture
async def galera_db(galera: GaleraCluster) -> AsyncIterator[str]:
    """A fresh database on the cluster, migrated through HAProxy; its name."""
    name = unique("nbdcluster")
    await migrate(AnyUrl(galera.url(database=name)), node_id=NODE, timeout_s=10)
    try:
        yield name
    finally:
        await execute_sql(AnyUrl(galera.url()), f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture
async def scheduler_amqp(rabbit: RabbitCluster) -> AsyncIterator[AbstractConnection]:
    """The scheduler's connection, on node 3: the faults below never take it down."""
    connection = await aio_pika.connect(rabbit.node(3).url, timeout=10)
    async with connection:
        yield connection


def cluster_settings(
    tmp_path: Path,
    server: NbdServerProcess,
    disks: Path,
    *,
    node_id: str,
    amqp_urls: list[str],
    database_url: str,
) -> Settings:
    return worker_settings(
        server,
        tmp_path / node_id,
        disks,
        node_id=node_id,
        exchange=unique("test.exports"),
        amqp_url=",".join(amqp_urls),
        database_url=AnyUrl(database_url),
        request_queue=unique(f"test.prepare-export.{node_id}"),
        reply_queue=unique("test.export-ready"),
        probe_timeout_s=1.0,
        # As the fault suite: a job outlasts about 8 s of outage per delivery round.
        delivery_limit=5,
        job_attempts=4,
        retry_backoff_s=0.2,
        retry_backoff_max_s=1.0,
        db_connect_timeout_s=2.0,
        amqp_connect_timeout_s=2.0,
    )


async def declare_request_queue(rabbit: RabbitCluster, settings: Settings) -> None:
    """Declares the request queue from node 2, so node 2 leads it (a quorum queue starts
    its leader on the declaring node), and its dead-letter queue from node 3, the
    scheduler's, which the tests never take down."""
    dead = f"{settings.request_queue}.dead"
    queues: list[tuple[int, str, dict[str, Any]]] = [
        (3, dead, {"x-queue-type": "quorum"}),
        (2, settings.request_queue, request_queue_arguments(dead, settings.delivery_limit)),
    ]
    for index, name, arguments in queues:
        connection = await aio_pika.connect(rabbit.node(index).url, timeout=10)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(name, durable=True, arguments=arguments)


def galera_rows(galera: GaleraCluster, index: int, database: str, sql: str) -> list[list[str]]:
    """Rows of `sql` read straight from Galera node `index`."""
    node = galera.node(index)
    # wsrep_sync_wait: the read waits until this node has applied what the cluster committed.
    sql = f"SET SESSION wsrep_sync_wait = 1; {sql}"
    done = subprocess.run(
        ["mariadb", "-h127.0.0.1", f"-P{node.port}", "-uroot", "-N", "-B", database, "-e", sql],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return [line.split("\t") for line in done.stdout.splitlines()]


# --- migrate and the job paths -----------------------------------------------------------


async def test_migrate_from_three_galera_nodes_at_once(galera: GaleraCluster) -> None:
    name = unique("nbdmigrate")
    try:
        results = await asyncio.gather(
            *(
                migrate(AnyUrl(galera.url(i, name)), node_id=f"node-{i}", timeout_s=10)
                for i in (1, 2, 3)
            )
        )
        # Each migrator applies what it found missing (often all of it, at once: every
        # statement is idempotent), and between them nothing is left out...
        applied = {m for result in results for m in result}
        assert len(applied) == len(list(migrations_dir().glob("*.sql"))), results
        # ...and every node has the same schema, every table with a primary key (the
        # nodes run with innodb_force_primary_key: a table without one is refused).
        versions = [
            galera_rows(galera, i, name, "SELECT version FROM schema_migrations") for i in (1, 2, 3)
        ]
        count = len(list(migrations_dir().glob("*.sql")))
        assert versions[0] == versions[1] == versions[2] == [[str(v)] for v in range(1, count + 1)]
        again = await migrate(AnyUrl(galera.url(3, name)), node_id="node-3", timeout_s=10)
        assert again == []
    finally:
        await execute_sql(AnyUrl(galera.url()), f"DROP DATABASE IF EXISTS `{name}`")


async def job_paths(
    settings: Settings,
    scheduler_amqp: AbstractConnection,
    server: NbdServerProcess,
    disks: Path,
    tag: str,
) -> list[dict[str, Any]]:
    """Creates (3 at once), a reuse, a relink, a flush and a release on one appliance;
    every reply in order."""
    run = await FaultRun.start(scheduler_amqp, settings)
    scheduler = run.scheduler
    replies: list[dict[str, Any]] = []
    try:
        requests = [
            job(device=make_disk(disks, f"{tag}{i}", f"{tag}-disk-{i}".encode())) for i in range(3)
        ]
        replies += await asyncio.gather(*(scheduler.request(r, 60) for r in requests))
        first = requests[0]
        replies.append(await scheduler.request({**first, "job_id": unique("reuse")}, 60))
        moved = make_disk(disks, f"{tag}-moved", f"{tag}-moved!".encode())
        replies.append(
            await scheduler.request(
                {**first, "job_id": unique("relink"), "device_path": str(moved)}, 60
            )
        )
        disk_job = {"vm_id": first["vm_id"], "disk_unit_number": 0}
        replies.append(
            await scheduler.request(
                {"type": "flush-export", "job_id": unique("flush"), **disk_job}, 60
            )
        )
        second = requests[1]
        replies.append(
            await scheduler.request(
                {
                    "type": "release-export",
                    "job_id": unique("release"),
                    "vm_id": second["vm_id"],
                    "disk_unit_number": 0,
                },
                60,
            )
        )
        # The relink took: new connections to the first export read the moved disk.
        with NbdConnection(server.port, replies[0]["export_name"]) as conn:
            assert conn.read(0, len(tag) + 7) == f"{tag}-moved!".encode()
    finally:
        await scheduler.channel.close()
    return replies


async def test_every_job_path_with_two_appliances_writing_through_two_galera_nodes(
    tmp_path: Path,
    rabbit: RabbitCluster,
    galera: GaleraCluster,
    galera_db: str,
    scheduler_amqp: AbstractConnection,
) -> None:
    appliances = []
    for index, node_id in ((1, "appliance-a"), (2, "appliance-b")):
        root = tmp_path / node_id
        root.mkdir()
        disks = root / "disks"
        disks.mkdir()
        server_cm = NbdServerProcess.running(root / "nbd")
        server = server_cm.__enter__()
        settings = cluster_settings(
            root, server, disks, node_id=node_id,
            amqp_urls=rabbit.urls, database_url=galera.url(index, galera_db),
        )  # fmt: skip
        appliances.append((settings, server, server_cm, disks))
    try:
        async with running_worker(appliances[0][0]), running_worker(appliances[1][0]):
            for settings, *_ in appliances:
                _, members = rabbit.queue_leader(settings.request_queue)
                assert members == [1, 2, 3], "the request queue is replicated on every node"
            results = await asyncio.gather(
                *(
                    job_paths(settings, scheduler_amqp, server, disks, f"t{i}")
                    for i, (settings, server, _, disks) in enumerate(appliances)
                )
            )
        for (settings, *_), replies in zip(appliances, results, strict=True):
            assert [r.get("action") or r["status"] for r in replies] == [
                "created", "created", "created", "reused", "relinked", "flushed", "released",
            ]  # fmt: skip
            assert all(r["node_id"] == settings.node_id for r in replies)
            await check_consistent(settings)
        # Every Galera node holds both appliances' rows: one active mapping per device.
        for index in (1, 2, 3):
            rows = galera_rows(
                galera, index, galera_db,
                "SELECT node_id, status, COUNT(*) FROM vm_export_mappings"
                " GROUP BY node_id, status ORDER BY node_id, status",
            )  # fmt: skip
            assert rows == [
                ["appliance-a", "active", "2"], ["appliance-a", "inactive", "1"],
                ["appliance-b", "active", "2"], ["appliance-b", "inactive", "1"],
            ]  # fmt: skip
    finally:
        for *_, server_cm, _ in appliances:
            server_cm.__exit__(None, None, None)


# --- losing a node ------------------------------------------------------------------------


@pytest.fixture
async def cluster_worker_settings(
    tmp_path: Path,
    rabbit: RabbitCluster,
    galera: GaleraCluster,
    galera_db: str,
    nbd_server: NbdServerProcess,
    disks_dir: Path,
) -> Settings:
    """One appliance: broker nodes 1, 2, 3 in that order (it connects to node 1), its
    request queue led by node 2, the database through HAProxy (on galera1)."""
    settings = cluster_settings(
        tmp_path, nbd_server, disks_dir, node_id=NODE,
        amqp_urls=rabbit.urls, database_url=galera.url(database=galera_db),
    )  # fmt: skip
    await declare_request_queue(rabbit, settings)
    assert rabbit.queue_leader(settings.request_queue) == (2, [1, 2, 3])
    return settings


@pytest.fixture
async def cluster_held(
    cluster_worker_settings: Settings,
    scheduler_amqp: AbstractConnection,
    nbd_server: NbdServerProcess,
    disks_dir: Path,
) -> AsyncIterator[Held]:
    held = await held_export(cluster_worker_settings, scheduler_amqp, disks_dir, nbd_server.port)
    try:
        yield held
    finally:
        held.close()


async def after_replies(run: FaultRun, count: int) -> None:
    while len(run.scheduler.replies) < count:
        await asyncio.sleep(0.01)


async def fault_row(
    settings: Settings,
    scheduler_amqp: AbstractConnection,
    disks_dir: Path,
    held: Held,
    fault: str,
    inject: Callable[[], Awaitable[None]],
) -> tuple[FaultRun, float]:
    """Runs 30 creates and 30 reuses with the worker, calls `inject()` (a coroutine
    function) once 10 are answered, and records the row."""
    run = await FaultRun.start(scheduler_amqp, settings)
    try:
        async with running_worker(settings) as worker:
            await publish_mix(run, disks_dir, held.request, uuid.uuid4().hex[:6], 30)
            await after_replies(run, 10)
            in_flight = len(run.sent) - len(run.scheduler.replies)
            await inject()
            row = await run.row(fault, held)
            reconnects = worker.sample("nbd_export_broker_reconnects_total")
    finally:
        await run.scheduler.channel.close()
    assert in_flight > 0, "the fault came after every job was answered"
    assert row.lost == 0, row
    assert row.held_connection == "survived"
    assert_all_ready(run.scheduler)
    await check_consistent(settings)
    return run, reconnects


async def test_rabbitmq_node_the_worker_uses_killed(
    whole: None,
    rabbit: RabbitCluster,
    cluster_worker_settings: Settings,
    scheduler_amqp: AbstractConnection,
    disks_dir: Path,
    cluster_held: Held,
) -> None:
    settings = cluster_worker_settings  # led by node 2: this kills only the worker's node

    async def kill() -> None:
        rabbit.kill_node(1)

    _, reconnects = await fault_row(
        settings, scheduler_amqp, disks_dir, cluster_held,
        "RabbitMQ node killed (the one the worker uses; 3-node cluster)", kill,
    )  # fmt: skip
    assert reconnects >= 1


async def test_quorum_leader_killed(
    whole: None,
    rabbit: RabbitCluster,
    cluster_worker_settings: Settings,
    scheduler_amqp: AbstractConnection,
    disks_dir: Path,
    cluster_held: Held,
) -> None:
    settings = cluster_worker_settings

    async def kill() -> None:
        rabbit.kill_node(2)  # the worker stays connected to node 1

    await fault_row(
        settings, scheduler_amqp, disks_dir, cluster_held,
        "quorum queue leader killed (not the worker's node)", kill,
    )  # fmt: skip
    leader, _ = rabbit.queue_leader(settings.request_queue)
    assert leader in (1, 3)


async def test_galera_node_the_worker_uses_killed(
    whole: None,
    galera: GaleraCluster,
    cluster_worker_settings: Settings,
    scheduler_amqp: AbstractConnection,
    disks_dir: Path,
    cluster_held: Held,
) -> None:
    assert galera.proxy_backend() == 1

    async def kill() -> None:
        galera.kill_node(1)

    await fault_row(
        cluster_worker_settings, scheduler_amqp, disks_dir, cluster_held,
        "Galera node killed (the one the worker uses, behind HAProxy)", kill,
    )  # fmt: skip
    assert galera.proxy_backend() == 2


#: How long the reply queue's election is held open after its leader is killed: long
#: enough that the worker reconnects, takes redelivered jobs and publishes their replies
#: while the queue has no leader, which is what makes a channel nack for good.
ELECTION_HELD_S = 4.0
#: Jobs published at once before the kill; at least this many are still unanswered then.
BURST = 60
IN_FLIGHT_AT_KILL = 40


@pytest.mark.parametrize(
    "variant",
    ["node kept down", "node back", "node kept down, Galera writer killed too"],
)
async def test_leader_of_the_request_and_reply_queues_killed_with_a_burst_in_flight(
    whole: None,
    variant: str,
    tmp_path: Path,
    rabbit: RabbitCluster,
    galera: GaleraCluster,
    galera_db: str,
    nbd_server: NbdServerProcess,
    disks_dir: Path,
    scheduler_amqp: AbstractConnection,
) -> None:
    """The worker on node 2, which leads both the request queue and the scheduler's durable
    quorum reply queue (the scheduler publishes on node 3, takes replies on node 1); 60
    jobs published at once; node 2 killed with at least 40 of them
    unanswered, and the reply queue's election held open for 4 s (its member on node 3
    suspended), so the worker, reconnected to node 1, publishes replies while the queue
    has no leader: every one of them is nacked, and a channel first used then stays
    nacked after the election (RELIABILITY.md). Node 2 stays down until every job is
    answered, or comes back, or goes down with the Galera node the worker writes to.
    Every job is answered, none is dead-lettered."""
    settings = cluster_settings(
        tmp_path, nbd_server, disks_dir, node_id=NODE,
        amqp_urls=[rabbit.node(i).url for i in (2, 1, 3)],  # it connects to node 2
        database_url=galera.url(database=galera_db),
    )  # fmt: skip
    await declare_request_queue(rabbit, settings)
    held = await held_export(settings, scheduler_amqp, disks_dir, nbd_server.port)
    replies = unique("test.quorum-replies")
    connection = await aio_pika.connect(rabbit.node(2).url, timeout=10)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(replies, durable=True, arguments={"x-queue-type": "quorum"})
    assert rabbit.queue_leader(replies) == (2, [1, 2, 3])
    assert rabbit.queue_leader(settings.request_queue) == (2, [1, 2, 3])
    run = await FaultRun.start(scheduler_amqp, settings)
    # The scheduler takes its replies on node 1: a quorum queue delivers to a consumer
    # through the member on the consumer's node, and node 3's is the one suspended.
    reply_connection = await aio_pika.connect(rabbit.node(1).url, timeout=10)
    queue = await (await reply_connection.channel()).declare_queue(replies, passive=True)
    await queue.consume(run.scheduler._on_reply, no_ack=True)
    run.scheduler.reply_queue_name = replies
    rabbit.pause_member(3, replies, paused=True)
    paused = True
    try:
        async with running_worker(settings) as worker:
            tag = uuid.uuid4().hex[:6]
            burst = [job(device=make_disk(disks_dir, f"{tag}{i}")) for i in range(BURST // 2)]
            burst += [{**held.request, "job_id": f"reuse-{tag}{i}"} for i in range(BURST // 2)]
            await asyncio.gather(*(run.publish(body) for body in burst))
            await after_replies(run, 1)
            in_flight = len(run.sent) - len(run.scheduler.replies)
            rabbit.kill_node(2)
            if "Galera" in variant:
                galera.kill_node(1)
            await asyncio.sleep(ELECTION_HELD_S)
            if variant == "node back":
                await asyncio.to_thread(rabbit.start_node, 2)
            rabbit.pause_member(3, replies, paused=False)
            paused = False
            row = await run.row(
                f"leader of the request and reply queues killed, {BURST} jobs at once, "
                f"election held {ELECTION_HELD_S:g} s; {variant}",
                held,
            )
            nacks = worker.sample("nbd_export_publish_retries_total", {"reason": "nack"})
            assert len(rabbit.running_nodes()) == (3 if variant == "node back" else 2)
        new_leader = rabbit.queue_leader(replies)[0]
    finally:
        if paused:
            rabbit.pause_member(3, replies, paused=False)
        await run.scheduler.channel.close()
        await reply_connection.close()
        await delete_broker_objects(scheduler_amqp, [replies], [])
        held.close()
    assert in_flight >= IN_FLIGHT_AT_KILL, "the burst was answered before the kill"
    # The row did what it is for: replies were published while the queue had no leader.
    assert nacks > 0, "no reply met the election: the row proves nothing"
    assert row.lost == 0, row
    assert row.dead_lettered == 0, row
    assert row.held_connection == "survived"
    assert_all_ready(run.scheduler)
    assert new_leader in ((1, 2, 3) if variant == "node back" else (1, 3))
    await check_consistent(settings)


async def test_soak_smoke(
    whole: None, tmp_path: Path, rabbit: RabbitCluster, galera: GaleraCluster
) -> None:
    """bench/soak.py for a minute, a fault about every 10 s (the hour-long run is in
    RELIABILITY.md): every invariant holds, through faults of different kinds."""
    result = await soak(tmp_path / "soak", rabbit, galera, 60, 10, seed=1)
    assert result["ok"], result
    assert result["lost"] == 0
    kinds = [kind for kind, count in result["fault_kinds"].items() if count]
    assert len(kinds) >= 2, result["fault_log"]
    assert all(count <= 1 for count in result["fault_kinds"].values())  # a deck, not a die
    assert result["jobs"] > 500
    assert {"created", "reused", "relinked", "released", "flushed"} <= set(result["by_outcome"])


def test_the_clusters_command_reports_health_and_down_is_idempotent(
    clusters_root: Path, rabbit: RabbitCluster, galera: GaleraCluster, tmp_path: Path
) -> None:
    """scripts/clusters.sh (python -m harness.clusters) reads the state the clusters keep."""
    command = [sys.executable, "-m", "harness.clusters", "--root", str(clusters_root), "status"]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
    status = json.loads(done.stdout)
    assert len(status["rabbitmq"]["running_nodes"]) == 3
    assert [n["state"] for n in status["galera"]["nodes"]] == ["Synced"] * 3
    assert status["galera"]["proxy"]["url"] == galera.url()
    empty = tmp_path / "nothing-here"
    for _ in range(2):
        down = [sys.executable, "-m", "harness.clusters", "--root", str(empty), "down"]
        assert subprocess.run(down, capture_output=True, timeout=60).returncode == 0


async def test_a_certification_conflict_is_a_deadlock_that_is_retried(
    galera: GaleraCluster, galera_db: str
) -> None:
    """Two nodes commit changes to one row: the second to commit fails certification, which
    Galera reports as a deadlock (1213) at COMMIT; the worker's error mapping makes it a
    conflict its transactions retry (tests/unit/test_edges.py: they retry only those)."""
    first = await aiomysql.connect(
        host="127.0.0.1", port=galera.node(1).port, user="root", db=galera_db
    )
    second = await aiomysql.connect(
        host="127.0.0.1", port=galera.node(2).port, user="root", db=galera_db
    )
    try:
        async with first.cursor() as cur:
            await cur.execute("CREATE TABLE certify (id INT PRIMARY KEY, n INT)")
            await cur.execute("INSERT INTO certify VALUES (1, 0)")
            await first.commit()
        async with second.cursor() as cur:
            await cur.execute("SET SESSION wsrep_sync_wait = 1")
            await cur.execute("SELECT n FROM certify WHERE id = 1")
        for conn, value in ((first, 1), (second, 2)):
            await conn.begin()
            async with conn.cursor() as cur:
                await cur.execute("UPDATE certify SET n = %s WHERE id = 1", (value,))
        await first.commit()
        with pytest.raises(pymysql.err.OperationalError) as failed:
            await second.commit()
    finally:
        first.close()
        second.close()
    assert failed.value.args[0] == 1213, failed.value
    assert isinstance(translate_error(failed.value), TransactionConflict)
