"""meter.stages and the Committer, without a broker: the buffer's flush triggers and offset
arithmetic, dead-letter rows, parse + price with the default catalog, the durable lake write
and its fence, the writer thread, and offset commits retried on the timer."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from confluent_kafka import KafkaError, KafkaException

from meter import metrics
from meter import reasons as R
from meter.lake import data_file_name, dlq_rel_path
from meter.manifest import (
    FileRecord,
    ManifestConflict,
    ManifestEntry,
    listed_files,
    load_partition,
    totals,
)
from meter.pipeline import Committer
from meter.pricing import load_catalog
from meter.schema import DLQ, LAKE_EVENTS, TOKEN_COLUMNS
from meter.stages import (
    Buffer,
    Chunk,
    Durable,
    Flush,
    LakeWriter,
    ParseAndPrice,
    Rows,
    dlq_table,
    raw_line,
    write_flush,
)

NOW_MS = 1_764_380_000_000  # 2025-11-29T01:33:20Z: the parser's clock in these tests
TS_00 = NOW_MS - 3_600_000  # 2025-11-29T00:33:20Z
TS_01 = NOW_MS - 60_000  # 2025-11-29T01:32:20Z
ARRIVAL_MS = NOW_MS + 1_000
TOPIC = "usage"
LATENESS_MS = 35 * 86_400_000
CATALOG = load_catalog()


def event(n: int, *, ts: int = TS_00, model: str = "gpt-5", **tokens: int) -> bytes:
    doc: dict[str, Any] = {
        "event_id": f"ev-{n}",
        "ts": ts,
        "user": f"user-{n % 3}",
        "model": model,
        "input_tokens": 1_000 + n,
        "output_tokens": 100 + n,
    }
    doc.update(tokens)
    return orjson.dumps(doc)


def chunk(
    payloads: list[bytes | None], first_offset: int = 0, partition: int = 0, topic: str = TOPIC
) -> Chunk:
    offsets = list(range(first_offset, first_offset + len(payloads)))
    return Chunk(topic, partition, payloads, offsets, ARRIVAL_MS)


class Sink:
    """A next step that keeps what it is given."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def submit(self, item: Any) -> None:
        self.items.append(item)

    def poll(self) -> None:
        return None

    def join(self) -> None:
        return None

    def close(self) -> None:
        return None


def parse(c: Chunk, reject_unknown: bool = False) -> Rows:
    sink = Sink()
    ParseAndPrice(sink, CATALOG, LATENESS_MS, reject_unknown, clock_ms=lambda: NOW_MS).submit([c])
    [rows] = sink.items
    assert isinstance(rows, Rows) and rows.chunk is c
    return rows


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


BIG = 1 << 40


def buffer(
    positions: dict[tuple[str, int], int | None] | None = None,
    max_events: int = BIG,
    max_bytes: int = BIG,
    max_age_s: float = 1e9,
    clock: Clock | None = None,
) -> tuple[Buffer, Sink, dict[tuple[str, int], int | None]]:
    sink = Sink()
    positions = {} if positions is None else positions
    buf = Buffer(sink, positions, max_events, max_bytes, max_age_s, clock=clock or Clock())
    return buf, sink, positions


# --- raw_line and dlq_table ----------------------------------------------------------------


def test_raw_line_of_one_line_and_of_ndjson() -> None:
    assert raw_line(b'{"a":1}', 0) == b'{"a":1}'
    assert raw_line(b"a\nb\r\nc", 0) == b"a"
    assert raw_line(b"a\nb\r\nc", 1) == b"b"  # the \r of a \r\n line end is not part of the line
    assert raw_line(b"a\nb\r\nc", 2) == b"c"
    assert raw_line(b"a\n\nc", 1) == b""
    assert raw_line(None, 0) == b""
    assert raw_line(b"", 0) == b""
    assert raw_line(b"a\nb", 5) == b"a\nb"  # a line the message does not have: all of it


def test_dlq_rows_carry_provenance_and_the_rejected_line() -> None:
    good = event(1)
    c = chunk(
        [
            b"{not json",  # offset 40: a one-line message
            good + b"\n\n{bad\r\n" + event(2),  # offset 41: line 2 (the blank line counts)
            b"[1]",  # offset 42: not an object
            None,  # offset 43: a tombstone holds no event
            good,  # offset 44: accepted
        ],
        first_offset=40,
        partition=3,
    )
    rows = parse(c)
    dlq = rows.dlq
    assert dlq.schema.equals(DLQ)
    got = sorted(
        zip(
            dlq.column("kafka_offset").to_pylist(),
            dlq.column("line").to_pylist(),
            dlq.column("reason").to_pylist(),
            dlq.column("raw").to_pylist(),
            strict=True,
        )
    )
    assert got == [
        (40, 0, R.INVALID_JSON, b"{not json"),
        (41, 2, R.INVALID_JSON, b"{bad"),
        (42, 0, R.NOT_OBJECT, b"[1]"),
        (43, 0, R.INVALID_JSON, b""),
    ]
    assert set(dlq.column("kafka_topic").to_pylist()) == {TOPIC}
    assert set(dlq.column("kafka_partition").to_pylist()) == {3}
    assert set(dlq.column("arrival_ts").cast(pa.int64()).to_pylist()) == {ARRIVAL_MS}
    assert all(dlq.column("detail").to_pylist())
    # accepted rows: offsets of their own messages
    assert rows.events.column("kafka_offset").to_pylist() == [41, 41, 44]


