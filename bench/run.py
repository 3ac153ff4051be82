"""The benchmark's sections, in one run, against one stack, in the order they run:

3a. few     single creates while the server holds few exports, as on an appliance
            (first: the later sections leave it a thousand and more);
1. floor    a bare loop of the same shape (bench.floor) at concurrency 1, 16 (and 64);
2. reuse    jobs over pre-existing mappings at concurrency 1, 16 (and 64); then floor and
            reuse alternated a few times at concurrency 16, then at 1 ("paired");
3. create   new exports one at a time, and a burst published at once (SIGHUPs counted);
5. baseline reuse at concurrency 16 and the burst with EXPORT_WORKER_BASELINE=true (the
            original system lists exports: its server alone runs with allowlist = true);
4. scale    single creates with 2,000 and 5,000 exports on the server;
6. the peak RSS of every worker process.

Progress goes to stderr, the Markdown table to stdout, results.json and results.md to --out.
Exit 0 when it ran; 1 when the stack could not start; 130 on Ctrl-C.

Over 400 lines (budget 610) as the benchmark's script: its sections, one after another, in the order
they run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.cpu import CpuMeter, pid_of
from bench.driver import Driver, RunResult
from bench.report import (
    Results,
    Row,
    WorkerInfo,
    describe_machine,
    evaluate_targets,
    fill_ratios,
    render_markdown,
)
from bench.stack import REPO_ROOT, Pair, Stack, scrape, total
from harness.processes import ManagedProcess, StartFailed

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
MYSQL_URL = os.environ.get("BENCH_MYSQL_URL", "mysql://root@127.0.0.1:3306")
#: A job that gets no reply by then counts as an error ("no reply in time").
JOB_TIMEOUT_S = 60.0
REUSED = ("reused",)
CREATED = ("created",)


@dataclass(frozen=True)
class Plan:
    small: bool
    floor_concurrency: tuple[int, ...]
    floor_jobs: int
    reuse_mappings: int
    reuse_jobs: int
    reuse_concurrency: tuple[int, ...]
    warmup_jobs: int
    single_creates: int
    burst: int
    scale_levels: tuple[int, ...]
    scale_creates: int
    #: Exports on the server for the single creates made before it holds a thousand.
    few_exports: int
    #: Floor and reuse at concurrency 16, alternated: rounds, and jobs per run.
    paired_rounds: int
    paired_jobs: int
    #: Floor and reuse at concurrency 1, alternated: rounds, and jobs per run.
    paired_c1_rounds: int
    paired_c1_jobs: int

    @classmethod
    def for_mode(cls, small: bool) -> Plan:
        if small:
            return cls(
                small=True,
                floor_concurrency=(1, 16),
                floor_jobs=300,
                reuse_mappings=100,
                reuse_jobs=300,
                reuse_concurrency=(1, 16),
                warmup_jobs=100,  # every mapping once: see _warm_up
                single_creates=5,
                burst=20,
                scale_levels=(200,),
                scale_creates=5,
                few_exports=20,
                paired_rounds=2,
                paired_jobs=200,
                paired_c1_rounds=2,
                paired_c1_jobs=100,
            )
        return cls(
            small=False,
            floor_concurrency=(1, 16, 64),
            floor_jobs=5000,
            reuse_mappings=1000,
            reuse_jobs=5000,
            reuse_concurrency=(1, 16, 64),
            warmup_jobs=1000,
            single_creates=50,
            burst=200,
            scale_levels=(2000, 5000),
            scale_creates=20,
            few_exports=50,
            paired_rounds=3,
            paired_jobs=3000,
            paired_c1_rounds=5,
            paired_c1_jobs=1500,
        )


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _describe(row: Row) -> str:
    parts = [f"{row.jobs} jobs"]
    if row.concurrency is not None:
        parts.append(f"c={row.concurrency}")
    parts.append(f"{row.jobs_per_s:,.0f} jobs/s")
    if row.p50_ms is not None:
        parts.append(f"p50 {row.p50_ms:.2f} ms, p99 {row.p99_ms or 0:.2f} ms")
    parts.append(f"{row.wall_s:.2f} s")
    if row.errors:
        parts.append(f"errors {row.errors}")
    return ", ".join(parts)


class Bench:
    def __init__(self, plan: Plan, stack: Stack, results: Results) -> None:
        self.plan = plan
        self.stack = stack
        self.results = results
        self.driver: Driver | None = None
        self.pairs: list[Pair] = []
        self._job_counter = 0
        #: The process consuming the jobs now (the floor or a worker), for CPU accounting.
        self.consumer_pid: int | None = None

    # --- helpers --------------------------------------------------------------------------

    def _job_id(self, tag: str) -> str:
        self._job_counter += 1
        return f"bench-{tag}-{self._job_counter}"

    def _reuse_jobs(self, count: int, tag: str, seed: int) -> list[dict[str, Any]]:
        order = list(self.pairs)
        random.Random(seed).shuffle(order)  # noqa: S311 - a fixed order, not secrecy
        return [order[i % len(order)].job(self._job_id(tag)) for i in range(count)]

    def _add(self, row: Row) -> Row:
        self.results.rows.append(row)
        progress(f"{row.section} / {row.run}: {_describe(row)}")
        return row

    @property
    def d(self) -> Driver:
        assert self.driver is not None
        return self.driver

    async def _closed(
        self,
        queue: str,
        jobs: list[dict[str, Any]],
        concurrency: int,
        section: str,
        run: str,
        expected: tuple[str, ...],
        extra: dict[str, Any] | None = None,
    ) -> Row:
        meter = self._cpu_meter()
        meter.start()
        result = await self.d.closed_loop(queue, jobs, concurrency, JOB_TIMEOUT_S)
        extra = dict(extra or {})
        extra["cpu_ms_per_job"] = meter.per_job(len(result.results))
        return self._add(
            Row.from_run(
                section, run, result, concurrency=concurrency, expected=expected, extra=extra
            )
        )

    def _cpu_meter(self) -> CpuMeter:
        return CpuMeter(
            {
                "publisher": os.getpid(),
                "consumer": self.consumer_pid,
                "rabbitmq": pid_of("beam.smp"),
                "mariadb": pid_of("mariadbd") or pid_of("mysqld"),
                "nbd-server": self.stack.nbd.pid or None,
            },
            # Children: nbd-server's per-connection processes, and the `nbd-client`
            # processes of the baseline and nbd-client-probe workers.
            with_children=frozenset({"nbd-server", "consumer"}),
        )

    async def _single_creates(
        self, count: int, section: str, run: str | None = None, extra: dict[str, Any] | None = None
    ) -> Row:
        """`count` new (vm, disk) jobs, one at a time; the run's name and extra say how many
        exports the server held before, unless given."""
        exports = self.stack.exports_on_disk()
        run = run or f"single new export, one at a time ({exports} exports before)"
        pairs = [self.stack.new_pair() for _ in range(count)]
        jobs = [p.job(self._job_id("create")) for p in pairs]
        return await self._closed(
            self.stack.request_queue,
            jobs,
            1,
            section,
            run,
            CREATED,
            extra={"exports_before": exports, **(extra or {})},
        )

    async def _burst(self, count: int, section: str, port: int) -> Row:
        pairs = [self.stack.new_pair() for _ in range(count)]
        jobs = [p.job(self._job_id("burst")) for p in pairs]
        exports_before = self.stack.exports_on_disk()
        before = await scrape(port)
        result: RunResult = await self.d.burst(
            self.stack.request_queue, jobs, timeout_s=max(120.0, 2.0 * count)
        )
        after = await scrape(port)
        sighups = int(
            total(after, "nbd_server_sighups_total") - total(before, "nbd_server_sighups_total")
        )
        return self._add(
            Row.from_run(
                section,
                f"burst of {count} new, published at once ({exports_before} exports before)",
                result,
                concurrency=None,
                expected=CREATED,
                extra={"sighups": sighups, "exports_before": exports_before},
            )
        )

    async def _worker(
        self, label: str, settings: str, extra: dict[str, str] | None = None
    ) -> tuple[ManagedProcess, int, WorkerInfo]:
        progress(f"starting worker '{label}' ({settings})")
        proc, port = await self.stack.start_worker(label, extra)
        self.consumer_pid = proc.pid
        info = WorkerInfo(label=label, settings=settings, pid=proc.pid)
        self.results.workers.append(info)
        return proc, port, info

    async def _stop_worker(self, proc: ManagedProcess, port: int, info: WorkerInfo) -> None:
        with contextlib.suppress(Exception):
            samples = await scrape(port)
            info.metrics = {
                name: total(samples, name)
                for name in (
                    "nbd_server_sighups_total",
                    "nbd_export_jobs_total",
                    "nbd_server_probe_failures_total",
                    "nbd_export_dead_lettered_total",
                    "nbd_export_requeued_total",
                    "nbd_export_retries_total",
                    "nbd_server_reload_visible_seconds_sum",
                    "nbd_server_reload_visible_seconds_count",
                    "nbd_server_probe_duration_seconds_sum",
                    "nbd_server_probe_duration_seconds_count",
                    "nbd_export_job_duration_seconds_sum",
                    "nbd_export_job_duration_seconds_count",
                )
            }
        info.exit_code = await proc.stop()
        if proc.peak_rss_kib is not None:
            info.peak_rss_mib = proc.peak_rss_kib / 1024
        progress(
            f"stopped worker '{info.label}': peak RSS "
            f"{info.peak_rss_mib or 0:.1f} MiB, exit {info.exit_code}"
        )

    async def _warm_up(self, queue: str) -> None:
        # Every mapping once (warmup_jobs = reuse_mappings): a worker opens and keeps an
        # export's device at its first reuse, or at start-up when it reconciles (the
        # default, off in this stack), so the runs measure the reuses that follow, as on a
        # worker that reconciled. 200 random jobs left ~800 first reuses (a thread each)
        # in the runs at concurrency 1: p50 1.27 x the floor in the first of three
        # alternated rounds, 1.12-1.16 x in the others (bench/profile.py --rounds).
        jobs = self._reuse_jobs(self.plan.warmup_jobs, "warmup", seed=0)
        await self.d.closed_loop(queue, jobs, 16, JOB_TIMEOUT_S)

    # --- sections -------------------------------------------------------------------------

    async def floor(self) -> None:
        plan = self.plan
        proc = await self.stack.start_floor()
        self.consumer_pid = proc.pid
        try:
            queue = self.stack.floor_queue
            # The same job bodies as the worker's reuse runs get.
            await self._warm_up(queue)
            for concurrency in plan.floor_concurrency:
                jobs = self._reuse_jobs(plan.floor_jobs, "floor", seed=concurrency)
                await self._closed(
                    queue, jobs, concurrency, "floor", "bare loop (bench.floor)", REUSED
                )
        finally:
            await proc.stop()
            if proc.peak_rss_kib is not None:
                self.results.notes.append(
                    f"floor process peak RSS {proc.peak_rss_kib / 1024:.1f} MiB"
                )

    async def _paired(self, worker_pid: int) -> None:
        """The floor and reuse at concurrency 16, then at concurrency 1, in alternation,
        both consumers running: this machine's speed drifts over minutes, and a ratio of
        runs seconds apart is steadier than one of runs minutes apart."""
        plan = self.plan
        floor = await self.stack.start_floor()
        try:
            await self._warm_up(self.stack.floor_queue)
            for concurrency, rounds, count in (
                (16, plan.paired_rounds, plan.paired_jobs),
                (1, plan.paired_c1_rounds, plan.paired_c1_jobs),
            ):
                for i in range(1, rounds + 1):
                    for label, queue, pid in (
                        ("floor", self.stack.floor_queue, floor.pid),
                        ("reuse", self.stack.request_queue, worker_pid),
                    ):
                        self.consumer_pid = pid
                        tag = f"paired-{label}-c{concurrency}"
                        jobs = self._reuse_jobs(count, tag, seed=300 + 10 * concurrency + i)
                        run = f"{label}, round {i}"
                        await self._closed(queue, jobs, concurrency, "paired", run, REUSED)
        finally:
            self.consumer_pid = worker_pid
            await floor.stop()

    async def create_on_few(self) -> None:
        """Single creates while the server holds tens of exports, as on an appliance whose
        exports are the volumes attached to it, before the reuse runs give it a thousand:
        a reload re-reads every snippet, so its cost grows with their number."""
        plan = self.plan
        self.pairs = await self.stack.prepopulate(plan.few_exports)
        await self.stack.start_server()
        try:
            proc, port, info = await self._worker("few-exports", "defaults (native probe)")
            try:
                await self._warm_up(self.stack.request_queue)
                await self._single_creates(plan.single_creates, "few exports")
            finally:
                await self._stop_worker(proc, port, info)
        finally:
            await self.stack.stop_server()

    async def reuse_and_create(self) -> None:
        plan = self.plan
        proc, port, info = await self._worker("ours", "defaults (native probe), prefetch 64")
        try:
            queue = self.stack.request_queue
            await self._warm_up(queue)
            for concurrency in plan.reuse_concurrency:
                jobs = self._reuse_jobs(plan.reuse_jobs, "reuse", seed=100 + concurrency)
                await self._closed(
                    queue,
                    jobs,
                    concurrency,
                    "reuse",
                    f"{plan.reuse_jobs} jobs over {len(self.pairs)} mappings",
                    REUSED,
                )
            await self._paired(proc.pid)
            await self._single_creates(plan.single_creates, "create")
            await self._burst(plan.burst, "create", port)
        finally:
            await self._stop_worker(proc, port, info)

    async def baseline(self) -> None:
        plan = self.plan
        extra = {"EXPORT_WORKER_BASELINE": "true"}
        config = await asyncio.to_thread(self.stack.show_config, extra)
        if config is None or config.get("baseline") is not True:
            note = (
                "baseline: not available (the worker's show-config does not report "
                "baseline=true with EXPORT_WORKER_BASELINE=true)"
            )
            self.results.notes.append(note)
            progress(note)
            return
        # The original system verifies with `nbd-client -l`: only a server that lists
        # exports to everyone serves it (ours runs with allowlist = false).
        await self.stack.restart_server(allowlist=True)
        try:
            proc, port, info = await self._worker("baseline", "EXPORT_WORKER_BASELINE=true", extra)
        except StartFailed as exc:
            note = f"baseline: not available (the worker refused to start: {exc})"
            self.results.notes.append(note.replace("\n", " / "))
            progress(note)
            return
        try:
            queue = self.stack.request_queue
            await self._warm_up(queue)
            jobs = self._reuse_jobs(plan.reuse_jobs, "baseline-reuse", seed=316)
            await self._closed(
                queue,
                jobs,
                16,
                "baseline",
                f"reuse, {plan.reuse_jobs} jobs over {len(self.pairs)} mappings",
                REUSED,
            )
            await self._burst(plan.burst, "baseline", port)
        finally:
            await self._stop_worker(proc, port, info)
            await self.stack.restart_server(allowlist=False)

    async def scale(self) -> None:
        plan = self.plan
        for level in plan.scale_levels:
            have = self.stack.exports_on_disk()
            if have < level:
                progress(f"scale: adding {level - have} mappings to reach {level}")
                await self.stack.prepopulate(level - have)
            exports = self.stack.exports_on_disk()
            progress(f"scale: restarting nbd-server with {exports} exports")
            await self.stack.restart_server()
            proc, port, info = await self._worker(f"scale-{level}", "defaults (native probe)")
            try:
                await self._single_creates(
                    plan.scale_creates,
                    "scale",
                    f"single new export with {exports} exports on the server",
                    extra={"level": level},
                )
            finally:
                await self._stop_worker(proc, port, info)


async def _setup(bench: Bench) -> None:
    """Database, broker, machine description and publisher: any failure here means the
    stack could not start."""
    stack, results = bench.stack, bench.results
    try:
        await stack.setup()
        assert stack.connection is not None
        rabbitmq = "?"
        with contextlib.suppress(Exception):
            transport: Any = stack.connection.transport
            version = transport.connection.server_properties.get("version", "?")
            rabbitmq = version.decode() if isinstance(version, bytes) else str(version)
        results.machine = describe_machine(
            nbd_server_binary=stack.nbd.binary,
            rabbitmq=rabbitmq,
            mariadb=await stack.mariadb_version(),
        )
        bench.driver = Driver(stack.connection)
        await bench.driver.start()
    except StartFailed:
        raise
    except Exception as exc:
        raise StartFailed(f"set-up failed: {type(exc).__name__}: {exc}") from exc


async def _prepopulate(bench: Bench) -> None:
    try:
        bench.pairs += await bench.stack.prepopulate(bench.plan.reuse_mappings - len(bench.pairs))
    except Exception as exc:
        raise StartFailed(f"set-up failed: {type(exc).__name__}: {exc}") from exc


async def _section(results: Results, name: str, body: Callable[[], Awaitable[None]]) -> None:
    """Runs one section; a failure is reported in the results and the run goes on. Only a
    stack that cannot start (StartFailed from the caller's own checks) ends the run."""
    try:
        await body()
    except StartFailed:
        raise
    except Exception as exc:
        note = f"{name}: failed: {type(exc).__name__}: {exc}"
        results.notes.append(note)
        progress(note)
        traceback.print_exc(file=sys.stderr)


def write_results(out: Path, results: Results, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results.to_json(), indent=2) + "\n")
    (out / "results.md").write_text(markdown)


