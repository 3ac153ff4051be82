"""CPU time per job, by process: where a run's CPU went on a machine whose cores are shared
by the publisher, the consumer (worker or floor), RabbitMQ, MariaDB and nbd-server.

Throughput on this machine is bounded by the sum of those, so a ratio to the floor only says
how much slower; this says which process the difference is in. Read from /proc (user +
system time of every thread; with their reaped children where asked: nbd-server's
per-connection processes, the baseline worker's `nbd-client` processes)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from harness.processes import proc_stat, start_ticks

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")


def cpu_seconds(pid: int, *, children: bool = False) -> float | None:
    """utime + stime of `pid` (and of its reaped children if asked), or None if it is gone."""
    stat = proc_stat(pid)
    if stat is None:
        return None
    ticks = stat.cpu_ticks + (stat.children_cpu_ticks if children else 0)
    return ticks * _TICK_S


def pid_of(command: str) -> int | None:
    """The oldest process whose executable name is `command` (e.g. beam.smp, mariadbd)."""
    found: list[tuple[int, int]] = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != command:
                continue
            start = start_ticks(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
        if start is None:
            continue
        found.append((start, int(entry.name)))
    return min(found)[1] if found else None


class CpuMeter:
    """Snapshots the CPU time of named processes; `per_job` gives ms per job since `start`."""

    def __init__(self, pids: Mapping[str, int | None], *, with_children: frozenset[str]) -> None:
        self._pids = {label: pid for label, pid in pids.items() if pid is not None}
        self._with_children = with_children
        self._start: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        readings = {}
        for label, pid in self._pids.items():
            seconds = cpu_seconds(pid, children=label in self._with_children)
            if seconds is not None:
                readings[label] = seconds
        return readings

    def start(self) -> None:
        self._start = self._read()

    def per_job(self, jobs: int) -> dict[str, float]:
        end = self._read()
        if jobs <= 0:
            return {}
        return {
            label: (end[label] - self._start[label]) * 1000 / jobs
            for label in end
            if label in self._start
        }
