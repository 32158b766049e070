"""meter.detect on small hand-made lakes: each detector fires on its pattern and on nothing
else, volume alone never flags, a flag counts from min_days days, flags are written and
read under the manifest discipline, the Prometheus gauge has no user label, and the CLI."""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from meter import detect
from meter.cli import main
from meter.scenario import write_events

DAY = dt.date(2026, 3, 10)  # a Tuesday
TEAM = "acme-ml-001"
HONEST = [f"h{i}" for i in range(8)]


def ms(day: dt.date, hours: float) -> int:
    return int(dt.datetime.combine(day, dt.time(), dt.UTC).timestamp() * 1000 + hours * 3_600_000)


def human(
    rng: random.Random, user: str, day: dt.date, n: int = 60, start_h: float = 9.0, gap_s: float = 240.0
) -> list[dict[str, Any]]:
    """A person's day: conversations in working hours whose cached context grows each turn,
    prompts of every size, a retry now and then."""
    out: list[dict[str, Any]] = []
    t = ms(day, start_h + rng.uniform(0, 0.5))
    ctx = 9_500
    last: dict[str, Any] | None = None
    tool = rng.choice(("ide", "ide", "web", "cli"))  # a person mostly sticks to one tool
    for i in range(n):
        t += int(rng.expovariate(1 / (gap_s * 1000)) + 2_000)
        if i % 6 == 0:
            ctx = 9_500
        if last is not None and rng.random() < 0.05:
            e = dict(last, ts=t)
        else:
            e = {
                "ts": t,
                "user": user,
                "team": TEAM,
                "org": "acme",
                "client": tool if rng.random() < 0.9 else "web",
                "prompt_hash": f"p{rng.getrandbits(60):x}",
                "input_tokens": int(rng.lognormvariate(math.log(400), 1.0)) + 5,
                "output_tokens": int(rng.lognormvariate(math.log(300), 0.8)) + 5,
                "cache_read_tokens": ctx,
            }
        ctx += e["input_tokens"] + e["output_tokens"]
        out.append(e)
        last = e
    return out


def team_day(day: dt.date, seed: int = 1, n: int = 60) -> list[dict[str, Any]]:
    rng = random.Random(f"{seed}-{day}")
    return [e for user in HONEST for e in human(rng, user, day, n)]


def run(
    tmp_path: Path, events: list[dict[str, Any]], days: list[dt.date], **cfg: Any
) -> list[dict[str, Any]]:
    """Write the events, detect on ``days``, return the counting flags."""
    lake = tmp_path / "lake"
    write_events(lake, events)
    result = detect.detect(lake, min(days), max(days), detect.Config(**cfg), trend=False)
    return detect.counting_flags(result.hits, detect.Config(**cfg).min_days)


def pairs(flags: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(f["user"], f["detector"]) for f in flags}


TWO_DAYS = [DAY, DAY + dt.timedelta(days=1)]


def loop(user: str, day: dt.date, *, same_hash: bool, size_jitter: int, regular: bool, seed: int = 7) -> list:
    rng = random.Random(seed)
    t = ms(day, 10)
    out = []
    for i in range(300):
        t += int(30_000 * (1 + rng.uniform(-0.1, 0.1))) if regular else int(rng.expovariate(1 / 30_000)) + 1
        size = (
            1500 + rng.randrange(0, size_jitter + 1) if size_jitter >= 0 else int(rng.lognormvariate(6, 1.0))
        )
        out.append(
            {
                "ts": t,
                "user": user,
                "team": TEAM,
                "org": "acme",
                "client": "cli",
                "prompt_hash": "fixed" if same_hash else f"n{i}-{rng.getrandbits(40):x}",
                "input_tokens": size,
                "output_tokens": int(rng.lognormvariate(math.log(250), 0.6)) + 5,
            }
        )
    return out


# --- each detector on its own pattern ---------------------------------------------------------


def test_honest_team_alone_has_no_flags(tmp_path: Path) -> None:
    events = [e for d in TWO_DAYS for e in team_day(d)]
    assert run(tmp_path, events, TWO_DAYS) == []


