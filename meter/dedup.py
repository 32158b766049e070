"""Event-id dedup: a gateway's retry of a message (same event ids) is counted once.

Scope and assumption: ids are compared within one Kafka partition, so a producer must key
a retry like the original (meter.gen and meter.producer key by user) for it to land in the
same partition. The window is arrival time: an id is remembered at least `window_s`
seconds after it was seen, and at most `max_ids` ids are held per daemon (16-byte hashes
in a half-full open-addressing table: 32-64 MB per million ids); when the cap is hit the
oldest generation goes early, and `effective_window_s` says how far back dedup reaches.

Durable marks are the lake itself: when a partition is taken (or reloaded after a manifest
conflict), its set is rebuilt from the event ids of the manifest entries written within the
window, read from the event files the partition lists now (a compaction or restatement may
have replaced, and deleted, the files an entry names). Ids of rows still in the buffer are
held in memory too, so a retry arriving before the original is flushed is caught as well;
every failure path (crash, conflict, lost partition) throws memory away and rebuilds from
the lake, so an id is never remembered for an event that did not reach the lake (the trap
of marking before the durable write).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from meter import reasons as R
from meter._dedup import IdSet
from meter.lake import KIND_EVENTS, abs_path, parse_rel_path
from meter.manifest import load_files
from meter.stages import TP, Rows, Step, Terminal

log = logging.getLogger("meter.dedup")

#: Generations per window: memory is released in steps of window / GENERATIONS.
GENERATIONS = 4


@dataclass
class _Window:
    """One partition's ids in generations of (start time, ids), newest last."""

    generations: list[tuple[float, IdSet]] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(ids) for _, ids in self.generations)

    @property
    def nbytes(self) -> int:
        return sum(ids.nbytes for _, ids in self.generations)

    def newest(self, now: float, step_s: float, max_ids: int) -> IdSet:
        """The generation to add to: a new one every `step_s`, or once the newest is full, so
        the id cap can always release memory by dropping whole generations."""
        if (
            not self.generations
            or now - self.generations[-1][0] >= step_s
            or len(self.generations[-1][1]) >= max_ids
        ):
            self.generations.append((now, IdSet()))
        return self.generations[-1][1]

    def expire(self, now: float, window_s: float, step_s: float) -> None:
        """Drop generations whose every id is older than the window."""
        while self.generations and self.generations[0][0] + step_s + window_s <= now:
            self.generations.pop(0)


class Dedup(Terminal[Rows]):
    """Turn repeated event ids into `duplicate_event` dead-letter rows."""

    def __init__(
        self,
        next_step: Step[Rows],
        lake: str,
        window_s: float,
        max_ids: int,
        clock: Callable[[], float] = time.time,
    ):
        self.next_step = next_step
        self.lake = lake
        self.window_s = window_s
        self.step_s = window_s / GENERATIONS
        self.max_ids = max_ids
        self.generation_ids = max(1, max_ids // GENERATIONS)
        self.clock = clock
        self.windows: dict[TP, _Window] = {}
        self.effective_window_s = window_s

    @property
    def held_ids(self) -> int:
        return sum(len(w) for w in self.windows.values())

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.windows.values())

    def submit(self, rows: Rows) -> None:
        tp = (rows.chunk.topic, rows.chunk.partition)
        window = self.windows.get(tp)
        if window is None:
            window = self.load(tp)
        ids = rows.events.column("event_id").combine_chunks()
        if len(ids):
            marks = bytearray(len(ids))
            newest = window.newest(self.clock(), self.step_s, self.generation_ids)
            for _, older in window.generations[:-1]:
                older.mark(ids, marks)
            newest.add(ids, marks)
            if any(marks):
                mask = pc.cast(pa.array(memoryview(marks), pa.uint8()), pa.bool_())
                repeated = pc.filter(ids, mask).to_pylist()
                details = [
                    f"event_id {i!r} was already counted (dedup window {self.window_s:g} s)" for i in repeated
                ]
                rows = rows.reject(mask, R.DUPLICATE_EVENT, details)
        self.next_step.submit(rows)

    def poll(self) -> None:
        now = self.clock()
        for window in self.windows.values():
            window.expire(now, self.window_s, self.step_s)
        self._enforce_cap(now)

    def _enforce_cap(self, now: float) -> None:
        """Past `max_ids`, drop the oldest generation of any partition; the reach shrinks."""
        while self.held_ids > self.max_ids:
            oldest = min(
                (w for w in self.windows.values() if len(w.generations) > 1),
                key=lambda w: w.generations[0][0],
                default=None,
            )
            if oldest is None:
                break
            oldest.generations.pop(0)
            # ids from before the oldest remaining generation are forgotten
            self.effective_window_s = min(self.window_s, now - oldest.generations[0][0])
            log.warning(
                "dedup id cap reached; window shortened",
                extra={"effective_window_s": self.effective_window_s},
            )

    def load(self, tp: TP) -> _Window:
        """Rebuild a partition's ids from the lake: the events of entries written within the window."""
        since_ms = (self.clock() - self.window_s) * 1000
        window = _Window()
        ids = window.newest(self.clock(), self.step_s, self.generation_ids)
        try:
            self._read_recent(tp, since_ms, ids)
        except FileNotFoundError:
            # a rewrite deleted a listed file after a later record retired it: list again
            # (ids already added are marked, not added twice)
            self._read_recent(tp, since_ms, ids)
        self.windows[tp] = window
        return window

    def _read_recent(self, tp: TP, since_ms: float, ids: IdSet) -> None:
        """Add the ids of the listed event files that hold offsets of an entry written
        since ``since_ms``; a merged file also brings older ids, which were counted too."""
        pf = load_files(self.lake, *tp)
        starts: list[int] = []
        ends: list[int] = []
        for e in pf.state.entries:
            if e.written_at_ms < since_ms:
                continue
            if ends and ends[-1] == e.start:
                ends[-1] = e.end  # the chain is contiguous: recent entries form few runs
            else:
                starts.append(e.start)
                ends.append(e.end)
        for f in pf.live:
            if f.kind != KIND_EVENTS:
                continue
            p = parse_rel_path(f.path)
            i = bisect.bisect_left(ends, p.start + 1)  # the first run ending after the file starts
            if i < len(starts) and starts[i] < p.end:
                column = pq.read_table(abs_path(self.lake, f.path), columns=["event_id"]).column(0)
                ids.add(column.combine_chunks(), bytearray(len(column)))

    def forget(self, partitions: Iterable[TP]) -> None:
        for tp in partitions:
            self.windows.pop(tp, None)
