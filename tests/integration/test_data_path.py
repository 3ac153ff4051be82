"""The data path, judged with copy tools nobody here wrote: libnbd's nbdcopy and nbdinfo,
QEMU's qemu-img, through exports the worker made, onto volumes that already hold data.
Also the gate on the server's data path (the self-test) and durability on demand
(flush-export, release-export), including an fsync that fails.

Over 400 lines (budget 530) as one capability's tests, with the helpers they share.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from aio_pika.abc import AbstractConnection

from harness.nbd import UNPATCHED_SERVER_BIN, NbdServerProcess
from harness.processes import pid_running
from harness.sql import execute_sql
from harness.worker_process import env_for
from tests.conftest import (
    RunningWorker,
    Scheduler,
    job,
    run_worker_cli,
    running_worker,
    scheduler_for,
)
from worker.errors import ServerUnavailable, UnsafeServer
from worker.nbd.selftest import run_self_test
from worker.nbd.wire import CommandFailed, open_export
from worker.service import serve
from worker.settings import Settings

pytestmark = pytest.mark.integration

MIB = 1 << 20
#: Long enough for zero runs past 128 MiB (nbdcopy's zero requests) after some data.
VOLUME_BYTES = 320 * MIB


def tool(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is missing: scripts/install-system-deps.sh installs it"
    return found


def prefilled_volume(path: Path, size: int = VOLUME_BYTES) -> Path:
    """A volume that already holds data everywhere (a retried copy, a thick volume)."""
    block = bytes(range(256)) * (MIB // 256)
    with path.open("wb") as f:
        for _ in range(size // MIB):
            f.write(block)
    return path


def image_with_long_zero_runs(path: Path, size: int = VOLUME_BYTES) -> Path:
    """A sparse raw image: 16 MiB of data, a 200 MiB zero run, 8 MiB of data, zeros to the
    end (72 MiB): both runs are holes, which copy tools send as WRITE_ZEROES or TRIM."""
    with path.open("wb") as f:
        f.truncate(size)
        f.write(os.urandom(16 * MIB))
        f.seek(216 * MIB)
        f.write(os.urandom(8 * MIB))
    return path


def same_content(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)], check=False).returncode == 0


def nbd_uri(reply: dict[str, object]) -> str:
    return f"nbd://{reply['nbd_host']}:{reply['nbd_port']}/{reply['export_name']}"


async def prepare(
    scheduler: Scheduler, device: Path, vm_id: object | None = None
) -> dict[str, object]:
    reply = await scheduler.request(job(vm_id=str(vm_id) if vm_id else None, device=device))
    assert reply["status"] == "ready", reply
    return reply


async def run_tool(*argv: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """A copy tool's run, off the event loop (the worker serving it runs on that loop)."""
    return await asyncio.to_thread(
        subprocess.run, [tool(argv[0]), *argv[1:]], capture_output=True, text=True,
        timeout=timeout_s,
    )  # fmt: skip


async def used_volume_export(
    scheduler: Scheduler, volume: Path, tmp_path: Path
) -> tuple[Path, dict[str, object]]:
    """`volume` full of other data, served by a worker-made export, and a source image with
    long zero runs: what a retried copy meets."""
    prefilled_volume(volume)
    image = image_with_long_zero_runs(tmp_path / "source.img")
    return image, await prepare(scheduler, volume)


async def test_nbdcopy_flush_over_several_connections_is_byte_exact(
    worker: RunningWorker, scheduler: Scheduler, disks_dir: Path, tmp_path: Path
) -> None:
    volume = disks_dir / "vol-nbdcopy"
    image, reply = await used_volume_export(scheduler, volume, tmp_path)

    info = await run_tool("nbdinfo", "--json", nbd_uri(reply))
    assert info.returncode == 0, info.stderr
    export = json.loads(info.stdout)["exports"][0]
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert export[flag] is True, (flag, export)

    # What virt-v2v runs: --flush; four connections at once (multi-conn).
    copy = await run_tool("nbdcopy", "--flush", "--connections=4", str(image), nbd_uri(reply))
    assert copy.returncode == 0, copy.stderr
    assert same_content(image, volume)


