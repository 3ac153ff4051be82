"""tests/collect_between_tests.py: a test's leaked cycle whose finalizer logs a traceback no
longer breaks a later test's `ast.parse` (CPython 3.11 before 3.11.8, gh-106905)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Fixed in 3.11.8 and 3.12 (the recursion depth became per call).
PYTHON_HAS_THE_BUG = (3, 11) <= sys.version_info < (3, 11, 8)

INNER = '''
import ast, gc, logging

class Leak:
    """Like an asyncio future whose exception nobody retrieved: a cycle that logs when freed."""

    def __init__(self) -> None:
        self.me = self

    def __del__(self) -> None:
        try:
            raise RuntimeError("never retrieved")
        except RuntimeError:
            logging.getLogger("leak").exception("freed")

def test_leaks():
    # Garbage in the oldest generation, as a long-lived client's is: freed only by a full
    # collection, whenever one happens to come.
    leaks = [Leak() for _ in range(100)]
    gc.collect()
    del leaks

def test_parses():
    threshold = gc.get_threshold()
    gc.set_threshold(50, 1, 1)  # full collections during the parse, as a long run has
    try:
        ast.parse(open(ast.__file__).read())
    finally:
        gc.set_threshold(*threshold)
'''


@pytest.mark.parametrize("plugin", [True, False], ids=["with the plugin", "without"])
def test_a_leaked_finalizer_runs_at_teardown_not_inside_the_next_parse(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, plugin: bool
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makeconftest('pytest_plugins = ("tests.collect_between_tests",)' if plugin else "")
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist")
    if plugin or not PYTHON_HAS_THE_BUG:
        result.assert_outcomes(passed=2)
    else:  # the bug itself, so that this test shows what the plugin is for
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines(["*AST constructor recursion depth mismatch*"])
