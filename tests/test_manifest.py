"""meter.manifest: entries, the fenced append, the chain check, sums."""

from __future__ import annotations

import dataclasses
import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import pytest

from meter import lake
from meter.manifest import (
    CatalogRef,
    CompactionRecord,
    FileRecord,
    ManifestConflict,
    ManifestCorrupt,
    ManifestEntry,
    Replacement,
    Restatement,
    RestatementRecord,
    append_entry,
    apply_rewrites,
    entry_path,
    event_totals,
    format_cost,
    list_partitions,
    listed_files,
    load_partition,
    origin_path,
    parse_rewrite,
    partition_dir,
    reject_counts,
    totals,
)
from meter.schema import COST_TYPE, DLQ, LAKE_EVENTS, TOKEN_COLUMNS


def ms(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> int:
    return int(dt.datetime(y, mo, d, h, mi, s, tzinfo=dt.UTC).timestamp() * 1000)


def events_table(ts_ms: list[int]) -> pa.Table:
    """LAKE_EVENTS rows at ``ts_ms``; row i has i of every token kind and costs 1e-12."""
    n = len(ts_ms)
    cols: dict[str, list[Any]] = {f.name: [None] * n for f in LAKE_EVENTS}
    cols.update(event_id=[f"e{i}" for i in range(n)], ts=ts_ms, user=["u"] * n, model=["m"] * n)
    cols.update({k: list(range(n)) for k in TOKEN_COLUMNS})
    cols.update(cost_usd=[Decimal("0.000000000001")] * n, price_version=["m@1"] * n)
    cols.update(kafka_topic=["usage.v1"] * n, kafka_partition=[0] * n, kafka_offset=list(range(n)))
    return pa.table(cols, schema=LAKE_EVENTS)


def dlq_table(arrival_ms: list[int]) -> pa.Table:
    n = len(arrival_ms)
    cols: dict[str, list[Any]] = {
        "raw": [b"{"] * n, "kafka_topic": ["usage.v1"] * n, "kafka_partition": [0] * n,
        "kafka_offset": list(range(n)), "line": [0] * n, "reason": ["invalid_json"] * n,
        "detail": ["d"] * n, "arrival_ts": arrival_ms,
    }  # fmt: skip
    return pa.table(cols, schema=DLQ)


def make_entry(
    start: int = 0,
    end: int = 10,
    *,
    topic: str = "usage.v1",
    partition: int = 0,
    events: int = 8,
    dlq: int = 2,
    cost: str = "1.5",
    sha256: str | None = None,
    **over: Any,
) -> ManifestEntry:
    name = lake.data_file_name(topic, partition, start, end)
    files: list[FileRecord] = []
    if events:
        files.append(FileRecord(lake.events_rel_path("2026-01-01", 0, name), "events", events, 100, sha256))
    if dlq:
        files.append(FileRecord(lake.dlq_rel_path("2026-01-01", name), "dlq", dlq, 50, sha256))
    fields: dict[str, Any] = {
        "topic": topic,
        "partition": partition,
        "start": start,
        "end": end,
        "messages": min(end - start, events + dlq),
        "accepted": events,
        "rejected": dlq,
        "rejects_by_reason": {"invalid_json": dlq} if dlq else {},
        "tokens": {k: 10 * i for i, k in enumerate(TOKEN_COLUMNS)},
        "cost_usd": cost,
        "unpriced": 0,
        "files": tuple(files),
        "writer": "host-a/123",
        "written_at_ms": 1_767_225_600_000,
    }
    fields.update(over)
    return ManifestEntry(**fields)


# --- pure ------------------------------------------------------------------------------


def test_paths() -> None:
    root = Path("/lake")
    assert partition_dir(root, "a.b", 3) == root / "_meter/manifest/topic=a.b/partition=3"
    assert entry_path(root, "a.b", 3, 42) == (
        root / "_meter/manifest/topic=a.b/partition=3/00000000000000000042.json"
    )
    assert origin_path(root, "a.b", 3) == root / "_meter/manifest/topic=a.b/partition=3/origin.json"
    for bad in (("a/b", 0, 0), ("t", -1, 0), ("t", 0, -1)):
        with pytest.raises(ValueError):
            entry_path(root, *bad)


def test_json_round_trip_and_determinism() -> None:
    entry = make_entry(rejects_by_reason={"wrong_type": 1, "invalid_json": 1})
    data = entry.to_json()
    assert ManifestEntry.from_json(data) == entry
    assert ManifestEntry.from_json(data).to_json() == data
    same = make_entry(rejects_by_reason={"invalid_json": 1, "wrong_type": 1})
    assert same.to_json() == data
    decoded = orjson.loads(data)
    assert list(decoded) == sorted(decoded)
    assert list(decoded["tokens"]) == sorted(TOKEN_COLUMNS)
    assert decoded["v"] == 1


def test_entry_bytes_are_stable() -> None:
    """Entries already in lakes (written before files had a sha256) load and write back
    byte for byte."""
    data = (
        b'{"accepted":8,"cost_usd":"1.5","end":10,"files":[{"bytes":100,"kind":"events","path":'
        b'"events/date=2026-01-01/hour=00/usage.v1.0.00000000000000000000-00000000000000000010.parquet",'
        b'"rows":8},{"bytes":50,"kind":"dlq","path":'
        b'"dlq/date=2026-01-01/usage.v1.0.00000000000000000000-00000000000000000010.parquet","rows":2}],'
        b'"messages":10,"partition":0,"rejected":2,"rejects_by_reason":{"invalid_json":1,"wrong_type":1},'
        b'"start":0,"tokens":{"cache_read_tokens":20,"cache_write_1h_tokens":40,"cache_write_tokens":30,'
        b'"input_tokens":0,"output_tokens":10,"reasoning_tokens":50},"topic":"usage.v1","unpriced":0,'
        b'"v":1,"writer":"host-a/123","written_at_ms":1767225600000}'
    )
    entry = make_entry(rejects_by_reason={"wrong_type": 1, "invalid_json": 1})
    assert entry.to_json() == data and ManifestEntry.from_json(data) == entry
    assert all(f.sha256 is None for f in entry.files)


def test_entry_bytes_with_sha256() -> None:
    """Files with a sha256: the key sits in each file's object, and nothing else changes."""
    digest = "0123456789abcdef" * 4
    data = (
        b'{"accepted":8,"cost_usd":"1.5","end":10,"files":[{"bytes":100,"kind":"events","path":'
        b'"events/date=2026-01-01/hour=00/usage.v1.0.00000000000000000000-00000000000000000010.parquet",'
        b'"rows":8,"sha256":"' + digest.encode() + b'"},{"bytes":50,"kind":"dlq","path":'
        b'"dlq/date=2026-01-01/usage.v1.0.00000000000000000000-00000000000000000010.parquet","rows":2,'
        b'"sha256":"' + digest.encode() + b'"}],'
        b'"messages":10,"partition":0,"rejected":2,"rejects_by_reason":{"invalid_json":1,"wrong_type":1},'
        b'"start":0,"tokens":{"cache_read_tokens":20,"cache_write_1h_tokens":40,"cache_write_tokens":30,'
        b'"input_tokens":0,"output_tokens":10,"reasoning_tokens":50},"topic":"usage.v1","unpriced":0,'
        b'"v":1,"writer":"host-a/123","written_at_ms":1767225600000}'
    )
    entry = make_entry(rejects_by_reason={"wrong_type": 1, "invalid_json": 1}, sha256=digest)
    assert entry.to_json() == data and ManifestEntry.from_json(data) == entry
    assert all(f.sha256 == digest for f in entry.files)


@pytest.mark.parametrize("digest", ["AB" * 32, "ab" * 31, "ab" * 33, "g" * 64, "", b"ab" * 32, 1])
def test_file_sha256_must_be_64_lowercase_hex(digest: Any) -> None:
    ev = make_entry().files[0]
    with pytest.raises(ValueError, match="sha256"):
        dataclasses.replace(ev, sha256=digest)


def test_tokens_default_to_zero() -> None:
    entry = make_entry(tokens={"input_tokens": 5})
    assert entry.tokens == {k: 5 if k == "input_tokens" else 0 for k in TOKEN_COLUMNS}


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"end": 0}, "start must be < end"),
        ({"messages": 0}, "messages"),
        ({"messages": 11}, "messages"),
        ({"accepted": 7, "files": ()}, "missing"),
        ({"rejects_by_reason": {"invalid_json": 1}}, "rejects_by_reason"),
        ({"tokens": {"prompt_tokens": 1}}, "unknown token"),
        ({"tokens": {"input_tokens": -1}}, "tokens"),
        ({"unpriced": 9}, "unpriced"),
        ({"partition": True}, "partition"),
        ({"written_at_ms": -1}, "written_at_ms"),
    ],
)
def test_entry_validation(over: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(make_entry(), **over)


@pytest.mark.parametrize("cost", ["1e-3", "-1", "1.", ".5", "NaN", "Infinity", "1,5", " 1", ""])
def test_entry_rejects_inexact_cost_strings(cost: str) -> None:
    with pytest.raises(ValueError, match="cost_usd"):
        make_entry(cost=cost)


def test_entry_files_must_match_counts_and_range() -> None:
    good = make_entry()
    ev, dl = good.files
    with pytest.raises(ValueError, match="files hold"):
        dataclasses.replace(good, files=(dataclasses.replace(ev, rows=7), dl))
    with pytest.raises(ValueError, match="listed twice"):
        dataclasses.replace(
            good, files=(dataclasses.replace(ev, rows=4), dataclasses.replace(ev, rows=4), dl)
        )
    other = lake.events_rel_path("2026-01-01", 0, lake.data_file_name("usage.v1", 0, 0, 11))
    with pytest.raises(ValueError, match="another range"):
        dataclasses.replace(good, files=(dataclasses.replace(ev, path=other), dl))
    with pytest.raises(ValueError, match="not a dlq file"):
        FileRecord(ev.path, "dlq", 1, 1, None)
    with pytest.raises(ValueError):
        FileRecord(ev.path, "flags", 1, 1, None)  # type: ignore[arg-type]
    # several hour files of one flush add up
    hour1 = dataclasses.replace(ev, path=ev.path.replace("hour=00", "hour=01"), rows=3)
    assert dataclasses.replace(good, files=(dataclasses.replace(ev, rows=5), hour1, dl))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("writer"),
        lambda d: d.update(v=2),
        lambda d: d.update(start="0"),
        lambda d: d.update(accepted=True),
        lambda d: d.update(files={}),
        lambda d: d["files"][0].update(rows=8.0),
        lambda d: d.update(cost_usd=1.5),
        lambda d: d["files"][0].update(sha256=None),
        lambda d: d["files"][0].update(sha256="AB" * 32),
    ],
)
def test_from_json_rejects_malformed(mutate: Any) -> None:
    d = orjson.loads(make_entry(sha256="ab" * 32).to_json())
    mutate(d)
    with pytest.raises(ValueError):
        ManifestEntry.from_json(orjson.dumps(d))
    with pytest.raises(ValueError):
        ManifestEntry.from_json(b"[1, 2")


