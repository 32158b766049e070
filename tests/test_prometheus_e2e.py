"""End to end against a real Prometheus: Debian's `prometheus` server on loopback, with a
temporary config that loads deploy/prometheus's rules files and scrapes a running `meter
run` daemon (a separate process) fed by `meter gen` traffic through the Tansu broker.

Once the lake holds every message: every PromQL expression of the Grafana dashboard and
of the recording rules returns data through Prometheus's HTTP API, every rule loaded
healthy, and the daemon's usage counters equal the lake's totals (`meter.manifest.totals`
and `meter query`): events, each token bucket, cost exactly per series, unpriced events by
model, and the reject counters equal the DLQ's rows by reason.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_prometheus_rules import RULE_FILES, dashboard_exprs, substitute, variable_queries

from meter import reasons as R
from meter.gen import generate
from meter.manifest import totals
from meter.query import query
from meter.schema import TOKEN_COLUMNS

pytestmark = pytest.mark.integration

UNPRICED_MODEL = "o4-mini"  # dropped from the daemon's catalog: its events are unpriced
EVENTS = 20_000
SCRAPE_S = 1
T = TypeVar("T")


def tail(path: Path, max_bytes: int = 8000) -> str:
    try:
        return path.read_bytes()[-max_bytes:].decode(errors="replace")
    except OSError:
        return ""


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, check: Callable[[], None]) -> T:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got is not None:
            return got
        check()
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.25)


def http_get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


@dataclass
class Servers:
    daemon: subprocess.Popen[bytes]
    prometheus: subprocess.Popen[bytes]
    metrics_url: str
    prom_url: str
    brokers: str
    topic: str
    lake: Path
    catalog: Path

    def check_alive(self) -> None:
        assert self.daemon.poll() is None, f"meter run exited with {self.daemon.returncode}"
        assert self.prometheus.poll() is None, f"prometheus exited with {self.prometheus.returncode}"

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.prom_url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            doc = json.loads(http_get(url))
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{path} {params}: HTTP {error.code}: {error.read()[:500]!r}") from None
        assert doc["status"] == "success", doc
        return doc["data"]

    def instant(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.instant(expr)
        return float(result[0]["value"][1]) if result else None


def catalog_without(tmp: Path, model: str) -> Path:
    """The default catalog minus `model`'s entries."""
    text = resources.files("meter").joinpath("catalog", "default.toml").read_text("utf-8")
    head, *blocks = text.split("[[model]]")
    kept = [b for b in blocks if f'id = "{model}"' not in b]
    assert len(kept) < len(blocks), f"{model} is not in the default catalog"
    path = tmp / "catalog.toml"
    path.write_text("[[model]]".join([head, *kept]))
    return path


@pytest.fixture
def servers(tansu: Any, tmp_path: Path) -> Iterator[Servers]:
    from meter.brokers import free_port

    prometheus_bin = shutil.which("prometheus")
    if prometheus_bin is None:
        pytest.skip("prometheus missing: install Debian's prometheus package (make system-deps)")
    metrics_port, prom_port = free_port(), free_port()
    topic = f"prom-e2e-{uuid.uuid4().hex[:10]}"
    tansu.create_topic(topic, 4)
    catalog = catalog_without(tmp_path, UNPRICED_MODEL)
    lake = tmp_path / "lake"
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "rule_files": [str(p) for p in RULE_FILES],
        "scrape_configs": [
            {"job_name": "meter", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}
        ],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    logs = [tmp_path / "meter.log", tmp_path / "prometheus.log"]
    daemon_cmd = [
        sys.executable, "-m", "meter", "run",
        "--brokers", tansu.bootstrap_servers, "--topic", topic, "--lake", str(lake),
        "--group", f"prom-e2e-{uuid.uuid4().hex[:10]}", "--catalog", str(catalog),
        "--batch-max-age-s", "0.5", "--session-timeout-ms", "6000",
        "--metrics-addr", f"127.0.0.1:{metrics_port}", "--metrics-series-budget", "100000",
        "--log-format", "json",
    ]  # fmt: skip
    prom_cmd = [
        prometheus_bin,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        "--log.level=warn",
    ]
    with open(logs[0], "wb") as daemon_log, open(logs[1], "wb") as prom_log:
        prometheus = subprocess.Popen(
            prom_cmd, stdin=subprocess.DEVNULL, stdout=prom_log, stderr=subprocess.STDOUT
        )
        daemon = subprocess.Popen(
            daemon_cmd, stdin=subprocess.DEVNULL, stdout=daemon_log, stderr=subprocess.STDOUT
        )
    try:
        yield Servers(
            daemon,
            prometheus,
            metrics_url=f"http://127.0.0.1:{metrics_port}",
            prom_url=f"http://127.0.0.1:{prom_port}",
            brokers=tansu.bootstrap_servers,
            topic=topic,
            lake=lake,
            catalog=catalog,
        )
    finally:
        for proc in (daemon, prometheus):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (daemon, prometheus):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for path in logs:
            print(f"===== {path.name} (end) =====\n{tail(path)}")


