"""meter.compact and the manifest's compaction records: the plan, the record format, and
the atomic swap under crashes (SIGKILL at each step, exceptions at each step), a daemon
appending meanwhile, and queries running across it."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meter import lake
from meter.cli import main
from meter.compact import (
    CompactBusy,
    CompactPolicy,
    compact,
    is_closed,
    lake_lock,
    plan,
)
from meter.manifest import (
    CompactionRecord,
    FileRecord,
    ManifestCorrupt,
    Replacement,
    RewriteConflict,
    append_rewrite,
    apply_rewrites,
    listed_files,
    listed_records,
    load_files,
    load_partition,
    load_rewrites,
    retired_files,
    rewrite_path,
    totals,
)
from meter.query import open_lake, query
from meter.schema import DLQ, LAKE_EVENTS, TOKEN_COLUMNS
from meter.stages import Flush, write_flush

TOPIC = "usage.v1"
DAY = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
T0 = int(DAY.timestamp() * 1000)
HOUR = 3_600_000
#: Long after every directory of the test lakes closed.
LATER = T0 + 10 * 24 * HOUR
#: Everything in one file per directory and partition.
BIG = CompactPolicy(target_bytes=64 << 20, delete_grace_s=0, max_groups_per_record=2)


# --- lakes written the daemon's way (stages.write_flush) ------------------------------------


def flush_tables(partition: int, start: int, n: int, hours: int) -> tuple[pa.Table, pa.Table]:
    """Offsets [start, start + n): every 7th a DLQ row, the others one event each, spread
    over ``hours`` event-time hours from T0; DLQ arrivals over two days."""
    events: dict[str, list[Any]] = {f.name: [] for f in LAKE_EVENTS}
    dlq: dict[str, list[Any]] = {f.name: [] for f in DLQ}
    for off in range(start, start + n):
        if off % 7 == 3:
            for k, v in dict(
                raw=b'{"bad' + str(off).encode(), kafka_topic=TOPIC, kafka_partition=partition,
                kafka_offset=off, line=0, reason="invalid_json" if off % 2 else "wrong_type",
                detail="d", arrival_ts=T0 + (off % 2) * 24 * HOUR + off,
            ).items():  # fmt: skip
                dlq[k].append(v)
            continue
        row: dict[str, Any] = {f.name: None for f in LAKE_EVENTS}
        row.update(
            event_id=f"p{partition}-{off}", ts=T0 + (off * 7919 % hours) * HOUR + off % 3_600_000,
            user=f"u{off % 5}", team=f"t{off % 3}", model="gpt-5" if off % 4 else "mystery",
            cost_usd=None if off % 4 == 0 else Decimal(off) / Decimal(10**12) + Decimal("0.5"),
            price_version=None if off % 4 == 0 else "gpt-5@2025-08-07",
            kafka_topic=TOPIC, kafka_partition=partition, kafka_offset=off,
        )  # fmt: skip
        row.update({k: (off * (i + 3)) % 1000 for i, k in enumerate(TOKEN_COLUMNS)})
        row["reasoning_tokens"] = min(row["reasoning_tokens"], row["output_tokens"])
        for k, v in row.items():
            events[k].append(v)
    return pa.table(events, schema=LAKE_EVENTS), pa.table(dlq, schema=DLQ)


def add_flush(root: Path, partition: int, n: int, hours: int = 3) -> int:
    """Append one flush of ``n`` messages at the partition's chain end; return the new end."""
    after = load_partition(root, TOPIC, partition).position
    start = after or 0
    events, dlq = flush_tables(partition, start, n, hours)
    f = Flush(TOPIC, partition, start, after, start + n, 0, n, events, dlq)
    write_flush(os.fspath(root), f, "test/1")
    return start + n


def build(root: Path, partitions: int = 2, flushes: int = 8, n: int = 20) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(flushes):
        for p in range(partitions):
            add_flush(root, p, n)
    return root


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("template") / "lake")


