"""meter.rollup: grains equal to raw events to the last digit, incremental runs, kill points.

Also the lake builder that test_audit and test_reprice share (`SynthLake`): small lakes
written through meter's own flush (`meter.stages.write_flush`), priced by the default
catalog, with unpriced models, null dimensions and 12-decimal costs.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import signal
import subprocess
import sys
import textwrap
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meter import rollup as R
from meter.cli import main
from meter.lake import abs_path
from meter.manifest import ManifestEntry, listed_files, load_partition, totals
from meter.pricing import load_catalog
from meter.schema import DLQ, EVENTS, LAKE_EVENTS, TOKEN_COLUMNS
from meter.stages import Flush, write_flush

TOPIC = "usage.v1"
CATALOG = load_catalog()
MODELS = ("claude-sonnet-4-5", "gpt-5", "gpt-4o-mini", "claude-haiku-4-5", "mystery-model")
USERS = [(f"u{i:03d}", f"team-{i % 5}" if i % 7 else None, f"org-{i % 2}") for i in range(40)]


def ms(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> int:
    return int(dt.datetime(y, mo, d, h, mi, s, tzinfo=dt.UTC).timestamp()) * 1000


T0 = ms(2026, 1, 5, 22)  # two UTC days in the first few hours


class SynthLake:
    """Writes flushes of random events into a lake the way the daemon does."""

    def __init__(self, root: Path, seed: int = 1) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(seed)
        self.positions: dict[int, int | None] = {}
        self.event_seq = 0

    def events(self, n: int, start_ms: int, span_ms: int, partition: int, offset: int) -> pa.Table:
        rng = self.rng
        rows: dict[str, list[Any]] = defaultdict(list)
        for _ in range(n):
            user, team, org = rng.choice(USERS)
            model = rng.choice(MODELS)
            self.event_seq += 1
            rows["event_id"].append(f"e{self.event_seq}")
            rows["ts"].append(start_ms + rng.randrange(span_ms))
            rows["user"].append(user)
            rows["team"].append(team)
            rows["org"].append(org)
            rows["model"].append(model)
            rows["provider"].append(None if model == "mystery-model" else model.split("-")[0])
            rows["client"].append(rng.choice(("ide", "cli", None)))
            rows["request_id"].append(None)
            rows["prompt_hash"].append(None)
            big = rng.random() < 0.05
            rows["input_tokens"].append(rng.randrange(1, 1_000_000_000 if big else 5000))
            rows["output_tokens"].append(rng.randrange(0, 2000))
            rows["cache_read_tokens"].append(rng.choice((0, rng.randrange(1, 100_000))))
            rows["cache_write_tokens"].append(rng.choice((0, 0, 7)))
            rows["cache_write_1h_tokens"].append(rng.choice((0, 0, 0, 3)))
            rows["reasoning_tokens"].append(0)
        batch = pa.RecordBatch.from_pydict(dict(rows), schema=EVENTS)
        priced = CATALOG.price(batch)
        return pa.Table.from_batches(
            [
                pa.RecordBatch.from_arrays(
                    [
                        *priced.columns,
                        pa.array([TOPIC] * n, pa.string()),
                        pa.array([partition] * n, pa.int32()),
                        pa.array(range(offset, offset + n), pa.int64()),
                    ],
                    schema=LAKE_EVENTS,
                )
            ]
        )

    def dlq(self, n: int, partition: int, offset: int, arrival_ms: int) -> pa.Table:
        return pa.table(
            {
                "raw": [b"{bad"] * n,
                "kafka_topic": [TOPIC] * n,
                "kafka_partition": pa.array([partition] * n, pa.int32()),
                "kafka_offset": pa.array(range(offset, offset + n), pa.int64()),
                "line": pa.array([0] * n, pa.int32()),
                "reason": ["invalid_json"] * n,
                "detail": ["invalid JSON at byte 4"] * n,
                "arrival_ts": pa.array([arrival_ms] * n, pa.int64()).cast(DLQ.field("arrival_ts").type),
            },
            schema=DLQ,
        )

    def flush(
        self, n: int, start_ms: int = T0, span_ms: int = 4 * 3600_000, partition: int = 0, bad: int = 0
    ) -> ManifestEntry:
        after = self.positions.get(partition)
        start = 0 if after is None else after
        events = self.events(n, start_ms, span_ms, partition, start)
        dlq = self.dlq(bad, partition, start + n, start_ms)
        end = start + n + bad
        entry = write_flush(
            os.fspath(self.root),
            Flush(TOPIC, partition, start, after, end, 0, n + bad, events, dlq),
            "test/1",
        )
        self.positions[partition] = end
        return entry


def build(root: Path, seed: int = 1, scale: int = 10) -> SynthLake:
    """Three flushes over two partitions, two dates, late rows and DLQ rows."""
    lake = SynthLake(root, seed)
    lake.flush(30 * scale, bad=3)
    lake.flush(20 * scale, partition=1)
    lake.flush(25 * scale, start_ms=T0 + 3600_000)
    return lake


# --- an independent reference: Python Decimal sums over every raw row --------------------


def raw_rows(root: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for rel in listed_files(root, "events"):
        rows += pq.read_table(abs_path(root, rel)).to_pylist()
    return rows


def _bucket(ts: dt.datetime, grain: str) -> dt.datetime:
    ts = ts.astimezone(dt.UTC)
    if grain == "minute":
        return ts.replace(second=0, microsecond=0)
    if grain == "hour":
        return ts.replace(minute=0, second=0, microsecond=0)
    return ts.replace(hour=0, minute=0, second=0, microsecond=0)


Key = tuple[Any, ...]


def reference(root: Path, grain: str) -> dict[Key, tuple[Any, ...]]:
    acc: dict[Key, list[Any]] = {}
    for r in raw_rows(root):
        key = (_bucket(r["ts"], grain), *(r[d] for d in R.DIMENSIONS))
        a = acc.setdefault(key, [0, *([0] * len(TOKEN_COLUMNS)), None, 0, set()])
        a[0] += 1
        for i, t in enumerate(TOKEN_COLUMNS, 1):
            a[i] += r[t]
        c = len(TOKEN_COLUMNS) + 1
        if r["cost_usd"] is not None:
            a[c] = (a[c] or Decimal(0)) + r["cost_usd"]
        else:
            a[c + 1] += 1
        if r["price_version"] is not None:
            a[c + 2].add(r["price_version"])
    return {k: (*v[:-1], sorted(v[-1])) for k, v in acc.items()}


def stored(root: Path, grain: str) -> dict[Key, tuple[Any, ...]]:
    out: dict[Key, tuple[Any, ...]] = {}
    for rel in R.rollup_view(root, grain).files:
        table = pq.read_table(Path(root, rel))
        assert table.schema.equals(R.ROLLUP), table.schema
        for r in table.to_pylist():
            key = (r["ts"], *(r[d] for d in R.DIMENSIONS))
            assert key not in out, f"{grain}: group {key} twice"
            out[key] = (r["events"], *(r[t] for t in TOKEN_COLUMNS), r["cost_usd"], r["unpriced"])
            out[key] = (*out[key], r["price_versions"])
    return out


def assert_exact(root: Path) -> None:
    """Every grain equals the reference group by group, and sums to the manifest's totals."""
    t = totals(root)
    for grain in R.GRAINS:
        assert stored(root, grain) == reference(root, grain), grain
    day = stored(root, "day").values()
    assert sum(v[0] for v in day) == t.accepted
    cost = sum((v[len(TOKEN_COLUMNS) + 1] or Decimal(0) for v in day), Decimal(0))
    assert format(cost, "f") == t.cost_usd
    for i, name in enumerate(TOKEN_COLUMNS, 1):
        assert sum(v[i] for v in day) == t.tokens[name]
    assert sum(v[-2] for v in day) == t.unpriced