async def run(args: argparse.Namespace, command: str, stack: Stack) -> int:
    plan = Plan.for_mode(args.small)
    out: Path = args.out
    logs = stack.logs
    results = Results(
        command=command,
        mode="small" if plan.small else "full",
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    started = time.monotonic()
    exit_code = 0
    bench = Bench(plan, stack, results)
    try:
        await _setup(bench)
        progress("3a. create on a server with few exports")
        await _section(results, "few exports", bench.create_on_few)
        progress(f"pre-populating mappings up to {plan.reuse_mappings}")
        await _prepopulate(bench)
        progress("1. floor")
        await _section(results, "floor", bench.floor)
        progress("2. reuse and 3. create")
        await stack.start_server()
        await _section(results, "reuse and create", bench.reuse_and_create)
        progress("5. baseline")
        await _section(results, "baseline", bench.baseline)
        progress("4. scale")
        await _section(results, "scale", bench.scale)
    except StartFailed as exc:
        results.notes.append(f"the stack could not start: {exc}")
        progress(f"the stack could not start: {exc}")
        exit_code = 1
    except asyncio.CancelledError:
        results.notes.append("interrupted (Ctrl-C or SIGTERM): only the runs above were made")
        raise
    finally:
        progress("cleaning up")
        if bench.driver is not None:
            with contextlib.suppress(Exception):
                await bench.driver.close()
        await stack.cleanup()
        if bench.driver is not None and bench.driver.stray_replies:
            results.notes.append(
                f"{bench.driver.stray_replies} replies arrived after their job had timed out"
            )
        results.duration_s = time.monotonic() - started
        fill_ratios(results)
        results.targets = evaluate_targets(results, burst_size=plan.burst, small=plan.small)
        markdown = render_markdown(results)
        write_results(out, results, markdown)
        print(markdown, flush=True)
        progress(f"wrote {out / 'results.json'} and {out / 'results.md'}; logs in {logs}")
    return exit_code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="./scripts/bench.sh",
        description="Benchmarks the worker against a bare loop of the same shape (the floor) "
        "on the real stack, and prints a Markdown table. Never fails on a timing.",
    )
    parser.add_argument(
        "--small", action="store_true", help="a smoke run of well under a minute (for CI)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "bench" / "out",
        help="where results.json, results.md and logs/ go, relative to the repository root "
        "(default: bench/out)",
    )
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    raw = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["./scripts/bench.sh", *raw])
    logging.basicConfig(level=logging.WARNING, format="bench: %(levelname)s %(message)s")

    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("*.log"):
        old.unlink()
    root = Path(tempfile.mkdtemp(prefix="nbd-bench-"))
    stack = Stack(root, logs, amqp_url=AMQP_URL, mysql_url=MYSQL_URL)

    async def guarded() -> int:
        task = asyncio.current_task()
        if task is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await run(args, command, stack)

    try:
        return asyncio.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        progress("interrupted")
        return 130
    finally:
        # Whatever the async clean-up could not stop (a second Ctrl-C during it).
        stack.cleanup_now()
        shutil.rmtree(root, ignore_errors=True)