def test_dlq_table_keeps_the_whole_message_for_a_message_level_reject() -> None:
    """A too_large message is rejected as a whole (one DLQ row, line 0): its DLQ row must hold
    the whole message (DESIGN 4: "rejected messages: raw bytes"), not its first line, which here
    is a perfectly valid event."""
    too_large = event(1) + b"\n" + b'{"pad":"' + b"x" * (1 << 20) + b'"}'
    c = chunk([too_large], first_offset=7)
    rows = parse(c)
    assert rows.events.num_rows == 0
    [row] = rows.dlq.to_pylist()
    assert (row["reason"], row["line"], row["kafka_offset"]) == (R.TOO_LARGE, 0, 7)
    assert row["raw"] == too_large, f"raw holds {len(row['raw'])} of {len(too_large)} bytes"


def test_dlq_table_of_rejects_built_by_hand() -> None:
    c = chunk([b"x\ny", b"z"], first_offset=100, partition=1)
    rejects = [
        R.Reject(1, 0, R.INVALID_JSON, "d1"),
        R.Reject(0, 1, R.UNKNOWN_MODEL, "d2"),
    ]
    t = dlq_table(c, rejects)
    assert t.schema.equals(DLQ)
    assert t.to_pylist() == [
        {
            "raw": b"z",
            "kafka_topic": TOPIC,
            "kafka_partition": 1,
            "kafka_offset": 101,
            "line": 0,
            "reason": R.INVALID_JSON,
            "detail": "d1",
            "arrival_ts": dt.datetime.fromtimestamp(ARRIVAL_MS / 1000, dt.UTC),
        },
        {
            "raw": b"y",
            "kafka_topic": TOPIC,
            "kafka_partition": 1,
            "kafka_offset": 100,
            "line": 1,
            "reason": R.UNKNOWN_MODEL,
            "detail": "d2",
            "arrival_ts": dt.datetime.fromtimestamp(ARRIVAL_MS / 1000, dt.UTC),
        },
    ]
    assert dlq_table(c, []).num_rows == 0


# --- ParseAndPrice -------------------------------------------------------------------------


@pytest.mark.parametrize("reject_unknown", [False, True])
def test_chunks_of_one_consume_call_parse_as_they_would_one_by_one(reject_unknown: bool) -> None:
    """One parse for all chunks, split back per chunk: the same rows, rejects, provenance
    and message/line indices as parsing each chunk alone."""
    chunks = [
        chunk([event(1), b"{", event(2) + b"\n" + event(3, model="mystery")], 10, partition=3),
        chunk([b"[]", b"", None], 7, partition=0),  # nothing accepted
        chunk([], 0, partition=5),
        chunk([event(4) + b"\n{bad\n" + event(5), event(6, ts=TS_00)], 100, partition=1, topic="other"),
    ]
    sink = Sink()
    ParseAndPrice(sink, CATALOG, LATENESS_MS, reject_unknown, clock_ms=lambda: NOW_MS).submit(chunks)
    assert [r.chunk for r in sink.items] == chunks
    for together, c in zip(sink.items, chunks, strict=True):
        alone = parse(c, reject_unknown)
        assert together.events.equals(alone.events), c.partition
        assert together.dlq.equals(alone.dlq), c.partition
        assert together.origin.to_pylist() == alone.origin.to_pylist()
        assert together.lines.to_pylist() == alone.lines.to_pylist()
    assert [r.events.num_rows for r in sink.items] == [2 if reject_unknown else 3, 0, 0, 3]


def test_parse_and_price_with_the_default_catalog() -> None:
    c = chunk(
        [
            event(1, input_tokens=1_000_000, output_tokens=100_000, cache_read_tokens=2_000_000),
            event(2, model="claude-sonnet-4-5") + b"\n" + event(3, model="no-such-model"),
        ],
        first_offset=10,
    )
    rows = parse(c)
    events = rows.events
    assert events.schema.equals(LAKE_EVENTS)
    assert rows.dlq.num_rows == 0
    assert events.column("event_id").to_pylist() == ["ev-1", "ev-2", "ev-3"]
    assert events.column("kafka_offset").to_pylist() == [10, 11, 11]
    assert events.column("kafka_partition").to_pylist() == [0, 0, 0]
    assert events.column("kafka_topic").to_pylist() == [TOPIC] * 3
    # gpt-5: $1.25 per M input, $10 per M output, $0.125 per M cache read
    cost = events.column("cost_usd").to_pylist()
    assert cost[0] == Decimal("1.25") + Decimal("1.00") + Decimal("0.25")
    assert cost[1] is not None and cost[1] > 0
    assert cost[2] is None  # unknown model: kept, unpriced
    assert events.column("price_version").to_pylist() == [
        "gpt-5@2025-08-07",
        "claude-sonnet-4-5@2025-09-29",
        None,
    ]


