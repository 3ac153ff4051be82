"""The suite's tiers: which tests get the `unit`, `integration`, `slow`, `cluster` and
`containers` markers (what each means: pyproject.toml). They are given here by where a test
is and what it uses, not test by test, so that a new test in the same place gets them too;
a test that is slow by itself says so with `@pytest.mark.slow` where it is written.

`./scripts/test.sh --fast` runs `-m "unit and not slow"`; the full run runs everything.

At the end of a run, tests that took `SLOW_S` or more without the `slow` marker are named,
so that the markers stay true as the suite changes: a note, never a failure (timings on a
shared two-core machine are noisy).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
#: Setup, call and teardown together, in seconds, from which a test counts as slow.
SLOW_S = 15.0
#: The fixtures that start harness/clusters.py's three-node clusters (about a minute).
CLUSTER_FIXTURES = frozenset({"rabbit", "galera"})
#: The modules that build the project's image and run it under a private dockerd.
CONTAINER_MODULES = frozenset({"test_containers.py"})

_took: dict[str, float] = defaultdict(float)
_unmarked: set[str] = set()


def markers_for(path: Path, fixtures: set[str]) -> list[str]:
    names = []
    if path.is_relative_to(TESTS / "unit"):
        names.append("unit")
    elif path.is_relative_to(TESTS / "integration"):
        names.append("integration")
    if fixtures & CLUSTER_FIXTURES:
        names += ["cluster", "slow"]
    if path.name in CONTAINER_MODULES:
        names += ["containers", "slow"]
    return names


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        for name in markers_for(item.path, fixtures):
            if item.get_closest_marker(name) is None:
                item.add_marker(name)
    # The files with the most slow tests first, each file's tests in their order: with the
    # full run's two processes (--dist loadfile) the clusters and the image start at once,
    # instead of one of them starting late and making the run wait for it at the end.
    slow_tests = Counter(item.path for item in items if item.get_closest_marker("slow"))
    first_seen: dict[Path, int] = {}
    for index, item in enumerate(items):
        first_seen.setdefault(item.path, index)
    items.sort(key=lambda item: (-slow_tests[item.path], first_seen[item.path]))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _took[report.nodeid] += report.duration
    if "slow" not in report.keywords:
        _unmarked.add(report.nodeid)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    late = sorted(
        ((took, nodeid) for nodeid, took in _took.items() if nodeid in _unmarked),
        reverse=True,
    )
    late = [(took, nodeid) for took, nodeid in late if took >= SLOW_S]
    if late:
        terminalreporter.section("slow tests not marked slow (tests/tiers.py)")
        for took, nodeid in late:
            terminalreporter.write_line(f"{took:7.1f}s {nodeid}")
