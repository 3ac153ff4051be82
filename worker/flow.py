"""The reuse-or-create flow: one prepare-export job in, one ExportReady out.

Pure decisions plus calls through two Protocols; it imports no broker, database driver,
subprocess or signal code (a unit test checks), so it runs the same on fakes and real adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from worker.devices import DevicePolicy
from worker.errors import Superseded, WorkerError
from worker.mappings import Mapping
from worker.messages import Action, ExportReady, ExportReleased, PrepareExport, ReleaseExport

log = logging.getLogger(__name__)


class Mappings(Protocol):
    async def find_mapping(self, vm_id: str, disk_unit_number: int) -> Mapping | None: ...
    async def claim(self, request: PrepareExport, device_id: str) -> None: ...
    async def restore(self, mapping: Mapping, claimed_device_id: str) -> bool: ...
    async def committed_device(self, export_name: str) -> str | None: ...
    async def deactivate(self, vm_id: str, disk_unit_number: int) -> Mapping | None: ...


class Ensured(Protocol):
    @property
    def sighup_sent(self) -> bool: ...
    @property
    def changed(self) -> bool: ...


class ExportServer(Protocol):
    async def is_live(self, name: str, device_path: str, *, fresh: bool = True) -> bool: ...
    async def ensure_export(
        self, name: str, device_path: str, committed: Callable[[str], Awaitable[str | None]]
    ) -> Ensured: ...
    async def point_export(self, name: str, device_path: str) -> None: ...
    async def remove_export(
        self, name: str, committed: Callable[[str], Awaitable[str | None]]
    ) -> bool: ...


def decide(mapping: Mapping | None, request: PrepareExport, live: bool) -> Action:
    """What a job needs, given its (vm, disk)'s mapping and whether that export is live
    with the mapping's device."""
    if mapping is None or not mapping.is_active:
        return Action.CREATED
    if mapping.device_path != request.device_path:
        return Action.RELINKED
    return Action.REUSED if live else Action.RECREATED


class KeyedLocks:
    """One asyncio.Lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, int], tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: tuple[str, int]) -> AsyncIterator[bool]:
        """Holds the key's lock; yields whether another holder had it first."""
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield users > 0
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)

    def __contains__(self, key: object) -> bool:
        """Whether someone holds or waits for the key's lock now."""
        return key in self._locks


