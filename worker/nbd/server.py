"""NbdServer: the facade the flow and the CLI see (is_live, ensure_export(s), remove_export).

It owns the order of a create: link, snippet, listing, SIGHUP to the verified main
process, then polling until every new export is listed, all under the reload lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from worker.devices import device_size
from worker.errors import (
    ExportNotVisible,
    ProbeTimeout,
    RestartRequired,
    ServerUnavailable,
    Superseded,
)
from worker.metrics import Metrics
from worker.nbd.files import (
    ExportSpec,
    SnippetWrite,
    has_snippet,
    link_target,
    point_link,
    remove_export_files,
    write_snippet,
)
from worker.nbd.probe import list_exports
from worker.nbd.process import MainProcess, ReloadLock
from worker.nbd.wire import export_size, list_exports_native
from worker.settings import Settings

log = logging.getLogger(__name__)

LOCK_FILE_NAME = ".nbd-export-worker.lock"

#: Looks up, in the database, the device an export is committed to (None: not active).
CommittedDevice = Callable[[str], Awaitable[str | None]]


@dataclass(frozen=True)
class Ensured:
    #: name -> the device its link now opens (exports no longer active are left out)
    linked: dict[str, str]
    sighup_sent: bool
    #: False when everything was already in place: another job or worker did the work.
    changed: bool


class NbdServer:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self.process = MainProcess(
            settings.nbd_pid_file,
            settings.nbd_config_file,
            version_timeout_s=settings.probe_timeout_s,
        )
        # In the config directory, not /run: every worker writing this includedir must
        # see the same lock, whatever its own runtime directory is.
        self._lock = ReloadLock(settings.nbd_conf_dir / LOCK_FILE_NAME)

    @property
    def conf_dir(self) -> Path:
        return self._settings.nbd_conf_dir

    def spec(self, name: str) -> ExportSpec:
        return ExportSpec(name=name, link_path=self._settings.link_dir / name)

    async def listed_exports(self) -> frozenset[str]:
        """Names the server lists now. Raises ServerUnavailable (ProbeTimeout if hung)."""
        settings = self._settings
        started = time.monotonic()
        try:
            if settings.probe == "native":
                return await list_exports_native(
                    settings.nbd_host, settings.nbd_port, settings.probe_timeout_s
                )
            return await list_exports(
                settings.nbd_client_bin,
                settings.nbd_host,
                settings.nbd_port,
                settings.probe_timeout_s,
            )
        except ProbeTimeout:
            self._metrics.probe_failures.labels(reason="timeout").inc()
            raise
        except ServerUnavailable:
            self._metrics.probe_failures.labels(reason="unavailable").inc()
            raise
        finally:
            self._metrics.probe_duration.observe(time.monotonic() - started)

    async def servable_size(self, name: str) -> int | None:
        """Opens the export as a client would (NBD_OPT_GO); its size, or None if refused."""
        return await export_size(
            self._settings.nbd_host, self._settings.nbd_port, name, self._settings.probe_timeout_s
        )

    async def is_live(self, name: str, device_path: str) -> bool:
        """Listed by the server, its snippet on disk (so a restart keeps it), and its link
        pointing at `device_path` (so new connections open that device)."""
        spec = self.spec(name)
        if link_target(spec.link_path) != device_path:
            return False
        if not has_snippet(self._settings.nbd_conf_dir, name):
            return False
        return name in await self.listed_exports()

    async def ensure_export(
        self, name: str, device_path: str, committed: CommittedDevice
    ) -> Ensured:
        """Makes `name` listed, servable and opening `device_path`. Raises Superseded when
        the database no longer commits the export to `device_path` (another job changed it
        meanwhile), and what ensure_exports raises."""
        ensured = await self.ensure_exports({name: device_path}, committed)
        if ensured.linked.get(name) != device_path:
            raise Superseded(
                f"export {name} was changed or released by another job while this one "
                "waited; nothing was done for this job"
            )
        return ensured

    async def ensure_exports(
        self, wanted: Mapping[str, str], committed: CommittedDevice
    ) -> Ensured:
        """Points each export at the device the database commits it to *now* (read under
        the lock, so two workers cannot leave a link disagreeing with its row), writes its
        snippet, makes every new one listed with at most one SIGHUP, and checks each is
        servable with the device's size. Exports no longer active are skipped.

        Raises ServerUnavailable, ExportNotVisible or ConfigWriteError (all retryable), and
        RestartRequired when the running server serves an export from another path.
        """
        try:
            async with self._lock.hold(self._settings.lock_timeout_s) as waited_s:
                self._metrics.lock_wait.observe(waited_s)
                linked: dict[str, str] = {}
                for name in wanted:
                    device = await committed(name)
                    if device is not None:
                        linked[name] = device
                changed, replaced = await asyncio.to_thread(self._write_files, linked)
                listed = await self.listed_exports()
                stale = sorted(replaced & listed)
                if stale:
                    raise RestartRequired(
                        f"{', '.join(stale)}: the running server serves an older config for "
                        "this export, which a reload cannot change; restart nbd-server"
                    )
                # Names already in the server's memory (e.g. a create that crashed before
                # its reply) need no reload: a reload would not change them anyway.
                missing = set(linked) - listed
                if missing:
                    await self._reload_until_listed(missing)
                await self._check_servable(linked)
                return Ensured(linked, sighup_sent=bool(missing), changed=bool(changed | missing))
        except TimeoutError:
            raise ServerUnavailable(
                f"the config lock was not free within {self._settings.lock_timeout_s:g} s"
            ) from None

    def _write_files(self, exports: Mapping[str, str]) -> tuple[set[str], set[str]]:
        """Links and snippets; returns the names where anything changed, and those whose
        snippet had other content."""
        changed, replaced = set(), set()
        for name, device_path in exports.items():
            spec = self.spec(name)
            if point_link(spec.link_path, device_path):
                changed.add(name)
            outcome = write_snippet(self._settings.nbd_conf_dir, spec)
            if outcome is not SnippetWrite.UNCHANGED:
                changed.add(name)
            if outcome is SnippetWrite.CREATED:
                log.info("Added dynamic export to NBD config export_name=%s", name)
            elif outcome is SnippetWrite.REPLACED:
                replaced.add(name)
        return changed, replaced

    async def _check_servable(self, linked: Mapping[str, str]) -> None:
        """Listed is not servable (nbd-server-facts.md): open each export as a client
        would, and compare its size with the device's."""
        for name, device_path in linked.items():
            size = await self.servable_size(name)
            if size is None:
                raise ExportNotVisible(
                    f"nbd-server lists {name} but refuses to open it (device {device_path} "
                    "not readable by the server?)"
                )
            expected = await asyncio.to_thread(device_size, device_path)
            if expected is not None and size != expected:
                raise RestartRequired(
                    f"{name} serves {size} bytes but {device_path} has {expected}: the server "
                    "opens another path for this export; restart nbd-server"
                )

    async def point_export(self, name: str, device_path: str) -> None:
        """Re-points the export's link only (new connections open `device_path`)."""
        try:
            async with self._lock.hold(self._settings.lock_timeout_s):
                await asyncio.to_thread(point_link, self.spec(name).link_path, device_path)
        except TimeoutError:
            raise ServerUnavailable(
                f"the config lock was not free within {self._settings.lock_timeout_s:g} s"
            ) from None

    async def remove_export(self, name: str, committed: CommittedDevice) -> bool:
        """Removes the export's snippet and link unless the database (read under the lock)
        has it active again; True if removed. New connections then fail at once,
        established ones keep their device, and the server forgets the name at restart."""
        try:
            async with self._lock.hold(self._settings.lock_timeout_s):
                if await committed(name) is not None:
                    return False
                await asyncio.to_thread(
                    remove_export_files, self._settings.nbd_conf_dir, self.spec(name)
                )
                return True
        except TimeoutError:
            raise ServerUnavailable(
                f"the config lock was not free within {self._settings.lock_timeout_s:g} s"
            ) from None

    async def _reload_until_listed(self, names: set[str]) -> None:
        try:
            pid = await self.process.send_reload()
        except ServerUnavailable:
            self._metrics.sighup_failures.inc()
            raise
        self._metrics.sighups.inc()
        sent = time.monotonic()
        log.info("Sent SIGHUP to nbd-server main process pid=%d exports=%d", pid, len(names))
        deadline = sent + self._settings.reload_timeout_s
        while True:
            # The reload is asynchronous: with many exports the first listing after the
            # signal often lacks the new ones (nbd-server-facts.md).
            listed = await self.listed_exports()
            if names <= listed:
                break
            if not self.process.is_alive(pid):
                raise ServerUnavailable(f"nbd-server main process {pid} died after SIGHUP")
            if time.monotonic() >= deadline:
                missing = ", ".join(sorted(names - listed))
                raise ExportNotVisible(
                    f"nbd-server did not list {missing} within "
                    f"{self._settings.reload_timeout_s:g} s of SIGHUP; see the server log "
                    "(one unparsable snippet makes a reload add nothing)"
                )
            await asyncio.sleep(self._settings.reload_poll_interval_s)
        self._metrics.reload_visible.observe(time.monotonic() - sent)
        if not self.process.is_alive(pid):
            raise ServerUnavailable(f"nbd-server main process {pid} died after SIGHUP")
