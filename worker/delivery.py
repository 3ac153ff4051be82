"""A job as the broker delivered it, read straight from aiormq's frames.

aio-pika's Queue.consume wraps every delivery in an IncomingMessage (a dozen checked
attribute assignments) and runs the callback in a task of its own beside the one aiormq
already made: on the reuse path that was more CPU than the frames themselves. The consumer
registers with aiormq's basic_consume instead and gets this: the few fields a job needs, and
ack, nack and reject on the channel it came on, each allowed once.
"""

from __future__ import annotations

from typing import Any

from aiormq.abc import AbstractChannel, DeliveredMessage


class AlreadySettled(RuntimeError):
    """The delivery was acked, nacked or rejected before: its tag means nothing now."""


class Delivery:
    """One delivered message: body, properties the worker reads, and its settlement."""

    __slots__ = (
        "_channel",
        "_done",
        "body",
        "correlation_id",
        "delivery_tag",
        "headers",
        "reply_to",
    )

    def __init__(self, message: DeliveredMessage) -> None:
        properties = message.header.properties
        self.body: bytes = message.body
        self.correlation_id: str | None = properties.correlation_id
        self.reply_to: str | None = properties.reply_to
        self.headers: dict[str, Any] = properties.headers or {}
        self.delivery_tag: int | None = message.delivery_tag
        self._channel: AbstractChannel = message.channel
        self._done = False

    def _settling(self) -> int:
        if self._done:
            raise AlreadySettled(f"delivery {self.delivery_tag} was settled already")
        if self.delivery_tag is None:
            raise AlreadySettled("a delivery without a tag cannot be settled")
        self._done = True
        return self.delivery_tag

    async def ack(self) -> None:
        await self._channel.basic_ack(self._settling())

    async def nack(self, *, requeue: bool = True) -> None:
        await self._channel.basic_nack(self._settling(), requeue=requeue)

    async def reject(self, *, requeue: bool = False) -> None:
        await self._channel.basic_reject(self._settling(), requeue=requeue)