def lake_files(root: Path, top: str) -> set[str]:
    base = root / top
    return (
        {p.relative_to(root).as_posix() for p in base.rglob("*") if p.is_file()} if base.exists() else set()
    )


@pytest.fixture
def lake(tmp_path: Path) -> SynthLake:
    return build(tmp_path / "lake")


# --- pure ------------------------------------------------------------------------------


def test_paths_and_names() -> None:
    d = "a" * 64
    assert R.rollup_file_rel("minute", "2026-01-05", 7, d) == (
        f"rollups/minute/date=2026-01-05/hour=07/minute-{'a' * 20}.parquet"
    )
    assert (
        R.rollup_file_rel("day", "2026-01-05", None, d)
        == f"rollups/day/date=2026-01-05/day-{'a' * 20}.parquet"
    )
    for bad in (("week", "2026-01-05", 1, d), ("day", "2026-01-05", 1, d), ("hour", "2026-01-05", None, d),
                ("hour", "2026-02-30", 1, d), ("hour", "2026-01-05", 1, "xyz")):  # fmt: skip
        with pytest.raises(ValueError):
            R.rollup_file_rel(*bad)
    assert R.record_path("/L", "2026-01-05", 3).as_posix() == "/L/_meter/rollups/date=2026-01-05/hour=03.json"
    assert R.record_path("/L", "2026-01-05", None).as_posix() == "/L/_meter/rollups/date=2026-01-05/day.json"


