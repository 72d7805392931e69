"""config/prometheus/patchd-rules.yml and config/grafana/patchd-dashboard.json.

`promtool check rules` and `promtool test rules` must pass (promtool comes with Debian's
prometheus package, which tests/lab/lab.sh installs), every alert rule has a unit test,
and every metric named in a rule or a dashboard query is one patchd exports: the names
come from a real Metrics registry with the daemon's collectors, never from a list here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import types
import typing
from datetime import UTC, datetime
from pathlib import Path

import pytest

from patchd.metrics import HaMetrics, JournalView, Metrics, daemon_collectors

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "config" / "prometheus" / "patchd-rules.yml"
RULE_TESTS = ROOT / "config" / "prometheus" / "patchd-rules.test.yml"
DASHBOARD = ROOT / "config" / "grafana" / "patchd-dashboard.json"

# Series Prometheus writes itself for every scrape of patchd (not exported by patchd).
PROMETHEUS_OWN = {"up"}


# --- the metric names patchd exports ---------------------------------------------------


def exported_series() -> dict[str, str]:
    """Every series name a running daemon can export -> the name of its metric family."""
    metrics = Metrics()

    def no_settings() -> typing.Any:
        return types.SimpleNamespace(windows={}, freezes=(), groups={})

    for collector in daemon_collectors(
        no_settings, lambda: datetime.now(UTC), dict, lambda: JournalView()
    ):
        metrics.registry.register(collector)
    HaMetrics(metrics.registry, lambda: 1.0)  # a daemon with leadership on
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created", ""),
        "info": ("_info",),
        "gauge": ("",),
    }
    names: dict[str, str] = {}
    for family in metrics.registry.collect():
        for suffix in suffixes[family.type]:
            names[family.name + suffix] = family.name
    return names


# --- PromQL: the metric names an expression reads ----------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<str>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<var>\$\{[^}]*\}|\$\w+)
  | (?P<num>(?:0[xX][0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)[a-zA-Z]*)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=@(){}\[\],])
    """,
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_MODIFIERS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip


def tokens(expr: str) -> list[tuple[str, str]]:
    found = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot read {expr[pos : pos + 20]!r} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "ws":
            found.append((kind, match.group()))
        pos = match.end()
    return found


def metric_names(expr: str) -> set[str]:
    """Metric names read by a PromQL expression: identifiers outside label matchers,
    strings and ranges, that are not functions, aggregations, keywords or label lists."""
    toks = tokens(expr)
    names: set[str] = set()
    i = 0

    def skip_group(start: int, opening: str, closing: str) -> int:
        depth = 0
        for j in range(start, len(toks)):
            if toks[j][1] == opening:
                depth += 1
            elif toks[j][1] == closing:
                depth -= 1
                if depth == 0:
                    return j + 1
        raise ValueError(f"unbalanced {opening} in {expr!r}")

    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1][1] if i + 1 < len(toks) else ""
        if text in ("{", "["):
            i = skip_group(i, text, "}" if text == "{" else "]")
            continue
        if kind != "ident":
            i += 1
            continue
        if text in _MODIFIERS:
            i = skip_group(i + 1, "(", ")") if following == "(" else i + 1
            continue
        is_function = following == "(" or (text in _AGGREGATIONS and following in _MODIFIERS)
        if text not in _KEYWORDS and not is_function:
            names.add(text)
        i += 1
    return names


def test_the_promql_reader() -> None:
    assert metric_names(
        'histogram_quantile(0.95, sum by (le, backend) (rate(a_bucket{x="y", le!="1"}[5m])))'
    ) == {"a_bucket"}
    assert metric_names("a > on (job, backend) group_left (x) (max by (b) (c) + 86400)") == {
        "a",
        "c",
    }
    assert metric_names('up{job="p"} == 0 or absent(up{job="p"})') == {"up"}
    assert metric_names("sum(rate(a[$__rate_interval])) without (g) / count(b offset 1h)") == {
        "a",
        "b",
    }
    assert metric_names('time() - x{q=~"$job", s="a b {c}"} < 1e3 and bool y') == {"x", "y"}
    assert metric_names('label_replace(a, "dst", "$1", "src", "(.*)")') == {"a"}
    assert metric_names("a:recorded:rate5m * on () group_right b") == {"a:recorded:rate5m", "b"}


def unknown(names: set[str], exported: dict[str, str]) -> set[str]:
    return {n for n in names if n not in exported and n not in PROMETHEUS_OWN}


# --- the rules ---------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool comes with Debian's prometheus package (tests/lab/lab.sh installs it)"
    return path


def rule_exprs(text: str) -> dict[str, str]:
    """alert name -> expr, read from the rules file (plain scalars, quoted scalars and
    folded blocks; there is no YAML library among patchd's dependencies)."""
    found: dict[str, str] = {}
    lines = text.splitlines()
    alert = None
    for i, line in enumerate(lines):
        if m := re.match(r"\s*- alert:\s*(\S+)\s*$", line):
            alert = m.group(1)
        elif (m := re.match(r"(\s*)expr:\s*(.*)$", line)) and alert is not None:
            indent, value = len(m.group(1)), m.group(2).strip()
            if value in (">", ">-", "|", "|-"):
                block = []
                for more in lines[i + 1 :]:
                    if more.strip() and len(more) - len(more.lstrip()) <= indent:
                        break
                    block.append(more.strip())
                value = " ".join(block).strip()
            elif value[:1] in "\"'":
                value = json.loads(value) if value[0] == '"' else value[1:-1].replace("''", "'")
            found[alert] = value
            alert = None
    return found


