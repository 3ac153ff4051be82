"""NbdServer: the facade the flow and the CLI see (is_live, ensure_export(s), remove_export).

It owns the order of a create: link, snippet, listing, SIGHUP to the verified main
process, then polling until every new export is listed, all under the reload lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from pathlib import Path

from worker.errors import ExportNotVisible, ProbeTimeout, ServerUnavailable
from worker.metrics import Metrics
from worker.nbd.files import (
    ExportSpec,
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

    async def ensure_export(self, name: str, device_path: str) -> bool:
        """Makes `name` listed and serving `device_path`; True if that took a SIGHUP."""
        return await self.ensure_exports({name: device_path})

    async def ensure_exports(self, exports: Mapping[str, str]) -> bool:
        """Makes every export (name -> device path) listed and pointing at its device, with
        at most one SIGHUP; True if one was sent.

        Raises ServerUnavailable, ExportNotVisible or ConfigWriteError (all retryable).
        """
        try:
            async with self._lock.hold(self._settings.lock_timeout_s) as waited_s:
                self._metrics.lock_wait.observe(waited_s)
                await asyncio.to_thread(self._write_files, exports)
                listed = await self.listed_exports()
                # Names already in the server's memory (e.g. a create that crashed before
                # its commit) need no reload: a reload would not change them anyway.
                missing = set(exports) - listed
                if not missing:
                    return False
                await self._reload_until_listed(missing)
                return True
        except TimeoutError:
            raise ServerUnavailable(
                f"the config lock was not free within {self._settings.lock_timeout_s:g} s"
            ) from None

    def _write_files(self, exports: Mapping[str, str]) -> None:
        for name, device_path in exports.items():
            spec = self.spec(name)
            point_link(spec.link_path, device_path)
            if write_snippet(self._settings.nbd_conf_dir, spec):
                log.info("Added dynamic export to NBD config export_name=%s", name)

    async def remove_export(self, name: str) -> None:
        """Removes the export's snippet and link: new connections fail at once, established
        ones keep their device, and the server forgets the name at its next restart."""
        try:
            async with self._lock.hold(self._settings.lock_timeout_s):
                await asyncio.to_thread(
                    remove_export_files, self._settings.nbd_conf_dir, self.spec(name)
                )
        except TimeoutError:
            raise ServerUnavailable(
                f"the config lock was not free within {self._settings.lock_timeout_s:g} s"
            ) from None

    async def _reload_until_listed(self, names: set[str]) -> None:
        try:
            pid = self.process.send_reload()
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