def test_reject_unknown_models() -> None:
    c = chunk(
        [
            event(1),
            event(2) + b"\n{oops\n" + event(3, model="mystery-1") + b"\n" + event(4),
            event(5, model="mystery-2"),
        ],
        first_offset=20,
        partition=2,
    )
    rows = parse(c, reject_unknown=True)
    assert rows.events.column("event_id").to_pylist() == ["ev-1", "ev-2", "ev-4"]
    assert rows.events.column("kafka_offset").to_pylist() == [20, 21, 21]
    assert rows.events.column("cost_usd").null_count == 0
    dlq = sorted(rows.dlq.to_pylist(), key=lambda r: (r["kafka_offset"], r["line"]))
    assert [(r["kafka_offset"], r["line"], r["reason"]) for r in dlq] == [
        (21, 1, R.INVALID_JSON),
        (21, 2, R.UNKNOWN_MODEL),
        (22, 0, R.UNKNOWN_MODEL),
    ]
    assert dlq[1]["detail"] == "model 'mystery-1' is not in the price catalog"
    assert dlq[1]["raw"] == event(3, model="mystery-1")
    assert dlq[2]["detail"] == "model 'mystery-2' is not in the price catalog"
    assert dlq[2]["raw"] == event(5, model="mystery-2")
    assert {r["kafka_partition"] for r in dlq} == {2}

    # everything unknown: no event rows, still the LAKE_EVENTS schema
    rows = parse(chunk([event(9, model="mystery-3")]), reject_unknown=True)
    assert rows.events.num_rows == 0 and rows.events.schema.equals(LAKE_EVENTS)
    assert rows.dlq.column("reason").to_pylist() == [R.UNKNOWN_MODEL]


def test_parse_and_price_uses_its_clock() -> None:
    """The timestamp window is the injected clock's, not the wall clock's."""
    late = event(1, ts=NOW_MS - LATENESS_MS - 1)
    ahead = event(2, ts=NOW_MS + 5 * 60_000 + 1)
    rows = parse(chunk([late, ahead, event(3)]))
    assert rows.dlq.column("reason").to_pylist() == [R.TIMESTAMP_OUT_OF_RANGE] * 2
    assert rows.events.num_rows == 1


# --- Buffer --------------------------------------------------------------------------------


def test_flush_on_buffered_events_counts_dlq_rows_too() -> None:
    buf, sink, _ = buffer(max_events=5)
    buf.submit(parse(chunk([event(1), event(2)], 0)))
    buf.submit(parse(chunk([b"{bad"], 2)))
    assert buf.buffered_events == 3 and not buf.due()
    buf.poll()
    assert sink.items == []
    buf.submit(parse(chunk([event(3) + b"\n" + event(4)], 3)))
    assert buf.buffered_events == 5 and buf.due()
    buf.poll()
    [flush] = sink.items
    assert (flush.start, flush.after, flush.end, flush.messages) == (0, None, 4, 4)
    assert flush.events.num_rows == 4 and flush.dlq.num_rows == 1
    assert buf.pending == {} and buf.buffered_events == 0 and buf.buffered_bytes == 0
    assert not buf.due()


def test_flush_on_buffered_bytes() -> None:
    payloads = [event(i) for i in range(3)]
    size = sum(map(len, payloads))
    buf, sink, _ = buffer(max_bytes=size)
    buf.submit(parse(chunk(payloads[:2], 0)))
    assert buf.buffered_bytes == size - len(payloads[2]) and not buf.due()
    buf.submit(parse(chunk([None], 2)))  # a tombstone has no bytes
    assert not buf.due()
    buf.submit(parse(chunk(payloads[2:], 3)))
    assert buf.buffered_bytes == size and buf.due()
    buf.poll()
    [flush] = sink.items
    assert (flush.start, flush.end, flush.messages) == (0, 4, 4)


def test_flush_on_age_of_the_oldest_message() -> None:
    clock = Clock()
    buf, sink, _ = buffer(max_age_s=1.0, clock=clock)
    assert not buf.due()  # nothing buffered is never due
    buf.submit(parse(chunk([event(1)], 0, partition=0)))
    clock.now += 0.6
    buf.submit(parse(chunk([event(2)], 0, partition=1)))
    buf.submit(parse(chunk([event(3)], 1, partition=0)))  # more rows do not reset the age
    clock.now += 0.39
    buf.poll()
    assert not buf.due() and sink.items == []
    clock.now += 0.01
    assert buf.due()
    buf.poll()  # the oldest partition is due: everything buffered goes
    assert sorted((f.partition, f.start, f.end, f.messages) for f in sink.items) == [
        (0, 0, 2, 2),
        (1, 0, 1, 1),
    ]
    # a new message starts a new age
    buf.submit(parse(chunk([event(4)], 2, partition=0)))
    clock.now += 0.99
    assert not buf.due()
    clock.now += 0.01
    assert buf.due()


def test_start_after_end_from_positions() -> None:
    tp = (TOPIC, 0)
    positions: dict[tuple[str, int], int | None] = {tp: None}
    buf, sink, positions = buffer(positions)
    # a partition with no manifest entry starts at its first consumed offset
    buf.submit(parse(chunk([event(1), event(2)], 10)))
    buf.submit(parse(chunk([event(3)], 12)))
    buf.join()
    first = sink.items[-1]
    assert (first.start, first.after, first.end, first.messages) == (10, None, 13, 3)
    assert positions[tp] == 13
    assert first.events.column("kafka_offset").to_pylist() == [10, 11, 12]
    # the next flush builds on the previous one's end
    buf.submit(parse(chunk([event(4)], 13)))
    buf.flush([tp])
    second = sink.items[-1]
    assert (second.start, second.after, second.end, second.messages) == (13, 13, 14, 1)
    # offsets missing in the log (compaction, transaction markers): the range still starts at
    # the chain end, so the chain stays contiguous; messages counts what was consumed
    buf.submit(parse(chunk([event(5)], 20)))
    buf.submit(parse(chunk([event(6)], 25)))
    buf.flush([tp])
    third = sink.items[-1]
    assert (third.start, third.after, third.end, third.messages) == (14, 14, 26, 2)
    assert positions[tp] == 26


