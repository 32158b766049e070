"""Helpers of the fault tests (crash, consumer group, broker faults, dedup end to end).

`Daemon` runs `meter run` as a real process, logging JSON to a file the helpers read
(assignments, injected crashes) and serving /metrics on a port of its own. `read_back`
counts what the broker holds, `check_lake` proves the lake holds each Kafka message's rows
exactly once with the generator's totals, and `query_totals` asks `meter query` the same.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from meter.lake import KIND_DLQ, KIND_EVENTS, read_intent
from meter.manifest import listed_files, load_partition, totals
from meter.reasons import DUPLICATE_EVENT
from meter.schema import MAX_MESSAGE_BYTES, TOKEN_COLUMNS

STOP_TIMEOUT_S = 30.0
_PARTITION = re.compile(r"^(?P<topic>.+)\[(?P<partition>\d+)\](?:@-?\d+)?$")


def env_int(name: str, default: int) -> int:
    """An integer knob from the environment (long runs), else the CI default."""
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def tail(path: Path, max_bytes: int = 12_000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# --- the daemon as a process ------------------------------------------------------------


class Daemon:
    """One `meter run` process; stdout and stderr are appended to `log`."""

    def __init__(
        self,
        brokers: str,
        topic: str,
        lake: Path,
        group: str,
        log: Path,
        *,
        session_timeout_ms: int = 6000,
        batch_max_age_s: float = 0.5,
        args: Sequence[str] = (),
        kafka: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        from meter.brokers import free_port, meter_run_command

        self.log = log
        self.port = free_port()
        cmd = meter_run_command(
            brokers,
            topic,
            lake,
            group,
            batch_max_age_s=batch_max_age_s,
            session_timeout_ms=session_timeout_ms,
            metrics_addr=f"127.0.0.1:{self.port}",
        )
        cmd += args
        for key, value in (kafka or {}).items():
            cmd += ["--kafka", f"{key}={value}"]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
        full_env.update(env or {})
        with open(log, "ab") as out:
            out.write(f"--- test: starting meter run (group {group}, env {dict(env or {})})\n".encode())
            out.flush()
            self.log_offset = out.tell()
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=full_env
            )
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> bytes:
        with open(self.log, "rb") as f:
            f.seek(self.log_offset)
            return f.read()

    def records(self) -> list[dict[str, Any]]:
        """This run's JSON log records (other lines, such as a crash marker, skipped)."""
        out = []
        for line in self.output().splitlines():
            if line.startswith(b"{"):
                try:
                    out.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    continue  # the line a SIGKILL cut short
        return out

    def assignments(self) -> int:
        return sum(1 for r in self.records() if r.get("msg") == "partitions assigned")

    def owned(self) -> set[int]:
        """Partitions held now, from the log (eager rebalancing: each assignment is whole)."""
        held: set[int] = set()
        for record in self.records():
            if record.get("msg") == "partitions assigned":
                held = {int(m["partition"]) for p in record["partitions"] if (m := _PARTITION.match(p))}
            elif record.get("msg") in ("partitions revoked", "partitions lost"):
                held = set()
        return held

    def wait_assigned(self, count: int = 1, timeout: float = 40.0) -> float:
        """Until this run logged its `count`-th assignment; returns the seconds it took."""
        started = time.monotonic()
        while self.assignments() < count:
            assert self.running(), f"meter run exited with {self.proc.returncode} before its assignment"
            assert time.monotonic() - started < timeout, f"meter run got no partitions within {timeout:.0f}s"
            time.sleep(0.05)
        return time.monotonic() - started

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """One scrape of /metrics: {(sample name, sorted labels): value}."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
            text = response.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels` (0 when absent)."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.metrics().items() if n == name and want <= set(ls))

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, and the exit status; a daemon that does not stop in time is killed (and fails)."""
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"meter run did not stop within {timeout:.0f}s of SIGTERM") from None

    def kill(self) -> None:
        """SIGKILL: no flush, no commit, no goodbye to the group."""
        if self.running():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


class Runner:
    """Starts daemons for one test; at teardown kills what still runs and prints the logs'
    ends (pytest shows them only when the test failed)."""

    def __init__(self, brokers: str, tmp: Path) -> None:
        self.brokers = brokers
        self.tmp = tmp
        self.logs: list[Path] = []
        self.daemons: list[Daemon] = []

    def log(self, name: str) -> Path:
        path = self.tmp / f"{name}.log"
        self.logs.append(path)
        return path

    def start(self, topic: str, lake: Path, group: str, log: Path, **options: Any) -> Daemon:
        daemon = Daemon(self.brokers, topic, lake, group, log, **options)
        self.daemons.append(daemon)
        return daemon

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.kill()
        for path in dict.fromkeys(self.logs):
            print(f"===== {path.name} (end) =====\n{tail(path)}")


# --- what was sent, read back from the broker -------------------------------------------


