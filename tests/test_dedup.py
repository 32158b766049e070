"""Event-id dedup: the compiled id set, and the pipeline step (window, cap, rebuild from the lake)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest
from meter._dedup import IdSet

from meter import reasons as R
from meter.compact import CompactPolicy, compact
from meter.dedup import Dedup
from meter.manifest import PartitionFiles, load_files
from meter.pricing import load_catalog
from meter.schema import DEFAULT_LATENESS_MS
from meter.stages import Chunk, Flush, ParseAndPrice, Rows, write_flush

NOW_MS = 1_795_000_000_000
TOPIC = "usage"


def event(i: int, user: str = "ada") -> bytes:
    return (
        f'{{"event_id":"e-{i}","ts":{NOW_MS - 1000},"user":"{user}","model":"gpt-5",'
        f'"input_tokens":{10 + i},"output_tokens":5}}'
    ).encode()


class Sink:
    def __init__(self) -> None:
        self.items: list[Rows] = []

    def submit(self, item: Rows) -> None:
        self.items.append(item)

    def poll(self) -> None: ...

    def join(self) -> None: ...

    def close(self) -> None: ...


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rows_of(payloads: list[bytes], first_offset: int = 0, partition: int = 0) -> Rows:
    sink = Sink()
    chunk = Chunk(
        TOPIC, partition, list(payloads), list(range(first_offset, first_offset + len(payloads))), NOW_MS
    )
    ParseAndPrice(sink, load_catalog(), DEFAULT_LATENESS_MS, clock_ms=lambda: NOW_MS).submit([chunk])
    return sink.items[0]


def marks(ids: list[str], into: IdSet, insert: bool = True) -> list[int]:
    out = bytearray(len(ids))
    (into.add if insert else into.mark)(pa.array(ids, pa.string()), out)
    return list(out)


class TestIdSet:
    def test_add_marks_ids_seen_before_and_earlier_in_the_same_array(self) -> None:
        ids = IdSet()
        assert marks(["a", "b", "a", "c"], ids) == [0, 0, 1, 0]
        assert len(ids) == 3
        assert marks(["c", "x", "a"], ids, insert=False) == [1, 0, 1]
        assert len(ids) == 3  # mark never inserts

    def test_premarked_ids_are_neither_checked_nor_inserted(self) -> None:
        ids = IdSet()
        out = bytearray([1, 0])
        ids.add(pa.array(["a", "b"]), out)
        assert list(out) == [1, 0] and len(ids) == 1
        assert marks(["a"], ids, insert=False) == [0]

    def test_sliced_arrays_hash_their_own_values(self) -> None:
        ids = IdSet()
        marks(["x", "y"], ids)
        assert marks(["q", "y", "z"], ids, insert=False) == [0, 1, 0]
        sliced = pa.array(["x", "zzz", "y", "w"]).slice(1, 2)
        out = bytearray(2)
        ids.mark(sliced, out)
        assert list(out) == [0, 1]

    def test_a_million_distinct_ids_have_no_false_duplicates_and_grow(self) -> None:
        ids = IdSet()
        values = pa.array([f"01JDQ6ZK4M8N2P3R5S7T{i:06d}" for i in range(1_000_000)])
        out = bytearray(len(values))
        ids.add(values, out)
        assert sum(out) == 0 and len(ids) == 1_000_000
        assert ids.nbytes <= 64 * 1_000_000  # documented: 32-64 MB per million ids
        again = bytearray(len(values))
        ids.mark(values, again)
        assert sum(again) == 1_000_000

    def test_ids_differing_only_in_length_or_tail_bytes_differ(self) -> None:
        ids = IdSet()
        values = ["", "a", "a\x00", "abcdefgh", "abcdefgh\x00", "abcdefghi", "abcdefgi"]
        assert marks(values, ids) == [0] * len(values)

    def test_rejects_what_is_not_a_string_array(self) -> None:
        with pytest.raises(TypeError):
            IdSet().add(pa.array([1, 2]), bytearray(2))
        with pytest.raises(ValueError):
            IdSet().add(pa.array(["a", None]), bytearray(2))
        with pytest.raises(ValueError):
            IdSet().add(pa.array(["a"]), bytearray(2))


def dedup(lake: Path, clock: Clock, window_s: float = 600, max_ids: int = 1_000_000) -> tuple[Dedup, Sink]:
    sink = Sink()
    return Dedup(sink, str(lake), window_s, max_ids, clock=clock), sink


class TestDedupStep:
    def test_a_resent_message_becomes_duplicate_event_rows_with_its_raw_bytes(self, tmp_path: Path) -> None:
        step, sink = dedup(tmp_path, Clock())
        step.submit(rows_of([event(1), event(2)]))
        step.submit(rows_of([event(2), event(3) + b"\n" + event(1)], first_offset=2))
        first, second = sink.items
        assert first.events.num_rows == 2 and first.dlq.num_rows == 0
        assert second.events.column("event_id").to_pylist() == ["e-3"]
        dlq = second.dlq.to_pylist()
        assert [(r["reason"], r["kafka_offset"], r["line"]) for r in dlq] == [
            (R.DUPLICATE_EVENT, 2, 0),
            (R.DUPLICATE_EVENT, 3, 1),
        ]
        assert [r["raw"] for r in dlq] == [event(2), event(1)]
        assert "e-2" in dlq[0]["detail"]
        # accounting: every line is an event row or a DLQ row
        assert second.events.num_rows + second.dlq.num_rows == 3

    def test_repeats_within_one_message_are_caught(self, tmp_path: Path) -> None:
        step, sink = dedup(tmp_path, Clock())
        step.submit(rows_of([event(7) + b"\n" + event(7) + b"\n" + event(8)]))
        [rows] = sink.items
        assert rows.events.column("event_id").to_pylist() == ["e-7", "e-8"]
        assert rows.dlq.column("reason").to_pylist() == [R.DUPLICATE_EVENT]

    def test_partitions_are_separate_scopes(self, tmp_path: Path) -> None:
        step, sink = dedup(tmp_path, Clock())
        step.submit(rows_of([event(1)], partition=0))
        step.submit(rows_of([event(1)], partition=1))
        assert [r.dlq.num_rows for r in sink.items] == [0, 0]

    def test_ids_expire_after_the_window(self, tmp_path: Path) -> None:
        clock = Clock()
        step, sink = dedup(tmp_path, clock, window_s=100)
        step.submit(rows_of([event(1)]))
        clock.now += 99
        step.poll()
        step.submit(rows_of([event(1)], first_offset=1))
        clock.now += 200  # every generation holding e-1 is now older than the window
        step.poll()
        step.submit(rows_of([event(1)], first_offset=2))
        assert [r.dlq.num_rows for r in sink.items] == [0, 1, 0]

    def test_the_cap_drops_the_oldest_generation_and_reports_the_shorter_reach(self, tmp_path: Path) -> None:
        clock = Clock()
        step, _ = dedup(tmp_path, clock, window_s=400, max_ids=3)
        for i in range(5):
            step.submit(rows_of([event(i)], first_offset=i))
            clock.now += 100  # one generation per submit
            step.poll()
        assert step.held_ids <= 3
        assert step.effective_window_s < 400

    def test_after_a_restart_ids_come_back_from_the_lake_only_for_durable_events(
        self, tmp_path: Path
    ) -> None:
        lake = tmp_path / "lake"
        clock = Clock(now=time.time())
        step, sink = dedup(lake, clock)
        written = rows_of([event(1), event(2)])
        step.submit(written)
        flush = Flush(TOPIC, 0, 0, None, 2, 0, 2, sink.items[0].events, sink.items[0].dlq)
        write_flush(str(lake), flush, "test")
        step.submit(rows_of([event(3)], first_offset=2))  # buffered, never written: a crash loses it

        restarted, sink2 = dedup(lake, clock)
        restarted.submit(rows_of([event(2), event(3)], first_offset=2))
        [rows] = sink2.items
        assert rows.dlq.column("reason").to_pylist() == [R.DUPLICATE_EVENT]
        assert rows.events.column("event_id").to_pylist() == ["e-3"]  # re-read after the crash: counted once

    def test_entries_written_before_the_window_are_not_reloaded(self, tmp_path: Path) -> None:
        lake = tmp_path / "lake"
        step, sink = dedup(lake, Clock(now=time.time()), window_s=60)
        step.submit(rows_of([event(1)]))
        write_flush(
            str(lake), Flush(TOPIC, 0, 0, None, 1, 0, 1, sink.items[0].events, sink.items[0].dlq), "t"
        )
        # entries are stamped with the wall clock at write time; an hour later they are outside
        restarted, sink2 = dedup(lake, Clock(now=time.time() + 3600), window_s=60)
        restarted.submit(rows_of([event(1)], first_offset=1))
        assert sink2.items[0].dlq.num_rows == 0

    def test_ids_come_back_from_the_files_listed_after_a_compaction_deleted_the_flushed_ones(
        self, tmp_path: Path
    ) -> None:
        lake, clock = flushed_then_compacted(tmp_path)
        [merged] = [f for f in load_files(lake, TOPIC, 0).live if f.kind == "events"]
        assert merged.rows == 3
        assert_every_id_is_back(lake, clock)

    def test_a_listing_whose_file_a_rewrite_deleted_meanwhile_is_taken_again(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        stale: list[PartitionFiles] = []
        lake, clock = flushed_then_compacted(tmp_path, before=stale.append)
        listings = iter([stale[0], load_files(lake, TOPIC, 0)])
        monkeypatch.setattr("meter.dedup.load_files", lambda *_: next(listings))
        assert_every_id_is_back(lake, clock)


def flushed_then_compacted(
    tmp_path: Path, before: Callable[[PartitionFiles], None] = lambda _: None
) -> tuple[Path, Clock]:
    """A lake of two flushes (ids e-1, e-2, then e-3) whose event files a compaction merged,
    then deleted at once (no deletion grace); ``before`` sees the listing before it."""
    lake = tmp_path / "lake"
    clock = Clock(now=time.time())
    step, sink = dedup(lake, clock)
    for start, after, ids in ((0, None, [1, 2]), (2, 2, [3])):
        step.submit(rows_of([event(i) for i in ids], first_offset=start))
        rows = sink.items[-1]
        write_flush(
            str(lake),
            Flush(TOPIC, 0, start, after, start + len(ids), 0, len(ids), rows.events, rows.dlq),
            "t",
        )
    before(load_files(lake, TOPIC, 0))
    report = compact(lake, CompactPolicy(grace_s=0, delete_grace_s=0), now_ms=NOW_MS + 10 * 3_600_000)
    assert (report.files_replaced, report.retired_deleted) == (2, 2)
    return lake, clock


def assert_every_id_is_back(lake: Path, clock: Clock) -> None:
    restarted, sink = dedup(lake, clock)
    restarted.submit(rows_of([event(1), event(3), event(4)], first_offset=3))
    [rows] = sink.items
    assert rows.dlq.column("reason").to_pylist() == [R.DUPLICATE_EVENT] * 2
    assert rows.events.column("event_id").to_pylist() == ["e-4"]
