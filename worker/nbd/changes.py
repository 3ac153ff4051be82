"""What changes under the reload lock besides creates (worker/nbd/creates.py): an export
made to agree with its row (align_export, repair_authfile) and the release path
(remove_export), each reading the export's row under the lock.

The release path starts here: a release mode (safe, drain, force) and lease expiry belong
beside remove_export, with what samples the server's connections beside the probes.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from worker.errors import ServerUnavailable
from worker.mappings import CommittedExport, CommittedLookup
from worker.nbd.authfiles import Authfiles, invalid_clients, write_authfile
from worker.nbd.files import (
    ExportSpec,
    has_snippet,
    point_link,
    remove_export_files,
)
from worker.nbd.flush import Flushes
from worker.nbd.process import ReloadLock
from worker.settings import Settings


def lock_timeout(settings: Settings) -> ServerUnavailable:
    return ServerUnavailable(f"the config lock was not free within {settings.lock_timeout_s:g} s")


class ConfigChanges:
    """Edits of one export's files under the reload lock (`lock`, shared with CreateBatch),
    each after reading what the database commits the export to through `lookup`."""

    def __init__(
        self,
        settings: Settings,
        authfiles: Authfiles,
        flushes: Flushes,
        spec: Callable[[str], ExportSpec],
        lookup: Callable[[], CommittedLookup],
        lock: ReloadLock,
    ) -> None:
        self._settings = settings
        self._authfiles = authfiles
        self._flushes = flushes
        self._spec = spec
        self._lookup = lookup
        self._lock = lock

    async def align_export(self, name: str) -> CommittedExport | None:
        """Makes the export's link and authfile agree with its row, read under the lock: a
        reuse with other client addresses (the next connection is judged by the new
        authfile, no reload), or the undoing of a failed relink. Returns what the row
        commits the export to; a row no longer active (None) removes the export as a
        release does."""
        try:
            async with self._lock.hold(self._settings.lock_timeout_s):
                found = await self._lookup()(name)
                if found is None:
                    await self._remove_files(name)
                    return None
                spec = self._spec(name)
                content = self._authfiles.content(name, found.doors())
                assert spec.authfile is not None
                await asyncio.to_thread(write_authfile, spec.authfile, content)
                await asyncio.to_thread(point_link, spec.link_path, found.device_path)
                return found
        except TimeoutError:
            raise lock_timeout(self._settings) from None
        except ValueError as exc:  # a corrupt client_addresses column
            raise invalid_clients(name, exc) from exc

    async def remove_export(self, name: str) -> bool:
        """Closes the export unless the database (read under the lock) has it active again;
        True if it did. Its authfile is emptied first, so new connections are refused at
        once although the server keeps the name until it restarts; then its snippet and
        link go. Established connections keep their device."""
        try:
            async with self._lock.hold(self._settings.lock_timeout_s):
                if await self._lookup()(name) is not None:
                    return False
                await self._remove_files(name)
                return True
        except TimeoutError:
            raise lock_timeout(self._settings) from None

    async def _remove_files(self, name: str) -> None:
        spec = self._spec(name)
        assert spec.authfile is not None
        # Emptied, never deleted: a missing authfile admits everyone. Not created for a
        # name that never had any file (a release of what was never prepared).
        if await asyncio.to_thread(self._has_files, spec):
            content = self._authfiles.content(name, None)
            await asyncio.to_thread(write_authfile, spec.authfile, content)
        await asyncio.to_thread(remove_export_files, self._settings.nbd_conf_dir, spec)
        self._flushes.let_go(name)

    def _has_files(self, spec: ExportSpec) -> bool:
        assert spec.authfile is not None
        return (
            os.path.lexists(spec.authfile)
            or os.path.lexists(spec.link_path)
            or has_snippet(self._settings.nbd_conf_dir, spec.name)
        )

    async def repair_authfile(self, name: str) -> bool:
        """Rewrites the export's authfile from its row, read under the lock (an inactive
        or missing row: nobody may connect). True if it wrote."""
        try:
            async with self._lock.hold(self._settings.lock_timeout_s):
                found = await self._lookup()(name)
                try:
                    admitted = None if found is None else found.doors()
                except ValueError:
                    admitted = None  # a corrupt column: nobody, never a guess
                spec = self._spec(name)
                assert spec.authfile is not None
                content = self._authfiles.content(name, admitted)
                return await asyncio.to_thread(write_authfile, spec.authfile, content)
        except TimeoutError:
            raise lock_timeout(self._settings) from None
