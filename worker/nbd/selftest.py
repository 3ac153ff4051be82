"""The data-path self-test: does this nbd-server binary keep what a copy tool writes?

A version number cannot tell: every Debian nbd-server zeroes only the first 64 MiB of a
longer WRITE_ZEROES and answers success (nbd-server-facts.md, "The data path"). So the
binary itself is tried, the way a copy tool uses an export, on a private instance: its own
temporary config, a free loopback port and a sparse scratch file; never the production
server or its exports. The steps: the export must advertise FLUSH, FUA, TRIM and
WRITE_ZEROES; a pattern is written, a WRITE_ZEROES longer than 64 MiB zeroes over part of
it, FLUSH, a FUA write, everything read back; then a TRIM in the export's second half must
deallocate that range of the scratch file. Once per server pid.

It runs twice in the one private server: on a scratch file in the temporary directory and
on one in /dev/shm (tmpfs). The project's server zeroes by fallocate where it can (ext4,
xfs, block devices) and writes zeros where it cannot (tmpfs, unaligned ranges): both paths
must keep the data.

A result is a verdict on the binary. A test that could not be run (the binary cannot be
executed, the private server does not start, the scratch directory cannot be written)
raises ServerUnavailable instead: that says nothing of the binary, and is tried again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from worker.errors import ServerUnavailable
from worker.nbd.wire import NBDMAGIC, CommandFailed, Transmission, open_export

MIB = 1 << 20
BLOCK = MIB
SCRATCH_BYTES = 80 * MIB
#: Longer than nbd-server's 64 MiB zero buffer, so a loop that never advances shows.
ZERO_START, ZERO_END = 4 * MIB, 76 * MIB
#: Blocks inside the zero range that must read back as zeros (70 MiB: past its first 64).
ZEROED_BLOCKS = (4 * MIB, 40 * MIB, 70 * MIB, 75 * MIB)
#: Blocks outside it that must keep the pattern.
KEPT_BLOCKS = (0, 76 * MIB)
FUA_BLOCK = 78 * MIB
#: In the export's second half, where nbd-server 3.26.1 computes a negative trim length.
TRIM_START, TRIM_END = 44 * MIB, 76 * MIB
EXPORT = "self-test"
START_TIMEOUT_S = 5.0
#: Where the second scratch file goes: a tmpfs, where fallocate cannot zero a range.
TMPFS_DIR = Path("/dev/shm")  # noqa: S108 - only a private mkdtemp directory inside it
PORT_TRIES = 3
#: Free space a scratch directory needs: where zeros are written, the scratch file fills up.
SCRATCH_SPACE = SCRATCH_BYTES + 16 * MIB
#: Scratch directories left by a worker killed mid-test are removed after this long.
STALE_AFTER_S = 600
PREFIX = "nbd-export-worker-selftest-"
NBD_ENOSPC = 28
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

#: Named in every refusal.
HOW_TO_FIX = (
    "install the project's nbd-server build (nbd-server/build.sh: Debian's source with the "
    "patches in nbd-server/patches/), then restart nbd-server"
)


@dataclass(frozen=True)
class SelfTestResult:
    binary: str
    failures: tuple[str, ...]
    #: Steps that could not be checked here (not failures), e.g. no hole punching.
    notes: tuple[str, ...] = ()
    duration_s: float = 0.0
    checked_at: float = field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        if self.ok:
            text = (
                f"{self.binary} passed the data-path self-test (write, WRITE_ZEROES of "
                f"{(ZERO_END - ZERO_START) // MIB} MiB, FLUSH, FUA, TRIM, read back) in "
                f"{self.duration_s:.2f} s"
            )
        else:
            text = (
                f"{self.binary} failed the data-path self-test: {'; '.join(self.failures)}. "
                f"It would corrupt or lose what copy tools write; {HOW_TO_FIX}"
            )
        return text + "".join(f" (note: {note})" for note in self.notes)


def _pattern(offset: int) -> bytes:
    """A block of data that differs per offset, so a misplaced write shows too."""
    seed = hashlib.sha256(offset.to_bytes(8, "big")).digest()
    return (seed * (BLOCK // len(seed) + 1))[:BLOCK]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _can_punch_holes(directory: Path) -> bool:
    """Whether the scratch filesystem deallocates punched ranges (tmpfs, ext4, xfs do):
    only then does a still-allocated trimmed range mean the server did not trim."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    probe = directory / "punch-probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.pwrite(fd, b"x" * (4 * MIB), 0)
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if libc.fallocate(fd, mode, 0, 4 * MIB) != 0:
            return False
        return os.fstat(fd).st_blocks == 0
    finally:
        os.close(fd)
        probe.unlink()


