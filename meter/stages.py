"""The pipeline's steps. Each has the same small lifecycle (`submit`, `poll`, `join`,
`close`) and hands its output to the next step; meter/pipeline.py composes them."""

from __future__ import annotations

import bisect
import functools
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from meter import crashpoint, metrics
from meter import reasons as R
from meter.lake import (
    data_file_name,
    dlq_rel_path,
    events_rel_path,
    split_by_hour,
    split_dlq_by_date,
    write_intent,
    write_parquet_atomic,
)
from meter.manifest import (
    FileRecord,
    ManifestConflict,
    ManifestEntry,
    append_entry,
    event_totals,
    reject_counts,
)
from meter.parser import parse_batch
from meter.pricing import Catalog
from meter.reasons import Reject
from meter.schema import DLQ, LAKE_EVENTS

log = logging.getLogger("meter.pipeline")

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)
TP = tuple[str, int]


class Step(Protocol[T_contra]):
    """One stage: take work, do time-driven work on poll, finish all work on join."""

    def submit(self, item: T_contra) -> None: ...

    def poll(self) -> None: ...

    def join(self) -> None: ...

    def close(self) -> None: ...


class Terminal(Generic[T]):
    """Shared no-op lifecycle for steps that forward nothing on poll/join."""

    def poll(self) -> None:
        return None

    def join(self) -> None:
        return None

    def close(self) -> None:
        return None


# ---------------------------------------------------------------- items passed between steps


@dataclass
class Chunk:
    """The messages of one Kafka partition from one consume() call.

    `headers` and `timestamps` ((type, ms) as confluent-kafka gives them) are kept for the
    signature check, which needs the record's broker time and its meter-* headers.
    """

    topic: str
    partition: int
    payloads: list[bytes | None]
    offsets: list[int]
    arrival_ms: int
    # message.headers() ([(key, value)] or None), or the consumed Message itself (read in place)
    headers: list[Any] = field(default_factory=list)
    timestamps: list[tuple[int, int]] = field(default_factory=list)

    @functools.cached_property
    def nbytes(self) -> int:
        """Payload bytes; read once the chunk is complete (the consume loop, the buffer)."""
        return sum(len(p) for p in self.payloads if p is not None)


@dataclass
class Rows:
    """A chunk turned into lake rows: accepted events and dead-letter rows.

    `origin` and `lines` give each event row's message index and line in the chunk, so a
    later step can still turn a row into a dead-letter row holding its raw bytes.
    """

    chunk: Chunk
    events: pa.Table  # LAKE_EVENTS
    dlq: pa.Table  # DLQ
    origin: pa.Array
    lines: pa.Array

    def reject(self, mask: pa.BooleanArray, reason: str, details: list[str]) -> Rows:
        """Move the event rows where `mask` is true to the DLQ with `reason`, one detail each."""
        rejects = [
            Reject(message, line, reason, detail)
            for message, line, detail in zip(
                pc.filter(self.origin, mask).to_pylist(),
                pc.filter(self.lines, mask).to_pylist(),
                details,
                strict=True,
            )
        ]
        keep = pc.invert(mask)
        return Rows(
            self.chunk,
            self.events.filter(keep),
            pa.concat_tables([self.dlq, dlq_table(self.chunk, rejects)]),
            pc.filter(self.origin, keep),
            pc.filter(self.lines, keep),
        )


@dataclass
class Flush:
    """Everything buffered for one partition, to be written as one manifest entry."""

    topic: str
    partition: int
    start: int  # first offset covered: the chain end this writer built on
    after: int | None  # the manifest position read (None: no entry yet)
    end: int  # one past the last consumed offset: what gets committed
    epoch: int  # bumped when the partition resumes from the manifest; fences older flushes
    messages: int
    events: pa.Table
    dlq: pa.Table


@dataclass
class Durable:
    """A flush whose manifest entry is on disk: its offsets may now be committed."""

    entry: ManifestEntry
    events: pa.Table
    dlq: pa.Table
    usage: metrics.UsageSums | None = None  # the KPI sums, if the writer made them


# ---------------------------------------------------------------- parse + price


def raw_line(payload: bytes | None, line: int, whole_message: bool = False) -> bytes:
    """The bytes a reject refers to: its line, or the whole message for a message-level
    reject (`whole_message`: too large to split)."""
    if not payload:
        return b""
    if whole_message or b"\n" not in payload:
        return payload
    lines = payload.split(b"\n")
    return lines[line].removesuffix(b"\r") if line < len(lines) else payload


