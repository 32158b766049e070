"""meter.metrics without a broker: the definitions, exact usage totals, the series budget and
its `__other__` fold, the TTL, hostile label values, the fast text rendering against
prometheus-client's own, record_flush from a real durable flush, consumer lag, readiness and
the HTTP endpoint. Every test uses a private registry."""

from __future__ import annotations

import gzip
import random
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meter import metrics as M
from meter.config import Config, ConfigError, load
from meter.metrics import BUCKETS, BY_NAME, DEFINITIONS, OTHER, Lag, Metrics, Usage
from meter.schema import LAKE_EVENTS, TOKEN_COLUMNS

ROOT = Path(__file__).resolve().parent.parent
NOW_MS = 1_764_380_000_000
USAGE_FAMILIES = (*M.USAGE_FAMILIES, M.UNPRICED_FAMILY)


# --- helpers ----------------------------------------------------------------------------


def events(rows: list[dict[str, Any]]) -> pa.Table:
    """A LAKE_EVENTS table; string fields default to null, tokens to 0, cost to null."""
    defaults: dict[str, Any] = {"event_id": "e", "ts": NOW_MS, "user": "u", "model": "m"}
    defaults |= {"kafka_topic": "usage", "kafka_partition": 0, "kafka_offset": 0}
    columns: dict[str, list[Any]] = {f.name: [] for f in LAKE_EVENTS}
    for row in rows:
        for f in LAKE_EVENTS:
            columns[f.name].append(
                row.get(f.name, defaults.get(f.name, 0 if f.name in TOKEN_COLUMNS else None))
            )
    return pa.table({f.name: pa.array(columns[f.name], f.type) for f in LAKE_EVENTS}, schema=LAKE_EVENTS)


