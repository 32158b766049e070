"""meter.lake: pure names and paths, time splits, atomic Parquet writes, intents."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meter import lake
from meter.schema import DLQ, LAKE_EVENTS, TOKEN_COLUMNS

UTC = dt.UTC


def ms(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> int:
    return int(dt.datetime(y, mo, d, h, mi, s, tzinfo=UTC).timestamp() * 1000)


def events_table(ts_ms: list[int], first_offset: int = 0) -> pa.Table:
    n = len(ts_ms)
    cols: dict[str, list[Any]] = {
        "event_id": [f"e{i}" for i in range(n)],
        "ts": ts_ms,
        "user": ["u"] * n,
        "team": [None] * n,
        "org": [None] * n,
        "model": ["m"] * n,
        "provider": [None] * n,
        "client": [None] * n,
        "request_id": [None] * n,
        "prompt_hash": [None] * n,
        **{k: [i for i in range(n)] for k in TOKEN_COLUMNS},
        "cost_usd": [Decimal("0.000000000001")] * n,
        "price_version": ["m@2025-01-01"] * n,
        "kafka_topic": ["t"] * n,
        "kafka_partition": [0] * n,
        "kafka_offset": list(range(first_offset, first_offset + n)),
    }
    return pa.table(cols, schema=LAKE_EVENTS)


def dlq_table(arrival_ms: list[int]) -> pa.Table:
    n = len(arrival_ms)
    return pa.table(
        {
            "raw": [b"{"] * n,
            "kafka_topic": ["t"] * n,
            "kafka_partition": [0] * n,
            "kafka_offset": list(range(n)),
            "line": [0] * n,
            "reason": ["invalid_json"] * n,
            "detail": ["d"] * n,
            "arrival_ts": arrival_ms,
        },
        schema=DLQ,
    )


# --- pure: names and paths ------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    ["usage", "usage.v1", "a-b_c.d-e", "x.1.2", "..a", "-", "_", "9" * 249],
)
@pytest.mark.parametrize(
    ("partition", "start", "end"),
    [(0, 0, 1), (17, 41, 100), (2**31 - 1, 2**63 - 2, 2**63 - 1)],
)
def test_data_file_name_round_trip(topic: str, partition: int, start: int, end: int) -> None:
    name = lake.data_file_name(topic, partition, start, end)
    assert lake.parse_data_file_name(name) == (topic, partition, start, end)
    assert "/" not in name
    assert lake.temp_name(name, "7-ab") == f".{name}.7-ab.tmp"


def test_data_file_name_exact() -> None:
    assert lake.data_file_name("usage.v1", 3, 100, 250) == (
        "usage.v1.3.00000000000000000100-00000000000000000250.parquet"
    )


def test_data_file_names_sort_by_offset() -> None:
    names = [lake.data_file_name("t", 0, s, s + 1) for s in (5, 10, 99, 1000)]
    assert sorted(names) == names


@pytest.mark.parametrize(
    "bad",
    [
        "t.0.00000000000000000001-00000000000000000002.json",
        "t.0.1-2.parquet",
        "t.00.00000000000000000001-00000000000000000002.parquet",
        "t.-1.00000000000000000001-00000000000000000002.parquet",
        "t.0.00000000000000000002-00000000000000000002.parquet",
        "0.00000000000000000001-00000000000000000002.parquet",
        "t/x.0.00000000000000000001-00000000000000000002.parquet",
        "...0.00000000000000000001-00000000000000000002.parquet",
        "t.٣.00000000000000000001-00000000000000000002.parquet",
    ],
)
def test_parse_data_file_name_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        lake.parse_data_file_name(bad)


@pytest.mark.parametrize("topic", ["usage", "usage.v2", "x.1.2", "v3"])
def test_versioned_names(topic: str) -> None:
    """A restated copy keeps the offsets and adds ``.v{n}``; every reader parses it."""
    assert lake.data_file_name(topic, 3, 100, 250, 1) == lake.data_file_name(topic, 3, 100, 250)
    name = lake.data_file_name(topic, 3, 100, 250, 2)
    assert name == f"{topic}.3.00000000000000000100-00000000000000000250.v2.parquet"
    assert lake.parse_data_file_name(name) == (topic, 3, 100, 250)
    rel = lake.events_rel_path("2026-01-02", 3, name)
    assert lake.parse_rel_path(rel) == lake.DataPath("events", "2026-01-02", 3, topic, 3, 100, 250, 2)
    v1 = lake.events_rel_path("2026-01-02", 3, lake.data_file_name(topic, 3, 100, 250))
    assert lake.parse_rel_path(v1).version == 1
    assert lake.next_version_path(v1) == rel
    assert lake.next_version_path(rel) == rel.removesuffix(".v2.parquet") + ".v3.parquet"
    assert lake.next_version_path(lake.dlq_rel_path("2026-01-02", name)).endswith(".v3.parquet")


@pytest.mark.parametrize(
    "bad",
    [
        "t.0.00000000000000000001-00000000000000000002.v1.parquet",
        "t.0.00000000000000000001-00000000000000000002.v0.parquet",
        "t.0.00000000000000000001-00000000000000000002.v02.parquet",
        "t.0.00000000000000000001-00000000000000000002.v.parquet",
        "t.0.00000000000000000001-00000000000000000002.v2.v3.parquet",
        "t.0.00000000000000000001-00000000000000000002.V2.parquet",
        "t.0.00000000000000000001-00000000000000000002.v1000000000.parquet",
        "v2.parquet",
    ],
)
def test_versioned_names_reject(bad: str) -> None:
    with pytest.raises(ValueError):
        lake.parse_data_file_name(bad)
    for version in (0, -1, True, 10**9):
        with pytest.raises(ValueError, match="version"):
            lake.data_file_name("t", 0, 1, 2, version)


@pytest.mark.parametrize(
    ("topic", "partition", "start", "end"),
    [("", 0, 0, 1), ("a/b", 0, 0, 1), ("..", 0, 0, 1), ("t", -1, 0, 1), ("t", 0, 5, 5),
     ("t", 0, -1, 1), ("a" * 250, 0, 0, 1)],
)  # fmt: skip
def test_data_file_name_rejects(topic: str, partition: int, start: int, end: int) -> None:
    with pytest.raises(ValueError):
        lake.data_file_name(topic, partition, start, end)


def test_dirs_and_relative_paths() -> None:
    root = Path("/lake")
    assert lake.events_dir(root, "2026-01-02", 3) == root / "events/date=2026-01-02/hour=03"
    assert lake.events_dir("/lake", dt.date(2026, 1, 2), 23) == Path("/lake/events/date=2026-01-02/hour=23")
    assert lake.dlq_dir(root, "2026-12-31") == root / "dlq/date=2026-12-31"
    name = lake.data_file_name("a.b", 1, 10, 20)
    rel = lake.events_rel_path("2026-01-02", 3, name)
    assert rel == f"events/date=2026-01-02/hour=03/{name}"
    assert lake.abs_path(root, rel) == root / "events" / "date=2026-01-02" / "hour=03" / name
    assert lake.rel_path(root, root / rel) == rel
    assert lake.parse_rel_path(rel) == lake.DataPath("events", "2026-01-02", 3, "a.b", 1, 10, 20)
    drel = lake.dlq_rel_path("2026-01-02", name)
    assert drel == f"dlq/date=2026-01-02/{name}"
    assert lake.parse_rel_path(drel) == lake.DataPath("dlq", "2026-01-02", None, "a.b", 1, 10, 20)
    assert lake.intent_path(root, "a.b", 7) == root / "_meter/intent/topic=a.b/partition=7.json"


@pytest.mark.parametrize(
    "bad",
    [
        ("2026-1-02", 0),
        ("2026-02-30", 0),
        ("2026-01-02", 24),
        ("2026-01-02", -1),
    ],
)
def test_dirs_reject_bad_date_or_hour(bad: tuple[str, int]) -> None:
    with pytest.raises(ValueError):
        lake.events_dir("/lake", *bad)


@pytest.mark.parametrize(
    "rel",
    [
        "events/date=2026-01-02/hour=03/../x.0.00000000000000000001-00000000000000000002.parquet",
        "../events/date=2026-01-02/hour=03/t.0.00000000000000000001-00000000000000000002.parquet",
        "/events/date=2026-01-02/hour=03/t.0.00000000000000000001-00000000000000000002.parquet",
        "events/date=2026-01-02/t.0.00000000000000000001-00000000000000000002.parquet",
        "events/date=2026-01-02/hour=3/t.0.00000000000000000001-00000000000000000002.parquet",
        "dlq/date=2026-01-02/hour=03/t.0.00000000000000000001-00000000000000000002.parquet",
        "flags/date=2026-01-02/t.0.00000000000000000001-00000000000000000002.parquet",
        "dlq/2026-01-02/t.0.00000000000000000001-00000000000000000002.parquet",
        "dlq/date=2026-01-02/notes.txt",
    ],
)
def test_parse_rel_path_rejects(rel: str) -> None:
    with pytest.raises(ValueError):
        lake.parse_rel_path(rel)
    with pytest.raises(ValueError):
        lake.abs_path("/lake", rel)


def test_temp_name() -> None:
    name = lake.data_file_name("t", 0, 1, 2)
    assert lake.temp_name(name, "12-ff") == f".{name}.12-ff.tmp"
    assert lake.is_temp_for(lake.temp_name(name, lake.new_token()), name)
    assert lake.new_token() != lake.new_token()
    other = lake.data_file_name("t", 0, 1, 3)
    for not_temp in (name, f".{name}.tmp", f".{name}..tmp", lake.temp_name(other, "1"),
                     f".{name}.a.b.tmp", f"x.{name}.1.tmp"):  # fmt: skip
        assert not lake.is_temp_for(not_temp, name)
    for bad_name, token in (("", "1"), ("a/b", "1"), (lake.temp_name(name, "1"), "1"),
                            (name, ""), (name, "a.b"), (name, "a/b")):  # fmt: skip
        with pytest.raises(ValueError):
            lake.temp_name(bad_name, token)


# --- pure: splits ---------------------------------------------------------------------


def test_split_by_hour_spans_hours_and_dates() -> None:
    ts = [
        ms(2026, 1, 1, 23, 59, 59) + 999,  # last ms of 2026-01-01 23h
        ms(2026, 1, 2, 0, 0, 0),  # first ms of the next day
        ms(2026, 1, 1, 23, 0, 0),
        ms(2026, 1, 2, 5, 30),
        ms(2026, 1, 2, 0, 15),
        ms(2025, 12, 31, 23, 1),
    ]
    table = events_table(ts)
    parts = lake.split_by_hour(table)
    assert [k for k, _ in parts] == [
        ("2025-12-31", 23),
        ("2026-01-01", 23),
        ("2026-01-02", 0),
        ("2026-01-02", 5),
    ]
    offsets = {k: t.column("kafka_offset").to_pylist() for k, t in parts}
    assert offsets == {
        ("2025-12-31", 23): [5],
        ("2026-01-01", 23): [0, 2],  # input order kept within an hour
        ("2026-01-02", 0): [1, 4],
        ("2026-01-02", 5): [3],
    }
    assert sum(t.num_rows for _, t in parts) == table.num_rows
    assert all(t.schema == LAKE_EVENTS for _, t in parts)


def test_split_by_hour_single_hour_and_empty() -> None:
    table = events_table([ms(2026, 3, 4, 5, m) for m in range(10)])
    ((key, part),) = lake.split_by_hour(table)
    assert key == ("2026-03-04", 5)
    assert part.equals(table)
    assert lake.split_by_hour(events_table([])) == []


def test_split_by_hour_multichunk_and_pre_epoch() -> None:
    a = events_table([ms(2026, 1, 1, 1), ms(2026, 1, 1, 2)])
    b = events_table([ms(2026, 1, 1, 1, 30), -1], first_offset=2)
    parts = lake.split_by_hour(pa.concat_tables([a, b]))
    assert [(k, t.column("kafka_offset").to_pylist()) for k, t in parts] == [
        (("1969-12-31", 23), [3]),
        (("2026-01-01", 1), [0, 2]),
        (("2026-01-01", 2), [1]),
    ]


def test_split_by_hour_rejects_nulls() -> None:
    table = events_table([ms(2026, 1, 1)])
    schema = LAKE_EVENTS.set(1, LAKE_EVENTS.field("ts").with_nullable(True))
    nulls = table.cast(schema).set_column(1, schema.field("ts"), pa.array([None], schema[1].type))
    with pytest.raises(ValueError, match="null"):
        lake.split_by_hour(nulls)


def test_split_dlq_by_date() -> None:
    arrival = [ms(2026, 1, 2, 0, 0, 1), ms(2026, 1, 1, 23, 59), ms(2026, 1, 2, 23, 59)]
    parts = lake.split_dlq_by_date(dlq_table(arrival))
    assert [(d, t.column("kafka_offset").to_pylist()) for d, t in parts] == [
        ("2026-01-01", [1]),
        ("2026-01-02", [0, 2]),
    ]


# --- I/O: atomic Parquet writes ------------------------------------------------------------


def test_write_parquet_atomic_round_trip(tmp_path: Path) -> None:
    table = events_table([ms(2026, 5, 6, 7, 8, 9) + 123, ms(2026, 5, 6, 7, 59)])
    name = lake.data_file_name("t", 0, 0, 2)
    final = lake.events_dir(tmp_path, "2026-05-06", 7) / name
    written = lake.write_parquet_atomic(table, final)

    assert written.bytes == final.stat().st_size > 0
    assert written.sha256 == hashlib.sha256(final.read_bytes()).hexdigest()
    assert sorted(p.name for p in final.parent.iterdir()) == [name]  # no temp left
    back = pq.read_table(final)
    assert back.schema.field("ts").type == pa.timestamp("ms", tz="UTC")
    assert back.equals(table)
    meta = pq.ParquetFile(final).metadata
    for rg in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            assert meta.row_group(rg).column(c).compression == "ZSTD"

    con = duckdb.connect()
    path = str(final)
    (ts_type,) = con.execute(
        "SELECT logical_type FROM parquet_schema(?) WHERE name = 'ts'", [path]
    ).fetchone()  # type: ignore[misc]
    assert "isAdjustedToUTC=1" in ts_type and "MILLIS" in ts_type
    codecs = {r[0] for r in con.execute("SELECT compression FROM parquet_metadata(?)", [path])
              .fetchall()}  # fmt: skip
    assert codecs == {"ZSTD"}
    epoch_ms, typ = con.execute(
        "SELECT epoch_ms(ts), typeof(ts) FROM read_parquet(?) ORDER BY kafka_offset LIMIT 1",
        [path],
    ).fetchone()  # type: ignore[misc]
    assert epoch_ms == ms(2026, 5, 6, 7, 8, 9) + 123
    assert typ == "TIMESTAMP WITH TIME ZONE"


def test_hashing_file_passes_bytes_through_unchanged(tmp_path: Path) -> None:
    """pyarrow writes the same bytes into a `HashingFile` as into a plain file, and the
    digest is of exactly those bytes."""
    table = events_table([ms(2026, 1, 1)] * 50)
    options = lake.parquet_options(table.column_names)
    plain = tmp_path / "plain.parquet"
    pq.write_table(table, plain, **options)
    buf = io.BytesIO()
    sink = lake.HashingFile(buf)
    with pq.ParquetWriter(sink, table.schema, **options) as writer:
        writer.write_table(table)
    data = plain.read_bytes()
    assert buf.getvalue() == data
    assert sink.written() == lake.Written(len(data), hashlib.sha256(data).hexdigest())
    assert lake.HashingFile(io.BytesIO()).written().sha256 == hashlib.sha256().hexdigest()


def test_write_parquet_atomic_never_ns(tmp_path: Path) -> None:
    ns_table = pa.table({"ts": pa.array([1_000_000], pa.timestamp("ns", tz="UTC"))})
    ok = tmp_path / "ok.parquet"
    lake.write_parquet_atomic(ns_table, ok)
    assert pq.read_table(ok).schema.field("ts").type == pa.timestamp("ms", tz="UTC")

    lossy = pa.table({"ts": pa.array([1_000_001], pa.timestamp("ns", tz="UTC"))})
    bad = tmp_path / "bad.parquet"
    with pytest.raises(pa.ArrowInvalid):
        lake.write_parquet_atomic(lossy, bad)
    assert list(tmp_path.iterdir()) == [ok]  # neither the file nor its temp


def test_write_parquet_atomic_replaces(tmp_path: Path) -> None:
    final = tmp_path / "a" / "b" / "x.parquet"
    final.parent.mkdir(parents=True)
    stale = final.with_name(lake.temp_name(final.name, "999-dead"))
    stale.write_bytes(b"partial garbage from a crash")
    lake.write_parquet_atomic(events_table([ms(2026, 1, 1)]), final)
    lake.write_parquet_atomic(events_table([ms(2026, 1, 1)] * 3), final)
    assert pq.read_table(final).num_rows == 3
    # another writer's temp is never touched here (clear_orphans removes stale ones)
    assert sorted(p.name for p in final.parent.iterdir()) == [stale.name, "x.parquet"]


def test_write_bytes_atomic(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "s.json"
    lake.write_bytes_atomic(b"{}", target)
    lake.write_bytes_atomic(b"[1]", target)
    assert target.read_bytes() == b"[1]"
    assert os.listdir(target.parent) == ["s.json"]


# --- I/O: intents and orphans --------------------------------------------------------------


def _write_flush(root: Path, topic: str, partition: int, start: int, end: int) -> list[str]:
    """A flush's file writes: one events file per hour, one DLQ file, after the intent."""
    name = lake.data_file_name(topic, partition, start, end)
    rels = [
        lake.events_rel_path("2026-01-01", 0, name),
        lake.events_rel_path("2026-01-01", 1, name),
        lake.dlq_rel_path("2026-01-01", name),
    ]
    lake.write_intent(root, topic, partition, start, end, rels)
    for rel in rels[:2]:
        lake.write_parquet_atomic(events_table([ms(2026, 1, 1)]), lake.abs_path(root, rel))
    return rels