@dataclass
class Sent:
    """Per partition: the offset after the last message and the message count; per message,
    the lake rows it must give (one per NDJSON line; one for a message rejected whole)."""

    ends: dict[int, int]
    counts: dict[int, int]
    rows: Counter[tuple[int, int]]

    @property
    def messages(self) -> int:
        return sum(self.counts.values())


def read_back(brokers: str, topic: str, partitions: int, messages: int, timeout: float | None = None) -> Sent:
    """Consume the whole topic without a group. Tansu's reported high watermark can run short
    of the real end offset, so the ends are counted here. The time allowed grows with the
    topic (the mock cluster serves a long run's topic at a few thousand messages a second)."""
    if timeout is None:
        timeout = 120.0 + messages / 1000
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": f"readback-{uuid.uuid4().hex[:10]}",
            "enable.auto.commit": False,
            "fetch.queue.backoff.ms": 10,
        }
    )
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    ends: dict[int, int] = {}
    counts: Counter[int] = Counter()
    rows: Counter[tuple[int, int]] = Counter()
    seen = 0
    deadline = time.monotonic() + timeout
    try:
        while seen < messages:
            assert time.monotonic() < deadline, f"read back {seen} of {messages} messages"
            for record in consumer.consume(num_messages=10_000, timeout=0.5):
                assert record.error() is None, record.error()
                p, offset, value = record.partition(), record.offset(), record.value() or b""
                assert p is not None and offset is not None
                seen += 1
                counts[p] += 1
                ends[p] = max(ends.get(p, 0), offset + 1)
                rows[(p, offset)] += 1 if len(value) > MAX_MESSAGE_BYTES else value.count(b"\n") + 1
        extra = [r for r in consumer.consume(num_messages=100, timeout=0.5) if r.error() is None]
        assert extra == [], "the topic holds more messages than were sent"
    finally:
        consumer.close()
    return Sent(ends, dict(counts), rows)


def committed_offsets(brokers: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": brokers, "group.id": group, "enable.auto.commit": False})
    try:
        got = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in got}


# --- what the lake must hold ---------------------------------------------------------------


@dataclass
class Expect:
    """The lake's totals after `meter gen` sent `summary` (re-sends become duplicate_event rows)."""

    messages: int
    accepted: int
    rejects_by_reason: dict[str, int]
    tokens: dict[str, int]
    cost_usd: Decimal
    unpriced: int

    @classmethod
    def of(cls, summary: Any) -> Expect:
        def get(key: str) -> Any:
            return summary[key] if isinstance(summary, dict) else getattr(summary, key)

        reasons: Counter[str] = Counter(get("bad_events"))
        reasons.update(get("resent_bad_events"))
        if get("resent_events"):
            reasons[DUPLICATE_EVENT] += get("resent_events")
        return cls(
            messages=get("messages"),
            accepted=get("events"),
            rejects_by_reason=dict(sorted(reasons.items())),
            tokens=dict(get("tokens")),
            cost_usd=Decimal(str(get("cost_usd"))),
            unpriced=get("unpriced"),
        )

    @property
    def rejected(self) -> int:
        return sum(self.rejects_by_reason.values())


def temp_files(lake: Path) -> list[str]:
    return sorted(
        p.relative_to(lake).as_posix()
        for p in lake.rglob("*")
        if p.name.startswith(".") and p.name.endswith(".tmp")
    )


def unlisted_files(lake: Path) -> list[str]:
    """Data files on disk that no manifest entry lists (orphans, strays)."""
    listed = set(listed_files(lake, "events")) | set(listed_files(lake, "dlq"))
    on_disk = {
        p.relative_to(lake).as_posix()
        for kind in (KIND_EVENTS, KIND_DLQ)
        for p in (lake / kind).rglob("*.parquet")
    }
    return sorted(on_disk - listed)


def check_chains(lake: Path, topic: str, partitions: int) -> dict[int, int | None]:
    """Every partition's chain loads (load_partition raises on a gap or an overlap) and is
    contiguous; returns the positions. Temp and orphan files may exist (a crash's leftovers)."""
    positions = {}
    for p in range(partitions):
        state = load_partition(lake, topic, p)
        for prev, entry in itertools.pairwise(state.entries):
            assert entry.start == prev.end, f"partition {p}: {prev.start}..{prev.end} then {entry.start}"
        positions[p] = state.position
    return positions


def torn_flushes(lake: Path, topic: str, partitions: int) -> list[int]:
    """Partitions whose last flush was cut short: an intent no manifest entry covers."""
    torn = []
    for p in range(partitions):
        intent = read_intent(lake, topic, p)
        if intent is not None and not load_partition(lake, topic, p).covers(intent.start):
            torn.append(p)
    return torn