def teams(first: int, n: int, cost: str = "0.000000000001", **extra: Any) -> pa.Table:
    return events(
        [
            {"team": f"team-{i}", "org": "acme", "cost_usd": Decimal(cost), "input_tokens": i, **extra}
            for i in range(first, first + n)
        ]
    )


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str | bytes) -> Samples:
    """Every sample of an exposition, by (name, sorted labels), read by prometheus-client's parser."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


def family(s: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in s.items() if n == name}


def collected(usage: Usage) -> Samples:
    registry = CollectorRegistry()
    registry.register(usage)
    return samples(generate_latest(registry))


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- definitions --------------------------------------------------------------------------


def test_every_definition_follows_the_naming_conventions() -> None:
    names = [d.name for d in DEFINITIONS]
    assert len(names) == len(set(names))
    for d in DEFINITIONS:
        assert re.fullmatch(r"meter_[a-z0-9_]+", d.name), d.name
        assert d.help and d.help == d.help.strip(), d.name
        assert d.name.endswith("_total") == (d.kind == "counter"), d.name
        assert d.kind != "info" or d.name.endswith("_info"), d.name
        for unit in ("seconds", "bytes", "usd"):
            assert not re.search(rf"_{unit}_(?!total$)", d.name), f"{d.name}: the unit goes last"
        assert not re.search(r"_(ms|milliseconds|kb|mb|cents)(_|$)", d.name), f"{d.name}: use base units"
        for label in d.labels:
            assert label == M._USAGE or re.fullmatch(r"[a-z_]+", label), (d.name, label)
    assert BY_NAME["meter_flush_duration_seconds"].kind == "histogram"
    assert BY_NAME["meter_flush_rows"].kind == "histogram"


def test_the_exposition_holds_exactly_the_defined_families_and_the_docs_list_them() -> None:
    m = Metrics(CollectorRegistry())
    m.usage.add(teams(0, 3, model="mystery-model"))
    m.lag.values = {("usage", 0): 5}
    m.offset_alarm.labels("usage", "0").set(0)
    families = text_string_to_metric_families(m.exposition().decode())
    exposed = {f.name for f in families if not f.name.endswith("_created")}  # off in `serve`
    # prometheus-client's parser names counter families without `_total`
    # budgets and flags are exposed by meter.budget's and meter.detect's own collectors
    elsewhere = ("meter_budget_", "meter_flagged_")
    defined = {d.name.removesuffix("_total") for d in DEFINITIONS if not d.name.startswith(elsewhere)}
    assert exposed == defined
    docs = (ROOT / "docs" / "metrics.md").read_text()
    missing = [d.name for d in DEFINITIONS if f"`{d.name}`" not in docs]
    assert missing == [], f"docs/metrics.md does not describe {missing}"


def test_known_label_values_start_at_zero() -> None:
    """Rates and alerts over a label value (commit failures, a reject reason) need the series
    before the first event, or `rate()` misses the first increase."""
    m = Metrics(CollectorRegistry())
    s = samples(m.exposition())
    assert s[("meter_commits_total", (("outcome", "failed"),))] == 0
    assert s[("meter_manifest_writes_total", (("outcome", "conflict"),))] == 0
    assert s[("meter_events_rejected_total", (("reason", "invalid_json"),))] == 0
    assert s[("meter_rebalances_total", (("kind", "lost"),))] == 0


# --- usage: exact totals ------------------------------------------------------------------


def test_usage_totals_are_exact_to_the_picodollar() -> None:
    """Cost sums are integers of 10^-12 USD; the exposed float of each series is the exact
    total rounded once, never a float sum."""
    rng = random.Random(5)
    usage = Usage()
    rows = []
    for i in range(3000):
        cost = Decimal(rng.randrange(10**15)).scaleb(-12)  # up to $1000 with 12 decimals
        rows.append({"team": f"t{i % 7}", "org": "o", "model": "m", "cost_usd": cost, "output_tokens": i})
    usage.add(events(rows[:1000]))
    usage.add(events(rows[1000:]))
    exact: dict[str, Decimal] = {}
    for row in rows:
        exact[row["team"]] = exact.get(row["team"], Decimal(0)) + row["cost_usd"]
    totals = usage.totals()
    assert totals["cost_usd"] == sum(exact.values())
    assert totals["events"] == 3000
    assert totals["tokens"]["output_tokens"] == sum(range(3000))
    cost = family(samples(usage.render()), "meter_usage_cost_usd_total")
    for team, value in exact.items():
        labels = (("model", "m"), ("org", "o"), ("provider", ""), ("team", team))
        assert cost[labels] == float(value)  # correctly rounded once, from the exact total
    assert abs(sum(cost.values()) - float(sum(exact.values()))) < 1e-6


def test_unpriced_events_are_counted_by_model_and_cost_nothing() -> None:
    usage = Usage()
    usage.add(
        events(
            [
                {"model": "gpt-5", "cost_usd": Decimal("0.5")},
                {"model": "mystery", "cost_usd": None},
                {"model": "mystery", "cost_usd": None},
                {"model": "enigma", "cost_usd": None},
            ]
        )
    )
    s = samples(usage.render())
    assert family(s, "meter_usage_unpriced_events_total") == {
        (("model", "mystery"),): 2,
        (("model", "enigma"),): 1,
    }
    assert usage.totals()["cost_usd"] == Decimal("0.5")
    assert usage.totals()["events"] == 4


def test_render_equals_prometheus_clients_own_exposition() -> None:
    """`Usage.render` (label text escaped once per series) and `Usage.collect` through
    `generate_latest` give the same samples, hostile labels included."""
    usage = Usage(budget=120)
    rows = [
        {"team": t, "org": o, "model": "m", "provider": p, "cost_usd": Decimal("1.25"), "reasoning_tokens": 3}
        for t in ('q"uote', "back\\slash", "new\nline", "ünï 太郎 🚀", "__other__", "x" * 128)
        for o in ("acme", None)
        for p in ("anthropic", None)
    ]
    usage.add(events(rows + [{"model": "zzz", "team": f"t{i}"} for i in range(40)]))
    rendered, via_client = samples(usage.render()), collected(usage)
    assert rendered == via_client
    assert len(family(rendered, "meter_usage_tokens_total")) <= 120


# --- usage: the series budget, __other__, the TTL -----------------------------------------


def test_label_sets_beyond_the_budget_fold_into_other_and_totals_stay_exact() -> None:
    """Budget 20: the events and cost families hold 20 label sets (18 exact, the rest kept
    for folded ones), the tokens family 20 // 6 = 3 label sets of six series."""
    usage = Usage(budget=20)
    rows = [
        {
            "org": f"org-{i % 2}",
            "team": f"team-{i}",
            "model": f"m{i % 2}",
            "input_tokens": i,
            "cost_usd": Decimal(i),
        }
        for i in range(30)
    ]
    usage.add(events(rows))
    usage.render()  # the flush is added in before a read
    usage.add(events(rows[:5]))  # admitted label sets keep their series
    s = samples(usage.render())
    for name in USAGE_FAMILIES:
        assert len(family(s, name)) <= 20, name
    by_team = {dict(k)["team"]: v for k, v in family(s, "meter_usage_events_total").items()}
    assert {t: v for t, v in by_team.items() if t != OTHER} == {
        f"team-{i}": (2 if i < 5 else 1) for i in range(18)
    }
    # Folding turns the team value into __other__ first. The first such set (org-0, m0) still
    # fit; org-1's did not, so those went on folding, down to the all-__other__ set.
    folded = {k: v for k, v in family(s, "meter_usage_events_total").items() if dict(k)["team"] == OTHER}
    assert folded == {
        (("model", "m0"), ("org", "org-0"), ("provider", ""), ("team", OTHER)): 6,
        (("model", OTHER), ("org", OTHER), ("provider", OTHER), ("team", OTHER)): 6,
    }
    assert family(s, "meter_usage_folded_total")[(("family", "meter_usage_events_total"),)] == 12
    # tokens: 2 exact label sets and __other__; counted each time a folded set is added in
    assert family(s, "meter_usage_folded_total")[(("family", "meter_usage_tokens_total"),)] == 28 + 3
    assert family(s, "meter_usage_series")[(("family", "meter_usage_tokens_total"),)] == 18
    assert s[("meter_usage_series_budget", ())] == 20
    totals = usage.totals()
    assert totals["events"] == 35
    assert totals["tokens"]["input_tokens"] == sum(range(30)) + sum(range(5))
    assert totals["cost_usd"] == sum(range(30)) + sum(range(5))
    assert sum(family(s, "meter_usage_cost_usd_total").values()) == sum(range(30)) + sum(range(5))