def test_intent_round_trip(tmp_path: Path) -> None:
    rels = _write_flush(tmp_path, "a.b-c", 2, 10, 20)
    intent = lake.read_intent(tmp_path, "a.b-c", 2)
    assert intent == lake.Intent("a.b-c", 2, 10, 20, tuple(rels))
    assert lake.Intent.from_json(intent.to_json()) == intent
    assert lake.read_intent(tmp_path, "a.b-c", 3) is None


def test_intent_rejects_foreign_files(tmp_path: Path) -> None:
    other = lake.events_rel_path("2026-01-01", 0, lake.data_file_name("t", 0, 0, 5))
    with pytest.raises(ValueError, match="foreign"):
        lake.write_intent(tmp_path, "t", 0, 5, 10, [other])
    with pytest.raises(ValueError):
        lake.write_intent(tmp_path, "t", 0, 5, 10, ["../../etc/passwd"])
    assert not lake.intent_path(tmp_path, "t", 0).exists()


def test_clear_orphans_removes_uncovered_flush(tmp_path: Path) -> None:
    covered_file = lake.abs_path(
        tmp_path, lake.events_rel_path("2026-01-01", 0, lake.data_file_name("t", 0, 0, 10))
    )
    lake.write_parquet_atomic(events_table([ms(2026, 1, 1)]), covered_file)
    rels = _write_flush(tmp_path, "t", 0, 10, 20)
    # a crash mid-write leaves a temp file beside a final one
    crashed = lake.abs_path(tmp_path, rels[2])
    crashed.parent.mkdir(parents=True, exist_ok=True)
    for token in ("1-a", "2-b"):  # two writers' temps
        crashed.with_name(lake.temp_name(crashed.name, token)).write_bytes(b"partial")

    removed = lake.clear_orphans(tmp_path, "t", 0, covered=lambda off: off < 10)

    assert sorted(removed) == sorted(
        [
            rels[0],
            rels[1],
            f"dlq/date=2026-01-01/{lake.temp_name(crashed.name, '1-a')}",
            f"dlq/date=2026-01-01/{lake.temp_name(crashed.name, '2-b')}",
        ]
    )
    assert covered_file.exists()
    for rel in rels:
        final = lake.abs_path(tmp_path, rel)
        assert not final.exists()
        assert not [n for n in os.listdir(final.parent) if lake.is_temp_for(n, final.name)]
    assert lake.read_intent(tmp_path, "t", 0) is None
    assert lake.clear_orphans(tmp_path, "t", 0, covered=lambda off: False) == []


