"""The fault suite's results: one row per fault, printed at the end of the test run (and
written to $FAULT_TABLE_OUT when set, to refresh RELIABILITY.md)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FaultRow:
    fault: str
    sent: int
    replied: int
    dead_lettered: int
    held_connection: str

    @property
    def lost(self) -> int:
        return self.sent - self.replied


ROWS: list[FaultRow] = []

HEADER = ("fault", "jobs sent", "replied", "dead-lettered", "lost", "held NBD connection")


def render() -> str:
    rows = [
        (r.fault, str(r.sent), str(r.replied), str(r.dead_lettered), str(r.lost), r.held_connection)
        for r in ROWS
    ]
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_if_asked() -> None:
    out = os.environ.get("FAULT_TABLE_OUT")
    if out and ROWS:
        Path(out).write_text(render() + "\n")
