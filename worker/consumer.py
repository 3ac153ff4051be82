"""The queue side: declares the queues, consumes jobs, runs the flow, replies, settles.

The only place that acks, rejects or requeues a message, and the only place that catches
Exception. A message passes it twice: `_answer` turns it into a reply and an outcome
(decoding, running the flow, and the pure policy of worker/settle.py), and `_finish`
publishes the reply and settles. A job is acked only after its reply is confirmed; a job
is requeued unanswered only while it has deliveries left, so every job ends with a reply.
The exceptions, both dead-lettered: a message that kills every worker it reaches, and a
reply the broker would not confirm on the job's last delivery, even on fresh channels for
the whole publish retry budget (worker/publisher.py; counted as reply_unconfirmed). A
reply retried after a lost confirm may reach its scheduler twice, identical. A
checksum-export is acked once accepted, without a reply: worker/checksums.py answers it.

Over 400 lines (budget 450) on purpose: decoding, running, answering and settling a job
are one path, read top to bottom.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractQueue
from aiormq.abc import DeliveredMessage
from pydantic import ValidationError
from tenacity import AsyncRetrying, RetryCallState

from worker.after_reply import Deferred, reply_scope, run_deferred
from worker.checksums import Checksums
from worker.delivery import Delivery, Settler
from worker.errors import ExportInUse, FlushFailed, WorkerError
from worker.faults import crash_point
from worker.flow import ExportFlow
from worker.logs import bind_job
from worker.messages import (
    Action,
    AnyRequest,
    ChecksumExport,
    ErrorCode,
    ExportFailed,
    ExportReady,
    FlushExport,
    InspectExport,
    ReleaseExport,
    Reply,
    parse_request,
    salvage_job_id,
)
from worker.metrics import Metrics
from worker.publisher import ConfirmedPublisher
from worker.replies import ReplyPublisher, describe_validation_error, error_reply
from worker.retrying import call_with_retries
from worker.settle import Settle, is_last_delivery, is_retryable, job_retry_policy, settle_for
from worker.topology import dead_letter_queue, declare_topology

log = logging.getLogger(__name__)

#: Far above any real job (a few hundred bytes); larger bodies are refused unparsed.
MAX_BODY_BYTES = 64 * 1024


def delivery_count(message: Delivery) -> int:
    """How many times the broker delivered this message before (quorum queues count)."""
    count = (message.headers or {}).get("x-delivery-count", 0)
    return count if isinstance(count, int) and count >= 0 else 0


@dataclass(frozen=True)
class QueueConfig:
    """Where jobs come from and replies go; see Settings for each field's meaning."""

    request_queue: str
    reply_queue: str
    exchange: str
    routing_key: str
    node_id: str
    prefetch: int
    delivery_limit: int
    #: Tries of a job per delivery on transient failures, and the backoff between them.
    job_attempts: int = 5
    retry_backoff_s: float = 0.5
    retry_backoff_max_s: float = 10.0

    @property
    def dead_letter_queue(self) -> str:
        return dead_letter_queue(self.request_queue)


@dataclass(frozen=True)
class Answer:
    """A handled message: the reply to publish (None: requeue it unanswered, or, settled
    ACK, ack it: an accepted checksum), how to settle it once the reply is confirmed, and
    the `jobs` metric's outcome label."""

    reply: Reply | None
    settle: Settle
    label: str


