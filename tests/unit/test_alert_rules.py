"""The Prometheus alerting rules (deploy/prometheus/alerts.yml): valid, unit-tested with
promtool, written against metrics the worker exports, and shown on the Grafana dashboard."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from worker.metrics import build_metrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/prometheus/alerts.yml"
RULE_TESTS = ROOT / "deploy/prometheus/alerts.test.yml"
DASHBOARD = ROOT / "deploy/grafana/nbd-export-worker.json"
# Unpacked by scripts/install-system-deps.sh --with-test-tools (as in test_operations.py).
PROMTOOL = Path("/var/cache/nbd-export-worker/prometheus/usr/bin/promtool")

#: Series an alert may use that the worker does not export: the scrape's own.
SCRAPE_SERIES = {"up"}
SEVERITIES = {"critical", "warning"}

PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "atan2",
}


@dataclass(frozen=True)
class Rule:
    alert: str
    expr: str
    keys: frozenset[str]  # every `key:` written in the rule (for, severity, summary, ...)
    severity: str | None


def _parse_rules(text: str) -> list[Rule]:
    """The alerting rules of alerts.yml. There is no YAML library in the project: this
    reads the file's own layout (`- alert:` items; `expr:` inline or as a `>-` block), and
    test_rules_are_valid checks that it finds as many rules as promtool does."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    starts = [i for i, line in enumerate(lines) if re.match(r"^\s*- (alert|record):", line)]
    rules: list[Rule] = []
    for start, end in zip(starts, [*starts[1:], len(lines)], strict=True):
        head = re.match(r"^\s*- alert:\s*(\S+)\s*$", lines[start])
        if head is None:
            continue  # a recording rule
        fields: dict[str, str] = {}
        i = start + 1
        while i < end:
            field = re.match(r"^(\s*)([A-Za-z_]+):\s*(.*?)\s*$", lines[i])
            i += 1
            if field is None:
                continue
            indent, key, value = len(field.group(1)), field.group(2), field.group(3)
            if value in (">", ">-", "|", "|-"):
                block: list[str] = []
                while i < end and (
                    not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
                ):
                    block.append(lines[i].strip())
                    i += 1
                value = " ".join(part for part in block if part)
            elif value[:1] in ("'", '"'):
                value = value[1:-1]
            fields[key] = value
        rules.append(
            Rule(
                alert=head.group(1),
                expr=fields.get("expr", ""),
                keys=frozenset(fields),
                severity=fields.get("severity"),
            )
        )
    return rules


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects: identifiers left once strings, label
    matchers, ranges and grouping clauses are removed, other than functions and keywords."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    bare = re.sub(r"\{[^}]*\}", " ", bare)
    bare = re.sub(r"\[[^\]]*\]", " ", bare)
    # Gone whole, so that `sum by (a) (x)` leaves `sum (x)`: an aggregation, not a series.
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", bare):
        name, call = match.group(1), match.group(2)
        if not call and name not in PROMQL_KEYWORDS:
            names.add(name)
    return names


def exported_names() -> set[str]:
    """Every series name the worker's registry exports, built as worker/metrics.py does
    (labelled series only appear once used: derived from their families)."""
    families = list(build_metrics("n").registry.collect())
    names = {sample.name for family in families for sample in family.samples}
    for family in families:
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count", "created")}
        elif family.type == "info":
            names.add(f"{family.name}_info")
        else:
            names.add(family.name)
    return names


def rules() -> list[Rule]:
    return _parse_rules(RULES.read_text())


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if not PROMTOOL.exists():
        pytest.fail(
            f"promtool is missing ({PROMTOOL}): run scripts/install-system-deps.sh "
            "--with-test-tools"
        )
    return subprocess.run(
        [str(PROMTOOL), *args], capture_output=True, text=True, timeout=120, check=False
    )


# --- promtool -----------------------------------------------------------------------------


def test_rules_are_valid() -> None:
    check = promtool("check", "rules", str(RULES))
    assert check.returncode == 0, check.stdout + check.stderr
    found = re.search(r"SUCCESS: (\d+) rules found", check.stdout)
    assert found, check.stdout
    parsed = rules()
    assert len(parsed) == int(found.group(1)), "this file's parser missed rules promtool found"


