"""meter.budget: policy budgets, calendar periods, the weekday-profile forecast, exact spend
from events and from rollups (the same to the last digit), and the Prometheus gauges."""

from __future__ import annotations

import datetime as dt
import os
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pytest
from prometheus_client import CollectorRegistry

from meter import budget
from meter.detect import PolicyError
from meter.scenario import events_table, write_events
from meter.schema import DLQ
from meter.stages import Flush, write_flush

UTC = dt.UTC
POLICY = """
[[budget]]
scope = "team"
name = "acme-ml"
amount_usd = "100"

[[budget]]
scope = "org"
name = "acme"
period = "week"
amount_usd = "250.50"
alert_min_usd = "5"
"""


def test_budgets_load_from_the_policy_file() -> None:
    team, org = budget.load_budgets(text=POLICY)
    assert team == budget.Budget("team", "acme-ml", "month", Decimal("100"))
    assert org.key == ("org", "acme", "week") and org.amount_usd == Decimal("250.50")
    assert org.alert_min_usd == Decimal("5")
    for bad in (
        '[[budget]]\nscope = "user"\nname = "x"\namount_usd = "1"\n',
        '[[budget]]\nscope = "team"\nname = "x"\namount_usd = 1.5\n',
        '[[budget]]\nscope = "team"\nname = "x"\namount_usd = "-1"\n',
        '[[budget]]\nscope = "team"\nname = "x"\namount_usd = "1"\nperiod = "fortnight"\n',
        '[[budget]]\nscope = "team"\nname = "x"\namount_usd = "1"\n[[budget]]\nscope = "team"\nname = "x"\n'
        'amount_usd = "2"\n',
        '[[budget]]\nscope = "team"\nname = "x"\n',
    ):
        with pytest.raises(PolicyError):
            budget.load_budgets(text=bad)


@pytest.mark.parametrize(
    ("period", "at", "start", "end"),
    [
        ("day", "2026-03-10T15:00", "2026-03-10", "2026-03-11"),
        ("week", "2026-03-10T15:00", "2026-03-09", "2026-03-16"),
        ("month", "2026-12-31T23:59", "2026-12-01", "2027-01-01"),
        ("quarter", "2026-11-05T00:00", "2026-10-01", "2027-01-01"),
        ("quarter", "2026-05-05T00:00", "2026-04-01", "2026-07-01"),
        ("year", "2026-05-05T00:00", "2026-01-01", "2027-01-01"),
    ],
)
def test_period_bounds_are_utc_calendar_periods(period: str, at: str, start: str, end: str) -> None:
    got = budget.period_bounds(period, dt.datetime.fromisoformat(at).replace(tzinfo=UTC))
    assert got == (
        dt.datetime.fromisoformat(start).replace(tzinfo=UTC),
        dt.datetime.fromisoformat(end).replace(tzinfo=UTC),
    )


def weekly(first: dt.date, days: int, weekday: Decimal, weekend: Decimal) -> dict[dt.date, Decimal]:
    out = {}
    for i in range(days):
        d = first + dt.timedelta(days=i)
        out[d] = weekend if d.weekday() >= 5 else weekday
    return out


def test_forecast_of_a_team_on_budget_with_a_weekly_cycle_is_the_budget() -> None:
    """1.3x the mean on weekdays, 0.25x at weekends: exactly 1,000 a day on average. A flat
    daily rate taken on a Wednesday would overshoot; the weekday profile does not."""
    history = weekly(dt.date(2026, 2, 2), 28, Decimal("1300"), Decimal("250"))
    start = dt.datetime(2026, 3, 2, tzinfo=UTC)  # a Monday; the period is 28 days
    end = start + dt.timedelta(days=28)
    now = dt.datetime(2026, 3, 5, tzinfo=UTC)  # Thursday 00:00: Mon-Wed spent
    spent = Decimal(3 * 1300)
    history.update({start.date() + dt.timedelta(days=k): Decimal("1300") for k in range(3)})
    forecast = budget.forecast(spent, history, now, start, end)
    assert forecast == Decimal("28000")
    naive = spent / 3 * 28  # the Mon-Wed rate carried over the whole period
    assert naive > Decimal("36000")


