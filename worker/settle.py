"""How a handled job leaves the queue, and how a job is retried within one delivery:
pure functions of the failure and the delivery count, table-tested
(tests/unit/test_settle.py). The consumer (worker/consumer.py) only carries them out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from worker.errors import WorkerError
from worker.messages import ErrorCode


class Settle(Enum):
    """How a handled message leaves the queue."""

    ACK = "ack"
    """Done: served, or refused for a reason that resending cannot change."""
    DEAD_LETTER = "dead_letter"
    """Rejected without requeue: the broker moves it, intact, to the dead-letter queue."""
    REQUEUE = "requeue"
    """Returned to the queue, unanswered: a transient failure; a later delivery retries."""


@dataclass(frozen=True)
class Outcome:
    """What to do with a job that failed: how to settle it, which error reply to send
    (`code`; none when it is requeued), and the `jobs` metric's outcome label."""

    settle: Settle
    code: ErrorCode | None
    label: str
    #: For `retries_exhausted`: the failure that outlasted the retries.
    cause: ErrorCode | None = None

    @property
    def replies(self) -> bool:
        return self.code is not None


def is_last_delivery(deliveries: int, delivery_limit: int) -> bool:
    """Whether the queue would dead-letter this job if it were returned once more.
    `deliveries` counts this one: 1 on the first delivery."""
    return deliveries > delivery_limit


#: Answers that refuse a job without its failing, by their `jobs` metric label: a release
#: with connections open (release again later, or drain), a fenced-off late message.
REFUSALS = {ErrorCode.EXPORT_IN_USE: "in_use", ErrorCode.STALE_GENERATION: "stale"}


def settle_for(error: BaseException, deliveries: int, delivery_limit: int) -> Outcome:
    """The outcome of a job whose run raised `error` on its `deliveries`-th delivery."""
    if not isinstance(error, WorkerError):
        # A bug: answered, and kept for whoever investigates it.
        return Outcome(Settle.DEAD_LETTER, ErrorCode.INTERNAL_ERROR, "failed")
    if error.retryable:
        if not is_last_delivery(deliveries, delivery_limit):
            return Outcome(Settle.REQUEUE, None, "requeued")
        # The last delivery the queue allows: answer, and keep the job, intact, in the
        # dead-letter queue for an operator to replay.
        return Outcome(Settle.DEAD_LETTER, ErrorCode.RETRIES_EXHAUSTED, "failed", error.code)
    if error.code is ErrorCode.INVALID_REQUEST:
        # Breaks the contract: kept in the dead-letter queue for whoever sent it.
        return Outcome(Settle.DEAD_LETTER, error.code, "failed")
    if error.code in REFUSALS:
        # Not a failure: the job was understood and answered; the scheduler acts on it.
        return Outcome(Settle.ACK, error.code, REFUSALS[error.code])
    # A refusal (bad device, device in use) is final: answered and acked.
    return Outcome(Settle.ACK, error.code, "failed")


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, WorkerError) and exc.retryable


def job_retry_policy(
    attempts: int,
    backoff_s: float,
    backoff_max_s: float,
    before_sleep: Callable[[RetryCallState], None] | None = None,
) -> AsyncRetrying:
    """Tries of one job within one delivery: a floor that doubles from `backoff_s` up to
    `backoff_max_s` (so a short outage is outlasted for sure) plus up to `backoff_s` of
    jitter (so the jobs of a burst do not all retry at once); retryable failures only."""
    return AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=backoff_s, max=backoff_max_s) + wait_random(0, backoff_s),
        retry=retry_if_exception(is_retryable),
        before_sleep=before_sleep,
        reraise=True,
    )