def dlq_table(chunk: Chunk, rejects: list[Reject]) -> pa.Table:
    offsets = [chunk.offsets[r.message_index] for r in rejects]
    return pa.table(
        {
            "raw": pa.array(
                [raw_line(chunk.payloads[r.message_index], r.line, r.reason == R.TOO_LARGE) for r in rejects],
                pa.binary(),
            ),
            "kafka_topic": pa.array([chunk.topic] * len(rejects), pa.string()),
            "kafka_partition": pa.array([chunk.partition] * len(rejects), pa.int32()),
            "kafka_offset": pa.array(offsets, pa.int64()),
            "line": pa.array([r.line for r in rejects], pa.int32()),
            "reason": pa.array([r.reason for r in rejects], pa.string()),
            "detail": pa.array([r.detail for r in rejects], pa.string()),
            "arrival_ts": pa.array([chunk.arrival_ms] * len(rejects), pa.int64()).cast(
                DLQ.field("arrival_ts").type
            ),
        },
        schema=DLQ,
    )


class ParseAndPrice(Terminal[list[Chunk]]):
    """Parse payloads (compiled parser), price rows at their event time, attach provenance.

    Takes the chunks of one consume() call and parses and prices them in one call each
    (fixed costs per call are a quarter of the work on chunks of a thousand rows), then
    hands on one `Rows` per chunk. Events whose model the catalog lacks stay with a null
    cost, or become `unknown_model` rejects when `reject_unknown` is set.
    """

    def __init__(
        self,
        next_step: Step[Rows],
        catalog: Catalog,
        lateness_ms: int,
        reject_unknown: bool = False,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ):
        self.next_step = next_step
        self.catalog = catalog
        self.lateness_ms = lateness_ms
        self.reject_unknown = reject_unknown
        self.clock_ms = clock_ms

    def submit(self, chunks: list[Chunk]) -> None:
        if not chunks:
            return
        payloads = [p for c in chunks for p in c.payloads] if len(chunks) > 1 else chunks[0].payloads
        result = parse_batch(payloads, now_ms=self.clock_ms(), lateness_ms=self.lateness_ms)
        priced = self.catalog.price(result.batch)
        offsets = pa.array([o for c in chunks for o in c.offsets], pa.int64())
        kafka_offset = pc.take(offsets, result.message_index)
        # Rows come in message order, so each chunk's rows are one contiguous slice.
        firsts = list(itertools.accumulate((len(c.payloads) for c in chunks), initial=0))
        cuts = pc.search_sorted(result.message_index, pa.array(firsts, pa.int32())).to_pylist()
        rejects: list[list[Reject]] = [[] for _ in chunks]
        for r in result.rejects:
            k = bisect.bisect_right(firsts, r.message_index) - 1
            rejects[k].append(r._replace(message_index=r.message_index - firsts[k]))
        for k, chunk in enumerate(chunks):
            lo, n = cuts[k], cuts[k + 1] - cuts[k]
            events = pa.Table.from_batches(
                [
                    pa.RecordBatch.from_arrays(
                        [
                            *priced.slice(lo, n).columns,
                            pa.repeat(pa.scalar(chunk.topic, pa.string()), n),
                            pa.repeat(pa.scalar(chunk.partition, pa.int32()), n),
                            kafka_offset.slice(lo, n),
                        ],
                        schema=LAKE_EVENTS,
                    )
                ]
            )
            origin = pc.subtract(result.message_index.slice(lo, n), pa.scalar(firsts[k], pa.int32()))
            rows = Rows(chunk, events, dlq_table(chunk, rejects[k]), origin, result.line_index.slice(lo, n))
            self.next_step.submit(self._unknown_models(rows) if self.reject_unknown and n else rows)

    @staticmethod
    def _unknown_models(rows: Rows) -> Rows:
        unknown = pc.is_null(rows.events.column("cost_usd"))
        if not pc.any(unknown).as_py():
            return rows
        models = pc.filter(rows.events.column("model"), unknown).to_pylist()
        return rows.reject(
            unknown, R.UNKNOWN_MODEL, [f"model {m!r} is not in the price catalog" for m in models]
        )


# ---------------------------------------------------------------- buffer per partition


@dataclass
class _Pending:
    rows: list[Rows] = field(default_factory=list)
    events: int = 0
    nbytes: int = 0
    messages: int = 0
    first_offset: int = -1
    last_offset: int = -1
    since: float = 0.0


