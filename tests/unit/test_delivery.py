"""Delivery: what the consumer reads of an aiormq delivery, and settling it once."""

from __future__ import annotations

from typing import Any, cast

import pytest
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from worker.delivery import AlreadySettled, Delivery


class Channel:
    """Records what was sent for which tag."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, bool | None]] = []

    async def basic_ack(self, tag: int) -> None:
        self.sent.append(("ack", tag, None))

    async def basic_nack(self, tag: int, *, requeue: bool) -> None:
        self.sent.append(("nack", tag, requeue))

    async def basic_reject(self, tag: int, *, requeue: bool) -> None:
        self.sent.append(("reject", tag, requeue))


def delivered(channel: Channel, tag: int, **properties: Any) -> DeliveredMessage:
    body = b'{"job_id": "j"}'
    return DeliveredMessage(
        delivery=Basic.Deliver(consumer_tag="c", delivery_tag=tag, routing_key="q"),
        header=ContentHeader(body_size=len(body), properties=Basic.Properties(**properties)),
        body=body,
        channel=cast(Any, channel),
    )


async def test_it_reads_the_fields_a_job_needs() -> None:
    channel = Channel()
    message = Delivery(
        delivered(
            channel,
            7,
            correlation_id="corr-1",
            reply_to="replies",
            headers={"x-delivery-count": 2},
        )
    )
    assert message.body == b'{"job_id": "j"}'
    assert (message.correlation_id, message.reply_to) == ("corr-1", "replies")
    assert message.headers == {"x-delivery-count": 2}
    assert message.delivery_tag == 7
    bare = Delivery(delivered(channel, 8))
    assert (bare.correlation_id, bare.reply_to, bare.headers) == (None, None, {})


@pytest.mark.parametrize(
    ("settle", "sent"),
    [
        ("ack", ("ack", 3, None)),
        ("nack", ("nack", 3, True)),
        ("reject", ("reject", 3, False)),
    ],
)
async def test_it_settles_on_its_channel_once(settle: str, sent: tuple[str, int, bool]) -> None:
    channel = Channel()
    message = Delivery(delivered(channel, 3))
    await getattr(message, settle)()
    assert channel.sent == [sent]
    for again in ("ack", "nack", "reject"):
        with pytest.raises(AlreadySettled):
            await getattr(message, again)()
    assert channel.sent == [sent]  # nothing more reached the broker
