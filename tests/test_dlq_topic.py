"""The optional Kafka dead-letter topic holds exactly the lake's DLQ rows, after the lake has them."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from meter.config import Config
from meter.gen import generate
from meter.manifest import totals
from meter.pipeline import Pipeline
from meter.query import query
from meter.stages import DlqForwarder


@pytest.mark.integration
def test_dead_letter_rows_are_also_produced_to_the_dlq_topic(
    tansu: Any, topic: Any, consumer_conf: Any, tmp_path: Path
) -> None:
    from confluent_kafka import Consumer

    source = topic(tansu, partitions=2)
    dlq_topic = topic(tansu, partitions=1)
    sent = generate(tansu.bootstrap_servers, source, events=600, bad_ratio=0.1, seed=4)
    lake = tmp_path / "lake"
    config = Config(
        brokers=tansu.bootstrap_servers,
        topic=(source,),
        lake=str(lake),
        group=f"g-{source}",
        metrics_addr=None,
        batch_max_age_s=0.3,
        session_timeout_ms=6000,
        dlq_topic=dlq_topic,
    )
    pipeline = Pipeline(config)
    stop = threading.Event()

    def stop_when_drained() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not stop.is_set():
            if lake.exists() and totals(lake).messages >= sent.messages:
                break
            time.sleep(0.2)
        stop.set()

    threading.Thread(target=stop_when_drained, daemon=True).start()
    pipeline.run(stop)
    assert totals(lake).messages == sent.messages

    consumer = Consumer(consumer_conf(tansu.bootstrap_servers))
    consumer.subscribe([dlq_topic])
    received: list[tuple[bytes, str, str]] = []
    deadline = time.monotonic() + 30
    while len(received) < sum(sent.bad_events.values()) and time.monotonic() < deadline:
        for message in consumer.consume(500, timeout=0.5):
            if message.error() is None:
                headers = dict(message.headers() or [])
                value = message.value()
                if "meter-truncated" in headers:  # cut to fit the broker; the lake keeps it whole
                    assert int(headers["meter-truncated"]) > len(value)
                    value = b"truncated:" + headers["meter-truncated"]
                received.append((value, headers["meter-reason"].decode(), headers["meter-source"].decode()))
    consumer.close()

    lake_rows = query(
        lake, "SELECT raw, reason, kafka_topic, kafka_partition, kafka_offset FROM dlq"
    ).to_pylist()

    def shown(raw: bytes) -> bytes:
        return raw if len(raw) <= DlqForwarder.MAX_VALUE else b"truncated:" + str(len(raw)).encode()

    expected = Counter(
        (shown(r["raw"]), r["reason"], f"{r['kafka_topic']}/{r['kafka_partition']}/{r['kafka_offset']}")
        for r in lake_rows
    )
    assert Counter(received) == expected
    assert Counter(reason for _, reason, _ in received) == Counter(sent.bad_events)