def check_lake(lake: Path, topic: str, partitions: int, expect: Expect, sent: Sent) -> None:
    """The lake holds every sent message's rows exactly once, with the expected totals, and
    nothing else: no temp file, no data file the manifest does not list."""
    t = totals(lake)
    assert t.messages == expect.messages == sent.messages
    assert t.accepted == expect.accepted
    assert t.rejects_by_reason == expect.rejects_by_reason
    assert t.tokens == expect.tokens
    assert Decimal(t.cost_usd) == expect.cost_usd
    assert t.unpriced == expect.unpriced

    positions = check_chains(lake, topic, partitions)
    for p in range(partitions):
        state = load_partition(lake, topic, p)
        if p not in sent.counts:
            assert state.position is None, f"partition {p} has entries but no message was sent to it"
            continue
        assert state.first == 0, f"partition {p} starts at {state.first}"
        assert positions[p] == sent.ends[p], (
            f"partition {p}: manifest at {positions[p]}, log at {sent.ends[p]}"
        )
        assert sum(e.messages for e in state.entries) == sent.counts[p]

    entries = [e for p in range(partitions) for e in load_partition(lake, topic, p).entries]
    for record in (f for e in entries for f in e.files):
        assert pq.ParquetFile(lake / record.path).metadata.num_rows == record.rows, record.path
    columns = ["kafka_partition", "kafka_offset", *TOKEN_COLUMNS, "cost_usd"]
    events = _concat([pq.read_table(lake / f, columns=columns) for f in listed_files(lake, "events")])
    dlq = _concat(
        [
            pq.read_table(lake / f, columns=["kafka_partition", "kafka_offset", "reason"])
            for f in listed_files(lake, "dlq")
        ]
    )
    if events is not None:
        assert events.num_rows == expect.accepted
        assert {k: pc.sum(events.column(k)).as_py() for k in TOKEN_COLUMNS} == expect.tokens
        assert (pc.sum(events.column("cost_usd")).as_py() or Decimal(0)) == expect.cost_usd
    if dlq is not None:
        assert dict(Counter(dlq.column("reason").to_pylist())) == expect.rejects_by_reason
    got: Counter[tuple[int, int]] = Counter()
    for table in (x for x in (events, dlq) if x is not None):
        got.update(
            zip(
                table.column("kafka_partition").to_pylist(),
                table.column("kafka_offset").to_pylist(),
                strict=True,
            )
        )
    if got != sent.rows:
        missing = sent.rows - got
        extra = got - sent.rows
        raise AssertionError(
            f"rows per Kafka message differ: {sum(missing.values())} missing "
            f"(e.g. {list(missing.items())[:5]}), "
            f"{sum(extra.values())} extra (e.g. {list(extra.items())[:5]})"
        )
    assert temp_files(lake) == [], f"temp files left: {temp_files(lake)}"
    assert unlisted_files(lake) == [], f"unlisted data files: {unlisted_files(lake)}"


def _concat(tables: list[pa.Table]) -> pa.Table | None:
    return pa.concat_tables(tables) if tables else None


def query_totals(lake: Path) -> dict[str, Any]:
    """What `meter query` (DuckDB over the files the manifest lists) counts."""
    tokens = ", ".join(f"sum({k}) AS {k}" for k in TOKEN_COLUMNS)
    sql = (
        "SELECT (SELECT count(*) FROM events) AS accepted, (SELECT count(*) FROM dlq) AS rejected, "
        "(SELECT sum(cost_usd) FROM events) AS cost, "
        "(SELECT count(*) FROM events WHERE cost_usd IS NULL) AS unpriced, "
        "(SELECT count(DISTINCT (kafka_partition, kafka_offset)) FROM "
        " (SELECT kafka_partition, kafka_offset FROM events UNION ALL "
        "  SELECT kafka_partition, kafka_offset FROM dlq)) AS messages, "
        f"* FROM (SELECT {tokens} FROM events)"
    )
    done = subprocess.run(
        [sys.executable, "-m", "meter", "query", "--lake", str(lake), "--format", "json", sql],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    [row] = json.loads(done.stdout)
    return dict(row)


def check_query(lake: Path, expect: Expect) -> None:
    row = query_totals(lake)
    assert (row["accepted"], row["rejected"], row["unpriced"]) == (
        expect.accepted,
        expect.rejected,
        expect.unpriced,
    )
    assert row["messages"] == expect.messages
    assert Decimal(str(row["cost"] or 0)) == expect.cost_usd
    assert {k: int(row[k] or 0) for k in TOKEN_COLUMNS} == expect.tokens


# --- waiting ----------------------------------------------------------------------------------


def wait_landed(lake: Path, messages: int, daemons: Iterable[Daemon], timeout: float = 90.0) -> None:
    """Until the manifest covers `messages` Kafka messages (and some daemon still runs)."""
    daemons = list(daemons)
    deadline = time.monotonic() + timeout
    got = None
    while True:
        if lake.is_dir():
            got = totals(lake)
            if got.messages >= messages:
                return
        assert any(d.running() for d in daemons), "every meter run exited before the lake was complete"
        assert time.monotonic() < deadline, (
            f"after {timeout:.0f}s the manifest covers {got and got.messages} of {messages} messages"
        )
        time.sleep(0.25)


def lake_messages(lake: Path) -> int:
    return totals(lake).messages if lake.is_dir() else 0
