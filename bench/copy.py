"""The copy benchmark: what a copy tool gets through an export the worker made, against
writing the same image straight to the device, measured in one run.

    ./scripts/bench.sh --copy          1 GiB image, three alternated rounds (about a minute)
    ./scripts/bench.sh --copy --small  192 MiB, one round: a smoke run for CI

The image is raw and sparse: runs of data and runs of zeros longer than 128 MiB (what
nbdcopy sends as WRITE_ZEROES). The device is a file standing in for the volume, filled
with other data before every copy (as a retried copy or a thick volume is) and synced, so
each copy starts alike. Both copies are `nbdcopy --flush` (what virt-v2v runs), so both
end durable: straight to the device, and through the export (`nbd://`, four connections).
Rounds alternate the two, and every copy is checked byte for byte (untimed). The target
is a throughput ratio >= 0.9 (export / direct, medians). It never fails on a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.driver import Driver
from bench.report import describe_machine
from bench.stack import REPO_ROOT, Stack
from harness.processes import StartFailed

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
MYSQL_URL = os.environ.get("BENCH_MYSQL_URL", "mysql://root@127.0.0.1:3306")
MIB = 1 << 20
TARGET_RATIO = 0.9


@dataclass(frozen=True)
class Layout:
    """The image: `runs` times (data_mib of data, then zero_mib of zeros)."""

    runs: int
    data_mib: int
    zero_mib: int
    rounds: int

    @property
    def size(self) -> int:
        return self.runs * (self.data_mib + self.zero_mib) * MIB


FULL = Layout(runs=2, data_mib=256, zero_mib=256, rounds=3)
SMALL = Layout(runs=1, data_mib=32, zero_mib=160, rounds=1)


@dataclass
class CopyResults:
    command: str
    started_at: str
    image_mib: int
    data_mib: int
    zero_mib: int
    machine: dict[str, str] = field(default_factory=dict)
    direct_s: list[float] = field(default_factory=list)
    export_s: list[float] = field(default_factory=list)
    identical: list[bool] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def median_mib_s(self, times: list[float]) -> float | None:
        return self.image_mib / statistics.median(times) if times else None

    @property
    def ratio(self) -> float | None:
        direct, export = self.median_mib_s(self.direct_s), self.median_mib_s(self.export_s)
        return export / direct if direct and export else None


def progress(message: str) -> None:
    print(f"bench-copy: {message}", file=sys.stderr, flush=True)


def write_image(path: Path, layout: Layout) -> None:
    block = os.urandom(MIB)
    with path.open("wb") as f:
        f.truncate(layout.size)
        for run in range(layout.runs):
            f.seek(run * (layout.data_mib + layout.zero_mib) * MIB)
            for i in range(layout.data_mib):
                # Each MiB differs, so a misplaced write shows in the comparison.
                f.write(i.to_bytes(4, "big") + block[4:])


def fill_device(path: Path, size: int) -> None:
    """Old data everywhere, on disk before the copy starts (so its writeback is not timed)."""
    block = bytes(range(256)) * (MIB // 256)
    with path.open("r+b" if path.exists() else "wb") as f:
        for _ in range(size // MIB):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def timed_copy(nbdcopy: str, source: Path, destination: str) -> float:
    started = time.monotonic()
    subprocess.run(
        [nbdcopy, "--flush", "--connections=4", str(source), destination],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    return time.monotonic() - started


def same(a: Path, b: Path) -> bool:
    return filecmp.cmp(a, b, shallow=False)


async def measure(stack: Stack, layout: Layout, results: CopyResults) -> None:
    nbdcopy = shutil.which("nbdcopy")
    if nbdcopy is None:
        raise StartFailed("nbdcopy is missing: scripts/install-system-deps.sh installs it")
    image = stack.root / "image.raw"
    device = stack.disks_dir / "copy-target"
    await asyncio.to_thread(write_image, image, layout)
    await asyncio.to_thread(fill_device, device, layout.size)
    await stack.start_server()
    await stack.start_worker("copy")
    assert stack.connection is not None
    driver = Driver(stack.connection)
    await driver.start()
    try:
        job = {
            "job_id": "bench-copy-1",
            "vm_id": "be000000-0000-0000-0000-00000000c0de",
            "vm_name": "bench-copy",
            "disk_unit_number": 0,
            "device_path": str(device),
        }
        answer = await driver.one(stack.request_queue, job, 60)
        reply = answer.reply or {}
        if reply.get("status") != "ready":
            raise StartFailed(f"the worker did not make the export: {reply or 'no reply'}")
        uri = f"nbd://{reply['nbd_host']}:{reply['nbd_port']}/{reply['export_name']}"
        for round_ in range(1, layout.rounds + 1):
            for kind, destination, times in (
                ("direct", str(device), results.direct_s),
                ("export", uri, results.export_s),
            ):
                await asyncio.to_thread(fill_device, device, layout.size)
                seconds = await asyncio.to_thread(timed_copy, nbdcopy, image, destination)
                times.append(seconds)
                identical = await asyncio.to_thread(same, image, device)
                results.identical.append(identical)
                progress(
                    f"round {round_} {kind}: {seconds:.2f} s, "
                    f"{results.image_mib / seconds:,.0f} MiB/s, identical={identical}"
                )
    finally:
        await driver.close()


def render(results: CopyResults) -> str:
    direct = results.median_mib_s(results.direct_s)
    export = results.median_mib_s(results.export_s)
    ratio = results.ratio
    lines = [
        f"Copy benchmark ({results.started_at}): `{results.command}`",
        "",
        f"Image: {results.image_mib} MiB raw ({results.data_mib} MiB data, "
        f"{results.zero_mib} MiB in zero runs), `nbdcopy --flush --connections=4`, onto a "
        "device filled with other data before each copy.",
        "",
        "| copy | runs (s) | median MiB/s |",
        "|---|---|---|",
        f"| straight to the device | {', '.join(f'{s:.2f}' for s in results.direct_s)} | "
        f"{direct or 0:,.0f} |",
        f"| through a worker-made export | {', '.join(f'{s:.2f}' for s in results.export_s)} "
        f"| {export or 0:,.0f} |",
        "",
        f"Ratio (export / direct): **{ratio:.2f} x** (target >= {TARGET_RATIO} x: "
        f"{'met' if ratio >= TARGET_RATIO else 'not met'})"
        if ratio is not None
        else "Ratio: not measured",
        f"Every copy byte-identical: {all(results.identical) and bool(results.identical)}",
    ]
    if results.machine:
        lines += ["", "Machine: " + "; ".join(f"{k} {v}" for k, v in results.machine.items())]
    lines += [f"Note: {note}" for note in results.notes]
    return "\n".join(lines) + "\n"


async def run(args: argparse.Namespace, command: str) -> int:
    layout = SMALL if args.small else FULL
    out: Path = args.out
    logs = out / "logs"
    await asyncio.to_thread(logs.mkdir, parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="nbd-bench-copy-"))
    stack = Stack(root, logs, amqp_url=AMQP_URL, mysql_url=MYSQL_URL)
    results = CopyResults(
        command=command,
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        image_mib=layout.size // MIB,
        data_mib=layout.runs * layout.data_mib,
        zero_mib=layout.runs * layout.zero_mib,
    )
    exit_code = 0
    try:
        await stack.setup()
        machine = describe_machine(nbd_server_binary=stack.nbd.binary, rabbitmq="", mariadb="")
        # The broker and the database only carry the one job that makes the export.
        results.machine = {k: v for k, v in machine.items() if k not in ("rabbitmq", "mariadb")}
        await measure(stack, layout, results)
    except StartFailed as exc:
        results.notes.append(f"the stack could not start: {exc}")
        exit_code = 1
    finally:
        await stack.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    await asyncio.to_thread(write_results, out, results)
    return exit_code


def write_results(out: Path, results: CopyResults) -> None:
    markdown = render(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "copy.json").write_text(
        json.dumps({**asdict(results), "ratio": results.ratio}, indent=2) + "\n"
    )
    (out / "copy.md").write_text(markdown)
    print(markdown, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./scripts/bench.sh --copy", description=__doc__)
    parser.add_argument("--small", action="store_true", help="a smoke run (192 MiB, one round)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    raw = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["./scripts/bench.sh", "--copy", *raw])
    return asyncio.run(run(args, command))


if __name__ == "__main__":
    raise SystemExit(main())