def test_digests_are_order_free_and_sensitive() -> None:
    a, b = R.Source("events/x.parquet", 10), R.Source("events/y.parquet", 20)
    assert R.hour_digest([a, b]) == R.hour_digest([b, a])
    assert R.hour_digest([a]) != R.hour_digest([a, b])
    assert R.hour_digest([a]) != R.hour_digest([R.Source(a.path, 11)])
    assert R.day_digest({1: "x", 2: "y"}) == R.day_digest({2: "y", 1: "x"}) != R.day_digest({1: "x"})


def test_sql_escapes_paths() -> None:
    assert R.sql_list(["/l/it's[1]/a*.parquet"]) == "['/l/it''s[[]1]/a[*].parquet']"
    with pytest.raises(ValueError):
        R.minute_sql([], [])
    assert "UNION ALL" in R.minute_sql(["/a"], ["/b"]) and "UNION ALL" not in R.minute_sql(["/a"], [])


# --- builds ----------------------------------------------------------------------------


def test_first_build_equals_raw_events_at_every_grain(lake: SynthLake) -> None:
    report = R.build_rollups(lake.root, grace_s=0)
    hours = {k for k in R.current_sources(lake.root)}
    assert report.hours_rebuilt == len(hours) and report.hours_merged == 0
    assert report.days_rebuilt == len({d for d, _ in hours}) == 2
    assert report.source_rows == totals(lake.root).accepted
    assert_exact(lake.root)
    # No file under rollups/ that a record does not list.
    listed = {f for g in R.GRAINS for f in R.rollup_view(lake.root, g).files}
    assert lake_files(lake.root, "rollups") == listed


def test_costs_keep_all_twelve_decimals_and_large_sums(tmp_path: Path) -> None:
    lake = SynthLake(tmp_path / "lake", seed=7)
    for _ in range(3):
        lake.flush(400, span_ms=600_000)
    R.build_rollups(lake.root)
    day = pq.read_table(Path(lake.root, R.rollup_view(lake.root, "day").files[0]))
    total = sum((c for c in day.column("cost_usd").to_pylist() if c is not None), Decimal(0))
    assert format(total, "f") == totals(lake.root).cost_usd
    assert total > 1000 and total.as_tuple().exponent == -12  # big inputs, every digit kept
    assert_exact(lake.root)


def test_an_unchanged_lake_rebuilds_nothing(lake: SynthLake) -> None:
    R.build_rollups(lake.root)
    before = {p: p.stat().st_mtime_ns for p in (lake.root / "rollups").rglob("*.parquet")}
    report = R.build_rollups(lake.root)
    assert (report.hours_rebuilt, report.hours_merged, report.days_rebuilt) == (0, 0, 0)
    assert report.hours_unchanged == len(R.current_sources(lake.root)) and report.source_rows == 0
    assert before == {p: p.stat().st_mtime_ns for p in (lake.root / "rollups").rglob("*.parquet")}


def test_late_events_rebuild_only_their_partitions_by_merging(lake: SynthLake, tmp_path: Path) -> None:
    R.build_rollups(lake.root, grace_s=0)
    records = R.read_records(lake.root)[0]
    late_hour = dt.datetime.fromtimestamp((T0 + 3600_000) / 1000, dt.UTC)
    lake.flush(30, start_ms=T0 + 3600_000, span_ms=3600_000)  # late: one old hour only
    report = R.build_rollups(lake.root, grace_s=0)
    assert (report.hours_rebuilt, report.hours_merged, report.days_rebuilt) == (0, 1, 1)
    assert report.source_rows == 30
    after = R.read_records(lake.root)[0]
    changed = {k for k in after if after[k] != records.get(k)}
    assert changed == {(late_hour.date().isoformat(), late_hour.hour), (late_hour.date().isoformat(), None)}
    assert_exact(lake.root)
    # The same lake built from scratch gives the same files, row for row.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for rel in listed_files(lake.root, "events"):
        (fresh / rel).parent.mkdir(parents=True, exist_ok=True)
        (fresh / rel).write_bytes((lake.root / rel).read_bytes())
    import shutil

    shutil.copytree(lake.root / "_meter" / "manifest", fresh / "_meter" / "manifest")
    R.build_rollups(fresh)
    for grain in R.GRAINS:
        for rel in R.rollup_view(lake.root, grain).files:
            assert pq.read_table(lake.root / rel).equals(pq.read_table(fresh / rel)), rel


