"""Where the worker's CPU goes on the reuse path: py-spy samples the worker while it answers
reuse jobs at concurrency 16 over 1,000 mappings, and the functions with the most samples
are printed, by their own time (the frame at the top of the stack) and by their total time
(anywhere on it).

    ./scripts/bench.sh --profile           20,000 reuses (about a minute)
    ./scripts/bench.sh --profile --small   2,000 reuses: a smoke run

py-spy (a dev extra) reads the process from outside, so the worker runs as it always does;
`--nonblocking` leaves it running while a sample is read. Samples of an idle event loop
(the selector's wait) are counted apart, so the shares are of the time the worker was busy.
The worker's CPU per job is printed too (user + system, /proc/PID/stat), the figure the
reuse target is set in. It never fails on a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.cpu import cpu_seconds, pid_of
from bench.driver import Driver
from bench.entry import run_and_report
from bench.stack import REPO_ROOT, Stack
from harness.processes import StartFailed

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
MYSQL_URL = os.environ.get("BENCH_MYSQL_URL", "mysql://root@127.0.0.1:3306")
MAPPINGS = 1000
CONCURRENCY = 16
TOP = 25
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
#: The frames of threads with nothing to do: an event loop's wait for the next event, a
#: pool thread's wait for work.
IDLE = ("select (selectors.py)", "_worker (futures/thread.py)")
#: Frames on every stack of a thread (how it was started, the event loop's dispatch): their
#: total says nothing, so the total column leaves them out.
PLUMBING = (
    "(<frozen runpy>)", "(worker/__main__.py)", "main (worker/cli.py)",
    "(asyncio/runners.py)", "run_forever (asyncio/base_events.py)",
    "run_until_complete (asyncio/base_events.py)", "_run_once (asyncio/base_events.py)",
    "Handle._run (asyncio/events.py)", "(threading.py)", "_worker (futures/thread.py)",
    "_WorkItem.run (futures/thread.py)",
)  # fmt: skip


def frame_name(frame: str) -> str:
    """`function (path/to/module.py:line)` as `function (module.py)`: one entry a function,
    whatever line of it was running, and short paths."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0].rstrip(")")
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{name} ({short})"