def test_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    cases = re.findall(r"alertname:\s*(\S+)\s*\n\s*exp_alerts:[ \t]*(\S*)", RULE_TESTS.read_text())
    firing = {name for name, empty in cases if empty != "[]"}
    quiet = {name for name, empty in cases if empty == "[]"}
    alerts = {rule.alert for rule in rules()}
    assert alerts, "no alerts parsed"
    assert alerts <= firing, f"never seen firing: {sorted(alerts - firing)}"
    assert alerts <= quiet, f"never seen quiet: {sorted(alerts - quiet)}"
    assert firing | quiet <= alerts, f"tests of unknown alerts: {sorted((firing | quiet) - alerts)}"


# --- the rules' content -------------------------------------------------------------------


def test_every_alert_says_how_urgent_it_is_and_what_to_do() -> None:
    for rule in rules():
        missing = {"for", "severity", "summary", "description"} - rule.keys
        assert not missing, f"{rule.alert} lacks {sorted(missing)}"
        assert rule.severity in SEVERITIES, f"{rule.alert}: severity {rule.severity}"


def test_alerts_use_only_metrics_the_worker_exports() -> None:
    exported = exported_names()
    for rule in rules():
        used = metric_names(rule.expr)
        assert used, f"{rule.alert} selects no series: {rule.expr}"
        unknown = used - exported - SCRAPE_SERIES
        assert not unknown, f"{rule.alert} uses series the worker does not export: {unknown}"


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'sum by (job, node) (increase(a_total{kind=~"x|y"}[5m])) > 0 or on (job) '
        '(b offset 15m) and absent(up{job="w"}) unless c_seconds_bucket > 1e3'
    )
    assert metric_names(expr) == {"a_total", "b", "up", "c_seconds_bucket"}


# --- the dashboard ------------------------------------------------------------------------


def test_the_dashboard_shows_every_alert() -> None:
    """Each alert is named in the description of one or more panels, and those panels
    together query every series its expression uses (`up` aside when it only guards an
    alert on the worker's own series)."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    for rule in rules():
        naming = [p for p in panels if re.search(rf"\b{rule.alert}\b", p.get("description", ""))]
        assert naming, f"no panel names {rule.alert} in its description"
        shown = set().union(*(metric_names(t["expr"]) for p in naming for t in p["targets"]))
        needed = metric_names(rule.expr)
        if needed - SCRAPE_SERIES:
            needed -= SCRAPE_SERIES
        assert needed <= shown, f"{rule.alert}: its panels do not show {needed - shown}"


def test_the_dashboard_names_only_alerts_that_exist() -> None:
    alerts = {rule.alert for rule in rules()}
    panels = json.loads(DASHBOARD.read_text())["panels"]
    named = {
        name for p in panels for name in re.findall(r"\b(Nbd[A-Za-z]+)\b", p.get("description", ""))
    }
    assert named <= alerts, f"panels name alerts that do not exist: {named - alerts}"


#: Metric families no panel shows (yet): a new family goes on the dashboard or here.
NOT_ON_THE_DASHBOARD = {
    "nbd_export_read_bytes",
    "nbd_export_idle_seconds",
    "nbd_export_settle_failures",
    "nbd_export_publish_retries",
    "nbd_server_self_tests",
    "nbd_export_events_published",
    "nbd_export_events_dropped",
    "nbd_export_live_samples",
    "nbd_export_live_sample_duration_seconds",
}


def test_the_dashboard_shows_every_metric_family_but_those_listed() -> None:
    """The checksum metrics among them: what checksum-export did (by outcome), its hashing
    speed and how many run."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    shown = set().union(*(metric_names(t["expr"]) for p in panels for t in p["targets"]))
    families = {f.name for f in build_metrics("n").registry.collect()}
    suffixes = ("", "_total", "_bucket", "_count", "_sum", "_info")
    missing = {f for f in families if not {f + s for s in suffixes} & shown} - NOT_ON_THE_DASHBOARD
    assert not missing, f"no panel shows {sorted(missing)}"
    listed_but_shown = {f for f in NOT_ON_THE_DASHBOARD if {f + s for s in suffixes} & shown}
    assert not listed_but_shown, f"shown, so no longer to list: {sorted(listed_but_shown)}"
    assert families >= NOT_ON_THE_DASHBOARD, NOT_ON_THE_DASHBOARD - families
