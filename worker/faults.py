"""Fault injection for the fault suite (tests/integration/test_faults.py): a real `kill -9`
of the worker at a named step of a create, so the suite can prove that the next start
repairs every such state. Off unless EXPORT_WORKER_CRASH_AT names a step. The first time
any work reaches that step, reconciliation's creates and answers repeated from a record
included, the process dies: start the next worker without it.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Literal, get_args

log = logging.getLogger(__name__)

#: The steps of a create, in order: the mapping row claimed; the snippet and link written;
#: the SIGHUP sent (export not yet verified); verified, job not yet recorded; recorded,
#: reply not yet published.
CrashPoint = Literal[
    "after_claim", "after_snippet", "after_sighup", "before_record", "before_reply"
]
CRASH_POINTS: tuple[CrashPoint, ...] = get_args(CrashPoint)

_armed: CrashPoint | None = None


def arm(point: CrashPoint | None) -> None:
    global _armed
    _armed = point
    if point is not None:
        log.warning("Fault injection armed: the worker kills itself at step %s", point)


def crash_point(point: CrashPoint) -> None:
    """Kills this process with SIGKILL (no cleanup, no flush) if `point` is armed."""
    if _armed == point:
        os.kill(os.getpid(), signal.SIGKILL)
