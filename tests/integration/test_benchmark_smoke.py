"""The benchmark in its small mode, as a smoke test: it runs end to end against the real
stack and every job gets the reply it expects. Its timings are printed, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_small_benchmark_runs_and_sees_no_errors(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--small", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    sections = {row["section"] for row in rows}
    assert {"floor", "reuse", "create", "baseline"} <= sections
    assert [r for r in rows if r["errors"]] == []
    assert "| target |" in (tmp_path / "results.md").read_text()
    print(proc.stdout)