def test_forecast_of_a_runaway_and_of_a_new_team() -> None:
    start = dt.datetime(2026, 3, 1, tzinfo=UTC)
    end = dt.datetime(2026, 4, 1, tzinfo=UTC)
    now = dt.datetime(2026, 3, 10, 12, tzinfo=UTC)
    history = {dt.date(2026, 3, d): Decimal(100 * d) for d in range(1, 10)}  # rising fast
    spent = sum(history.values(), Decimal(0))
    assert budget.forecast(spent, history, now, start, end) > spent * 2
    # No history: the period's rate so far, over the rest of the period.
    first_hours = budget.forecast(Decimal("12"), {}, start + dt.timedelta(hours=12), start, end)
    assert first_hours == pytest.approx(Decimal("12") * 2 * 31, rel=Decimal("0.01"))
    assert budget.forecast(Decimal("5"), history, end, start, end) == Decimal("5")


def ada(day: int) -> Decimal:
    """ada's exact spend on a day of `lake_with_spend`: two requests."""
    return 2 * (Decimal(3 * (1_000_000 + day)) + Decimal(15)) / 10**6


def bo(day: int) -> Decimal:
    return 2 * (Decimal(3) + Decimal(15 * 100_000 * day)) / 10**6


def lake_with_spend(tmp_path: Path) -> Path:
    lake = tmp_path / "lake"
    events = []
    for day in range(1, 11):
        for hour in (9, 14):
            ts = dt.datetime(2026, 3, day, hour, tzinfo=UTC)
            events.append(
                {"ts": ts, "user": "ada", "team": "acme-ml", "org": "acme", "input_tokens": 1_000_000 + day}
            )
            events.append(
                {"ts": ts, "user": "bo", "team": "acme-web", "org": "acme", "output_tokens": 100_000 * day}
            )
    events.append(
        {"ts": dt.datetime(2026, 3, 3, tzinfo=UTC), "user": "x", "team": "acme-ml", "model": "nope"}
    )
    write_events(lake, events)
    return lake


def test_spend_is_exact_and_the_same_from_events_and_from_rollups(tmp_path: Path) -> None:
    from meter.rollup import build_rollups

    lake = lake_with_spend(tmp_path)
    d0, d1 = dt.date(2026, 3, 1), dt.date(2026, 3, 31)
    from_events = budget.daily_spend(lake, d0, d1, source="events")
    # sonnet 4.5: 3 USD per million input tokens, 15 per million output tokens (a hand-made
    # event has one of each unless told otherwise); the unpriced model adds nothing.
    assert from_events[("team", "acme-ml", dt.date(2026, 3, 3))] == ada(3)
    assert from_events[("team", "acme-web", dt.date(2026, 3, 2))] == bo(2)
    assert from_events[("org", "acme", dt.date(2026, 3, 2))] == ada(2) + bo(2)
    assert budget.usage_sources(lake, d0, d1)[0] == []  # no rollups yet: events only
    build_rollups(lake)
    rollups, events = budget.usage_sources(lake, d0, d1)
    assert rollups and not events
    assert budget.daily_spend(lake, d0, d1) == from_events
    # An event landing after the rollup: that hour is read from events until rebuilt.
    write_events(lake, [{"ts": dt.datetime(2026, 3, 4, 9, 30, tzinfo=UTC), "user": "ada", "team": "acme-ml",
                         "input_tokens": 1_000_000}], topic="late")  # fmt: skip
    rollups, events = budget.usage_sources(lake, d0, d1)
    assert events and all("date=2026-03-04/hour=09" in e for e in events)
    after = budget.daily_spend(lake, d0, d1)
    assert after[("team", "acme-ml", dt.date(2026, 3, 4))] == ada(4) + Decimal("3.000015")
    assert after == budget.daily_spend(lake, d0, d1, source="events")


def test_spend_beyond_28_digits_is_exact(tmp_path: Path) -> None:
    """Daily spend and period spend are summed past Python's default decimal context."""
    big, small = Decimal("12345678901234567.123456789012"), Decimal("0.000000000001")
    rows = [(1, big), (1, small), (2, small)]  # (day of March, cost)
    events = events_table(
        [{"ts": dt.datetime(2026, 3, d, 9, tzinfo=UTC), "user": "ada", "team": "acme-ml"} for d, _ in rows]
    )
    cost = pa.array([c for _, c in rows], events.schema.field("cost_usd").type)
    events = events.set_column(events.schema.get_field_index("cost_usd"), "cost_usd", cost)
    n = events.num_rows
    write_flush(os.fspath(tmp_path), Flush("big", 0, 0, None, n, 0, n, events, DLQ.empty_table()), "test/1")
    daily = budget.daily_spend(tmp_path, dt.date(2026, 3, 1), dt.date(2026, 3, 31), source="events")
    assert daily[("team", "acme-ml", dt.date(2026, 3, 1))] == Decimal("12345678901234567.123456789013")
    (team,) = budget.status(
        tmp_path, budget.load_budgets(text=POLICY)[:1], dt.datetime(2026, 3, 3, tzinfo=UTC)
    )
    assert team.spent == Decimal("12345678901234567.123456789014")