def test_resume_from_a_manifest_position() -> None:
    tp = (TOPIC, 5)
    buf, sink, positions = buffer({tp: 500})
    buf.submit(parse(chunk([event(1)], 500, partition=5)))
    buf.join()
    [flush] = sink.items
    assert (flush.topic, flush.partition, flush.start, flush.after, flush.end) == (TOPIC, 5, 500, 500, 501)
    assert positions[tp] == 501


def test_flush_only_named_partitions_and_drop() -> None:
    a, b, c = (TOPIC, 0), (TOPIC, 1), (TOPIC, 2)
    buf, sink, positions = buffer({a: None, b: 40, c: 7})
    buf.submit(parse(chunk([event(1)], 0, partition=0)))
    buf.submit(parse(chunk([event(2), b"{x"], 40, partition=1)))
    buf.submit(parse(chunk([event(3)], 7, partition=2)))
    buf.flush([b, (TOPIC, 9)])  # a partition with nothing buffered is skipped
    assert [(f.partition, f.start, f.end) for f in sink.items] == [(1, 40, 42)]
    assert set(buf.pending) == {a, c}
    buf.drop([a, (TOPIC, 9)])
    assert set(buf.pending) == {c}
    assert buf.buffered_events == 1
    assert positions[a] is None  # dropped rows move no position
    buf.join()
    assert [(f.partition, f.start, f.end) for f in sink.items] == [(1, 40, 42), (2, 7, 8)]
    assert buf.pending == {}


# --- write_flush ---------------------------------------------------------------------------


def make_flush(
    payloads: list[bytes | None], first_offset: int, after: int | None, partition: int = 0
) -> Flush:
    positions: dict[tuple[str, int], int | None] = {(TOPIC, partition): after}
    buf, sink, _ = buffer(positions)
    buf.submit(parse(chunk(payloads, first_offset, partition)))
    buf.join()
    [flush] = sink.items
    return flush


def tmp_files(lake: Path) -> list[Path]:
    return [p for p in lake.rglob(".*.tmp")]


