"""Effectively once through broker faults, on librdkafka's mock cluster with its fault API
(`meter.mockfault`): `meter run` (a real process) rides through high latency, injected
OffsetCommit and Fetch errors and the group coordinator's broker down for 12 s, and the lake
ends up holding each Kafka message exactly once, every chain starting at offset 0 without a
gap (the daemon never jumped ahead or back silently), with Kafka's committed offsets caught up
with the manifest. A manifest position beyond the broker's log (a broker that lost data)
raises the meter_offset_out_of_range alarm and holds the partition instead of resetting it.

CI size: ~30k events over ~40 s. Long run: METER_FAULT_DOWN_S=30 (a longer outage) and
METER_FAULT_EVENTS up to about 60000. The mock keeps only the last 5 MiB per partition and
the test reads the whole topic back at the end; `meter gen` keys by user, so the busiest
partition fills first whatever METER_FAULT_PARTITIONS is (300,000 events lost ~1% of the
messages to the mock before the read-back, at 8, 32 and 64 partitions). The events go out at
a steady rate, without 1 MiB too_large messages.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faultkit import (
    Daemon,
    Expect,
    Runner,
    check_chains,
    check_lake,
    check_query,
    committed_offsets,
    env_int,
    lake_messages,
    read_back,
    wait_landed,
)

from meter.manifest import load_partition
from meter.reasons import PARSER_REASONS, TOO_LARGE

pytestmark = pytest.mark.integration

EVENTS = env_int("METER_FAULT_EVENTS", 30_000)
DOWN_S = env_int("METER_FAULT_DOWN_S", 12)
PARTITIONS = env_int("METER_FAULT_PARTITIONS", 8)
PER_MESSAGE = 2
SESSION_TIMEOUT_MS = 6000
ALARM = "meter_offset_out_of_range"
#: Every bad-event kind but too_large: a 1 MiB message each would push older messages out of
#: the mock's 5 MiB per partition.
SMALL_BAD_REASONS = tuple(r for r in PARSER_REASONS if r != TOO_LARGE)


@pytest.fixture
def runner(mock_cluster: Any, tmp_path: Path) -> Iterator[Runner]:
    r = Runner(mock_cluster.bootstrap_servers, tmp_path)
    try:
        yield r
    finally:
        r.close()


def wait_growth(lake: Path, since: int, daemon: Daemon, what: str, timeout: float = 40.0) -> int:
    """Until the manifest covers more than `since` messages; returns the new count."""
    deadline = time.monotonic() + timeout
    while (now := lake_messages(lake)) <= since:
        assert daemon.running(), f"meter run exited with {daemon.proc.returncode} ({what})"
        assert time.monotonic() < deadline, f"no progress within {timeout:.0f}s {what}"
        time.sleep(0.1)
    return now


def test_rides_through_broker_faults(runner: Runner, mock_cluster: Any, topic: Callable[..., str]) -> None:
    from confluent_kafka import KafkaError

    from meter.gen import generate
    from meter.mockfault import ApiKey

    faults = mock_cluster.faults
    name = topic(mock_cluster, PARTITIONS)
    lake = runner.tmp / "lake"
    group = f"meter-faults-{uuid.uuid4().hex[:8]}"
    faults.set_coordinator("group", group, 1)  # the broker that goes down is the coordinator
    seconds = 18 + DOWN_S + 10
    produced: dict[str, Any] = {}

    def produce() -> None:
        try:
            produced["summary"] = generate(
                runner.brokers,
                name,
                events=EVENTS,
                rate=EVENTS / seconds,
                seed=3,
                per_message=PER_MESSAGE,
                bad_ratio=0.02,
                bad_reasons=SMALL_BAD_REASONS,
            )
        except BaseException as error:  # re-raised in the test's thread
            produced["error"] = error

    daemon = runner.start(
        name,
        lake,
        group,
        runner.log("meter-run-faults"),
        session_timeout_ms=SESSION_TIMEOUT_MS,
        batch_max_age_s=0.3,
    )
    producer = threading.Thread(target=produce, name="generate", daemon=True)
    producer.start()
    daemon.wait_assigned()
    progress = {"start": wait_growth(lake, 0, daemon, "before any fault")}

    # 1. every response of every broker 700 ms late
    faults.set_rtt(700)
    time.sleep(5)
    progress["latency"] = wait_growth(lake, progress["start"], daemon, "under 700 ms latency")
    faults.set_rtt(0)

    # 2. commits fail (timeouts, coordinator moves), fetches fail (leadership, transport)
    faults.push_request_errors(
        ApiKey.OFFSET_COMMIT,
        *[KafkaError.REQUEST_TIMED_OUT, KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_NOT_AVAILABLE] * 4,
    )
    faults.push_request_errors(
        ApiKey.FETCH,
        *[
            KafkaError.NOT_LEADER_FOR_PARTITION,
            KafkaError.REQUEST_TIMED_OUT,
            KafkaError.UNKNOWN_TOPIC_OR_PART,
            KafkaError._TRANSPORT,
        ]
        * 5,
    )
    time.sleep(4)
    progress["errors"] = wait_growth(lake, progress["latency"], daemon, "after injected errors")

    # 3. the coordinator's broker (also the leader of some partitions) down for DOWN_S seconds
    faults.broker_down(1)
    time.sleep(DOWN_S)
    progress["down"] = lake_messages(lake)
    faults.broker_up(1)
    assert daemon.running(), "meter run exited while a broker was down"
    assert producer.is_alive(), "the generator had finished before the faults were over"

    producer.join(timeout=seconds + 120)
    assert not producer.is_alive(), "the generator did not finish"
    if "error" in produced:
        raise produced["error"]
    summary = produced["summary"]
    assert summary.failed == 0 and summary.delivered == summary.messages, summary.errors
    sent = read_back(runner.brokers, name, PARTITIONS, summary.messages)
    wait_landed(lake, summary.messages, [daemon], timeout=120)
    # the commits lost in the faults are made good by the timer (commit_interval_s 5)
    deadline = time.monotonic() + 30
    while committed_offsets(runner.brokers, group, name, PARTITIONS) != check_chains(lake, name, PARTITIONS):
        assert time.monotonic() < deadline, "Kafka's committed offsets never caught up with the manifest"
        time.sleep(1)
    failed_commits = daemon.metric("meter_commits_total", outcome="failed")
    alarms = daemon.metric(ALARM)
    skipped = daemon.metric("meter_messages_skipped_total")
    assert daemon.stop() == 0

    expect = Expect.of(summary)
    check_lake(lake, name, PARTITIONS, expect, sent)
    check_query(lake, expect)
    assert alarms == 0, "a transient fault raised the out-of-range alarm"
    assert failed_commits > 0, "no commit failed: the faults tested little"
    events = [r.get("msg") for r in daemon.records() if r.get("level") in ("warning", "error")]
    print(
        f"progress {progress}; commits failed {failed_commits:g}; skipped {skipped:g}; "
        f"warnings {dict((m, events.count(m)) for m in set(events))}; {summary.messages} messages"
    )


def produce_to(brokers: str, topic: str, counts: dict[int, int], seed: int) -> None:
    """Valid one-event messages, `counts[p]` of them to partition p."""
    from confluent_kafka import Producer

    from meter.gen import plan

    messages = plan(events=sum(counts.values()), seed=seed)
    producer = Producer({"bootstrap.servers": brokers, "linger.ms": 5})
    for p, n in counts.items():
        for _ in range(n):
            message = next(messages)
            producer.produce(topic, message.value, message.key, partition=p)
    assert producer.flush(30) == 0


def test_manifest_beyond_high_watermark_raises_the_alarm(
    runner: Runner, mock_cluster: Any, topic: Callable[..., str], tmp_path: Path
) -> None:
    """The lake was filled from one cluster; the topic then comes back from a cluster that
    lost data (a new mock cluster, same topic name): partition 0's log now ends far below the
    manifest's position, partition 1's goes beyond it. The daemon alarms on partition 0 and
    holds it (no reset to the start or the end: its chain is untouched) while partition 1
    carries on."""
    from meter.brokers import MockCluster

    name = topic(mock_cluster, 2)
    lake = tmp_path / "lake"
    group = f"meter-alarm-{uuid.uuid4().hex[:8]}"
    produce_to(mock_cluster.bootstrap_servers, name, {0: 300, 1: 300}, seed=1)
    first = runner.start(name, lake, group, runner.log("meter-run-first"), batch_max_age_s=0.3)
    wait_landed(lake, 600, [first])
    assert first.stop() == 0
    before = load_partition(lake, name, 0).entries

    with MockCluster(3, initial_rebalance_delay_ms=0) as lost:
        lost.create_topic(name, 2)
        produce_to(lost.bootstrap_servers, name, {0: 10, 1: 500}, seed=2)
        runner.brokers = lost.bootstrap_servers
        second = runner.start(name, lake, group, runner.log("meter-run-lost"), batch_max_age_s=0.3)
        second.wait_assigned()
        deadline = time.monotonic() + 40
        while second.metric(ALARM, topic=name, partition="0") != 1:
            assert second.running(), f"meter run exited with {second.proc.returncode}"
            assert time.monotonic() < deadline, "no out-of-range alarm for partition 0"
            time.sleep(0.2)
        deadline = time.monotonic() + 40
        while load_partition(lake, name, 1).position != 500:
            assert time.monotonic() < deadline, "partition 1 did not carry on past the lost partition"
            time.sleep(0.2)
        time.sleep(1.5)  # a reset would have written partition 0 by now
        assert second.running()
        assert second.metric(ALARM, topic=name, partition="1") == 0
        logged = [r for r in second.records() if r.get("level") == "error"]
        assert any("out of the broker's range" in str(r.get("msg")) for r in logged), logged
        assert second.stop() == 0
    assert load_partition(lake, name, 0).entries == before, "partition 0 was reset"
    assert load_partition(lake, name, 0).position == 300