@pytest.mark.external  # promtool, from the prometheus package lab.sh installs
def test_promtool_checks_the_rules() -> None:
    check = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    count = re.search(r"SUCCESS: (\d+) rules found", check.stdout)
    assert count, check.stdout
    assert int(count.group(1)) == len(rule_exprs(RULES.read_text()))


@pytest.mark.external  # promtool, from the prometheus package lab.sh installs
def test_promtool_unit_tests_pass() -> None:
    run = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_every_rule_has_unit_tests_firing_and_not() -> None:
    tested = RULE_TESTS.read_text()
    for alert in rule_exprs(RULES.read_text()):
        blocks = re.findall(
            rf"alertname: {re.escape(alert)}\n\s*exp_alerts:(.*?)"
            r"(?=\n\s*- eval_time|\n\s*#|\n\s*- interval|\Z)",
            tested,
            re.S,
        )
        assert blocks, f"{alert} has no test case"
        assert any(b.strip() == "[]" for b in blocks), f"{alert} has no case where it stays quiet"
        assert any(b.strip() != "[]" for b in blocks), f"{alert} has no case where it fires"


def test_the_required_alerts_exist() -> None:
    exprs = rule_exprs(RULES.read_text())
    reads = {alert: metric_names(expr) for alert, expr in exprs.items()}

    def alert_reading(metric: str) -> bool:
        return any(metric in names for names in reads.values())

    for metric in (
        "patchd_run_halted_total",
        "patchd_patch_operations_total",  # rollbacks
        "patchd_group_last_rollback_failed_timestamp_seconds",
        "patchd_retained_oldest_expiry_timestamp_seconds",
        "patchd_snapshot_oldest_age_seconds",
        "patchd_group_pending_windows",
        "patchd_config_last_reload_successful",
        "patchd_backend_up",
        "patchd_target_security_pending_since_timestamp_seconds",
        "up",  # patchd absent
        "patchd_ha_leader",  # no leader
        "patchd_ha_takeovers_total",  # leader changed during a run
    ):
        assert alert_reading(metric), f"no alert rule reads {metric}"
    assert "rollback_failed" not in exprs["PatchdRollback"]
    critical = re.findall(
        r"- alert: (\w+)(?:(?!- alert:).)*?severity: critical", RULES.read_text(), re.S
    )
    assert "PatchdRollbackFailed" in critical


def test_rules_read_only_metrics_patchd_exports() -> None:
    exported = exported_series()
    exprs = rule_exprs(RULES.read_text())
    assert len(exprs) >= 9
    for alert, expr in exprs.items():
        names = metric_names(expr)
        assert names, f"{alert}: no metric found in {expr!r}"
        assert not unknown(names, exported), f"{alert} reads {unknown(names, exported)}"


# --- the dashboard -----------------------------------------------------------------------

GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m"}


def dashboard() -> dict[str, typing.Any]:
    doc: dict[str, typing.Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels(doc: dict[str, typing.Any]) -> list[dict[str, typing.Any]]:
    found = []
    for panel in doc["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def queries(doc: dict[str, typing.Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found = []
    for panel in panels(doc):
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r}", target["expr"]))
    for variable in doc["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else ""
        m = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
        assert m, f"variable {variable['name']}: expected label_values(SELECTOR, LABEL)"
        found.append((f"variable {variable['name']!r}", m.group(1)))
    return found


def test_dashboard_is_a_grafana_dashboard_with_a_datasource_variable() -> None:
    doc = dashboard()
    assert doc["title"] == "patchd"
    assert doc["uid"] == "patchd"
    assert 36 <= doc["schemaVersion"] <= 41
    [source] = [v for v in doc["templating"]["list"] if v["name"] == "datasource"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    ids = [p["id"] for p in panels(doc)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(doc):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24


def test_dashboard_reads_only_metrics_patchd_exports() -> None:
    exported = exported_series()
    used: set[str] = set()
    for where, expr in queries(dashboard()):
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        assert not unknown(names, exported), f"{where} reads {unknown(names, exported)}"
        used |= {exported.get(n, n) for n in names}
    for family in (
        "patchd_window_open",
        "patchd_window_next_open_timestamp_seconds",
        "patchd_runs",
        "patchd_patch_operations",
        "patchd_group_targets_pending",
        "patchd_target_update_available",
        "patchd_group_pending_windows",
        "patchd_patch_duration_seconds",
        "patchd_run_halted",
        "patchd_group_last_rollback_failed_timestamp_seconds",
        "patchd_snapshot_oldest_age_seconds",
        "patchd_retained_oldest_expiry_timestamp_seconds",
        "patchd_backend_up",
        "patchd_config_last_reload_successful",
        "patchd_alert_gate_blocked",
        "patchd_group_paused",
        "patchd_quarantined_versions",
        "patchd_notifications",
    ):
        assert family in used, f"the dashboard shows nothing of {family}"


@pytest.mark.external  # promtool, from the prometheus package lab.sh installs
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses each query (with Grafana's interval variables filled in) as the
    expression of a recording rule."""
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (_, expr) in enumerate(queries(dashboard())):
        for name, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(name, value)
        lines += [f"      - record: dashboard:query:{i}", f"        expr: {json.dumps(expr)}"]
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    check = subprocess.run(
        [promtool(), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("path", [RULES, RULE_TESTS])
def test_rule_files_have_no_tabs(path: Path) -> None:
    assert "\t" not in path.read_text()