def test_event_totals_exact() -> None:
    table = events_table([ms(2026, 1, 1)] * 3)
    costs = pa.array(
        [Decimal("0.000000000001"), None, Decimal("12345678901234.123456789012")],
        pa.decimal128(38, 12),
    )
    table = table.set_column(table.schema.get_field_index("cost_usd"), "cost_usd", costs)
    tokens, cost, unpriced = event_totals(table)
    assert cost == "12345678901234.123456789013"
    assert unpriced == 1
    assert tokens == {k: 3 for k in TOKEN_COLUMNS}  # rows hold 0, 1, 2
    assert event_totals(table.slice(1, 1)) == ({k: 1 for k in TOKEN_COLUMNS}, "0", 1)


def test_event_totals_exact_at_38_digits() -> None:
    """Beyond the 28 digits Python's default decimal context keeps."""
    table = events_table([ms(2026, 1, 1)] * 2)
    costs = pa.array(
        [Decimal("99999999999999999999999999.999999999999"), Decimal("0.000000000002")], COST_TYPE
    )
    table = table.set_column(table.schema.get_field_index("cost_usd"), "cost_usd", costs)
    assert event_totals(table)[1] == "100000000000000000000000000.000000000001"


def test_reject_counts() -> None:
    table = dlq_table([ms(2026, 1, 1)] * 3)
    reasons = pa.array(["wrong_type", "invalid_json", "wrong_type"])
    table = table.set_column(table.schema.get_field_index("reason"), "reason", reasons)
    assert reject_counts(table) == {"invalid_json": 1, "wrong_type": 2}
    assert reject_counts(table.slice(0, 0)) == {}


