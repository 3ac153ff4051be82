"""The errors that carry fields: their code, whether the worker retries them, and their
wording, pinned (an operator's runbook and a scheduler's log filters match on it)."""

from __future__ import annotations

import pytest

from worker.errors import (
    ConfigWriteError,
    DatabaseError,
    RestartRequired,
    Superseded,
    WorkerError,
)
from worker.messages import ErrorCode

ROWS: list[tuple[WorkerError, ErrorCode, bool, str]] = [
    (RestartRequired("migration-vm-a-disk0", "is served from an older config"),
     ErrorCode.RESTART_REQUIRED, False,
     "export migration-vm-a-disk0 is served from an older config; a reload cannot change an "
     "export the server has loaded: restart nbd-server"),
    (Superseded("migration-vm-a-disk0"), ErrorCode.SUPERSEDED, True,
     "export migration-vm-a-disk0 was changed or released by another job while this one "
     "waited; nothing was done for this job"),
    (ConfigWriteError("write snippet", "/etc/nbd-server/conf.d/x.conf", "No space left on device"),
     ErrorCode.CONFIG_WRITE_FAILED, True,
     "cannot write snippet /etc/nbd-server/conf.d/x.conf: No space left on device"),
    (ConfigWriteError("sync", "the authfile directory", None), ErrorCode.CONFIG_WRITE_FAILED,
     True, "cannot sync the authfile directory: failed"),
    (DatabaseError("Table 'nbd.vm_export_mappings' doesn't exist", 1146),
     ErrorCode.DATABASE_ERROR, False,
     "database error 1146: Table 'nbd.vm_export_mappings' doesn't exist"),
    (DatabaseError("the mapping lookup returned no row"), ErrorCode.DATABASE_ERROR, False,
     "database error: the mapping lookup returned no row"),
]  # fmt: skip


IDS = [f"{type(row[0]).__name__}-{i}" for i, row in enumerate(ROWS)]


@pytest.mark.parametrize(("error", "code", "retryable", "text"), ROWS, ids=IDS)
def test_an_error_has_its_code_its_retry_rule_and_its_wording(
    error: WorkerError, code: ErrorCode, retryable: bool, text: str
) -> None:
    assert error.code is code
    assert error.retryable is retryable
    assert str(error) == text


def test_fields_stay_readable() -> None:
    error = ConfigWriteError("point link", "/run/nbd/links/e", "Read-only file system")
    assert (error.action, error.target, error.reason) == (
        "point link", "/run/nbd/links/e", "Read-only file system",
    )  # fmt: skip
    assert Superseded("e").export_name == "e"
    assert DatabaseError("x", 1146).errno == 1146


def test_no_two_failures_share_a_code_but_a_class_and_its_specialisations() -> None:
    """Each code names one kind of failure a job can meet (worker/errors.py): a subclass
    may share its parent's code (a probe timeout is the server unavailable), two unrelated
    classes may not. (Start-up errors elsewhere never answer a job.)"""
    seen: dict[ErrorCode, type[WorkerError]] = {}

    def walk(cls: type[WorkerError]) -> None:
        for sub in cls.__subclasses__():
            if sub.__module__ != "worker.errors":
                continue
            owner = seen.setdefault(sub.code, sub)
            assert owner is sub or issubclass(sub, owner), (sub, owner, sub.code)
            walk(sub)

    walk(WorkerError)
    assert ErrorCode.INTERNAL_ERROR not in seen, "a known failure answered as a bug"
