"""Leases run out: each node expires its own exports, from the database, so that a restarted
worker finishes what another began, at most EXPORT_WORKER_EXPIRY_CHECK_S late.

One round, every few seconds: the ready lease events in the outbox are published; for each
mapping whose lease ends soon or has ended (or that has an idle timeout), decide() says
what to do now, and the round does it:

- the lease ends within EXPORT_WORKER_EXPIRY_NOTICE_S: an `expiring` event (one per
  deadline);
- it ended (or the export was idle that long): fence it at once (no new connection);
- then, with no connection open: flush and release it (the flow's release, mode drain);
  with connections open once EXPORT_WORKER_EXPIRY_GRACE_S have passed since the fence:
  cut them (mode force: that export's connections only), flush, release;
- an `expired` event with the final totals; a failed flush leaves the export fenced and
  active and says `expiry_failed` (flush_failed), never a silent release.

The expired event is written to the outbox before the release, not ready, and made ready
(with the release's own figures) after it: a worker killed in between finds it at its next
round and publishes it once the release is known to have happened. The release is a job
of the flow with a job_id made from the generation (expiry-<generation>-<vm>-<disk>), so
a release repeated after a crash answers from its record, and a prepare-export that took
the export over meanwhile (a new generation) makes it stale_generation: nothing happens.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from worker.errors import ExportInUse, FlushFailed, StaleGeneration, WorkerError
from worker.live import ExportView
from worker.mappings import Mapping, OutboxEvent
from worker.messages import (
    ConnectionStatus,
    ErrorCode,
    ErrorDetail,
    ExportEvent,
    ExportReleased,
    ReleaseExport,
)
from worker.metrics import Metrics

log = logging.getLogger(__name__)


class Step(enum.Enum):
    NOTHING = "nothing"
    NOTICE = "notice"  # the lease ends soon: say so once
    FENCE = "fence"  # it ended: admit nobody, then look again
    WAIT = "wait"  # fenced, connections open, the grace not over
    RELEASE = "release"  # fenced, nobody connected: flush, release
    FORCE = "force"  # fenced, the grace over: cut, flush, release


@dataclass(frozen=True)
class Decision:
    step: Step
    reason: Literal["lease", "idle"] | None = None


def decide(
    mapping: Mapping,
    now: datetime,
    *,
    connections: int,
    idle_s: float | None,
    notice_s: float,
    grace_s: float,
) -> Decision:
    """What the expiry does now about an active mapping, given the database's time, its
    connections open and its idle time (None: unknown). Pure: tests/unit/test_expiry.py."""
    deadline = mapping.lease_expires_at
    reason: Literal["lease", "idle"] | None = None
    if deadline is not None and deadline <= now:
        reason = "lease"
    elif (
        mapping.idle_timeout_s is not None
        and connections == 0
        and idle_s is not None
        and idle_s >= mapping.idle_timeout_s
    ):
        reason = "idle"
    if reason is None:
        if deadline is not None and (deadline - now).total_seconds() <= notice_s:
            return Decision(Step.NOTICE)
        return Decision(Step.NOTHING)
    if mapping.fenced_at is None:
        return Decision(Step.FENCE, reason)
    if connections == 0:
        return Decision(Step.RELEASE, reason)
    if (now - mapping.fenced_at).total_seconds() >= grace_s:
        return Decision(Step.FORCE, reason)
    return Decision(Step.WAIT, reason)


def expiry_job_id(mapping: Mapping) -> str:
    return f"expiry-{mapping.generation}-{mapping.vm_id}-{mapping.disk_unit_number}"


class ExpiryStore(Protocol):
    async def due_for_expiry(self, notice_s: float) -> list[tuple[Mapping, datetime]]: ...
    async def add_events(self, events: list[OutboxEvent]) -> None: ...
    async def outbox(self, *, ready: bool) -> list[OutboxEvent]: ...
    async def event_published(self, event: OutboxEvent) -> None: ...
    async def drop_event(self, event: OutboxEvent) -> None: ...
    async def lookup(
        self, vm_id: str, disk_unit_number: int, job_id: str
    ) -> tuple[Mapping | None, object]: ...


class ExpiryFlow(Protocol):
    async def fence_export(self, vm_id: str, disk_unit_number: int, generation: int) -> bool: ...
    async def release_export(self, request: ReleaseExport) -> ExportReleased: ...


class ExpiryLive(Protocol):
    async def connections(self, export_name: str) -> list[ConnectionStatus]: ...
    async def next_seq(self, export_name: str) -> int: ...
    def last_view(self, export_name: str) -> ExportView | None: ...


class EventSink(Protocol):
    async def publish_now(self, event: ExportEvent) -> bool: ...


class Expiry:
    def __init__(
        self,
        store: ExpiryStore,
        flow: ExpiryFlow,
        live: ExpiryLive,
        events: EventSink,
        *,
        node_id: str,
        notice_s: float,
        grace_s: float,
        metrics: Metrics,
    ) -> None:
        self._store = store
        self._flow = flow
        self._live = live
        self._events = events
        self._node_id = node_id
        self._notice_s = notice_s
        self._grace_s = grace_s
        self._metrics = metrics
        #: `expiring` events written (each once per deadline; the outbox dedupes across
        #: restarts, this saves a sequence number per round).
        self._noticed: set[tuple[str, str]] = set()

    async def run(self, every_s: float) -> None:
        """A round every `every_s` until cancelled; failures are logged and the next round
        tries again (the state is in the database)."""
        last_error = None
        while True:
            try:
                await self.round()
                last_error = None
            except WorkerError as exc:
                if str(exc) != last_error:
                    log.warning("Expiry round failed; tried again: %s", exc)
                    last_error = str(exc)
            await asyncio.sleep(every_s)

    async def round(self) -> None:
        await self._recover()
        for mapping, now in await self._store.due_for_expiry(self._notice_s):
            try:
                await self._expire(mapping, now)
            except WorkerError as exc:
                log.warning("Expiry of %s failed; tried again: %s", mapping.export_name, exc)
        await self._publish_ready()

    async def _recover(self) -> None:
        """Expired events a killed worker wrote but did not make ready: ready once their
        release is known to have happened, dropped when the export was prepared again."""
        for event in await self._store.outbox(ready=False):
            body = ExportEvent.model_validate_json(event.body)
            mapping, _ = await self._store.lookup(body.vm_id, body.disk_unit_number, "")
            if mapping is not None and mapping.is_active and mapping.generation == body.generation:
                continue  # still being expired: this round's _expire carries on
            released = (
                mapping is not None
                and not mapping.is_active
                and mapping.last_job_id
                == f"expiry-{body.generation}-{body.vm_id}-{body.disk_unit_number}"
            )
            if released:
                await self._store.add_events([_ready(event)])
            else:
                await self._store.drop_event(event)

    async def _publish_ready(self) -> None:
        for event in await self._store.outbox(ready=True):
            if not await self._events.publish_now(ExportEvent.model_validate_json(event.body)):
                return  # no broker now: the next round tries again, in order
            await self._store.event_published(event)

    async def _expire(self, mapping: Mapping, now: datetime) -> None:
        name = mapping.export_name
        view = self._live.last_view(name)
        connections = len(await self._live.connections(name)) if _maybe_due(mapping, now) else 0
        decision = decide(
            mapping,
            now,
            connections=connections,
            idle_s=view.idle_seconds if view is not None else None,
            notice_s=self._notice_s,
            grace_s=self._grace_s,
        )
        if decision.step is Step.NOTICE:
            assert mapping.lease_expires_at is not None
            ref = f"{mapping.generation}:{mapping.lease_expires_at.isoformat()}"
            if (name, ref) in self._noticed:
                return
            self._noticed.add((name, ref))
            event = await self._event(mapping, now, "expiring", reason="lease")
            await self._store.add_events(
                [OutboxEvent(name, "expiring", ref, event.model_dump_json(), ready=True)]
            )
            return
        if decision.step is Step.FENCE:
            log.warning("Export expired (%s): fencing it export_name=%s", decision.reason, name)
            if not await self._flow.fence_export(
                mapping.vm_id, mapping.disk_unit_number, mapping.generation
            ):
                return
            # Fenced now: the next round (or this one, once more) releases or waits.
            return
        if decision.step in (Step.RELEASE, Step.FORCE):
            assert decision.reason is not None
            await self._release(mapping, now, decision)

    async def _release(self, mapping: Mapping, now: datetime, decision: Decision) -> None:
        name, ref = mapping.export_name, str(mapping.generation)
        forced = decision.step is Step.FORCE
        before = await self._event(mapping, now, "expired", reason=decision.reason, forced=forced)
        # Written before the release, not ready: a worker killed after the release makes
        # it ready at its next round (see _recover).
        await self._store.add_events(
            [OutboxEvent(name, "expired", ref, before.model_dump_json(), ready=False)]
        )
        request = ReleaseExport(
            type="release-export",
            job_id=expiry_job_id(mapping),
            vm_id=mapping.vm_id,
            disk_unit_number=mapping.disk_unit_number,
            generation=mapping.generation,
            mode="force" if forced else "drain",
            wait_s=0,
        )
        try:
            released = await self._flow.release_export(request)
        except StaleGeneration:
            return  # prepared again meanwhile: not expired (_recover drops the event)
        except ExportInUse:
            return  # a connection did not end in time: the next round again
        except FlushFailed as exc:
            self._metrics.expiries.labels("flush_failed").inc()
            log.error(  # noqa: TRY400 - the event and the reply-like detail say it all
                "Expiry could not flush; the export stays fenced export_name=%s error=%s",
                name,
                exc,
            )
            failed = before.model_copy(
                update={
                    "kind": "expiry_failed",
                    "error": ErrorDetail(
                        code=ErrorCode.FLUSH_FAILED, message=str(exc), errno=exc.errno_name
                    ),
                }
            )
            await self._store.add_events(
                [OutboxEvent(name, "expiry_failed", ref, failed.model_dump_json(), ready=True)]
            )
            return
        final = before.model_copy(update={"cut": released.cut, "forced": released.cut > 0})
        await self._store.add_events(
            [OutboxEvent(name, "expired", ref, final.model_dump_json(), ready=True)]
        )
        self._metrics.expiries.labels("forced" if released.cut else "expired").inc()
        log.warning(
            "Export expired and released (%s) export_name=%s cut=%d",
            decision.reason,
            name,
            released.cut,
        )

    async def _event(
        self,
        mapping: Mapping,
        now: datetime,
        kind: Literal["expiring", "expired"],
        *,
        reason: Literal["lease", "idle"] | None,
        forced: bool = False,
    ) -> ExportEvent:
        view = self._live.last_view(mapping.export_name)
        return ExportEvent(
            kind=kind,
            seq=await self._live.next_seq(mapping.export_name),
            at=now,
            node_id=self._node_id,
            vm_id=mapping.vm_id,
            disk_unit_number=mapping.disk_unit_number,
            export_name=mapping.export_name,
            connections=0 if view is None else len(view.connections),
            connections_total=0 if view is None else view.connections_total,
            bytes_written=0 if view is None else view.bytes_written,
            bytes_read=0 if view is None else view.bytes_read,
            generation=mapping.generation,
            lease_expires_at=mapping.lease_expires_at,
            reason=reason,
            forced=forced,
        )


def _maybe_due(mapping: Mapping, now: datetime) -> bool:
    """Whether the connections matter now (a fresh sample costs a little)."""
    deadline = mapping.lease_expires_at
    return mapping.idle_timeout_s is not None or (deadline is not None and deadline <= now)


def _ready(event: OutboxEvent) -> OutboxEvent:
    return OutboxEvent(event.export_name, event.kind, event.ref, event.body, ready=True)