def test_clear_orphans_keeps_covered_flush(tmp_path: Path) -> None:
    rels = _write_flush(tmp_path, "t", 0, 10, 20)
    assert lake.clear_orphans(tmp_path, "t", 0, covered=lambda off: 0 <= off < 20) == []
    assert lake.abs_path(tmp_path, rels[0]).exists()
    assert lake.abs_path(tmp_path, rels[1]).exists()
    assert lake.read_intent(tmp_path, "t", 0) is None


def test_clear_orphans_detects_zombie_race(tmp_path: Path) -> None:
    rels = _write_flush(tmp_path, "t", 0, 10, 20)
    answers = iter([False, True])  # the zombie's entry appears during the removal
    with pytest.raises(lake.OrphanRace) as info:
        lake.clear_orphans(tmp_path, "t", 0, covered=lambda off: next(answers))
    assert sorted(info.value.removed) == sorted(rels[:2])
    assert lake.read_intent(tmp_path, "t", 0) is not None  # kept for the operator


def test_clear_orphans_rejects_misplaced_intent(tmp_path: Path) -> None:
    _write_flush(tmp_path, "t", 0, 10, 20)
    wrong = lake.intent_path(tmp_path, "t", 1)
    wrong.parent.mkdir(parents=True, exist_ok=True)
    wrong.write_bytes(lake.intent_path(tmp_path, "t", 0).read_bytes())
    with pytest.raises(lake.IntentCorrupt):
        lake.clear_orphans(tmp_path, "t", 1, covered=lambda off: False)
    wrong.write_bytes(b"{not json")
    with pytest.raises(lake.IntentCorrupt):
        lake.read_intent(tmp_path, "t", 1)


