"""deploy/prometheus/budgets.rules.yml under `promtool test rules`: a runaway team pages, a
team exactly on budget with a weekly and daily cycle stays quiet for two weeks, a tiny
budget never pages, and the slow-burn, forecast and 80%/100% alerts fire on their cases.

The test file deploy/prometheus/tests/budgets.test.yml is generated here (its series are
long), and held equal to the generator; regenerate with::

    .venv/bin/python tests/test_budget_rules.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "budgets.rules.yml"
TEST_FILE = PROMETHEUS / "tests" / "budgets.test.yml"
ALERTS = (
    "MeterBudgetFastBurn",
    "MeterBudgetSlowBurn",
    "MeterBudgetForecastOverrun",
    "MeterBudget80Percent",
    "MeterBudgetExhausted",
)
PERIOD_S = 28 * 86_400  # the tests' budget period: 28 days from promtool's time 0
SAMPLES_PER_HOUR = 12  # one sample every 5 samples, as a 5m scrape would give; evaluated as often
SAMPLES_PER_DAY = 24 * SAMPLES_PER_HOUR


# --- pure: series ------------------------------------------------------------------------------


def weekly_cycle_hourly(daily_mean: float) -> list[float]:
    """USD spent in each hour of a week (Monday first) by a team exactly on budget.

    Weekdays spend 1.3x the daily mean and weekends 0.25x ((5 * 1.3 + 2 * 0.25) / 7 = 1);
    a weekday spends little at night and most in working hours, with a morning peak and a
    lunch dip: the busiest hour runs at 3.84x the budget's average rate.
    """
    hour = daily_mean / 24
    night = 0.1 * hour
    weekday = 1.3 * daily_mean
    peak, lunch = 160 / 1000 * daily_mean, 80 / 1000 * daily_mean
    rest = (weekday - 15 * night - 3 * peak - lunch) / 5
    day = [night] * 9 + [peak] * 3 + [lunch] + [rest] * 5 + [night] * 6
    weekend = [0.25 * daily_mean / 24] * 24
    return day * 5 + weekend * 2


def cumulative(hourly: Sequence[float], start: float = 0.0) -> tuple[str, float]:
    """promtool's expanding notation for a counter sampled every 5 samples that grows by
    ``hourly[i]`` in hour i: one ``a+bx11`` segment per hour. Returns it and the end value."""
    parts = []
    value = start
    for spend in hourly:
        step = spend / SAMPLES_PER_HOUR
        parts.append(f"{value:.6f}+{step:.6f}x{SAMPLES_PER_HOUR - 1}")
        value += SAMPLES_PER_HOUR * step
    return " ".join(parts), value


def constant(value: float, samples: int) -> str:
    return f"{value:g}x{samples}"


def _labels(name: str) -> str:
    return f'scope="team",name="{name}",period="month"'


def budget_series(name: str, amount: float, samples: int, alert_min: float = 20.0) -> list[tuple[str, str]]:
    return [
        (f'meter_budget_usd{{{_labels(name)},instance="d1"}}', constant(amount, samples)),
        (f'meter_budget_period_start_seconds{{{_labels(name)},instance="d1"}}', constant(0, samples)),
        (f'meter_budget_period_end_seconds{{{_labels(name)},instance="d1"}}', constant(PERIOD_S, samples)),
        (f'meter_budget_alert_min_usd{{{_labels(name)},instance="d1"}}', constant(alert_min, samples)),
    ]


def _exp(name: str, severity: str, summary: str, description: str, runbook: str) -> list[str]:
    return [
        "          - exp_labels:",
        "              scope: team",
        f"              name: {name}",
        "              period: month",
        f"              severity: {severity}",
        "            exp_annotations:",
        f"              summary: {_quote(summary)}",
        f"              description: {_quote(description)}",
        f"              runbook: {_quote(runbook)}",
    ]


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _annotation(alert: str, key: str) -> str:
    """An annotation of ``alert`` in budgets.rules.yml, as written (templates unrendered)."""
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with meter's ops extra")
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                return str(rule["annotations"][key]).strip()
    raise KeyError(alert)


def _render(text: str, **values: str) -> str:
    for key, value in values.items():
        text = text.replace("{{ " + key + " }}", value)
    return text


def _expected(alert: str, name: str, severity: str, value: str) -> list[str]:
    labels = {"$labels.scope": "team", "$labels.name": name, "$labels.period": "month"}
    rendered = {}
    for key in ("summary", "description", "runbook"):
        text = _annotation(alert, key)
        for template, v in labels.items():
            text = text.replace("{{ " + template + " }}", v)
        for fn in ("humanize", "humanizePercentage", "humanizeDuration"):
            text = text.replace("{{ $value | " + fn + " }}", value)
        rendered[key] = " ".join(text.split()) if key == "description" else text
    return _exp(name, severity, rendered["summary"], rendered["description"], rendered["runbook"])


def promtool_test_yaml() -> str:
    """The promtool test file (a function so the generator and the check share it)."""
    lines = [
        "# Generated by tests/test_budget_rules.py; do not edit (run it to regenerate).",
        "# `promtool test rules deploy/prometheus/tests/budgets.test.yml`. promtool's clock starts",
        "# at Unix time 0; the budget period runs 28 days from there; one sample every 5 samples.",
        "rule_files:",
        "  - ../budgets.rules.yml",
        "",
        "evaluation_interval: 5m",
        "",
        "tests:",
    ]

    def series_block(series: Sequence[tuple[str, str]]) -> list[str]:
        out = ["    input_series:"]
        for selector, values in series:
            out += [f"      - series: '{selector}'", f"        values: '{values}'"]
        return out

    # 1. A runaway team pages; a tiny budget at the same burn never does.
    samples = 4 * SAMPLES_PER_HOUR
    hourly = 3000 / PERIOD_S * 3600
    runaway, _ = cumulative([hourly] * 1 + [20 * hourly] * 3)
    tiny_hourly = 10 / PERIOD_S * 3600
    tiny, _ = cumulative([tiny_hourly] * 1 + [20 * tiny_hourly] * 3)
    series = [
        *budget_series("runaway", 3000, samples),
        (f'meter_budget_spend_usd{{{_labels("runaway")},instance="d1"}}', runaway),
        (f'meter_budget_forecast_usd{{{_labels("runaway")},instance="d1"}}', constant(3000, samples)),
        *budget_series("tiny", 10, samples),
        (f'meter_budget_spend_usd{{{_labels("tiny")},instance="d1"}}', tiny),
        (f'meter_budget_forecast_usd{{{_labels("tiny")},instance="d1"}}', constant(10, samples)),
    ]
    lines += [
        "  # A team spending at 20x its budget's rate from the first hour on pages once the 1h",
        "  # window is above 14.4x (and the 5m one still is); a 10 USD budget burning at the same",
        "  # 20x spends well under its 20 USD alert minimum in an hour and never pages.",
        "  - name: a runaway team pages, a tiny budget at the same burn does not",
        "    interval: 5m",
        *series_block(series),
        "    alert_rule_test:",
        "      - eval_time: 80m",
        "        alertname: MeterBudgetFastBurn",
        "        exp_alerts: []",
        "      - eval_time: 150m",
        "        alertname: MeterBudgetFastBurn",
        "        exp_alerts:",
        *_expected("MeterBudgetFastBurn", "runaway", "page", "20"),
        "      - eval_time: 150m",
        "        alertname: MeterBudgetSlowBurn",
        "        exp_alerts: []",
    ]

    # 2. On budget with a weekly and a daily cycle: two weeks, nothing fires.
    daily_mean = 28_000 / 28
    week = weekly_cycle_hourly(daily_mean)
    spend, _ = cumulative(week * 2)
    samples = 14 * SAMPLES_PER_DAY
    series = [
        *budget_series("steady", 28_000, samples),
        (f'meter_budget_spend_usd{{{_labels("steady")},instance="d1"}}', spend),
        (f'meter_budget_forecast_usd{{{_labels("steady")},instance="d1"}}', constant(28_000, samples)),
    ]
    lines += [
        "  # 28,000 USD over 28 days: 1.3x the daily mean on weekdays, 0.25x at weekends, most of a",
        "  # weekday's spend in working hours (the busiest hour at 3.84x the budget's rate, a 6h",
        "  # window at most 3.3x, a day at most 1.3x). A 3-day burn alert at 1x would fire every",
        "  # Wednesday; none of these does, on any day of two weeks.",
        "  - name: a team exactly on budget with a weekly cycle stays quiet for two weeks",
        "    interval: 5m",
        *series_block(series),
        "    alert_rule_test:",
    ]
    for hour in range(30, 14 * 24, 6):
        for alert in ALERTS:
            lines += [f"      - eval_time: {hour}h", f"        alertname: {alert}", "        exp_alerts: []"]

    # 3. Slow burn, forecast, 80% and 100%.
    samples = 30 * SAMPLES_PER_HOUR
    allowed_per_hour = 1000 / PERIOD_S * 3600
    slow, _ = cumulative([4 * allowed_per_hour] * 30)
    series = [
        *budget_series("slow", 1000, samples, alert_min=1),
        (f'meter_budget_spend_usd{{{_labels("slow")},instance="d1"}}', slow),
        (f'meter_budget_forecast_usd{{{_labels("slow")},instance="d1"}}', constant(1000, samples)),
        *budget_series("ahead", 1000, samples),
        (f'meter_budget_spend_usd{{{_labels("ahead")},instance="d1"}}', constant(300, samples)),
        (f'meter_budget_forecast_usd{{{_labels("ahead")},instance="d1"}}', constant(1300, samples)),
        *budget_series("most", 1000, samples),
        (f'meter_budget_spend_usd{{{_labels("most")},instance="d1"}}', constant(850, samples)),
        (f'meter_budget_forecast_usd{{{_labels("most")},instance="d1"}}', constant(990, samples)),
        *budget_series("over", 1000, samples),
        (f'meter_budget_spend_usd{{{_labels("over")},instance="d1"}}', constant(1200, samples)),
        (f'meter_budget_forecast_usd{{{_labels("over")},instance="d1"}}', constant(1200, samples)),
    ]
    lines += [
        "  # slow: 4x its rate for 30 hours (a ticket once the day window holds more than 3x, never",
        "  # a page); ahead: 300 spent so far, forecast at 1,300 of 1,000; most: 85% spent; over:",
        "  # 120% spent (and forecast so).",
        "  - name: slow burn, forecast overrun and the 80% and 100% notices fire on their cases",
        "    interval: 5m",
        *series_block(series),
        "    alert_rule_test:",
        "      - eval_time: 12h",
        "        alertname: MeterBudgetSlowBurn",
        "        exp_alerts: []",
        "      - eval_time: 26h",
        "        alertname: MeterBudgetSlowBurn",
        "        exp_alerts:",
        *_expected("MeterBudgetSlowBurn", "slow", "ticket", "4"),
        "      - eval_time: 26h",
        "        alertname: MeterBudgetFastBurn",
        "        exp_alerts: []",
        "      - eval_time: 2h",
        "        alertname: MeterBudgetForecastOverrun",
        "        exp_alerts: []",
        "      - eval_time: 4h",
        "        alertname: MeterBudgetForecastOverrun",
        "        exp_alerts:",
        *_expected("MeterBudgetForecastOverrun", "ahead", "ticket", "1.3k"),
        *_expected("MeterBudgetForecastOverrun", "over", "ticket", "1.2k"),
        "      - eval_time: 4h",
        "        alertname: MeterBudget80Percent",
        "        exp_alerts:",
        *_expected("MeterBudget80Percent", "most", "info", "85%"),
        "      - eval_time: 4h",
        "        alertname: MeterBudgetExhausted",
        "        exp_alerts:",
        *_expected("MeterBudgetExhausted", "over", "warning", "120%"),
    ]
    return "\n".join(lines) + "\n"


# --- tests ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool missing: install Debian's prometheus package (make system-deps)")
    return path


def test_weekly_cycle_is_exactly_on_budget_and_a_3_day_window_would_fire() -> None:
    week = weekly_cycle_hourly(1000.0)
    assert sum(week) == pytest.approx(7000.0)
    hourly_allowed = 1000.0 / 24
    assert max(week) / hourly_allowed < 6  # no hour, hence no 1h or 6h window, near the page
    days = [sum(week[d * 24 : (d + 1) * 24]) for d in range(7)]
    assert max(days) / 1000 < 3  # no day reaches the slow-burn ticket
    assert sum(days[:3]) / 3000 > 1  # Monday to Wednesday: a naive 3-day window at 1x fires


def test_committed_promtool_test_file_is_generated() -> None:
    assert TEST_FILE.read_text() == promtool_test_yaml(), "run: .venv/bin/python tests/test_budget_rules.py"


def test_promtool_check_rules(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_budget_alerts_pass(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "test", "rules", str(TEST_FILE)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_budget_alert_fires_somewhere_and_stays_quiet_somewhere() -> None:
    text = TEST_FILE.read_text()
    for alert in ALERTS:
        assert f"alertname: {alert}\n        exp_alerts:\n" in text, f"{alert} never fires"
        assert f"alertname: {alert}\n        exp_alerts: []" in text, f"{alert} never stays quiet"


if __name__ == "__main__":
    TEST_FILE.write_text(promtool_test_yaml())
    sys.exit(0)