def test_write_flush_files_and_manifest_entry(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    payloads: list[bytes | None] = [
        event(1, ts=TS_00),
        event(2, ts=TS_01) + b"\n" + event(3, ts=TS_00, model="mystery") + b"\n{bad",
        b"[]",
        event(4, ts=TS_01, cache_read_tokens=777, reasoning_tokens=50),
    ]
    flush = make_flush(payloads, first_offset=0, after=None)
    entry = write_flush(str(lake), flush, "writer-1")

    name = data_file_name(TOPIC, 0, 0, 4)
    by_path = {f.path: f for f in entry.files}
    assert set(by_path) == {
        f"events/date=2025-11-29/hour=00/{name}",
        f"events/date=2025-11-29/hour=01/{name}",
        f"dlq/date=2025-11-29/{name}",
    }
    for rel, record in by_path.items():
        table = pq.read_table(lake / rel)
        assert table.num_rows == record.rows
        assert (lake / rel).stat().st_size == record.bytes
        assert record.sha256 == hashlib.sha256((lake / rel).read_bytes()).hexdigest()
        assert record.kind == rel.split("/")[0]
        assert table.schema.equals(LAKE_EVENTS if record.kind == "events" else DLQ)
    assert by_path[f"events/date=2025-11-29/hour=00/{name}"].rows == 2
    assert by_path[f"events/date=2025-11-29/hour=01/{name}"].rows == 2
    assert by_path[f"dlq/date=2025-11-29/{name}"].rows == 2

    # the entry's numbers are the tables'
    events, dlq = flush.events, flush.dlq
    assert (entry.topic, entry.partition, entry.start, entry.end) == (TOPIC, 0, 0, 4)
    assert (entry.messages, entry.accepted, entry.rejected) == (4, events.num_rows, dlq.num_rows) == (4, 4, 2)
    assert entry.rejects_by_reason == dict(Counter(dlq.column("reason").to_pylist()))
    assert entry.rejects_by_reason == {R.INVALID_JSON: 1, R.NOT_OBJECT: 1}
    assert entry.tokens == {k: pc.sum(events.column(k)).as_py() for k in TOKEN_COLUMNS}
    assert entry.tokens["cache_read_tokens"] == 777
    assert Decimal(entry.cost_usd) == sum(c for c in events.column("cost_usd").to_pylist() if c is not None)
    assert entry.unpriced == 1
    assert entry.writer == "writer-1"

    # durable and listed
    state = load_partition(lake, TOPIC, 0)
    assert state.entries == (entry,) and state.position == 4
    t = totals(lake)
    assert (t.messages, t.accepted, t.rejected, t.entries) == (4, 4, 2, 1)
    assert sorted(listed_files(lake, "events") + listed_files(lake, "dlq")) == sorted(by_path)
    assert tmp_files(lake) == []

    # read back, the lake holds exactly the flush's rows
    lake_events = pa.concat_tables(pq.read_table(lake / p) for p in by_path if p.startswith("events/"))
    assert sorted(lake_events.column("event_id").to_pylist()) == sorted(events.column("event_id").to_pylist())
    assert pq.read_table(lake / f"dlq/date=2025-11-29/{name}").column("raw").to_pylist() == [b"{bad", b"[]"]


def test_second_write_from_the_same_position_is_fenced(tmp_path: Path) -> None:
    lake = str(tmp_path / "lake")
    first = make_flush([event(1), event(2)], first_offset=0, after=None)
    write_flush(lake, first, "w1")
    # a second writer that also read "no entry yet"
    with pytest.raises(ManifestConflict):
        write_flush(lake, make_flush([event(1), event(2), event(3)], 0, after=None), "w2")
    # the chain goes on from the first entry's end
    second = make_flush([event(3)], first_offset=2, after=2)
    write_flush(lake, second, "w1")
    # and a stale writer that built on the same end collides
    with pytest.raises(ManifestConflict):
        write_flush(lake, make_flush([event(3), event(4)], first_offset=2, after=2), "w2")
    state = load_partition(lake, TOPIC, 0)
    assert [(e.start, e.end, e.writer) for e in state.entries] == [(0, 2, "w1"), (2, 3, "w1")]
    assert totals(lake).accepted == 3


def test_write_flush_of_only_rejects_or_only_events(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    only_dlq = make_flush([b"{", b"1"], first_offset=0, after=None)
    entry = write_flush(str(lake), only_dlq, "w")
    assert [f.kind for f in entry.files] == ["dlq"]
    assert (entry.accepted, entry.rejected, entry.cost_usd) == (0, 2, "0")
    assert entry.tokens == dict.fromkeys(TOKEN_COLUMNS, 0)
    only_events = make_flush([event(1)], first_offset=2, after=2)
    entry = write_flush(str(lake), only_events, "w")
    assert [f.kind for f in entry.files] == ["events"]
    assert load_partition(lake, TOPIC, 0).position == 3


def test_write_flush_dictionary_encodes_only_repeating_columns(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    entry = write_flush(str(lake), make_flush([event(i) for i in range(50)], 0, after=None), "w")
    [events] = [f for f in entry.files if f.kind == "events"]
    meta = pq.ParquetFile(lake / events.path).metadata.row_group(0)
    encodings = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
    for column in ("user", "team", "model", "kafka_topic", "kafka_partition"):
        assert "RLE_DICTIONARY" in encodings[column], column
    for column in ("event_id", "ts", "input_tokens", "cost_usd", "kafka_offset"):
        assert "RLE_DICTIONARY" not in encodings[column], column


# --- LakeWriter ----------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 4])
def test_lake_writer_forwards_durable_flushes_in_order_and_reports_conflicts(
    tmp_path: Path, threads: int
) -> None:
    lake = str(tmp_path / "lake")
    sink = Sink()
    conflicts: list[Flush] = []
    writer = LakeWriter(sink, lake, "w", conflicts.append, threads)
    try:
        flushes = [
            make_flush([event(1)], 0, after=None, partition=0),
            make_flush([event(2), b"{"], 0, after=None, partition=1),
            make_flush([event(3)], 1, after=1, partition=0),
        ]
        for f in flushes:
            writer.submit(f)
        writer.join()
        assert writer.in_flight == []
        assert [type(d) for d in sink.items] == [Durable] * 3
        assert [(d.entry.partition, d.entry.start, d.entry.end) for d in sink.items] == [
            (0, 0, 1),
            (1, 0, 2),
            (0, 1, 2),
        ]
        assert all(d.events is f.events and d.dlq is f.dlq for d, f in zip(sink.items, flushes, strict=True))
        for d in sink.items:  # the KPI sums are made on the writer's thread, not the consumer's
            assert d.usage is not None
            assert d.usage.groups.equals(metrics.DEFAULT.usage.sums(d.events).groups)
        stale = make_flush([event(3), event(4)], 1, after=1, partition=0)
        writer.submit(stale)
        writer.join()
        assert conflicts == [stale] and len(sink.items) == 3
    finally:
        writer.close()
    assert load_partition(lake, TOPIC, 0).position == 2


def test_lake_writer_threads_keep_each_partitions_chain(tmp_path: Path) -> None:
    """Many partitions written at once: each chain grows in order, entries forwarded in
    the order submitted."""
    lake = str(tmp_path / "lake")
    sink = Sink()
    writer = LakeWriter(sink, lake, "w", lambda f: pytest.fail(f"conflict on {f}"), threads=4)
    try:
        expected = []
        for round_ in range(6):
            for partition in range(5):
                after = None if round_ == 0 else 2 * round_
                writer.submit(
                    make_flush([event(round_), event(round_ + 100)], 2 * round_, after, partition=partition)
                )
                expected.append((partition, 2 * round_, 2 * round_ + 2))
        writer.join()
    finally:
        writer.close()
    assert [(d.entry.partition, d.entry.start, d.entry.end) for d in sink.items] == expected
    for partition in range(5):
        state = load_partition(lake, TOPIC, partition)
        assert [(e.start, e.end) for e in state.entries] == [(2 * r, 2 * r + 2) for r in range(6)]


def test_lake_writer_does_not_write_behind_a_failed_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush that failed (disk full, say) stops the later flushes of its partition, which
    build on its end; other partitions are written."""
    import meter.stages as stages

    real = stages.write_flush

    def failing(lake: str, flush: Flush, writer_id: str) -> ManifestEntry:
        if (flush.partition, flush.start) == (0, 1):
            raise OSError(28, "No space left on device")
        return real(lake, flush, writer_id)

    monkeypatch.setattr(stages, "write_flush", failing)
    lake = str(tmp_path / "lake")
    sink = Sink()
    writer = LakeWriter(sink, lake, "w", lambda f: pytest.fail(f"conflict on {f}"), threads=3)
    try:
        for start, after in ((0, None), (1, 1), (2, 2)):
            writer.submit(make_flush([event(start)], start, after, partition=0))
            writer.submit(make_flush([event(start)], start, after, partition=1))
        futures = [f for _, f in writer.in_flight]
        with pytest.raises(OSError, match="No space"):
            writer.join()
    finally:
        writer.close()
    assert isinstance(futures[4].exception(), RuntimeError)  # partition 0 from offset 2
    assert "earlier flush of usage[0] failed" in str(futures[4].exception())
    assert [(e.start, e.end) for e in load_partition(lake, TOPIC, 0).entries] == [(0, 1)]
    assert [(e.start, e.end) for e in load_partition(lake, TOPIC, 1).entries] == [(0, 1), (1, 2), (2, 3)]


# --- Committer -----------------------------------------------------------------------------


class FakeConsumer:
    """Records commits; fails the next `fail` calls; reports per-partition errors for `bad`."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, int, int]]] = []
        self.fail = 0
        self.bad: set[tuple[str, int]] = set()

    def commit(self, offsets: Any = None, asynchronous: bool = True) -> list[Any]:
        assert asynchronous is False
        self.calls.append(sorted((tp.topic, tp.partition, tp.offset) for tp in offsets))
        if self.fail:
            self.fail -= 1
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))
        return [
            SimpleNamespace(
                topic=tp.topic,
                partition=tp.partition,
                offset=tp.offset,
                error=KafkaError(KafkaError.REBALANCE_IN_PROGRESS)
                if (tp.topic, tp.partition) in self.bad
                else None,
            )
            for tp in offsets
        ]


def durable(partition: int, start: int, end: int, topic: str = TOPIC) -> Durable:
    n = end - start
    name = data_file_name(topic, partition, start, end)
    entry = ManifestEntry(
        topic=topic,
        partition=partition,
        start=start,
        end=end,
        messages=n,
        accepted=0,
        rejected=n,
        rejects_by_reason={R.INVALID_JSON: n},
        tokens={},
        cost_usd="0",
        unpriced=0,
        files=(FileRecord(dlq_rel_path("2025-11-29", name), "dlq", n, 100, None),),
        writer="w",
        written_at_ms=NOW_MS,
    )
    return Durable(entry, pa.table({}), pa.table({}))


@dataclass
class CommitterRig:
    committer: Committer
    consumer: FakeConsumer
    clock: Clock


def committer(interval_s: float = 5.0) -> CommitterRig:
    consumer = FakeConsumer()
    clock = Clock()
    return CommitterRig(Committer(consumer, interval_s, clock=clock), consumer, clock)  # type: ignore[arg-type]


def test_commit_after_each_durable_flush_only_what_changed() -> None:
    rig = committer()
    c, consumer = rig.committer, rig.consumer
    c.submit(durable(0, 0, 10))
    assert consumer.calls == [[(TOPIC, 0, 10)]]
    c.submit(durable(1, 0, 5))
    assert consumer.calls[-1] == [(TOPIC, 1, 5)]
    c.submit(durable(0, 10, 12))
    assert consumer.calls[-1] == [(TOPIC, 0, 12)]
    assert c.committed == {(TOPIC, 0): 12, (TOPIC, 1): 5}
    # nothing changed: the timer commits nothing
    rig.clock.now += 10
    c.poll()
    c.commit()
    assert len(consumer.calls) == 3


def test_failed_commit_is_retried_on_the_timer() -> None:
    rig = committer(interval_s=5.0)
    c, consumer = rig.committer, rig.consumer
    consumer.fail = 2
    c.submit(durable(0, 0, 10))
    assert consumer.calls == [[(TOPIC, 0, 10)]] and c.committed == {}
    rig.clock.now += 4.9
    c.poll()
    assert len(consumer.calls) == 1  # not before the interval
    rig.clock.now += 0.1
    c.poll()  # retried, fails again
    assert consumer.calls[-1] == [(TOPIC, 0, 10)] and len(consumer.calls) == 2 and c.committed == {}
    c.poll()
    assert len(consumer.calls) == 2  # the failed attempt restarted the interval
    rig.clock.now += 5
    c.poll()
    assert len(consumer.calls) == 3 and c.committed == {(TOPIC, 0): 10}
    rig.clock.now += 5
    c.poll()
    assert len(consumer.calls) == 3


def test_a_new_flush_also_commits_what_failed_before() -> None:
    rig = committer()
    c, consumer = rig.committer, rig.consumer
    consumer.fail = 1
    c.submit(durable(0, 0, 10))
    c.submit(durable(1, 0, 3))
    assert consumer.calls[-1] == [(TOPIC, 0, 10), (TOPIC, 1, 3)]
    assert c.committed == {(TOPIC, 0): 10, (TOPIC, 1): 3}


def test_partition_error_in_a_commit_is_retried_for_that_partition_only() -> None:
    rig = committer()
    c, consumer = rig.committer, rig.consumer
    consumer.bad = {(TOPIC, 1)}
    c.submit(durable(0, 0, 10))
    c.submit(durable(1, 0, 4))
    assert c.committed == {(TOPIC, 0): 10}
    consumer.bad = set()
    rig.clock.now += 5
    c.poll()
    assert consumer.calls[-1] == [(TOPIC, 1, 4)]
    assert c.committed == {(TOPIC, 0): 10, (TOPIC, 1): 4}


def test_forgotten_partitions_are_not_committed() -> None:
    rig = committer()
    c, consumer = rig.committer, rig.consumer
    consumer.fail = 1
    c.submit(durable(0, 0, 10))
    c.forget([(TOPIC, 0)])
    rig.clock.now += 5
    c.poll()
    assert len(consumer.calls) == 1
    assert c.durable == {} and c.committed == {}


def test_a_fenced_rewrite_leaves_no_temp_files(tmp_path: Path) -> None:
    """write_flush leaves no temp names, also when a rewrite of the same range is fenced."""
    lake = tmp_path / "lake"
    flush = make_flush([event(1), b"{"], 0, after=None)
    write_flush(str(lake), flush, "w")
    with pytest.raises(ManifestConflict):
        write_flush(str(lake), flush, "w")
    assert tmp_files(lake) == []
    names = {p.name for p in lake.rglob("*") if p.is_file()}
    assert not any(n.startswith(".") for n in names), names


# --- Pipeline's partition callbacks (a fake consumer, no broker) ----------------------------


class FakeGroupConsumer(FakeConsumer):
    """What Pipeline asks of its consumer in the assignment callbacks."""

    def __init__(self) -> None:
        super().__init__()
        self.assigned: list[tuple[str, int, int]] = []
        self.seeks: list[tuple[str, int, int]] = []

    def assign(self, partitions: list[Any]) -> None:
        self.assigned = [(tp.topic, tp.partition, tp.offset) for tp in partitions]

    def unassign(self) -> None:
        self.assigned = []

    def seek(self, tp: Any) -> None:
        self.seeks.append((tp.topic, tp.partition, tp.offset))

    def pause(self, partitions: list[Any]) -> None:
        self.paused = [(tp.topic, tp.partition) for tp in partitions]

    def resume(self, partitions: list[Any]) -> None:
        self.resumed = [(tp.topic, tp.partition) for tp in partitions]

    def close(self) -> None:
        return None


def pipeline(lake: Path) -> tuple[Any, FakeGroupConsumer]:
    from meter.config import Config
    from meter.pipeline import Pipeline

    consumer = FakeGroupConsumer()
    config = Config(brokers="127.0.0.1:9092", topic=(TOPIC,), lake=str(lake), commit_interval_s=5.0)
    return Pipeline(config, CATALOG, consumer_factory=lambda _settings: consumer), consumer


def test_assignment_resumes_from_the_manifest(tmp_path: Path) -> None:
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    lake = tmp_path / "lake"
    write_flush(str(lake), make_flush([event(1), event(2)], 0, after=None, partition=0), "w")
    p, consumer = pipeline(lake)
    try:
        p._on_assign(consumer, [TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)])
        assert consumer.assigned == [(TOPIC, 0, 2), (TOPIC, 1, OFFSET_BEGINNING)]
        assert p.positions == {(TOPIC, 0): 2, (TOPIC, 1): None}
    finally:
        p.writer.close()