def _allocated_in(path: Path, start: int, end: int) -> bool:
    """Whether any data is allocated in [start, end) of the file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, start, os.SEEK_DATA) < end
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data at or after start
            return False
        raise
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Scratch:
    export: str
    path: Path
    punch: bool
    where: str


class PrivateServer:
    """One nbd-server of the binary under test, in the foreground, as our own child, with
    one export per scratch file."""

    def __init__(
        self,
        binary: str,
        workdir: Path,
        scratches: list[Scratch],
        *,
        generic: tuple[str, ...] = (),
        export_options: tuple[str, ...] = (),
    ) -> None:
        self._binary = binary
        self._workdir = workdir
        self._scratches = scratches
        self._generic = generic
        self._export_options = export_options
        self.port = 0
        self._process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def _write_config(self) -> Path:
        config = self._workdir / "config"
        lines = ["[generic]", f"    port = {self.port}", "    listenaddr = 127.0.0.1"]
        lines += [f"    {line}" for line in self._generic]
        for scratch in self._scratches:
            lines += [f"[{scratch.export}]", f"    exportname = {scratch.path}"]
            lines += ["    flush = true", "    fua = true", "    trim = true"]
            lines += [f"    {line}" for line in self._export_options]
        config.write_text("\n".join(lines) + "\n")
        return config

    def _argv(self, config: Path) -> list[str]:
        # -n: foreground, so it stays our child and writes no pid file anywhere. setpriv
        # (util-linux) makes it die with us should the worker be killed mid-test.
        argv = [self._binary, "-n", "-C", str(config)]
        setpriv = shutil.which("setpriv")
        return [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else argv

    async def start(self) -> None:
        for scratch in self._scratches:
            with scratch.path.open("wb") as f:
                f.truncate(SCRATCH_BYTES)
        log_path = self._workdir / "server.log"
        for _ in range(PORT_TRIES):
            self.port = _free_port()
            config = self._write_config()
            with log_path.open("ab") as log:
                self._process = await asyncio.create_subprocess_exec(
                    *self._argv(config),
                    stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                )  # fmt: skip
            if await self._serving():
                return
            await self.stop()
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        raise ServerUnavailable(
            f"a private instance of {self._binary} did not start: {' | '.join(tail) or 'no output'}"
        )

    async def _serving(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process is None or self._process.returncode is not None:
                return False
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError):
                async with asyncio.timeout(1):
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    try:
                        if await reader.readexactly(8) == NBDMAGIC.to_bytes(8, "big"):
                            return True
                    finally:
                        writer.close()
            await asyncio.sleep(0.02)
        return False

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()  # the main process ends its per-connection children itself
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()


async def _exercise(export: Transmission, scratch: Scratch) -> list[str]:
    failures: list[str] = []
    flags = export.info.flags
    for wanted, name in (
        (flags.can_flush, "FLUSH"),
        (flags.can_fua, "FUA"),
        (flags.can_trim, "TRIM"),
        (flags.can_zero, "WRITE_ZEROES"),
    ):
        if not wanted:
            failures.append(f"it does not advertise {name} for an export that asks for it")
    if flags.read_only:
        return [*failures, "it serves a writable export read-only"]
    for offset in (*KEPT_BLOCKS, *ZEROED_BLOCKS):
        await export.write(offset, _pattern(offset))
    await export.write_zeroes(ZERO_START, ZERO_END - ZERO_START)
    await export.flush()
    await export.write(FUA_BLOCK, _pattern(FUA_BLOCK), fua=True)
    stale = [offset for offset in ZEROED_BLOCKS if await export.read(offset, BLOCK) != bytes(BLOCK)]
    if stale:
        failures.append(
            f"a WRITE_ZEROES of {(ZERO_END - ZERO_START) // MIB} MiB from "
            f"{ZERO_START // MIB} MiB reported success but left old data at "
            f"{', '.join(str(offset // MIB) for offset in stale)} MiB"
        )
    for offset in (*KEPT_BLOCKS, FUA_BLOCK):
        if await export.read(offset, BLOCK) != _pattern(offset):
            failures.append(f"data written at {offset // MIB} MiB did not read back")
    if flags.can_trim and scratch.punch:
        await export.trim(TRIM_START, TRIM_END - TRIM_START)
        if await asyncio.to_thread(_allocated_in, scratch.path, TRIM_START, TRIM_END):
            failures.append(
                f"a TRIM of {TRIM_START // MIB}-{TRIM_END // MIB} MiB reported success but "
                "deallocated nothing"
            )
        if await export.read(KEPT_BLOCKS[-1], BLOCK) != _pattern(KEPT_BLOCKS[-1]):
            failures.append("a TRIM destroyed data outside its range")
    return failures


def _is_tmpfs(path: Path) -> bool:
    try:
        with open("/proc/self/mounts") as mounts:
            return any(
                line.split()[1] == str(path) and line.split()[2] == "tmpfs" for line in mounts
            )
    except OSError:
        return False


def _free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _remove_stale(parent: Path) -> None:
    """Scratch directories of tests that never ended (a worker killed mid-test)."""
    cutoff = time.time() - STALE_AFTER_S
    with contextlib.suppress(OSError):
        for stale in parent.glob(f"{PREFIX}*"):
            with contextlib.suppress(OSError):
                if stale.is_dir() and stale.stat().st_mtime < cutoff:
                    shutil.rmtree(stale)


@contextlib.contextmanager
def _scratch_dirs(scratch_dir: Path | None, notes: list[str]) -> Iterator[list[Path]]:
    """The temporary directory (or `scratch_dir`), and a directory on /dev/shm when that is
    a writable tmpfs with room; removed on exit. Raises ServerUnavailable when the first
    has no room: that says nothing of the binary."""
    parent = Path(scratch_dir or tempfile.gettempdir())
    _remove_stale(parent)
    if _free_bytes(parent) < SCRATCH_SPACE:
        raise ServerUnavailable(
            f"the self-test needs {SCRATCH_SPACE // MIB} MiB free in {parent} (TMPDIR)"
        )
    with contextlib.ExitStack() as stack:
        dirs = [Path(stack.enter_context(_tempdir(parent)))]
        if scratch_dir is None and _is_tmpfs(TMPFS_DIR) and os.access(TMPFS_DIR, os.W_OK):
            _remove_stale(TMPFS_DIR)
            if _free_bytes(TMPFS_DIR) >= SCRATCH_SPACE:
                dirs.append(Path(stack.enter_context(_tempdir(TMPFS_DIR))))
            else:
                notes.append(
                    f"not run on tmpfs: {TMPFS_DIR} has less than {SCRATCH_SPACE // MIB} MiB free"
                )
        yield dirs


def _tempdir(parent: Path) -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix=PREFIX, dir=parent)


async def run_self_test(
    binary: str, *, timeout_s: float = 30.0, scratch_dir: Path | None = None
) -> SelfTestResult:
    """Runs the test against a private instance of `binary`; the result is its verdict.
    Raises ServerUnavailable when the test could not be run at all."""
    started = time.monotonic()
    notes: list[str] = []
    failures: list[str] = []
    opened = False
    try:
        with _scratch_dirs(scratch_dir, notes) as dirs:
            scratches = []
            for i, directory in enumerate(dirs):
                punch = await asyncio.to_thread(_can_punch_holes, directory)
                where = "on tmpfs" if i else f"in {directory.parent}"
                if not punch:
                    notes.append(f"TRIM not verified {where}: it cannot punch holes")
                name = f"{EXPORT}-{i}"
                scratches.append(Scratch(name, directory / "scratch.img", punch, where))
            server = PrivateServer(binary, dirs[0], scratches)
            try:
                async with asyncio.timeout(timeout_s):
                    await server.start()
                    for scratch in scratches:
                        async with open_export(
                            "127.0.0.1", server.port, scratch.export, timeout_s
                        ) as export:
                            opened = True
                            found = await _exercise(export, scratch)
                        prefix = f"{scratch.where}: " if len(scratches) > 1 and found else ""
                        failures += [prefix + failure for failure in found]
            finally:
                await server.stop()
    except TimeoutError:
        if not opened:
            raise ServerUnavailable(
                f"the self-test of {binary} could not start within {timeout_s:g} s"
            ) from None
        failures.append(f"it did not complete the test within {timeout_s:g} s")
    except ServerUnavailable as exc:
        if not opened:
            raise  # it never served the test: nothing is known of its data path
        if isinstance(exc, CommandFailed) and exc.error == NBD_ENOSPC:
            raise ServerUnavailable(f"the self-test of {binary} ran out of scratch space") from exc
        failures.append(str(exc))  # it dropped or refused the test midway
    except OSError as exc:
        raise ServerUnavailable(f"the self-test of {binary} could not run: {exc}") from exc
    return SelfTestResult(binary, tuple(failures), tuple(notes), time.monotonic() - started)
