"""Team and org budgets: period-to-date spend computed exactly from the lake, a forecast,
and the Prometheus gauges the burn-rate rules of deploy/prometheus/budgets.rules.yml read.

meter meters and publishes; enforcement stays with the gateway.

Budgets live in the policy file (the one `meter.detect` reads deadlines from)::

    [[budget]]
    scope = "team"             # or "org"
    name = "acme-ml-002"       # the team or org as events name it
    period = "month"           # day, week (ISO, from Monday), month, quarter or year; UTC
    amount_usd = "30000"       # a decimal string
    alert_min_usd = "25"       # optional: the least spend in a burn window worth paging for

Spend is exact (decimal sums of ``cost_usd``, never floats) and comes from the rollups
(`meter.rollup`) for every partition whose rollup is up to date with the manifest, and
from the manifest-listed event files for the others (today's latest hour, a rollup not
yet rebuilt), so it is never staler than the lake. `spend_source="events"` reads events
only, which gives the same numbers.

Published series (labels scope, name, period; never a user):

=====================================  ==================================================
``meter_budget_usd``                   the budget of the current period
``meter_budget_spend_usd``             spend so far this period; resets only at the period
                                       start, so ``rate()`` sees the reset as a counter reset
``meter_budget_period_start_seconds``  the current period's start (Unix time)
``meter_budget_period_end_seconds``    the current period's end
``meter_budget_forecast_usd``          spend expected by the period's end (see `forecast`)
``meter_budget_alert_min_usd``         the least spend in a burn window worth paging for
=====================================  ==================================================
"""

from __future__ import annotations

import datetime as dt
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation, localcontext
from pathlib import Path
from typing import Any, Final, Literal

import duckdb

from meter.detect import PolicyError, parse_policy
from meter.lake import KIND_EVENTS, LakePath, abs_path, parse_rel_path
from meter.manifest import listed_files
from meter.metrics import DEFINITIONS
from meter.query import allowed_paths, glob_escape, lockdown_sql, sql_string
from meter.totals import EXACT

__all__ = [
    "METRICS",
    "PERIODS",
    "Budget",
    "BudgetCollector",
    "BudgetStatus",
    "SpendCache",
    "daily_spend",
    "forecast",
    "load_budgets",
    "period_bounds",
    "start_daemon_jobs",
    "status",
    "usage_sources",
]

Scope = Literal["team", "org"]
Period = Literal["day", "week", "month", "quarter", "year"]
PERIODS: Final = ("day", "week", "month", "quarter", "year")
SCOPES: Final = ("team", "org")
DEFAULT_ALERT_MIN_USD: Final = Decimal("20")
#: Days of history the forecast's weekday profile is built from.
PROFILE_DAYS: Final = 28

#: name -> help text of every series this module publishes, from their one definition.
METRICS: Final[dict[str, str]] = {d.name: d.help for d in DEFINITIONS if d.name.startswith("meter_budget_")}
_LABELS: Final = ("scope", "name", "period")


@dataclass(frozen=True)
class Budget:
    scope: Scope
    name: str
    period: Period
    amount_usd: Decimal
    alert_min_usd: Decimal = DEFAULT_ALERT_MIN_USD

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise PolicyError(f"budget {self.name!r}: scope must be one of {SCOPES}, got {self.scope!r}")
        if self.period not in PERIODS:
            raise PolicyError(f"budget {self.name!r}: period must be one of {PERIODS}, got {self.period!r}")
        if not self.name:
            raise PolicyError("budget: name must not be empty")
        if not self.amount_usd.is_finite() or self.amount_usd <= 0:
            raise PolicyError(f"budget {self.name!r}: amount_usd must be a positive decimal")
        if not self.alert_min_usd.is_finite() or self.alert_min_usd < 0:
            raise PolicyError(f"budget {self.name!r}: alert_min_usd must be a decimal >= 0")

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.scope, self.name, self.period)


