"""The publisher side: plays the scheduler and times each job from publish to reply.

One connection, one channel without publisher confirms (the clock starts just before the
publish call, so a confirm round trip would only add the publisher's own latency), and one
exclusive reply queue consumed with no_ack. The reply's arrival time is taken in the
consumer callback, before anything else runs on behalf of the job.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage


@dataclass(frozen=True)
class JobResult:
    #: Seconds from just before the publish to the reply's arrival; None when none came.
    latency_s: float | None
    reply: dict[str, Any] | None


@dataclass(frozen=True)
class RunResult:
    results: list[JobResult]
    #: From the first publish to the last reply (or the last timeout).
    wall_s: float

    @property
    def latencies_s(self) -> list[float]:
        return [r.latency_s for r in self.results if r.latency_s is not None]

    @property
    def jobs_per_s(self) -> float:
        return len(self.results) / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class _Waiter:
    sent_at: float
    future: asyncio.Future[tuple[float, dict[str, Any]]] = field(repr=False)


class Driver:
    """Publishes jobs to a queue (default exchange) and collects replies by correlation id."""

    def __init__(self, connection: AbstractConnection) -> None:
        self._connection = connection
        self._channel: AbstractChannel | None = None
        self._reply_queue = ""
        self._waiters: dict[str, _Waiter] = {}
        #: Replies whose correlation id matched no waiter (late replies after a timeout).
        self.stray_replies = 0

    async def start(self) -> None:
        self._channel = await self._connection.channel(publisher_confirms=False)
        queue = await self._channel.declare_queue(exclusive=True, auto_delete=True)
        self._reply_queue = queue.name
        await queue.consume(self._on_reply, no_ack=True)

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        arrived = time.perf_counter()
        waiter = self._waiters.pop(message.correlation_id or "", None)
        if waiter is None or waiter.future.done():
            self.stray_replies += 1
            return
        try:
            body = json.loads(message.body)
        except ValueError:
            body = {"status": "undecodable"}
        if not isinstance(body, dict):
            body = {"status": "undecodable"}
        waiter.future.set_result((arrived, body))

    async def _publish(self, queue: str, job: dict[str, Any]) -> tuple[str, _Waiter]:
        assert self._channel is not None, "start() first"
        correlation_id = uuid.uuid4().hex
        body = json.dumps(job).encode()
        waiter = _Waiter(time.perf_counter(), asyncio.get_running_loop().create_future())
        self._waiters[correlation_id] = waiter
        await self._channel.default_exchange.publish(
            aio_pika.Message(
                body,
                content_type="application/json",
                correlation_id=correlation_id,
                reply_to=self._reply_queue,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=queue,
        )
        return correlation_id, waiter

    async def _collect(self, correlation_id: str, waiter: _Waiter, timeout_s: float) -> JobResult:
        try:
            arrived, body = await asyncio.wait_for(asyncio.shield(waiter.future), timeout_s)
        except TimeoutError:
            self._waiters.pop(correlation_id, None)
            return JobResult(None, None)
        return JobResult(arrived - waiter.sent_at, body)

    async def one(self, queue: str, job: dict[str, Any], timeout_s: float) -> JobResult:
        correlation_id, waiter = await self._publish(queue, job)
        return await self._collect(correlation_id, waiter, timeout_s)

    async def closed_loop(
        self,
        queue: str,
        jobs: Sequence[dict[str, Any]],
        concurrency: int,
        timeout_s: float,
    ) -> RunResult:
        """Keeps exactly `concurrency` jobs outstanding until `jobs` are all answered."""
        results: list[JobResult] = []
        pending = iter(jobs)

        async def lane() -> None:
            for job in pending:
                results.append(await self.one(queue, job, timeout_s))

        started = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(min(concurrency, len(jobs)))))
        return RunResult(results, time.perf_counter() - started)

    async def burst(
        self, queue: str, jobs: Sequence[dict[str, Any]], timeout_s: float
    ) -> RunResult:
        """Publishes every job at once, then waits for all replies (one overall deadline)."""
        started = time.perf_counter()
        sent = [await self._publish(queue, job) for job in jobs]
        deadline = started + timeout_s
        results = [
            await self._collect(cid, waiter, max(0.0, deadline - time.perf_counter()))
            for cid, waiter in sent
        ]
        answered = [
            w.sent_at + r.latency_s
            for (_, w), r in zip(sent, results, strict=True)
            if r.latency_s is not None
        ]
        end = time.perf_counter() if len(answered) < len(results) else max(answered, default=0.0)
        return RunResult(results, max(0.0, end - started))
