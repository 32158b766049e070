"""End-to-end throughput: Kafka (a Tansu broker on loopback) to a Parquet lake.

N events are produced first (`meter gen`, as fast as it goes, no bad events); then each
contender drains the whole topic into a lake of its own, under a fresh consumer group:

* ``meter``: one `meter run` process;
* ``meter-x2``: two `meter run` processes in one consumer group, one lake;
* ``naive``: the consumer a Python engineer would write first: ``orjson.loads`` per event, a
  Python list per column, ``pa.Table`` per consumed batch, ``pq.write_table`` (zstd) per batch,
  a synchronous commit per batch. It checks nothing and prices nothing.

All use the same consumer settings (explicit commits, ``fetch.queue.backoff.ms=10``,
``consume(num_messages=10000)``; ``--kafka`` adds settings to all of them) and each runs as a
process of its own. The clock starts when a process logs its partition assignment and stops
at its last durable write (the manifest entry's time for meter, the last file for naive);
meter flushes on size or after ``--batch-max-age-s`` (0.5 s here), naive after every batch.
Reported: events/s, CPU seconds per million events (user + system of the consumer
processes, from assignment to done), peak RSS (VmHWM; the largest of the processes), the
median of ``--runs`` runs each, and meter's ratio to naive in the same run.

    .venv/bin/python benchmarks/bench_e2e.py [--events N] [--runs R] [--per-message 1,100]
        [--modes meter,naive,meter-x2] [--partitions P] [--json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

MODES = ("bare", "meter", "naive", "meter-x2")
SESSION_TIMEOUT_MS = 6000
BATCH_MAX_AGE_S = 0.5
CONSUME_BATCH = 10_000
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the naive consumer (runs as a process of its own: `bench_e2e.py naive ...`) -----------


def naive_schema() -> pa.Schema:
    from meter.schema import EVENTS

    return pa.schema([*EVENTS, pa.field("kafka_partition", pa.int32()), pa.field("kafka_offset", pa.int64())])


def naive_consumer(
    brokers: str, topic: str, group: str, out: str, expect: int, kafka: dict[str, str], bare: bool = False
) -> int:
    """Drain `topic` the obvious way; print JSON lines: assigned, then done. `bare` only
    consumes (``value()`` of each message, nothing else): the broker's and client's ceiling."""
    from confluent_kafka import Consumer, TopicPartition

    from meter.schema import EVENTS, STRING_FIELDS, TOKEN_COLUMNS, TS_TYPE

    schema = naive_schema()
    consumer = Consumer(
        {
            **kafka,
            "bootstrap.servers": brokers,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "fetch.queue.backoff.ms": kafka.get("fetch.queue.backoff.ms", 10),
            "session.timeout.ms": SESSION_TIMEOUT_MS,
        }
    )

    def report(event: str) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        line = {"event": event, "t": time.time(), "cpu_s": usage.ru_utime + usage.ru_stime}
        print(json.dumps(line), flush=True)

    started = False

    def on_assign(c: Any, partitions: list[Any]) -> None:
        nonlocal started
        if not started:
            report("assigned")
            started = True
        c.assign(partitions)

    consumer.subscribe([topic], on_assign=on_assign)
    rows = batch = 0
    strings = tuple(STRING_FIELDS)
    while rows < expect:
        messages = consumer.consume(CONSUME_BATCH, timeout=0.1)
        if not messages:
            continue
        if bare:
            rows += sum((m.value() or b"").count(b"\n") + 1 for m in messages if m.error() is None)
            continue
        events: list[dict[str, Any]] = []
        partitions: list[int] = []
        offsets: list[int] = []
        for message in messages:
            if message.error() is not None:
                continue
            value = message.value() or b""
            for line in value.split(b"\n"):
                if line.strip():
                    events.append(orjson.loads(line))
                    partitions.append(message.partition() or 0)
                    offsets.append(message.offset() or 0)
        columns: dict[str, pa.Array] = {
            name: pa.array([e.get(name) for e in events], pa.string()) for name in strings
        }
        columns["ts"] = pa.array([e["ts"] for e in events], pa.string()).cast(TS_TYPE)
        for name in TOKEN_COLUMNS:
            columns[name] = pa.array([e.get(name, 0) for e in events], pa.int64())
        columns["kafka_partition"] = pa.array(partitions, pa.int32())
        columns["kafka_offset"] = pa.array(offsets, pa.int64())
        table = pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)
        assert len(EVENTS) + 2 == table.num_columns
        pq.write_table(table, f"{out}/batch-{batch:06d}.parquet", compression="zstd")
        last: dict[int, int] = {}
        for p, o in zip(partitions, offsets, strict=True):
            last[p] = o
        consumer.commit(
            offsets=[TopicPartition(topic, p, o + 1) for p, o in last.items()], asynchronous=False
        )
        rows += table.num_rows
        batch += 1
    report("done")
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"event": "rss", "peak_rss": hwm, "rows": rows}), flush=True)
    consumer.close()
    return 0


# --- measuring ------------------------------------------------------------------------------


@dataclass
class Run:
    mode: str
    per_message: int
    events: int
    seconds: float
    cpu_s: float
    peak_rss: int

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds

    @property
    def cpu_s_per_million(self) -> float:
        return self.cpu_s / self.events * 1e6


@dataclass
class Row:
    mode: str
    per_message: int
    events: int
    runs: int
    events_per_s: float
    cpu_s_per_million: float
    peak_rss_mib: float
    vs_naive: float | None = None
    all_events_per_s: list[float] = field(default_factory=list)


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def proc_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def assigned_at(log: Path) -> float | None:
    """Wall time of the first 'partitions assigned' record of a meter run log."""
    try:
        data = log.read_bytes()
    except FileNotFoundError:
        return None
    for line in data.splitlines():
        if b'"msg":"partitions assigned"' in line:
            ts = orjson.loads(line)["ts"]
            return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    return None


def run_meter(
    brokers: str,
    topic: str,
    events: int,
    processes: int,
    work: Path,
    kafka: dict[str, str],
    extra: Sequence[str] = (),
) -> Run:
    from meter.brokers import meter_run_command
    from meter.manifest import list_partitions, load_partition

    lake = work / "lake"
    group = f"bench-{uuid.uuid4().hex[:10]}"
    procs, logs = [], []
    for i in range(processes):
        log = work / f"meter-{i}.log"
        cmd = meter_run_command(
            brokers,
            topic,
            lake,
            group,
            session_timeout_ms=SESSION_TIMEOUT_MS,
            batch_max_age_s=BATCH_MAX_AGE_S,
            consume_batch=CONSUME_BATCH,
        )
        for key, value in kafka.items():
            cmd += ["--kafka", f"{key}={value}"]
        cmd += extra
        with open(log, "wb") as out:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env()))
        logs.append(log)
    cpu0: dict[int, float] = {}
    start: float | None = None
    deadline = time.monotonic() + 600
    try:
        while True:
            for proc, log in zip(procs, logs, strict=True):
                if proc.pid not in cpu0 and (t := assigned_at(log)) is not None:
                    cpu0[proc.pid] = proc_cpu_s(proc.pid)
                    start = t if start is None else min(start, t)
                if proc.poll() is not None:
                    raise SystemExit(f"meter run exited with {proc.returncode}: see {log}")
            if len(cpu0) == processes and _lake_rows(lake) >= events:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"meter did not drain {events} events in time")
            time.sleep(0.05 if len(cpu0) < processes else 0.2)
        cpu = sum(proc_cpu_s(p.pid) - cpu0[p.pid] for p in procs)
        rss = max(proc_hwm(p.pid) for p in procs)
        end = max(
            e.written_at_ms / 1000
            for t, p in list_partitions(lake)
            for e in load_partition(lake, t, p).entries
        )
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert start is not None
    mode = "meter" if processes == 1 else f"meter-x{processes}"
    return Run(mode, 0, events, end - start, cpu, rss)


def _lake_rows(lake: Path) -> int:
    from meter.manifest import totals

    if not (lake / "_meter").is_dir():
        return 0
    t = totals(lake)
    return t.accepted + t.rejected


def run_naive(brokers: str, topic: str, events: int, work: Path, kafka: dict[str, str], bare: bool) -> Run:
    out = work / "naive"
    out.mkdir()
    group = f"bench-{uuid.uuid4().hex[:10]}"
    cmd = [sys.executable, __file__, "naive", brokers, topic, group, str(out), str(events)]
    if bare:
        cmd.append("--bare")
    for key, value in kafka.items():
        cmd += ["--kafka", f"{key}={value}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=_env())
    if done.returncode != 0:
        raise SystemExit(f"naive consumer failed: {done.stderr[-2000:]}")
    lines = {d["event"]: d for d in map(json.loads, done.stdout.splitlines())}
    end = lines["done"]["t"] if bare else max(p.stat().st_mtime for p in out.iterdir())
    return Run(
        "bare" if bare else "naive",
        0,
        events,
        end - lines["assigned"]["t"],
        lines["done"]["cpu_s"] - lines["assigned"]["cpu_s"],
        lines["rss"]["peak_rss"],
    )


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("METER_")}


def produce(brokers: str, topic: str, events: int, per_message: int, partitions: int) -> Any:
    from meter.gen import generate

    summary = generate(brokers, topic, events=events, per_message=per_message, partitions=partitions, seed=1)
    if summary.failed:
        raise SystemExit(f"producing failed: {summary.errors}")
    return summary


def bench(
    brokers: str,
    per_message: int,
    args: argparse.Namespace,
    kafka: dict[str, str],
    say: Callable[[str], None],
) -> list[Row]:
    topic = f"bench-e2e-{per_message}-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    summary = produce(brokers, topic, args.events, per_message, args.partitions)
    say(
        f"produced {summary.events:,} events in {summary.messages:,} messages "
        f"({summary.bytes / 1e6:,.0f} MB) in {time.monotonic() - started:.1f}s"
    )
    runs: dict[str, list[Run]] = {m: [] for m in args.modes}
    for i in range(args.runs):
        for mode in args.modes:
            work = Path(tempfile.mkdtemp(prefix=f"meter-bench-e2e-{mode}-", dir=args.workdir))
            try:
                if mode in ("naive", "bare"):
                    run = run_naive(brokers, topic, summary.events, work, kafka, bare=mode == "bare")
                else:
                    processes = 1 if mode == "meter" else 2
                    run = run_meter(brokers, topic, summary.events, processes, work, kafka, args.meter_arg)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            run.per_message = per_message
            runs[mode].append(run)
            say(
                f"  run {i + 1} {mode:<9} {run.events_per_s:>12,.0f} ev/s  "
                f"{run.cpu_s_per_million:6.2f} CPU-s/M  peak RSS {run.peak_rss / 2**20:,.0f} MiB"
            )
    rows = []
    for mode, rs in runs.items():
        rows.append(
            Row(
                mode=mode,
                per_message=per_message,
                events=summary.events,
                runs=len(rs),
                events_per_s=statistics.median(r.events_per_s for r in rs),
                cpu_s_per_million=statistics.median(r.cpu_s_per_million for r in rs),
                peak_rss_mib=max(r.peak_rss for r in rs) / 2**20,
                all_events_per_s=[round(r.events_per_s) for r in rs],
            )
        )
    if "naive" in runs:
        # the ratio of medians, and per run the ratio within the same round
        base = next(r.events_per_s for r in rows if r.mode == "naive")
        for row in rows:
            row.vs_naive = row.events_per_s / base
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["naive"]:
        p = argparse.ArgumentParser(prog="bench_e2e.py naive")
        for name in ("brokers", "topic", "group", "out"):
            p.add_argument(name)
        p.add_argument("expect", type=int)
        p.add_argument("--kafka", action="append", default=[])
        p.add_argument("--bare", action="store_true")
        a = p.parse_args(argv[1:])
        return naive_consumer(a.brokers, a.topic, a.group, a.out, a.expect, _kafka(a.kafka), a.bare)

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2_000_000, help="events produced per setting")
    parser.add_argument("--runs", type=int, default=3, help="runs per contender; medians are reported")
    parser.add_argument("--per-message", default="1,100", help="events per message, comma-separated")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--kafka", action="append", default=[], metavar="KEY=VALUE", help="consumer setting")
    parser.add_argument(
        "--meter-arg", action="append", default=[], metavar="ARG", help="extra `meter run` argument (repeat)"
    )
    parser.add_argument("--workdir", default=None, help="where lakes go (default: the system temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(args.modes) - set(MODES):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    kafka = _kafka(args.kafka)

    from meter.brokers import TansuBroker
    from meter.parser import COMPILED

    meta = {
        "meter_parser": "compiled" if COMPILED else "pure Python",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "pyarrow": pa.__version__,
        "events": args.events,
        "partitions": args.partitions,
        "runs": args.runs,
        "batch_max_age_s": BATCH_MAX_AGE_S,
        "kafka": kafka,
    }

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    rows: list[Row] = []
    for per_message in (int(x) for x in args.per_message.split(",")):
        with TansuBroker() as broker:  # a fresh broker per setting: Tansu holds everything in memory
            rows += bench(broker.bootstrap_servers, per_message, args, kafka, say)
    if args.json:
        print(json.dumps({"meta": meta, "results": [asdict(r) for r in rows]}, indent=2))
        return 0
    line = "{:>7} {:<9} {:>10} {:>13} {:>11} {:>10} {:>9}"
    print("# " + ", ".join(f"{k}={v}" for k, v in meta.items()))
    print(line.format("ev/msg", "mode", "events", "events/s", "CPU-s/M ev", "peak RSS", "vs naive"))
    for r in rows:
        ratio = f"{r.vs_naive:.2f}x" if r.vs_naive is not None else "-"
        print(
            line.format(
                r.per_message,
                r.mode,
                f"{r.events:,}",
                f"{r.events_per_s:,.0f}",
                f"{r.cpu_s_per_million:.2f}",
                f"{r.peak_rss_mib:,.0f} MiB",
                ratio,
            )
        )
    return 0


def _kafka(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--kafka {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


if __name__ == "__main__":
    raise SystemExit(main())