def test_assignment_removes_temp_files_of_dead_manifest_and_intent_writes(tmp_path: Path) -> None:
    """A SIGKILL while an intent or a manifest entry is written leaves a hidden temp that no
    reader sees (with several writer threads, one per partition in flight). Taking the
    partition removes its own at once; another partition's fresh intent temp stays."""
    from confluent_kafka import TopicPartition

    from meter.lake import intent_path, temp_name
    from meter.manifest import partition_dir

    lake = tmp_path / "lake"
    write_flush(str(lake), make_flush([event(1)], 0, after=None), "w")
    intents = intent_path(lake, TOPIC, 0).parent
    ours = [
        partition_dir(lake, TOPIC, 0) / temp_name("00000000000000000001.json", "dead"),
        intents / temp_name("partition=0.json", "dead"),
    ]
    others = [intents / temp_name("partition=1.json", "live")]
    for path in ours + others:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"{")
    p, consumer = pipeline(lake)
    try:
        p._on_assign(consumer, [TopicPartition(TOPIC, 0)])
    finally:
        p.writer.close()
    assert [path.exists() for path in ours + others] == [False, False, True]
    assert p.positions == {(TOPIC, 0): 1}


def test_assignment_recommits_the_manifest_position(tmp_path: Path) -> None:
    """DESIGN 6: offsets are committed again on a timer, because a commit that failed in a
    broker fault is not retried and a stale committed offset keeps lag alerts firing. A daemon
    that flushed a partition and then failed to commit it (broker down until after its stop)
    leaves Kafka's committed offset behind the manifest; the next owner of the partition must
    commit the manifest's position, or the stale offset stays for as long as the partition is
    idle. Today the Committer only learns positions from its own flushes."""
    from confluent_kafka import TopicPartition

    lake = tmp_path / "lake"
    write_flush(str(lake), make_flush([event(1), event(2)], 0, after=None, partition=0), "w")
    p, consumer = pipeline(lake)
    clock = Clock()
    p.committer.clock = clock
    p.committer.last_commit = clock()
    try:
        p._on_assign(consumer, [TopicPartition(TOPIC, 0)])
        clock.now += 5.0
        p.committer.poll()
        assert consumer.calls == [[(TOPIC, 0, 2)]]
    finally:
        p.writer.close()