def test_format_cost() -> None:
    assert format_cost(Decimal("1E-12")) == "0.000000000001"
    assert format_cost(Decimal("0E-12")) == "0.000000000000"
    for bad in (Decimal("-1"), Decimal("NaN"), Decimal("Infinity")):
        with pytest.raises(ValueError):
            format_cost(bad)


# --- I/O: append and load --------------------------------------------------------------


def _hidden(root: Path) -> list[str]:
    return [p.name for p in root.rglob(".*")]


def test_append_and_load(tmp_path: Path) -> None:
    assert load_partition(tmp_path, "usage.v1", 0).position is None
    a, b = make_entry(0, 10), make_entry(10, 25)
    pa_ = append_entry(tmp_path, a, after=None)
    assert pa_ == entry_path(tmp_path, "usage.v1", 0, 0)
    assert origin_path(tmp_path, "usage.v1", 0).read_bytes() == a.to_json()
    append_entry(tmp_path, b, after=10)
    state = load_partition(tmp_path, "usage.v1", 0)
    assert state.entries == (a, b)
    assert (state.first, state.position) == (0, 25)
    assert [state.covers(o) for o in (-1, 0, 9, 10, 24, 25)] == [
        False, True, True, True, True, False,
    ]  # fmt: skip
    assert _hidden(tmp_path) == []  # no temp file left


