"""A copy in progress held through a fault, and the consistency check after one: what the
fault suites (tests/integration/test_faults.py, test_clusters.py) and the soak
(bench/soak.py) judge a fault by."""

from __future__ import annotations

from typing import Any

from harness.nbd import NbdConnection
from worker.metrics import build_metrics
from worker.nbd.server import NbdServer
from worker.reconcile import reconcile
from worker.repository import Repository
from worker.settings import Settings

HELD_BYTES = b"held-connection-bytes"


class Held:
    """A client connected to an export before the fault, like a copy in progress."""

    def __init__(self, port: int, export_name: str, request: dict[str, Any]) -> None:
        self.export_name = export_name
        #: The job that made the export: reuses of it are this with another job_id.
        self.request = request
        self.conn = NbdConnection(port, export_name)

    def survived(self) -> bool:
        try:
            return self.conn.read(0, len(HELD_BYTES)) == HELD_BYTES
        except OSError:
            return False

    def close(self) -> None:
        self.conn.close()


async def check_consistent(settings: Settings) -> None:
    """Exactly one snippet per active mapping, every active export servable, and nothing
    for reconciliation to repair or explain."""
    repository = await Repository.connect(
        settings.database_url,
        node_id=settings.node_id,
        pool_size=1,
        timeout_s=5,
        client_addresses=settings.client_addresses,
    )
    try:
        active = {m.export_name for m in await repository.list_mappings(active_only=True)}
        snippets = {p.stem for p in settings.nbd_conf_dir.glob("migration-vm-*.conf")}
        assert snippets == active
        server = NbdServer(settings, build_metrics(settings.node_id))
        report = await reconcile(repository, server, dry_run=True)
        assert report.drift() == dict.fromkeys(report.drift(), 0), report.lines()
        for name in active:
            with NbdConnection(settings.nbd_port, name):
                pass  # it opens (NBD_OPT_GO): servable
    finally:
        await repository.close()