class ExportFlow:
    def __init__(
        self,
        mappings: Mappings,
        server: ExportServer,
        devices: DevicePolicy,
        *,
        nbd_host: str,
        nbd_port: int,
        node_id: str,
    ) -> None:
        self._mappings = mappings
        self._server = server
        self._devices = devices
        self._nbd_host = nbd_host
        self._nbd_port = nbd_port
        self._node_id = node_id
        # Jobs for one (vm, disk) run one at a time, so two of them make one create.
        self._keys = KeyedLocks()

    def _ready(self, request: PrepareExport, action: Action, *, reused: bool) -> ExportReady:
        return ExportReady(
            job_id=request.job_id,
            vm_id=request.vm_id,
            disk_unit_number=request.disk_unit_number,
            export_name=request.export_name,
            device_path=request.device_path,
            reused=reused,
            action=action,
            nbd_host=self._nbd_host,
            nbd_port=self._nbd_port,
            node_id=self._node_id,
        )

    def _reuse(self, request: PrepareExport) -> ExportReady:
        log.info(
            "Found existing VM export mapping - reuse without SIGHUP job_id=%s export_name=%s",
            request.job_id,
            request.export_name,
        )
        return self._ready(request, Action.REUSED, reused=True)

    async def prepare_export(self, request: PrepareExport) -> ExportReady:
        """Serves one job. Raises WorkerError subclasses; retryable ones may be retried."""
        device = self._devices.check(request.device_path)
        name = request.export_name
        # Fast path, no lock: the common case is a job for a disk already being served, and
        # then one database lookup and a shared listing decide it.
        key = (request.vm_id, request.disk_unit_number)
        mapping = await self._mappings.find_mapping(request.vm_id, request.disk_unit_number)
        could_reuse = decide(mapping, request, live=True) is Action.REUSED
        if (
            could_reuse
            and await self._server.is_live(name, request.device_path, fresh=False)
            # A create, relink or release of this disk under way here (it may have started
            # during the awaits above) goes first: then this job takes the locked path.
            and key not in self._keys
        ):
            return self._reuse(request)

        async with self._keys.hold(key) as waited:
            if waited:
                # Read again: a job for the same disk may have finished meanwhile. (Had one
                # finished without our waiting, the create below finds nothing to change
                # and answers reused all the same.)
                mapping = await self._mappings.find_mapping(request.vm_id, request.disk_unit_number)
            live = (
                mapping is not None
                and mapping.is_active
                and await self._server.is_live(name, mapping.device_path)
            )
            action = decide(mapping, request, live)
            if action is Action.REUSED:
                return self._reuse(request)

            log.info(
                "Creating new VM export mapping job_id=%s export_name=%s action=%s device_path=%s",
                request.job_id,
                name,
                action,
                request.device_path,
            )
            # The database row first: its unique device index settles races with other jobs
            # and workers before anything on disk or in the server changes (DeviceInUse).
            await self._mappings.claim(request, device.device_id)
            try:
                ensured = await self._server.ensure_export(
                    name, request.device_path, self._mappings.committed_device
                )
            except Superseded:
                raise  # a newer job owns the row now: nothing of ours to undo
            except WorkerError:
                if action is Action.RELINKED and mapping is not None:
                    await self._undo_relink(mapping, device.device_id)
                raise
            if not ensured.changed:
                # A worker in another process served the same job first: nothing was left
                # to do, which is what a reuse is.
                action = Action.REUSED
            return self._ready(request, action, reused=not ensured.sighup_sent)

    async def release_export(self, request: ReleaseExport) -> ExportReleased:
        """Marks the mapping inactive, then removes its link and snippet: new connections
        fail at once, established ones keep their device, and the server forgets the name
        at its next restart. Releasing twice, or what was never prepared, is no error."""
        async with self._keys.hold((request.vm_id, request.disk_unit_number)):
            mapping = await self._mappings.find_mapping(request.vm_id, request.disk_unit_number)
            was_active = mapping is not None and mapping.is_active
            if was_active:
                # The row first: should the files' removal fail, reconciliation removes the
                # files of inactive mappings; the other order could bring a released export
                # back.
                await self._mappings.deactivate(request.vm_id, request.disk_unit_number)
            await self._server.remove_export(request.export_name, self._mappings.committed_device)
            log.info(
                "Released VM export mapping job_id=%s export_name=%s was_active=%s",
                request.job_id,
                request.export_name,
                was_active,
            )
            return ExportReleased(
                job_id=request.job_id,
                vm_id=request.vm_id,
                disk_unit_number=request.disk_unit_number,
                export_name=request.export_name,
                was_active=was_active,
                node_id=self._node_id,
            )

    async def _undo_relink(self, previous: Mapping, claimed_device_id: str) -> None:
        """After a failed relink, makes the link agree with the row again, so no row frees
        a device that the export's link still opens: back on the old device if the row
        could be restored, else on whatever the row now commits the export to."""
        name = previous.export_name
        try:
            if await self._mappings.restore(previous, claimed_device_id):
                await self._server.point_export(name, previous.device_path)
                return
            device = await self._mappings.committed_device(name)
            if device is None:
                await self._server.remove_export(name, self._mappings.committed_device)
            else:
                await self._server.point_export(name, device)
        except WorkerError as exc:
            log.warning(
                "Could not undo a failed relink; reconciliation will align it "
                "export_name=%s error=%s",
                previous.export_name,
                exc,
            )
