"""The broker connection: to the first RabbitMQ URL that answers, failing over in turn.

aio-pika's robust connection reconnects to one URL only; this loop reconnects to the next
node of a cluster instead, declares and consumes again on a fresh channel, and counts it.
Jobs in flight when a connection drops cannot be acked any more: the broker redelivers
them, and handling a job twice is safe. Each connection has two kinds of channel: one that
consumes and settles, and the ConfirmedPublisher's, which replies go out on and which is
renewed whenever a publish on it is not confirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection

from worker.consumer import JobConsumer
from worker.errors import WorkerError
from worker.metrics import Metrics
from worker.publisher import ConfirmedPublisher
from worker.settings import mask_url

log = logging.getLogger(__name__)

#: Backoff between rounds over all URLs: doubles from the first value up to the second.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 10.0
#: How often the worker checks that the broker has not cancelled its consumer.
CONSUMER_CHECK_S = 1.0


def _setter(event: asyncio.Event) -> Callable[..., None]:
    """A close callback bound to this connection's own event (not a loop variable)."""

    def on_close(*_: object) -> None:
        event.set()

    return on_close


class BrokerSession:
    def __init__(
        self,
        urls: list[str],
        make_consumer: Callable[[AbstractChannel, ConfirmedPublisher], JobConsumer],
        metrics: Metrics,
        *,
        connect_timeout_s: float,
        shutdown_grace_s: float,
        publish_timeout_s: float,
        publish_retry_s: float,
        on_publisher: Callable[[ConfirmedPublisher | None], None] | None = None,
    ) -> None:
        """`on_publisher`: told each session's publisher (None: no session), for what is
        published besides replies (export-events)."""
        if not urls:
            raise ValueError("at least one broker URL is required")
        self._urls = urls
        self._make_consumer = make_consumer
        self._metrics = metrics
        self._connect_timeout_s = connect_timeout_s
        self._shutdown_grace_s = shutdown_grace_s
        self._publish_timeout_s = publish_timeout_s
        self._publish_retry_s = publish_retry_s
        self._on_publisher = on_publisher or (lambda publisher: None)
        self._connection: AbstractConnection | None = None
        self._consumer: JobConsumer | None = None

    @property
    def is_consuming(self) -> bool:
        return (
            self._connection is not None
            and not self._connection.is_closed
            and self._consumer is not None
            and self._consumer.is_consuming
        )

    async def _connect(self, start: int, stop: asyncio.Event) -> tuple[AbstractConnection, int]:
        """Tries every URL from `start` on, round after round, until one answers."""
        delay = RETRY_FIRST_S
        while True:
            for offset in range(len(self._urls)):
                index = (start + offset) % len(self._urls)
                url = self._urls[index]
                try:
                    connection = await aio_pika.connect(url, timeout=self._connect_timeout_s)
                except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
                    log.warning("Broker unreachable url=%s error=%s", mask_url(url), exc)
                    continue
                log.info("Connected to broker url=%s", mask_url(url))
                return connection, index
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                raise asyncio.CancelledError
            delay = min(delay * 2, RETRY_MAX_S)

    async def _watch_consumer(self, consumer: JobConsumer) -> None:
        """Returns when the broker has cancelled the consumer (its queue was deleted, or a
        quorum queue lost its members): aio-pika only forgets the consumer then, with no
        callback, and the channel stays open, so without this the worker would idle."""
        while True:
            try:
                if await consumer.cancelled_by_broker():
                    break
            except Exception as exc:  # a channel closing under us: `lost` reports that
                log.debug("Could not check the consumer: %s", exc)
            await asyncio.sleep(CONSUMER_CHECK_S)
        self._metrics.consumer_cancels.inc()
        log.warning("The broker cancelled the consumer; consuming again on a new connection")

    async def run(self, stop: asyncio.Event, on_ready: Callable[[], None]) -> None:
        """Consumes until `stop` is set, reconnecting as needed; then drains and closes.

        Raises WorkerError when the queues cannot be declared (that does not heal)."""
        index = 0
        ready = False
        while not stop.is_set():
            try:
                connection, index = await self._connect(index, stop)
            except asyncio.CancelledError:
                if stop.is_set():
                    return
                raise
            lost = asyncio.Event()
            connection.close_callbacks.add(_setter(lost))
            try:
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                # The broker may close just the channel (consumer_timeout, a protocol error):
                # that is a loss too, or the worker would stay connected and consume nothing.
                channel.close_callbacks.add(_setter(lost))
                publisher = ConfirmedPublisher(
                    connection,
                    timeout_s=self._publish_timeout_s,
                    retry_s=self._publish_retry_s,
                    on_retry=lambda reason: self._metrics.publish_retries.labels(reason).inc(),
                )
                consumer = self._make_consumer(channel, publisher)
                await consumer.start()
            except WorkerError:
                await connection.close()
                raise
            except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
                log.warning("Broker session failed to start: %s", exc)
                await connection.close()
                index += 1
                continue
            self._connection, self._consumer = connection, consumer
            self._on_publisher(publisher)
            if ready:
                self._metrics.broker_reconnects.inc()
                log.info("Consuming again after a broker reconnect")
            else:
                ready = True
                on_ready()
            stopped = asyncio.create_task(stop.wait())
            dropped = asyncio.create_task(lost.wait())
            cancelled = asyncio.create_task(self._watch_consumer(consumer))
            await asyncio.wait({stopped, dropped, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            for task in (stopped, dropped, cancelled):
                task.cancel()
            self._on_publisher(None)
            if stop.is_set():
                log.info("Stopping: no new jobs; draining those in flight")
                await consumer.stop(self._shutdown_grace_s)
                await connection.close()
                return
            log.warning("Broker connection or channel lost; reconnecting, next broker first")
            self._consumer = None
            with contextlib.suppress(Exception):
                await connection.close()
            index += 1