async def test_nbdcopy_onto_a_used_block_device_is_byte_exact(
    settings: Settings, amqp: AbstractConnection, disks_dir: Path, tmp_path: Path
) -> None:
    """A block device, as on an appliance: the server zeroes it with fallocate on the
    device (blkdev_issue_zeroout), not on a file."""
    backing = prefilled_volume(tmp_path / "backing.img")
    image = image_with_long_zero_runs(tmp_path / "source.img")
    with _loop_device_on(backing) as device:
        block_settings = settings.model_copy(update={"device_roots": (disks_dir, Path("/dev"))})
        async with running_worker(block_settings):
            scheduler = await scheduler_for(amqp, block_settings)
            reply = await prepare(scheduler, device)
            copy = await run_tool(
                "nbdcopy", "--flush", "--connections=4", str(image), nbd_uri(reply)
            )
            assert copy.returncode == 0, copy.stderr
            assert same_content(image, device)
            released = await scheduler.request(
                {"type": "release-export", "job_id": "rel", "vm_id": reply["vm_id"],
                 "disk_unit_number": reply["disk_unit_number"]}
            )  # fmt: skip
            assert released["flushed"] is True
            await scheduler.channel.close()
    assert same_content(image, backing)  # on the backing file: written back, not only cached


async def test_qemu_img_convert_onto_a_used_volume_is_byte_exact(
    worker: RunningWorker, scheduler: Scheduler, disks_dir: Path, tmp_path: Path
) -> None:
    volume = disks_dir / "vol-qemu"
    image, reply = await used_volume_export(scheduler, volume, tmp_path)
    # -n: the target exists (the volume); qemu-img then writes the zero runs as well.
    copy = await run_tool(
        "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), nbd_uri(reply)
    )
    assert copy.returncode == 0, copy.stderr
    assert same_content(image, volume)


async def test_self_test_passes_the_project_build_and_fails_debians_source(
    nbd_server: NbdServerProcess, tmp_path: Path
) -> None:
    good = await run_self_test(nbd_server.binary)
    assert good.ok, good.summary()
    # On tmpfs fallocate cannot zero a range, so the server writes zeros (the path patch
    # 0001 fixed); elsewhere it zeroes by fallocate (patch 0004): both must hold.
    with tmpfs(tmp_path / "tmpfs", "96m") as scratch:
        on_tmpfs = await run_self_test(nbd_server.binary, scratch_dir=scratch)
    assert on_tmpfs.ok, on_tmpfs.summary()
    assert UNPATCHED_SERVER_BIN.exists(), "scripts/install-system-deps.sh --with-test-tools"
    bad = await run_self_test(str(UNPATCHED_SERVER_BIN))
    assert not bad.ok
    text = bad.summary()
    assert "WRITE_ZEROES of 72 MiB" in text
    assert "left old data at 70, 75 MiB" in text
    assert "TRIM" in text
    assert "deallocated nothing" in text
    assert "nbd-server/build.sh" in text


@pytest.fixture
def unpatched_server(tmp_path: Path) -> Iterator[NbdServerProcess]:
    assert UNPATCHED_SERVER_BIN.exists(), "scripts/install-system-deps.sh --with-test-tools"
    with NbdServerProcess.running(tmp_path / "unpatched", str(UNPATCHED_SERVER_BIN)) as server:
        yield server


def _against(settings: Settings, server: NbdServerProcess) -> Settings:
    return settings.model_copy(
        update={
            "nbd_config_file": server.config_file,
            "nbd_pid_file": server.pid_file,
            "nbd_conf_dir": server.conf_dir,
            "nbd_port": server.port,
        }
    )


async def test_a_server_that_loses_writes_is_refused_at_start_up(
    unpatched_server: NbdServerProcess, settings: Settings
) -> None:
    unpatched = _against(settings, unpatched_server)
    with pytest.raises(UnsafeServer) as caught:
        await serve(unpatched, asyncio.Event())
    assert "failed the data-path self-test" in str(caught.value)
    assert f"/proc/{unpatched_server.pid}/exe" in str(caught.value)

    run = await asyncio.to_thread(run_worker_cli, "run", env=env_for(unpatched))
    assert run.returncode == 3, run.stderr
    assert "Refusing to start" in run.stderr
    assert "WRITE_ZEROES of 72 MiB" in run.stderr
    assert "nbd-server/build.sh" in run.stderr

    check = await asyncio.to_thread(run_worker_cli, "check", env=env_for(unpatched))
    assert check.returncode == 1
    line = next(x for x in check.stdout.splitlines() if "data path" in x)
    assert line.startswith("FAIL")
    assert "WRITE_ZEROES of 72 MiB" in line
    self_test = await asyncio.to_thread(run_worker_cli, "self-test", env=env_for(unpatched))
    assert self_test.returncode == 1
    assert "failed the data-path self-test" in self_test.stdout
    # Nothing was signalled: the server still runs with its first pid.
    assert unpatched_server.pid_file.read_text().strip() == str(unpatched_server.pid)


