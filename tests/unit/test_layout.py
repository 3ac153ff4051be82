"""The layout's two rules, kept true by the suite: a module over 400 lines says why in its
docstring, and what tests and the benchmark both use lives in harness/, so that neither
bench/ nor harness/ reaches into tests/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("worker", "harness", "bench", "tests")
MAX_LINES = 400
REASON = "Over 400 lines"


def modules(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def test_every_long_module_says_why() -> None:
    unexplained = []
    for path in modules(*PACKAGES):
        text = path.read_text()
        if text.count("\n") > MAX_LINES:
            docstring = ast.get_docstring(ast.parse(text)) or ""
            if REASON not in docstring:
                unexplained.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert unexplained == [], f"split these, or say why in the docstring ({REASON} ...)"


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("worker", {"harness", "bench", "tests"}),
        ("harness", {"bench", "tests"}),
        ("bench", {"tests"}),
    ],
)
def test_no_package_reaches_into_one_it_must_not(package: str, forbidden: set[str]) -> None:
    crossings = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & forbidden)
        for path in modules(package)
        if imported_packages(path) & forbidden
    }
    assert crossings == {}
