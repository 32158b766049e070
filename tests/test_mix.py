"""The event mixes are what benchmarks and the load generator send, so they must be exactly
reproducible, accepted whole by the parser, and sized like a real gateway's events; each
bad event must fail for exactly the reason it is named after."""

from __future__ import annotations

import random
import re

import pyarrow.compute as pc
import pytest

from meter import parse_batch
from meter.mix import KINDS, MODELS, N_TEAMS, N_USERS, Mix, bad_event, rfc3339_ms, totals, ulid
from meter.reasons import PARSER_REASONS
from meter.schema import TOKEN_COLUMNS

START_MS = 1_764_380_000_000  # 2025-11-29T01:33:20Z
SPAN_MS = 3_600_000
NOW_MS = START_MS + SPAN_MS
N = 2_000

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _mix(kind: str, seed: int = 1) -> Mix:
    return Mix(seed, kind, start_ms=START_MS, span_ms=SPAN_MS)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_bytes(kind: str) -> None:
    assert list(_mix(kind).messages(N)) == list(_mix(kind).messages(N))
    assert list(_mix(kind).messages(N)) != list(_mix(kind, seed=2).messages(N))


def test_stream_continues_across_calls() -> None:
    mix = _mix("reference")
    first = [e["event_id"] for e in mix.events(100)]
    second = [e["event_id"] for e in mix.events(100)]
    assert not set(first) & set(second)


@pytest.mark.parametrize("kind", KINDS)
def test_every_event_is_accepted_as_generated(kind: str) -> None:
    mix = _mix(kind)
    events = list(mix.events(N))
    result = parse_batch([mix.encode(e) for e in events], now_ms=NOW_MS)
    assert result.rejects == []
    assert result.batch.num_rows == N
    for name in ("event_id", "user", "team", "org", "model", "request_id", "prompt_hash"):
        assert result.batch.column(name).to_pylist() == [e[name] for e in events]
    for name in TOKEN_COLUMNS:
        assert result.batch.column(name).to_pylist() == [e.get(name, 0) for e in events]


@pytest.mark.parametrize("kind", KINDS)
def test_ndjson_messages_hold_the_same_events(kind: str) -> None:
    messages = list(_mix(kind).messages(N, per_message=7))
    assert len(messages) == -(-N // 7)
    result = parse_batch(messages, now_ms=NOW_MS)
    assert result.rejects == []
    assert result.batch.num_rows == N


@pytest.mark.parametrize("kind", KINDS)
def test_totals_match_what_the_parser_sums(kind: str) -> None:
    mix = _mix(kind)
    events = list(mix.events(N))
    batch = parse_batch([mix.encode(e) for e in events], now_ms=NOW_MS).batch
    expected = {"events": batch.num_rows}
    expected.update({name: pc.sum(batch.column(name)).as_py() for name in TOKEN_COLUMNS})
    assert totals(events) == expected


def test_reference_events_are_gateway_sized() -> None:
    sizes = [len(m) for m in _mix("reference").messages(20_000)]
    assert 300 <= sum(sizes) / len(sizes) <= 360


def test_reference_mix_looks_like_a_gateway() -> None:
    events = list(_mix("reference").events(20_000))
    users = [e["user"] for e in events]
    busiest = max(users.count(u) for u in set(users[:200]))
    assert 0.01 < busiest / len(events) < 0.15  # skewed, not one user
    assert len(set(users)) > 5_000
    team_of: dict[str, str] = {}
    for e in events:
        assert team_of.setdefault(e["user"], e["team"]) == e["team"]
    assert len({e["team"] for e in events}) > N_TEAMS * 0.9
    assert 5 <= len({e["org"] for e in events}) <= 10
    assert {e["model"] for e in events} == {m.name for m in MODELS}
    assert {(e["model"], e["provider"]) for e in events} <= {(m.name, m.provider) for m in MODELS}
    assert all(100 <= e["input_tokens"] <= 50_000 and 10 <= e["output_tokens"] <= 4_000 for e in events)
    assert 0.4 < sum("cache_read_tokens" in e for e in events) / len(events) < 0.8
    assert 0.01 < sum("cache_write_tokens" in e for e in events) / len(events) < 0.2
    reasoning = {m.name for m in MODELS if m.reasoning}
    for e in events:
        assert ("reasoning_tokens" in e) == (e["model"] in reasoning)
        assert e.get("reasoning_tokens", 0) <= e["output_tokens"]
    assert all(int(u[1:]) < N_USERS for u in users)


def test_timestamps_and_ulids_are_ordered_inside_the_span() -> None:
    events = list(_mix("reference").events(N))
    stamps = [e["ts"] for e in events]
    assert stamps == sorted(stamps)
    assert rfc3339_ms(START_MS) <= stamps[0] and stamps[-1] < rfc3339_ms(START_MS + SPAN_MS)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ts) for ts in stamps)
    ids = [e["event_id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for event in events[:50]:
        value = 0
        for char in event["event_id"]:
            value = value * 32 + _CROCKFORD.index(char)
        assert rfc3339_ms(value >> 80) == event["ts"]


def test_ulid_encoding() -> None:
    assert ulid(0, 0) == "0" * 26
    assert ulid((1 << 48) - 1, (1 << 80) - 1) == "7" + "Z" * 25
    assert ulid(1469918176385, 0) == "01ARYZ6S41" + "0" * 16


def test_escape_mix_has_the_escapes_it_promises() -> None:
    blob = b"\n".join(_mix("escape").messages(N))
    for needle in (b"\\u", b'\\"', b"\\\\", b"\\/", b"\\uD83C\\uDF02"):
        assert needle in blob
    assert re.search(rb"[\x80-\xff]", blob)
    assert re.search(rb"\\u[0-9a-f]{4}", blob)


def test_shuffled_mix_varies_key_order() -> None:
    orders = {tuple(e) for e in _mix("shuffled").events(200)}
    assert len(orders) > 150


@pytest.mark.parametrize("reason", PARSER_REASONS)
def test_bad_event_fails_for_its_reason(reason: str) -> None:
    rng = random.Random(reason)
    for _ in range(3 if reason == "too_large" else 40):
        payload = bad_event(reason, rng, now_ms=NOW_MS)
        result = parse_batch([payload], now_ms=NOW_MS)
        assert result.batch.num_rows == 0
        assert [r.reason for r in result.rejects] == [reason], payload[:300]


def test_bad_event_is_seeded() -> None:
    for reason in PARSER_REASONS:
        if reason != "too_large":
            one = bad_event(reason, random.Random(5), now_ms=NOW_MS)
            assert one == bad_event(reason, random.Random(5), now_ms=NOW_MS)
