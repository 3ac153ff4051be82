"""The dead-letter queue, for operators: list what is there and why, or replay it.

Dead letters keep their body and properties; the broker adds an `x-death` header whose
`reason` is `rejected` (the worker answered the job: see its reply) or `delivery_limit`
(workers died handling it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from worker.messages import salvage_job_id
from worker.publisher import ConfirmedPublisher

#: Headers the broker added while the job failed; a replayed job starts afresh without them.
BROKER_HEADERS = frozenset(
    {"x-death", "x-delivery-count", "x-first-death-reason", "x-first-death-queue",
     "x-first-death-exchange", "x-last-death-reason", "x-last-death-queue",
     "x-last-death-exchange"}
)  # fmt: skip
PREVIEW_CHARS = 200


@dataclass(frozen=True)
class DeadLetter:
    job_id: str | None
    reason: str
    correlation_id: str | None
    reply_to: str | None
    preview: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "reason": self.reason,
            "correlation_id": self.correlation_id,
            "reply_to": self.reply_to,
            "body": self.preview,
        }


def describe(message: AbstractIncomingMessage) -> DeadLetter:
    headers = message.headers or {}
    deaths = headers.get("x-death")
    reason = headers.get("x-first-death-reason")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        reason = deaths[0].get("reason", reason)
    return DeadLetter(
        job_id=salvage_job_id(message.body),
        reason=str(reason or "unknown"),
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        preview=message.body[:PREVIEW_CHARS].decode("utf-8", "replace"),
    )


async def list_dead_letters(
    channel: AbstractChannel, dead_letter_queue: str, limit: int
) -> list[DeadLetter]:
    """Up to `limit` dead letters, left in the queue: each is taken and returned unacked
    when the channel closes, so the queue's order and content are unchanged for others."""
    queue = await channel.declare_queue(dead_letter_queue, passive=True)
    letters = []
    for _ in range(limit):
        message = await queue.get(fail=False, no_ack=False)
        if message is None:
            break
        letters.append(describe(message))
    return letters


async def replay_dead_letters(
    channel: AbstractChannel,
    publisher: ConfirmedPublisher,
    dead_letter_queue: str,
    request_queue: str,
    limit: int,
) -> list[DeadLetter]:
    """Moves up to `limit` dead letters back to the request queue, one at a time: each is
    republished (confirmed, on fresh channels through a leader election, and routed:
    `mandatory`) before it is acked on `channel`, so a failure loses nothing (at worst one
    job is in both queues, and the worker answers a job it answered before from its
    record). Only what the queue held at the start: a message that fails
    again at once is not replayed twice."""
    await channel.declare_queue(request_queue, passive=True)  # it must exist
    queue = await channel.declare_queue(dead_letter_queue, passive=True)
    held = queue.declaration_result.message_count or 0
    replayed = []
    for _ in range(min(limit, held)):
        message = await queue.get(fail=False, no_ack=False)
        if message is None:
            break
        headers = {k: v for k, v in (message.headers or {}).items() if k not in BROKER_HEADERS}
        await publisher.publish(
            aio_pika.Message(
                message.body,
                headers=headers,
                content_type=message.content_type,
                correlation_id=message.correlation_id,
                reply_to=message.reply_to,
                message_id=message.message_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            request_queue,
        )
        await message.ack()
        replayed.append(describe(message))
    return replayed