def test_folding_team_values_keeps_the_breakdown_by_model_exact() -> None:
    """A flood of teams folds team values first: tokens and spend by model stay exact."""
    usage = Usage(budget=600)  # 540 exact label sets for events and cost, 90 for tokens
    rows = [
        {
            "org": "acme",
            "team": f"team-{i}",
            "model": f"m{i % 3}",
            "provider": "p",
            "output_tokens": 10 + i % 7,
        }
        for i in range(3000)
    ]
    for row in rows:
        row["cost_usd"] = Decimal(row["output_tokens"]).scaleb(-6)
    usage.add(events(rows))
    s = samples(usage.render())
    for name in USAGE_FAMILIES:
        assert len(family(s, name)) <= 600, name
    for model in ("m0", "m1", "m2"):
        mine = [r for r in rows if r["model"] == model]
        tokens = sum(
            v
            for k, v in family(s, "meter_usage_tokens_total").items()
            if ("model", model) in k and ("bucket", "output") in k
        )
        assert tokens == sum(r["output_tokens"] for r in mine), model
        cost = sum(v for k, v in family(s, "meter_usage_cost_usd_total").items() if ("model", model) in k)
        assert abs(cost - float(sum(r["cost_usd"] for r in mine))) < 1e-9, model
    assert not any(dict(k)["model"] == OTHER for k in family(s, "meter_usage_tokens_total"))


