"""Every metric meter exports, defined once (`DEFINITIONS`), and the HTTP endpoint serving
/metrics, /healthz and /readyz.

Two kinds of state:

* Pipeline health: prometheus-client objects (`Metrics`), moved by the pipeline as it runs.
  Lake counters (accepted, rejected, files, bytes) move only in `record_flush`, which the
  Committer calls once a manifest entry is durable.
* Usage (the KPI feeds) and consumer lag: read at scrape time from state kept here
  (`Usage`, `Lag`), in the manner of prometheus-client's process collector. Usage holds an
  exact running total per series (integers; cost in 10^-12 USD) and turns it into a float
  only when exposed, so sums over series equal the lake's totals to the cent and better.

Usage series are bounded: each family holds at most `budget` series; beyond it, a label
set's values turn into `__other__` one label at a time, team before org before model
(totals stay exact, and so do the breakdowns by the labels kept); label sets idle longer
than a TTL are dropped; `meter_usage_folded_total` / `meter_usage_expired_total` count
both. See docs/metrics.md.
"""

from __future__ import annotations

import gzip
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric as MetricFamily

from meter._version import __version__
from meter.config import METRIC_LABELS, METRIC_LABELS_DEFAULT
from meter.reasons import ALL_REASONS
from meter.schema import TOKEN_COLUMNS
from meter.totals import EXACT as _EXACT  # scaling 38-digit costs by 10^12 stays exact

if TYPE_CHECKING:
    from meter.config import Config
    from meter.stages import Durable

TP = tuple[str, int]
Kind = Literal["counter", "gauge", "histogram", "info"]

#: Label names a deployment may choose for the usage families (event columns).
USAGE_LABEL_CHOICES: tuple[str, ...] = (*METRIC_LABELS, "user")
DEFAULT_USAGE_LABELS: tuple[str, ...] = METRIC_LABELS_DEFAULT
DEFAULT_SERIES_BUDGET = 5000
DEFAULT_SERIES_TTL_S = 86_400.0
#: The label value of folded series, and the value of a label the event left out.
OTHER = "__other__"
ABSENT = ""
#: Token buckets as `bucket` label values, in schema order.
BUCKETS: tuple[str, ...] = tuple(c.removesuffix("_tokens") for c in TOKEN_COLUMNS)
#: How often consumer lag is read from the consumer's cached watermarks.
LAG_INTERVAL_S = 5.0
_USAGE = "{usage labels}"  # stands for the configured usage labels in DEFINITIONS