@pytest.fixture
def root(template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "lake"))


ALL_ROWS = (
    "SELECT * FROM events ORDER BY kafka_partition, kafka_offset",
    "SELECT * FROM dlq ORDER BY kafka_partition, kafka_offset",
)


def snapshot(root: Path) -> tuple[Any, ...]:
    """Everything a reader can tell: manifest totals (less file counts), every row."""
    t = totals(root)
    sums = (t.entries, t.messages, t.accepted, t.rejected, t.rejects_by_reason, t.tokens,
            t.cost_usd, t.unpriced)  # fmt: skip
    with open_lake(root) as con:
        return (sums, *(con.sql(sql).to_arrow_table() for sql in ALL_ROWS))


def parquet_on_disk(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for kind in ("events", "dlq")
        for p in (root / kind).rglob("*")
        if p.is_file()
    }


def check_consistent(root: Path, expected: tuple[Any, ...]) -> None:
    """Same rows and sums as ``expected``; every listed file exists and has its record's
    size and sha256."""
    got = snapshot(root)
    assert got[0] == expected[0]
    for a, b in zip(got[1:], expected[1:], strict=True):
        assert a.equals(b)
    disk = parquet_on_disk(root)
    for rec in listed_records(root):
        assert rec.path in disk
        data = lake.abs_path(root, rec.path).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (rec.bytes, rec.sha256)


# --- pure: closed directories and the plan --------------------------------------------------


def rec(date: str, hour: int | None, start: int, end: int, size: int, *, partition: int = 0) -> FileRecord:
    name = lake.data_file_name(TOPIC, partition, start, end)
    if hour is None:
        return FileRecord(lake.dlq_rel_path(date, name), "dlq", end - start, size, None)
    return FileRecord(lake.events_rel_path(date, hour, name), "events", end - start, size, None)


def test_is_closed() -> None:
    p = lake.parse_rel_path(rec("2026-01-01", 5, 0, 1, 1).path)
    end = T0 + 6 * HOUR
    assert is_closed(p, end, 0)
    assert not is_closed(p, end - 1, 0)
    assert is_closed(p, end + 2 * HOUR, 2 * HOUR)
    assert not is_closed(p, end + 2 * HOUR - 1, 2 * HOUR)
    d = lake.parse_rel_path(rec("2026-01-01", None, 0, 1, 1).path)
    assert is_closed(d, T0 + 24 * HOUR, 0)
    assert not is_closed(d, T0 + 24 * HOUR - 1, 0)


def test_plan_runs_cut_by_target_and_big_files() -> None:
    policy = CompactPolicy(target_bytes=100, grace_s=0)
    files = [
        rec("2026-01-01", 0, 0, 10, 40),
        rec("2026-01-01", 0, 10, 20, 40),
        rec("2026-01-01", 0, 20, 30, 40),  # would take the run past 100: starts the next
        rec("2026-01-01", 0, 30, 40, 10),
        rec("2026-01-01", 0, 40, 50, 100),  # at the target: left alone, ends the run
        rec("2026-01-01", 0, 50, 60, 10),  # alone after it: not merged
        rec("2026-01-01", 1, 5, 6, 1),  # another hour, alone
        rec("2026-01-01", None, 0, 3, 5),
        rec("2026-01-01", None, 3, 9, 5),
    ]
    groups = plan(list(reversed(files)), now_ms=LATER, policy=policy)
    assert [[f.path for f in g.files] for g in groups] == [
        [files[7].path, files[8].path],
        [files[0].path, files[1].path],
        [files[2].path, files[3].path],
    ]
    assert groups[1].output == lake.events_rel_path("2026-01-01", 0, lake.data_file_name(TOPIC, 0, 0, 20))
    assert groups[0].output == lake.dlq_rel_path("2026-01-01", lake.data_file_name(TOPIC, 0, 0, 9))
    assert (groups[2].rows, groups[2].bytes) == (20, 50)


