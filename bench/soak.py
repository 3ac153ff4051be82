"""The soak: the worker, as a process of its own, against the clusters (harness/clusters/:
three RabbitMQ nodes, three Galera nodes behind HAProxy) for a given time with a steady
job mix (creates, reuses, relinks, releases, flushes) and one fault at a time, about
every `--fault-every` seconds: each kind once in a random order (`--seed`), then again:

- `rabbit-kill`   SIGKILL a RabbitMQ node (1 or 2: node 1 is the worker's first and leads
                  its queue; node 3 is the scheduler's), started again 10 s later;
- `galera-kill`   SIGKILL a Galera node (1 is HAProxy's active one), started again later;
- `broker-cut`    the worker's broker connections dropped and refused for 2 s;
- `db-cut`        its database connections dropped and refused for 2 s;
- `worker-kill`   SIGKILL the worker; a new one starts;
- `nbd-hang`      SIGSTOP nbd-server's main process for 5 s.

Then it checks the invariants and prints them (and writes --out as JSON): every job has
one outcome: a reply (the same one each time it was answered: a job whose ack was lost
with its connection is answered again from its record) or a dead letter with the broker's
reason; the only error replies are retries_exhausted, each with its job in the
dead-letter queue; one active mapping per device; snippets, links and authfiles agree
with the mappings (a dry-run reconciliation finds nothing); the NBD connection held from
the start survived every fault (none kills its server); the worker's RSS at the end of
its longest life within 1.2 x of its first warm minute.

    python -m bench.soak --duration 3600            # starts and stops its own clusters
    python -m bench.soak --clusters-root R          # clusters from scripts/clusters.sh up

Exit 0 when every invariant holds, 1 when one does not.

Over 400 lines (budget 540) as one procedure: the job mix, the faults and the invariants it checks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import json
import logging
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
from pydantic import AnyUrl

from harness.clusters import GaleraCluster, RabbitCluster
from harness.held import HELD_BYTES, Held, check_consistent
from harness.nbd import NbdServerProcess
from harness.processes import memory_kib
from harness.services import delete_broker_objects, make_disk
from harness.sql import execute_sql
from harness.tcp_proxy import TcpProxy
from harness.worker_process import WorkerProcess, worker_settings
from worker.repository import migrate

log = logging.getLogger("soak")

FAULTS = ("rabbit-kill", "galera-kill", "broker-cut", "db-cut", "worker-kill", "nbd-hang")
#: Disks the scheduler keeps busy at once (one job in flight per disk).
DISKS = 24
#: The pause between a disk's jobs: about 20 jobs a second in all, a steady mix.
JOB_PAUSE_S = 1.0
RSS_SAMPLE_S = 5
RSS_WARM_UP_S = 60
#: "RSS flat": the end of the worker's longest life against its first warm minute.
RSS_GROWTH_LIMIT = 1.2


@dataclass
class Disk:
    vm_id: str
    device: Path
    active: bool = False
    moves: int = 0


@dataclass
class Tally:
    sent: dict[str, dict[str, Any]] = field(default_factory=dict)
    replies: dict[str, dict[str, Any]] = field(default_factory=dict)
    duplicates: int = 0
    unalike: list[str] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    held_lost_after: list[str] = field(default_factory=list)
    rss_kib: dict[int, list[int]] = field(default_factory=dict)


class Soak:
    def __init__(self, work: Path, rabbit: RabbitCluster, galera: GaleraCluster, seed: int) -> None:
        # The job mix, and apart from it the faults: a seed gives the same sequence of
        # faults (their timing, and so the jobs, follow the machine).
        self.rng = random.Random(seed)  # noqa: S311 (not for secrets)
        self.fault_rng = random.Random(seed)  # noqa: S311
        self.deck: list[str] = []
        #: What `close` undoes, in reverse: only what `start` got as far as making.
        self.cleanup = contextlib.AsyncExitStack()
        self.work = work
        self.rabbit = rabbit
        self.galera = galera
        self.tally = Tally()
        self.disks_dir = work / "disks"
        self.waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}

    # --- set-up -----------------------------------------------------------------------

    async def start(self) -> None:
        self.disks_dir.mkdir(parents=True)
        cleanup = self.cleanup
        self.server = NbdServerProcess(self.work / "nbd")
        (self.work / "nbd").mkdir()
        cleanup.callback(self.server.stop)
        self.server.start()
        self.broker_proxies = [
            TcpProxy("127.0.0.1", n.amqp_port, record=False) for n in self.rabbit.nodes
        ]
        self.db_proxy = TcpProxy("127.0.0.1", self.galera.proxy_port, record=False)
        for proxy in [*self.broker_proxies, self.db_proxy]:
            cleanup.push_async_callback(proxy.stop)
        broker_ports = [await p.start() for p in self.broker_proxies]
        db_port = await self.db_proxy.start()
        self.database = f"nbdsoak_{uuid.uuid4().hex[:8]}"
        cleanup.push_async_callback(
            execute_sql, AnyUrl(self.galera.url()), f"DROP DATABASE IF EXISTS `{self.database}`"
        )
        await migrate(AnyUrl(self.galera.url(database=self.database)), node_id="soak", timeout_s=10)
        tag = uuid.uuid4().hex[:8]
        self.settings = worker_settings(
            self.server,
            self.work,
            self.disks_dir,
            node_id="soak",
            exchange=f"soak.exports.{tag}",
            amqp_url=",".join(f"amqp://guest:guest@127.0.0.1:{p}/" for p in broker_ports),
            database_url=AnyUrl(f"mysql://root@127.0.0.1:{db_port}/{self.database}"),
            request_queue=f"soak.prepare-export.{tag}",
            reply_queue=f"soak.export-ready.{tag}",
            state_dir=self.work / "state",
            probe_timeout_s=1.0,
            delivery_limit=8,
            job_attempts=4,
            retry_backoff_s=0.2,
            retry_backoff_max_s=1.0,
            db_connect_timeout_s=2.0,
            amqp_connect_timeout_s=2.0,
        )
        # The scheduler: on node 3, which no fault takes down.
        self.amqp = await aio_pika.connect(self.rabbit.node(3).url, timeout=10)
        cleanup.push_async_callback(self.amqp.close)
        cleanup.push_async_callback(
            delete_broker_objects,
            self.amqp,
            [
                self.settings.request_queue,
                f"{self.settings.request_queue}.dead",
                self.settings.reply_queue,
            ],
            [self.settings.exchange],
        )
        self.channel = await self.amqp.channel(publisher_confirms=True)
        reply_queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        self.reply_to = reply_queue.name
        await reply_queue.consume(self._on_reply, no_ack=True)
        self.worker = await self._start_worker()
        cleanup.push_async_callback(lambda: self.worker.stop())  # the one running at the end
        self.disks = [
            Disk(str(uuid.uuid4()), make_disk(self.disks_dir, f"d{i}")) for i in range(DISKS)
        ]
        # The connection held through every fault, like a copy in progress.
        held_device = make_disk(self.disks_dir, "held", HELD_BYTES)
        held_job = {"job_id": "held", "vm_id": str(uuid.uuid4()), "vm_name": "soak-held",
                    "disk_unit_number": 0, "device_path": str(held_device)}  # fmt: skip
        reply = await self.request(held_job, 60)
        self.held = Held(self.server.port, reply["export_name"], held_job)
        cleanup.callback(self.held.close)

    async def _start_worker(self) -> WorkerProcess:
        worker = WorkerProcess(self.settings, EXPORT_WORKER_LOG_LEVEL="WARNING")
        await worker.start(60)
        assert worker.proc is not None
        self.tally.rss_kib[worker.proc.pid] = []
        return worker

    # --- the scheduler ----------------------------------------------------------------

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        corr = message.correlation_id or ""
        body = json.loads(message.body)
        if corr in self.tally.replies:
            self.tally.duplicates += 1
            if self.tally.replies[corr] != body:
                self.tally.unalike.append(corr)
                # Both answers, for whoever reads the verdict: which fields differ.
                log.warning("Answered twice, unalike: %s then %s", self.tally.replies[corr], body)
            return
        self.tally.replies[corr] = body
        waiter = self.waiters.pop(corr, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(body)

    async def request(self, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        corr = uuid.uuid4().hex
        self.tally.sent[corr] = body
        waiter = asyncio.get_running_loop().create_future()
        self.waiters[corr] = waiter
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps(body).encode(), correlation_id=corr, reply_to=self.reply_to,
                content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=self.settings.request_queue,
        )  # fmt: skip
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        except TimeoutError:
            return {}  # unanswered for now: the final count decides

    def _next_job(self, disk: Disk) -> dict[str, Any]:
        base = {"job_id": uuid.uuid4().hex, "vm_id": disk.vm_id, "disk_unit_number": 0}
        prepare = {**base, "vm_name": "soak", "device_path": str(disk.device)}
        if not disk.active:
            return prepare  # a create (or a prepare again after a release)
        roll = self.rng.random()
        if roll < 0.55:
            return prepare  # a reuse
        if roll < 0.70:
            disk.moves += 1
            disk.device = make_disk(self.disks_dir, f"{disk.vm_id[:8]}-{disk.moves}")
            return {**prepare, "device_path": str(disk.device)}  # a relink
        if roll < 0.85:
            return {**base, "type": "flush-export"}
        return {**base, "type": "release-export"}

    async def drive(self, disk: Disk, until: float) -> None:
        while time.monotonic() < until:
            body = self._next_job(disk)
            reply = await self.request(body, 120)
            if reply.get("status") == "ready":
                disk.active = True
            elif reply.get("status") == "released":
                disk.active = False
            await asyncio.sleep(self.rng.uniform(0.5, 1.5) * JOB_PAUSE_S)

    # --- faults -----------------------------------------------------------------------

    async def inject(self, fault: str) -> dict[str, Any]:
        started = time.monotonic()
        detail = ""
        if fault == "rabbit-kill":
            index = self.fault_rng.choice((1, 2))
            detail = f"node {index}"
            await asyncio.to_thread(self.rabbit.kill_node, index)
            await asyncio.sleep(10)
            await asyncio.to_thread(self.rabbit.start_node, index)
        elif fault == "galera-kill":
            index = self.fault_rng.choice((1, 2, 3))
            detail = f"node {index}"
            await asyncio.to_thread(self.galera.kill_node, index)
            await asyncio.sleep(10)
            await asyncio.to_thread(self.galera.start_node, index)
        elif fault in ("broker-cut", "db-cut"):
            proxies = self.broker_proxies if fault == "broker-cut" else [self.db_proxy]
            for proxy in proxies:
                await proxy.stop()
            await asyncio.sleep(2)
            for proxy in proxies:
                await proxy.start()
        elif fault == "worker-kill":
            assert self.worker.proc is not None
            self.worker.proc.kill()
            await self.worker.wait(30)
            self.worker = await self._start_worker()
        elif fault == "nbd-hang":
            os.kill(self.server.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(5)
            finally:
                os.kill(self.server.pid, signal.SIGCONT)
        held = self.held.survived()
        if not held:
            self.tally.held_lost_after.append(fault)
        record = {"fault": fault, "detail": detail, "took_s": round(time.monotonic() - started, 1),
                  "held_connection": "survived" if held else "LOST"}  # fmt: skip
        log.warning("fault %s", record)
        return record

    async def faults(self, until: float, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s * self.fault_rng.uniform(0.8, 1.2))
            if time.monotonic() + 20 > until:
                return
            if not self.deck:  # every kind once, in a random order, then again
                self.deck = self.fault_rng.sample(FAULTS, len(FAULTS))
            self.tally.faults.append(await self.inject(self.deck.pop()))

    async def sample_rss(self, until: float) -> None:
        while time.monotonic() < until:
            if self.worker.proc is not None and self.worker.proc.returncode is None:
                kib = memory_kib("VmRSS", self.worker.proc.pid)
                if kib is not None:
                    self.tally.rss_kib[self.worker.proc.pid].append(kib)
            await asyncio.sleep(RSS_SAMPLE_S)

    # --- the run and its invariants ---------------------------------------------------

    async def run(self, duration_s: float, fault_every_s: float) -> dict[str, Any]:
        until = time.monotonic() + duration_s
        await asyncio.gather(
            *(self.drive(disk, until) for disk in self.disks),
            self.faults(until, fault_every_s),
            self.sample_rss(until),
        )
        # Whatever is still unanswered has had every retry: give it the time they take.
        pending = [w for w in self.waiters.values() if not w.done()]
        if pending:
            await asyncio.wait(pending, timeout=120)
        return await self.verdict()

    async def verdict(self) -> dict[str, Any]:
        tally = self.tally
        dead = await self._dead_letters()
        unanswered = set(tally.sent) - set(tally.replies)
        lost = sorted(c for c in unanswered if tally.sent[c]["job_id"] not in dead)
        errors: dict[str, int] = {}
        unexpected: list[str] = []
        not_kept: list[str] = []
        for reply in tally.replies.values():
            if "error" not in reply:
                continue
            code = str(reply["error"]["code"])
            key = f"{code}/{reply['error'].get('cause')}"
            errors[key] = errors.get(key, 0) + 1
            # A fault outlasting a job's every retry answers retries_exhausted, and the job
            # must then wait in the dead-letter queue. A flush cut short by a fault (the
            # worker killed, or its job cancelled with its broker connection) cannot prove
            # durability: that flush and every later one of the copy are refused, as
            # designed (RELIABILITY.md "How"). Any other error is a finding.
            if code == "retries_exhausted":
                if reply.get("job_id") not in dead:
                    not_kept.append(str(reply.get("job_id")))
            elif not (code == "flush_failed" and "did not finish" in reply["error"]["message"]):
                unexpected.append(f"{key}: {reply['error']['message']}")
        reasons = set(dead.values())
        await self.worker.stop()
        consistent = "ok"
        try:
            await check_consistent(self.settings)
        except AssertionError as exc:
            consistent = f"FAILED: {exc}"
        # The unique key uq_node_active_device_id forbids it; counted anyway, as the issue's
        # invariant, on the rows as Galera has them.
        active = await execute_sql(
            AnyUrl(self.galera.url(database=self.database)),
            "SELECT device_id, COUNT(*) FROM vm_export_mappings WHERE status = 'active'"
            " GROUP BY device_id HAVING COUNT(*) > 1",
        )
        rss = rss_summary(tally.rss_kib)
        kinds: dict[str, int] = {}
        for reply in tally.replies.values():
            kind = str(reply.get("action") or reply.get("status"))
            kinds[kind] = kinds.get(kind, 0) + 1
        result = {
            "jobs": len(tally.sent),
            "by_outcome": kinds,
            "replied": len(tally.replies),
            "answered_twice_alike": tally.duplicates - len(tally.unalike),
            "answered_twice_unalike": len(tally.unalike),
            "dead_lettered": len(dead),
            "dead_letter_reasons": sorted(reasons),
            "lost": len(lost),
            "error_replies": errors,
            "unexpected_errors": sorted(set(unexpected))[:20],
            "retries_exhausted_not_dead_lettered": len(not_kept),
            "faults": len(tally.faults),
            "fault_kinds": {f: sum(1 for x in tally.faults if x["fault"] == f) for f in FAULTS},
            "held_connection": (
                f"LOST after {tally.held_lost_after}"
                if tally.held_lost_after
                else "survived every fault"
            ),
            "devices_with_two_active_mappings": len(active or []),
            "files_agree_with_mappings": consistent,
            "worker_processes": len(tally.rss_kib),
            **rss,
            "fault_log": tally.faults,
        }
        result["ok"] = (
            not lost
            and not tally.unalike
            and not unexpected
            and not not_kept
            and reasons <= {"rejected", "delivery_limit"}
            and not tally.held_lost_after
            and not active
            and consistent == "ok"
            and rss["rss_growth"] < RSS_GROWTH_LIMIT
        )
        return result

    async def _dead_letters(self) -> dict[str, str]:
        """The dead-letter queue's jobs: job_id -> the broker's reason (x-death)."""
        found: dict[str, str] = {}
        channel = await self.amqp.channel()
        queue = await channel.declare_queue(f"{self.settings.request_queue}.dead", passive=True)
        while (message := await queue.get(fail=False)) is not None:
            deaths = (message.headers or {}).get("x-death")
            first = deaths[0] if isinstance(deaths, list) and deaths else None
            reason = str(first.get("reason", "?")) if isinstance(first, dict) else "?"
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                found[json.loads(message.body)["job_id"]] = reason
            await message.ack()
        await channel.close()
        return found

    async def close(self) -> None:
        await self.cleanup.aclose()


def rss_summary(lives: dict[int, list[int]]) -> dict[str, Any]:
    """The worker's RSS over its longest life (the soak's worker-kill fault ends lives),
    from the end of its first minute (imports, pools and caches filling) to its end."""
    warm = RSS_WARM_UP_S // RSS_SAMPLE_S
    longest = max(lives.values(), key=len, default=[])
    window = longest[warm:] if len(longest) > warm + 1 else longest
    first, last = (window[0], window[-1]) if window else (0, 0)
    return {
        "rss_longest_life_s": len(longest) * RSS_SAMPLE_S,
        "rss_mib_after_warm_up": round(first / 1024, 1),
        "rss_mib_at_end": round(last / 1024, 1),
        "rss_mib_peak": round(max(window, default=0) / 1024, 1),
        "rss_growth": round(last / first, 3) if first else 1.0,
    }


async def soak(
    work: Path,
    rabbit: RabbitCluster,
    galera: GaleraCluster,
    duration_s: float,
    fault_every_s: float,
    seed: int,
) -> dict[str, Any]:
    run = Soak(work, rabbit, galera, seed)
    try:
        await run.start()
        result = await run.run(duration_s, fault_every_s)
        # In the log before anything is torn down: the verdict outlives a failed clean-up.
        log.warning("verdict %s", json.dumps({k: v for k, v in result.items() if k != "fault_log"}))
        return result
    finally:
        await run.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds (default 3600)")
    parser.add_argument("--fault-every", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument(
        "--clusters-root", type=Path, help="use the clusters of scripts/clusters.sh up"
    )
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    parser.add_argument("--seed", type=int, help="of the job mix and faults (default: random)")
    args = parser.parse_args(argv)
    faulthandler.enable()  # a crash in a C extension still says where
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    started = time.time()
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4))
    with tempfile.TemporaryDirectory(prefix="nbd-soak-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # the Galera nodes run as mysql
        own = args.clusters_root is None
        root = work / "clusters" if own else args.clusters_root
        if own:
            root.mkdir()
            rabbit, galera = RabbitCluster(root / "rabbitmq"), GaleraCluster(root / "galera")
        else:
            rabbit, galera = RabbitCluster.load(root), GaleraCluster.load(root)
        try:
            if own:
                rabbit.start()
                galera.start()
            result = asyncio.run(
                soak(work / "run", rabbit, galera, args.duration, args.fault_every, seed)
            )
        finally:
            if own:
                galera.stop()
                rabbit.stop()
    result = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
        "duration_s": args.duration,
        "fault_every_s": args.fault_every,
        "seed": seed,
        **result,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