@dataclass(frozen=True)
class Definition:
    """One metric family as exposed: its name, type, help text and label names."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


DEFINITIONS: tuple[Definition, ...] = (
    # --- pipeline health ---------------------------------------------------------------
    Definition(
        "meter_build_info", "info", "meter's version and parser build", ("version", "parser", "python")
    ),
    Definition("meter_messages_consumed_total", "counter", "Kafka messages consumed (before parsing)"),
    Definition(
        "meter_messages_skipped_total",
        "counter",
        "consumed messages already in the lake, or of a partition no longer owned",
    ),
    Definition(
        "meter_messages_written_total", "counter", "Kafka messages covered by durable manifest entries"
    ),
    Definition("meter_events_accepted_total", "counter", "events written to the lake (durable)"),
    Definition(
        "meter_events_rejected_total",
        "counter",
        "events rejected, by reason: each is one dead-letter (DLQ) row in the lake (durable)",
        ("reason",),
    ),
    Definition("meter_flushes_total", "counter", "batches flushed: durable manifest entries written"),
    Definition(
        "meter_flush_duration_seconds",
        "histogram",
        "time to write one batch: Parquet files, fsyncs and the manifest entry",
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    ),
    Definition(
        "meter_flush_rows",
        "histogram",
        "batch size: rows per durable flush (accepted events plus DLQ rows)",
        buckets=(10, 100, 1_000, 5_000, 10_000, 25_000, 50_000, 100_000, 200_000, 500_000, 1_000_000),
    ),
    Definition("meter_files_written_total", "counter", "Parquet files written to the lake", ("kind",)),
    Definition("meter_lake_written_bytes_total", "counter", "Parquet bytes written to the lake", ("kind",)),
    Definition(
        "meter_manifest_writes_total",
        "counter",
        "manifest entry writes by outcome: ok, conflict (another writer owns the range), failed",
        ("outcome",),
    ),
    Definition("meter_commits_total", "counter", "Kafka offset commits by outcome: ok, failed", ("outcome",)),
    Definition(
        "meter_last_flush_timestamp_seconds", "gauge", "Unix time of the last durable flush (0: none yet)"
    ),
    Definition(
        "meter_last_commit_timestamp_seconds",
        "gauge",
        "Unix time of the last successful offset commit (0: none)",
    ),
    Definition(
        "meter_consumer_lag_messages",
        "gauge",
        "messages in the partition not yet durable in the lake: high watermark minus the manifest position",
        ("topic", "partition"),
    ),
    Definition("meter_assigned_partitions", "gauge", "Kafka partitions currently assigned"),
    Definition("meter_rebalances_total", "counter", "partition assignment changes by kind", ("kind",)),
    Definition("meter_consumer_paused", "gauge", "1 while consumption is paused for backpressure"),
    Definition(
        "meter_offset_out_of_range",
        "gauge",
        "1 when the manifest position is outside the broker's log (the broker lost data)",
        ("topic", "partition"),
    ),
    # --- usage (KPI feeds), from durable flushes only --------------------------------
    Definition("meter_usage_events_total", "counter", "events written to the lake", (_USAGE,)),
    Definition(
        "meter_usage_tokens_total", "counter", "tokens of events written to the lake", (_USAGE, "bucket")
    ),
    Definition(
        "meter_usage_cost_usd_total", "counter", "cost in USD of events written to the lake", (_USAGE,)
    ),
    Definition(
        "meter_usage_unpriced_events_total",
        "counter",
        "events written to the lake whose model the price catalog lacks",
        ("model",),
    ),
    # --- usage cardinality ---------------------------------------------------------------
    Definition("meter_usage_series", "gauge", "series a usage family exports now", ("family",)),
    Definition("meter_usage_series_budget", "gauge", "most series one usage family may export"),
    Definition(
        "meter_usage_folded_total",
        "counter",
        "label sets folded into the __other__ series because the family's budget was full",
        ("family",),
    ),
    Definition(
        "meter_usage_expired_total",
        "counter",
        "label sets dropped after going without an update for the TTL",
        ("family",),
    ),
    # --- budgets and usage-gaming flags (collected by meter.budget and meter.detect) -----
    *(
        Definition(name, "gauge", text, ("scope", "name", "period"))
        for name, text in (
            ("meter_budget_usd", "budget in USD of the current period"),
            (
                "meter_budget_spend_usd",
                "spend in USD so far in the current period (exact sum of the lake's costs; "
                "resets at the period start)",
            ),
            ("meter_budget_period_start_seconds", "Unix time the current budget period started"),
            ("meter_budget_period_end_seconds", "Unix time the current budget period ends"),
            ("meter_budget_forecast_usd", "spend in USD expected by the end of the period (weekday profile)"),
            ("meter_budget_alert_min_usd", "least spend in USD in a burn window that is worth paging for"),
        )
    ),
    Definition(
        "meter_flagged_users",
        "gauge",
        "users whose usage-gaming flag counts (fired on enough days), by detector and team; "
        "never a user label",
        ("detector", "team"),
    ),
)
BY_NAME: dict[str, Definition] = {d.name: d for d in DEFINITIONS}
USAGE_FAMILIES: tuple[str, ...] = (
    "meter_usage_events_total",
    "meter_usage_tokens_total",
    "meter_usage_cost_usd_total",
)
UNPRICED_FAMILY = "meter_usage_unpriced_events_total"


# ---------------------------------------------------------------- text exposition helpers


def escape_label_value(value: str) -> str:
    """The text format's escaping of a label value: backslash, double quote, line feed."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")
    return value


def _label_text(names: Sequence[str], values: Sequence[str]) -> str:
    return ",".join(f'{n}="{escape_label_value(v)}"' for n, v in zip(names, values, strict=True))


def _header(name: str) -> str:
    d = BY_NAME[name]
    help_text = d.help.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {help_text}\n# TYPE {name} {d.kind}\n"


# ---------------------------------------------------------------- usage series tables

_UNITS_PER_USD = 10**12


def usd_units(value: Decimal | None) -> int:
    """A cost as an exact integer count of 10^-12 USD (the lake's decimal scale)."""
    return 0 if value is None else int(value.scaleb(12, _EXACT))


