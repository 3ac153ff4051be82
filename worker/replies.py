"""Publishes replies: to the job's reply_to with its correlation_id, or to the reply queue.

Publisher confirms are on, so `publish` returns only once the broker has the reply; the
consumer acks the job after that, never before.
"""

from __future__ import annotations

import logging

from aio_pika import DeliveryMode, Message
from aio_pika.abc import AbstractExchange
from aio_pika.exceptions import PublishError

from worker.messages import Reply

log = logging.getLogger(__name__)


class ReplyPublisher:
    def __init__(self, exchange: AbstractExchange, default_queue: str, timeout_s: float) -> None:
        self._exchange = exchange  # the default exchange: routing key = queue name
        self._default_queue = default_queue
        self._timeout_s = timeout_s

    async def publish(
        self, reply: Reply, *, reply_to: str | None, correlation_id: str | None
    ) -> None:
        """Raises on a broker failure or a missing confirm; the job must then not be acked."""
        message = Message(
            reply.model_dump_json().encode(),
            content_type="application/json",
            correlation_id=correlation_id,
            delivery_mode=DeliveryMode.PERSISTENT,
        )
        if reply_to:
            try:
                await self._exchange.publish(
                    message, routing_key=reply_to, mandatory=True, timeout=self._timeout_s
                )
            except PublishError:
                # Returned as unroutable: the requester's queue is gone. The reply still
                # goes somewhere an operator can see it rather than vanishing.
                log.warning(
                    "reply_to queue does not exist; replying to the default reply queue "
                    "job_id=%s reply_to=%s queue=%s",
                    reply.job_id,
                    reply_to,
                    self._default_queue,
                )
            else:
                return
        await self._exchange.publish(
            message, routing_key=self._default_queue, mandatory=True, timeout=self._timeout_s
        )
