"""worker/expiry.py's decide(): what the expiry does now about one mapping, as a table."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from worker.expiry import Decision, Step, decide
from worker.mappings import Mapping

NOW = datetime(2026, 12, 7, 10, 0, 0, tzinfo=UTC)
NOTICE_S, GRACE_S = 60.0, 30.0


def row(
    *,
    lease_in_s: float | None = None,
    idle_timeout_s: int | None = None,
    fenced_s_ago: float | None = None,
) -> Mapping:
    return Mapping(
        id=1, node_id="n", vm_id="4205784a-098a-40f1-1f1e-a5cd2597fd59", disk_unit_number=0,
        vm_name="vm", export_name="e", device_path="/dev/vdb", device_id="blk:252:16",
        status="active", generation=3, idle_timeout_s=idle_timeout_s,
        lease_s=None if lease_in_s is None else 300,
        lease_expires_at=None if lease_in_s is None else NOW + timedelta(seconds=lease_in_s),
        fenced_at=None if fenced_s_ago is None else NOW - timedelta(seconds=fenced_s_ago),
    )  # fmt: skip


@dataclass(frozen=True)
class Case:
    mapping: Mapping
    connections: int
    idle_s: float | None
    expected: Decision


CASES = {
    "no lease, no idle timeout: nothing": Case(row(), 0, 10.0, Decision(Step.NOTHING)),
    "lease far off: nothing": Case(row(lease_in_s=600), 0, 0.0, Decision(Step.NOTHING)),
    "lease ends within the notice: say so": Case(row(lease_in_s=59), 2, 0.0, Decision(Step.NOTICE)),
    "lease ended: fence first, connections or not": Case(
        row(lease_in_s=-1), 2, 0.0, Decision(Step.FENCE, "lease")
    ),
    "lease ended, fenced, nobody connected: release": Case(
        row(lease_in_s=-5, fenced_s_ago=1), 0, 0.0, Decision(Step.RELEASE, "lease")
    ),
    "lease ended, fenced, connected, within the grace: wait": Case(
        row(lease_in_s=-5, fenced_s_ago=29), 1, 0.0, Decision(Step.WAIT, "lease")
    ),
    "lease ended, fenced, connected, grace over: cut": Case(
        row(lease_in_s=-40, fenced_s_ago=30), 1, 0.0, Decision(Step.FORCE, "lease")
    ),
    "fenced by a drain, lease not over: nothing (the drain's business)": Case(
        row(lease_in_s=600, fenced_s_ago=100), 1, 0.0, Decision(Step.NOTHING)
    ),
    "idle as long as its timeout, nobody connected: fence": Case(
        row(idle_timeout_s=60), 0, 60.0, Decision(Step.FENCE, "idle")
    ),
    "idle long, but a connection is open: not idle": Case(
        row(idle_timeout_s=60), 1, 3600.0, Decision(Step.NOTHING)
    ),
    "idle time not known yet (no sample): nothing": Case(
        row(idle_timeout_s=60), 0, None, Decision(Step.NOTHING)
    ),
    "idle, fenced: release": Case(
        row(idle_timeout_s=60, fenced_s_ago=1), 0, 61.0, Decision(Step.RELEASE, "idle")
    ),
    "lease and idle both over: the lease says why": Case(
        row(lease_in_s=-1, idle_timeout_s=60), 0, 100.0, Decision(Step.FENCE, "lease")
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_decide(case: Case) -> None:
    got = decide(
        case.mapping,
        NOW,
        connections=case.connections,
        idle_s=case.idle_s,
        notice_s=NOTICE_S,
        grace_s=GRACE_S,
    )
    assert got == case.expected
