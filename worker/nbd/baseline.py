"""The benchmark's baseline: the original system's algorithm, chosen by
EXPORT_WORKER_BASELINE (worker/assembly.py), so that the hot path has no branch for it.

It asks the server with `nbd-client -l` per job whether an export is live (it needs
`allowlist = true`), and makes each create alone: one lock hold and one SIGHUP per create.
"""

from __future__ import annotations

from worker.mappings import CommittedLookup
from worker.nbd.creates import EnsuredExport
from worker.nbd.probe import list_exports
from worker.nbd.server import NbdServer


class BaselineNbdServer(NbdServer):
    async def listed_exports(self) -> frozenset[str]:
        """Names `nbd-client -l` lists: the original system's check, for the baseline only
        (it needs `allowlist = true`). Raises ServerUnavailable/ProbeTimeout."""
        settings = self._settings
        return await self._probes.timed_probe(
            list_exports(
                settings.nbd_client_bin,
                settings.nbd_host,
                settings.nbd_port,
                settings.probe_timeout_s,
            )
        )

    async def _server_knows(self, name: str, pid: int, *, fresh: bool) -> bool:
        # The original system: one `nbd-client -l` per job.
        return name in await self.listed_exports()

    async def ensure_export(
        self, name: str, device_path: str, committed: CommittedLookup | None = None
    ) -> EnsuredExport:
        await self.gated_existing_pid()
        return await self._creates.ensure_alone(name, device_path, committed)
