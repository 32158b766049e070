"""meter.scenario: a seeded population written to a real lake, reproducible, with ground
truth; and a small run of the evaluation (the full size is benchmarks/bench_detect.py)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pytest

from meter import detect, scenario
from meter.cli import main
from meter.manifest import totals
from meter.query import query

TINY = scenario.Scenario(seed=3, honest_users=30, gamers_per_archetype=1, teams=4, days=5, deadline_day=4)


def test_the_lake_holds_what_the_truth_says_and_a_seed_reproduces_it(tmp_path: Path) -> None:
    truth = scenario.write_lake(tmp_path / "a", TINY)
    assert len(truth.users) == 30 + len(scenario.ARCHETYPES)
    assert {u.role for u in truth.users} == {"honest", *scenario.ARCHETYPES}
    assert totals(tmp_path / "a").accepted == truth.events == sum(truth.events_per_day.values())
    assert set(truth.events_per_day) <= {str(TINY.start + dt.timedelta(days=i)) for i in range(TINY.days)}
    got = query(
        tmp_path / "a", 'SELECT count(DISTINCT "user") AS users, count(*) AS n, min(ts), max(ts) FROM events'
    )
    assert got.column("n")[0].as_py() == truth.events
    assert got.column("users")[0].as_py() <= len(truth.users)
    for u in truth.users:
        assert set(u.confounders) <= set(scenario.CONFOUNDERS)
        assert u.role == "honest" or not u.confounders
    again = scenario.write_lake(tmp_path / "b", TINY)
    assert again == truth
    one = query(tmp_path / "a", "SELECT * EXCLUDE (date, hour) FROM events ORDER BY kafka_offset")
    two = query(tmp_path / "b", "SELECT * EXCLUDE (date, hour) FROM events ORDER BY kafka_offset")
    assert one.equals(two)
    assert scenario.Truth.from_json(truth.to_json()) == truth


def test_another_seed_is_another_population(tmp_path: Path) -> None:
    import dataclasses

    a = scenario.write_lake(tmp_path / "a", TINY)
    b = scenario.write_lake(tmp_path / "b", dataclasses.replace(TINY, seed=4))
    assert a.events != b.events
    assert {u.user: u.role for u in a.users} != {u.user: u.role for u in b.users}


def test_events_table_prices_hand_made_events() -> None:
    ts = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    table = scenario.events_table([{"ts": ts, "user": "u", "input_tokens": 1_000_000}])
    assert table.column("cost_usd")[0].as_py() == Decimal("3.000015")  # sonnet 4.5: 3 + 15 USD/M
    assert table.column("kafka_topic")[0].as_py() == "handmade"


@pytest.fixture(scope="module")
def small_eval(tmp_path_factory: pytest.TempPathFactory) -> tuple[scenario.Truth, list, list]:
    lake = tmp_path_factory.mktemp("eval") / "lake"
    sc = scenario.Scenario(
        seed=5, honest_users=150, gamers_per_archetype=3, teams=8, days=21, deadline_day=18
    )
    truth = scenario.write_lake(lake, sc)
    cfg = detect.load_config(text=truth.deadline_policy())
    result = detect.detect(lake, sc.start, sc.end, cfg, trend=False)
    flags = detect.counting_flags(pa.concat_tables([result.hits, result.window_hits]), cfg.min_days)
    return truth, flags, detect.rank_users(flags)


def test_small_evaluation_finds_the_planted_gamers_and_few_honest_users(small_eval: tuple) -> None:
    truth, flags, ranked = small_eval
    ev = scenario.evaluate(truth, flags, ranked, ks=(10,))
    for archetype in ("loop", "loop_nonce", "stuffer", "farm"):
        assert ev["recall"][archetype]["recall"] == 1.0, (archetype, ev["recall"][archetype])
    assert ev["recall"]["sprinter"]["recall"] >= 2 / 3
    assert ev["honest"]["all"]["share"] <= 0.02, ev["honest_flags"]
    assert ev["precision"]["p@10"]["precision"] >= 0.9
    assert set(ev["honest"]) == {"all", *scenario.CONFOUNDERS}
    assert ev["recall"]["slow_inflator"]["by"] == "trend"


def test_cli_scenario_writes_lake_truth_and_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lake = tmp_path / "lake"
    args = ["scenario", "--lake", str(lake), "--seed", "2", "--honest", "10", "--gamers", "1", "--days", "5"]
    assert main([*args, "--teams", "3"]) == 0
    out = capsys.readouterr().out
    assert "16 users" in out
    truth = scenario.Truth.from_json((lake / "_meter" / "scenario" / "truth-2.json").read_bytes())
    assert truth.scenario.days == 5
    cfg = detect.load_config(lake / "_meter" / "scenario" / "policy-2.toml")
    assert cfg.deadlines[0].date == truth.scenario.deadline
