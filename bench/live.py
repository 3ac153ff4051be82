"""What the live view costs: the worker's CPU with 100 active exports and 50 open connections,
sampling every second against not sampling at all, measured in one run.

    ./scripts/bench.sh --live           two 30 s windows each way, alternated (about 3 min)
    ./scripts/bench.sh --live --small   one 5 s window each way: a smoke run

The worker runs as its own process, idle but for the sampler (no jobs): its CPU time
(user + system, /proc/PID/stat) over each window, as a share of one core. With sampling
off the same worker still runs its housekeeping, so the difference is the sampler's cost:
its samples in a thread, the reads of the mappings every few seconds and what it keeps in
export_usage. The target is <= 2 % of one core. It never fails on a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.cpu import cpu_seconds
from bench.entry import run_and_report
from bench.stack import REPO_ROOT, Stack, scrape, total
from harness.nbd import NbdConnection
from harness.processes import StartFailed

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
MYSQL_URL = os.environ.get("BENCH_MYSQL_URL", "mysql://root@127.0.0.1:3306")
EXPORTS = 100
CONNECTIONS = 50
TARGET = 0.02


async def _window(pid: int, seconds: float) -> float:
    """The process's CPU over `seconds` of wall time, as a share of one core."""
    before, started = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    after, ended = cpu_seconds(pid), time.monotonic()
    if before is None or after is None:
        raise StartFailed("the worker exited during a window")
    return (after - before) / (ended - started)


async def run(args: argparse.Namespace) -> dict[str, object]:
    rounds, window = (1, 5.0) if args.small else (2, 30.0)
    with tempfile.TemporaryDirectory(prefix="nbd-live-bench-") as tmp:
        root = Path(tmp)
        stack = Stack(root, args.out / "logs", amqp_url=AMQP_URL, mysql_url=MYSQL_URL)
        held: list[NbdConnection] = []
        try:
            await stack.setup()
            pairs = await stack.prepopulate(EXPORTS)
            await stack.start_server()
            # What a copy holds: a connection that committed to its export (NBD_OPT_GO).
            held = [NbdConnection(stack.nbd.port, pair.export_name) for pair in pairs[:CONNECTIONS]]
            shares: dict[str, list[float]] = {"on": [], "off": []}
            samples: list[float] = []
            for _ in range(rounds):
                for mode, interval in (("on", "1"), ("off", "0")):
                    proc, port = await stack.start_worker(
                        f"live-{mode}", {"EXPORT_WORKER_LIVE_SAMPLE_S": interval}
                    )
                    await asyncio.sleep(3)  # past start-up and the first samples
                    shares[mode].append(await _window(proc.pid, window))
                    if mode == "on":
                        metrics = await scrape(port)
                        count = total(metrics, "nbd_export_live_sample_duration_seconds_count")
                        spent = total(metrics, "nbd_export_live_sample_duration_seconds_sum")
                        if count:
                            samples.append(spent / count)
                        connections = total(metrics, "nbd_export_connections")
                        if connections != CONNECTIONS:
                            raise StartFailed(
                                f"the live view saw {connections} connections, not {CONNECTIONS}"
                            )
                    await proc.stop()
            on, off = statistics.median(shares["on"]), statistics.median(shares["off"])
            return {
                "cpus": os.cpu_count(),
                "exports": EXPORTS,
                "connections": CONNECTIONS,
                "window_s": window,
                "rounds": rounds,
                "cpu_share_sampling": shares["on"],
                "cpu_share_not_sampling": shares["off"],
                "cost_share_of_one_core": on - off,
                "sample_wall_s_mean": statistics.mean(samples) if samples else None,
                "target": TARGET,
                "met": on - off <= TARGET,
            }
        finally:
            for connection in held:
                with contextlib.suppress(OSError):
                    connection.close()
            await stack.cleanup()


def render(result: dict[str, object]) -> str:
    def shares(key: str) -> str:
        values = result[key]
        assert isinstance(values, list)
        return ", ".join(f"{x:.2%}" for x in values)

    cost, sample = result["cost_share_of_one_core"], result["sample_wall_s_mean"]
    assert isinstance(cost, float)
    one = f"{sample * 1000:.1f} ms" if isinstance(sample, float) else "-"
    return (
        f"live view, {EXPORTS} exports and {CONNECTIONS} connections: worker CPU sampling "
        f"every 1 s {shares('cpu_share_sampling')} of one core, not sampling "
        f"{shares('cpu_share_not_sampling')}: cost {cost:.2%} (target <= {TARGET:.0%}, "
        f"{'met' if result['met'] else 'NOT MET'}); one sample's wall time {one}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./scripts/bench.sh --live", description=__doc__)
    parser.add_argument("--small", action="store_true", help="a smoke run (5 s windows)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out")
    args = parser.parse_args(argv)
    return run_and_report(args, run, render, "live.json")


if __name__ == "__main__":
    sys.exit(main())