def test_status_and_the_prometheus_gauges(tmp_path: Path) -> None:
    lake = lake_with_spend(tmp_path)
    budgets = budget.load_budgets(text=POLICY)
    now = dt.datetime(2026, 3, 10, 18, tzinfo=UTC)
    team, org = budget.status(lake, budgets, now)
    assert team.spent == sum((ada(d) for d in range(1, 11)), Decimal(0))
    assert (team.start, team.end) == (
        dt.datetime(2026, 3, 1, tzinfo=UTC),
        dt.datetime(2026, 4, 1, tzinfo=UTC),
    )
    assert team.forecast > team.spent
    assert org.start == dt.datetime(2026, 3, 9, tzinfo=UTC)  # the ISO week of Tuesday the 10th
    registry = CollectorRegistry()
    registry.register(budget.BudgetCollector(lake, budgets, clock=lambda: now))
    labels = {"scope": "team", "name": "acme-ml", "period": "month"}
    assert registry.get_sample_value("meter_budget_usd", labels) == 100.0
    assert registry.get_sample_value("meter_budget_spend_usd", labels) == pytest.approx(float(team.spent))
    assert registry.get_sample_value("meter_budget_period_end_seconds", labels) == team.end.timestamp()
    assert registry.get_sample_value("meter_budget_forecast_usd", labels) == pytest.approx(
        float(team.forecast)
    )
    assert registry.get_sample_value("meter_budget_alert_min_usd", labels) == 20.0
    names = {m.name for m in registry.collect()}
    assert names == set(budget.METRICS)


def test_daemon_jobs_publish_budgets_and_flagged_users(tmp_path: Path) -> None:
    import threading

    lake = lake_with_spend(tmp_path)
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    registry = CollectorRegistry()
    stop = threading.Event()
    assert budget.start_daemon_jobs(lake, str(policy), False, registry, stop) == []
    names = {m.name for m in registry.collect()}
    assert names >= {*budget.METRICS, "meter_flagged_users"}
    threads = budget.start_daemon_jobs(lake, None, True, CollectorRegistry(), stop)
    assert len(threads) == 1 and threads[0].is_alive()
    stop.set()
    threads[0].join(timeout=10)
    assert not threads[0].is_alive()
    bad = tmp_path / "bad.toml"
    bad.write_text("[budgets]\n")
    with pytest.raises(PolicyError):
        budget.start_daemon_jobs(lake, str(bad), False, CollectorRegistry(), stop)


def test_spend_cache_reads_only_dates_whose_files_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lake = lake_with_spend(tmp_path)
    d0, d1 = dt.date(2026, 3, 1), dt.date(2026, 3, 31)
    read: list[list[str]] = []
    real = budget._spend_of

    def spy(lake: Path, rels: list[str]) -> dict:
        read.append(sorted(rels))
        return real(lake, rels)

    monkeypatch.setattr(budget, "_spend_of", spy)
    cache: budget.SpendCache = {}
    first = budget.daily_spend(lake, d0, d1, cache=cache)
    assert len({r.split("/")[1] for r in read[0]}) == 10  # ten dates read
    assert budget.daily_spend(lake, d0, d1, cache=cache) == first
    assert read[1] == []  # nothing changed: nothing read
    late = {"ts": dt.datetime(2026, 3, 4, 9, 30, tzinfo=UTC), "user": "ada", "team": "acme-ml", "org": "acme"}
    write_events(lake, [late], topic="late")
    after = budget.daily_spend(lake, d0, d1, cache=cache)
    assert {r.split("/")[1] for r in read[2]} == {"date=2026-03-04"}
    assert after == budget.daily_spend(lake, d0, d1, source="events")
    assert after != first