class Buffer(Terminal[Rows]):
    """Accumulate rows per partition; emit a Flush per partition when a limit is reached.

    Limits: buffered events, buffered payload bytes, age of the oldest buffered message.
    `positions` holds each assigned partition's manifest chain end; a flush starts there.
    """

    def __init__(
        self,
        next_step: Step[Flush],
        positions: dict[TP, int | None],
        max_events: int,
        max_bytes: int,
        max_age_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.next_step = next_step
        self.positions = positions
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.clock = clock
        self.pending: dict[TP, _Pending] = {}
        self.epochs: dict[TP, int] = {}

    @property
    def buffered_bytes(self) -> int:
        return sum(p.nbytes for p in self.pending.values())

    @property
    def buffered_events(self) -> int:
        return sum(p.events for p in self.pending.values())

    def submit(self, rows: Rows) -> None:
        chunk = rows.chunk
        tp = (chunk.topic, chunk.partition)
        pending = self.pending.get(tp)
        if pending is None:
            pending = self.pending[tp] = _Pending(since=self.clock(), first_offset=chunk.offsets[0])
        pending.rows.append(rows)
        pending.events += rows.events.num_rows + rows.dlq.num_rows
        pending.nbytes += chunk.nbytes
        pending.messages += len(chunk.offsets)
        pending.last_offset = chunk.offsets[-1]

    def due(self) -> bool:
        if not self.pending:
            return False
        oldest = min(p.since for p in self.pending.values())
        return (
            self.buffered_events >= self.max_events
            or self.buffered_bytes >= self.max_bytes
            or self.clock() - oldest >= self.max_age_s
        )

    def poll(self) -> None:
        if self.due():
            self.flush(list(self.pending))

    def join(self) -> None:
        self.flush(list(self.pending))

    def flush(self, partitions: Iterable[TP]) -> None:
        for tp in partitions:
            pending = self.pending.pop(tp, None)
            if pending is None:
                continue
            after = self.positions.get(tp)
            start = pending.first_offset if after is None else after
            end = pending.last_offset + 1
            self.positions[tp] = end
            self.next_step.submit(
                Flush(
                    topic=tp[0],
                    partition=tp[1],
                    start=start,
                    after=after,
                    end=end,
                    epoch=self.epochs.get(tp, 0),
                    messages=pending.messages,
                    events=pa.concat_tables([r.events for r in pending.rows]),
                    dlq=pa.concat_tables([r.dlq for r in pending.rows]),
                )
            )

    def drop(self, partitions: Iterable[TP]) -> None:
        """Forget buffered rows of partitions lost without a chance to flush."""
        for tp in partitions:
            self.pending.pop(tp, None)

    def resume(self, tp: TP, position: int | None) -> None:
        """Start the partition again at the manifest's position: buffered rows go, and
        flushes already built on the old position are fenced by the new epoch."""
        self.pending.pop(tp, None)
        self.positions[tp] = position
        self.epochs[tp] = self.epochs.get(tp, 0) + 1


# ---------------------------------------------------------------- durable write to the lake


def write_flush(lake: str, flush: Flush, writer: str) -> ManifestEntry:
    """Write one partition's flush to the lake; return its durable manifest entry.

    Order (each step durable before the next; DESIGN 5):
      1. Record the intent: the files this flush is about to write, so a crash before
         step 3 leaves nothing that the next owner cannot find and remove.
      2. Write each data file (events per event-time hour, DLQ per arrival date) to a
         temporary name, fsync, rename into place, fsync the directory.
      3. Append the manifest entry with an exclusive link: from here the rows exist.
         A stale writer (one that lost the partition) collides here and stops.
      4. (Committer) commit `end` to Kafka; a failure there only re-reads the range into
         a manifest position that is already past it, so nothing is counted twice.
    """
    name = data_file_name(flush.topic, flush.partition, flush.start, flush.end)
    plan: list[tuple[str, str, pa.Table]] = [
        ("events", events_rel_path(date, hour, name), table)
        for (date, hour), table in split_by_hour(flush.events)
    ]
    plan += [("dlq", dlq_rel_path(date, name), table) for date, table in split_dlq_by_date(flush.dlq)]
    write_intent(lake, flush.topic, flush.partition, flush.start, flush.end, [rel for _, rel, _ in plan])
    crashpoint.at("after_intent", name)
    files = []
    for kind, rel, table in plan:
        out = write_parquet_atomic(table, f"{lake}/{rel}")
        files.append(FileRecord(rel, kind, table.num_rows, out.bytes, out.sha256))  # type: ignore[arg-type]
        crashpoint.at("after_file", rel)
    tokens, cost, unpriced = event_totals(flush.events)
    entry = ManifestEntry(
        topic=flush.topic,
        partition=flush.partition,
        start=flush.start,
        end=flush.end,
        messages=flush.messages,
        accepted=flush.events.num_rows,
        rejected=flush.dlq.num_rows,
        rejects_by_reason=reject_counts(flush.dlq),
        tokens=tokens,
        cost_usd=cost,
        unpriced=unpriced,
        files=tuple(files),
        writer=writer,
        written_at_ms=time.time_ns() // 1_000_000,
    )
    append_entry(lake, entry, after=flush.after)
    crashpoint.at("after_manifest", name)
    return entry


class LakeWriter(Terminal[Flush]):
    """Writes flushes on background threads (pyarrow releases the GIL while encoding, and
    a thread waiting on fsync holds no CPU), and forwards each as Durable once its manifest
    entry is on disk, in submission order.

    Flushes of different partitions are written at once, up to ``threads``; those of one
    partition one after the other, since each entry builds on the previous one's end.
    """

    def __init__(
        self,
        next_step: Step[Durable],
        lake: str,
        writer_id: str,
        on_conflict: Callable[[Flush], None],
        threads: int = 1,
    ):
        self.next_step = next_step
        self.lake = lake
        self.writer_id = writer_id
        self.on_conflict = on_conflict
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="meter-writer")
        self.in_flight: list[tuple[Flush, Future[Durable]]] = []
        # Per partition, the epoch of a flush that collided with another writer: every flush
        # of that epoch queued behind it builds on it and must not be written either.
        self.fenced: dict[TP, int] = {}

    def submit(self, flush: Flush) -> None:
        key = (flush.topic, flush.partition)
        before = next(
            (f for queued, f in reversed(self.in_flight) if (queued.topic, queued.partition) == key), None
        )
        self.in_flight.append((flush, self.executor.submit(self._write, flush, before)))

    def _write(self, flush: Flush, before: Future[Durable] | None) -> Durable:
        if before is not None:  # queued earlier on this FIFO pool: it runs or ran, never waits on us
            error = before.exception()
            if error is not None and not isinstance(error, ManifestConflict):
                raise RuntimeError(f"an earlier flush of {flush.topic}[{flush.partition}] failed") from error
        key = (flush.topic, flush.partition)
        if flush.epoch <= self.fenced.get(key, -1):
            raise ManifestConflict(flush.topic, flush.partition, flush.start, "a fenced earlier entry")
        started = time.monotonic()
        try:
            entry = write_flush(self.lake, flush, self.writer_id)
        except ManifestConflict:
            self.fenced[key] = flush.epoch
            raise
        except Exception:
            metrics.MANIFEST_WRITES.labels("failed").inc()
            raise
        metrics.FLUSH_SECONDS.observe(time.monotonic() - started)
        usage = metrics.DEFAULT.usage.sums(flush.events) if entry.accepted else None
        return Durable(entry, flush.events, flush.dlq, usage)

    def _forward_done(self, block: bool) -> None:
        while self.in_flight and (block or self.in_flight[0][1].done()):
            flush, future = self.in_flight.pop(0)
            try:
                durable = future.result()
            except ManifestConflict:
                metrics.MANIFEST_WRITES.labels("conflict").inc()
                log.warning(
                    "manifest conflict: another writer owns the range; dropping this flush",
                    extra={"topic": flush.topic, "partition": flush.partition, "start": flush.start},
                )
                self.on_conflict(flush)
                continue
            self.next_step.submit(durable)

    def poll(self) -> None:
        self._forward_done(block=False)

    def join(self) -> None:
        self._forward_done(block=True)

    def close(self) -> None:
        self.executor.shutdown(wait=True)