def test_plan_skips_open_directories() -> None:
    files = [rec("2026-01-01", 23, 0, 1, 1), rec("2026-01-01", 23, 1, 2, 1)]
    policy = CompactPolicy(grace_s=7200)
    end = T0 + 24 * HOUR
    assert plan(files, now_ms=end + 7200_000 - 1, policy=policy) == []
    assert len(plan(files, now_ms=end + 7200_000, policy=policy)) == 1


@pytest.mark.parametrize(
    "over",
    [
        {"target_bytes": 0},
        {"target_bytes": 1.5},
        {"grace_s": -1},
        {"delete_grace_s": float("inf")},
        {"max_groups_per_record": 0},
    ],
)
def test_policy_validates(over: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        CompactPolicy(**over)


# --- pure: the record format --------------------------------------------------------------------


def replacement(start: int = 0, mid: int = 10, end: int = 25, hour: int = 0) -> Replacement:
    a, b = rec("2026-01-01", hour, start, mid, 7), rec("2026-01-01", hour, mid, end, 9)
    return Replacement((a, b), rec("2026-01-01", hour, start, end, 12))


def test_record_round_trip() -> None:
    r = CompactionRecord(TOPIC, 0, 1, (replacement(), replacement(hour=1)), "h/1", 5)
    data = r.to_json()
    assert CompactionRecord.from_json(data) == r
    doc = json.loads(data)
    assert doc["v"] == 1 and doc["type"] == "compaction" and doc["seq"] == 1
    assert doc["groups"][0]["file"] == {
        "path": "events/date=2026-01-01/hour=00/usage.v1.0.00000000000000000000-00000000000000000025.parquet",
        "kind": "events",
        "rows": 25,
        "bytes": 12,
    }
    assert [f["rows"] for f in doc["groups"][0]["replaces"]] == [10, 15]


@pytest.mark.parametrize(
    ("build_it", "match"),
    [
        (lambda: Replacement((rec("2026-01-01", 0, 0, 5, 1),), rec("2026-01-01", 0, 0, 5, 1)), "two"),
        (lambda: Replacement((rec("2026-01-01", 0, 0, 5, 1), rec("2026-01-01", 1, 5, 9, 1)),
                             rec("2026-01-01", 0, 0, 9, 1)), "directory"),
        (lambda: Replacement((rec("2026-01-01", 0, 0, 5, 1), rec("2026-01-01", 0, 4, 9, 1)),
                             rec("2026-01-01", 0, 0, 9, 1)), "overlap"),
        (lambda: Replacement((rec("2026-01-01", 0, 0, 5, 1), rec("2026-01-01", 0, 5, 9, 1)),
                             rec("2026-01-01", 0, 0, 10, 1)), "named"),
        (lambda: Replacement((rec("2026-01-01", 0, 0, 5, 1), rec("2026-01-01", 0, 5, 9, 1)),
                             FileRecord(rec("2026-01-01", 0, 0, 9, 1).path, "events", 8, 1, None)), "rows"),
        (lambda: Replacement((rec("2026-01-01", 0, 0, 5, 1), rec("2026-01-01", 0, 6, 9, 1, partition=1)),
                             rec("2026-01-01", 0, 0, 9, 1)), "partition"),
        (lambda: CompactionRecord(TOPIC, 0, 0, (replacement(),), "w", 1), "seq"),
        (lambda: CompactionRecord(TOPIC, 0, 1, (), "w", 1), "no replacement"),
        (lambda: CompactionRecord(TOPIC, 1, 1, (replacement(),), "w", 1), "another partition"),
        (lambda: CompactionRecord(TOPIC, 0, 1, (replacement(), replacement()), "w", 1), "two replacements"),
    ],
)  # fmt: skip
def test_record_validation(build_it: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_it()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(v=2),
        lambda d: d.update(type="entry"),
        lambda d: d.pop("groups"),
        lambda d: d.update(seq="1"),
        lambda d: d["groups"][0].update(file="x"),
        lambda d: d["groups"][0]["file"].update(rows=True),
    ],
)
def test_record_from_json_rejects_malformed(mutate: Any) -> None:
    doc = json.loads(CompactionRecord(TOPIC, 0, 1, (replacement(),), "w", 1).to_json())
    mutate(doc)
    with pytest.raises(ValueError):
        CompactionRecord.from_json(json.dumps(doc).encode())
    with pytest.raises(ValueError):
        CompactionRecord.from_json(b"{")