def test_volume_alone_never_flags(tmp_path: Path) -> None:
    """A user doing 20x the team's work in the same shape is context, not a flag."""
    rng = random.Random(3)
    events = [e for d in TWO_DAYS for e in team_day(d) + human(rng, "busy", d, n=1200, start_h=8, gap_s=25)]
    assert run(tmp_path, events, TWO_DAYS) == []


def test_loop_resending_one_prompt_is_flagged(tmp_path: Path) -> None:
    events = [
        e
        for d in TWO_DAYS
        for e in team_day(d) + loop("looper", d, same_hash=True, size_jitter=0, regular=True)
    ]
    found = pairs(run(tmp_path, events, TWO_DAYS))
    assert {("looper", "repeat_prompt"), ("looper", "template"), ("looper", "cadence")} <= found
    assert {u for u, _ in found} == {"looper"}


def test_loop_with_a_nonce_and_random_gaps_is_flagged_by_template(tmp_path: Path) -> None:
    events = [
        e
        for d in TWO_DAYS
        for e in team_day(d) + loop("nonce", d, same_hash=False, size_jitter=4, regular=False)
    ]
    assert pairs(run(tmp_path, events, TWO_DAYS)) == {("nonce", "template")}


def test_machine_regular_cadence_is_flagged(tmp_path: Path) -> None:
    events = [
        e
        for d in TWO_DAYS
        for e in team_day(d) + loop("timer", d, same_hash=False, size_jitter=-1, regular=True)
    ]
    assert pairs(run(tmp_path, events, TWO_DAYS)) == {("timer", "cadence")}


