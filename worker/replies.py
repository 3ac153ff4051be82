"""Builds error replies and publishes replies: to the job's reply_to with its
correlation_id, or to the reply queue.

Through ConfirmedPublisher, so `publish` returns only once the broker has the reply, on a
fresh channel if a leader election made the first one useless; the consumer acks the job
after that, never before.
"""

from __future__ import annotations

import logging

from aio_pika import DeliveryMode
from pydantic import ValidationError

from worker.messages import (
    AnyRequest,
    ConnectionStatus,
    ErrorCode,
    ErrorDetail,
    ExportFailed,
    Reply,
)
from worker.publisher import BasicProperties, ConfirmedPublisher, Unroutable
from worker.topology import MESSAGE_TYPES

log = logging.getLogger(__name__)

#: Error messages in replies are cut to this many characters.
MAX_ERROR_MESSAGE = 1000


def describe_validation_error(exc: ValidationError) -> str:
    """Field and reason for each problem, without echoing the (untrusted) input."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        path = list(err["loc"])
        if path and path[0] in MESSAGE_TYPES:
            path = path[1:]  # the message type pydantic tells the union apart by
        loc = ".".join(str(part) for part in path) or "body"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def error_reply(
    code: ErrorCode,
    message: str,
    *,
    job_id: str | None,
    node_id: str,
    request: AnyRequest | None = None,
    errno: str | None = None,
    cause: ErrorCode | None = None,
    connections: list[ConnectionStatus] | None = None,
) -> ExportFailed:
    return ExportFailed(
        job_id=job_id,
        vm_id=request.vm_id if request else None,
        disk_unit_number=request.disk_unit_number if request else None,
        error=ErrorDetail(
            code=code,
            message=message[:MAX_ERROR_MESSAGE],
            errno=errno,
            cause=cause,
            connections=connections,
        ),
        node_id=node_id,
    )


class ReplyPublisher:
    def __init__(self, publisher: ConfirmedPublisher, default_queue: str) -> None:
        self._publisher = publisher  # on the default exchange: routing key = queue name
        self._default_queue = default_queue

    async def publish(
        self, reply: Reply, *, reply_to: str | None, correlation_id: str | None
    ) -> None:
        """Raises when the broker did not confirm it in time; the job must then not be
        acked."""
        body = reply.model_dump_json().encode()
        properties = BasicProperties(
            content_type="application/json",
            correlation_id=correlation_id,
            delivery_mode=DeliveryMode.PERSISTENT.value,
        )
        if reply_to:
            try:
                await self._publisher.publish_body(body, properties, reply_to)
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
        await self._publisher.publish_body(body, properties, self._default_queue)