def test_apply_rewrites() -> None:
    r1 = replacement(0, 10, 25)
    entries_files = [*r1.replaces, rec("2026-01-01", 0, 25, 30, 3)]

    class E:  # what apply_rewrites reads of an entry
        files = tuple(entries_files)

    first = CompactionRecord(TOPIC, 0, 1, (r1,), "w", 100)
    live, retired = apply_rewrites([E()], [first])  # type: ignore[list-item]
    assert [f.path for f in live] == [entries_files[2].path, r1.file.path]
    assert retired == ((r1.replaces[0], 100), (r1.replaces[1], 100))
    # A record on top of the merged file: merges it again with the next one.
    r2 = Replacement((r1.file, entries_files[2]), rec("2026-01-01", 0, 0, 30, 20))
    second = CompactionRecord(TOPIC, 0, 2, (r2,), "w", 200)
    live, retired = apply_rewrites([E()], [first, second])  # type: ignore[list-item]
    assert [f.path for f in live] == [r2.file.path]
    assert [f.path for f, _ in retired] == [*(f.path for f in r1.replaces), *(f.path for f in r2.replaces)]
    with pytest.raises(ManifestCorrupt, match="not listed"):
        apply_rewrites([E()], [first, first])  # type: ignore[list-item]
    with pytest.raises(ManifestCorrupt, match="not listed"):
        apply_rewrites([], [first])
    # Replacing a file listed with other bytes is a corrupt record too.
    other = Replacement((r1.replaces[0], FileRecord(r1.replaces[1].path, "events", 15, 999, None)), r1.file)
    with pytest.raises(ManifestCorrupt, match="not listed"):
        apply_rewrites([E()], [CompactionRecord(TOPIC, 0, 1, (other,), "w", 1)])  # type: ignore[list-item]


def test_append_rewrite_fences_and_has_no_gaps(tmp_path: Path) -> None:
    r = CompactionRecord(TOPIC, 0, 1, (replacement(),), "w", 1)
    append_rewrite(tmp_path, r)
    assert rewrite_path(tmp_path, TOPIC, 0, 1).read_bytes() == r.to_json()
    with pytest.raises(RewriteConflict):
        append_rewrite(tmp_path, r)
    with pytest.raises(ValueError, match="record 2 does not exist"):
        append_rewrite(tmp_path, CompactionRecord(TOPIC, 0, 3, (replacement(),), "w", 1))
    assert load_rewrites(tmp_path, TOPIC, 0) == (r,)
    assert [n for n in os.listdir(rewrite_path(tmp_path, TOPIC, 0, 1).parent)] == [
        "compaction-00000000000000000001.json"
    ]  # no temp left behind
    # The daemon's chain ignores records.
    assert load_partition(tmp_path, TOPIC, 0).entries == ()
    # A gap (a lost record) is corruption.
    shutil.copy(rewrite_path(tmp_path, TOPIC, 0, 1), rewrite_path(tmp_path, TOPIC, 0, 3))
    with pytest.raises(ManifestCorrupt, match="record 2 is missing"):
        load_rewrites(tmp_path, TOPIC, 0)
    rewrite_path(tmp_path, TOPIC, 0, 3).write_bytes(b"{}")
    rewrite_path(tmp_path, TOPIC, 0, 2).write_bytes(r.to_json())
    with pytest.raises(ManifestCorrupt, match=r"compaction-00000000000000000002\.json holds"):
        load_rewrites(tmp_path, TOPIC, 0)


