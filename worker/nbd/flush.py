"""Flushes: an export's device made durable (fsync), through the descriptor held since the
export was prepared and one opened now through its link.

Linux reports a writeback error once per open file, so only a descriptor opened before the
copy sees an error nbd-server already reported to a copy tool. This uses only the held
descriptors, the export's link and the metrics: no reload lock, no probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from worker.devices import HeldDevices, fsync_device, open_device
from worker.errors import FlushFailed
from worker.metrics import Metrics
from worker.nbd.files import ExportSpec, link_target

log = logging.getLogger(__name__)

T = TypeVar("T")


async def in_daemon_thread(fn: Callable[[], T]) -> T:
    """Runs `fn` on a daemon thread of its own: an fsync may block for as long as its volume
    takes, and must not starve the default executor (config writes) nor hold up the
    worker's shutdown (though a thread stuck in the kernel keeps the process from ending)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return  # the awaiting job was cancelled (shutdown)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:
            outcome: tuple[T | None, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        # The loop may be gone by now (the worker stopped while the volume hung).
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="fsync", daemon=True).start()
    return await future


class Flushes:
    """The devices held open per export, and their flushes."""

    def __init__(self, metrics: Metrics, spec: Callable[[str], ExportSpec]) -> None:
        self._metrics = metrics
        self._spec = spec
        self._held = HeldDevices()

    def close(self) -> None:
        """Lets go of the held device descriptors (the worker is stopping)."""
        self._held.close()

    async def hold_device(self, name: str, device_path: str, device_id: str) -> None:
        """Opens the export's device through its link and keeps it open, so that a later
        flush sees every writeback error from now on (HeldDevices); a dict lookup once
        held. Best effort: when it cannot (the device is gone, no descriptors left), a
        flush sees only errors nobody else was told of."""
        if self._held.holds(name, device_id):
            return
        try:
            link = self._checked_link(name, device_path)
            # Off the loop: opening a block device can block (a rescan, a hung path).
            fd = await asyncio.to_thread(open_device, link, device_id)
        except FlushFailed as exc:
            log.warning("Cannot hold the device of %s: %s", name, exc)
            return
        self._held.put(name, device_id, fd)

    def let_go(self, name: str) -> None:
        """Closes the descriptor held for a released export."""
        self._held.drop(name)

    async def flush_export(self, name: str, device_path: str, device_id: str) -> None:
        """fsync()s the export's device: the descriptor held since the export was prepared,
        then one opened now through its link (so it is the device new connections open),
        once the link is seen to point at `device_path` and open `device_id`. Raises
        FlushFailed naming the errno."""
        try:
            try:
                path = self._checked_link(name, device_path)
            except FlushFailed:
                if link_target(self._spec(name).link_path) is not None:
                    raise  # it points at another device
                # No link (half-removed): the device the mapping names is what was written.
                path = Path(device_path)
            held = self._held.dup(name, device_id)
            started = time.monotonic()
            try:
                await in_daemon_thread(lambda: fsync_device(path, device_id, held))
            finally:
                self._metrics.flush_duration.observe(time.monotonic() - started)
        except FlushFailed:
            self._metrics.flushes.labels(result="failed").inc()
            raise
        self._metrics.flushes.labels(result="flushed").inc()

    def _checked_link(self, name: str, device_path: str) -> Path:
        """The export's link, once it points at `device_path`. Raises FlushFailed."""
        link = self._spec(name).link_path
        target = link_target(link)
        if target != device_path:
            raise FlushFailed(
                f"the link of {name} points at {target or 'nothing'}, not {device_path}: "
                "nothing was flushed; reconciliation repairs the link"
            )
        return link