def test_a_removed_source_rebuilds_from_the_sources(lake: SynthLake) -> None:
    R.build_rollups(lake.root)
    records = R.read_records(lake.root)[0]
    key = next(k for k in records if k[1] is not None)
    # As after compaction: the record's sources are no longer a subset of the listing.
    forged = R.Source(
        "events/date=2026-01-05/hour=22/gone.0.00000000000000000000-00000000000000000001.parquet", 1
    )
    import dataclasses

    old = records[key]
    sources = (*old.sources, forged)
    record = dataclasses.replace(old, sources=sources, digest=R.hour_digest(sources), files={
        g: dataclasses.replace(f, path=R.rollup_file_rel(g, key[0], key[1], R.hour_digest(sources)))
        for g, f in old.files.items()
    })  # fmt: skip
    R.record_path(lake.root, *key).write_bytes(record.to_json())
    report = R.build_rollups(lake.root, grace_s=0)
    assert (report.hours_rebuilt, report.hours_merged) == (1, 0)
    assert_exact(lake.root)


def test_full_rebuild_and_grace_period(lake: SynthLake) -> None:
    clock = [1_000_000]
    R.build_rollups(lake.root, clock_ms=lambda: clock[0])
    lake.flush(10, start_ms=T0, span_ms=60_000)
    R.build_rollups(lake.root, grace_s=60, clock_ms=lambda: clock[0])
    records = R.read_records(lake.root)[0]
    retired = {p for r in records.values() for p, _ in r.retired}
    assert len(retired) == 3  # the hour's minute and hour files, the date's day file
    assert all((lake.root / p).exists() for p in retired)  # a query may still read them
    clock[0] += 59_000
    R.build_rollups(lake.root, grace_s=60, clock_ms=lambda: clock[0])
    assert all((lake.root / p).exists() for p in retired)
    clock[0] += 2_000
    report = R.build_rollups(lake.root, grace_s=60, clock_ms=lambda: clock[0])
    assert report.files_removed == 3 and not any((lake.root / p).exists() for p in retired)
    assert not any(r.retired for r in R.read_records(lake.root)[0].values())
    report = R.build_rollups(lake.root, full=True, grace_s=0)
    assert report.hours_rebuilt == len(R.current_sources(lake.root))
    assert_exact(lake.root)


def test_distinct_users_per_team_and_day_from_the_day_rollup(lake: SynthLake) -> None:
    import duckdb

    R.build_rollups(lake.root)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    raw = R.sql_list([os.fspath(lake.root / p) for p in listed_files(lake.root, "events")])
    day = R.sql_list([os.fspath(lake.root / p) for p in R.rollup_view(lake.root, "day").files])
    q = 'SELECT ts::DATE AS d, team, count(DISTINCT "user") FROM read_parquet({}) GROUP BY ALL ORDER BY ALL'
    assert con.sql(q.format(raw)).fetchall() == con.sql(q.format(day)).fetchall()


def test_rollup_views_list_current_files(lake: SynthLake) -> None:
    assert [v.files for v in R.rollup_views(lake.root)] == [[], [], []]
    R.build_rollups(lake.root)
    views = R.rollup_views(lake.root)
    assert [v.name for v in views] == ["rollup_minute", "rollup_hour", "rollup_day"]
    assert [v.partitions for v in views] == [
        (("date", "DATE"), ("hour", "INTEGER")),
        (("date", "DATE"), ("hour", "INTEGER")),
        (("date", "DATE"),),
    ]
    records = R.read_records(lake.root)[0]
    assert views[2].files == sorted(r.files["day"].path for r in records.values() if r.hour is None)
    assert all(v.schema.equals(R.ROLLUP) for v in views)


def test_one_run_at_a_time(lake: SynthLake) -> None:
    seen: list[str] = []

    def nested(step: str) -> None:
        if not seen:
            seen.append(step)
            with pytest.raises(R.RollupBusy):
                R.build_rollups(lake.root)

    R.build_rollups(lake.root, on_step=nested)
    assert seen


def test_corrupt_record_is_rebuilt(lake: SynthLake) -> None:
    R.build_rollups(lake.root)
    path = next((lake.root / "_meter" / "rollups").rglob("hour=*.json"))
    path.write_bytes(b"{not json")
    assert R.read_records(lake.root)[1]
    report = R.build_rollups(lake.root)
    assert report.hours_rebuilt == 1 and not R.read_records(lake.root)[1]
    assert_exact(lake.root)


