"""What hashing costs: the checksum-export hash (worker/blkhash.py, as the worker runs it in
a thread) against `b2sum` of the same data and ovirt-imageio's client, on a 1 GiB image of
half data, half zero runs; and what a checksum costs the jobs answered beside it.

    ./scripts/bench.sh --checksum           a 1 GiB image, 3 runs each, then reuses beside
                                            a 2 GiB device's checksum (about two minutes)
    ./scripts/bench.sh --checksum --small   a 128 MiB image, 1 run each, and a 256 MiB
                                            device with 50 reuses a round: a smoke run
    ./scripts/bench.sh --checksum --beside  the reuses beside a checksum only

Beside a checksum: the worker as its own process over 1,000 mappings, reuse p50 at
concurrency 1 with nothing else running (idle), then with a checksum of a 2 GiB device
(1 GiB of data in 64 MiB runs, the rest holes) always under way, a new one asked as soon
as the last is answered; 200 reuses each, alternated over 3 rounds, each round's ratio
beside / idle against the issue's target (at most 1.3 x).

The image is written once, fully allocated (its zero runs written as zeros, as on a block
device, where nothing says what is a hole), and once sparse (the zero runs are holes a
regular file reports). Every run reads from the page cache (a first read warms it), so the
figures are the hashing's cost, not the disk's. Bytes/s is the image's size over the wall
time; the best of the runs is kept. It never fails on a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from bench.driver import Driver
from bench.stack import REPO_ROOT, Pair, Stack, scrape, total
from harness.processes import StartFailed
from worker.blkhash import hash_fd
from worker.messages import CHECKSUM_ALGORITHM, CHECKSUM_BLOCK_SIZE

MIB = 1 << 20
#: Data and zero runs of 64 MiB: longer than nbdcopy's 128 MiB zero requests in total,
#: and each a whole number of 4 MiB blocks.
RUN = 64 * MIB
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
MYSQL_URL = os.environ.get("BENCH_MYSQL_URL", "mysql://root@127.0.0.1:3306")
#: The reuse target beside a checksum: p50 at concurrency 1 at most this times the idle p50.
TARGET = 1.3


def _write_runs(f: BinaryIO, size: int, *, sparse: bool) -> None:
    """`size` bytes of 64 MiB data runs and 64 MiB zero runs (holes when `sparse`), written
    to the disk before anything is measured."""
    chunk = os.urandom(4 * MIB)
    zeros = bytes(4 * MIB)
    f.truncate(size)
    for start in range(0, size, 2 * RUN):
        f.seek(start)
        for _ in range(RUN // len(chunk)):
            f.write(chunk)
        if not sparse:
            for _ in range(RUN // len(zeros)):
                f.write(zeros)
    f.flush()
    os.fsync(f.fileno())


def write_image(path: Path, size: int, *, sparse: bool) -> None:
    with path.open("wb") as f:
        _write_runs(f, size, sparse=sparse)


def worker_hash(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return hash_fd(
            fd,
            block_size=CHECKSUM_BLOCK_SIZE,
            algorithm=CHECKSUM_ALGORITHM,
            on_block=lambda done, length: None,
        ).checksum
    finally:
        os.close(fd)


def b2sum(path: Path) -> str:
    binary = shutil.which("b2sum")
    if binary is None:
        raise SystemExit("b2sum is missing (coreutils)")
    out = subprocess.run([binary, str(path)], check=True, capture_output=True, text=True)
    return out.stdout.split()[0]


def imageio_hash(path: Path) -> str:
    from ovirt_imageio import client

    result: dict[str, str] = client.checksum(str(path))
    return result["checksum"]


def best_rate(fn: Callable[[Path], str], path: Path, runs: int) -> tuple[float, str]:
    """Bytes/s of the best of `runs` (after one warm-up run), and the digest."""
    digest = fn(path)
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        digest = fn(path)
        best = min(best, time.perf_counter() - started)
    return path.stat().st_size / best, digest


def fill_device(path: Path, size: int) -> None:
    """`path` (kept: its inode is the mapping's device_id) as a `size` device of 64 MiB data
    runs and 64 MiB holes."""
    with path.open("r+b") as f:
        _write_runs(f, size, sparse=True)


def p50_ms(latencies: list[float]) -> float:
    return statistics.median(latencies) * 1000


async def keep_hashing(
    driver: Driver, queue: str, big: Pair, stop: asyncio.Event, took: list[float], tag: str
) -> None:
    """Checksums of `big`, the next asked once the last is answered, until `stop`."""
    while not stop.is_set():
        body = {
            "type": "checksum-export",
            "job_id": f"{tag}-{len(took)}",
            "vm_id": big.vm_id,
            "disk_unit_number": big.disk,
        }
        result = await driver.one(queue, body, 300)
        if (result.reply or {}).get("status") != "checksummed":
            raise RuntimeError(f"checksum not answered: {result.reply}")
        took.append(result.latency_s or 0.0)


async def beside(size: int, reuses: int, rounds: int, logs: Path) -> list[dict[str, Any]]:
    """Reuse p50 at concurrency 1, idle and beside a checksum of a `size` device, `rounds`
    times alternated."""
    with tempfile.TemporaryDirectory(prefix="nbd-checksum-beside-") as tmp:
        stack = Stack(Path(tmp), logs, amqp_url=AMQP_URL, mysql_url=MYSQL_URL)
        try:
            await stack.setup()
            big, *pairs = await stack.prepopulate(1000)
            await asyncio.to_thread(fill_device, Path(big.device_path), size)
            await stack.start_server()
            assert stack.connection is not None
            driver = Driver(stack.connection)
            await driver.start()
            _, metrics_port = await stack.start_worker("checksum-beside")
            queue = stack.request_queue
            rng = random.Random(7)  # noqa: S311 - a fixed order, not secrecy

            def jobs(count: int, tag: str) -> list[dict[str, Any]]:
                return [rng.choice(pairs).job(f"{tag}-{i}") for i in range(count)]

            async def reuse_p50(tag: str) -> tuple[float, int]:
                run = await driver.closed_loop(queue, jobs(reuses, tag), 1, 60)
                answered = [r for r in run.results if (r.reply or {}).get("action") == "reused"]
                return p50_ms(run.latencies_s), len(run.results) - len(answered)

            async def hashing() -> bool:
                samples = await scrape(metrics_port)
                return total(samples, "nbd_export_checksums_running") > 0

            await driver.closed_loop(queue, jobs(300, "warm"), 1, 60)
            rows = []
            for round_ in range(rounds):
                idle, idle_missed = await reuse_p50(f"idle{round_}")
                stop = asyncio.Event()
                sums: list[float] = []
                summing = asyncio.create_task(
                    keep_hashing(driver, queue, big, stop, sums, f"sum{round_}")
                )
                for _ in range(6000):  # a minute at most: accepted after a flush
                    if await hashing():
                        break
                    await asyncio.sleep(0.01)
                busy, busy_missed = await reuse_p50(f"busy{round_}")
                still_hashing = await hashing()
                stop.set()
                await summing
                rows.append(
                    {
                        "idle_p50_ms": idle,
                        "beside_p50_ms": busy,
                        "ratio": busy / idle,
                        "not_reused": idle_missed + busy_missed,
                        "checksums": len(sums),
                        "checksum_s": statistics.median(sums),
                        "hashing_at_end": still_hashing,
                    }
                )
            await driver.close()
            return rows
        finally:
            await stack.cleanup()


def print_beside(rows: list[dict[str, Any]], size: int, reuses: int) -> None:
    print(
        f"reuse at concurrency 1 over 1,000 mappings, {reuses} a round: idle, and beside a "
        f"checksum of a {size // MIB} MiB device (half data) always under way; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print()
    print(
        "| round | idle p50 ms | beside p50 ms | ratio | target | checksums (p50 s) | not reused |"
    )
    print("|---:|---:|---:|---:|---|---:|---:|")
    for index, row in enumerate(rows, 1):
        met = "met" if row["ratio"] <= TARGET else "**not met**"
        print(
            f"| {index} | {row['idle_p50_ms']:.2f} | {row['beside_p50_ms']:.2f} | "
            f"{row['ratio']:.2f} x | <= {TARGET} x: {met} | "
            f"{row['checksums']} ({row['checksum_s']:.2f}) | {row['not_reused']} |"
        )
    middle = statistics.median(row["ratio"] for row in rows)
    print()
    print(f"median ratio {middle:.2f} x over {len(rows)} rounds (target <= {TARGET} x)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.checksum", description=__doc__)
    parser.add_argument("--small", action="store_true", help="a 128 MiB image, one run each")
    parser.add_argument("--beside", action="store_true", help="only the reuses beside a hash")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out")
    args = parser.parse_args(argv)
    if not args.beside and hash_rates(args.small) != 0:
        return 1
    size, reuses, rounds = (256 * MIB, 50, 1) if args.small else (2048 * MIB, 200, 3)
    logs = args.out.resolve() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    try:
        rows = asyncio.run(beside(size, reuses, rounds, logs))
    except StartFailed as exc:
        print(f"the stack could not start: {exc}", file=sys.stderr)
        return 1
    print()
    print_beside(rows, size, reuses)
    return 0


def hash_rates(small: bool) -> int:
    size, runs = (128 * MIB, 1) if small else (1024 * MIB, 3)
    rows: list[tuple[str, str, float]] = []
    with tempfile.TemporaryDirectory(prefix="nbd-checksum-bench-") as tmp:
        for sparse in (False, True):
            image = Path(tmp) / ("sparse.img" if sparse else "allocated.img")
            write_image(image, size, sparse=sparse)
            kind = "sparse (zero runs are holes)" if sparse else "allocated (zeros written)"
            ours, ours_digest = best_rate(worker_hash, image, runs)
            theirs, theirs_digest = best_rate(imageio_hash, image, runs)
            if ours_digest != theirs_digest:
                print(f"MISMATCH on {kind}: {ours_digest} != {theirs_digest}", file=sys.stderr)
                return 1
            rows.append((kind, "worker (blkhash.py, one thread)", ours))
            rows.append((kind, "ovirt_imageio.client.checksum (qemu-nbd)", theirs))
            rows.append(
                (kind, "b2sum (BLAKE2b-512 of the whole stream)", best_rate(b2sum, image, runs)[0])
            )
            image.unlink()
    print(
        f"checksum of a {size // MIB} MiB image, half data, half zero runs of {RUN // MIB} MiB; "
        f"best of {runs}, page cache warm, {os.cpu_count()} CPUs"
    )
    print()
    print("| image | hash | MiB/s | vs b2sum |")
    print("|---|---|---:|---:|")
    for index, (kind, name, rate) in enumerate(rows):
        reference = rows[index - index % 3 + 2][2]
        print(f"| {kind} | {name} | {rate / MIB:,.0f} | {rate / reference:.2f} x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
