"""NbdServer: the small facade the flow sees (is_live, ensure_export, relink).

It owns the order of a create: link, snippet, listing, SIGHUP to the verified main
process, then polling until the export is listed, all under the reload lock.
"""

from __future__ import annotations

import asyncio
import logging
import time

from worker.errors import ExportNotVisible, ServerUnavailable
from worker.metrics import Metrics
from worker.nbd.files import ExportSpec, has_snippet, link_target, point_link, write_snippet
from worker.nbd.probe import list_exports
from worker.nbd.process import MainProcess, ReloadLock
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

    def spec(self, name: str) -> ExportSpec:
        return ExportSpec(name=name, link_path=self._settings.link_dir / name)

    async def listed_exports(self) -> frozenset[str]:
        started = time.monotonic()
        try:
            return await list_exports(
                self._settings.nbd_client_bin,
                self._settings.nbd_host,
                self._settings.nbd_port,
                self._settings.probe_timeout_s,
            )
        except ServerUnavailable:
            self._metrics.probe_failures.inc()
            raise
        finally:
            self._metrics.probe_duration.observe(time.monotonic() - started)

    async def is_live(self, name: str, device_path: str) -> bool:
        """Listed by the server, its snippet on disk (so a restart keeps it), and its link
        pointing at `device_path` (so new connections open that device)."""
        spec = self.spec(name)
        if link_target(spec.link_path) != device_path:
            return False
        if not has_snippet(self._settings.nbd_conf_dir, name):
            return False
        return name in await self.listed_exports()

    async def relink(self, name: str, device_path: str) -> None:
        """Points the export at another device; new connections open it, live ones keep theirs."""
        await asyncio.to_thread(point_link, self.spec(name).link_path, device_path)

    async def ensure_export(self, name: str, device_path: str) -> bool:
        """Makes `name` listed and serving `device_path`; True if that took a SIGHUP.

        Raises ServerUnavailable, ExportNotVisible or ConfigWriteError (all retryable).
        """
        spec = self.spec(name)
        try:
            async with self._lock.hold(self._settings.lock_timeout_s) as waited_s:
                self._metrics.lock_wait.observe(waited_s)
                await asyncio.to_thread(point_link, spec.link_path, device_path)
                wrote = await asyncio.to_thread(write_snippet, self._settings.nbd_conf_dir, spec)
                if wrote:
                    log.info("Added dynamic export to NBD config export_name=%s", name)
                if name in await self.listed_exports():
                    # Already in the server's memory (e.g. a create that crashed before its
                    # commit): a reload would change nothing.
                    return False
                await self._reload_until_listed({name})
                return True
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
        log.info("Sent SIGHUP to nbd-server main process pid=%d", pid)
        deadline = sent + self._settings.reload_timeout_s
        while True:
            # The reload is asynchronous: with many exports the first listing after the
            # signal often lacks the new one (nbd-server-facts.md).
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
