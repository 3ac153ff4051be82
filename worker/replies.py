"""Publishes replies: to the job's reply_to with its correlation_id, or to the reply queue.

Through ConfirmedPublisher, so `publish` returns only once the broker has the reply, on a
fresh channel if a leader election made the first one useless; the consumer acks the job
after that, never before.
"""

from __future__ import annotations

import logging

from aio_pika import DeliveryMode, Message

from worker.messages import Reply
from worker.publisher import ConfirmedPublisher, Unroutable

log = logging.getLogger(__name__)


class ReplyPublisher:
    def __init__(self, publisher: ConfirmedPublisher, default_queue: str) -> None:
        self._publisher = publisher  # on the default exchange: routing key = queue name
        self._default_queue = default_queue

    async def publish(
        self, reply: Reply, *, reply_to: str | None, correlation_id: str | None
    ) -> None:
        """Raises when the broker did not confirm it in time; the job must then not be
        acked."""
        message = Message(
            reply.model_dump_json().encode(),
            content_type="application/json",
            correlation_id=correlation_id,
            delivery_mode=DeliveryMode.PERSISTENT,
        )
        if reply_to:
            try:
                await self._publisher.publish(message, reply_to)
            except Unroutable:
                # The requester's queue is gone. The reply still goes somewhere an operator
                # can see it rather than vanishing.
                log.warning(
                    "reply_to queue does not exist; replying to the default reply queue "
                    "job_id=%s reply_to=%s queue=%s",
                    reply.job_id,
                    reply_to,
                    self._default_queue,
                )
            else:
                return
        await self._publisher.publish(message, self._default_queue)
