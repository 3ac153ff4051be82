"""plan(), the reuse-or-create decision, as a table: one row per situation a prepare-export
job can meet, with the facts the flow would find out, the questions plan() asks (in order)
and the plan it settles on."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import pytest

import worker.plan
from worker.devices import Device
from worker.mappings import Mapping, resolve_stored
from worker.messages import Action, PrepareExport
from worker.plan import Answer, Ask, Claim, Fact, Facts, Plan, Repair, Reuse, plan

VM = "4205784a-098a-40f1-1f1e-a5cd2597fd59"
VDB, VDC = "/dev/disk/by-id/virtio-vdb", "/dev/disk/by-id/virtio-vdc"
LOOPBACK = ("127.0.0.1", "::1")
STORED_LOOPBACK = "127.0.0.1,::1"
TOOL = ("10.0.0.7",)
JOB = "job-now"


def row(
    device: str = VDB,
    status: Literal["active", "inactive"] = "active",
    *,
    last_job_id: str = "job-before",
    last_action: str | None = "created",
    flush_error: str | None = None,
    clients: str | None = STORED_LOOPBACK,
    planned_bytes: int | None = None,
    fenced: bool = False,
) -> Mapping:
    return Mapping(
        id=1,
        node_id="n",
        vm_id=VM,
        disk_unit_number=0,
        vm_name="vm",
        export_name=f"migration-vm-{VM}-disk0",
        device_path=device,
        device_id="blk:252:16",
        status=status,
        last_job_id=last_job_id,
        last_action=last_action,
        flush_error=flush_error,
        client_addresses=clients,
        planned_bytes=planned_bytes,
        fenced_at=datetime(2026, 1, 1, tzinfo=UTC) if fenced else None,
    )


def device(path: str = VDB) -> Device:
    return Device(path=path, resolved="/dev/vdb", device_id="blk:252:16", size_bytes=1 << 30)


@dataclass(frozen=True)
class Case:
    mapping: Mapping | None
    #: What the flow finds out when asked (a fact left out must not be asked).
    world: dict[Fact, bool]
    asked: list[Fact]
    expected: Plan
    path: str = VDB
    clients: tuple[str, ...] = LOOPBACK
    job_id: str = JOB
    planned_bytes: int | None = None
    note: str = field(default="", compare=False)


def created(reused: bool = False, clients: str = STORED_LOOPBACK) -> Claim:
    return Claim(Answer(Action.CREATED, reused), clients)


def reuse(*repairs: Repair, clients: str = STORED_LOOPBACK) -> Reuse:
    return Reuse(clients, frozenset(repairs))


L, A, R = Fact.LIVE, Fact.AUTHFILE_ADMITS, Fact.LOADED
OLD_ROW = row(clients=resolve_stored(None, STORED_LOOPBACK))  # as the repository returns it

CASES = {
    # --- no active row: a create ---------------------------------------------------------
    "no mapping: create": Case(None, {R: False}, [R], created()),
    "no mapping, the server still has the name loaded: create, reused": Case(
        None, {R: True}, [R], created(reused=True)
    ),
    "inactive row (released): create, nothing to put back": Case(
        row(status="inactive", last_action="released"), {R: False}, [R], created()
    ),
    "another VM's device: a create; its claim is refused (DeviceInUse), nothing changed": Case(
        None, {R: False}, [R], created(), path=VDC
    ),
    "this job's earlier claim, released since by another job: create": Case(
        row(status="inactive", last_job_id=JOB, last_action="released"), {R: False}, [R],
        created(),
    ),
    # --- an active row for the job's device -----------------------------------------------
    "same device, live, authfile right: plain reuse": Case(
        row(), {L: True, A: True}, [L, A], reuse()
    ),
    "same device, live, last claimed by another job: plain reuse": Case(
        row(last_job_id="someone-else", last_action="relinked+reused"), {L: True, A: True},
        [L, A], reuse(),
    ),
    "same device, not live, not loaded: recreate with a SIGHUP": Case(
        row(), {L: False, R: False}, [L, R], Claim(Answer(Action.RECREATED, False), STORED_LOOPBACK)
    ),
    "same device, not live (link lost), still loaded: recreate, reused": Case(
        row(), {L: False, R: True}, [L, R], Claim(Answer(Action.RECREATED, True), STORED_LOOPBACK)
    ),
    "same device, a kept flush failure: reuse, clear it first": Case(
        row(flush_error="EIO: job f-1 at 2026-01-01T00:00:00Z: fsync failed"),
        {L: True, A: True}, [L, A], reuse(Repair.CLEAR_FLUSH_ERROR),
    ),
    "same device, the job names other clients: reuse, row then authfile": Case(
        row(), {L: True, A: False}, [L, A],
        reuse(Repair.STORE_CLIENTS, Repair.ALIGN_AUTHFILE, clients="10.0.0.7"), clients=TOOL,
    ),
    "same device, row right, authfile missing or wrong: reuse, rewrite it": Case(
        row(), {L: True, A: False}, [L, A], reuse(Repair.ALIGN_AUTHFILE)
    ),
    "same device, the job plans another size: reuse, store it (progress)": Case(
        row(), {L: True, A: True}, [L, A], reuse(Repair.STORE_PLANNED_BYTES), planned_bytes=2**30
    ),
    "same device, the job plans the row's size: plain reuse": Case(
        row(planned_bytes=2**30), {L: True, A: True}, [L, A], reuse(), planned_bytes=2**30
    ),
    "same device, the job says no size: plain reuse, the row's plan stays": Case(
        row(planned_bytes=2**30), {L: True, A: True}, [L, A], reuse()
    ),
    "same device, fenced by a drain or an expiry: reuse, unfence, rewrite the authfile": Case(
        row(fenced=True), {L: True, A: False}, [L, A], reuse(Repair.UNFENCE, Repair.ALIGN_AUTHFILE)
    ),
    "same device, everything wrong at once: reuse, every repair": Case(
        row(flush_error="UNFINISHED: a flush by job f at 2026-01-01T00:00:00Z did not finish",
            fenced=True),
        {L: True, A: False}, [L, A],
        reuse(*Repair, clients="10.0.0.7"), clients=TOOL, planned_bytes=512 * 2**20,
    ),
    "row from before access control (NULL, resolved by the repository): plain reuse": Case(
        OLD_ROW, {L: True, A: True}, [L, A], reuse()
    ),
    "NULL client_addresses not resolved (never from the repository): store, never guess": Case(
        row(clients=None), {L: True, A: True}, [L, A], reuse(Repair.STORE_CLIENTS)
    ),
    # --- an active row for another device: a relink ---------------------------------------
    "other device: relink, the row put back if the export fails": Case(
        row(), {R: True}, [R],
        Claim(Answer(Action.RELINKED, True), STORED_LOOPBACK, restore=row()), path=VDC,
    ),
    "other device, the export not loaded (restarted): relink with a SIGHUP": Case(
        row(), {R: False}, [R],
        Claim(Answer(Action.RELINKED, False), STORED_LOOPBACK, restore=row()), path=VDC,
    ),
    "same device by another path (the row names the path): relink": Case(
        row(), {R: True}, [R],
        Claim(Answer(Action.RELINKED, True), STORED_LOOPBACK, restore=row()),
        path="/dev/vdb",
    ),
    # --- a redelivery of a job that claimed the row and was cut short ---------------------
    "earlier delivery created: finish it, same answer, no question": Case(
        row(last_job_id=JOB, last_action="created"), {}, [],
        Claim(Answer(Action.CREATED, False), STORED_LOOPBACK, resumes=True),
    ),
    "earlier delivery relinked a loaded export: finish it, still reused": Case(
        row(device=VDC, last_job_id=JOB, last_action="relinked+reused"), {}, [],
        Claim(Answer(Action.RELINKED, True), STORED_LOOPBACK, resumes=True), path=VDC,
    ),
    "earlier delivery, the export live now: finish it anyway, the answer it settled": Case(
        row(last_job_id=JOB, last_action="recreated"), {}, [],
        Claim(Answer(Action.RECREATED, False), STORED_LOOPBACK, resumes=True),
    ),
    "earlier claim with no answer recorded: settled now, nothing to put back": Case(
        row(last_job_id=JOB, last_action=None), {L: True, R: True}, [L, R],
        Claim(Answer(Action.REUSED, True), STORED_LOOPBACK, resumes=True),
    ),
}  # fmt: skip


def settle(case: Case) -> tuple[list[Fact], Plan]:
    """plan() driven as the flow drives it, answering each question from the case."""
    request = PrepareExport(
        job_id=case.job_id,
        vm_id=VM,
        vm_name="vm",
        disk_unit_number=0,
        device_path=case.path,
        client_addresses=None if case.clients == LOOPBACK else case.clients,
        planned_bytes=case.planned_bytes,
    )
    facts, asked = Facts(clients=case.clients), list[Fact]()
    while isinstance(step := plan(case.mapping, request, device(case.path), facts), Ask):
        assert step.fact not in asked, f"{step.fact} asked twice"
        asked.append(step.fact)
        facts = facts.learnt(step.fact, case.world[step.fact])
    return asked, step


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_plan(case: Case) -> None:
    asked, settled = settle(case)
    assert (asked, settled) == (case.asked, case.expected)
    assert set(asked) == set(case.world), "a fact the case gives was never asked"


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_plan_that_asks_about_a_reload_is_a_claim(case: Case) -> None:
    """Why the lock-free fast path may stop at that question: no answer makes it a reuse."""
    asked, settled = settle(case)
    if Fact.LOADED in asked:
        assert isinstance(settled, Claim)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_only_a_relink_of_its_own_puts_a_row_back(case: Case) -> None:
    _, settled = settle(case)
    if isinstance(settled, Claim) and settled.restore is not None:
        assert settled.answer.action is Action.RELINKED
        assert not settled.resumes
        assert settled.restore == case.mapping


@pytest.mark.parametrize(
    ("answer", "recorded"),
    [
        (Answer(Action.CREATED, False), "created"),
        (Answer(Action.RELINKED, True), "relinked+reused"),
        (Answer(Action.RECREATED, True), "recreated+reused"),
    ],
)
def test_an_answer_is_recorded_with_the_claim_and_read_back(answer: Answer, recorded: str) -> None:
    assert answer.recorded == recorded
    assert len(recorded) <= 16  # last_action is VARCHAR(16)
    assert Answer.of_recorded(recorded) == answer


def test_an_answer_recorded_before_reused_was_kept_was_not_reused() -> None:
    assert Answer.of_recorded("relinked") == Answer(Action.RELINKED, False)


def test_a_null_column_reads_as_the_default_and_nothing_else_changes() -> None:
    assert resolve_stored(None, STORED_LOOPBACK) == STORED_LOOPBACK
    assert resolve_stored("10.0.0.7", STORED_LOOPBACK) == "10.0.0.7"
    assert resolve_stored("", STORED_LOOPBACK) == ""  # corrupt stays corrupt: never admitted


def test_plan_does_no_io() -> None:
    tree = ast.parse(Path(worker.plan.__file__).read_text())
    imported = {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
    } | {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert imported <= {
        "__future__",
        "dataclasses",
        "enum",
        "worker.devices",
        "worker.mappings",
        "worker.messages",
    }
