"""What hashing costs: the checksum-export hash (worker/blkhash.py, as the worker runs it in
a thread) against `b2sum` of the same data and ovirt-imageio's client, on a 1 GiB image of
half data, half zero runs.

    ./scripts/bench.sh --checksum           a 1 GiB image, 3 runs each (about a minute)
    ./scripts/bench.sh --checksum --small   a 128 MiB image, 1 run each: a smoke run

The image is written once, fully allocated (its zero runs written as zeros, as on a block
device, where nothing says what is a hole), and once sparse (the zero runs are holes a
regular file reports). Every run reads from the page cache (a first read warms it), so the
figures are the hashing's cost, not the disk's. Bytes/s is the image's size over the wall
time; the best of the runs is kept. It never fails on a timing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from worker.blkhash import hash_fd
from worker.messages import CHECKSUM_ALGORITHM, CHECKSUM_BLOCK_SIZE

MIB = 1 << 20
#: Data and zero runs of 64 MiB: longer than nbdcopy's 128 MiB zero requests in total,
#: and each a whole number of 4 MiB blocks.
RUN = 64 * MIB


def write_image(path: Path, size: int, *, sparse: bool) -> None:
    chunk = os.urandom(4 * MIB)
    zeros = bytes(4 * MIB)
    with path.open("wb") as f:
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.checksum", description=__doc__)
    parser.add_argument("--small", action="store_true", help="a 128 MiB image, one run each")
    args = parser.parse_args(argv)
    size, runs = (128 * MIB, 1) if args.small else (1024 * MIB, 3)
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
