"""`meter demo`: the whole job on an embedded default.

An in-process Kafka-protocol cluster (librdkafka's mock brokers, nothing to install),
`meter gen` traffic with some bad events, the daemon writing a fresh lake, metrics on
HTTP, a live status line, and a summary with a query to paste at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from meter import gen, metrics
from meter.brokers import MockCluster
from meter.config import Config
from meter.manifest import totals
from meter.pipeline import Pipeline
from meter.reasons import PARSER_REASONS, TOO_LARGE

MARKER = "_meter/demo-lake"


@dataclass(frozen=True)
class DemoOptions:
    lake: str = "meter-demo/lake"
    seconds: float | None = None
    rate: float = 20_000
    per_message: int = 5
    bad_ratio: float = 0.01
    partitions: int = 4
    metrics_addr: str | None = "127.0.0.1:9464"
    seed: int = 1


def _fresh_lake(path: Path) -> None:
    """Start from an empty lake; only ever delete a lake an earlier demo made."""
    if path.exists() and any(path.iterdir()):
        if not (path / MARKER).exists():
            raise ValueError(f"{path} is not empty and was not made by `meter demo`; choose another --lake")
        shutil.rmtree(path)
    (path / MARKER).parent.mkdir(parents=True, exist_ok=True)
    (path / MARKER).touch()


def _sample(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


class _Status:
    """A live status line on a terminal; a plain line every 5 s otherwise."""

    def __init__(self, out: IO[str], sent: list[int]):
        self.out = out
        self.sent = sent
        self.tty = out.isatty()
        self.start = time.monotonic()

    def line(self) -> str:
        accepted = _sample("meter_events_accepted_total")
        consumed = _sample("meter_messages_consumed_total")
        rejected = sum(
            sample.value
            for family in metrics.REJECTED.collect()
            for sample in family.samples
            if sample.name.endswith("_total")
        )
        cost = float(metrics.DEFAULT.usage.totals()["cost_usd"])
        rate = accepted / max(time.monotonic() - self.start, 1e-9)
        lag = max(self.sent[0] - int(consumed), 0)
        return (
            f"{rate:>9,.0f} ev/s  accepted {accepted:>11,.0f}  rejected {rejected:>8,.0f}  "
            f"cost ${cost:>12,.2f}  lag {lag:>8,} msgs"
        )

    def run(self, stop: threading.Event) -> None:
        period = 0.5 if self.tty else 5.0
        while not stop.wait(period):
            if self.tty:
                self.out.write("\r" + self.line())
            else:
                self.out.write(self.line() + "\n")
            self.out.flush()
        if self.tty:
            self.out.write("\n")


def _meter_command() -> str:
    """How the user can run meter again: `meter` on PATH, else the script this run used."""
    script = sys.argv[0] if sys.argv else ""
    if os.path.basename(script) == "meter" and shutil.which("meter") != os.path.abspath(script):
        return os.path.relpath(script)
    return "meter"


def run_demo(options: DemoOptions, out: IO[str] = sys.stdout) -> int:
    lake = Path(options.lake).resolve()
    _fresh_lake(lake)
    stop = threading.Event()
    done = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if options.seconds is not None:
        threading.Timer(options.seconds, stop.set).start()

    with MockCluster(3, initial_rebalance_delay_ms=0) as cluster:
        topic = "usage"
        cluster.create_topic(topic, options.partitions)
        print(f"broker  {cluster.bootstrap_servers} (in-process mock cluster, 3 brokers)", file=out)
        print(f"lake    {lake}", file=out)
        if options.metrics_addr:
            print(f"metrics http://{options.metrics_addr}/metrics", file=out)
        config = Config(
            brokers=cluster.bootstrap_servers,
            topic=(topic,),
            lake=str(lake),
            group="meter-demo",
            metrics_addr=options.metrics_addr,
            batch_max_age_s=1.0,
            session_timeout_ms=6000,
        )
        sent = [0]
        summary: list[gen.GenSummary] = []

        def produce() -> None:
            def progress(p: gen.GenProgress) -> None:
                sent[0] = p.messages

            events = int(options.rate * options.seconds * 2) if options.seconds else 10**12
            summary.append(
                gen.generate(
                    cluster.bootstrap_servers,
                    topic,
                    events=events,
                    rate=options.rate,
                    seed=options.seed,
                    per_message=options.per_message,
                    bad_ratio=options.bad_ratio,
                    stop=stop,
                    on_progress=progress,
                    # The mock brokers keep only the last 5 MiB per partition: a stream of
                    # 1 MiB too_large messages would age the log past the consumer.
                    bad_reasons=[r for r in PARSER_REASONS if r != TOO_LARGE],
                )
            )

        producer = threading.Thread(target=produce, name="meter-demo-gen", daemon=True)
        producer.start()
        pipeline = Pipeline(config)
        server = metrics.serve(options.metrics_addr, pipeline.readiness) if options.metrics_addr else None
        status = _Status(out, sent)
        status_thread = threading.Thread(target=status.run, args=(done,), daemon=True)
        status_thread.start()
        try:
            pipeline.run(stop)
        finally:
            stop.set()
            producer.join()
            done.set()
            status_thread.join()
            if server is not None:
                server.shutdown()

    lake_totals = totals(lake)
    sent_summary = summary[0] if summary else None
    print(file=out)
    print(f"sent      {sent_summary.messages if sent_summary else 0:>12,} messages", file=out)
    print(f"accepted  {lake_totals.accepted:>12,} events", file=out)
    print(f"rejected  {lake_totals.rejected:>12,} events (dead-letter rows)", file=out)
    for reason, count in sorted(lake_totals.rejects_by_reason.items()):
        print(f"  {reason:<24}{count:>8,}", file=out)
    print(f"cost      {lake_totals.cost_usd:>20} USD", file=out)
    print(f"lake      {lake}", file=out)
    lake_arg = os.path.relpath(lake) if not os.path.relpath(lake).startswith("..") else str(lake)
    print("\nTry:", file=out)
    print(
        f'  {_meter_command()} query --lake {lake_arg} "SELECT model, count(*) AS events, '
        f'sum(cost_usd) AS cost_usd FROM events GROUP BY model ORDER BY cost_usd DESC"',
        file=out,
    )
    return 0
