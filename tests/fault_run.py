"""What the fault suites share: the jobs of one fault run and their row of the fault
table, the connection held through a fault, and the consistency check after it
(tests/integration/test_faults.py, test_clusters.py; bench/soak.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractConnection

from harness.held import HELD_BYTES as HELD_BYTES
from harness.held import Held as Held
from harness.held import check_consistent as check_consistent
from harness.tcp_proxy import TcpProxy
from tests.conftest import (
    DEAD_LETTERED_CODES,
    Scheduler,
    job,
    make_disk,
    running_worker,
    scheduler_for,
    take_dead_letters,
)
from tests.fault_table import ROWS, FaultRow
from worker.metrics import build_metrics
from worker.nbd.server import NbdServer
from worker.reconcile import reconcile
from worker.repository import Repository
from worker.settings import Settings

#: The fault suite's settings: per delivery, four tries 0.2, 0.4 and 0.8 s apart (plus
#: jitter); six deliveries: a job outlasts about 8 s of outage, where the faults last 1 to
#: 2 s and a worker starting may fail a probe or two.
FAULT_SETTINGS: dict[str, Any] = {
    "probe": "native",
    "probe_timeout_s": 1.0,
    "delivery_limit": 5,
    "job_attempts": 4,
    "retry_backoff_s": 0.2,
    "retry_backoff_max_s": 1.0,
}


class FaultRun:
    """One fault's jobs: publishes them, waits for replies, counts dead letters."""

    def __init__(self, amqp: AbstractConnection, scheduler: Scheduler, settings: Settings) -> None:
        self.amqp = amqp
        self.scheduler = scheduler
        self.settings = settings
        self.sent: dict[str, dict[str, Any] | bytes] = {}

    @classmethod
    async def start(cls, amqp: AbstractConnection, settings: Settings) -> FaultRun:
        return cls(amqp, await scheduler_for(amqp, settings), settings)

    async def publish(self, body: dict[str, Any] | bytes) -> str:
        corr = await self.scheduler.publish(body)
        self.sent[corr] = body
        return corr

    async def replies(self, timeout_s: float = 90) -> dict[str, dict[str, Any]]:
        """Every sent job's reply; a job with none by the timeout counts as lost."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while any(c not in self.scheduler.replies for c in self.sent) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return {c: self.scheduler.replies[c] for c in self.sent if c in self.scheduler.replies}

    async def replies_to(self, corrs: list[str], timeout_s: float = 30) -> None:
        for corr in corrs:
            await self.scheduler.reply(corr, timeout_s)

    async def row(self, fault: str, held: Held | None) -> FaultRow:
        replies = await self.replies()
        expected = [
            r for r in replies.values() if r.get("error", {}).get("code") in DEAD_LETTERED_CODES
        ]
        dead = await take_dead_letters(
            self.amqp, self.settings.request_queue, at_least=len(expected)
        )
        row = FaultRow(
            fault=fault,
            sent=len(self.sent),
            replied=len(replies),
            dead_lettered=len(dead),
            held_connection=(
                "n/a (server killed)" if held is None else "survived" if held.survived() else "LOST"
            ),
        )
        ROWS.append(row)
        return row


async def publish_mix(
    run: FaultRun, disks_dir: Path, held_request: dict[str, Any], tag: str, pairs: int
) -> None:
    """`pairs` creates of new disks, each with a reuse of the held export."""
    for i in range(pairs):
        await run.publish(job(device=make_disk(disks_dir, f"{tag}{i}")))
        await run.publish({**held_request, "job_id": f"reuse-{tag}{i}"})


async def cut_after_some_replies(proxy: TcpProxy, run: FaultRun, outage_s: float) -> None:
    """Once a few jobs are answered, drops the proxied connections and refuses new ones
    for `outage_s`, then lets them through again (on the same port)."""
    while len(run.scheduler.replies) < 10:
        await asyncio.sleep(0.01)
    await proxy.stop()
    await asyncio.sleep(outage_s)
    await proxy.start()


def assert_all_ready(scheduler: Scheduler) -> None:
    replies = list(scheduler.replies.values())
    assert [r["error"] for r in replies if r["status"] != "ready"] == []


async def repaired_and_consistent(settings: Settings) -> None:
    """Reconciliation, then the consistency check: nothing may stay half-made."""
    repository = await Repository.connect(
        settings.database_url, node_id=settings.node_id, pool_size=1, timeout_s=5
    )
    try:
        await reconcile(
            repository, NbdServer(settings, build_metrics(settings.node_id)), dry_run=False
        )
    finally:
        await repository.close()
    await check_consistent(settings)


async def held_export(
    settings: Settings, amqp: AbstractConnection, disks_dir: Path, port: int
) -> Held:
    """An export made by a worker that is then stopped, with a client connected to it."""
    async with running_worker(settings):
        scheduler = await scheduler_for(amqp, settings)
        request = job(device=make_disk(disks_dir, "held", HELD_BYTES))
        reply = await scheduler.request(request, 60)
        await scheduler.channel.close()
    assert reply["status"] == "ready", reply
    return Held(port, reply["export_name"], request)