class DlqForwarder:
    """Also produces each durable dead-letter row to a Kafka topic (after the lake has it,
    so the topic never holds a reject the lake lacks). Value: the raw bytes, cut to fit a
    default broker's 1 MB message limit (the lake keeps them whole); headers say where the
    row came from and why."""

    #: Longest value produced; a longer raw row is cut and marked `meter-truncated`.
    MAX_VALUE = 900_000

    def __init__(self, topic: str, settings: dict[str, Any]):
        from confluent_kafka import Producer

        self.topic = topic
        self.producer = Producer({**settings, "acks": "all", "enable.idempotence": True, "linger.ms": 50})

    def forward(self, durable: Durable) -> None:
        for row in durable.dlq.to_pylist():
            raw = row["raw"]
            source = f"{row['kafka_topic']}/{row['kafka_partition']}/{row['kafka_offset']}"
            headers = [
                ("meter-reason", row["reason"].encode()),
                ("meter-detail", row["detail"].encode()),
                ("meter-source", source.encode()),
                ("meter-line", str(row["line"]).encode()),
            ]
            if len(raw) > self.MAX_VALUE:
                headers.append(("meter-truncated", str(len(raw)).encode()))
                raw = raw[: self.MAX_VALUE]
            self.producer.produce(self.topic, value=raw, headers=headers)
            self.producer.poll(0)

    def close(self, timeout_s: float = 10.0) -> None:
        left = self.producer.flush(timeout_s)
        if left:
            log.error("dead-letter rows not delivered to Kafka", extra={"topic": self.topic, "left": left})