def test_declared_automation_is_not_a_cadence_or_repeat_flag(tmp_path: Path) -> None:
    def as_batch(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [dict(e, client="batch-job") for e in events]

    events = [
        e
        for d in TWO_DAYS
        for e in team_day(d) + as_batch(loop("nightly", d, same_hash=True, size_jitter=0, regular=True))
    ]
    assert run(tmp_path, events, TWO_DAYS) == []


def stuffer(day: dt.date, seed: int = 5) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    t = ms(day, 9)
    out = []
    for _ in range(150):
        t += int(rng.expovariate(1 / 120_000)) + 2_000
        out.append(
            {
                "ts": t,
                "user": "stuffer",
                "team": TEAM,
                "org": "acme",
                "client": "ide",
                "prompt_hash": f"q{rng.getrandbits(40):x}",
                "input_tokens": rng.randrange(20, 120),
                "output_tokens": rng.randrange(3, 20),
                "cache_read_tokens": 150_000,
            }
        )
    return out


def test_stuffer_is_flagged_by_context_ratio_and_fixed_cache(tmp_path: Path) -> None:
    events = [e for d in TWO_DAYS for e in team_day(d) + stuffer(d)]
    flags = run(tmp_path, events, TWO_DAYS)
    assert pairs(flags) == {("stuffer", "context_ratio"), ("stuffer", "fixed_cache")}
    by = {f["detector"]: f for f in flags}
    assert by["fixed_cache"]["evidence"]["cache_read_tokens"] == 150_000
    assert by["fixed_cache"]["evidence"]["compared_with"] == "team"
    assert by["context_ratio"]["evidence"]["median_ratio"] > 1500
    assert by["context_ratio"]["days"] == 2


def test_a_team_that_shares_a_document_is_its_own_baseline(tmp_path: Path) -> None:
    """Everyone re-reading one 48k corpus is the team's habit, not a flag."""
    rng = random.Random(11)
    events = []
    for d in TWO_DAYS:
        for e in team_day(d):
            if rng.random() < 0.5:
                e = dict(e, cache_read_tokens=48_000)
            events.append(e)
    assert run(tmp_path, events, TWO_DAYS) == []


def test_twenty_plus_active_hours_is_flagged(tmp_path: Path) -> None:
    events = []
    for d in TWO_DAYS:
        rng = random.Random(str(d))
        events += team_day(d)
        # Requests in 22 distinct hours, with a person's shape (random gaps and sizes).
        for hour in range(22):
            for _ in range(4):
                events.append(
                    {
                        "ts": ms(d, hour + rng.uniform(0, 0.99)),
                        "user": "always-on",
                        "team": TEAM,
                        "client": "ide",
                        "prompt_hash": f"a{rng.getrandbits(40):x}",
                        "input_tokens": int(rng.lognormvariate(6, 1)) + 5,
                        "output_tokens": int(rng.lognormvariate(5.5, 0.8)) + 5,
                    }
                )
    assert pairs(run(tmp_path, events, TWO_DAYS)) == {("always-on", "active_hours")}


def agent_night(user: str, day: dt.date, seed: int = 9) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    t = ms(day, 0.5)
    ctx = 20_000
    while t < ms(day, 7):
        t += int(rng.lognormvariate(math.log(30_000), 0.7))
        tool = int(rng.lognormvariate(6.5, 1.0)) + 20
        out.append(
            {
                "ts": t,
                "user": user,
                "team": TEAM,
                "client": "agent",
                "prompt_hash": f"g{rng.getrandbits(40):x}",
                "input_tokens": tool,
                "output_tokens": int(rng.lognormvariate(5.4, 1.0)) + 5,
                "cache_read_tokens": ctx,
            }
        )
        ctx = ctx + tool if ctx < 150_000 else 25_000
    return out


def test_agent_farm_with_nobody_at_the_keyboard_is_flagged(tmp_path: Path) -> None:
    rng = random.Random(2)
    events = [e for d in TWO_DAYS for e in team_day(d) + human(rng, "farmer", d) + agent_night("farmer", d)]
    flags = run(tmp_path, events, TWO_DAYS)
    assert pairs(flags) == {("farmer", "unattended_agent")}
    assert flags[0]["evidence"]["unattended_hours"] >= 4


def test_agent_run_watched_from_the_ide_is_not_unattended(tmp_path: Path) -> None:
    rng = random.Random(2)
    events = []
    for d in TWO_DAYS:
        events += team_day(d)
        run_events = agent_night("watched", d)
        events += run_events
        # The user types in the IDE through the run: one prompt an hour.
        for hour in range(0, 8):
            events += [dict(e, ts=ms(d, hour + 0.5), client="ide") for e in human(rng, "watched", d, n=1)]
    assert run(tmp_path, events, TWO_DAYS) == []


def test_a_flag_counts_only_from_min_days(tmp_path: Path) -> None:
    events = [e for d in TWO_DAYS for e in team_day(d)] + stuffer(DAY)
    assert run(tmp_path, events, TWO_DAYS) == []
    assert pairs(run(tmp_path / "b", events, TWO_DAYS, min_days=1)) == {
        ("stuffer", "context_ratio"),
        ("stuffer", "fixed_cache"),
    }


# --- detectors over several days ----------------------------------------------------------------


def weeks(first: dt.date, days: int) -> list[dt.date]:
    return [first + dt.timedelta(days=i) for i in range(days)]


def test_deadline_sprinter_is_flagged_and_a_crunching_team_is_not(tmp_path: Path) -> None:
    deadline = dt.date(2026, 3, 27)  # a Friday: the burst window is Tuesday to Thursday
    days = weeks(deadline - dt.timedelta(days=18), 18)
    burst = {deadline - dt.timedelta(days=k) for k in (1, 2, 3)}
    events = []
    for d in days:
        if d.weekday() >= 5:
            continue
        crunch = 2 if d in burst else 1
        rng = random.Random(f"{d}")
        for user in HONEST:
            events += human(rng, user, d, n=int(40 * crunch * rng.lognormvariate(0, 0.2)), gap_s=240 / crunch)
        sprint = 6 if d in burst else 1
        events += human(rng, "sprinter", d, n=40 * crunch * sprint, gap_s=240 / (crunch * sprint))
    lake = tmp_path / "lake"
    write_events(lake, events)
    cfg = detect.Config(deadlines=(detect.Deadline("review", deadline),))
    hits = [detect.detect_day(lake, d, cfg)[0] for d in sorted(burst)]
    import pyarrow as pa

    flags = detect.counting_flags(pa.concat_tables(hits), cfg.min_days)
    assert pairs(flags) == {("sprinter", "deadline_burst")}
    assert flags[0]["days"] == 3
    # Without the deadline in the policy the burst window does not exist.
    quiet = [detect.detect_day(lake, d, detect.Config())[0] for d in sorted(burst)]
    assert all(h.num_rows == 0 for h in quiet)


def test_slow_inflator_is_flagged_by_the_trend_and_a_steady_team_is_not(tmp_path: Path) -> None:
    days = weeks(dt.date(2026, 2, 2), 28)
    events = []
    for i, d in enumerate(days):
        if d.weekday() >= 5:
            continue
        rng = random.Random(f"{d}")
        for user in HONEST:
            events += human(rng, user, d, n=int(40 * rng.lognormvariate(0, 0.15)))
        events += human(rng, "inflator", d, n=int(15 * math.exp(0.07 * i)))
    lake = tmp_path / "lake"
    write_events(lake, events)
    hits, rels = detect.detect_trend(lake, days[-1], detect.Config())
    assert rels
    assert set(zip(hits.column("user").to_pylist(), hits.column("detector").to_pylist(), strict=True)) == {
        ("inflator", "trend")
    }
    row = hits.to_pylist()[0]
    assert row["kind"] == "window" and row["window_start"] == days[0] and row["window_end"] == days[-1]


# --- flags in the lake --------------------------------------------------------------------------


def test_flags_are_written_listed_and_replaced(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    write_events(lake, [e for d in TWO_DAYS for e in team_day(d) + stuffer(d)])
    first = detect.detect(lake, DAY, DAY, trend=False)
    assert len(first.written) == 1 and first.written[0].startswith(f"flags/date={DAY}/day-")
    assert detect.flag_files(lake, DAY, DAY) == first.written
    stored = detect.read_flags(lake, DAY, DAY)
    assert stored.schema == detect.FLAGS
    assert set(stored.column("user").to_pylist()) == {"stuffer"}
    evidence = json.loads(stored.column("evidence")[0].as_py())
    assert {"group_median", "group_mad", "compared_with", "z_threshold"} <= set(evidence)
    # Same inputs, same policy: the same file name; another policy: a new file, the old one gone.
    again = detect.detect(lake, DAY, DAY, trend=False)
    assert again.written == first.written
    other = detect.detect(lake, DAY, DAY, detect.Config(z=5.0), trend=False)
    assert other.written != first.written
    assert not (lake / first.written[0]).exists() and (lake / other.written[0]).exists()
    # A stray file in the flags directory is never read.
    stray = lake / "flags" / f"date={DAY}" / "day-forged.parquet"
    stray.write_bytes((lake / other.written[0]).read_bytes())
    assert detect.flag_files(lake, DAY, DAY) == other.written
    assert not list((lake / "flags" / f"date={DAY}").glob(".*.tmp"))


def test_flagged_users_gauge_counts_by_detector_and_team_without_user_labels(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    write_events(lake, [e for d in TWO_DAYS for e in team_day(d) + stuffer(d)])
    detect.detect(lake, DAY, TWO_DAYS[1], trend=False)
    registry = CollectorRegistry()
    registry.register(detect.FlagsCollector(lake, today=lambda: TWO_DAYS[1]))
    labels = {"detector": "fixed_cache", "team": TEAM}
    assert registry.get_sample_value("meter_flagged_users", labels) == 1.0
    for metric in registry.collect():
        for sample in metric.samples:
            assert "user" not in sample.labels


# --- policy and SQL -----------------------------------------------------------------------------


def test_policy_file_sets_thresholds_and_deadlines(tmp_path: Path) -> None:
    cfg = detect.load_config(
        text='[detect]\nz = 4.0\nmin_days = 3\nautomation_clients = ["batch-job", "cron"]\n'
        '[[deadline]]\nname = "q1"\ndate = 2026-03-31\nteams = ["acme-ml-001"]\n'
        '[[budget]]\nscope = "team"\nname = "x"\namount_usd = "10"\n'
    )
    assert cfg.z == 4.0 and cfg.min_days == 3 and cfg.automation_clients == ("batch-job", "cron")
    assert cfg.deadlines == (detect.Deadline("q1", dt.date(2026, 3, 31), ("acme-ml-001",)),)
    assert [d.name for d in cfg.burst_deadlines(dt.date(2026, 3, 30))] == ["q1"]
    assert cfg.burst_deadlines(dt.date(2026, 3, 31)) == []
    assert cfg.digest() != detect.Config().digest()
    for bad in ("[detect]\nz = -1\n", "[detect]\nbogus = 1\n", "[other]\n", "[detect]\nmin_days = 1.5\n"):
        with pytest.raises(detect.PolicyError):
            detect.load_config(text=bad)


def test_client_lists_are_quoted_in_sql() -> None:
    cfg = detect.Config(automation_clients=("o'brien",))
    assert "'o''brien'" in detect.day_events_sql(cfg, DAY)
    assert detect._in("client", ()) == "false"


def test_every_detector_is_documented() -> None:
    names = {d.name for d in detect.DETECTORS}
    assert names == {*detect.DAILY_DETECTORS, *detect.WINDOW_DETECTORS}
    assert len(names) == 9
    for d in detect.DETECTORS:
        assert d.signal and d.threshold and d.honest and d.mad_floor > 0
    doc = (Path(__file__).resolve().parent.parent / "docs" / "integrity.md").read_text()
    for name in names:
        assert f"`{name}`" in doc, name


# --- the command line ---------------------------------------------------------------------------


def test_cli_detect_prints_the_ranking_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lake = tmp_path / "lake"
    write_events(lake, [e for d in TWO_DAYS for e in team_day(d) + stuffer(d)])
    args = ["detect", "--lake", str(lake), "--from", str(DAY), "--to", str(TWO_DAYS[1]), "--no-trend"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "stuffer" in out and "context_ratio" in out and "(1 flagged user)" in out
    assert main([*args, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [u["user"] for u in doc["ranked"]] == ["stuffer"]
    assert doc["ranked"][0]["detectors"] == ["context_ratio", "fixed_cache"]
    # --day reads the days before it from the stored flags: the second day completes 2 days.
    assert main(["detect", "--lake", str(lake), "--day", str(TWO_DAYS[1]), "--format", "csv"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].startswith("rank,user,team") and len(rows) == 3
    buf = io.StringIO()
    detect.render_ranking([], [], buf)
    assert "(0 flagged users)" in buf.getvalue()


# --- the daemon's daily run -------------------------------------------------------------------


def test_next_run_is_the_next_quarter_past_midnight_utc() -> None:
    at = dt.datetime(2026, 3, 10, 0, 10, tzinfo=dt.UTC)
    assert detect.next_run(at, 900) == dt.datetime(2026, 3, 10, 0, 15, tzinfo=dt.UTC)
    assert detect.next_run(at.replace(minute=15), 900) == dt.datetime(2026, 3, 11, 0, 15, tzinfo=dt.UTC)


def test_daily_detector_runs_yesterday_and_the_trend_on_mondays(tmp_path: Path) -> None:
    import threading

    lake = tmp_path / "lake"
    write_events(lake, [e for d in TWO_DAYS for e in team_day(d) + stuffer(d)])
    job = detect.DailyDetector(lake, detect.Config(), threading.Event())
    result = job.run_once(TWO_DAYS[1] + dt.timedelta(days=1))  # a Thursday: no trend
    assert result.d0 == result.d1 == TWO_DAYS[1] and result.window_hits.num_rows == 0
    assert detect.flag_files(lake, TWO_DAYS[1], TWO_DAYS[1]) == result.written
    flags = detect.counting_flags(detect.read_flags(lake, DAY, TWO_DAYS[1]), 2)
    assert flags == []  # one day stored so far
    job.run_once(TWO_DAYS[0] + dt.timedelta(days=1))
    flags = detect.counting_flags(detect.read_flags(lake, DAY, TWO_DAYS[1]), 2)
    assert pairs(flags) == {("stuffer", "context_ratio"), ("stuffer", "fixed_cache")}
    stop = threading.Event()
    stop.set()
    idle = detect.DailyDetector(lake, detect.Config(), stop)
    idle.run()  # returns at once when stopped
    assert idle.last is None