class JobConsumer:
    """Consumes one channel. A new one is made for every (re)connection."""

    def __init__(
        self,
        channel: AbstractChannel,
        publisher: ConfirmedPublisher,
        flow: ExportFlow,
        metrics: Metrics,
        config: QueueConfig,
        checksums: Checksums | None = None,
    ) -> None:
        self._channel = channel  # consumes, acks and rejects: never publishes
        self._flow = flow
        self._checksums = checksums
        self._metrics = metrics
        self._config = config
        self._replies = ReplyPublisher(publisher, config.reply_queue)
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._settler: Settler | None = None
        self._in_flight: set[asyncio.Task[Any]] = set()

    async def declare(self) -> AbstractQueue:
        """Declares the queues and the node's bindings (worker/topology.py)."""
        config = self._config
        await self._channel.set_qos(prefetch_count=config.prefetch)
        self._queue = await declare_topology(
            self._channel,
            request_queue=config.request_queue,
            reply_queue=config.reply_queue,
            exchange=config.exchange,
            node_id=config.node_id,
            delivery_limit=config.delivery_limit,
        )
        return self._queue

    async def start(self) -> None:
        queue = self._queue or await self.declare()
        # On aiormq's channel, not through aio-pika's queue.consume: see worker/delivery.py.
        underlay = await self._channel.get_underlay_channel()
        self._settler = Settler(underlay)
        consuming = await underlay.basic_consume(queue.name, self._deliver)
        self._consumer_tag = consuming.consumer_tag
        log.info(
            "Consuming queue=%s routing_key=%s prefetch=%d",
            self._config.request_queue,
            self._config.routing_key,
            self._config.prefetch,
        )

    async def stop(self, grace_s: float) -> None:
        """Stops taking jobs and waits up to `grace_s` for those in flight; the rest stay
        unacked and the broker requeues them when the channel closes."""
        if self._queue is not None and self._consumer_tag is not None:
            try:
                await self._queue.cancel(self._consumer_tag)
            except Exception as exc:  # the channel may already be gone
                log.warning("Could not cancel the consumer: %s", exc)
            self._consumer_tag = None
        if self._in_flight:
            log.info(
                "Waiting for jobs in flight count=%d grace_s=%g", len(self._in_flight), grace_s
            )
            _, pending = await asyncio.wait(set(self._in_flight), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    async def cancelled_by_broker(self) -> bool:
        """Whether the broker has cancelled our consumer (basic.cancel) on a live channel."""
        if self._consumer_tag is None or self._channel.is_closed:
            return False
        underlay = await self._channel.get_underlay_channel()
        # aiormq drops a cancelled consumer's tag from this dict; it has no public hook.
        consumers = getattr(underlay, "consumers", None)
        return consumers is not None and self._consumer_tag not in consumers

    @property
    def is_consuming(self) -> bool:
        return self._consumer_tag is not None and not self._channel.is_closed

    async def _settle(
        self, message: Delivery, how: str, settle: Callable[[], Awaitable[None]]
    ) -> bool:
        """Acks, rejects or nacks; False when the channel is gone. Its delivery tag then
        means nothing, and the broker redelivers the job, which is safe to handle again."""
        try:
            await settle()
        except Exception as exc:
            self._metrics.settle_failures.inc()
            log.warning(
                "Could not %s the job: its channel closed; the broker will redeliver it "
                "delivery_tag=%s error=%s",
                how,
                message.delivery_tag,
                type(exc).__name__,
            )
            return False
        return True

    async def _deliver(self, message: DeliveredMessage) -> None:
        assert self._settler is not None  # set before consuming starts
        await self.handle(self._settler.delivery(message))

    async def handle(self, message: Delivery) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        self._metrics.in_flight.inc()
        bind_job(correlation_id=message.correlation_id)
        started = time.monotonic()
        deferred: list[Deferred] = []
        try:
            try:
                with reply_scope() as deferred:
                    answer = await self._answer(message)
            except Exception:
                # _answer answers every failure it knows; this is a bug, and the message
                # must still be answered and kept (an unsettled one would hold its
                # prefetch slot until the channel closes).
                log.exception("Unexpected error reading a request")
                reply = error_reply(
                    ErrorCode.INTERNAL_ERROR,
                    "unexpected internal error; see the worker log",
                    job_id=salvage_job_id(message.body),
                    node_id=self._config.node_id,
                )
                answer = Answer(reply, Settle.DEAD_LETTER, "failed")
            if await self._finish(message, answer):
                self._metrics.jobs.labels(outcome=answer.label).inc()
                if answer.reply is not None:
                    self._metrics.job_duration.observe(time.monotonic() - started)
        finally:
            run_deferred(deferred)  # its reply is out (or it had none)
            self._metrics.in_flight.dec()
            if task is not None:
                self._in_flight.discard(task)

    async def _finish(self, message: Delivery, answer: Answer) -> bool:
        """Publishes the answer's reply, then settles the message as the answer says;
        False when the reply could not be published (the job is not counted as done)."""
        reply = answer.reply
        if reply is None and answer.settle is Settle.ACK:
            # An accepted checksum: recorded, answered once hashed (worker/checksums.py).
            await self._settle(message, "ack", message.ack)
            return True
        if reply is None:
            # A transient failure with deliveries left: no reply yet, the job comes back.
            self._metrics.requeued.inc()
            await self._settle(message, "nack", lambda: message.nack(requeue=True))
            return True
        if isinstance(reply, ExportReady) and reply.action is not Action.REUSED:
            crash_point("before_reply")  # a create's reply, for the fault suite
        if not await self._publish_reply(message, reply):
            if self._is_last_delivery(message):
                # Requeued, it would be dead-lettered by the queue anyway: do it here,
                # counted, so the dead letter is explained.
                if await self._settle(message, "reject", lambda: message.reject(requeue=False)):
                    self._metrics.dead_lettered.labels(code="reply_unconfirmed").inc()
                return False
            # No confirmed reply, so no ack: the broker redelivers the job, and handling
            # it again answers from the job's record.
            self._metrics.requeued.inc()
            await self._settle(message, "nack", lambda: message.nack(requeue=True))
            return False
        if answer.settle is Settle.ACK:
            await self._settle(message, "ack", message.ack)
        elif await self._settle(message, "reject", lambda: message.reject(requeue=False)):
            code = reply.error.code if isinstance(reply, ExportFailed) else "none"
            self._metrics.dead_lettered.labels(code=code).inc()
        return True

    def _is_last_delivery(self, message: Delivery) -> bool:
        return is_last_delivery(delivery_count(message) + 1, self._config.delivery_limit)

    async def _publish_reply(self, message: Delivery, reply: Reply) -> bool:
        """Publishes the reply; whether the broker confirmed it (the publisher has already
        tried fresh channels for its whole budget when it says no)."""
        try:
            await self._replies.publish(
                reply, reply_to=message.reply_to, correlation_id=message.correlation_id
            )
        except Exception:
            log.exception(
                "Reply not confirmed job_id=%s%s",
                reply.job_id,
                "; the job's last delivery: it goes to the dead-letter queue unanswered"
                if self._is_last_delivery(message)
                else "; the job goes back to the queue",
            )
            return False
        return True

    def _retry_policy(self, request: AnyRequest) -> AsyncRetrying:
        """The policy of a job whose first try failed retryably (built only then)."""

        def count_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            self._metrics.retries.labels(operation="job").inc()
            log.warning(
                "Retrying job job_id=%s attempt=%d error=%s",
                request.job_id,
                state.attempt_number,
                exc,
            )

        config = self._config
        return job_retry_policy(
            config.job_attempts, config.retry_backoff_s, config.retry_backoff_max_s, count_retry
        )

    async def _run(self, request: AnyRequest, message: Delivery) -> Reply | None:
        """Runs the flow, retrying transient failures with backoff and jitter. None: a
        checksum accepted, to be answered later."""

        async def serve() -> Reply | None:
            if isinstance(request, ChecksumExport):
                if self._checksums is None:
                    raise WorkerError("this process does not run checksum-export jobs")
                return await self._checksums.accept(
                    request, reply_to=message.reply_to, correlation_id=message.correlation_id
                )
            if isinstance(request, ReleaseExport):
                return await self._flow.release_export(request)
            if isinstance(request, FlushExport):
                return await self._flow.flush_export(request)
            if isinstance(request, InspectExport):
                return await self._flow.inspect_export(request)
            return await self._flow.prepare_export(request)

        return await call_with_retries(serve, lambda: self._retry_policy(request), is_retryable)

    def _refused(self, code: ErrorCode, message: str, job_id: str | None) -> Answer:
        """A message that is not a job the worker can run: answered, kept as a dead letter."""
        bind_job(job_id=job_id, outcome="failed")
        reply = error_reply(code, message, job_id=job_id, node_id=self._config.node_id)
        return Answer(reply, Settle.DEAD_LETTER, "failed")

    async def _answer(self, message: Delivery) -> Answer:
        """Turns a message into its answer: decodes it, runs the job, and asks the settle
        policy what a failure means."""
        body = message.body
        if len(body) > MAX_BODY_BYTES:
            log.warning("Oversized request refused bytes=%d", len(body))
            return self._refused(
                ErrorCode.INVALID_REQUEST,
                f"message body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}",
                None,
            )
        try:
            request = parse_request(body)
        except ValidationError as exc:
            job_id = salvage_job_id(body)
            log.warning(
                "Invalid request job_id=%s correlation_id=%s error=%s",
                job_id,
                message.correlation_id,
                describe_validation_error(exc),
            )
            return self._refused(
                ErrorCode.INVALID_REQUEST,
                f"invalid request: {describe_validation_error(exc)}",
                job_id,
            )
        bind_job(
            job_id=request.job_id,
            vm_id=request.vm_id,
            disk=request.disk_unit_number,
            export_name=request.export_name,
        )
        try:
            result = await self._run(request, message)
        except Exception as exc:
            return self._failed(message, request, exc)
        if result is None:
            bind_job(outcome="accepted")
            return Answer(None, Settle.ACK, "accepted")
        if isinstance(result, ExportFailed):  # a checksum answered before, with an error
            return Answer(result, Settle.ACK, "failed")
        if not isinstance(result, ExportReady):
            labels = {"released": "released", "flushed": "flushed", "checksummed": "checksummed"}
            label = labels.get(result.status, "inspected")
            bind_job(outcome=label)
            return Answer(result, Settle.ACK, label)
        bind_job(outcome=str(result.action))
        # A reuse has logged its own line already; at hundreds of jobs a second, one is enough.
        log.log(
            logging.DEBUG if result.action is Action.REUSED else logging.INFO,
            "Export ready job_id=%s vm_id=%s disk=%d export_name=%s action=%s reused=%s",
            *(result.job_id, result.vm_id, result.disk_unit_number, result.export_name),
            *(result.action, result.reused),
        )
        return Answer(result, Settle.ACK, str(result.action))

    def _failed(self, message: Delivery, request: AnyRequest, exc: Exception) -> Answer:
        """The answer to a job whose run raised `exc`, as the settle policy decides."""
        deliveries = delivery_count(message) + 1
        outcome = settle_for(exc, deliveries, self._config.delivery_limit)
        if isinstance(exc, WorkerError):
            bind_job(outcome=outcome.label, code=str(exc.code))
            log.warning(
                "Job failed job_id=%s vm_id=%s disk=%d code=%s retryable=%s error=%s",
                *(request.job_id, request.vm_id, request.disk_unit_number),
                *(exc.code, exc.retryable, exc),
            )
        else:
            bind_job(outcome="failed", code=str(ErrorCode.INTERNAL_ERROR))
            log.exception("Unexpected error job_id=%s", request.job_id, exc_info=exc)
        if outcome.code is None:
            log.info(
                "Returning job to the queue job_id=%s delivery=%d delivery_limit=%d",
                request.job_id,
                deliveries,
                self._config.delivery_limit,
            )
            return Answer(None, outcome.settle, outcome.label)
        if outcome.code is ErrorCode.RETRIES_EXHAUSTED:
            text = f"gave up after {deliveries} deliveries: {exc}"
        elif isinstance(exc, WorkerError):
            text = str(exc)
        else:
            text = "unexpected internal error; see the worker log"
        reply = error_reply(
            outcome.code,
            text,
            job_id=request.job_id,
            node_id=self._config.node_id,
            request=request,
            errno=exc.errno_name if isinstance(exc, FlushFailed) else None,
            cause=outcome.cause,
            connections=exc.connections if isinstance(exc, ExportInUse) else None,
        )
        return Answer(reply, outcome.settle, outcome.label)
