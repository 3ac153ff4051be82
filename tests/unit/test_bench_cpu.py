"""The benchmark's CPU accounting reads /proc correctly."""

import os
import time

from bench.cpu import CpuMeter, cpu_seconds, pid_of


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cpu_seconds_follows_this_process_cpu_time() -> None:
    before = cpu_seconds(os.getpid())
    _spin(0.2)
    after = cpu_seconds(os.getpid())
    assert before is not None
    assert after is not None
    assert 0.15 <= after - before <= 1.0


def test_meter_gives_ms_per_job_and_skips_missing_processes() -> None:
    meter = CpuMeter({"me": os.getpid(), "gone": None}, with_children=frozenset())
    meter.start()
    _spin(0.1)
    per_job = meter.per_job(10)
    assert set(per_job) == {"me"}
    assert 7 <= per_job["me"] <= 100  # ~10 ms of CPU per job, give or take the tick


def test_pid_of_finds_the_oldest_process_by_name() -> None:
    assert pid_of("no-such-command-here") is None
    # pid 1 exists everywhere; its name is whatever this machine's init is.
    with open("/proc/1/comm") as f:
        init = f.read().strip()
    assert pid_of(init) == 1