def test_hundred_thousand_teams_stay_within_the_default_budget_with_exact_totals() -> None:
    usage = Usage()
    for first in range(0, 100_000, 25_000):
        usage.add(teams(first, 25_000, cost="0.000123456789", model="claude-sonnet-4-5"))
    usage.add(events([{"model": f"unknown-{i}", "team": "t"} for i in range(6000)]))
    s = samples(usage.render())
    for name in USAGE_FAMILIES:
        assert 0 < len(family(s, name)) <= M.DEFAULT_SERIES_BUDGET, name
    totals = usage.totals()
    assert totals["events"] == 106_000
    assert totals["cost_usd"] == Decimal("0.000123456789") * 100_000
    assert totals["tokens"]["input_tokens"] == sum(range(100_000))
    assert totals["unpriced"] == 6000
    folded = family(s, "meter_usage_folded_total")
    # 106,000 label sets (each unpriced row is of its own model); the exact ones were admitted
    assert folded[(("family", "meter_usage_events_total"),)] == 106_000 - usage.table.exact_capacity
    assert folded[(("family", "meter_usage_tokens_total"),)] == 106_000 - usage.tokens.exact_capacity
    assert folded[(("family", M.UNPRICED_FAMILY),)] == 6000 - usage.unpriced.exact_capacity
    other_team = (("model", "claude-sonnet-4-5"), ("org", "acme"), ("provider", ""), ("team", OTHER))
    assert family(s, "meter_usage_events_total")[other_team] == 100_000 - usage.table.exact_capacity


def test_flushes_are_added_in_at_most_once_a_second_and_before_every_read() -> None:
    clock = Clock()
    usage = Usage(clock=clock)
    for step in range(10):  # ten flushes within a second: summed in Arrow, not yet in the series
        usage.add(teams(step, 2))
        clock.now += 0.1
    assert usage.table.series == {}
    clock.now += 0.05
    usage.add(teams(100, 1))  # a second after the first: the ten are added in
    assert sum(s.values[0] for s in usage.table.series.values()) == 20
    assert usage.totals()["events"] == 21  # a read adds in the rest
    assert usage.totals()["tokens"]["input_tokens"] == sum(range(11)) + sum(range(1, 10)) + 100


def test_idle_label_sets_expire_after_the_ttl_and_free_their_slots() -> None:
    clock = Clock()
    usage = Usage(budget=18, ttl_s=100.0, clock=clock)  # tokens: 3 label sets, 2 of them exact
    usage.add(teams(0, 2))  # team-0, team-1
    clock.now += 60
    usage.add(teams(1, 1))  # team-1 stays fresh
    clock.now += 60  # team-0 idle for 120 s
    s = samples(usage.render())
    for name in ("meter_usage_events_total", "meter_usage_tokens_total"):
        assert {dict(k)["team"] for k in family(s, name)} == {"team-1"}, name
        assert family(s, "meter_usage_expired_total")[(("family", name),)] == 1
    usage.add(teams(5, 1))  # a new team gets the freed slot, not __other__
    s = samples(usage.render())
    assert {dict(k)["team"] for k in family(s, "meter_usage_tokens_total")} == {"team-1", "team-5"}
    assert family(s, "meter_usage_folded_total")[(("family", "meter_usage_tokens_total"),)] == 0


def test_configured_labels_drop_team_add_client_and_user() -> None:
    usage = Usage(labels=("org", "model", "client"))
    usage.add(
        events([{"org": "o", "team": "t1", "client": "ide"}, {"org": "o", "team": "t2", "client": "ide"}])
    )
    s = samples(usage.render())
    assert family(s, "meter_usage_events_total") == {(("client", "ide"), ("model", "m"), ("org", "o")): 2}
    usage.configure(("org", "user"), 5000, 3600.0)  # new label names start afresh
    usage.add(events([{"org": "o", "user": "ada"}]))
    assert family(samples(usage.render()), "meter_usage_events_total") == {(("org", "o"), ("user", "ada")): 1}
    with pytest.raises(ValueError, match="usage label"):
        Usage(labels=("org", "prompt_hash"))