class _Series:
    __slots__ = ("key", "prefixes", "seen", "values")

    def __init__(self, key: tuple[str, ...], prefixes: tuple[str, ...], seen: float):
        self.key = key
        self.prefixes = prefixes  # per value: its exposition line up to the value
        self.values = [0] * len(prefixes)
        self.seen = seen


def _prefixes(families: Sequence[tuple[str, str]], labels: str) -> tuple[str, ...]:
    """`name{labels[,extra]} ` for each (name, extra label text) of a series' values."""
    out = []
    for name, extra in families:
        inner = ",".join(t for t in (labels, extra) if t)
        out.append(f"{name}{{{inner}}} " if inner else f"{name} ")
    return tuple(out)


#: Which label values fold first when a family is full: the most numerous first.
FOLD_ORDER: tuple[str, ...] = ("user", "client", "team", "org", "provider", "model")


class SeriesTable:
    """Label sets -> exact integer totals, at most `capacity` of them.

    A label set arriving when the table is full is folded: its label values become
    `__other__` one label at a time in `FOLD_ORDER` (user, client, team, org, provider,
    model), and its values are added to the first folded set that exists or still fits; the
    set whose every label is `__other__` always fits (its slot is kept). So a flood of new
    teams folds into `{team="__other__"}` series that keep the org and model breakdown, and
    no value is ever lost, only labels. A tenth of the capacity is kept for folded sets
    (one slot, for `__other__`, with a single label).
    Sets not updated for `ttl_s` are dropped, which frees their slots.
    """

    def __init__(
        self, names: tuple[str, ...], families: Sequence[tuple[str, str]], capacity: int, ttl_s: float
    ):
        self.names = names
        self.families = tuple(families)  # per value: (metric name, extra label text)
        self.ttl_s = ttl_s
        self.series: dict[tuple[str, ...], _Series] = {}
        self.other_key = (OTHER,) * len(names)
        order = sorted(
            range(len(names)), key=lambda i: FOLD_ORDER.index(names[i]) if names[i] in FOLD_ORDER else -1
        )
        self.fold_steps = [frozenset(order[: k + 1]) for k in range(len(order))]
        self.folded = 0
        self.expired = 0
        self.last_sweep = -float("inf")
        self.resize(capacity)

    def resize(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        partial_folds = len(self.names) > 1  # with one label, folding goes straight to __other__
        self.exact_capacity = capacity - (max(1, capacity // 10) if partial_folds else 1)

    def _admit(self, key: tuple[str, ...], now: float) -> _Series:
        prefixes = _prefixes(self.families, _label_text(self.names, key))
        series = self.series[key] = _Series(key, prefixes, now)
        return series

    def get(self, key: tuple[str, ...], now: float) -> _Series:
        series = self.series.get(key)
        if series is None:
            if len(self.series) < self.exact_capacity:
                series = self._admit(key, now)
            else:
                self.folded += 1
                series = self._fold(key, now)
        series.seen = now
        return series

    def _fold(self, key: tuple[str, ...], now: float) -> _Series:
        room = len(self.series) + (0 if self.other_key in self.series else 1) < self.capacity
        for step in self.fold_steps:
            folded = tuple(OTHER if i in step else v for i, v in enumerate(key))
            series = self.series.get(folded)
            if series is not None:
                return series
            if room or folded == self.other_key:
                return self._admit(folded, now)
        return self.series.get(self.other_key) or self._admit(self.other_key, now)

    def sweep(self, now: float) -> None:
        """Drop label sets idle longer than the TTL (at most every TTL/4, and every minute)."""
        if now - self.last_sweep < min(60.0, self.ttl_s / 4):
            return
        self.last_sweep = now
        idle = [k for k, s in self.series.items() if now - s.seen > self.ttl_s]
        for key in idle:
            del self.series[key]
        self.expired += len(idle)


def _keys(table: pa.Table, names: Sequence[str]) -> list[tuple[str, ...]]:
    columns = [[ABSENT if v is None else v for v in table.column(n).to_pylist()] for n in names]
    return list(zip(*columns, strict=True)) if columns else [()] * table.num_rows


class UsageSums(NamedTuple):
    """A flush's usage summed per label set (`Usage.sums`), and its unpriced rows per model."""

    labels: tuple[str, ...]
    groups: pa.Table
    unpriced: pa.Table | None


#: Per-flush sums of the usage families: events, cost, each token bucket.
_SUMS: Final[list[tuple[Any, ...]]] = [
    ([], "count_all"),
    ("cost_usd", "sum"),
    *((c, "sum") for c in TOKEN_COLUMNS),
]
_SUMMED: Final = ("count_all", "cost_usd_sum", *(f"{c}_sum" for c in TOKEN_COLUMNS))
#: Pending flush sums are folded into the series this often, or at this many label-set rows.
_FOLD_EVERY_S: Final = 1.0
_FOLD_ROWS: Final = 200_000


class Usage:
    """The usage (KPI) families, read at scrape time.

    `add` takes the event rows of one durable flush; `collect` yields the families for a
    registry (`prometheus_client.CollectorRegistry.register`), `render` the same families as
    exposition text, built from label text escaped once per series (it is what keeps a scrape
    at full budget fast; tests hold the two equal).

    Each family holds at most `budget` series. The events and cost families have one series
    per label set and share a table (a label set is folded in both or in neither); the
    tokens family has six per label set (one per bucket), so its table holds budget // 6
    label sets and folds sooner; the unpriced family has one per model.
    """

    def __init__(
        self,
        labels: Sequence[str] = DEFAULT_USAGE_LABELS,
        budget: int = DEFAULT_SERIES_BUDGET,
        ttl_s: float = DEFAULT_SERIES_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.clock = clock
        self._lock = threading.Lock()
        self.labels: tuple[str, ...] = ()
        self.budget = budget
        self.ttl_s = ttl_s
        self._reset(tuple(labels))

    def _reset(self, labels: tuple[str, ...]) -> None:
        for name in labels:
            if name not in USAGE_LABEL_CHOICES:
                raise ValueError(f"usage label must be one of {', '.join(USAGE_LABEL_CHOICES)}, got {name!r}")
        if len(set(labels)) != len(labels):
            raise ValueError(f"usage labels repeat a name: {labels}")
        if self.budget < len(BUCKETS):
            raise ValueError(f"series budget must be at least {len(BUCKETS)}, got {self.budget}")
        self.labels = labels
        self._pending: list[tuple[pa.Table, pa.Table | None]] = []  # per flush: sums, unpriced by model
        self._pending_rows = 0
        self._pending_since = self._pending_last = 0.0
        usage = (("meter_usage_events_total", ""), ("meter_usage_cost_usd_total", ""))
        tokens = [("meter_usage_tokens_total", f'bucket="{b}"') for b in BUCKETS]
        self.table = SeriesTable(labels, usage, self.budget, self.ttl_s)
        self.tokens = SeriesTable(labels, tokens, self.budget // len(BUCKETS), self.ttl_s)
        self.unpriced = SeriesTable(("model",), ((UNPRICED_FAMILY, ""),), self.budget, self.ttl_s)

    def _tables(self) -> tuple[SeriesTable, SeriesTable, SeriesTable]:
        return self.table, self.tokens, self.unpriced

    def configure(self, labels: Sequence[str], budget: int, ttl_s: float) -> None:
        """Apply the deployment's settings. New label names start the families afresh (a
        family cannot change its label names); a new budget or TTL keeps the totals."""
        with self._lock:
            self.budget, self.ttl_s = budget, ttl_s
            if tuple(labels) != self.labels or budget < len(self.table.series):
                self._reset(tuple(labels))
                return
            for table, capacity in zip(self._tables(), (budget, budget // len(BUCKETS), budget), strict=True):
                table.resize(capacity)
                table.ttl_s = ttl_s

    def sums(self, events: pa.Table) -> UsageSums:
        """One flush's sums per label set, in Arrow; any thread (the lake writer's, so the
        consumer's thread does not group)."""
        with self._lock:
            names = self.labels
        groups = events.group_by(list(names), use_threads=False).aggregate(_SUMS)
        unpriced = None
        if events["cost_usd"].null_count:
            nulls = events.filter(pc.is_null(events["cost_usd"]))
            unpriced = nulls.group_by(["model"], use_threads=False).aggregate([([], "count_all")])
        return UsageSums(names, groups, unpriced)

    def add(self, events: pa.Table) -> None:
        """Add the accepted event rows of one durable flush (schema LAKE_EVENTS)."""
        if events.num_rows:
            self.add_sums(self.sums(events))

    def add_sums(self, sums: UsageSums) -> None:
        """Add one durable flush's `sums`. They are folded into the series at most once a
        second and before every read: a flush holds a few thousand label sets, each a
        Python step, and the daemon writes many flushes a second."""
        with self._lock:
            if self.labels != sums.labels:
                return  # `configure` started the families afresh with other labels meanwhile
            now = self.clock()
            if self._pending and (
                now - self._pending_since >= _FOLD_EVERY_S or self._pending_rows >= _FOLD_ROWS
            ):
                self._fold_pending()
            if not self._pending:
                self._pending_since = now
            self._pending.append((sums.groups, sums.unpriced))
            self._pending_rows += sums.groups.num_rows
            self._pending_last = now

    def _fold_pending(self) -> None:
        """Fold the pending sums into the series, as seen when the last of them was added
        (the TTL's clock). Called with the lock held."""
        if not self._pending:
            return
        names = list(self.labels)
        groups = pa.concat_tables([g for g, _ in self._pending])
        groups = groups.group_by(names, use_threads=False).aggregate([(c, "sum") for c in _SUMMED])
        keys = _keys(groups, names)
        counts = groups["count_all_sum"].to_pylist()
        costs = [usd_units(v) for v in groups["cost_usd_sum_sum"].to_pylist()]
        tokens = [groups[f"{c}_sum_sum"].to_pylist() for c in TOKEN_COLUMNS]
        nulls = [u for _, u in self._pending if u is not None]
        by_model = (
            pa.concat_tables(nulls).group_by(["model"], use_threads=False).aggregate([("count_all", "sum")])
            if nulls
            else None
        )
        now = self._pending_last
        self._pending.clear()
        self._pending_rows = 0
        usage, by_bucket, unpriced = self._tables()
        for i, key in enumerate(keys):
            values = usage.get(key, now).values
            values[0] += counts[i]
            values[1] += costs[i]
            values = by_bucket.get(key, now).values
            for j, column in enumerate(tokens):
                values[j] += column[i]
        if by_model is not None:
            for key, count in zip(
                _keys(by_model, ["model"]), by_model["count_all_sum"].to_pylist(), strict=True
            ):
                unpriced.get(key, now).values[0] += count
        for table in self._tables():
            table.sweep(now)

    # ------------------------------------------------------------ reading

    def _cardinality(self) -> dict[str, tuple[int, int, int]]:
        """Per family: (series, label sets folded, label sets expired)."""
        t, k, u = self._tables()
        return {
            "meter_usage_events_total": (len(t.series), t.folded, t.expired),
            "meter_usage_tokens_total": (len(k.series) * len(BUCKETS), k.folded, k.expired),
            "meter_usage_cost_usd_total": (len(t.series), t.folded, t.expired),
            UNPRICED_FAMILY: (len(u.series), u.folded, u.expired),
        }

    def _snapshot(
        self,
    ) -> tuple[list[_Series], list[_Series], list[_Series], dict[str, tuple[int, int, int]]]:
        """Copies of the series and the cardinality figures, taken under the lock."""
        with self._lock:
            self._fold_pending()
            now = self.clock()
            for table in self._tables():
                table.sweep(now)
            usage, tokens, unpriced = ([_copy(s) for s in t.series.values()] for t in self._tables())
            return usage, tokens, unpriced, self._cardinality()

    def render(self) -> str:
        """The usage families in the Prometheus text format (version 0.0.4), from each
        series' exposition prefix built once; holds the lock while it formats."""
        with self._lock:
            self._fold_pending()
            now = self.clock()
            for table in self._tables():
                table.sweep(now)
            usage, tokens, unpriced = (list(t.series.values()) for t in self._tables())
            out: list[str] = [_header("meter_usage_events_total")]
            out += [f"{s.prefixes[0]}{s.values[0]}\n" for s in usage]
            out.append(_header("meter_usage_tokens_total"))
            for s in tokens:
                out += [f"{p}{v}\n" for p, v in zip(s.prefixes, s.values, strict=True)]
            out.append(_header("meter_usage_cost_usd_total"))
            out += [f"{s.prefixes[1]}{s.values[1] / _UNITS_PER_USD!r}\n" for s in usage]
            out.append(_header(UNPRICED_FAMILY))
            out += [f"{s.prefixes[0]}{s.values[0]}\n" for s in unpriced]
            cardinality = self._cardinality()
        out.append(_header("meter_usage_series"))
        out += [f'meter_usage_series{{family="{f}"}} {c[0]}\n' for f, c in cardinality.items()]
        out.append(_header("meter_usage_series_budget"))
        out.append(f"meter_usage_series_budget {self.budget}\n")
        out.append(_header("meter_usage_folded_total"))
        out += [f'meter_usage_folded_total{{family="{f}"}} {c[1]}\n' for f, c in cardinality.items()]
        out.append(_header("meter_usage_expired_total"))
        out += [f'meter_usage_expired_total{{family="{f}"}} {c[2]}\n' for f, c in cardinality.items()]
        return "".join(out)

    def describe(self) -> Iterator[MetricFamily]:
        for name in (*USAGE_FAMILIES, UNPRICED_FAMILY, "meter_usage_series", "meter_usage_series_budget"):
            yield _family(name, self.labels)
        yield _family("meter_usage_folded_total", self.labels)
        yield _family("meter_usage_expired_total", self.labels)

    def collect(self) -> Iterator[MetricFamily]:
        usage, by_bucket, unpriced, cardinality = self._snapshot()
        events = _family("meter_usage_events_total", self.labels)
        tokens = _family("meter_usage_tokens_total", self.labels)
        cost = _family("meter_usage_cost_usd_total", self.labels)
        for s in usage:
            events.add_metric(list(s.key), s.values[0])
            cost.add_metric(list(s.key), s.values[1] / _UNITS_PER_USD)
        for s in by_bucket:
            for j, bucket in enumerate(BUCKETS):
                tokens.add_metric([*s.key, bucket], s.values[j])
        yield from (events, tokens, cost)
        priceless = _family(UNPRICED_FAMILY, self.labels)
        for s in unpriced:
            priceless.add_metric(list(s.key), s.values[0])
        yield priceless
        series = _family("meter_usage_series", self.labels)
        budget = _family("meter_usage_series_budget", self.labels)
        folded = _family("meter_usage_folded_total", self.labels)
        expired = _family("meter_usage_expired_total", self.labels)
        budget.add_metric([], self.budget)
        for family, (n, n_folded, n_expired) in cardinality.items():
            series.add_metric([family], n)
            folded.add_metric([family], n_folded)
            expired.add_metric([family], n_expired)
        yield from (series, budget, folded, expired)

    def totals(self) -> dict[str, Any]:
        """Sums over every usage series: events, tokens per bucket column, exact cost, unpriced."""
        usage, tokens, unpriced, _ = self._snapshot()
        return {
            "events": sum(s.values[0] for s in usage),
            "cost_usd": Decimal(sum(s.values[1] for s in usage)).scaleb(-12, _EXACT),
            "tokens": {c: sum(s.values[j] for s in tokens) for j, c in enumerate(TOKEN_COLUMNS)},
            "unpriced": sum(s.values[0] for s in unpriced),
        }


def _copy(series: _Series) -> _Series:
    out = _Series(series.key, series.prefixes, series.seen)
    out.values = list(series.values)
    return out


def _family(name: str, usage_labels: Sequence[str]) -> CounterMetricFamily | GaugeMetricFamily:
    d = BY_NAME[name]
    labels = [n for label in d.labels for n in (usage_labels if label == _USAGE else (label,))]
    if d.kind == "counter":
        return CounterMetricFamily(name, d.help, labels=labels)
    return GaugeMetricFamily(name, d.help, labels=labels)


# ---------------------------------------------------------------- consumer lag


class Lag:
    """Consumer lag per assigned partition, refreshed every `interval_s` from the consumer's
    cached high watermarks (no broker round trip) and read at scrape time.

    Lag is measured from the manifest position (what is durable), or from the consumer's
    position before the partition's first flush. A partition not fetched yet has no sample.
    """

    def __init__(self, interval_s: float = LAG_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self.clock = clock
        self.values: dict[TP, int] = {}
        self.next_update = -float("inf")

    def update(
        self, consumer: Any, assigned: Iterable[TP], durable: Mapping[TP, int], force: bool = False
    ) -> None:
        now = self.clock()
        if now < self.next_update and not force:
            return
        self.next_update = now + self.interval_s
        from confluent_kafka import KafkaException, TopicPartition

        values: dict[TP, int] = {}
        unflushed: list[tuple[TP, int, int]] = []
        for tp in list(assigned):
            try:
                low, high = consumer.get_watermark_offsets(TopicPartition(*tp), cached=True)
            except KafkaException:
                continue
            if high < 0:
                continue
            base = durable.get(tp)
            if base is None:
                unflushed.append((tp, low, high))
            else:
                values[tp] = max(high - base, 0)
        if unflushed:
            try:
                positions = consumer.position([TopicPartition(*tp) for tp, _, _ in unflushed])
            except KafkaException:
                positions = []
            offsets = {(p.topic, p.partition): p.offset for p in positions}
            for tp, low, high in unflushed:
                base = max(offsets.get(tp, -1), low)
                if base >= 0:
                    values[tp] = max(high - base, 0)
        self.values = values

    def describe(self) -> Iterator[MetricFamily]:
        yield _family("meter_consumer_lag_messages", ())

    def collect(self) -> Iterator[MetricFamily]:
        family = _family("meter_consumer_lag_messages", ())
        for (topic, partition), lag in sorted(self.values.items()):
            family.add_metric([topic, str(partition)], lag)
        yield family


# ---------------------------------------------------------------- the pipeline's metrics


def _parser_kind() -> str:
    from meter.parser import COMPILED

    return "compiled" if COMPILED else "pure-python"


class Metrics:
    """All of meter's metrics, on one registry (a private one in tests).

    `exposition()` is what /metrics serves: the registry's families (health, lag, and the
    process collectors of the default registry) followed by `Usage.render()`.
    """

    def __init__(
        self,
        registry: CollectorRegistry = REGISTRY,
        usage: Usage | None = None,
        lag: Lag | None = None,
        wall: Callable[[], float] = time.time,
    ):
        self.registry = registry
        self.wall = wall
        self.usage = usage or Usage()
        self.lag = lag or Lag()
        build = self._make("meter_build_info")
        build.info({"version": __version__, "parser": _parser_kind(), "python": platform.python_version()})
        self.build: Info = build
        self.consumed: Counter = self._make("meter_messages_consumed_total")
        self.skipped: Counter = self._make("meter_messages_skipped_total")
        self.written: Counter = self._make("meter_messages_written_total")
        self.accepted: Counter = self._make("meter_events_accepted_total")
        self.rejected: Counter = self._make("meter_events_rejected_total", ALL_REASONS)
        self.flushes: Counter = self._make("meter_flushes_total")
        self.flush_seconds: Histogram = self._make("meter_flush_duration_seconds")
        self.flush_rows: Histogram = self._make("meter_flush_rows")
        self.files: Counter = self._make("meter_files_written_total", ("events", "dlq"))
        self.lake_bytes: Counter = self._make("meter_lake_written_bytes_total", ("events", "dlq"))
        self.manifest_writes: Counter = self._make(
            "meter_manifest_writes_total", ("ok", "conflict", "failed")
        )
        self.commits: Counter = self._make("meter_commits_total", ("ok", "failed"))
        self.last_flush: Gauge = self._make("meter_last_flush_timestamp_seconds")
        self.last_commit: Gauge = self._make("meter_last_commit_timestamp_seconds")
        self.assigned: Gauge = self._make("meter_assigned_partitions")
        self.rebalances: Counter = self._make("meter_rebalances_total", ("assign", "revoke", "lost"))
        self.paused: Gauge = self._make("meter_consumer_paused")
        self.offset_alarm: Gauge = self._make("meter_offset_out_of_range")
        registry.register(self.lag)

    def _make(self, name: str, initial: Sequence[str] = ()) -> Any:
        """The prometheus-client object of a definition, its known label values set to 0."""
        d = BY_NAME[name]
        labels = list(d.labels)
        registry = self.registry
        metric: Any
        if d.kind == "counter":
            metric = Counter(name, d.help, labels, registry=registry)
        elif d.kind == "gauge":
            metric = Gauge(name, d.help, labels, registry=registry)
        elif d.kind == "histogram":
            metric = Histogram(name, d.help, labels, registry=registry, buckets=d.buckets)
        else:
            metric = Info(name.removesuffix("_info"), d.help, labels[:0], registry=registry)
        for value in initial:
            metric.labels(value)
        return metric

    def configure(self, config: Config) -> None:
        labels = (*config.metrics_labels, *(("user",) if config.metrics_user_label else ()))
        self.usage.configure(labels, config.metrics_series_budget, config.metrics_series_ttl_s)

    def record_flush(self, durable: Durable) -> None:
        """A manifest entry is durable: move every lake counter and the usage families."""
        entry = durable.entry
        self.flushes.inc()
        self.manifest_writes.labels("ok").inc()
        self.written.inc(entry.messages)
        self.accepted.inc(entry.accepted)
        for reason, count in entry.rejects_by_reason.items():
            self.rejected.labels(reason).inc(count)
        for record in entry.files:
            self.files.labels(record.kind).inc()
            self.lake_bytes.labels(record.kind).inc(record.bytes)
        self.flush_rows.observe(entry.accepted + entry.rejected)
        if entry.accepted:
            self.usage.add_sums(durable.usage or self.usage.sums(durable.events))
        self.last_flush.set(self.wall())

    def exposition(self) -> bytes:
        return generate_latest(self.registry) + self.usage.render().encode("utf-8")


DEFAULT = Metrics()
#: The default instance's objects, for the pipeline's call sites.
CONSUMED = DEFAULT.consumed
SKIPPED = DEFAULT.skipped
ACCEPTED = DEFAULT.accepted
REJECTED = DEFAULT.rejected
FLUSH_SECONDS = DEFAULT.flush_seconds
MANIFEST_WRITES = DEFAULT.manifest_writes
COMMITS = DEFAULT.commits
LAST_COMMIT = DEFAULT.last_commit
ASSIGNED = DEFAULT.assigned
REBALANCES = DEFAULT.rebalances
PAUSED = DEFAULT.paused
OFFSET_ALARM = DEFAULT.offset_alarm


def configure(config: Config) -> None:
    DEFAULT.configure(config)


def record_flush(durable: Durable) -> None:
    DEFAULT.record_flush(durable)


def update_lag(consumer: Any, assigned: Iterable[TP], durable: Mapping[TP, int]) -> None:
    DEFAULT.lag.update(consumer, assigned, durable)


# ---------------------------------------------------------------- readiness and the endpoint


def lake_writable(lake: str) -> bool:
    """Whether a file can be created in the lake: an unnamed temporary file (O_TMPFILE
    where the kernel has it), so readers never see it."""
    try:
        with tempfile.TemporaryFile(dir=lake):
            return True
    except OSError:
        return False


def readiness(*, assigned: int, lake: str, waiting_s: float | None, max_wait_s: float) -> list[str]:
    """Why the daemon is not ready (empty: ready). `waiting_s` is how long consumed data has
    waited without a durable flush (None: nothing waits)."""
    problems = []
    if assigned == 0:
        problems.append("no partitions assigned")
    if waiting_s is not None and waiting_s > max_wait_s:
        problems.append(f"no durable flush for {waiting_s:.0f}s while consumed data waits")
    if not lake_writable(lake):
        problems.append("the lake is not writable")
    return problems


def serve(
    addr: str,
    ready: Callable[[], bool | Sequence[str]],
    metrics: Metrics | None = None,
) -> ThreadingHTTPServer:
    """Start the endpoint on a daemon thread. `ready` answers /readyz: True or an empty
    list is ready; False or a list of problems is not (the problems are the body)."""
    source = metrics or DEFAULT
    disable_created_metrics()  # the text format's `_created` series would only double the counters
    host, _, port = addr.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.partition("?")[0]
            if path == "/metrics":
                body = source.exposition()
                gzipped = "gzip" in self.headers.get("Accept-Encoding", "")
                if gzipped:
                    body = gzip.compress(body, compresslevel=1)
                self._send(200, body, CONTENT_TYPE_PLAIN_0_0_4, gzipped)
            elif path == "/healthz":
                self._send(200, b"ok\n")
            elif path == "/readyz":
                result = ready()
                problems = (["not ready"] if not result else []) if isinstance(result, bool) else list(result)
                text = "".join(f"{p}\n" for p in problems) if problems else "ready\n"
                self._send(503 if problems else 200, text.encode())
            else:
                self._send(404, b"not found\n")

        def _send(
            self, code: int, body: bytes, kind: str = "text/plain; charset=utf-8", gzipped: bool = False
        ) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            if gzipped:
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer((host.strip("[]") or "127.0.0.1", int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="meter-metrics", daemon=True).start()
    return server