def test_ready_once_partitions_are_assigned_to_a_new_lake(tmp_path: Path) -> None:
    """/readyz: partitions assigned and the lake writable. A new lake's directory does not
    exist until the first flush, so a daemon deployed on a new lake over an idle topic would
    report not-ready for as long as no event arrives."""
    from confluent_kafka import TopicPartition

    p, consumer = pipeline(tmp_path / "new-lake")
    try:
        assert not p.ready()  # nothing assigned yet
        p._on_assign(consumer, [TopicPartition(TOPIC, 0)])
        assert p.ready()
    finally:
        p.writer.close()


# --- a writer that lost its partition (a zombie) ----------------------------------------------


def test_flushes_queued_behind_a_fenced_one_are_fenced_too(tmp_path: Path) -> None:
    """A zombie (a daemon that lost the partition but still flushes) has two flushes of one
    partition in flight: [5, 12) built on the chain end 5 it read, then [12, 14) built on the
    first one's end. The partition's new owner already wrote [5, 9) and [9, 15). The first
    flush collides at 5, as `append_entry` intends; the second must not be written either: 12
    was never a chain end, so nothing collides there, and an entry at 12 overlaps [9, 15) and
    breaks the partition's manifest for every reader."""
    lake = str(tmp_path / "lake")
    write_flush(lake, make_flush([event(i) for i in range(5)], 0, after=None), "common")
    write_flush(lake, make_flush([event(i) for i in range(5, 9)], 5, after=5), "owner")
    write_flush(lake, make_flush([event(i) for i in range(9, 15)], 9, after=9), "owner")

    sink = Sink()
    conflicts: list[Flush] = []
    zombie = LakeWriter(sink, lake, "zombie", conflicts.append)
    try:
        first = make_flush([event(i) for i in range(5, 12)], 5, after=5)
        second = make_flush([event(i) for i in range(12, 14)], 12, after=12)
        zombie.submit(first)
        zombie.submit(second)
        zombie.join()
    finally:
        zombie.close()
    assert conflicts and conflicts[0] is first
    assert [(d.entry.start, d.entry.end) for d in sink.items] == [], (
        "a flush built on a fenced one was written"
    )
    state = load_partition(lake, TOPIC, 0)  # raises ManifestCorrupt on an overlap
    assert [(e.start, e.end) for e in state.entries] == [(0, 5), (5, 9), (9, 15)]


