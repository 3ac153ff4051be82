"""Processes by pid, as /proc tells them: whether one runs, when it started (with the pid,
that names one process), its process group, its memory; and a process group stopped.

/proc/PID/stat is read through worker.nbd.process.parse_stat, its one parser; /proc/PID/status
and /proc/meminfo through `memory_kib`."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from worker.nbd.process import ProcStat, parse_stat

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
    for stat_file in _PROC.glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = parse_stat(stat_file.read_text())
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
