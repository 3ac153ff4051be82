"""The documents keep up with the code.

Every setting, command, metric and error code has exactly one row in one table under docs/
(a line whose first cell is the name in backticks), and no second one anywhere in the
project's Markdown (top-level *.md and docs/). README.md
stays a front door (under 200 lines), and every relative link in the Markdown resolves: the
file exists and, with a `#fragment`, the heading does.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from worker.cli import build_parser
from worker.messages import ErrorCode
from worker.metrics import build_metrics
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 200
#: The README's two commands, word for word: newcomers copy them, and CI (`.ci/run`) runs
#: the second.
TWO_COMMANDS = (
    "./scripts/dev.sh      # runs the worker, with a development nbd-server it starts "
    "(Ctrl-C stops both)",
    "./scripts/test.sh     # runs the whole test suite: ruff, mypy, unit and integration tests",
)


def markdown_files() -> list[Path]:
    """The project's own documents: top-level Markdown and docs/."""
    return sorted(ROOT.glob("*.md")) + sorted(DOCS.glob("**/*.md"))


def setting_names() -> list[str]:
    return [f"EXPORT_WORKER_{name.upper()}" for name in Settings.model_fields]


def command_names() -> list[str]:
    parser = build_parser()
    subparsers = [
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    ]
    assert len(subparsers) == 1, "expected one set of subcommands"
    return list(subparsers[0].choices)


def metric_names() -> list[str]:
    """The names a scrape shows: counters end in `_total`, an Info in `_info`."""
    suffixes = {"counter": "_total", "info": "_info"}
    registry = build_metrics("docs-test").registry
    return [metric.name + suffixes.get(metric.type, "") for metric in registry.collect()]


def error_codes() -> list[str]:
    return [code.value for code in ErrorCode]


def row_pattern(name: str, *, arguments: bool = False) -> re.Pattern[str]:
    """A table row defining `name`: its first cell is `name` in backticks, optionally
    followed by labels (`{a,b}`) or, for a command, its options (` [--json]`, ` --vm-id`)."""
    tail = r"(?: [-\[(][^`]*)?" if arguments else r"(?:\{[^}`]*\})?"
    return re.compile(rf"^\|\s*`{re.escape(name)}{tail}`\s*\|", re.MULTILINE)


def definitions(pattern: re.Pattern[str]) -> list[Path]:
    """Every Markdown file holding a row matching `pattern`, once per row."""
    return [
        path
        for path in markdown_files()
        for _ in pattern.finditer(path.read_text(encoding="utf-8"))
    ]


def undocumented_or_repeated(names: list[str], *, arguments: bool = False) -> dict[str, list[str]]:
    """Names not defined exactly once, and under docs/: with where they are defined."""
    assert names, "nothing to check"
    bad = {}
    for name in names:
        places = definitions(row_pattern(name, arguments=arguments))
        if len(places) != 1 or DOCS not in places[0].parents:
            bad[name] = [str(place.relative_to(ROOT)) for place in places]
    return bad


def test_every_setting_is_documented_once() -> None:
    assert undocumented_or_repeated(setting_names()) == {}


def test_every_command_is_documented_once() -> None:
    assert undocumented_or_repeated(command_names(), arguments=True) == {}


def test_every_metric_is_documented_once() -> None:
    names = metric_names()
    assert "nbd_export_jobs_total" in names  # the suffix rule holds
    assert undocumented_or_repeated(names) == {}


def test_every_error_code_is_documented_once() -> None:
    assert undocumented_or_repeated(error_codes()) == {}


def test_the_settings_table_is_in_operations() -> None:
    table = (DOCS / "operations.md").read_text(encoding="utf-8")
    missing = [name for name in setting_names() if not row_pattern(name).search(table)]
    assert missing == []


def test_the_readme_is_a_front_door() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < README_MAX_LINES
    for command in TWO_COMMANDS:
        assert command in lines


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def broken_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        check_anchor = bool(fragment) and resolved.suffix == ".md"
        if not resolved.exists() or (check_anchor and fragment not in anchors(resolved)):
            broken.append(target)
    return broken


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path) -> None:
    assert broken_links(path) == []


def test_the_docs_exist() -> None:
    names = {path.name for path in DOCS.glob("*.md")}
    assert {"contract.md", "operations.md", "architecture.md", "development.md"} <= names