def test_no_usage_labels_gives_one_series_per_family() -> None:
    usage = Usage(labels=())
    usage.add(teams(0, 10, cost="0.1"))
    s = samples(usage.render())
    assert family(s, "meter_usage_events_total") == {(): 10}
    assert family(s, "meter_usage_cost_usd_total") == {(): 1.0}
    assert len(family(s, "meter_usage_tokens_total")) == len(BUCKETS)
    assert samples(usage.render()) == collected(usage)


def test_config_settings_of_the_usage_metrics() -> None:
    base = {"brokers": "127.0.0.1:9092", "topic": ("usage",), "lake": "lake"}
    c = Config(**base)  # type: ignore[arg-type]
    assert c.metrics_labels == ("org", "team", "model", "provider")
    assert (c.metrics_user_label, c.metrics_series_budget) == (False, 5000)
    env = {
        "METER_BROKERS": "127.0.0.1:9092",
        "METER_TOPIC": "usage",
        "METER_LAKE": "lake",
        "METER_METRICS_LABELS": "org, model,client",
        "METER_METRICS_USER_LABEL": "true",
        "METER_METRICS_SERIES_BUDGET": "600",
        "METER_METRICS_SERIES_TTL_S": "60",
    }
    c = load(None, env)
    assert c.metrics_labels == ("org", "model", "client")
    assert (c.metrics_user_label, c.metrics_series_budget, c.metrics_series_ttl_s) == (True, 600, 60.0)
    m = Metrics(CollectorRegistry())
    m.configure(c)
    assert (m.usage.labels, m.usage.budget) == (("org", "model", "client", "user"), 600)
    with pytest.raises(ConfigError, match="metrics_labels"):
        Config(**base, metrics_labels=("org", "user"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="metrics_series_budget"):
        Config(**base, metrics_series_budget=5)  # type: ignore[arg-type]


# --- hostile label values -------------------------------------------------------------------

HOSTILE = (
    'quote " inside',
    "back \\ slash \\\\ twice",
    '\\"',
    "trailing backslash \\",
    "ünïcödé ñ 太郎 Ивана 🚀 \u200f rtl \u05d0",
    'braces {a="b"} , = #',
    "# HELP not a comment",
    "x" * 128,
    "é" * 64,  # 128 bytes of two-byte characters: the longest a value may be
    "𝒳" * 32,  # 128 bytes of four-byte characters
    "__other__",
)


def hostile_metrics() -> Metrics:
    m = Metrics(CollectorRegistry())
    rows = [
        {"team": team, "model": model, "org": "acme", "provider": "p", "cost_usd": Decimal("0.01")}
        for team in HOSTILE
        for model in HOSTILE[:4] + HOSTILE[-3:]
    ]
    rows += [{"team": "t", "model": model} for model in HOSTILE]  # unpriced
    m.usage.add(events(rows))
    m.lag.values = {("usage", 3): 7}
    return m


def test_hostile_labels_round_trip_through_prometheus_clients_parser() -> None:
    m = hostile_metrics()
    s = samples(m.exposition())
    teams_seen = {dict(k)["team"] for k in family(s, "meter_usage_events_total")}
    assert teams_seen == {*HOSTILE, "t"}
    models_seen = {dict(k)["model"] for k in family(s, M.UNPRICED_FAMILY)}
    assert models_seen == set(HOSTILE)
    assert sum(family(s, "meter_usage_events_total").values()) == len(HOSTILE) * 7 + len(HOSTILE)


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool missing: install Debian's prometheus package (make system-deps)")
    return path


def test_hostile_labels_pass_promtool_check_metrics(promtool: str) -> None:
    text = hostile_metrics().exposition()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_the_daemons_default_exposition_passes_promtool(promtool: str) -> None:
    """The default registry: the process collectors next to meter's own families."""
    text = M.DEFAULT.exposition()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


# --- record_flush from a real durable flush ----------------------------------------------


def durable_flush(lake: Path) -> Any:
    from meter.pricing import load_catalog
    from meter.stages import Buffer, Chunk, Durable, ParseAndPrice, write_flush

    def line(n: int, **fields: Any) -> bytes:
        doc = {
            "event_id": f"e{n}",
            "ts": NOW_MS - 60_000,
            "user": "u",
            "model": "gpt-5",
            "input_tokens": 10 + n,
        }
        return orjson.dumps(doc | {"output_tokens": n, "team": f"team-{n % 2}", "org": "acme"} | fields)

    flushes: list[Any] = []

    class Keep:
        def submit(self, item: Any) -> None:
            flushes.append(item)

        def poll(self) -> None: ...

        def join(self) -> None: ...

        def close(self) -> None: ...

    positions: dict[tuple[str, int], int | None] = {("usage", 0): None}
    buffer = Buffer(Keep(), positions, 1 << 40, 1 << 40, 1e9)
    parse = ParseAndPrice(buffer, load_catalog(), 35 * 86_400_000, clock_ms=lambda: NOW_MS)
    payloads: list[bytes | None] = [
        line(1),
        line(2) + b"\n" + line(3, model="mystery"),
        b"{bad",
        b"[]",
        line(4),
    ]
    parse.submit([Chunk("usage", 0, payloads, list(range(5)), NOW_MS)])
    buffer.join()
    [flush] = flushes
    entry = write_flush(str(lake), flush, "w")
    return Durable(entry, flush.events, flush.dlq)


def test_record_flush_moves_lake_counters_and_usage_from_the_durable_entry(tmp_path: Path) -> None:
    from meter.manifest import totals

    durable = durable_flush(tmp_path / "lake")
    wall = Clock(1_800_000_000.0)
    m = Metrics(CollectorRegistry(), wall=wall)
    m.record_flush(durable)
    t = totals(tmp_path / "lake")
    value = m.registry.get_sample_value
    assert value("meter_events_accepted_total") == t.accepted == 4
    assert value("meter_messages_written_total") == t.messages == 5
    assert value("meter_events_rejected_total", {"reason": "invalid_json"}) == 1
    assert value("meter_events_rejected_total", {"reason": "not_object"}) == 1
    assert value("meter_flushes_total") == 1
    assert value("meter_manifest_writes_total", {"outcome": "ok"}) == 1
    assert value("meter_files_written_total", {"kind": "events"}) == 1
    assert value("meter_lake_written_bytes_total", {"kind": "dlq"}) == sum(
        f.bytes for f in durable.entry.files if f.kind == "dlq"
    )
    assert value("meter_flush_rows_count") == 1 and value("meter_flush_rows_sum") == 6
    assert value("meter_last_flush_timestamp_seconds") == wall.now
    usage = m.usage.totals()
    assert usage["events"] == t.accepted
    assert usage["tokens"] == t.tokens
    assert usage["cost_usd"] == Decimal(t.cost_usd)
    assert usage["unpriced"] == t.unpriced == 1


# --- consumer lag ---------------------------------------------------------------------------


class WatermarkConsumer:
    def __init__(self, marks: dict[tuple[str, int], tuple[int, int]], positions: dict[tuple[str, int], int]):
        self.marks = marks
        self.positions = positions
        self.calls = 0

    def get_watermark_offsets(self, tp: Any, cached: bool = False) -> tuple[int, int]:
        assert cached, "lag must not cost a broker round trip"
        self.calls += 1
        return self.marks.get((tp.topic, tp.partition), (-1001, -1001))

    def position(self, tps: list[Any]) -> list[Any]:
        from confluent_kafka import TopicPartition

        return [
            TopicPartition(tp.topic, tp.partition, self.positions.get((tp.topic, tp.partition), -1001))
            for tp in tps
        ]


def test_lag_from_watermarks_and_durable_positions_on_a_timer() -> None:
    clock = Clock()
    lag = Lag(interval_s=5.0, clock=clock)
    consumer = WatermarkConsumer(
        {("u", 0): (0, 100), ("u", 1): (0, 50), ("u", 2): (0, 10), ("u", 3): (5, 30)}, {("u", 2): 4}
    )
    assigned = [("u", 0), ("u", 1), ("u", 2), ("u", 3), ("u", 4)]
    lag.update(consumer, assigned, {("u", 0): 60, ("u", 1): 55})
    # u1: a high watermark short of the durable position (Tansu) is no negative lag;
    # u2: not flushed yet, so from the consumer's position; u3: nor consumed, so from the low
    # watermark; u4: not fetched yet, no sample.
    assert lag.values == {("u", 0): 40, ("u", 1): 0, ("u", 2): 6, ("u", 3): 25}
    calls = consumer.calls
    clock.now += 1.0
    lag.update(consumer, assigned[:1], {("u", 0): 100})
    assert consumer.calls == calls  # not yet due
    clock.now += 5.0
    lag.update(consumer, assigned[:1], {("u", 0): 100})  # revoked partitions disappear
    assert lag.values == {("u", 0): 0}
    registry = CollectorRegistry()
    registry.register(lag)
    assert registry.get_sample_value("meter_consumer_lag_messages", {"topic": "u", "partition": "0"}) == 0


# --- readiness and the endpoint ---------------------------------------------------------------


def test_readiness_names_each_problem(tmp_path: Path) -> None:
    lake = str(tmp_path)
    assert M.readiness(assigned=2, lake=lake, waiting_s=None, max_wait_s=60) == []
    assert M.readiness(assigned=2, lake=lake, waiting_s=30.0, max_wait_s=60) == []
    assert M.readiness(assigned=0, lake=lake, waiting_s=None, max_wait_s=60) == ["no partitions assigned"]
    assert M.readiness(assigned=1, lake=lake, waiting_s=90.0, max_wait_s=60) == [
        "no durable flush for 90s while consumed data waits"
    ]
    assert M.readiness(assigned=1, lake=str(tmp_path / "missing"), waiting_s=None, max_wait_s=60) == [
        "the lake is not writable"
    ]
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind


def test_pipeline_is_not_ready_while_data_waits_past_the_flush_age(tmp_path: Path) -> None:
    import time

    from meter.pipeline import Pipeline
    from meter.stages import _Pending

    class Consumer:
        def close(self) -> None: ...

    config = Config(
        brokers="127.0.0.1:9092", topic=("usage",), lake=str(tmp_path / "lake"), ready_flush_age_s=60
    )
    p = Pipeline(config, consumer_factory=lambda _settings: Consumer())  # type: ignore[arg-type,return-value]
    try:
        p.positions[("usage", 0)] = None
        assert p.readiness() == []
        p.buffer.pending[("usage", 0)] = _Pending()
        assert p.readiness() == []  # waiting, but not for long
        p.idle_at = p.committer.last_durable = time.monotonic() - 300
        [problem] = p.readiness()
        assert problem.startswith("no durable flush for 3")
        assert not p.ready()
        p.buffer.pending.clear()  # nothing waits: an idle stream stays ready
        assert p.ready()
    finally:
        p.writer.close()


@pytest.fixture
def endpoint() -> Iterator[tuple[str, Metrics, list[Any]]]:
    m = hostile_metrics()
    answer: list[Any] = [[]]
    server = M.serve("127.0.0.1:0", lambda: answer[0], m)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", m, answer
    finally:
        server.shutdown()
        server.server_close()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_endpoint_serves_metrics_health_and_readiness(endpoint: tuple[str, Metrics, list[Any]]) -> None:
    url, m, answer = endpoint
    status, headers, body = get(url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert samples(body) == samples(m.exposition())
    status, headers, zipped = get(url + "/metrics", {"Accept-Encoding": "gzip"})
    assert headers.get("Content-Encoding") == "gzip" and gzip.decompress(zipped) == body
    assert get(url + "/healthz")[:3:2] == (200, b"ok\n")
    assert get(url + "/readyz")[:3:2] == (200, b"ready\n")
    answer[0] = ["no partitions assigned", "the lake is not writable"]
    assert get(url + "/readyz")[:3:2] == (503, b"no partitions assigned\nthe lake is not writable\n")
    answer[0] = False
    assert get(url + "/readyz")[0] == 503
    answer[0] = True
    assert get(url + "/readyz")[0] == 200
    assert get(url + "/nope")[0] == 404