# --- kill points ------------------------------------------------------------------------


class Crash(Exception):
    pass


def steps_of_a_run(lake: SynthLake) -> list[str]:
    steps: list[str] = []
    R.build_rollups(lake.root, grace_s=0, on_step=steps.append)
    return steps


def _late_flushes(lake: SynthLake) -> None:
    lake.flush(20, start_ms=T0, span_ms=3 * 3600_000)
    lake.flush(10, start_ms=T0 + 2 * 3600_000, span_ms=3600_000, partition=1)


def test_a_crash_at_every_step_then_a_rerun_gives_exact_rollups(tmp_path: Path) -> None:
    """Crash at each durable step of an incremental run (raised), check that each
    partition's rollup is whole (old or new, never a mix), rerun, check exactness."""
    probe = build(tmp_path / "probe", scale=2)
    R.build_rollups(probe.root, grace_s=0)
    _late_flushes(probe)
    steps = steps_of_a_run(probe)
    assert len(steps) >= 8
    for n in range(len(steps)):
        lake = build(tmp_path / f"lake{n}", scale=2)
        R.build_rollups(lake.root, grace_s=0)
        _late_flushes(lake)
        seen: list[str] = []

        def crash(step: str, n: int = n, seen: list[str] = seen) -> None:
            seen.append(step)
            if len(seen) == n + 1:
                raise Crash(step)

        with pytest.raises(Crash):
            R.build_rollups(lake.root, grace_s=0, on_step=crash)
        # Each record still describes whole files that sum to its totals.
        for record in R.read_records(lake.root)[0].values():
            for f in record.files.values():
                t = pq.read_table(lake.root / f.path)
                assert t.num_rows == f.rows and R.file_sha256(lake.root / f.path) == f.sha256
                grain_events = sum(t.column("events").to_pylist())
                assert grain_events == record.events
        R.build_rollups(lake.root, grace_s=0)
        assert_exact(lake.root)
        listed = {f for g in R.GRAINS for f in R.rollup_view(lake.root, g).files}
        assert lake_files(lake.root, "rollups") == listed, steps[n]


def test_kill_9_mid_rollup_then_rerun(lake: SynthLake) -> None:
    R.build_rollups(lake.root, grace_s=0)
    _late_flushes(lake)
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from meter.rollup import build_rollups
        seen = []
        def step(name):
            seen.append(name)
            if len(seen) == int(sys.argv[1]):
                os.kill(os.getpid(), signal.SIGKILL)
        build_rollups({os.fspath(lake.root)!r}, grace_s=0, on_step=step)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script, "3"], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    # The killed run held the lock; the kernel released it with the process.
    R.build_rollups(lake.root, grace_s=0)
    assert_exact(lake.root)


# --- CLI -------------------------------------------------------------------------------


def test_cli_rollup(lake: SynthLake, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rollup", "--lake", os.fspath(lake.root), "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["hours_rebuilt"] > 0 and report["source_rows"] == totals(lake.root).accepted
    assert main(["rollup", "--lake", os.fspath(lake.root)]) == 0
    out = capsys.readouterr().out
    assert "unchanged" in out
    assert main(["rollup", "--lake", os.fspath(lake.root / "missing")]) == 2
    assert load_partition(lake.root, TOPIC, 0).position is not None


# --- the daemon's schedule ---------------------------------------------------------------


def test_scheduler_runs_until_stopped(lake: SynthLake) -> None:
    import threading
    import time

    stop = threading.Event()
    scheduler = R.RollupScheduler(lake.root, 0.05, stop)
    scheduler.start()
    deadline = time.monotonic() + 60
    while not R.rollup_view(lake.root, "day").files and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    scheduler.join(30)
    assert not scheduler.thread.is_alive()
    assert_exact(lake.root)


def test_rollup_interval_setting() -> None:
    from meter import config

    base = {"METER_BROKERS": "127.0.0.1:9092", "METER_TOPIC": "t", "METER_LAKE": "/l"}
    assert config.load(env=base).rollup_interval_s is None
    assert config.load(env={**base, "METER_ROLLUP_INTERVAL_S": "30"}).rollup_interval_s == 30.0
    with pytest.raises(config.ConfigError, match="rollup_interval_s"):
        config.load(env={**base, "METER_ROLLUP_INTERVAL_S": "0"})
