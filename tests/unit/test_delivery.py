"""Delivery and Settler: what the consumer reads of an aiormq delivery; settling each once,
in the order asked, with acks that continue the settled run sent as one `multiple` ack
that never covers a tag not yet settled or asked."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from worker.delivery import AlreadySettled, Delivery, Settler


class Channel:
    """Records the settlement frames written, in order; `closed` makes each one fail."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, bool]] = []
        self.closed = False

    async def _write(self, frame: tuple[str, int, bool]) -> None:
        await asyncio.sleep(0)  # the drain
        if self.closed:
            raise ConnectionError("channel closed")
        self.sent.append(frame)

    async def basic_ack(self, tag: int, multiple: bool = False) -> None:
        await self._write(("ack", tag, multiple))

    async def basic_nack(self, tag: int, *, requeue: bool) -> None:
        await self._write(("nack", tag, requeue))

    async def basic_reject(self, tag: int, *, requeue: bool) -> None:
        await self._write(("reject", tag, requeue))


def delivered(channel: Channel, tag: int, **properties: Any) -> DeliveredMessage:
    body = b'{"job_id": "j"}'
    return DeliveredMessage(
        delivery=Basic.Deliver(consumer_tag="c", delivery_tag=tag, routing_key="q"),
        header=ContentHeader(body_size=len(body), properties=Basic.Properties(**properties)),
        body=body,
        channel=cast(Any, channel),
    )


def deliveries(count: int) -> tuple[Channel, list[Delivery]]:
    channel = Channel()
    settler = Settler(cast(Any, channel))
    return channel, [settler.delivery(delivered(channel, tag)) for tag in range(1, count + 1)]


async def test_it_reads_the_fields_a_job_needs() -> None:
    channel = Channel()
    settler = Settler(cast(Any, channel))
    message = settler.delivery(
        delivered(
            channel, 7, correlation_id="corr-1", reply_to="replies", headers={"x-delivery-count": 2}
        )
    )
    assert message.body == b'{"job_id": "j"}'
    assert (message.correlation_id, message.reply_to) == ("corr-1", "replies")
    assert message.headers == {"x-delivery-count": 2}
    assert message.delivery_tag == 7
    bare = settler.delivery(delivered(channel, 8))
    assert (bare.correlation_id, bare.reply_to, bare.headers) == (None, None, {})


@pytest.mark.parametrize(
    ("settle", "sent"),
    [("ack", ("ack", 1, False)), ("nack", ("nack", 1, True)), ("reject", ("reject", 1, False))],
)
async def test_each_delivery_is_settled_once(settle: str, sent: tuple[str, int, bool]) -> None:
    channel, (message,) = deliveries(1)
    await getattr(message, settle)()
    assert channel.sent == [sent]
    for again in ("ack", "nack", "reject"):
        with pytest.raises(AlreadySettled):
            await getattr(message, again)()
    assert channel.sent == [sent]  # nothing more reached the broker


async def test_acks_asked_together_that_continue_the_settled_run_are_one_frame() -> None:
    channel, messages = deliveries(6)
    # 1, 2, 3 and 5 acked together; 4 still running: one frame for 1-3, one for 5 alone.
    await asyncio.gather(*(messages[i].ack() for i in (2, 0, 4, 1)))
    assert channel.sent == [("ack", 3, True), ("ack", 5, False)]
    # 4 acked: the run is 4 (5 is settled already); 6 (delivered, not started) is not covered.
    await messages[3].ack()
    assert channel.sent[-1] == ("ack", 4, False)
    await messages[5].ack()
    assert channel.sent[-1] == ("ack", 6, False)


async def test_an_ack_never_covers_a_tag_nacked_or_rejected_after_it_was_asked() -> None:
    channel, messages = deliveries(4)
    await asyncio.gather(
        messages[0].ack(), messages[1].nack(), messages[2].reject(), messages[3].ack()
    )
    # The refusals are written first, then one ack may cover their tags: they are settled.
    assert channel.sent == [
        ("nack", 2, True),
        ("reject", 3, False),
        ("ack", 4, True),
    ]


async def test_a_tag_not_yet_asked_stops_the_run_and_those_above_it_go_alone() -> None:
    channel, messages = deliveries(5)
    await asyncio.gather(messages[1].ack(), messages[2].ack(), messages[4].ack())
    assert sorted(channel.sent) == [("ack", 2, False), ("ack", 3, False), ("ack", 5, False)]
    await asyncio.gather(messages[0].ack(), messages[3].ack())
    # 1 and 4 were the gaps: with 2, 3 and 5 settled the run is 1-5, one frame.
    assert channel.sent[-1] == ("ack", 4, True)


async def test_a_failed_frame_raises_in_each_of_its_askers() -> None:
    channel, messages = deliveries(3)
    channel.closed = True
    results = await asyncio.gather(*(m.ack() for m in messages), return_exceptions=True)
    assert [type(result) for result in results] == [ConnectionError] * 3
    assert channel.sent == []
