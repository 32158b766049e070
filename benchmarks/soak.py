"""Soak: `meter run` drains tens of millions of events from librdkafka's mock cluster while its
RSS is sampled; DESIGN 5 promises memory that does not grow with stream length.

The mock cluster lives in this process (Tansu would hold every message in memory). It keeps
only the last 5 MiB per partition, so the traffic is paced (``--rate``) below what the daemon
drains and spread over ``--partitions``; a daemon that fell that far behind would lose the
oldest messages, and meter's out-of-range alarm would hold the partition (the run then fails).

Traffic: a pool of ``--pool`` events from `meter.gen.plan` (valid, ``--per-message`` to a
message), sent again and again with each cycle's event ids made unique (``s<cycle>.`` prefixed),
so every event is new to the dedup window and the expected totals are the pool's times the
cycles. At the end the lake's manifest must hold exactly that.

Every ``--sample-s`` seconds: the daemon's RSS, the events durable in the lake, and the ids
held by dedup where the metrics say. Reported: the samples, RSS at each quarter of the run,
and the slope of RSS over the second half (MiB per million events): flat means about 0.

    .venv/bin/python benchmarks/soak.py [--events 20000000] [--rate 40000] [--partitions 32]
        [--per-message 100] [--out soak.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path


@dataclass
class Sample:
    t_s: float
    rss_mib: float
    landed_events: int
    consumed_messages: int
    dedup_ids: float | None


def scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    if len(points) < 2:
        return 0.0
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000_000)
    parser.add_argument("--rate", type=float, default=40_000, help="events per second sent")
    parser.add_argument("--partitions", type=int, default=32)
    parser.add_argument("--per-message", type=int, default=100)
    parser.add_argument("--pool", type=int, default=200_000, help="distinct events, re-sent with new ids")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None, help="write the samples and the verdict as JSON here")
    parser.add_argument("--daemon-arg", action="append", default=[], help="extra `meter run` argument")
    args = parser.parse_args(argv)

    from confluent_kafka import Producer

    from meter.brokers import MockCluster, free_port, meter_run_command
    from meter.gen import Tally, plan
    from meter.manifest import totals
    from meter.pricing import load_catalog

    def say(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    now_ms = time.time_ns() // 1_000_000
    pool = list(plan(events=args.pool, per_message=args.per_message, seed=42, now_ms=now_ms))
    tally = Tally(load_catalog(None), now_ms)
    for message in pool:
        tally.add(message)
    unit = tally.summary()
    cycles = -(-args.events // unit.events)
    say(
        f"pool: {len(pool):,} messages, {unit.events:,} events; "
        f"{cycles} cycles = {cycles * unit.events:,} events"
    )

    work = Path(tempfile.mkdtemp(prefix="meter-soak-", dir=args.workdir))
    lake = work / "lake"
    port = free_port()
    cluster = MockCluster(3, initial_rebalance_delay_ms=0)
    topic = f"soak-{uuid.uuid4().hex[:8]}"
    cluster.create_topic(topic, args.partitions)
    log = open(work / "meter-run.log", "wb")  # noqa: SIM115
    daemon = subprocess.Popen(
        [
            *meter_run_command(
                cluster.bootstrap_servers,
                topic,
                lake,
                f"soak-{uuid.uuid4().hex[:8]}",
                metrics_addr=f"127.0.0.1:{port}",
            ),
            *args.daemon_arg,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if not k.startswith("METER_")},
    )
    say(f"daemon pid {daemon.pid}, lake {lake}, log {work / 'meter-run.log'}")

    sent = {"messages": 0, "events": 0, "done": False}
    stop = threading.Event()

    def produce() -> None:
        producer = Producer(
            {
                "bootstrap.servers": cluster.bootstrap_servers,
                "linger.ms": 20,
                "batch.size": 4_000_000,
                "message.max.bytes": 8 << 20,
                "queue.buffering.max.kbytes": 1 << 20,
            }
        )
        started = time.monotonic()
        for cycle in range(cycles):
            prefix = b'"event_id":"s%d.' % cycle
            for message in pool:
                if stop.is_set():
                    return
                value = message.value.replace(b'"event_id":"', prefix)
                while True:
                    try:
                        producer.produce(topic, value, message.key)
                        break
                    except BufferError:
                        producer.poll(0.05)
                sent["messages"] += 1
                sent["events"] += len(message.reasons)
                ahead = sent["events"] / args.rate - (time.monotonic() - started)
                if ahead > 0.005:
                    producer.poll(ahead)
                else:
                    producer.poll(0)
        producer.flush(60)
        sent["done"] = True

    samples: list[Sample] = []
    expected_events = cycles * unit.events
    expected_messages = cycles * len(pool)
    producer_thread = threading.Thread(target=produce, name="produce", daemon=True)
    started = time.monotonic()
    producer_thread.start()
    ok = False
    try:
        next_sample = time.monotonic()
        while True:
            if daemon.poll() is not None:
                raise SystemExit(f"meter run exited with {daemon.returncode}")
            time.sleep(max(0.0, next_sample - time.monotonic()))
            next_sample += args.sample_s
            try:
                metrics = scrape(port)
            except OSError:
                continue
            landed = int(
                metrics.get("meter_events_accepted_total", 0) + metrics.get("meter_events_rejected_total", 0)
            )
            held = [v for k, v in metrics.items() if k.startswith("meter_dedup") and "ids" in k]
            dedup = sum(held) if held else None
            sample = Sample(
                round(time.monotonic() - started, 1),
                round(rss_mib(daemon.pid), 1),
                landed,
                int(metrics.get("meter_messages_consumed_total", 0)),
                dedup,
            )
            samples.append(sample)
            lag = sent["events"] - landed
            say(
                f"t={sample.t_s:7.1f}s rss={sample.rss_mib:7.1f} MiB landed={landed:>12,} "
                f"sent={sent['events']:>12,} lag={lag:>10,}"
                + (f" dedup_ids={dedup:,.0f}" if dedup is not None else "")
            )
            if metrics.get("meter_offset_out_of_range", 0):
                raise SystemExit("out-of-range alarm: the daemon fell behind the mock's 5 MiB retention")
            if sent["done"] and landed >= expected_events:
                break
        ok = True
    finally:
        stop.set()
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
        cluster.close()

    t = totals(lake)
    exact = (
        t.messages == expected_messages
        and t.accepted == expected_events
        and t.rejected == 0
        and Decimal(t.cost_usd) == unit.cost_usd * cycles
        and t.tokens == {k: v * cycles for k, v in unit.tokens.items()}
    )
    half = [s for s in samples if s.landed_events >= expected_events / 2]
    per_million = slope([(s.landed_events / 1e6, s.rss_mib) for s in half])
    quarters = {}
    for q in (0.25, 0.5, 0.75, 1.0):
        at = next((s for s in samples if s.landed_events >= q * expected_events), samples[-1])
        quarters[f"{int(q * 100)}%"] = at.rss_mib
    verdict = {
        "events": expected_events,
        "messages": expected_messages,
        "seconds": round(time.monotonic() - started, 1),
        "exact": exact,
        "lake_totals": {"messages": t.messages, "accepted": t.accepted, "rejected": t.rejected},
        "rss_mib_max": max(s.rss_mib for s in samples),
        "rss_mib_at": quarters,
        "rss_slope_second_half_mib_per_million_events": round(per_million, 3),
        "flat": abs(per_million) < 1.0,
        "ok": ok and exact,
    }
    say(json.dumps(verdict))
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {"args": vars(args), "verdict": verdict, "samples": [asdict(s) for s in samples]}, indent=1
            )
        )
    return 0 if verdict["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