async def test_the_override_accepts_a_failing_server_with_a_warning(
    unpatched_server: NbdServerProcess,
    settings: Settings,
    amqp: AbstractConnection,
    disks_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    accepted = _against(settings, unpatched_server).model_copy(
        update={"accept_failed_self_test": True}
    )
    async with running_worker(accepted) as running:
        assert running.sample("nbd_server_data_path_ok") == 0
        assert running.sample("nbd_server_self_tests_total", {"result": "failed"}) == 1
        scheduler = await scheduler_for(amqp, accepted)
        volume = disks_dir / "vol-accepted"
        volume.write_bytes(bytes(MIB))
        reply = await scheduler.request(job(device=volume))
        assert reply["action"] == "created"
        await scheduler.channel.close()
    assert "FAILED the data-path self-test" in caplog.text


async def test_flush_export_and_release_export_fsync_the_device(
    worker: RunningWorker, scheduler: Scheduler, disks_dir: Path
) -> None:
    volume = disks_dir / "vol-flush"
    volume.write_bytes(bytes(4 * MIB))
    ready = await prepare(scheduler, volume)
    flush = {"type": "flush-export", "job_id": "flush-1", "vm_id": ready["vm_id"]}
    flush["disk_unit_number"] = ready["disk_unit_number"]
    flushed = await scheduler.request(flush)
    assert flushed == {
        "status": "flushed",
        "job_id": "flush-1",
        "vm_id": ready["vm_id"],
        "disk_unit_number": ready["disk_unit_number"],
        "export_name": ready["export_name"],
        "device_path": str(volume),
        "node_id": worker.settings.node_id,
    }
    # Recorded like every job: a redelivery repeats the answer without a second fsync.
    assert await scheduler.request(flush) == flushed
    assert worker.sample("nbd_export_flushes_total", {"result": "flushed"}) == 1

    release = {**flush, "type": "release-export", "job_id": "release-1"}
    released = await scheduler.request(release)
    assert released["status"] == "released"
    assert released["flushed"] is True
    assert worker.sample("nbd_export_flushes_total", {"result": "flushed"}) == 2
    again = await scheduler.request({**flush, "job_id": "flush-2"})
    assert again["status"] == "error"
    assert again["error"]["code"] == "export_not_found"


async def flush_fails_and_stays_failed(
    scheduler: Scheduler, key: dict[str, object], errno_name: str
) -> None:
    """flush-export fails naming `errno_name`, and the failure is kept: a second flush and
    a release fail too (their own fsyncs would succeed: the kernel reports an error once)."""
    failed = await scheduler.request({"type": "flush-export", "job_id": "flush-a", **key})
    assert failed["status"] == "error", failed
    assert failed["error"]["code"] == "flush_failed"
    assert failed["error"]["errno"] == errno_name
    again = await scheduler.request({"type": "flush-export", "job_id": "flush-b", **key})
    assert again["error"]["code"] == "flush_failed"
    assert "an earlier flush" in again["error"]["message"]
    refused = await scheduler.request({"type": "release-export", "job_id": "release-a", **key})
    assert refused["status"] == "error"
    assert refused["error"]["code"] == "flush_failed"


@contextlib.contextmanager
def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `mount` (created) for the block; unmounted after."""
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@contextlib.contextmanager
def failing_block_device(root: Path) -> Iterator[tuple[Path, Path]]:
    """A loop device whose backing file sits on a tmpfs too small for it: writes land in the
    page cache, and the fsync that pushes them down fails with EIO. Yields the device and
    the tmpfs mount point (remount it larger to make fsync succeed again)."""
    with tmpfs(root / "small-fs", "4m") as mount, _loop_device(mount) as device:
        yield device, mount


@contextlib.contextmanager
def _loop_device(mount: Path) -> Iterator[Path]:
    backing = mount / "backing.img"
    with backing.open("wb") as f:
        f.truncate(64 * MIB)
    with _loop_device_on(backing) as device:
        yield device


@contextlib.contextmanager
def _loop_device_on(backing: Path) -> Iterator[Path]:
    """A loop device over `backing`, detached on exit."""
    device = subprocess.run(
        ["losetup", "--find", "--show", str(backing)],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    try:
        yield Path(device)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


async def test_a_failed_fsync_is_an_error_that_no_later_flush_hides(
    settings: Settings, amqp: AbstractConnection, tmp_path: Path, disks_dir: Path
) -> None:
    with failing_block_device(tmp_path) as (device, mount):
        block_settings = settings.model_copy(update={"device_roots": (disks_dir, Path("/dev"))})
        async with running_worker(block_settings) as running:
            scheduler = await scheduler_for(amqp, block_settings)
            ready = await prepare(scheduler, device)
            # 32 MiB through the export, no flush: it sits in the page cache, as a copy
            # tool that never flushes leaves it; the loop device cannot write it back.
            image = tmp_path / "data.img"
            image.write_bytes(os.urandom(32 * MIB))
            copy = await run_tool(
                "nbdcopy", "--no-extents", str(image), nbd_uri(ready), timeout_s=60
            )
            assert copy.returncode == 0, copy.stderr
            key = {"vm_id": ready["vm_id"], "disk_unit_number": ready["disk_unit_number"]}

            # An fsync now would succeed (the kernel reports a writeback error once per
            # file), but the data is gone: neither a flush nor a release may say otherwise.
            await flush_fails_and_stays_failed(scheduler, key, "EIO")
            release = {"type": "release-export", "job_id": "r-1", **key}
            rows = await execute_sql(
                settings.database_url,
                "SELECT status FROM vm_export_mappings WHERE export_name = %s",
                (ready["export_name"],),
            )
            assert rows == [("active",)]  # the mapping is as it was
            assert running.sample("nbd_export_flushes_total", {"result": "failed"}) == 1

            # Retried as a scheduler would: room on the volume, a new prepare-export, the
            # copy again, then the flush.
            subprocess.run(["mount", "-o", "remount,size=128m", str(mount)], check=True)
            assert (await prepare(scheduler, device, ready["vm_id"]))["action"] == "reused"
            copy = await run_tool(
                "nbdcopy", "--no-extents", str(image), nbd_uri(ready), timeout_s=60
            )
            assert copy.returncode == 0, copy.stderr
            ok = await scheduler.request({"type": "flush-export", "job_id": "f-3", **key})
            assert ok["status"] == "flushed", ok
            released = await scheduler.request({**release, "job_id": "r-2"})
            assert released["status"] == "released"
            assert released["flushed"] is True
            await scheduler.channel.close()
        with device.open("rb") as f:
            assert f.read(32 * MIB) == image.read_bytes()


async def test_exports_loaded_without_flush_are_named_until_a_restart(
    settings: Settings, amqp: AbstractConnection, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    # An export made as before this change: its section sets no data-path option.
    old_options = settings.model_copy(
        update={"export_flush": False, "export_fua": False, "export_trim": False}
    )
    volume = disks_dir / "vol-old"
    volume.write_bytes(bytes(4 * MIB))
    async with running_worker(old_options):
        scheduler = await scheduler_for(amqp, old_options)
        ready = await prepare(scheduler, volume)
        await scheduler.channel.close()
    name = str(ready["export_name"])
    snippet = settings.nbd_conf_dir / f"{name}.conf"
    assert "flush = false" in snippet.read_text()

    status = await asyncio.to_thread(run_worker_cli, "status", "--json", env=env_for(settings))
    assert status.returncode == 0, status.stderr
    (row,) = json.loads(status.stdout)
    assert row["data_path"]["can_flush"] is False
    assert row["data_path"]["can_trim"] is False
    dry = await asyncio.to_thread(run_worker_cli, "reconcile", "--dry-run", env=env_for(settings))
    assert dry.returncode == 0, dry.stderr
    without_flush = "exports served without FLUSH (loaded before; a restart of nbd-server fixes)"
    assert f"{without_flush}: 1\n  {name}\n" in dry.stdout
    assert f"snippets to rewrite: 1\n  {name}\n" in dry.stdout
    assert "flush = false" in snippet.read_text(), "a dry run changes nothing"
    refused = await run_tool("nbdcopy", "--flush", str(volume), nbd_uri(ready), timeout_s=60)
    assert refused.returncode != 0
    assert "does not support flush" in refused.stderr

    # The worker (start-up reconciliation) rewrites the snippet, so a restart brings FLUSH,
    # and its drift gauge names the count meanwhile.
    async with running_worker(settings) as running:
        assert running.sample("nbd_export_reconcile_drift", {"kind": "no_flush"}) == 1
        assert "flush = true" in snippet.read_text()
        scheduler = await scheduler_for(amqp, settings)
        assert (await prepare(scheduler, volume, ready["vm_id"]))["action"] == "reused"
        await scheduler.channel.close()
    nbd_server.stop()
    nbd_server.start()
    async with running_worker(settings) as running:
        assert running.sample("nbd_export_reconcile_drift", {"kind": "no_flush"}) == 0
    copy = await run_tool("nbdcopy", "--flush", str(volume), nbd_uri(ready), timeout_s=60)
    assert copy.returncode == 0, copy.stderr


async def test_a_fua_write_that_is_not_durable_fails_and_the_next_flush_fails_too(
    settings: Settings, amqp: AbstractConnection, tmp_path: Path, disks_dir: Path
) -> None:
    """nbd-server's own fdatasync (FUA) spends the kernel's one report of a writeback error.
    The FUA write must say so (patch 0005), and flush-export must see it anyway: it fsyncs
    the descriptor the worker opened when it prepared the export."""
    with failing_block_device(tmp_path) as (device, _):
        block_settings = settings.model_copy(update={"device_roots": (disks_dir, Path("/dev"))})
        async with running_worker(block_settings):
            scheduler = await scheduler_for(amqp, block_settings)
            ready = await prepare(scheduler, device)
            name = str(ready["export_name"])
            async with open_export("127.0.0.1", settings.nbd_port, name, 30) as export:
                await export.write(0, os.urandom(8 * MIB))  # more than the volume can hold
                with pytest.raises(CommandFailed):
                    await export.write(8 * MIB, os.urandom(MIB), fua=True)
            # The error has been reported once: a descriptor opened now sees nothing.
            fresh = os.open(device, os.O_RDONLY)
            try:
                os.fsync(fresh)
            finally:
                os.close(fresh)
            key = {"vm_id": ready["vm_id"], "disk_unit_number": ready["disk_unit_number"]}
            await flush_fails_and_stays_failed(scheduler, key, "EIO")
            await scheduler.channel.close()


async def test_a_self_test_that_cannot_run_is_no_verdict(tmp_path: Path) -> None:
    """A binary that never serves the test says nothing of a data path: ServerUnavailable
    (retried), not a failed result (a refusal for the server's whole life)."""
    fake = tmp_path / "not-nbd-server"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(ServerUnavailable, match="did not start"):
        await run_self_test(str(fake), timeout_s=20)
    with pytest.raises(ServerUnavailable, match=r"did not start|could not run"):
        await run_self_test(str(tmp_path / "missing"), timeout_s=20)


async def test_a_server_restarted_with_a_bad_binary_is_refused_reuse_included(
    worker: RunningWorker, scheduler: Scheduler, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    """Vetted for each new main pid, not only at start-up: a server restarted with a binary
    that loses writes gets no SIGHUP, and its exports are not handed out either."""
    volume = disks_dir / "vol-served"
    volume.write_bytes(bytes(MIB))
    served = await prepare(scheduler, volume)
    assert worker.sample("nbd_server_data_path_ok") == 1
    nbd_server.stop()
    bad = NbdServerProcess(nbd_server.root, binary=str(UNPATCHED_SERVER_BIN), port=nbd_server.port)
    bad.start()  # the same config and snippets: the served export is loaded again
    try:
        reuse = await scheduler.request(job(vm_id=str(served["vm_id"]), device=volume))
        assert reuse["status"] == "error", reuse
        assert reuse["error"]["code"] == "nbd_server_unavailable"
        assert "failed the data-path self-test" in reuse["error"]["message"]
        other = disks_dir / "vol-new"
        other.write_bytes(bytes(MIB))
        create = await scheduler.request(job(device=other))
        assert create["error"]["code"] == "nbd_server_unavailable"
        assert bad.pid_file.read_text().strip() == str(bad.pid)  # never signalled
        assert pid_running(bad.pid)
        assert worker.sample("nbd_server_data_path_ok") == 0
    finally:
        bad.stop()
