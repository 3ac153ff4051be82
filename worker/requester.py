"""The scheduler's side, in small: publish one prepare-export job and wait for its reply.

Used by `nbd-export-worker request` (an operator's smoke test) and the benchmark.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection


async def connect_first(amqp_urls: list[str], timeout_s: float) -> AbstractConnection:
    """The first broker of the list that answers."""
    error: Exception = ValueError("no broker URL given")
    for url in amqp_urls:
        try:
            return await aio_pika.connect(url, timeout=timeout_s)
        except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
            error = exc
    raise error


async def request_export(
    amqp_urls: list[str], request_queue: str, job: dict[str, Any], *, timeout_s: float
) -> dict[str, Any]:
    """Publishes `job` with a private reply queue; returns the decoded reply.

    Raises TimeoutError when no reply comes in time.
    """
    connection = await connect_first(amqp_urls, timeout_s)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        replies = await channel.declare_queue(exclusive=True, auto_delete=True)
        correlation_id = uuid.uuid4().hex
        await channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps(job).encode(),
                content_type="application/json",
                correlation_id=correlation_id,
                reply_to=replies.name,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=request_queue,
        )
        async with asyncio.timeout(timeout_s), replies.iterator() as messages:
            async for message in messages:
                await message.ack()
                if message.correlation_id == correlation_id:
                    reply: dict[str, Any] = json.loads(message.body)
                    return reply
    raise TimeoutError("the reply queue closed before a reply came")