def daemon_samples(s: Servers) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(http_get(s.metrics_url + "/metrics").decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_prometheus_scrapes_the_daemon_and_every_dashboard_and_rule_query_returns_data(
    servers: Servers,
) -> None:
    s = servers
    lake = s.lake

    # 1. Prometheus scrapes the daemon before any traffic, so it sees the counters rise.
    def scraped() -> bool | None:
        try:
            return True if s.value('up{job="meter"} == 1 and on () meter_build_info') else None
        except (urllib.error.URLError, ConnectionError, AssertionError):
            return None

    wait_for("Prometheus to scrape the daemon", scraped, 60, s.check_alive)
    wait_for(
        "the daemon's partition assignment",
        lambda: s.value("sum(meter_assigned_partitions) > 0"),
        60,
        s.check_alive,
    )

    # 2. `meter gen` traffic: NDJSON messages, 2% bad events of every parser reason but
    #    too_large (1 MiB each), and o4-mini events the daemon's catalog cannot price.
    summary = generate(
        s.brokers,
        s.topic,
        events=EVENTS,
        seed=11,
        per_message=5,
        bad_ratio=0.02,
        catalog=s.catalog,
        bad_reasons=[r for r in R.PARSER_REASONS if r != R.TOO_LARGE],
    )
    assert summary.failed == 0 and summary.unpriced > 0, summary

    def landed() -> Any:
        t = totals(lake) if lake.is_dir() else None
        return t if t is not None and t.messages >= summary.messages else None

    lake_totals = wait_for("the lake to hold every message", landed, 90, s.check_alive)
    assert lake_totals.messages == summary.messages
    assert lake_totals.accepted == summary.events

    # 3. Prometheus has scraped the drained state, and the recording rules have run on it.
    accepted = float(lake_totals.accepted)
    wait_for(
        "Prometheus to see every accepted event",
        lambda: True if s.value("sum(meter_usage_events_total)") == accepted else None,
        30,
        s.check_alive,
    )
    rules = s.api("rules")["groups"]
    # budgets.rules.yml works on the budget series a daemon publishes from its policy file;
    # this daemon runs without one, and the budget rules have their own promtool tests.
    records = {
        r["name"]: r
        for g in rules
        for r in g["rules"]
        if r["type"] == "recording" and not r["name"].startswith("budget:")
    }
    alerts = {r["name"]: r for g in rules for r in g["rules"] if r["type"] == "alerting"}
    assert len(records) >= 8 and len(alerts) >= 8
    for name in records:
        wait_for(f"recording rule {name}", lambda name=name: s.instant(name) or None, 30, s.check_alive)
    for rule in [*s.api("rules")["groups"]]:
        for r in rule["rules"]:
            assert r["health"] == "ok", (r["name"], r.get("lastError"))

    # 4. Every expression of the dashboard and of the recording rules returns data.
    empty = []
    for expr in [*dashboard_exprs(), *(r["query"] for r in records.values())]:
        if not s.instant(substitute(expr)):
            empty.append(expr)
    assert empty == [], f"expressions that return no data: {empty}"
    for name, (selector, label) in variable_queries().items():
        values = s.api(f"label/{label}/values", **{"match[]": substitute(selector)})
        assert values, f"dashboard variable {name} has no values"

    # 5. The daemon's counters equal the lake's totals.
    got = daemon_samples(s)

    def family(name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {labels: v for (n, labels), v in got.items() if n == name}

    usage_events = family("meter_usage_events_total")
    assert sum(usage_events.values()) == lake_totals.accepted
    assert got[("meter_events_accepted_total", ())] == lake_totals.accepted
    tokens = family("meter_usage_tokens_total")
    for column in TOKEN_COLUMNS:
        bucket = column.removesuffix("_tokens")
        assert sum(v for k, v in tokens.items() if ("bucket", bucket) in k) == lake_totals.tokens[column], (
            column
        )
    rejected = {dict(k)["reason"]: v for k, v in family("meter_events_rejected_total").items() if v}
    dlq = query(lake, "SELECT reason, count(*) AS n FROM dlq GROUP BY reason").to_pylist()
    assert rejected == {row["reason"]: row["n"] for row in dlq} == lake_totals.rejects_by_reason
    unpriced = {dict(k)["model"]: v for k, v in family("meter_usage_unpriced_events_total").items()}
    rows = query(lake, "SELECT model, count(*) AS n FROM events WHERE cost_usd IS NULL GROUP BY model")
    assert (
        unpriced == {r["model"]: r["n"] for r in rows.to_pylist()} == {UNPRICED_MODEL: lake_totals.unpriced}
    )

    # Cost: every series is the lake's exact sum rounded once; the sum is the lake's to the cent.
    sql = (
        "SELECT coalesce(org, '') AS org, coalesce(team, '') AS team, model,"
        " coalesce(provider, '') AS provider, count(*) AS events, coalesce(sum(cost_usd), 0) AS cost"
        " FROM events GROUP BY ALL"
    )
    by_series = {
        (("model", r["model"]), ("org", r["org"]), ("provider", r["provider"]), ("team", r["team"])): r
        for r in query(lake, sql).to_pylist()
    }
    cost = family("meter_usage_cost_usd_total")
    assert set(cost) == set(by_series) == set(usage_events)
    for labels, row in by_series.items():
        assert usage_events[labels] == row["events"], labels
        assert cost[labels] == float(Decimal(row["cost"])), labels
    lake_cost = Decimal(lake_totals.cost_usd)
    assert sum(Decimal(row["cost"]) for row in by_series.values()) == lake_cost
    assert abs(Decimal(sum(cost.values())) - lake_cost) < Decimal("0.005")
    prom_cost = s.value("sum(meter_usage_cost_usd_total)")
    assert prom_cost is not None and abs(Decimal(prom_cost) - lake_cost) < Decimal("0.005")

    # 6. Ready: partitions assigned, recent flushes, the lake writable.
    assert http_get(s.metrics_url + "/readyz") == b"ready\n"
