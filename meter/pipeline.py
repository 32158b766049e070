"""The daemon's data flow on one screen.

    Kafka consume batch
      -> ParseAndPrice   compiled parser, catalog price at event time, provenance columns
      -> Buffer          per partition, until max events / bytes / age
      -> LakeWriter      intent, Parquet files, manifest entry (background threads)
      -> Committer       Kafka offsets after the manifest entry is durable; metrics

Steps are built inside out, each handed the next. Partitions resume from the lake's
manifest on every assignment, never from Kafka's committed offsets; revoked partitions
are flushed before they are released; a stop flushes, commits and closes.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition

from meter import lake as lake_mod
from meter import metrics, systemd
from meter.config import Config
from meter.dedup import Dedup
from meter.manifest import is_entry_name, load_partition, partition_dir
from meter.pricing import Catalog, load_catalog
from meter.signing import Verified, Verify
from meter.stages import TP, Buffer, Chunk, DlqForwarder, Durable, Flush, LakeWriter, ParseAndPrice, Terminal

if TYPE_CHECKING:
    from meter.rollup import RollupScheduler

log = logging.getLogger("meter.pipeline")


class Committer(Terminal[Durable]):
    """Commits each durable flush's end offset, and all durable positions again on a timer:
    a commit that fails during a broker fault is not retried by librdkafka, and a stale
    committed offset keeps lag alerts firing. Metrics move only here, after durability."""

    def __init__(
        self,
        consumer: Consumer,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        dlq: DlqForwarder | None = None,
    ):
        self.consumer = consumer
        self.dlq = dlq
        self.interval_s = interval_s
        self.clock = clock
        self.durable: dict[TP, int] = {}
        self.committed: dict[TP, int] = {}
        self.last_commit = clock()
        self.last_durable = time.monotonic()  # readiness: when a flush last became durable

    def submit(self, item: Durable) -> None:
        entry = item.entry
        self.durable[(entry.topic, entry.partition)] = entry.end
        self.last_durable = time.monotonic()
        metrics.record_flush(item)
        if self.dlq is not None:
            self.dlq.forward(item)
        self.commit()

    def commit(self) -> None:
        todo = {tp: end for tp, end in self.durable.items() if self.committed.get(tp) != end}
        self.last_commit = self.clock()
        if not todo:
            return
        offsets = [TopicPartition(t, p, end) for (t, p), end in todo.items()]
        try:
            results = self.consumer.commit(offsets=offsets, asynchronous=False) or []
        except KafkaException as error:
            metrics.COMMITS.labels("failed").inc()
            log.warning("offset commit failed; retrying on the timer", extra={"error": str(error)})
            return
        for tp in results:
            if tp.error is None:
                self.committed[(tp.topic, tp.partition)] = tp.offset
        metrics.COMMITS.labels("ok").inc()
        metrics.LAST_COMMIT.set_to_current_time()

    def poll(self) -> None:
        if self.clock() - self.last_commit >= self.interval_s:
            self.commit()

    def forget(self, partitions: list[TP]) -> None:
        for tp in partitions:
            self.durable.pop(tp, None)
            self.committed.pop(tp, None)


class Pipeline:
    """Owns the consumer and the steps; runs until `stop` is set."""

    def __init__(
        self,
        config: Config,
        catalog: Catalog | None = None,
        consumer_factory: Callable[[dict[str, Any]], Consumer] = Consumer,
    ):
        self.config = config
        self.catalog = catalog if catalog is not None else load_catalog(config.catalog)
        os.makedirs(config.lake, exist_ok=True)
        self.writer_id = f"{socket.gethostname()}:{os.getpid()}"
        self.consumer = consumer_factory(config.consumer_settings())
        self.positions: dict[TP, int | None] = {}
        self.paused = False
        self.held: set[TP] = set()  # partitions held by the offset alarm: backpressure never resumes them
        dlq = DlqForwarder(config.dlq_topic, config.producer_settings()) if config.dlq_topic else None
        self.committer = Committer(self.consumer, config.commit_interval_s, dlq=dlq)
        self.writer = LakeWriter(
            self.committer, config.lake, self.writer_id, self._on_conflict, config.writer_threads
        )
        self.buffer = Buffer(
            self.writer,
            self.positions,
            config.batch_max_events,
            config.batch_max_bytes,
            config.batch_max_age_s,
        )
        self.dedup = (
            Dedup(self.buffer, config.lake, config.dedup_window_s, config.dedup_max_ids)
            if config.dedup_window_s > 0
            else None
        )
        self.parse = ParseAndPrice(
            Verified(self.dedup or self.buffer),
            self.catalog,
            config.lateness_ms,
            config.reject_unknown_models,
        )
        self.verify = Verify.from_config(config, self.parse)  # signatures, before parsing (DESIGN 8)
        self.steps = tuple(
            step
            for step in (self.verify, self.parse, self.dedup, self.buffer, self.writer, self.committer)
            if step
        )
        metrics.configure(config)
        self.idle_at = time.monotonic()  # readiness: when nothing last waited to be flushed
        # Messages per consume() call; sized by `_size_consume`, small until the first batch.
        self.consume_count = min(config.consume_batch, 100)

    # ------------------------------------------------------------ partitions

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Resume each partition from the manifest, after removing what a crashed flush left
        (its data files, and temp files of its intent or manifest entry)."""
        self.writer.join()  # nothing of an earlier ownership may land after the manifest is read
        lake = self.config.lake
        for tp in partitions:
            key = (tp.topic, tp.partition)

            def covered(offset: int, topic: str = tp.topic, partition: int = tp.partition) -> bool:
                return load_partition(lake, topic, partition).covers(offset)  # fresh read, see clear_orphans

            lake_mod.clear_orphans(lake, tp.topic, tp.partition, covered)
            for path in self._clear_temps(tp.topic, tp.partition):
                log.info("removed a dead write's temp file", extra={"path": str(path)})
            position = load_partition(lake, tp.topic, tp.partition).position
            self._resume(key, position)
            tp.offset = OFFSET_BEGINNING if position is None else position
            if position is not None:
                # Kafka's committed offset may lag the manifest (a commit lost in a broker
                # fault before a stop): the timer commits the manifest's position again.
                self.committer.durable[key] = position
        consumer.assign(partitions)
        # librdkafka keeps an application pause across unassign/assign: match the current state
        self.held.difference_update((tp.topic, tp.partition) for tp in partitions)
        (consumer.pause if self.paused else consumer.resume)(partitions)
        metrics.ASSIGNED.set(len(self.positions))
        metrics.REBALANCES.labels("assign").inc()
        systemd.notifier().ready("consuming")  # the group is joined and partitions resumed
        log.info(
            "partitions assigned",
            extra={"partitions": [f"{t.topic}[{t.partition}]@{t.offset}" for t in partitions]},
        )

    def _clear_temps(self, topic: str, partition: int) -> list[Path]:
        """Temp files of this partition's intent and entries (their writer is dead or fenced:
        the partition is ours now), and any other dead write's in those directories."""
        intent = lake_mod.intent_path(self.config.lake, topic, partition)
        dirs = (partition_dir(self.config.lake, topic, partition), intent.parent)
        return lake_mod.clear_temps(
            dirs, lambda name: name == intent.name or is_entry_name(name), time.time()
        )

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Flush what was consumed from revoked partitions and commit it before release."""
        keys = [(tp.topic, tp.partition) for tp in partitions]
        self.buffer.flush(keys)
        self.writer.join()
        self.committer.commit()
        self._forget(keys)
        consumer.unassign()
        metrics.REBALANCES.labels("revoke").inc()
        log.info("partitions revoked", extra={"partitions": [f"{t}[{p}]" for t, p in keys]})

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions taken away without a revoke: another member owns them now, so
        buffered rows are dropped (they will be re-read from the manifest position)."""
        keys = [(tp.topic, tp.partition) for tp in partitions]
        self.buffer.drop(keys)
        self._forget(keys)
        metrics.REBALANCES.labels("lost").inc()
        log.warning("partitions lost", extra={"partitions": [f"{t}[{p}]" for t, p in keys]})

    def _resume(self, key: TP, position: int | None) -> None:
        """(Re)start a partition at the manifest's position: nothing buffered or remembered
        from before survives; dedup reloads its ids from the lake on the next rows."""
        self.buffer.resume(key, position)
        if self.dedup is not None:
            self.dedup.forget([key])

    def _forget(self, keys: list[TP]) -> None:
        for key in keys:
            self.positions.pop(key, None)
        if self.dedup is not None:
            self.dedup.forget(keys)
        self.committer.forget(keys)
        metrics.ASSIGNED.set(len(self.positions))

    def _on_conflict(self, flush: Flush) -> None:
        """Another writer extended the chain: reload it, discard what was buffered, and
        consume again from the manifest's position (ManifestConflict's contract). If this
        daemon is the stale one, the group's rebalance takes the partition away soon."""
        key = (flush.topic, flush.partition)
        if key not in self.positions:
            return
        position = load_partition(self.config.lake, flush.topic, flush.partition).position
        self._resume(key, position)
        try:
            offset = OFFSET_BEGINNING if position is None else position
            self.consumer.seek(TopicPartition(flush.topic, flush.partition, offset))
        except KafkaException as error:
            log.warning("seek after a manifest conflict failed", extra={"error": str(error)})

    def ready(self) -> bool:
        """Partitions assigned, the lake writable, and no data waiting long for a flush."""
        return not self.readiness()

    def readiness(self) -> list[str]:
        """Why /readyz fails (empty: ready); runs on the endpoint's thread."""
        waiting = bool(self.buffer.pending) or bool(self.writer.in_flight)
        since = max(self.committer.last_durable, self.idle_at)
        return metrics.readiness(
            assigned=len(self.positions),
            lake=self.config.lake,
            waiting_s=time.monotonic() - since if waiting else None,
            max_wait_s=self.config.ready_flush_age_s,
        )

    # ------------------------------------------------------------ the loop

    def _chunks(self, messages: list[Message]) -> list[Chunk]:
        """One chunk per partition of a consume() call; per message only what later steps
        read (record times and headers only when signatures are checked)."""
        now_ms = time.time_ns() // 1_000_000
        signed = self.verify.verifier is not None
        positions = self.positions
        chunks: dict[TP, Chunk] = {}
        skipped = 0
        for message in messages:
            error = message.error()
            if error is not None:
                self._on_error(message, error)
                continue
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            assert topic is not None and partition is not None and offset is not None
            key = (topic, partition)
            position = positions.get(key, -1)
            if position == -1 or (position is not None and offset < position):
                skipped += 1  # already in the lake, or a partition no longer ours
                continue
            chunk = chunks.get(key)
            if chunk is None:
                chunk = chunks[key] = Chunk(topic, partition, [], [], now_ms)
            chunk.payloads.append(message.value())
            chunk.offsets.append(offset)
            if signed:  # the Message itself: the signature check reads its headers in place
                chunk.headers.append(message)
                chunk.timestamps.append(message.timestamp())
        if skipped:
            metrics.SKIPPED.inc(skipped)
        return list(chunks.values())

    def _size_consume(self, chunks: list[Chunk]) -> None:
        """Ask the next consume() for about `consume_max_bytes` of payload at the size the
        last messages had: 10,000 messages of 100 events are 330 MB in one call."""
        n = sum(len(c.offsets) for c in chunks)
        if n:
            size = max(1, sum(c.nbytes for c in chunks) // n)
            self.consume_count = max(1, min(self.config.consume_batch, self.config.consume_max_bytes // size))

    def _on_error(self, message: Message, error: KafkaError) -> None:
        if error.code() == KafkaError._PARTITION_EOF:
            return
        if error.code() == KafkaError._AUTO_OFFSET_RESET:
            # The manifest's position is outside the broker's log: the broker lost data
            # (or the lake belongs to another cluster). Never jump; alarm and hold.
            metrics.OFFSET_ALARM.labels(message.topic() or "", str(message.partition())).set(1)
            log.error(
                "manifest position out of the broker's range; partition held", extra={"error": str(error)}
            )
            topic, partition = message.topic(), message.partition()
            if topic is not None and partition is not None:
                self.held.add((topic, partition))
                self.consumer.pause([TopicPartition(topic, partition)])
            return
        log.warning("consumer error", extra={"error": str(error)})

    def _backpressure(self) -> None:
        """Pause all partitions while the writer lags, instead of buffering without bound."""
        in_flight_rows = sum(f.events.num_rows + f.dlq.num_rows for f, _ in self.writer.in_flight)
        over = (
            in_flight_rows >= 2 * self.config.batch_max_events
            or self.buffer.buffered_bytes >= 2 * self.config.batch_max_bytes
        )
        if over != self.paused:
            assignment = [
                tp for tp in self.consumer.assignment() if (tp.topic, tp.partition) not in self.held
            ]
            (self.consumer.pause if over else self.consumer.resume)(assignment)
            self.paused = over
            metrics.PAUSED.set(int(over))

    def run(self, stop: threading.Event) -> None:
        # The loop allocates short-lived objects per message (consume(), value()); with the
        # default thresholds the cyclic GC runs every few hundred of them and rescans every
        # long-lived object (modules, catalog, ids). Freeze what start-up made, collect rarely.
        gc.collect()
        gc.freeze()
        gc.set_threshold(100_000, 50, 100)
        self.consumer.subscribe(
            list(self.config.topic),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        rollups = self._start_rollups()
        try:
            while not stop.is_set():
                messages = self.consumer.consume(self.consume_count, timeout=0.1 if not self.paused else 0.05)
                metrics.CONSUMED.inc(len(messages))
                chunks = self._chunks(messages)
                self._size_consume(chunks)
                self.verify.submit(chunks)
                for step in self.steps:
                    step.poll()
                self._backpressure()
                if not self.buffer.pending and not self.writer.in_flight:
                    self.idle_at = time.monotonic()
                metrics.update_lag(self.consumer, self.positions, self.committer.durable)
                systemd.notifier().watchdog()
        finally:
            if rollups is not None:
                rollups.stop.set()  # a run in progress may be cut short: rollups are crash-safe
            self.shutdown()

    def _start_rollups(self) -> RollupScheduler | None:
        """`meter rollup` every ``rollup_interval_s`` on a background thread, if set."""
        if self.config.rollup_interval_s is None:
            return None
        from meter.rollup import RollupScheduler

        scheduler = RollupScheduler(self.config.lake, self.config.rollup_interval_s, threading.Event())
        scheduler.start()
        return scheduler

    def shutdown(self) -> None:
        """Flush everything, wait for the lake, commit, then leave the group."""
        try:
            self.buffer.join()
            self.writer.join()
            self.committer.commit()
        finally:
            self.writer.close()
            if self.committer.dlq is not None:
                self.committer.dlq.close()
            self.consumer.close()
