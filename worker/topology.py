"""The queue topology: the message types, queue names and arguments, and the routing keys
a node's queue is bound with. The consumer declares from here, the AsyncAPI document
describes from here, and the operator commands and settings address from here, so the
three cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from aio_pika import ExchangeType
from aio_pika.abc import AbstractChannel, AbstractQueue
from aiormq.exceptions import ChannelPreconditionFailed

from worker.errors import WorkerError

#: The message types one request queue carries (the `type` field; prepare-export if none).
MESSAGE_TYPES = (
    "prepare-export",
    "release-export",
    "flush-export",
    "inspect-export",
    "checksum-export",
)
#: The kinds of export-event a node publishes.
EVENT_KINDS = ("connected", "disconnected", "expiring", "expired", "expiry_failed")

#: Arguments of every queue the worker declares besides the request queue: replicated on
#: a RabbitMQ cluster, and durable.
QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}


def dead_letter_queue(request_queue: str) -> str:
    """Where the request queue's rejected and over-delivered jobs go, intact."""
    return f"{request_queue}.dead"


def request_queue_arguments(dead_letters: str, delivery_limit: int) -> dict[str, Any]:
    # Quorum: replicated on a RabbitMQ cluster, and it counts deliveries, so a job that
    # keeps crashing workers is dead-lettered instead of looping forever.
    return {
        **QUORUM,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_letters,
        "x-delivery-limit": delivery_limit,
    }


def node_routing_key(message_type: str, node_id: str) -> str:
    """The routing key a scheduler publishes `message_type` for node `node_id` with."""
    return f"{message_type}.{node_id}"


def event_routing_key(node_id: str, kind: str) -> str:
    """The routing key of node `node_id`'s export-events of `kind` on the exchange: a
    scheduler binds a queue of its own with e.g. `event.<node>.*` or `event.#`."""
    return f"event.{node_id}.{kind}"


def node_routing_keys(node_id: str) -> list[str]:
    """Every routing key a node's request queue is bound with on the exchange."""
    return [node_routing_key(kind, node_id) for kind in MESSAGE_TYPES]


async def declare_topology(
    channel: AbstractChannel,
    *,
    request_queue: str,
    reply_queue: str,
    exchange: str,
    node_id: str,
    delivery_limit: int,
) -> AbstractQueue:
    """Declares the queues, the exchange and the node's bindings; the request queue.
    Raises WorkerError when a queue exists with other arguments (e.g. a classic queue left
    by an older system): RabbitMQ cannot change a queue's type, so an operator must delete
    or rename it."""
    dead_letters = dead_letter_queue(request_queue)
    try:
        await channel.declare_queue(dead_letters, durable=True, arguments=QUORUM)
        await channel.declare_queue(reply_queue, durable=True, arguments=QUORUM)
        queue = await channel.declare_queue(
            request_queue,
            durable=True,
            arguments=request_queue_arguments(dead_letters, delivery_limit),
        )
    except ChannelPreconditionFailed as exc:
        raise WorkerError(
            f"a queue exists with other arguments than the worker's ({exc}); the worker "
            "declares durable quorum queues: delete or rename the old queue"
        ) from exc
    # Schedulers address this appliance by routing key; publishing straight to the queue
    # (the single-node contract) keeps working too.
    topic = await channel.declare_exchange(exchange, ExchangeType.TOPIC, durable=True)
    for routing_key in node_routing_keys(node_id):
        await queue.bind(topic, routing_key=routing_key)
    return queue
