"""Fault injection for the fault suite (tests/integration/test_faults.py) and the
redelivery tests (tests/integration/test_redelivery.py): a real `kill -9` of the worker at a
named step of a job, so the suites can prove that the next start repairs every such state
and that the job's redelivery answers as its first delivery would have. Off unless
EXPORT_WORKER_CRASH_AT names a step. The first time any work reaches that step,
reconciliation's creates and answers repeated from a record included, the process dies:
start the next worker without it.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Literal, get_args

log = logging.getLogger(__name__)

#: The steps of a create (or a recreate, a relink), in order: the mapping row claimed; the
#: snippet and link written; the SIGHUP sent (export not yet verified); verified, job not
#: yet recorded; recorded, reply not yet published.
CreateStep = Literal[
    "after_claim", "after_snippet", "after_sighup", "before_record", "before_reply"
]
#: The other jobs' steps once their work is done, before their reply: a reuse (its record
#: not yet written), a flush and a release (not yet recorded), and a failed fsync (its
#: failure kept on the mapping, the error not yet answered); a checksum half hashed (its
#: request acked, its row recorded).
OtherStep = Literal[
    "reuse_before_record",
    "flush_before_record",
    "release_before_record",
    "flush_failure_kept",
    "checksum_half_hashed",
]
CrashPoint = CreateStep | OtherStep
#: The steps of a create: the fault suite kills a worker at each.
CRASH_POINTS: tuple[CreateStep, ...] = get_args(CreateStep)

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
