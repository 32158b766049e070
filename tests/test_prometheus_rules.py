"""deploy/prometheus and deploy/grafana without a server: `promtool check rules` on every
rules file, `promtool test rules` with a firing and a quiet case per alert, annotations on
every alert, and the Grafana dashboard's variables, datasource and PromQL (each expression,
its template variables substituted, must parse and name only metrics meter defines).

Also the helpers the end-to-end test (test_prometheus_e2e.py) shares: the dashboard's
expressions and variable queries with Grafana's variables substituted.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from meter.metrics import BY_NAME

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted(PROMETHEUS.glob("*.rules.yml")) + sorted(PROMETHEUS.glob("*.alerts.yml"))
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.test.yml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "meter-dashboard.json"
USAGE_VARIABLES = ("org", "team", "model")

#: What Grafana puts in place of its variables, for a query against Prometheus directly.
SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    **{f"${name}": ".*" for name in USAGE_VARIABLES},  # "All" is the regex .*
}


def substitute(expr: str) -> str:
    for var, value in sorted(SUBSTITUTIONS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unsubstituted variable in {expr!r}"
    return expr


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in doc["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # panels inside collapsed rows
    return [p for p in out if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    """Every target expression of the dashboard, as written (variables unsubstituted)."""
    return [t["expr"] for p in panels(dashboard()) for t in p["targets"]]


def variable_queries() -> dict[str, tuple[str, str]]:
    """name -> (series selector, label) of each `label_values(selector, label)` variable."""
    out = {}
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert m, f"variable {var['name']}: expected label_values(selector, label), got {query!r}"
        out[var["name"]] = (m.group(1), m.group(2))
    return out


def recorded_rules() -> dict[str, str]:
    """record name -> expression, from the recording rules files (a small reader of our own
    layout: `- record: NAME` then `expr: EXPR` or `expr: |` and an indented block)."""
    out: dict[str, str] = {}
    for path in RULE_FILES:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"\s*- record: (\S+)", line)
            if not m:
                continue
            expr_line = lines[i + 1].strip()
            assert expr_line.startswith("expr:"), f"{path.name}: {m.group(1)}: expr must follow record"
            expr = expr_line.removeprefix("expr:").strip()
            if expr == "|":
                indent = len(lines[i + 2]) - len(lines[i + 2].lstrip())
                block = []
                for follow in lines[i + 2 :]:
                    if follow.strip() and len(follow) - len(follow.lstrip()) < indent:
                        break
                    block.append(follow.strip())
                expr = " ".join(b for b in block if b)
            out.setdefault(m.group(1), expr)
    return out


def alert_blocks() -> dict[str, str]:
    text = (PROMETHEUS / "meter.alerts.yml").read_text()
    parts = re.split(r"\n\s*- alert: ", text)[1:]
    return {part.split("\n", 1)[0].strip(): part for part in parts}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (meter's own, recorded ones, the process collector's)."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values are not names
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    return set(re.findall(r"\b(meter_[a-z0-9_]+|[a-z_]+:[a-z0-9_]+:[a-z0-9_]+|process_[a-z_]+)\b", expr))


def defined(name: str) -> bool:
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    return name in BY_NAME or base in BY_NAME


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool missing: install Debian's prometheus package (make system-deps)")
    return path


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


# --- rules ----------------------------------------------------------------------------------


def test_promtool_check_rules_passes_on_every_rules_file(promtool: str) -> None:
    assert {p.name for p in RULE_FILES} >= {"meter.rules.yml", "meter.alerts.yml", "budgets.rules.yml"}
    result = run([promtool, "check", "rules", *map(str, RULE_FILES)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config_accepts_the_scrape_config(promtool: str) -> None:
    result = run([promtool, "check", "config", "--syntax-only", str(PROMETHEUS / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alerts_pass(promtool: str) -> None:
    assert RULE_TESTS
    result = run([promtool, "test", "rules", *map(str, RULE_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for m in re.finditer(r"alertname: (\w+)\n\s+exp_alerts:( \[\])?", path.read_text()):
            (quiet if m.group(2) else fires).add(m.group(1))
    alerts = set(alert_blocks())
    assert len(alerts) >= 8
    assert alerts - fires == set(), "alerts without a test that fires"
    assert alerts - quiet == set(), "alerts without a test that stays quiet"


def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    for name, block in alert_blocks().items():
        assert re.match(r"Meter[A-Z]\w+$", name), name
        for key in ("severity:", "summary:", "description:", "runbook:"):
            assert key in block, f"{name} lacks {key}"
        runbook = block.split("runbook:", 1)[1]
        assert re.search(r"\n\s+1\. ", runbook), f"{name}: the runbook is a numbered list of steps"


def test_rules_use_only_defined_metrics() -> None:
    records = recorded_rules()
    assert {
        "org_team:meter_usage_cost_usd:rate5m",
        "model:meter_usage_tokens:rate5m",
        "job:meter_dlq_ratio:rate10m",
        "job_topic:meter_consumer_lag_messages:sum",
    } <= set(records)
    texts = [*records.values(), *(b.split("annotations:")[0] for b in alert_blocks().values())]
    for text in texts:
        for name in metric_names(text):
            assert defined(name) or name in records or name.startswith("process_"), (name, text)


# --- the Grafana dashboard ----------------------------------------------------------------------


def test_dashboard_has_a_datasource_variable_and_org_team_model_variables() -> None:
    doc = dashboard()
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    queries = variable_queries()
    for name in USAGE_VARIABLES:
        var = variables[name]
        assert var["datasource"]["uid"] == "${datasource}"
        assert var["multi"] and var["includeAll"] and var["allValue"] == ".*", name
        selector, label = queries[name]
        assert label == name and "meter_usage_" in selector
    uids = [p["uid"] for p in [doc]]
    assert uids == ["meter-overview"]


def test_every_panel_queries_the_datasource_variable() -> None:
    for panel in panels(dashboard()):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_covers_health_spend_tokens_dlq_reasons_and_lag() -> None:
    doc = dashboard()
    rows = [p["title"] for p in doc["panels"] if p["type"] == "row"]
    assert len(rows) == 4 and rows[0] == "Pipeline health", rows
    exprs = " ".join(dashboard_exprs())
    for needle in (
        "meter_usage_cost_usd_total",
        "meter_usage_tokens_total",
        "sum by (reason)",
        "meter_consumer_lag_messages",
        "meter_flush_duration_seconds_bucket",
        "org_team:meter_usage_cost_usd:rate5m",
    ):
        assert needle in exprs, needle
    usage = re.compile(r"\bmeter_usage_(events|tokens|cost_usd|unpriced_events)_total\b")
    for expr in filter(usage.search, dashboard_exprs()):
        assert '=~"$model"' in expr, f"usage panel ignores the model variable: {expr}"


def test_dashboard_expressions_parse_and_use_defined_metrics(promtool: str, tmp_path: Path) -> None:
    """promtool parses each expression when it is a recording rule's."""
    records = recorded_rules()
    exprs = dashboard_exprs() + [sel for sel, _ in variable_queries().values()]
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(exprs):
        for name in metric_names(expr):
            assert defined(name) or name in records or name.startswith("process_"), (name, expr)
        lines += [
            f"      - record: dashboard:expr_{i}:check",
            f"        expr: {json.dumps(substitute(expr))}",
        ]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text("\n".join(lines) + "\n")
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