def _decimal(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise PolicyError(f'{where}: expected a decimal string such as "1200.50", got {value!r}')
    try:
        return Decimal(str(value))
    except InvalidOperation:
        raise PolicyError(f"{where}: not a decimal: {value!r}") from None


def load_budgets(path: str | os.PathLike[str] | None = None, text: str | None = None) -> tuple[Budget, ...]:
    """The ``[[budget]]`` tables of a policy file; a scope, name and period appear once."""
    if text is None:
        if path is None:
            return ()
        try:
            text = Path(path).read_text("utf-8")
        except OSError as error:
            raise PolicyError(f"policy: cannot read {os.fspath(path)}: {error}") from None
    name = os.fspath(path) if path is not None else "policy"
    raw = parse_policy(text, name).get("budget", [])
    if not isinstance(raw, list):
        raise PolicyError(f"{name}: budget must be an array of tables ([[budget]])")
    budgets: dict[tuple[str, str, str], Budget] = {}
    allowed = {"scope", "name", "period", "amount_usd", "alert_min_usd"}
    for i, item in enumerate(raw, 1):
        where = f"{name}: budget #{i}"
        if (
            not isinstance(item, dict)
            or set(item) - allowed
            or not {"scope", "name", "amount_usd"} <= set(item)
        ):
            raise PolicyError(
                f"{where}: expected keys scope, name, amount_usd (required), period, alert_min_usd"
            )
        budget = Budget(
            scope=item["scope"],
            name=str(item["name"]),
            period=item.get("period", "month"),
            amount_usd=_decimal(item["amount_usd"], f"{where}.amount_usd"),
            alert_min_usd=_decimal(
                item.get("alert_min_usd", str(DEFAULT_ALERT_MIN_USD)), f"{where}.alert_min_usd"
            ),
        )
        if budget.key in budgets:
            raise PolicyError(f"{where}: {budget.scope} {budget.name!r} already has a {budget.period} budget")
        budgets[budget.key] = budget
    return tuple(budgets.values())


# --- pure: calendar periods and the forecast -------------------------------------------------


def period_bounds(period: str, at: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The UTC calendar period holding ``at``: [start, end)."""
    at = at.astimezone(dt.UTC)
    day = dt.datetime(at.year, at.month, at.day, tzinfo=dt.UTC)
    if period == "day":
        return day, day + dt.timedelta(days=1)
    if period == "week":
        start = day - dt.timedelta(days=at.weekday())
        return start, start + dt.timedelta(days=7)
    if period == "month":
        start = day.replace(day=1)
        nxt = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )
        return start, nxt
    if period == "quarter":
        start = day.replace(month=3 * ((at.month - 1) // 3) + 1, day=1)
        month = start.month + 3
        nxt = (
            start.replace(year=start.year + 1, month=month - 12) if month > 12 else start.replace(month=month)
        )
        return start, nxt
    if period == "year":
        start = day.replace(month=1, day=1)
        return start, start.replace(year=start.year + 1)
    raise ValueError(f"period must be one of {PERIODS}, got {period!r}")


def forecast(
    spent: Decimal,
    daily: Mapping[dt.date, Decimal],
    now: dt.datetime,
    start: dt.datetime,
    end: dt.datetime,
) -> Decimal:
    """Spend expected by ``end``: what is spent plus, for the rest of the period, the mean
    spend of each weekday over the last `PROFILE_DAYS` complete days before today.

    A weekday profile and not one daily rate, because weekday spend runs well above the
    weekly average: a flat rate projected from a Wednesday over a weekend overshoots, and
    a 3-day burn window fires on teams exactly on budget. History starts at the first day
    with spend (a new team is not averaged with the zeros before it); with less than a
    week of it the mean day stands in for every weekday, and with none the period's
    spend rate so far does. The rest of today counts as the unelapsed share of today's
    expected spend.
    """
    now = now.astimezone(dt.UTC)
    if now >= end:
        return spent
    today = now.date()
    history = {d: v for d, v in daily.items() if today - dt.timedelta(days=PROFILE_DAYS) <= d < today}
    if history:
        days = [min(history) + dt.timedelta(days=k) for k in range((today - min(history)).days)]
        mean = sum(history.values(), Decimal(0)) / len(days)
        by_weekday: dict[int, Decimal] = {}
        if len(days) >= 7:
            for wd in range(7):
                mine = [d for d in days if d.weekday() == wd]
                by_weekday[wd] = sum((history.get(d, Decimal(0)) for d in mine), Decimal(0)) / len(mine)
    else:
        elapsed_s = max((now - start).total_seconds(), 3600.0)
        mean = spent / Decimal(elapsed_s) * 86_400
        by_weekday = {}

    def expected(d: dt.date) -> Decimal:
        return by_weekday.get(d.weekday(), mean)

    midnight = dt.datetime(today.year, today.month, today.day, tzinfo=dt.UTC)
    left_today = Decimal(1) - Decimal((now - midnight).total_seconds()) / Decimal(86_400)
    rest = expected(today) * left_today
    d = today + dt.timedelta(days=1)
    while dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC) < end:
        rest += expected(d)
        d += dt.timedelta(days=1)
    return spent + rest


# --- I/O: exact spend from rollups and events -----------------------------------------------


def usage_sources(lake: LakePath, d0: dt.date, d1: dt.date) -> tuple[list[str], list[str]]:
    """(rollup files, event files) that together cover every listed event of dates
    [d0, d1] exactly once: a date's day rollup when its record is up to date with the
    manifest, else an hour rollup per up-to-date hour, else the hour's event files."""
    events_by_hour: dict[tuple[str, int], list[str]] = {}
    for rel in listed_files(lake, KIND_EVENTS):
        p = parse_rel_path(rel)
        if d0.isoformat() <= p.date <= d1.isoformat():
            assert p.hour is not None
            events_by_hour.setdefault((p.date, p.hour), []).append(rel)
    try:
        from meter import rollup
    except ImportError:  # pragma: no cover - the rollup module ships with meter
        return [], sorted(r for rels in events_by_hour.values() for r in rels)
    records, _ = rollup.read_records(lake)
    rollup_files: list[str] = []
    event_files: list[str] = []
    fresh_hours: dict[tuple[str, int], str] = {}
    for (date, hour), rels in events_by_hour.items():
        record = records.get((date, hour))
        if record is None:
            continue
        sources = [rollup.Source(rel, os.stat(abs_path(lake, rel)).st_size) for rel in rels]
        if record.digest == rollup.hour_digest(sources) and "hour" in record.files:
            fresh_hours[(date, hour)] = record.digest
    dates = sorted({date for date, _ in events_by_hour})
    for date in dates:
        hours = {h: fresh_hours.get((date, h)) for (dd, h) in events_by_hour if dd == date}
        day = records.get((date, None))
        if (
            day is not None
            and "day" in day.files
            and all(v is not None for v in hours.values())
            and day.digest == rollup.day_digest({h: v for h, v in hours.items() if v is not None})
        ):
            rollup_files.append(day.files["day"].path)
            continue
        for h, digest in sorted(hours.items()):
            if digest is not None:
                rollup_files.append(records[(date, h)].files["hour"].path)
            else:
                event_files.extend(sorted(events_by_hour[(date, h)]))
    return rollup_files, event_files


_DATE_IN_PATH: Final = re.compile(r"/date=(\d{4}-\d{2}-\d{2})/")

#: Per date: the files its spend was computed from, and that spend by (scope, name).
SpendCache = dict[str, tuple[tuple[str, ...], dict[tuple[str, str], Decimal]]]


def daily_spend(
    lake: LakePath,
    d0: dt.date,
    d1: dt.date,
    *,
    source: str = "auto",
    cache: SpendCache | None = None,
) -> dict[tuple[str, str, dt.date], Decimal]:
    """Exact spend per (scope, name, date) for team and org over dates [d0, d1].

    With ``cache`` (a dict kept between calls), a date whose files are the same as last time
    is not read again: file names are a function of their content (event files of their
    offsets, rollup files of their digest), so the same names are the same sums.
    """
    if source not in ("auto", "events"):
        raise ValueError(f"spend source must be auto or events, got {source!r}")
    if source == "auto":
        rollup_rels, event_rels = usage_sources(lake, d0, d1)
    else:
        rollup_rels = []
        event_rels = sorted(
            rel
            for rel in listed_files(lake, KIND_EVENTS)
            if d0.isoformat() <= parse_rel_path(rel).date <= d1.isoformat()
        )
    by_date: dict[str, list[str]] = {}
    for rel in [*rollup_rels, *event_rels]:
        m = _DATE_IN_PATH.search("/" + rel)
        if m is None:
            raise ValueError(f"no date partition in {rel!r}")
        by_date.setdefault(m.group(1), []).append(rel)
    cache = {} if cache is None else cache
    todo = {d: rels for d, rels in by_date.items() if cache.get(d, ((), {}))[0] != tuple(sorted(rels))}
    fresh = _spend_of(lake, [r for rels in todo.values() for r in rels])
    for d, rels in todo.items():
        cache[d] = (tuple(sorted(rels)), fresh.get(d, {}))
    for d in [d for d in cache if d not in by_date]:
        del cache[d]
    return {
        (scope, name, dt.date.fromisoformat(d)): cost
        for d in sorted(by_date)
        for (scope, name), cost in cache[d][1].items()
    }


def _spend_of(lake: LakePath, rels: Sequence[str]) -> dict[str, dict[tuple[str, str], Decimal]]:
    """Spend by date and (scope, name) of rollup and event files (relative paths)."""
    if not rels:
        return {}
    root = Path(os.path.abspath(lake))
    rollup_paths = [
        os.fspath(root.joinpath(*r.split("/"))) for r in rels if not r.startswith(KIND_EVENTS + "/")
    ]
    event_paths = [os.fspath(abs_path(root, r)) for r in rels if r.startswith(KIND_EVENTS + "/")]
    selects = [
        "SELECT ts, team, org, cost_usd FROM read_parquet(["
        + ", ".join(sql_string(glob_escape(p)) for p in paths)
        + "])"
        for paths in (event_paths, rollup_paths)
        if paths
    ]
    con = duckdb.connect(":memory:")
    try:
        for statement in lockdown_sql(allowed_paths([*event_paths, *rollup_paths])):
            con.execute(statement)
        rows = con.execute(
            f"""
            WITH s AS ({" UNION ALL ".join(selects)})
            SELECT 'team' AS scope, team AS name, ts::DATE AS d, sum(cost_usd) AS cost
            FROM s WHERE team IS NOT NULL AND cost_usd IS NOT NULL GROUP BY ALL
            UNION ALL
            SELECT 'org', org, ts::DATE, sum(cost_usd)
            FROM s WHERE org IS NOT NULL AND cost_usd IS NOT NULL GROUP BY ALL
            """
        ).fetchall()
    finally:
        con.close()
    out: dict[str, dict[tuple[str, str], Decimal]] = {}
    for scope, name, d, cost in rows:
        day = out.setdefault(d.isoformat(), {})
        day[(scope, name)] = EXACT.add(day.get((scope, name), Decimal(0)), Decimal(cost))
    return out


@dataclass(frozen=True)
class BudgetStatus:
    budget: Budget
    start: dt.datetime
    end: dt.datetime
    spent: Decimal
    forecast: Decimal

    @property
    def used(self) -> Decimal:
        return self.spent / self.budget.amount_usd


def status(
    lake: LakePath,
    budgets: Sequence[Budget],
    now: dt.datetime | None = None,
    *,
    source: str = "auto",
    cache: SpendCache | None = None,
) -> list[BudgetStatus]:
    """Each budget's current period, exact spend so far and forecast, from one lake read."""
    now = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    if not budgets:
        return []
    bounds = {b.key: period_bounds(b.period, now) for b in budgets}
    d0 = min([*(s.date() for s, _ in bounds.values()), now.date() - dt.timedelta(days=PROFILE_DAYS)])
    daily = daily_spend(lake, d0, now.date(), source=source, cache=cache)
    out = []
    for b in budgets:
        start, end = bounds[b.key]
        mine = {d: v for (scope, name, d), v in daily.items() if scope == b.scope and name == b.name}
        with localcontext(EXACT):  # spend of up to 38 digits: the default context rounds at 28
            spent = sum((v for d, v in mine.items() if start.date() <= d <= now.date()), Decimal(0))
        out.append(BudgetStatus(b, start, end, spent, forecast(spent, mine, now, start, end)))
    return out


# --- Prometheus ------------------------------------------------------------------------------


class BudgetCollector:
    """The budget gauges, read at scrape time from a snapshot refreshed at most every
    ``refresh_s`` seconds (one lake read per refresh, whatever the scrape rate)."""

    def __init__(
        self,
        lake: LakePath,
        budgets: Iterable[Budget],
        *,
        refresh_s: float = 30.0,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        source: str = "auto",
    ) -> None:
        self.lake = lake
        self.budgets = tuple(budgets)
        self.refresh_s = refresh_s
        self.clock = clock
        self.source = source
        self._lock = threading.Lock()
        self._snapshot: list[BudgetStatus] = []
        self._at = -float("inf")
        self._cache: SpendCache = {}

    def snapshot(self) -> list[BudgetStatus]:
        with self._lock:
            if time.monotonic() - self._at >= self.refresh_s:
                self._snapshot = status(
                    self.lake, self.budgets, self.clock(), source=self.source, cache=self._cache
                )
                self._at = time.monotonic()
            return self._snapshot

    def describe(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        for name, help_text in METRICS.items():
            yield GaugeMetricFamily(name, help_text, labels=list(_LABELS))

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        families = {
            name: GaugeMetricFamily(name, text, labels=list(_LABELS)) for name, text in METRICS.items()
        }
        for s in self.snapshot():
            labels = list(s.budget.key)
            families["meter_budget_usd"].add_metric(labels, float(s.budget.amount_usd))
            families["meter_budget_spend_usd"].add_metric(labels, float(s.spent))
            families["meter_budget_period_start_seconds"].add_metric(labels, s.start.timestamp())
            families["meter_budget_period_end_seconds"].add_metric(labels, s.end.timestamp())
            families["meter_budget_forecast_usd"].add_metric(labels, float(s.forecast))
            families["meter_budget_alert_min_usd"].add_metric(labels, float(s.budget.alert_min_usd))
        yield from families.values()


def start_daemon_jobs(
    lake: LakePath,
    policy: str | None,
    detect_daily: bool,
    registry: Any,
    stop: threading.Event,
) -> list[threading.Thread]:
    """What `meter run` adds with ``--policy`` / ``--detect-daily``: the budget gauges and
    ``meter_flagged_users`` on the daemon's registry (read at scrape time), and the daily
    detection thread. Policy errors raise here, at start."""
    from meter.detect import Config, DailyDetector, FlagsCollector, load_config

    cfg = load_config(policy) if policy else Config()
    budgets = load_budgets(policy) if policy else ()
    if budgets:
        registry.register(BudgetCollector(lake, budgets))
    registry.register(FlagsCollector(lake, cfg))
    threads: list[threading.Thread] = []
    if detect_daily:
        job = DailyDetector(lake, cfg, stop, threads=max(1, (os.cpu_count() or 2) // 2))
        job.start()
        threads.append(job)
    return threads
