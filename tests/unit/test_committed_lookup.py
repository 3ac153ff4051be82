"""NbdServer reads what an export is committed to through one lookup, bound once by whoever
pairs it with its mappings (ExportFlow, reconcile), not passed into every call."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fakes import FakeExportServer, InMemoryMappings
from worker.devices import DevicePolicy
from worker.flow import ExportFlow
from worker.jobs import JobLedger
from worker.mappings import CommittedExport
from worker.metrics import build_metrics
from worker.nbd.server import NbdServer
from worker.settings import Settings


async def nothing(name: str) -> CommittedExport | None:
    return None


def test_one_server_reads_one_database(tmp_path: Path) -> None:
    server = NbdServer(Settings(node_id="t", auth_dir=tmp_path), build_metrics("t"))
    with pytest.raises(RuntimeError, match="bind_committed"):
        server._lookup()
    mappings = InMemoryMappings()
    server.bind_committed(mappings.committed_export)
    server.bind_committed(mappings.committed_export)  # the same lookup again: a no-op
    assert server._lookup() == mappings.committed_export
    with pytest.raises(ValueError, match="another lookup"):
        server.bind_committed(nothing)


def test_the_flow_binds_its_mappings_to_its_server(tmp_path: Path) -> None:
    mappings, server = InMemoryMappings(), FakeExportServer()
    ExportFlow(
        mappings,
        server,
        DevicePolicy((tmp_path,)),
        JobLedger(mappings),
        nbd_host="h",
        nbd_port=1,
        node_id="n",
        client_addresses=("127.0.0.1",),
    )
    assert server.committed == mappings.committed_export