# --- the lake ----------------------------------------------------------------------------------


def test_compact_merges_and_keeps_every_row(root: Path) -> None:
    before = snapshot(root)
    files_before = len(listed_records(root))
    report = compact(root, BIG, now_ms=LATER)
    after = listed_records(root)
    # One file per directory and partition: 3 event hours and 2 DLQ days, 2 partitions.
    assert len(after) == 2 * (3 + 2)
    assert report.files_written == len(after)
    assert report.files_replaced == files_before
    assert report.records == 2 * 3  # 5 merges per partition, at most 2 per record
    assert report.retired_deleted == files_before  # delete_grace 0: all gone already
    assert report.errors == []
    check_consistent(root, before)
    assert parquet_on_disk(root) == {f.path for f in after}  # nothing else left
    t = totals(root)
    assert (t.files, t.bytes) == (len(after), sum(f.bytes for f in after))
    # A second run has nothing to do.
    again = compact(root, BIG, now_ms=LATER)
    assert (again.groups, again.records, again.retired_deleted) == (0, 0, 0)
    # Nothing of a run is left in _meter/compact but the lock and the deletion marks.
    state = sorted(p.name for p in (root / "_meter" / "compact").rglob("*") if p.is_file())
    assert state == ["deleted.json", "deleted.json", "lock"]


def test_merged_files_are_written_like_the_daemons(root: Path) -> None:
    """`meter.lake.parquet_options`: zstd, dictionaries only on the columns whose values repeat."""
    compact(root, BIG, now_ms=LATER)
    for f in listed_records(root):
        meta = pq.ParquetFile(lake.abs_path(root, f.path)).metadata.row_group(0)
        for i in range(meta.num_columns):
            column = meta.column(i)
            assert column.compression == "ZSTD", column.path_in_schema
            dictionary = "RLE_DICTIONARY" in column.encodings
            assert dictionary == (column.path_in_schema in lake.DICTIONARY_COLUMNS), column.path_in_schema


def test_partition_columns_after_compaction(root: Path) -> None:
    sql = "SELECT date, hour, count(*) AS n, bool_and(hour(ts) = hour AND ts::DATE = date) AS ok " \
          "FROM events GROUP BY ALL ORDER BY ALL"  # fmt: skip
    before = query(root, sql)
    compact(root, BIG, now_ms=LATER)
    assert query(root, sql).equals(before)
    assert all(r["ok"] for r in before.to_pylist())


