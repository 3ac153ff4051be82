"""Connecting to the first broker that answers, for the operator commands that use the
queues directly (`dead-letters`). Jobs and their replies go through worker/client.py's
SchedulerClient (`request` uses it too).
"""

from __future__ import annotations

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