class FakeMessage:
    def __init__(self, topic: str, partition: int, offset: int, value: bytes) -> None:
        self._where = (topic, partition, offset)
        self._value = value

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._where[0]

    def partition(self) -> int:
        return self._where[1]

    def offset(self) -> int:
        return self._where[2]

    def value(self) -> bytes:
        return self._value

    def headers(self) -> None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return (1, ARRIVAL_MS)  # TIMESTAMP_CREATE_TIME


def test_an_owner_fenced_by_a_zombie_resumes_from_the_manifest(tmp_path: Path) -> None:
    """The writer that collides is not always the stale one: here a zombie appended [0, 3)
    while the partition's owner had [0, 5) buffered. ManifestConflict's contract: reload the
    partition and resume from its position, discarding the batch. Today the pipeline drops the
    partition from `positions` instead, so every later message of it is skipped until the
    next rebalance, which in a stable group does not come: the partition stops being metered.
    Resuming needs a seek: the consumer has already fetched past the manifest's position."""
    from confluent_kafka import TopicPartition

    lake = tmp_path / "lake"
    p, consumer = pipeline(lake)
    key = (TOPIC, 0)
    try:
        p._on_assign(consumer, [TopicPartition(TOPIC, 0)])
        p.parse.submit(p._chunks([FakeMessage(TOPIC, 0, i, event(i)) for i in range(5)]))
        write_flush(str(lake), make_flush([event(i) for i in range(3)], 0, after=None), "zombie")
        p.buffer.join()
        p.writer.join()
        assert load_partition(lake, TOPIC, 0).position == 3
        assert p.positions.get(key) == 3, "the fenced partition is no longer fed"
        assert consumer.seeks == [(TOPIC, 0, 3)]
        # what the consumer delivers from there is metered again
        chunks = p._chunks([FakeMessage(TOPIC, 0, i, event(i)) for i in range(3, 6)])
        assert [c.offsets for c in chunks] == [[3, 4, 5]]
    finally:
        p.writer.close()


def test_consume_calls_ask_for_about_consume_max_bytes(tmp_path: Path) -> None:
    """10,000 messages of 100 events would be 330 MB in one call: the count follows the
    size of the last messages, between 1 and consume_batch."""
    from confluent_kafka import TopicPartition

    p, consumer = pipeline(tmp_path / "lake")
    try:
        p._on_assign(consumer, [TopicPartition(TOPIC, 0)])
        assert p.consume_count == 100  # before anything is known
        p._size_consume(p._chunks([FakeMessage(TOPIC, 0, i, b"x" * 100_000) for i in range(3)]))
        assert p.consume_count == p.config.consume_max_bytes // 100_000 == 83
        p._size_consume(p._chunks([FakeMessage(TOPIC, 0, i, b"x" * 300) for i in range(3, 6)]))
        assert p.consume_count == p.config.consume_batch
        p._size_consume(p._chunks([FakeMessage(TOPIC, 0, 9, b"x" * (64 << 20))]))
        assert p.consume_count == 1
        p._size_consume([])  # nothing consumed: keep the last size
        assert p.consume_count == 1
    finally:
        p.writer.close()
