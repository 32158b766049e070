"""`meter gen`: the same seed sends the same bytes, bad events fail for exactly the reasons the
summary reports, retries are verbatim, and the summary is what a consumer reads back."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from meter import parse_batch
from meter.gen import MAX_RESEND_DELAY, NO_USER_KEY, GenSummary, Message, Tally, _key_of, plan
from meter.mix import Mix, totals
from meter.pricing import load_catalog
from meter.reasons import PARSER_REASONS, TOO_LARGE
from meter.schema import TOKEN_COLUMNS
from meter.totals import Totals

START_MS = 1_764_380_000_000  # 2025-11-29T01:33:20Z
SPAN_MS = 3_600_000
NOW_MS = START_MS + SPAN_MS


def _plan(**kwargs: Any) -> list[Message]:
    kwargs.setdefault("events", 1_000)
    kwargs.setdefault("start_ms", START_MS)
    kwargs.setdefault("now_ms", NOW_MS)
    return list(plan(**kwargs))


def _tally(messages: list[Message]) -> GenSummary:
    tally = Tally(load_catalog(), NOW_MS)
    for message in messages:
        tally.add(message)
    return tally.summary()


def _lines(message: Message) -> list[bytes]:
    return message.value.split(b"\n")


# --- plan ------------------------------------------------------------------------------


@pytest.mark.parametrize("per_message", [1, 7])
def test_same_seed_same_messages(per_message: int) -> None:
    kwargs = dict(per_message=per_message, bad_ratio=0.05, duplicate_ratio=0.1)
    first = _plan(**kwargs)
    assert first == _plan(**kwargs)
    assert first != _plan(seed=2, **kwargs)
    assert [m.value for m in first] != [m.value for m in _plan(seed=2, **kwargs)]


def test_clean_plan_is_the_mix() -> None:
    """Without bad events or retries the messages are exactly Mix(seed).messages()."""
    messages = _plan(events=500, per_message=10, seed=3)
    mix = Mix(3, start_ms=START_MS, span_ms=SPAN_MS)
    assert [m.value for m in messages] == list(mix.messages(500, per_message=10))
    assert not any(m.is_resend for m in messages)


def test_default_start_is_the_span_before_now() -> None:
    messages = list(plan(events=200, span_ms=60_000, now_ms=NOW_MS))
    result = parse_batch([m.value for m in messages], now_ms=NOW_MS)
    assert result.rejects == []
    ts = result.batch.column("ts").cast("int64").to_pylist()
    assert min(ts) >= NOW_MS - 60_000 and max(ts) < NOW_MS


def test_range_outside_the_daemons_window_is_refused() -> None:
    with pytest.raises(ValueError, match="outside the window"):
        plan(events=10, start_ms=START_MS - 40 * 86_400_000, now_ms=NOW_MS)
    with pytest.raises(ValueError, match="outside the window"):
        plan(events=10, start_ms=NOW_MS + 3_600_000, now_ms=NOW_MS)
    # all-bad traffic has no valid events to keep in the window
    assert len(_plan(events=12, bad_ratio=1.0, start_ms=NOW_MS + 3_600_000)) == 12


@pytest.mark.parametrize(
    "kwargs",
    [dict(events=-1), dict(per_message=0), dict(bad_ratio=1.5), dict(duplicate_ratio=-0.1)],
)
def test_bad_arguments_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        _plan(**kwargs)


# --- bad events --------------------------------------------------------------------------


@pytest.mark.parametrize("per_message", [1, 10])
def test_bad_events_cover_every_reason_and_the_parser_agrees(per_message: int) -> None:
    n = 2_400
    messages = _plan(events=n, per_message=per_message, bad_ratio=0.1, seed=5)
    summary = _tally(messages)
    # 10% of the slots, evenly spread over every parser reason
    assert summary.bad_events == dict.fromkeys(sorted(PARSER_REASONS), n // 10 // 12)
    assert summary.events == n - n // 10
    # the parser rejects exactly the lines the plan says, for exactly those reasons
    result = parse_batch([m.value for m in messages], now_ms=NOW_MS)
    expected = [
        (i, line, reason)
        for i, m in enumerate(messages)
        for line, reason in enumerate(m.reasons)
        if reason is not None
    ]
    assert [(r.message_index, r.line, r.reason) for r in result.rejects] == expected
    assert Counter(r.reason for r in result.rejects) == Counter(summary.bad_events)
    assert result.batch.num_rows == summary.events
    # too_large travels alone, every other bad event is one line among valid ones
    for m in messages:
        assert len(_lines(m)) == len(m.reasons)
        if TOO_LARGE in m.reasons:
            assert m.reasons == (TOO_LARGE,)
    if per_message > 1:
        mixed = [m for m in messages if len(m.reasons) > 1 and set(m.reasons) - {None}]
        assert mixed, "bad lines should share messages with valid ones"


def test_bad_events_are_spread_evenly() -> None:
    messages = _plan(events=1_000, bad_ratio=0.05)
    slots = [i for i, m in enumerate(messages) if m.reasons != (None,)]
    assert len(slots) == 50
    assert {b - a for a, b in itertools.pairwise(slots)} == {20}
    assert [messages[i].reasons[0] for i in slots[:12]] == list(PARSER_REASONS)


def test_bad_events_are_built_around_the_daemons_clock() -> None:
    later = NOW_MS + 10 * 86_400_000
    messages = _plan(events=240, bad_ratio=1.0, start_ms=later - SPAN_MS, now_ms=later)
    result = parse_batch([m.value for m in messages], now_ms=later)
    assert Counter(r.reason for r in result.rejects) == dict.fromkeys(PARSER_REASONS, 20)


# --- packing and keys -----------------------------------------------------------------


def test_per_message_packing_and_keys() -> None:
    n, k = 1_003, 10
    messages = _plan(events=n, per_message=k, bad_ratio=0.024)  # 24 bad: 2 too_large
    sizes = [len(m.reasons) for m in messages]
    assert sizes.count(1) == 2 + (n - 2) % k  # the two too_large ones and a short tail
    assert all(size == k for size in sizes[:-1] if size != 1)
    assert sum(sizes) == n
    keyless = 0
    for m in messages:
        # the key is the user id of the message's first event that still has one
        users = [
            orjson.loads(line)["user"].encode() if reason is None else _key_of(line)
            for line, reason in zip(_lines(m), m.reasons, strict=True)
        ]
        first = next((user for user in users if user), None)
        if first is None:
            keyless += 1
        assert m.key == (first or NO_USER_KEY)
    assert keyless < 3
    assert len({m.key for m in messages}) > len(messages) // 2


# --- duplicates -------------------------------------------------------------------------


@pytest.mark.parametrize("per_message", [1, 5])
def test_retries_are_verbatim_and_accounted(per_message: int) -> None:
    messages = _plan(events=3_000, per_message=per_message, duplicate_ratio=0.1, bad_ratio=0.02)
    unique = [m for m in messages if not m.is_resend]
    resent = [m for m in messages if m.is_resend]
    assert len(resent) == len(unique) // 10
    # a few bad events are constant bytes ("42", "null"), so equal unique messages exist
    originals: dict[tuple[bytes, bytes], list[int]] = {}
    for i, m in enumerate(unique):
        originals.setdefault((m.key, m.value), []).append(i)
    assert sum(map(len, originals.values())) - len(originals) < len(unique) // 100
    seen = 0
    for m in messages:
        if not m.is_resend:
            seen += 1
            continue
        # the same bytes under the same key, 0..MAX_RESEND_DELAY unique messages later
        last = seen - 1
        assert any(0 <= last - i <= MAX_RESEND_DELAY for i in originals[(m.key, m.value)])

    summary = _tally(messages)
    assert summary.messages == len(messages)
    assert summary.unique_messages == len(unique)
    assert summary.resent_messages == len(resent)
    assert summary.resent_events == sum(m.reasons.count(None) for m in resent)
    assert summary.resent_bad_events == dict(Counter(r for m in resent for r in m.reasons if r is not None))
    # a re-send changes nothing that the lake counts once
    clean = _tally(unique)
    assert (summary.events, summary.tokens, summary.cost_usd, summary.bad_events) == (
        clean.events,
        clean.tokens,
        clean.cost_usd,
        clean.bad_events,
    )


def test_some_retries_follow_at_once_and_some_later() -> None:
    messages = _plan(events=2_000, duplicate_ratio=0.2)
    gaps = Counter()
    for i, m in enumerate(messages):
        if m.is_resend:
            original = next(j for j in range(i) if messages[j].value == m.value)
            gaps[sum(not x.is_resend for x in messages[original + 1 : i])] += 1
    assert gaps[0] > 0 and max(gaps) > 0 and max(gaps) <= MAX_RESEND_DELAY


# --- the summary ------------------------------------------------------------------------


def test_summary_totals_match_the_events_sent() -> None:
    messages = _plan(events=2_000, per_message=4, bad_ratio=0.06, duplicate_ratio=0.05)
    summary = _tally(messages)
    valid = [
        orjson.loads(line)
        for m in messages
        if not m.is_resend
        for line, reason in zip(_lines(m), m.reasons, strict=True)
        if reason is None
    ]
    expected = totals(valid)
    assert summary.events == expected["events"] == 2_000 - 120
    assert summary.tokens == {name: expected[name] for name in TOKEN_COLUMNS}
    # cost: the daemon's arithmetic, done independently here
    catalog = load_catalog()
    check = Totals()
    check.add_batch(catalog.price(parse_batch([orjson.dumps(e) for e in valid], now_ms=NOW_MS).batch))
    assert summary.cost_usd == check.cost_usd > 0
    assert summary.unpriced == check.unpriced == 0
    ts = sorted(e["ts"] for e in valid)
    doc = summary.to_json()
    assert (doc["event_time"]["first"], doc["event_time"]["last"]) == (ts[0], ts[-1])
    assert START_MS <= doc["event_time"]["first_ms"] <= doc["event_time"]["last_ms"] < NOW_MS
    assert doc["cost_usd"] == format(check.cost_usd, "f")
    assert doc["bytes"] == sum(len(m.value) for m in messages)
    orjson.dumps(doc)  # JSON-ready as is


def test_unknown_models_are_counted_unpriced(tmp_path: Any) -> None:
    catalog = tmp_path / "prices.toml"
    catalog.write_text(
        'source = "test"\nas_of = "2025-01-01"\n[[model]]\nid = "gpt-5"\nprovider = "openai"\n'
        'effective_from = "2025-01-01"\ninput = "1.25"\noutput = "10.00"\ncache_read = "0.125"\n'
        'cache_write = "0"\ncache_write_1h = "0"\n'
    )
    messages = _plan(events=500)
    tally = Tally(load_catalog(catalog), NOW_MS)
    for m in messages:
        tally.add(m)
    summary = tally.summary()
    gpt5 = sum(orjson.loads(m.value)["model"] == "gpt-5" for m in messages)
    assert 0 < gpt5 < 500
    assert summary.unpriced == 500 - gpt5


# --- against a real broker ----------------------------------------------------------------


def _consume(bootstrap: str, topic: str, partitions: int, count: int, conf: dict[str, Any]) -> list[Any]:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(conf)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    records: list[Any] = []
    deadline = time.monotonic() + 60
    try:
        while len(records) < count and time.monotonic() < deadline:
            for record in consumer.consume(num_messages=10_000, timeout=0.5):
                assert record.error() is None, record.error()
                records.append(record)
        # nothing beyond what was sent
        records += [r for r in consumer.consume(num_messages=100, timeout=1.0) if not r.error()]
    finally:
        consumer.close()
    return records


@pytest.mark.integration
def test_generate_to_tansu_and_read_back(tansu: Any, consumer_conf: Callable[..., dict[str, Any]]) -> None:
    from meter.gen import generate

    topic = f"gen-readback-{time.time_ns()}"
    kwargs = dict(
        events=3_000,
        seed=7,
        per_message=5,
        bad_ratio=0.04,
        duplicate_ratio=0.1,
        start_ms=START_MS,
        now_ms=NOW_MS,
    )
    progress: list[Any] = []
    summary = generate(tansu.bootstrap_servers, topic, partitions=3, on_progress=progress.append, **kwargs)
    assert summary.failed == 0 and summary.errors == {}
    assert summary.delivered == summary.messages == len(_plan(**kwargs))
    assert summary.partitions == 3 and not summary.stopped
    assert progress and progress[-1].messages == summary.messages

    records = _consume(
        tansu.bootstrap_servers, topic, 3, summary.messages, consumer_conf(tansu.bootstrap_servers)
    )
    assert len(records) == summary.messages
    # every message arrived once (the idempotent producer) with its key; a retry lands on
    # its original's partition
    sent = Counter((m.key, m.value) for m in _plan(**kwargs))
    got = Counter((r.key(), r.value()) for r in records)
    assert got == sent
    where: dict[bytes, set[int]] = {}
    for r in records:
        where.setdefault(r.value(), set()).add(r.partition())
    assert all(len(parts) == 1 for parts in where.values())
    assert len({r.partition() for r in records}) == 3

    # re-parse what was read: first sends give the summary's totals exactly
    first_sends = Counter((m.key, m.value) for m in _plan(**kwargs) if not m.is_resend)
    firsts, taken = [], Counter()
    for r in sorted(records, key=lambda r: (r.partition(), r.offset())):
        if taken[(r.key(), r.value())] < first_sends[(r.key(), r.value())]:
            taken[(r.key(), r.value())] += 1
            firsts.append(r.value())
    assert len(firsts) == summary.unique_messages
    result = parse_batch(firsts, now_ms=NOW_MS)
    check = Totals()
    check.add_batch(load_catalog().price(result.batch))
    assert check.events == summary.events
    assert check.tokens == summary.tokens
    assert check.cost_usd == summary.cost_usd
    assert dict(Counter(r.reason for r in result.rejects)) == summary.bad_events
    everything = parse_batch([r.value() for r in records], now_ms=NOW_MS)
    assert everything.batch.num_rows == summary.events + summary.resent_events
    assert len(everything.rejects) == sum(summary.bad_events.values()) + sum(
        summary.resent_bad_events.values()
    )


@pytest.mark.integration
def test_generate_paces_and_stops(tansu: Any) -> None:
    from meter.gen import generate

    bootstrap = tansu.bootstrap_servers
    started = time.monotonic()
    paced = generate(bootstrap, f"gen-paced-{time.time_ns()}", events=1_500, rate=3_000, partitions=1)
    elapsed = time.monotonic() - started
    assert paced.failed == 0 and paced.events == 1_500
    assert paced.elapsed_s >= 0.4 and elapsed < 5  # 1500 events at 3000/s: about 0.5 s

    stop = threading.Event()

    def on_progress(progress: Any) -> None:
        stop.set()

    stopped = generate(
        bootstrap,
        f"gen-stop-{time.time_ns()}",
        events=1_000_000,
        rate=2_000,
        partitions=1,
        stop=stop,
        on_progress=on_progress,
    )
    assert stopped.stopped and stopped.failed == 0
    assert 0 < stopped.events < 10_000
    assert stopped.delivered == stopped.messages


@pytest.mark.integration
def test_cli_gen_json(tansu: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from meter.cli import main

    topic = f"gen-cli-{time.time_ns()}"
    code = main(
        [
            "gen",
            "--brokers",
            tansu.bootstrap_servers,
            "--topic",
            topic,
            "--events",
            "500",
            "--per-message",
            "50",
            "--partitions",
            "2",
            "--bad-ratio",
            "0.024",
            "--kafka",
            "compression.type=lz4",
            "--json",
        ]
    )
    assert code == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert doc["events"] == 488 and doc["delivered"] == doc["messages"] and doc["failed"] == 0
    assert sum(doc["bad_events"].values()) == 12 and doc["partitions"] == 2


@pytest.mark.integration
def test_delivery_failure_exits_1(
    mock_cluster: Any, topic: Callable[..., str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A broker that refuses the messages: counted, reported, exit 1."""
    from meter.cli import main

    name = topic(mock_cluster, 1)
    mock_cluster.faults.push_request_errors(0, *[29] * 20)  # Produce: TOPIC_AUTHORIZATION_FAILED
    code = main(
        [
            "gen",
            "--brokers",
            mock_cluster.bootstrap_servers,
            "--topic",
            name,
            "--events",
            "5",
            "--kafka",
            "message.timeout.ms=5000",
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert orjson.loads(captured.out)["failed"] == 5
    assert "5 of 5 messages not delivered (TOPIC_AUTHORIZATION_FAILED 5)" in captured.err