def test_temp_final_name_inverts_temp_name() -> None:
    from meter.lake import new_token, temp_final_name, temp_name

    assert temp_final_name(temp_name("partition=3.json", "123-abc")) == "partition=3.json"
    assert temp_final_name(temp_name("t.0.00-10.parquet", new_token())) == "t.0.00-10.parquet"
    for name in ("partition=3.json", ".partition=3.json", ".x.tmp", "..tmp", ".a.b c.tmp", "a.b.tmp"):
        assert temp_final_name(name) is None, name


def test_clear_temps_removes_ours_at_any_age_and_others_when_old(tmp_path: Path) -> None:
    import time

    from meter.lake import STALE_TEMP_S, clear_temps

    d = tmp_path / "manifest"
    d.mkdir()
    now = time.time()
    old = now - STALE_TEMP_S - 1
    names = {
        ".00000000000000000007.json.c3.tmp": now - 5,  # ours, fresh: goes
        ".00000000000000000000.json.a1.tmp": old,  # ours, old: goes
        ".compaction-00000000000000000001.json.b2.tmp": old,  # another write's, old: goes
        ".compaction-00000000000000000002.json.d4.tmp": now - 5,  # another write's, fresh: stays
        "00000000000000000000.json": old,  # an entry: stays
        "notes.tmp": old,  # not a temp name: stays
    }
    for name, mtime in names.items():
        (d / name).write_bytes(b"{}")
        os.utime(d / name, (mtime, mtime))
    removed = clear_temps([d, tmp_path / "missing"], lambda final: final[0].isdigit(), now)
    assert sorted(p.name for p in removed) == [
        ".00000000000000000000.json.a1.tmp",
        ".00000000000000000007.json.c3.tmp",
        ".compaction-00000000000000000001.json.b2.tmp",
    ]
    assert sorted(os.listdir(d)) == [
        ".compaction-00000000000000000002.json.d4.tmp",
        "00000000000000000000.json",
        "notes.tmp",
    ]