def test_target_size_splits_runs(root: Path) -> None:
    sizes = sorted(f.bytes for f in listed_records(root, "events"))
    policy = CompactPolicy(target_bytes=sizes[len(sizes) // 2] * 3, delete_grace_s=0)
    before = snapshot(root)
    compact(root, policy, now_ms=LATER)
    check_consistent(root, before)
    merged = [f for f in listed_records(root) if f.path not in listed_files(root, "dlq")]
    assert len(merged) > 2 * 3  # more than one file per hour and partition


def test_only_closed_directories(root: Path) -> None:
    # At 02:00 + 2 h grace + 1 ms, hours 00 and 01 are closed, hour 02 and the DLQ days are not.
    now = T0 + 4 * HOUR
    compact(root, BIG, now_ms=now)
    dirs = {lake.parse_rel_path(f.path).hour for c in load_files(root, TOPIC, 0).rewrites
            for _, f in c.swaps}  # fmt: skip
    assert dirs == {0, 1}


def test_retired_files_kept_for_the_grace_and_old_readers(root: Path) -> None:
    before = snapshot(root)
    con = open_lake(root)  # a query that listed the files before the compaction
    try:
        compact(root, CompactPolicy(delete_grace_s=900), now_ms=LATER)
        retired = retired_files(root)
        assert retired and all(lake.abs_path(root, p).exists() for p in retired)
        old_rows = con.sql(ALL_ROWS[0]).to_arrow_table()
        assert old_rows.equals(before[1])
    finally:
        con.close()
    check_consistent(root, before)
    assert compact(root, CompactPolicy(delete_grace_s=900), now_ms=LATER + 890_000).retired_deleted == 0
    report = compact(
        root, CompactPolicy(delete_grace_s=900), now_ms=LATER + 910_000
    )  # records are stamped a little after LATER
    assert report.retired_deleted == len(retired)
    assert not any(lake.abs_path(root, p).exists() for p in retired)
    check_consistent(root, before)


def test_late_events_are_merged_into_compacted_files(root: Path) -> None:
    compact(root, BIG, now_ms=LATER)
    add_flush(root, 0, 9, hours=1)  # late events: all in hour 00, long closed
    before = snapshot(root)
    report = compact(root, BIG, now_ms=LATER)
    assert report.groups == 2  # hour 00 of partition 0, and a DLQ day
    check_consistent(root, before)
    hour0 = [f for f in load_files(root, TOPIC, 0).live if "/hour=00/" in f.path]
    assert len(hour0) == 1


def test_dry_run_changes_nothing(root: Path) -> None:
    def tree() -> list[tuple[str, int]]:
        return sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*"))

    before = tree()
    report = compact(root, BIG, now_ms=LATER, dry_run=True)
    assert report.groups == 10 and report.records == 0
    assert tree() == before


def test_second_compaction_is_refused(root: Path) -> None:
    with lake_lock(root), pytest.raises(CompactBusy, match="another compaction"):
        compact(root, BIG, now_ms=LATER)


def test_record_conflict_leaves_the_listing(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record whose seq another compaction took: the run fails, the listing is untouched,
    and the next run cleans up the orphaned merged files."""
    before = snapshot(root)
    files_before = sorted(listed_files(root, "events"))
    real = append_rewrite

    def racing(lake_path: Any, record: CompactionRecord) -> Any:
        raise RewriteConflict(record.topic, record.partition, record.seq)

    monkeypatch.setattr("meter.compact.append_rewrite", racing)
    with pytest.raises(RewriteConflict):
        compact(root, BIG, now_ms=LATER)
    assert sorted(listed_files(root, "events")) == files_before
    check_consistent(root, before)
    monkeypatch.setattr("meter.compact.append_rewrite", real)
    report = compact(root, BIG, now_ms=LATER)
    assert report.orphans_removed > 0
    check_consistent(root, before)
    assert parquet_on_disk(root) == {f.path for f in listed_records(root)}


def test_corrupt_input_is_skipped_not_committed(root: Path) -> None:
    before = snapshot(root)
    victim = listed_records(root, "events")[0]
    path = lake.abs_path(root, victim.path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated: unreadable
    report = compact(root, BIG, now_ms=LATER)
    assert len(report.errors) == 1
    assert victim.path in listed_files(root, "events")  # its group was not committed
    path.write_bytes(data)
    check_consistent(root, before)
    assert compact(root, BIG, now_ms=LATER).errors == []
    check_consistent(root, before)


# --- crashes ----------------------------------------------------------------------------------

KILL_SCRIPT = """
import os, signal, sys
from meter.compact import CompactPolicy, compact
root, step, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
seen = 0
def checkpoint(name):
    global seen
    if name == step:
        seen += 1
        if seen == nth:
            os.kill(os.getpid(), signal.SIGKILL)
compact(root, CompactPolicy(target_bytes=64 << 20, delete_grace_s=0, max_groups_per_record=2),
        now_ms=int(sys.argv[4]), checkpoint=checkpoint)
"""


def kill_at(root: Path, step: str, nth: int) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, os.fspath(root), step, str(nth), str(LATER)],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.decode()
    return proc.returncode


@pytest.fixture(scope="module")
def reference(template: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, set[tuple[str, int]]]:
    """The rows of the template lake, and its listing after an uninterrupted compaction."""
    root = Path(shutil.copytree(template, tmp_path_factory.mktemp("ref") / "lake"))
    expected = snapshot(root)
    compact(root, BIG, now_ms=LATER)
    return expected, {(f.path, f.rows) for f in listed_records(root)}


@pytest.mark.parametrize(
    ("step", "nth"),
    [("intent", 1), ("merging", 1), ("output", 2), ("record", 1), ("committed", 1), ("record", 3),
     ("deleting", 7), ("deleted", 1)],
)  # fmt: skip
def test_sigkill_at_each_step(
    root: Path, reference: tuple[Any, set[tuple[str, int]]], step: str, nth: int
) -> None:
    """kill -9 at a step: the lake reads exactly as before; a plain re-run converges to
    the uninterrupted result with no file left over."""
    expected, final_listing = reference
    assert kill_at(root, step, nth) == -signal.SIGKILL  # the step was reached
    check_consistent(root, expected)
    # A crash in the middle of a run's recovery is recovered from too.
    if step in ("merging", "output"):
        assert kill_at(root, "recovered", 1) == -signal.SIGKILL
        check_consistent(root, expected)
    compact(root, BIG, now_ms=LATER + 60_000)  # the killed run stamped its records after LATER
    check_consistent(root, expected)
    assert {(f.path, f.rows) for f in listed_records(root)} == final_listing
    assert parquet_on_disk(root) == {p for p, _ in final_listing}
    assert not list((root / "_meter" / "compact").rglob("intent.json"))


STEPS = ("recovered", "intent", "merging", "output", "record", "committed", "deleting", "deleted")


class Crash(Exception):
    pass


def test_exception_at_each_step(root: Path, reference: tuple[Any, set[tuple[str, int]]]) -> None:
    """An exception at the first call of each checkpoint a run reaches, and at its last
    call: same guarantees as a kill."""
    expected, final_listing = reference
    pristine = root.parent / "pristine"
    shutil.copytree(root, pristine)
    calls: list[str] = []
    compact(pristine, BIG, now_ms=LATER, checkpoint=calls.append)
    assert set(calls) == set(STEPS) - {"recovered"}
    points = sorted({calls.index(s) + 1 for s in set(calls)} | {len(calls)})
    for n in points:
        work = root.parent / f"crash-{n}"
        shutil.copytree(root, work)
        count = 0

        def crash_at(step: str, n: int = n) -> None:
            nonlocal count
            count += 1
            if count == n:
                raise Crash(step)

        with pytest.raises(Crash):
            compact(work, BIG, now_ms=LATER, checkpoint=crash_at)
        check_consistent(work, expected)
        compact(work, BIG, now_ms=LATER + 60_000)
        check_consistent(work, expected)
        assert {(f.path, f.rows) for f in listed_records(work)} == final_listing, calls[n - 1]
        assert parquet_on_disk(work) == {p for p, _ in final_listing}
        shutil.rmtree(work)


# --- against a running daemon and running queries ------------------------------------------------


def test_concurrent_daemon_and_readers(tmp_path: Path) -> None:
    """A writer appends flushes (the daemon's write path, late events into closed hours
    included) and readers query, while compaction runs again and again. Every reader sees
    each offset exactly once, over a prefix of each partition's offsets."""
    root = build(tmp_path / "lake", partitions=2, flushes=4, n=15)
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = 0

    def writer() -> None:
        try:
            for i in range(40):
                add_flush(root, i % 2, 11, hours=3)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            stop.set()

    sql = (
        "SELECT kafka_partition AS p, count(*) AS n, count(DISTINCT kafka_offset) AS d, "
        "min(kafka_offset) AS lo, max(kafka_offset) AS hi FROM (SELECT kafka_partition, "
        "kafka_offset FROM events UNION ALL SELECT kafka_partition, kafka_offset FROM dlq) GROUP BY 1"
    )

    def reader() -> None:
        nonlocal reads
        try:
            while not stop.is_set():
                for row in query(root, sql).to_pylist():
                    assert row["n"] == row["d"] == row["hi"] + 1 and row["lo"] == 0, row
                reads += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    runs = deleted = 0
    # Replaced files go 0.5 s after their record: longer than any query here takes.
    policy = CompactPolicy(target_bytes=64 << 20, delete_grace_s=0.5, max_groups_per_record=1)
    started = time.monotonic()
    while not stop.is_set() or runs < 3:
        now = LATER + int((time.monotonic() - started) * 1000)
        deleted += compact(root, policy, now_ms=now).retired_deleted
        runs += 1
    for t in threads:
        t.join()
    assert not errors, errors
    assert reads > 0 and deleted > 0
    compact(root, BIG, now_ms=LATER + 10**9)
    expected_rows = {p: load_partition(root, TOPIC, p).position for p in (0, 1)}
    for row in query(root, sql).to_pylist():
        assert row["n"] == row["d"] == expected_rows[row["p"]]
    assert parquet_on_disk(root) == {f.path for f in listed_records(root)}


# --- the command line ---------------------------------------------------------------------------


def test_cli_compact(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(root)
    code = main(["compact", "--lake", str(root), "--dry-run", "--json"])
    out, _ = capsys.readouterr()
    assert code == 0 and orjson.loads(out)["groups"] == 10 and orjson.loads(out)["dry_run"] is True
    code = main(["compact", "--lake", str(root), "--grace-hours", "0", "--delete-after-minutes", "0",
                 "--target-mb", "64", "--json"])  # fmt: skip
    out, _ = capsys.readouterr()
    doc = orjson.loads(out)
    assert code == 0 and doc["groups"] == 10 and doc["retired_deleted"] == doc["files_replaced"]
    check_consistent(root, before)
    code = main(["compact", "--lake", str(root)])
    out, _ = capsys.readouterr()
    assert code == 0 and "groups" in out


def test_cli_compact_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compact", "--lake", str(tmp_path / "nope")]) == 2
    assert "no lake directory" in capsys.readouterr().err
    assert main(["compact", "--lake", str(tmp_path), "--target-mb", "0"]) == 2
    assert "target" in capsys.readouterr().err
    for option in ("--delete-after-minutes", "--grace-hours"):
        with pytest.raises(SystemExit) as exit_info:
            main(["compact", "--lake", str(tmp_path), option, "-1"])
        assert exit_info.value.code == 2
        assert f"{option}: must be a finite number >= 0" in capsys.readouterr().err


# --- rollups over a compacted lake ------------------------------------------------------------


def test_rollups_equal_raw_totals_across_compaction_and_a_crash(root: Path) -> None:
    from meter.rollup import build_rollups

    sums = ", ".join(f"sum({c})::BIGINT AS {c}" for c in TOKEN_COLUMNS)
    raw_sql = f"SELECT count(*) AS events, {sums}, sum(cost_usd) AS cost FROM events"
    rollup_sql = f"SELECT sum(events)::BIGINT AS events, {sums}, sum(cost_usd) AS cost FROM rollup_{{}}"
    raw = query(root, raw_sql).to_pylist()

    def check() -> None:
        build_rollups(root)
        for grain in ("minute", "hour", "day"):
            assert query(root, rollup_sql.format(grain)).to_pylist() == raw, grain

    check()
    seen = 0

    def crash_at_third_output(step: str) -> None:  # after record 1, before record 2
        nonlocal seen
        seen += step == "output"
        if seen == 3:
            raise Crash(step)

    with pytest.raises(Crash):
        compact(root, BIG, now_ms=LATER, checkpoint=crash_at_third_output)
    assert len(load_files(root, TOPIC, 0).rewrites) == 1
    check()
    compact(root, BIG, now_ms=LATER)
    check()
    assert query(root, raw_sql).to_pylist() == raw