def test_append_conflict_on_same_start(tmp_path: Path) -> None:
    append_entry(tmp_path, make_entry(0, 10), after=None)
    append_entry(tmp_path, make_entry(10, 20, writer="a"), after=10)
    # a zombie that read the same position flushes a different batch from it
    with pytest.raises(ManifestConflict, match="offset 10") as info:
        append_entry(tmp_path, make_entry(10, 30, writer="zombie"), after=10)
    assert (info.value.topic, info.value.partition, info.value.start) == ("usage.v1", 0, 10)
    state = load_partition(tmp_path, "usage.v1", 0)
    assert state.entries[-1].writer == "a" and state.position == 20
    assert _hidden(tmp_path) == []


def test_first_entry_is_fenced_by_origin(tmp_path: Path) -> None:
    append_entry(tmp_path, make_entry(100, 110), after=None)
    # a second writer that also saw an empty partition, from another low watermark
    with pytest.raises(ManifestConflict, match=r"origin\.json"):
        append_entry(tmp_path, make_entry(105, 120), after=None)
    assert not entry_path(tmp_path, "usage.v1", 0, 105).exists()
    assert load_partition(tmp_path, "usage.v1", 0).position == 110


def test_append_checks_after(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ends at 5"):
        append_entry(tmp_path, make_entry(0, 10), after=5)


def test_origin_stands_in_after_crash_between_links(tmp_path: Path) -> None:
    first = make_entry(0, 10)
    append_entry(tmp_path, first, after=None)
    entry_path(tmp_path, "usage.v1", 0, 0).unlink()
    assert load_partition(tmp_path, "usage.v1", 0).entries == (first,)
    append_entry(tmp_path, make_entry(10, 20), after=10)
    assert load_partition(tmp_path, "usage.v1", 0).position == 20


def test_origin_must_agree_and_come_first(tmp_path: Path) -> None:
    append_entry(tmp_path, make_entry(10, 20), after=None)
    append_entry(tmp_path, make_entry(0, 10), after=0)  # bypasses the fence: a forged entry
    with pytest.raises(ManifestCorrupt, match="precedes"):
        load_partition(tmp_path, "usage.v1", 0)

    other = tmp_path / "other"
    append_entry(other, make_entry(0, 10), after=None)
    origin = origin_path(other, "usage.v1", 0)
    origin.unlink()  # a hard link to the entry: replace, don't edit in place
    origin.write_bytes(make_entry(0, 10, writer="x").to_json())
    with pytest.raises(ManifestCorrupt, match="differs"):
        load_partition(other, "usage.v1", 0)


def test_chain_gap_detected(tmp_path: Path) -> None:
    append_entry(tmp_path, make_entry(0, 10), after=None)
    append_entry(tmp_path, make_entry(15, 20), after=15)
    with pytest.raises(ManifestCorrupt, match=r"gap: offsets 10\.\.15"):
        load_partition(tmp_path, "usage.v1", 0)


def test_chain_overlap_detected(tmp_path: Path) -> None:
    append_entry(tmp_path, make_entry(0, 10), after=None)
    append_entry(tmp_path, make_entry(5, 20), after=5)
    with pytest.raises(ManifestCorrupt, match=r"overlap: entry 0\.\.10 and entry 5\.\.20"):
        load_partition(tmp_path, "usage.v1", 0)


def test_load_rejects_bad_entries_and_skips_strays(tmp_path: Path) -> None:
    append_entry(tmp_path, make_entry(0, 10), after=None)
    d = partition_dir(tmp_path, "usage.v1", 0)
    (d / ".00000000000000000010.json.1.abc.tmp").write_bytes(b"{partial")
    (d / "README").write_text("not an entry")
    assert load_partition(tmp_path, "usage.v1", 0).position == 10

    (d / "00000000000000000010.json").write_bytes(make_entry(11, 20).to_json())
    with pytest.raises(ManifestCorrupt, match="starting at 11"):
        load_partition(tmp_path, "usage.v1", 0)
    (d / "00000000000000000010.json").write_bytes(b"{not json")
    with pytest.raises(ManifestCorrupt, match=r"00000000000000000010\.json"):
        load_partition(tmp_path, "usage.v1", 0)
    (d / "00000000000000000010.json").write_bytes(make_entry(10, 20, partition=1).to_json())
    with pytest.raises(ManifestCorrupt, match="is for"):
        load_partition(tmp_path, "usage.v1", 0)


def test_list_partitions_listed_files_and_totals(tmp_path: Path) -> None:
    assert list_partitions(tmp_path) == []
    assert totals(tmp_path).entries == 0
    big = "12345678901234567890123456.000000000001"  # beyond 28 significant digits
    append_entry(tmp_path, make_entry(0, 10, cost=big), after=None)
    append_entry(tmp_path, make_entry(10, 20, cost="0.000000000001"), after=10)
    append_entry(tmp_path, make_entry(5, 9, topic="t-2", partition=3, dlq=0, cost="0"), after=None)

    assert list_partitions(tmp_path) == [("t-2", 3), ("usage.v1", 0)]
    events = listed_files(tmp_path, "events")
    assert len(events) == 3 and all(lake.parse_rel_path(p).kind == "events" for p in events)
    assert len(listed_files(tmp_path, "dlq")) == 2
    with pytest.raises(ValueError):
        listed_files(tmp_path, "flags")  # type: ignore[arg-type]

    t = totals(tmp_path)
    assert t.cost_usd == "12345678901234567890123456.000000000002"
    assert (t.partitions, t.entries, t.files) == (2, 3, 5)
    assert (t.accepted, t.rejected, t.messages) == (24, 4, 24)
    assert t.rejects_by_reason == {"invalid_json": 4}
    assert t.tokens == {k: 30 * i for i, k in enumerate(TOKEN_COLUMNS)}
    assert t.bytes == 3 * 100 + 2 * 50


def test_end_to_end_flush_and_duckdb_view(tmp_path: Path) -> None:
    """A flush as the sink does it: intent, files, entry; then a view over listed files."""
    root = tmp_path / "lake"
    events = events_table([ms(2026, 1, 1, 23, 30), ms(2026, 1, 2, 0, 10), ms(2026, 1, 1, 23, 59)])
    dlq = dlq_table([ms(2026, 1, 2, 0, 11)])
    name = lake.data_file_name("usage.v1", 0, 0, 4)
    planned = [
        *((lake.events_rel_path(d, h, name), t) for (d, h), t in lake.split_by_hour(events)),
        *((lake.dlq_rel_path(d, name), t) for d, t in lake.split_dlq_by_date(dlq)),
    ]
    lake.write_intent(root, "usage.v1", 0, 0, 4, [rel for rel, _ in planned])
    files = tuple(
        FileRecord(rel, lake.parse_rel_path(rel).kind, t.num_rows,
                   *lake.write_parquet_atomic(t, lake.abs_path(root, rel)))
        for rel, t in planned
    )  # fmt: skip
    tokens, cost, unpriced = event_totals(events)
    entry = ManifestEntry(
        topic="usage.v1", partition=0, start=0, end=4, messages=4, accepted=3, rejected=1,
        rejects_by_reason=reject_counts(dlq), tokens=tokens, cost_usd=cost, unpriced=unpriced,
        files=files, writer="test", written_at_ms=0,
    )  # fmt: skip
    append_entry(root, entry, after=None)
    state = load_partition(root, "usage.v1", 0)
    assert lake.clear_orphans(root, "usage.v1", 0, state.covers) == []
    assert all(lake.abs_path(root, f.path).exists() for f in files)

    # a stray file in the tree is not counted: views read listed files only
    stray = lake.abs_path(root, lake.events_rel_path("2026-01-01", 23, lake.data_file_name(
        "usage.v1", 0, 4, 5)))  # fmt: skip
    lake.write_parquet_atomic(events, stray)
    paths = [str(lake.abs_path(root, p)) for p in listed_files(root, "events")]
    con = duckdb.connect()
    con.execute(f"CREATE VIEW events AS SELECT * FROM read_parquet({paths!r})")
    n, total = con.execute("SELECT count(*), sum(cost_usd) FROM events").fetchone()  # type: ignore[misc]
    assert n == totals(root).accepted == 3
    assert Decimal(total) == Decimal(totals(root).cost_usd) == Decimal("0.000000000003")


# --- restatement records (pure) ---------------------------------------------------------------


def _file(
    start: int, end: int, version: int = 1, rows: int = 4, size: int = 100, hour: int = 0
) -> FileRecord:
    name = lake.data_file_name("usage.v1", 0, start, end, version)
    return FileRecord(lake.events_rel_path("2026-01-01", hour, name), "events", rows, size, f"{version:064x}")


REF = CatalogRef("prices/corrected.toml", "ab" * 32)


def restated(start: int = 0, end: int = 4, version: int = 1, **kw: Any) -> Restatement:
    fields: dict[str, Any] = dict(
        replaces=_file(start, end, version),
        file=_file(start, end, version + 1, size=101),
        old_cost_usd="1.000000000001",
        new_cost_usd="0.9",
        old_unpriced=1,
        new_unpriced=0,
        changed=2,
    )
    fields.update(kw)
    return Restatement(**fields)


def record(*files: Restatement, seq: int = 1, **kw: Any) -> RestatementRecord:
    fields: dict[str, Any] = dict(
        topic="usage.v1", partition=0, seq=seq, files=files or (restated(),), catalog=REF,
        start_ms=None, end_ms=None, writer="ops@host/1", written_at_ms=5,
    )  # fmt: skip
    fields.update(kw)
    return RestatementRecord(**fields)


def test_restatement_record_round_trip_and_sums() -> None:
    r = record(restated(), restated(4, 8), start_ms=10, end_ms=20)
    data = r.to_json()
    assert RestatementRecord.from_json(data) == r == parse_rewrite(data)
    assert r.to_json() == data  # deterministic
    assert r.cost_change == Decimal("-0.200000000002")  # exact: new - old per file, summed
    assert r.unpriced_change == -2
    assert [f.path for old, _ in r.swaps for f in old] == [r.files[0].replaces.path, r.files[1].replaces.path]
    doc = orjson.loads(data)
    assert doc["type"] == "restatement" and doc["catalog"] == {"name": REF.name, "sha256": REF.sha256}
    assert doc["files"][0]["old_cost_usd"] == "1.000000000001" and doc["files"][0]["new_cost_usd"] == "0.9"


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: restated(file=_file(0, 4, 1)), "higher version"),
        (lambda: restated(file=_file(0, 5, 2)), "offsets"),
        (lambda: restated(file=_file(0, 4, 2, hour=1)), "directory"),
        (lambda: restated(file=_file(0, 4, 2, rows=5)), "rows"),
        (lambda: restated(new_cost_usd="-1"), "new_cost_usd"),
        (lambda: restated(old_cost_usd="1e3"), "old_cost_usd"),
        (lambda: restated(changed=0), "no row changed"),
        (lambda: restated(new_unpriced=5), "new_unpriced"),
        (lambda: restated(replaces=FileRecord(lake.dlq_rel_path("2026-01-01", lake.data_file_name(
            "usage.v1", 0, 0, 4)), "dlq", 4, 1, None), file=FileRecord(lake.dlq_rel_path("2026-01-01",
            lake.data_file_name("usage.v1", 0, 0, 4, 2)), "dlq", 4, 1, None)), "only events"),
        (lambda: record(files=()), "no restated file"),
        (lambda: record(restated(), restated()), "two replacements"),
        (lambda: record(seq=0), "seq"),
        (lambda: record(start_ms=5, end_ms=5), "start_ms"),
        (lambda: record(start_ms="5"), "start_ms"),
        (lambda: record(partition=1), "another partition"),
        (lambda: CatalogRef("x", "AB" * 32), "sha256"),
        (lambda: CatalogRef("", "ab" * 32), "name"),
    ],
)  # fmt: skip
def test_restatement_validation(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(v=2),
        lambda d: d.update(type="compaction"),
        lambda d: d.pop("catalog"),
        lambda d: d.update(start_ms=1.5),
        lambda d: d["files"][0].update(changed="2"),
        lambda d: d["files"][0].pop("old_cost_usd"),
        lambda d: d["catalog"].update(sha256=None),
    ],
)
def test_restatement_from_json_rejects_malformed(mutate: Any) -> None:
    doc = orjson.loads(record().to_json())
    mutate(doc)
    with pytest.raises(ValueError):
        RestatementRecord.from_json(orjson.dumps(doc))
    with pytest.raises(ValueError, match="unknown rewrite record type"):
        parse_rewrite(orjson.dumps({**doc, "type": "restatemint"}))


def test_apply_rewrites_mixes_compactions_and_restatements() -> None:
    @dataclasses.dataclass
    class E:  # what apply_rewrites reads of an entry
        files: tuple[FileRecord, ...]

    a, b = _file(0, 4), _file(4, 8)
    merged = _file(0, 8, rows=8)
    first = CompactionRecord("usage.v1", 0, 1, (Replacement((a, b), merged),), "w", 10)
    second = record(restated(0, 8, replaces=merged, file=_file(0, 8, 2, rows=8)), seq=2, written_at_ms=20)
    live, retired = apply_rewrites([E((a, b))], [first, second])  # type: ignore[list-item]
    assert live == (second.files[0].file,)
    assert retired == ((a, 10), (b, 10), (merged, 20))
    with pytest.raises(ManifestCorrupt, match="is or was listed already"):
        apply_rewrites([E((a, b, second.files[0].file))], [first, second])  # type: ignore[list-item]
    with pytest.raises(ManifestCorrupt, match="not listed"):
        apply_rewrites([E((a, b))], [second])  # type: ignore[list-item]
