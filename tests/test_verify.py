"""The compiled signature check (meter._verify) against its pure-Python twin and the
standard library: SHA-256 and HMAC on both SHA-256 backends, every verdict code, and a
differential fuzz test over forged headers that holds the two Tables equal."""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter import _pyverify
from meter import _verify as native

TOPIC = "usage"
NOW = 1_764_380_000_000
OPEN = (-(1 << 63), (1 << 63) - 1, (1 << 63) - 1)
SECRETS = [b"k" * 32, bytes(range(64)), b"long-" * 20]
C = {name: code for code, name in enumerate(native.CODES)}
IMPLS = [pytest.param(native, id="compiled"), pytest.param(_pyverify, id="python")]


@pytest.fixture(params=[True, False], ids=["shani", "portable"])
def backend(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Run a test on the SHA extensions (where the CPU has them) and on portable C."""
    active = native.select_backend(request.param)
    try:
        yield active
    finally:
        native.select_backend(True)


def sign(secret: bytes, kid: bytes, ts: bytes, value: bytes, topic: bytes = b"usage") -> bytes:
    return hmac.new(secret, _pyverify.signature_base(kid, ts, topic, value), hashlib.sha256).digest()


def headers(kid: bytes = b"k0", ts: int = NOW, value: bytes = b"v", secret: bytes = SECRETS[0]) -> list:
    tsb = str(ts).encode()
    return [("meter-kid", kid), ("meter-ts", tsb), ("meter-sig", sign(secret, kid, tsb, value))]


def table(impl, windows=None, topics=None, algs=None):
    n = len(SECRETS)
    return impl.Table(
        [b"k0", b"k1", b"k2"],
        algs or [0] * n,
        windows or [OPEN] * n,
        SECRETS,
        topics or [None] * n,
    )


def codes(verdicts) -> list[str]:
    return [native.CODES[c] for c in verdicts.codes]


# ---------------------------------------------------------------- primitives


def test_sha256_matches_hashlib(backend: bool) -> None:
    rng = random.Random(7)
    for n in [*range(0, 200), 447, 448, 1000, 4096, 65_537]:
        data = rng.randbytes(n)
        assert native.sha256(data) == hashlib.sha256(data).digest(), n


def test_hmac_matches_stdlib(backend: bool) -> None:
    rng = random.Random(8)
    for key_len in (0, 1, 31, 32, 64, 65, 200):
        key = rng.randbytes(key_len)
        for n in (0, 1, 55, 56, 63, 64, 119, 120, 300, 5000):
            data = rng.randbytes(n)
            assert native.hmac_sha256(key, data) == hmac.new(key, data, hashlib.sha256).digest()


def test_batch_pairs_and_streams_messages_of_every_size(backend: bool) -> None:
    """Values up to 4 KiB go through the two-lane path, larger ones are streamed; an odd
    one out at the end is hashed alone. Every size around the block edges verifies."""
    rng = random.Random(9)
    sizes = [0, 1, 23, 24, 55, 56, 64, 100, 300, 4000, 4096, 4097, 10_000, 7]
    values = [rng.randbytes(n) for n in sizes]
    heads = [headers(b"k1", NOW, v, SECRETS[1]) for v in values]
    heads[3][2] = ("meter-sig", bytes(32))  # one bad MAC in the middle
    verdicts = table(native).check(values, heads, [(1, NOW)] * len(values), TOPIC, NOW, True, 10**9, 10**9)
    expected = ["ok"] * len(values)
    expected[3] = "bad_mac"
    assert codes(verdicts) == expected


def test_debug_build_when_expected() -> None:
    """`make test-asan` runs this file against the sanitizer build of the extension."""
    if os.environ.get("METER_EXPECT_DEBUG_BUILD"):
        assert native.DEBUG, native.__file__


def test_backend_flag_reports_the_cpu() -> None:
    assert native.select_backend(False) is False
    assert native.select_backend(True) is native.SHANI


# ---------------------------------------------------------------- every verdict


def _case(name: str) -> tuple[list, tuple[int, int], dict]:
    """Headers, record timestamp and Table options that give the verdict `name`."""
    value = b"payload"
    good = headers(value=value)
    stamp = (1, NOW)
    opts: dict = {}
    if name == "no_headers":
        good = [("other", b"x")]
    elif name == "missing":
        good = good[:2]
    elif name == "duplicate":
        good = [*good, good[0]]
    elif name == "bad_kid":
        good[0] = ("meter-kid", b"bad kid")
    elif name == "bad_ts":
        good[1] = ("meter-ts", b"12a")
    elif name == "bad_sig":
        good[2] = ("meter-sig", b"")
    elif name == "unknown_key":
        good = headers(kid=b"nobody", value=value)
    elif name == "alg_mismatch":
        good[2] = ("meter-sig", bytes(64))
    elif name == "wrong_topic":
        opts["topics"] = [frozenset({"other"}), None, None]
    elif name == "no_broker_time":
        opts["allow_create_time"] = False
    elif name == "revoked":
        opts["windows"] = [(0, 1 << 62, NOW - 1), OPEN, OPEN]
    elif name == "not_yet_valid":
        opts["windows"] = [(NOW + 1, 1 << 62, 1 << 62), OPEN, OPEN]
    elif name == "expired":
        opts["windows"] = [(0, NOW, 1 << 62), OPEN, OPEN]
    elif name == "stale":
        good = headers(ts=NOW - 86_400_001, value=value)
    elif name == "future":
        good = headers(ts=NOW + 300_001, value=value)
    elif name == "bad_mac":
        good = headers(value=value + b"!")
    elif name == "ed25519":
        opts["algs"] = [1, 0, 0]
        good[2] = ("meter-sig", bytes(64))
    return good, stamp, opts


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", native.CODES)
def test_each_code(impl, name: str) -> None:
    heads, stamp, opts = _case(name)
    allow = opts.pop("allow_create_time", True)
    t = table(impl, **opts)
    verdicts = t.check([b"payload"], [heads], [stamp], TOPIC, NOW, allow, 86_400_000, 300_000)
    assert codes(verdicts) == [name]


@pytest.mark.parametrize("impl", IMPLS)
def test_log_append_time_is_the_clock_when_the_record_has_it(impl) -> None:
    """A LogAppendTime record is checked at its broker time, whatever the arrival clock
    says (so a re-read gives the same verdict); a CreateTime one at the arrival clock only
    when allowed."""
    t = table(impl, windows=[(0, NOW + 1000, 1 << 62), OPEN, OPEN])
    heads = headers(ts=NOW - 5000, value=b"v")
    later = NOW + 10 * 86_400_000  # the record re-read ten days later
    check = t.check
    assert codes(check([b"v"], [heads], [(2, NOW)], TOPIC, later, False, 86_400_000, 300_000)) == ["ok"]
    assert codes(check([b"v"], [heads], [(2, NOW + 2000)], TOPIC, NOW, False, 86_400_000, 300_000)) == [
        "expired"
    ]
    assert codes(check([b"v"], [heads], [(1, NOW)], TOPIC, later, True, 86_400_000, 300_000)) == ["expired"]
    assert codes(check([b"v"], [heads], [(1, NOW)], TOPIC, NOW, False, 86_400_000, 300_000)) == [
        "no_broker_time"
    ]
    assert codes(check([b"v"], [heads], [(0, -1)], TOPIC, NOW, False, 86_400_000, 300_000)) == [
        "no_broker_time"
    ]


@pytest.mark.parametrize("impl", IMPLS)
def test_time_window_edges(impl) -> None:
    """-max_future <= time - meter-ts <= max_delay, inclusive at both ends."""
    t = table(impl)

    def at(delta: int) -> str:
        heads = headers(ts=NOW - delta, value=b"v")
        return codes(t.check([b"v"], [heads], [(2, NOW)], TOPIC, 0, False, 1000, 300))[0]

    assert [at(1000), at(1001), at(-300), at(-301), at(0)] == ["ok", "stale", "ok", "future", "ok"]


@pytest.mark.parametrize("impl", IMPLS)
def test_arguments_and_slots(impl) -> None:
    heads = headers(kid=b"k2", value=b"v", secret=SECRETS[2])
    heads[2] = ("meter-sig", b"x" * 64)
    v = table(impl).check([b"v", b"v"], [heads, None], [(1, NOW)] * 2, TOPIC, NOW, True, 10**9, 10**9)
    assert codes(v) == ["alg_mismatch", "no_headers"]
    assert struct.unpack("=2q", v.args)[0] == 64
    assert struct.unpack("=2i", v.slots) == (2, -1)


@pytest.mark.parametrize("impl", IMPLS)
def test_inputs_of_other_types(impl) -> None:
    """None payloads (tombstones) sign as empty; header lists may be tuples; non-bytes
    header values are malformed; foreign header entries are skipped."""
    t = table(impl)
    empty = headers(value=b"")
    mixed = (("x-trace", b"1"), ["not", "a tuple"], *headers(value=b"abc"))
    odd = headers(value=b"v")
    odd[0] = ("meter-kid", None)
    v = t.check(
        [None, bytearray(b"abc"), b"v"], [empty, mixed, odd], [(1, NOW)] * 3, TOPIC, NOW, True, 10**9, 10**9
    )
    assert codes(v) == ["ok", "ok", "bad_kid"]


def test_length_mismatch_and_duplicate_kids() -> None:
    for impl in (native, _pyverify):
        with pytest.raises(ValueError):
            table(impl).check([b"a"], [], [], TOPIC, NOW, True, 1, 1)
        with pytest.raises(ValueError):
            impl.Table([b"a", b"a"], [0, 0], [OPEN, OPEN], [b"x" * 32] * 2, [None, None])


# ---------------------------------------------------------------- differential fuzz

_kids = st.sampled_from([b"k0", b"k1", b"k2", b"k3", b"", b"bad kid", b"k" * 65, b"\xff"])
_ts = st.one_of(
    st.integers(NOW - 100_000_000, NOW + 1_000_000).map(lambda n: str(n).encode()),
    st.sampled_from([b"", b"-1", b"1e3", b"0" * 16, b"0", b"abc"]),
)


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes | None, object, tuple[int, int]]:
    value = draw(st.one_of(st.none(), st.binary(max_size=300)))
    kid = draw(_kids)
    ts = draw(_ts)
    slot = {b"k0": 0, b"k1": 1, b"k2": 2}.get(kid)
    good_sig = sign(SECRETS[slot], kid, ts, value or b"") if slot is not None else os.urandom(32)
    sig = draw(st.sampled_from([good_sig, good_sig[:-1] + b"\0", b"", b"x" * 64, good_sig + b"x"]))
    heads: list = [("meter-kid", kid), ("meter-ts", ts), ("meter-sig", sig)]
    extra = draw(st.lists(st.sampled_from([0, 1, 2, 3]), max_size=3))
    for which in extra:
        heads.append(heads[which] if which < 3 else ("other", b"x"))
    drop = draw(st.sampled_from([None, 0, 1, 2]))
    if drop is not None:
        del heads[drop]
    draw(st.randoms()).shuffle(heads)
    headers_value = draw(st.sampled_from([heads, None, []]))
    stamp = (draw(st.sampled_from([0, 1, 2])), draw(st.integers(NOW - 100_000_000, NOW + 1_000_000)))
    return value, headers_value, stamp


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.lists(messages(), min_size=1, max_size=12),
    allow=st.booleans(),
    topic=st.sampled_from(["usage", "other"]),
)
def test_twins_agree(batch: list, allow: bool, topic: str) -> None:
    windows = [(NOW - 50_000_000, NOW + 500_000, 1 << 62), OPEN, (0, 1 << 62, NOW - 10_000_000)]
    topics = [frozenset({"usage"}), None, None]
    algs = [0, 0, 1]
    args = (
        [m[0] for m in batch],
        [m[1] for m in batch],
        [m[2] for m in batch],
        topic,
        NOW,
        allow,
        86_400_000,
        300_000,
    )
    a = table(native, windows, topics, algs).check(*args)
    b = table(_pyverify, windows, topics, algs).check(*args)
    assert (a.codes, a.args, a.slots) == (b.codes, b.args, b.slots)


# ---------------------------------------------------------------- headers read in place


@pytest.mark.integration
def test_message_headers_read_in_place_agree_with_headers(mock_cluster: Any, topic: Any) -> None:
    """Consumed confluent-kafka Messages: once the layout is proven on two of them, their
    headers are read where librdkafka keeps them, with the verdicts of message.headers()."""
    from confluent_kafka import Consumer, Message, Producer, TopicPartition

    from meter.signing import _header_get_all_address

    name = topic(mock_cluster)
    producer = Producer({"bootstrap.servers": mock_cluster.bootstrap_servers})
    cases: list[tuple[bytes, Any]] = []
    for n in range(40):
        value = f"value-{n}".encode() * (n % 7 + 1)
        heads: Any = headers(kid=b"k1", value=value, secret=SECRETS[1])
        if n % 5 == 1:
            heads = [*heads, ("meter-kid", b"k1")]  # doubled
        elif n % 5 == 2:
            heads = heads[1:]  # missing
        elif n % 5 == 3:
            heads = [("x-other", b"1"), ("meter-kid", None), *heads[1:]]  # null value
        elif n % 5 == 4:
            heads = None
        cases.append((value, heads))
        producer.produce(name, value, headers=heads)
    assert producer.flush(10) == 0
    consumer = Consumer(
        {"bootstrap.servers": mock_cluster.bootstrap_servers, "group.id": "g", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(name, 0, 0)])
    got: list[Any] = []
    deadline = time.monotonic() + 20
    while len(got) < len(cases) and time.monotonic() < deadline:
        got += [m for m in consumer.consume(100, timeout=0.5) if m.error() is None]
    consumer.close()
    assert len(got) == len(cases)
    t = table(native)
    stamps = [(1, NOW)] * len(got)
    values = [m.value() for m in got]
    # Messages as items before the fast path is on: headers() is called for each.
    slow = t.check(values, list(got), stamps, TOPIC, NOW, True, 10**9, 10**9)
    fresh = []  # consume again: Messages whose headers were never converted
    consumer = Consumer(
        {"bootstrap.servers": mock_cluster.bootstrap_servers, "group.id": "h", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(name, 0, 0)])
    deadline = time.monotonic() + 20
    while len(fresh) < len(cases) and time.monotonic() < deadline:
        fresh += [m for m in consumer.consume(100, timeout=0.5) if m.error() is None]
    consumer.close()
    assert native.enable_message_headers(Message, _header_get_all_address(), fresh[0], fresh[5])
    assert native.message_headers_in_place()
    fast = t.check(values, list(fresh), stamps, TOPIC, NOW, True, 10**9, 10**9)
    as_lists = t.check(values, [m.headers() for m in fresh], stamps, TOPIC, NOW, True, 10**9, 10**9)
    assert fast.codes == slow.codes == as_lists.codes
    assert (fast.args, fast.slots) == (as_lists.args, as_lists.slots)
    assert codes(fast)[:5] == ["ok", "duplicate", "missing", "bad_kid", "no_headers"]
    py = _pyverify.Table([b"k0", b"k1", b"k2"], [0] * 3, [OPEN] * 3, SECRETS, [None] * 3)
    assert py.check(values, list(fresh), stamps, TOPIC, NOW, True, 10**9, 10**9).codes == fast.codes
    # A layout check that fails leaves the path as it was: wrong types are refused.
    assert not native.enable_message_headers(Message, _header_get_all_address(), object(), object())
