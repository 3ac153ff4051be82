"""Runs the live view (worker/live.py) beside the jobs: samples the server's connections
every EXPORT_WORKER_LIVE_SAMPLE_S in a thread, follows the active mappings, keeps the
counts in export_usage, publishes the connection events, answers inspect-export from a
fresh sample; its views are the per-export Prometheus series (worker/metrics.py's
ExportSeries), which exist only while the export is active.

Nothing here is on a job's path: prepare, release and flush never wait for a sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from worker.errors import ExportNotFound, WorkerError
from worker.events import EventPublisher
from worker.live import ConnectionEvent, ConnectionView, ExportView, LiveView, Tracked, Usage
from worker.messages import ConnectionStatus, ExportEvent, ExportLiveState
from worker.metrics import Metrics
from worker.nbd.cuts import end_connection

log = logging.getLogger(__name__)


class UsageStore(Protocol):
    async def tracked_exports(
        self, link_for: Callable[[str], Path], tls: bool
    ) -> list[Tracked]: ...
    async def kept_usage(self) -> dict[str, Usage]: ...
    async def keep_usage(self, usage: list[Usage]) -> None: ...


def connection_status(view: ConnectionView) -> ConnectionStatus:
    return ConnectionStatus(
        client_address=view.client_address,
        client_port=view.client_port,
        connected_at=view.connected_at,
        tls=view.tls,
        device="current" if view.current_device else "previous",
        bytes_written=view.bytes_written,
        bytes_read=view.bytes_read,
    )


def live_state(view: ExportView) -> ExportLiveState:
    return ExportLiveState(
        connections=[connection_status(c) for c in view.connections],
        connections_total=view.connections_total,
        bytes_written=view.bytes_written,
        bytes_read=view.bytes_read,
        last_io_at=view.last_io_at,
        idle_seconds=round(view.idle_seconds, 3),
        device_size=view.device_size,
        planned_bytes=view.planned_bytes,
        progress=view.progress,
        sampled_at=view.sampled_at,
    )


def export_event(event: ConnectionEvent, node_id: str) -> ExportEvent:
    return ExportEvent(
        kind="connected" if event.kind == "connected" else "disconnected",
        seq=event.seq,
        at=event.at,
        node_id=node_id,
        vm_id=event.tracked.vm_id,
        disk_unit_number=event.tracked.disk_unit_number,
        export_name=event.tracked.export_name,
        connection=connection_status(event.connection),
        connections=len(event.export.connections),
        connections_total=event.export.connections_total,
        bytes_written=event.export.bytes_written,
        bytes_read=event.export.bytes_read,
    )


class LiveSampler:
    #: How often the active mappings are read again (a new export is also followed as soon
    #: as someone inspects it).
    TRACK_EVERY_S = 5.0

    def __init__(
        self,
        view: LiveView,
        store: UsageStore,
        *,
        link_for: Callable[[str], Path],
        tls: bool,
        node_id: str,
        metrics: Metrics,
        events: EventPublisher | None = None,
        keep: bool = True,
    ) -> None:
        self.view = view
        self._keep = keep
        self._store = store
        self._link_for = link_for
        self._tls = tls
        self._node_id = node_id
        self._metrics = metrics
        self._events = events
        self._tracked_at = float("-inf")
        self._kept: dict[str, Usage] | None = None
        self._sampling: asyncio.Task[None] | None = None
        #: Relinked exports not followed yet, with the device each opened before.
        self._previous: dict[str, str] = {}

    async def _track(self) -> None:
        if self._kept is None:  # once: what earlier runs kept
            self._kept = await self._store.kept_usage()
        tracked = await self._store.tracked_exports(self._link_for, self._tls)
        self.view.track(tracked, self._kept)
        self._tracked_at = time.monotonic()
        for name, device_path in list(self._previous.items()):
            if self.view.learn_previous(name, device_path) or self.view.tracked(name) is None:
                del self._previous[name]

    def changed(self, export_name: str, previous_device: str | None = None) -> None:
        """A job created, recreated or relinked the export: follow it from the next sample
        on (not only from the next read of the mappings), and, after a relink, keep
        counting the connections still on the device it opened before."""
        self._tracked_at = float("-inf")
        if previous_device is not None and not self.view.learn_previous(
            export_name, previous_device
        ):
            self._previous[export_name] = previous_device

    async def _sample(self) -> None:
        started = time.monotonic()
        if started - self._tracked_at >= self.TRACK_EVERY_S:
            try:
                await self._track()
            except WorkerError as exc:
                if self._kept is None:
                    raise  # never read: nothing to sample against
                # The database away: go on with the exports as last read.
                log.warning("Could not read the active exports; sampling those known: %s", exc)
                self._tracked_at = started
        try:
            found = await asyncio.to_thread(self.view.sample)
        except WorkerError:
            self._metrics.live_samples.labels("failed").inc()
            raise
        self._metrics.live_samples.labels("ok").inc()
        self._metrics.live_sample_duration.observe(time.monotonic() - started)
        for event in found:
            log.info(
                "Export connection %s export_name=%s client=%s:%d seq=%d",
                event.kind,
                event.tracked.export_name,
                event.connection.client_address,
                event.connection.client_port,
                event.seq,
            )
            if self._events is not None:
                self._events.emit(export_event(event, self._node_id))
        usage = self.view.to_keep() if self._keep else []
        if usage:
            try:
                await self._store.keep_usage(usage)
            except WorkerError:
                self.view.not_kept(usage)  # tried again after the next sample
                raise

    async def sample(self) -> None:
        """One sample; callers at the same time share it."""
        if self._sampling is None or self._sampling.done():
            self._sampling = asyncio.create_task(self._sample())
        await asyncio.shield(self._sampling)

    async def _fresh(self, export_name: str) -> ExportView:
        """The export's view from a sample begun after the call. Raises WorkerError."""
        if self.view.tracked(export_name) is None:
            await self._track()  # prepared since the last read of the mappings
        if self._sampling is not None and not self._sampling.done():
            await asyncio.shield(self._sampling)  # begun before the question: not fresh
        await self.sample()
        found = self.view.view(export_name)
        if found is None:
            raise ExportNotFound(f"export {export_name} is not active on this node")
        return found

    async def current(self, export_name: str) -> ExportLiveState:
        """The export's live state from a sample taken now. Raises WorkerError."""
        return live_state(await self._fresh(export_name))

    async def connections(self, export_name: str) -> list[ConnectionStatus]:
        """The export's connections open now (a fresh sample). Raises WorkerError."""
        return [connection_status(c) for c in (await self._fresh(export_name)).connections]

    async def next_seq(self, export_name: str) -> int:
        """The export's next event sequence number, between two samples (a sample runs in a
        thread and writes the same counter)."""
        if self._sampling is not None and not self._sampling.done():
            await asyncio.shield(self._sampling)
        return self.view.next_seq(export_name)

    def last_view(self, export_name: str) -> ExportView | None:
        """The export's view from the last sample (None: not followed)."""
        return self.view.view(export_name)

    async def cut(self, export_name: str) -> int:
        """Ends the export's open connections, and only those (worker/nbd/cuts.py); how
        many were cut. Raises WorkerError when the server cannot be sampled."""
        await self._fresh(export_name)
        main = self.view.main_pid
        if main is None:
            return 0
        held = self.view.held(export_name)
        cut = 0
        for pid, start_ticks, device in held:
            if await asyncio.to_thread(end_connection, main, pid, start_ticks, device):
                cut += 1
                log.warning(
                    "Cut a connection export_name=%s pid=%d (main pid=%d)", export_name, pid, main
                )
        return cut

    async def run(self, interval_s: float) -> None:
        """Samples every `interval_s` until cancelled; failures are logged, once per
        reason, and sampling goes on."""
        last_error = None
        while True:
            try:
                await self.sample()
                last_error = None
            except (WorkerError, OSError) as exc:
                if str(exc) != last_error:
                    log.warning("Could not sample the server's connections: %s", exc)
                    last_error = str(exc)
            await asyncio.sleep(interval_s)

    async def close(self) -> None:
        """Waits for a sample under way (its store may close next), then keeps everything
        counted so far (a stopping worker)."""
        if self._sampling is not None and not self._sampling.done():
            self._sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError, WorkerError, OSError):
                await self._sampling
        if not self._keep:
            return
        try:
            await self._store.keep_usage(self.view.to_keep(everything=True))
        except WorkerError as exc:
            log.warning("Could not keep the live view's counts: %s", exc)
