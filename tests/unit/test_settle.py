"""The settle policy and the job retry policy (worker/settle.py), as tables."""

from __future__ import annotations

import pytest
from tenacity import RetryCallState

from worker.errors import (
    ConfigWriteError,
    DatabaseError,
    DeviceInUse,
    DeviceNotFound,
    FlushFailed,
    InvalidRequest,
    RestartRequired,
    ServerMisconfigured,
    ServerUnavailable,
    Superseded,
    TransientDatabaseError,
    WorkerError,
)
from worker.messages import ErrorCode
from worker.settle import Outcome, Settle, is_last_delivery, job_retry_policy, settle_for

ACK, DEAD, REQUEUE = Settle.ACK, Settle.DEAD_LETTER, Settle.REQUEUE
LIMIT = 5  # returns a job may have: deliveries 1 to 5 may requeue, the 6th is the last

# (failure, this delivery (1 = first), expected outcome)
TABLE: list[tuple[str, BaseException, int, Outcome]] = [
    ("transient, first delivery: back to the queue, no reply",
     ServerUnavailable("down"), 1, Outcome(REQUEUE, None, "requeued")),
    ("transient, at the limit: still requeued",
     TransientDatabaseError("gone"), 5, Outcome(REQUEUE, None, "requeued")),
    ("transient, last delivery: answered retries_exhausted with its cause, dead-lettered",
     TransientDatabaseError("gone"), 6,
     Outcome(DEAD, ErrorCode.RETRIES_EXHAUSTED, "failed", ErrorCode.DATABASE_UNAVAILABLE)),
    ("transient, past the limit (a limit lowered meanwhile): the same",
     ServerUnavailable("down"), 9,
     Outcome(DEAD, ErrorCode.RETRIES_EXHAUSTED, "failed", ErrorCode.NBD_SERVER_UNAVAILABLE)),
    ("invalid request: answered, kept for its sender",
     InvalidRequest("bad"), 1, Outcome(DEAD, ErrorCode.INVALID_REQUEST, "failed")),
    ("a refusal: answered and acked",
     DeviceInUse("taken"), 1, Outcome(ACK, ErrorCode.DEVICE_IN_USE, "failed")),
    ("a refusal on its last delivery: still acked",
     DeviceNotFound("gone"), 6, Outcome(ACK, ErrorCode.DEVICE_NOT_FOUND, "failed")),
    ("a failed flush: answered and acked (the scheduler decides)",
     FlushFailed("EIO", "EIO"), 1, Outcome(ACK, ErrorCode.FLUSH_FAILED, "failed")),
    ("misconfigured server: not retried, answered at once",
     ServerMisconfigured("-C"), 1, Outcome(ACK, ErrorCode.NBD_SERVER_MISCONFIGURED, "failed")),
    ("a database error no retry fixes: answered with its own code, acked",
     DatabaseError("x", 1146), 1, Outcome(ACK, ErrorCode.DATABASE_ERROR, "failed")),
    ("an export that needs nbd-server restarted: answered, acked",
     RestartRequired("e", "is served from an older config"), 1,
     Outcome(ACK, ErrorCode.RESTART_REQUIRED, "failed")),
    ("superseded by another job: tried again, as any transient failure",
     Superseded("e"), 1, Outcome(REQUEUE, None, "requeued")),
    ("superseded on the last delivery: retries_exhausted, cause superseded",
     Superseded("e"), 6,
     Outcome(DEAD, ErrorCode.RETRIES_EXHAUSTED, "failed", ErrorCode.SUPERSEDED)),
    ("a snippet that cannot be written, on the last delivery",
     ConfigWriteError("write snippet", "/x.conf", "No space left on device"), 6,
     Outcome(DEAD, ErrorCode.RETRIES_EXHAUSTED, "failed", ErrorCode.CONFIG_WRITE_FAILED)),
    ("a bug: internal_error, dead-lettered for whoever investigates",
     KeyError("x"), 1, Outcome(DEAD, ErrorCode.INTERNAL_ERROR, "failed")),
]  # fmt: skip


@pytest.mark.parametrize(("error", "deliveries", "expected"), [row[1:] for row in TABLE],
                         ids=[row[0] for row in TABLE])  # fmt: skip
def test_settle_for(error: BaseException, deliveries: int, expected: Outcome) -> None:
    outcome = settle_for(error, deliveries, LIMIT)
    assert outcome == expected
    # Only a requeue goes without a reply: every other outcome answers the scheduler.
    assert outcome.replies is (outcome.settle is not REQUEUE)


@pytest.mark.parametrize(("deliveries", "last"), [(1, False), (5, False), (6, True), (7, True)])
def test_the_last_delivery_is_the_one_past_the_limit(deliveries: int, last: bool) -> None:
    assert is_last_delivery(deliveries, LIMIT) is last


def waits(attempts: int, backoff_s: float, backoff_max_s: float) -> list[float]:
    """The waits the job policy would take before tries 2, 3, ..."""
    policy = job_retry_policy(attempts, backoff_s, backoff_max_s)
    out = []
    for number in range(1, attempts):
        state = RetryCallState(policy, fn=None, args=(), kwargs={})
        state.attempt_number = number
        assert policy.wait is not None
        out.append(policy.wait(state))
    return out


@pytest.mark.parametrize(
    ("attempts", "backoff_s", "backoff_max_s", "floors"),
    [
        (5, 0.5, 10.0, [0.5, 1.0, 2.0, 4.0]),  # the defaults: at least 7.5 s a delivery
        (4, 0.2, 1.0, [0.2, 0.4, 0.8, 1.0][:3]),  # the fault suite's
        (6, 1.0, 3.0, [1.0, 2.0, 3.0, 3.0, 3.0]),  # capped
        (1, 0.5, 10.0, []),  # one try: no wait
    ],
)
def test_job_retry_waits_double_to_a_cap_plus_jitter(
    attempts: int, backoff_s: float, backoff_max_s: float, floors: list[float]
) -> None:
    for _ in range(20):  # jitter: every draw within [floor, floor + backoff_s]
        got = waits(attempts, backoff_s, backoff_max_s)
        assert len(got) == len(floors)
        for wait, floor in zip(got, floors, strict=True):
            assert floor <= wait <= floor + backoff_s


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (ServerUnavailable("down"), True),
        (TransientDatabaseError("gone"), True),
        (ServerMisconfigured("-C"), False),
        (DeviceInUse("taken"), False),
        (WorkerError("plain"), False),
        (OSError("not ours"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_the_job_policy_retries_retryable_worker_errors_only(
    error: BaseException, retried: bool
) -> None:
    policy = job_retry_policy(3, 0.01, 0.01)
    state = RetryCallState(policy, fn=None, args=(), kwargs={})
    state.set_exception((type(error), error, None))
    assert policy.retry(state) is retried
