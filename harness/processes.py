"""Processes by pid, as /proc tells them: whether one runs, when it started (with the pid,
that names one process), its process group, its memory; a process group stopped; and a
child process of the tests or the benchmark, logging to a file, stopped by its pid.

/proc/PID/stat is read through worker.nbd.process.parse_stat, its one parser; /proc/PID/status
and /proc/meminfo through `memory_kib`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from worker.nbd.process import ProcStat, parse_stat

log = logging.getLogger(__name__)
_PROC = Path("/proc")


def proc_stat(pid: int) -> ProcStat | None:
    """/proc/`pid`/stat, parsed; None if there is no such process."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return parse_stat(text)


def pid_running(pid: int) -> bool:
    """Whether `pid` is a live process (not a zombie)."""
    stat = proc_stat(pid)
    return stat is not None and stat.state not in ("Z", "X")


def start_ticks(pid: int) -> int | None:
    """When `pid` started (clock ticks after boot), or None if it is gone: with the pid it
    names one process, so a recorded pid that was since reused is never signalled."""
    stat = proc_stat(pid)
    return None if stat is None else stat.start_ticks


def running(pid: int, started: int) -> bool:
    """Whether the process recorded as (`pid`, `started`) is still running."""
    return bool(pid) and start_ticks(pid) == started and pid_running(pid)


def group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is still in process group `pgid`."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)  # our own child's zombie leaves the group
    # Not Path.glob: a process that ends while /proc is listed makes its stat() fail with
    # ESRCH, which glob does not ignore (it failed a test's teardown once).
    for entry in os.listdir(_PROC):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = parse_stat((_PROC / entry / "stat").read_text())
            if stat.pgrp == pgid and stat.state not in ("Z", "X"):
                return True
    return False


def stop_group(pid: int, started: int, sig: int = signal.SIGTERM, timeout_s: float = 60) -> None:
    """Signals the process group `pid` leads (a process started with a session of its own:
    a cluster node with its helpers, such as the VM a RabbitMQ script forks or a Galera
    state transfer) and waits for all of it to go; SIGKILL after `timeout_s`. A no-op when
    the group is gone, or when `pid` now names another process: Linux does not reuse a pid
    while a group of that id has members, so a reused pid means ours has none left."""
    if not pid:
        return
    ticks = start_ticks(pid)
    if ticks is not None and ticks != started:
        return
    if not group_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
    deadline = time.monotonic() + timeout_s
    while group_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if group_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while group_alive(pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for process group {pid} to exit")
            time.sleep(0.01)


def memory_kib(field: str, pid: int | None = None) -> int | None:
    """A `<field>: <n> kB` line of /proc/`pid`/status (VmRSS: the resident set now; VmHWM:
    its high-water mark) or, without a pid, of /proc/meminfo (MemTotal): n, in KiB. None
    if the process, or the field, is gone."""
    path = _PROC / "meminfo" if pid is None else _PROC / str(pid) / "status"
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return None


class StartFailed(Exception):
    """A process of the stack did not come up; the message has the tail of its log."""


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    """A child process of the tests or the benchmark, stopped and killed by its pid only,
    its stdout and stderr in one log: the file `log_path`, or an unnamed temporary file
    (read back with `output`). In a session of its own by default, so that a Ctrl-C in the
    terminal reaches the benchmark only, which then stops it in order."""

    def __init__(
        self,
        label: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path | None = None,
        *,
        cwd: Path | None = None,
        own_session: bool = True,
    ) -> None:
        self.label = label
        self.log_path = log_path
        self._log: IO[bytes] = (
            log_path.open("w+b") if log_path is not None else tempfile.TemporaryFile()  # noqa: SIM115
        )
        #: The log once closed (by `stop`, or `wait` once it has exited).
        self._output: bytes | None = None
        self.popen = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=own_session,
        )
        self.pid = self.popen.pid
        self.peak_rss_kib: int | None = None
        self.exit_code: int | None = None

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """Its exit status once it has exited (-9: killed by SIGKILL), else None."""
        return self.popen.poll()

    def output(self) -> bytes:
        """Everything it has written so far."""
        if self._output is not None:
            return self._output
        # At offset 0, leaving the file position (which the child writes at) alone.
        fd = self._log.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0)

    def lines(self) -> list[str]:
        """Its log, line by line (each with its newline)."""
        return self.output().decode(errors="replace").splitlines(keepends=True)

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.output().decode(errors="replace").splitlines()[-lines:])

    def _close_log(self) -> None:
        if self._output is None:
            self._output = self.output()
            self._log.close()

    async def wait_for_line(self, marker: str, timeout_s: float) -> None:
        """Returns once `marker` appears in the log; raises StartFailed if the process exits
        or the timeout passes first."""
        deadline = time.monotonic() + timeout_s
        needle = marker.encode()
        while True:
            if needle in self.output():
                return
            if not self.running:
                self.exit_code = self.popen.returncode
                raise StartFailed(
                    f"{self.label} exited with code {self.exit_code} before '{marker}':\n"
                    f"{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise StartFailed(
                    f"{self.label} did not print '{marker}' within {timeout_s:g} s:\n{self.tail()}"
                )
            await asyncio.sleep(0.05)

    async def wait(self, timeout_s: float) -> int:
        """Its exit status once it has exited; raises TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while (code := self.popen.poll()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.label} (pid {self.pid}) did not exit")
            await asyncio.sleep(0.02)
        self.exit_code = code
        self._close_log()
        return code

    def send_signal(self, sig: int) -> None:
        """`sig` to this pid only; a no-op once it has exited."""
        self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, as a crash would end it."""
        self.send_signal(signal.SIGKILL)

    async def stop(self, timeout_s: float = 30.0) -> int | None:
        """Reads the peak RSS, then SIGTERM to this pid and a wait; SIGKILL (this pid only)
        if it does not exit in time. Returns the exit code."""
        if self.running:
            self.peak_rss_kib = memory_kib("VmHWM", self.pid) or self.peak_rss_kib
            self.popen.send_signal(signal.SIGTERM)
            try:
                await self.wait(timeout_s)
            except TimeoutError:
                log.warning("%s (pid %d) ignored SIGTERM; killing it", self.label, self.pid)
                self.popen.kill()
                await self.wait(10)
        self.exit_code = self.popen.returncode
        self._close_log()
        return self.exit_code

    def stop_now(self) -> None:
        """The synchronous last resort (the event loop is gone): same order, shorter waits."""
        if self.running:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._close_log()
