"""export-events: published beside the jobs, in order, never in their way.

The live view emits an event when a connection of an export begins or ends; this module
publishes it to the worker's exchange (`event.<node>.<kind>`) through the broker session's
ConfirmedPublisher, one at a time from one task, so a scheduler's queue receives each
export's events in `seq` order. An event that cannot be published is logged and counted
(nbd_export_events_dropped_total{reason}), never retried past the publish budget, and never
blocks or fails a job: emit() only appends to a bounded queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aio_pika

from worker.messages import ExportEvent
from worker.metrics import Metrics
from worker.publisher import ConfirmedPublisher, Unroutable
from worker.topology import event_routing_key

log = logging.getLogger(__name__)


class EventPublisher:
    #: Events waiting to be published; past it, new ones are dropped (and counted).
    QUEUE_LIMIT = 10_000
    #: How long an event waits for a broker session before it is dropped.
    NO_BROKER_WAIT_S = 30.0

    def __init__(self, exchange: str, node_id: str, metrics: Metrics) -> None:
        self._exchange = exchange
        self._node_id = node_id
        self._metrics = metrics
        self._queue: asyncio.Queue[ExportEvent] = asyncio.Queue(self.QUEUE_LIMIT)
        self._publisher: ConfirmedPublisher | None = None
        self._attached = asyncio.Event()

    def attach(self, publisher: ConfirmedPublisher | None) -> None:
        """The broker session's publisher (None: no session now)."""
        self._publisher = publisher
        if publisher is None:
            self._attached.clear()
        else:
            self._attached.set()

    def emit(self, event: ExportEvent) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._dropped(event, "overflow")

    def _dropped(self, event: ExportEvent, reason: str, error: object = None) -> None:
        self._metrics.events_dropped.labels(reason).inc()
        # Nobody bound a queue: a normal state, not worth a line per event.
        level = logging.DEBUG if reason == "unroutable" else logging.WARNING
        log.log(
            level,
            "export-event not published reason=%s export_name=%s kind=%s seq=%d error=%s",
            reason,
            event.export_name,
            event.kind,
            event.seq,
            error,
        )

    async def run(self) -> None:
        """Publishes queued events until cancelled."""
        while True:
            event = await self._queue.get()
            await self._publish(event)

    async def publish_now(self, event: ExportEvent) -> bool:
        """Publishes one event at once (a lease event from the outbox); whether the broker
        took it, or found nobody bound (nobody to tell: done too)."""
        publisher = self._publisher
        if publisher is None:
            return False
        try:
            await publisher.publish(
                self._message(event),
                event_routing_key(self._node_id, event.kind),
                exchange=self._exchange,
            )
        except Unroutable:
            self._metrics.events_dropped.labels("unroutable").inc()
            return True
        except Exception as exc:
            log.warning(
                "Lease event not published; tried again export_name=%s kind=%s error=%s",
                event.export_name,
                event.kind,
                exc,
            )
            return False
        self._metrics.events.labels(event.kind).inc()
        return True

    @staticmethod
    def _message(event: ExportEvent) -> aio_pika.Message:
        return aio_pika.Message(
            event.model_dump_json().encode(),
            content_type="application/json",
            type="export-event",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )

    async def _publish(self, event: ExportEvent) -> None:
        if self._publisher is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._attached.wait(), self.NO_BROKER_WAIT_S)
        publisher = self._publisher
        if publisher is None:
            self._dropped(event, "no_broker")
            return
        try:
            await publisher.publish(
                self._message(event),
                event_routing_key(self._node_id, event.kind),
                exchange=self._exchange,
            )
        except Unroutable as exc:
            self._dropped(event, "unroutable", exc)
        except Exception as exc:
            self._dropped(event, "unconfirmed", exc)
        else:
            self._metrics.events.labels(event.kind).inc()