def summarize(collapsed: str) -> dict[str, Any]:
    """Own and total samples a function, from py-spy's collapsed stacks ("a;b;c COUNT")."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    busy = idle = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        if frames[-1].endswith(IDLE):
            idle += count
            continue
        busy += count
        own[frames[-1]] += count
        for name in set(frames):
            if not name.endswith(PLUMBING):
                inclusive[name] += count
    return {
        "busy_samples": busy,
        "idle_samples": idle,
        "own": own.most_common(TOP),
        "total": inclusive.most_common(TOP),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        raise StartFailed("py-spy is not installed (pip install -e '.[dev]')")
    jobs_count = (2000 if args.small else 20000) // (1 if args.concurrency > 1 else 4)
    with tempfile.TemporaryDirectory(prefix="nbd-profile-") as tmp:
        stack = Stack(Path(tmp), args.out / "logs", amqp_url=AMQP_URL, mysql_url=MYSQL_URL)
        try:
            await stack.setup()
            pairs = await stack.prepopulate(MAPPINGS)
            await stack.start_server()
            assert stack.connection is not None
            driver = Driver(stack.connection)
            await driver.start()
            env = dict(item.split("=", 1) for item in args.env)
            proc, _ = await stack.start_worker("profile", env)
            rng = random.Random(7)  # noqa: S311 - a fixed order, not secrecy

            def jobs(count: int, tag: str) -> list[dict[str, Any]]:
                return [rng.choice(pairs).job(f"profile-{tag}-{i}") for i in range(count)]

            # Every mapping once: what a worker that reconciled at start-up (the default,
            # off in the benchmark's stack) holds already (see bench/run.py's warm-up).
            warm = [pair.job(f"profile-warm-{i}") for i, pair in enumerate(pairs)]
            await driver.closed_loop(stack.request_queue, warm, CONCURRENCY, 60)
            if args.rounds:
                return await _alternate(
                    args.rounds, args.concurrency, stack, driver, proc.pid, jobs
                )
            collapsed = Path(tmp) / "profile.txt"
            spy = None
            if not args.cpu_only:
                spy = await asyncio.create_subprocess_exec(
                    py_spy, "record", "--pid", str(proc.pid), "--format", "raw",
                    "--output", str(collapsed), "--rate", "250", "--nonblocking",
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                await asyncio.sleep(1.0)  # py-spy attached
            before = cpu_seconds(proc.pid)
            result = await driver.closed_loop(
                stack.request_queue, jobs(jobs_count, "run"), args.concurrency, 240
            )
            after = cpu_seconds(proc.pid)
            if spy is not None:
                spy.send_signal(2)  # SIGINT: py-spy writes what it has and exits
                await asyncio.wait_for(spy.wait(), 30)
            await driver.close()
            answered = len(result.results)
            summary = summarize(collapsed.read_text() if spy is not None else "")
            if args.keep and spy is not None:
                args.keep.write_text(collapsed.read_text())
            if before is None or after is None:
                raise StartFailed("the worker exited during the run")
            return {
                "jobs": answered,
                "concurrency": args.concurrency,
                "worker_cpu_ms_per_job": (after - before) * 1000 / max(answered, 1),
                **summary,
            }
        finally:
            await stack.cleanup()


async def _alternate(
    rounds: int,
    concurrency: int,
    stack: Stack,
    driver: Driver,
    worker_pid: int,
    jobs: Callable[[int, str], list[dict[str, Any]]],
) -> dict[str, Any]:
    """The floor's consumer and the worker in turn, `rounds` times, 5,000 reuses each (1,500
    at concurrency 1): CPU per job of each and the p50, seconds apart, so the ratio holds
    while the machine drifts."""
    floor = await stack.start_floor()
    await driver.closed_loop(stack.floor_queue, jobs(500, "floor-warm"), CONCURRENCY, 60)
    count = 5000 if concurrency > 1 else 1500
    pairs: list[tuple[tuple[float, ...], tuple[float, ...]]] = []
    for round_ in range(rounds):
        measured = []
        for queue, pid in ((stack.floor_queue, floor.pid), (stack.request_queue, worker_pid)):
            others = [p for p in (pid_of("mariadbd"), pid_of("beam.smp")) if p is not None]
            before = _user_system(pid) + tuple(cpu_seconds(p) or 0.0 for p in others)
            result = await driver.closed_loop(queue, jobs(count, f"r{round_}"), concurrency, 120)
            after = _user_system(pid) + tuple(cpu_seconds(p) or 0.0 for p in others)
            n = max(len(result.results), 1)
            cpu = tuple((a - b) * 1000 / n for a, b in zip(after, before, strict=True))
            measured.append((*cpu, statistics.median(result.latencies_s or [0.0]) * 1000))
        pairs.append((measured[0], measured[1]))
    await floor.stop()
    await driver.close()
    return {"concurrency": concurrency, "rounds": pairs}


def _user_system(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of `pid`, all threads."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError as exc:
        raise StartFailed(f"a consumer exited during the run: {exc}") from exc
    return int(fields[11]) * TICK_S, int(fields[12]) * TICK_S


def render_rounds(result: dict[str, Any]) -> str:
    lines = [
        f"CPU ms per reuse at concurrency {result['concurrency']}, floor then worker "
        "(user + system):"
    ]
    ratios = []
    for floor_ms, worker_ms in result["rounds"]:
        ratios.append(sum(worker_ms[:2]) / sum(floor_ms[:2]))
        lines.append(
            f"  floor {sum(floor_ms[:2]):.3f} ({floor_ms[0]:.3f} + {floor_ms[1]:.3f})"
            f"  worker {sum(worker_ms[:2]):.3f} ({worker_ms[0]:.3f} + {worker_ms[1]:.3f})"
            f"  {ratios[-1]:.2f} x; mariadb {floor_ms[2]:.3f} / {worker_ms[2]:.3f},"
            f" rabbitmq {floor_ms[3]:.3f} / {worker_ms[3]:.3f}; p50 {floor_ms[4]:.2f} /"
            f" {worker_ms[4]:.2f} ms"
        )
    lines.append(f"median {statistics.median(ratios):.2f} x the floor's CPU per job")
    return "\n".join(lines)


def render(result: dict[str, Any]) -> str:
    if "rounds" in result:
        return render_rounds(result)
    busy = max(result["busy_samples"], 1)
    lines = [
        f"reuse at concurrency {result['concurrency']}, {result['jobs']} jobs: worker CPU "
        f"{result['worker_cpu_ms_per_job']:.3f} ms per job; {result['busy_samples']} busy "
        f"samples, {result['idle_samples']} idle",
        "",
        "| own % | function | | total % | function |",
        "|---:|---|---|---:|---|",
    ]
    for (own_name, own_n), (total_name, total_n) in zip(
        result["own"], result["total"], strict=False
    ):
        lines.append(
            f"| {own_n / busy:.1%} | `{own_name}` | | {total_n / busy:.1%} | `{total_name}` |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./scripts/bench.sh --profile", description=__doc__)
    parser.add_argument("--small", action="store_true", help="a smoke run (2,000 reuses)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out")
    parser.add_argument("--keep", type=Path, help="also write py-spy's collapsed stacks here")
    parser.add_argument(
        "--cpu-only", action="store_true", help="no py-spy: the worker's CPU per job alone"
    )
    parser.add_argument(
        "--rounds", type=int, default=0, metavar="N",
        help="no py-spy: the floor and the worker alternated N times, CPU per job of each",
    )  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY, help="jobs outstanding")
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE",
        help="a setting for the worker (EXPORT_WORKER_LIVE_SAMPLE_S=0); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--summarize", type=Path, metavar="FILE",
        help="print the table of collapsed stacks kept earlier (--keep), running nothing",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.summarize:
        kept = summarize(args.summarize.read_text())
        print(render({"jobs": "?", "concurrency": CONCURRENCY, "worker_cpu_ms_per_job": 0.0,
                      **kept}))  # fmt: skip
        return 0
    return run_and_report(args, run, render, "profile.json")


if __name__ == "__main__":
    sys.exit(main())
