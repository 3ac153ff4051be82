"""Confirmed publishing that outlives a quorum queue's leader election.

On RabbitMQ 3.10 a channel first used while a quorum queue elects its leader has every
later publish to that queue nacked, for as long as the channel lives; a fresh channel is
confirmed at once (measured on the test clusters: a channel first used while the reply
queue had no leader was nacked 5 of 5, again and again for as long as it was tried after
the election; a fresh channel opened after it, 5 of 5 confirmed). A worker that kept
publishing its replies on such a channel answered nothing until the dead node returned,
and its jobs reached the dead-letter queue unanswered.

So every publish the worker makes goes through ConfirmedPublisher: a channel of its own,
apart from the channel that consumes (acks must stay on that one), retired at the first
nack or missing confirm; the message is published again on a fresh channel, with a
doubling backoff, until a time budget is spent. Only then does the caller see a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractMessage
from aiormq.exceptions import DeliveryError, PublishError
from pamqp.commands import Basic

BasicProperties = Basic.Properties

log = logging.getLogger(__name__)

#: The first pause before publishing again on a fresh channel; it doubles up to the cap.
#: An election on a healthy cluster takes ~0.2 s, so the first retries come soon.
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 2.0


class PublishFailed(Exception):
    """The broker did not confirm the message within the retry budget."""


class Unroutable(Exception):
    """The broker returned the message (`mandatory`): no queue is bound to its key.
    A fresh channel cannot change that, so it is not retried."""


class ConfirmedPublisher:
    """Publishes with confirms on its own channel of `connection`, renewing the channel
    after a nack, a missing confirm or a channel error, until `retry_s` has passed."""

    def __init__(
        self,
        connection: AbstractConnection,
        *,
        timeout_s: float,
        retry_s: float,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self._connection = connection
        self._timeout_s = timeout_s
        self._retry_s = retry_s
        self._on_retry = on_retry
        self._channel: AbstractChannel | None = None
        self._opening = asyncio.Lock()

    async def _current(self) -> AbstractChannel:
        """The channel to publish on: the current one, or a fresh one if it was retired."""
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel  # every publish but a channel's first: no lock to take
        async with self._opening:  # one fresh channel for every publish waiting on it
            if self._channel is None or self._channel.is_closed:
                self._channel = await self._connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
            return self._channel

    async def _retire(self, channel: AbstractChannel) -> None:
        """Stops using `channel` (unless another publish already replaced it)."""
        if self._channel is channel:
            self._channel = None
        with contextlib.suppress(Exception):
            await channel.close()

    async def publish(
        self, message: AbstractMessage, routing_key: str, *, exchange: str = ""
    ) -> None:
        """Returns once the broker confirmed `message`. Raises Unroutable when the broker
        returned it, PublishFailed when no channel got a confirm within the budget or the
        connection is closed (nothing on it can be confirmed any more)."""
        await self.publish_body(message.body, message.properties, routing_key, exchange=exchange)

    async def publish_body(
        self,
        body: bytes,
        properties: BasicProperties,
        routing_key: str,
        *,
        exchange: str = "",
    ) -> None:
        """publish() of a body and its AMQP properties, as aio-pika would send a Message of
        them. The reply path uses it: an aio-pika Message (a dozen checked attribute
        assignments) cost more than the frame it becomes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._retry_s
        delay = RETRY_FIRST_S
        attempt = 0
        while True:
            attempt += 1
            if self._connection.is_closed:
                raise PublishFailed("the broker connection is closed")
            reason = "closed"
            channel: AbstractChannel | None = None
            try:
                channel = await self._current()
                # aiormq's own channel: its basic_publish takes `wait` (the abstract one not).
                underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
                # One deadline for the whole publish: aio-pika's own `timeout` wraps each
                # of its three steps in asyncio.wait_for, a task apiece (3 % of the
                # worker's CPU on the reuse benchmark, bench/profile.py). wait=False: no
                # future for the frame's drain; the confirm comes after it anyway.
                async with asyncio.timeout(self._timeout_s):
                    await underlay.basic_publish(
                        body,
                        exchange=exchange,
                        routing_key=routing_key,
                        properties=properties,
                        mandatory=True,
                        wait=False,
                    )
            except PublishError as exc:
                raise Unroutable(f"no queue is bound to {routing_key!r}") from exc
            except DeliveryError:
                reason = "nack"
            except TimeoutError:
                reason = "timeout"
            except (aio_pika.exceptions.AMQPError, OSError, RuntimeError):
                reason = "closed"
            else:
                return
            if channel is not None:
                await self._retire(channel)
            if self._on_retry is not None:
                self._on_retry(reason)
            left = deadline - loop.time()
            log.warning(
                "Publish not confirmed (%s) routing_key=%s attempt=%d; publishing again on a "
                "fresh channel%s",
                reason,
                routing_key,
                attempt,
                "" if left > 0 else ": retry budget spent",
            )
            if left <= 0:
                raise PublishFailed(
                    f"not confirmed after {attempt} attempts in {self._retry_s:g} s ({reason})"
                )
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, RETRY_MAX_S)

    async def close(self) -> None:
        if self._channel is not None:
            await self._retire(self._channel)
