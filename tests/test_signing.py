"""Signed events without a broker: the keyring file, the Verify -> ParseAndPrice -> Verified
steps (every forged variant rejected with its detail, nothing else in the chunk lost), the
policies, LogAppendTime vs CreateTime on records whose timestamp type the test sets, the
gateway binding, SIGHUP reloads, the start-up refusal, and secrets that never print."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest

from meter import reasons as R
from meter.config import Config, ConfigError
from meter.keyring import KeyringError, SecretBytes, key_toml, load_keyring, loads_keyring
from meter.pricing import load_catalog
from meter.signing import (
    Ed25519Signer,
    HmacSigner,
    Policy,
    SignedChunk,
    Verified,
    Verifier,
    Verify,
    check_timestamp_types,
    gateway_matches,
    install_reload_signal,
    signature_base,
)
from meter.stages import Chunk, ParseAndPrice, Rows

NOW = 1_764_380_000_000
TOPIC = "usage"
CATALOG = load_catalog()
SECRET_A = "A" * 40 + "-secret-a"
SECRET_B = "B" * 40 + "-secret-b"
ENV = {"METER_KEY_A": SECRET_A, "METER_KEY_B": SECRET_B}
LOG_APPEND, CREATE = 2, 1

KEYRING = """
[[key]]
kid = "gw-a"
secret_ref = "env:METER_KEY_A"
topics = ["usage"]
not_after = "2025-12-31T00:00:00Z"

[[key]]
kid = "gw-b"
alg = "hmac-sha256"
secret_ref = "env:METER_KEY_B"
not_before = 2025-11-01T00:00:00Z

[[key]]
kid = "old"
secret_ref = "env:METER_KEY_A"
not_after = "2025-11-01"

[[key]]
kid = "leaked"
secret_ref = "env:METER_KEY_B"
revoked_at = "2025-11-20T00:00:00Z"

[[key]]
kid = "future"
secret_ref = "env:METER_KEY_A"
not_before = "2026-06-01"
"""


class Sink:
    def __init__(self) -> None:
        self.items: list[Any] = []

    def submit(self, item: Any) -> None:
        self.items.append(item)

    def poll(self) -> None:
        return None

    def join(self) -> None:
        return None

    def close(self) -> None:
        return None


def event(n: int, ts: int = NOW - 60_000, **extra: Any) -> bytes:
    doc = {
        "event_id": f"ev-{n}",
        "ts": ts,
        "user": f"user-{n}",
        "model": "gpt-5",
        "input_tokens": 100 + n,
        "output_tokens": 10,
    }
    doc.update(extra)
    return orjson.dumps(doc)


def keyring(text: str = KEYRING) -> Any:
    return loads_keyring(text, env=ENV)


def steps(
    policy: str = "require", allow_create_time: bool = True, text: str = KEYRING
) -> tuple[Verify, Sink]:
    sink = Sink()
    parse = ParseAndPrice(Verified(sink), CATALOG, 35 * 86_400_000, clock_ms=lambda: NOW)
    verifier = Verifier(keyring(text), Policy(policy, allow_create_time=allow_create_time))
    return Verify(parse, verifier), sink


def run(
    verify: Verify,
    sink: Sink,
    values: list[bytes | None],
    headers: list[Any],
    stamps: list[tuple[int, int]] | None = None,
    topic: str = TOPIC,
) -> Rows:
    n = len(values)
    chunk = Chunk(topic, 0, values, list(range(100, 100 + n)), NOW, headers, stamps or [(CREATE, NOW)] * n)
    verify.submit([chunk])
    rows = sink.items.pop()
    assert rows.chunk is chunk and not isinstance(rows.chunk, SignedChunk)
    # Accounting: every message yields event rows or DLQ rows.
    seen = set(rows.events.column("kafka_offset").to_pylist()) | set(
        rows.dlq.column("kafka_offset").to_pylist()
    )
    assert seen == set(chunk.offsets)
    return rows


def dlq(rows: Rows) -> dict[int, tuple[str, str]]:
    d = rows.dlq.to_pydict()
    return {o - 100: (r, t) for o, r, t in zip(d["kafka_offset"], d["reason"], d["detail"], strict=True)}


def accepted(rows: Rows) -> list[int]:
    return sorted(o - 100 for o in rows.events.column("kafka_offset").to_pylist())


A = HmacSigner("gw-a", SECRET_A.encode(), clock_ms=lambda: NOW - 1000)
B = HmacSigner("gw-b", SECRET_B.encode(), clock_ms=lambda: NOW - 1000)


# ---------------------------------------------------------------- forged variants


def test_forged_variants_rejected_with_details_and_nothing_else_lost() -> None:
    verify, sink = steps()
    good = [event(i) for i in range(3)]
    cases: list[tuple[bytes, Any, str, str]] = []

    def add(value: bytes, headers: Any, reason: str, detail: str) -> None:
        cases.append((value, headers, reason, detail))

    tampered = event(10)
    add(
        tampered.replace(b'"input_tokens":110', b'"input_tokens":999'),
        A.sign(TOPIC, tampered),
        "bad_signature",
        "bad MAC for key 'gw-a'",
    )
    dup_key = event(11)
    add(dup_key[:-1] + b',"input_tokens":5}', A.sign(TOPIC, dup_key), "bad_signature", "bad MAC")
    user = event(12)
    add(user.replace(b"user-12", b"user-99"), A.sign(TOPIC, user), "bad_signature", "bad MAC")
    other = event(13)
    add(other, B.sign("billing", other), "bad_signature", "bad MAC for key 'gw-b'")
    stale = event(14)
    add(stale, A.sign(TOPIC, stale, NOW - 86_400_001), "bad_signature", "stale: signed 86400001 ms")
    future = event(15)
    add(future, A.sign(TOPIC, future, NOW + 300_001), "bad_signature", "signed in the future: 300001 ms")
    unknown = event(16)
    add(
        unknown,
        HmacSigner("nobody", SECRET_A.encode()).sign(TOPIC, unknown, NOW),
        "bad_signature",
        "unknown key 'nobody'",
    )
    expired = event(17)
    add(
        expired,
        HmacSigner("old", SECRET_A.encode()).sign(TOPIC, expired, NOW),
        "bad_signature",
        "expired key 'old'",
    )
    revoked = event(18)
    add(
        revoked,
        HmacSigner("leaked", SECRET_B.encode()).sign(TOPIC, revoked, NOW),
        "bad_signature",
        "revoked key 'leaked'",
    )
    early = event(19)
    add(
        early,
        HmacSigner("future", SECRET_A.encode()).sign(TOPIC, early, NOW),
        "bad_signature",
        "key 'future' not yet valid",
    )
    ed = event(20)
    pytest.importorskip("cryptography")
    ed_headers = Ed25519Signer("gw-a", bytes(32)).sign(TOPIC, ed, NOW)
    add(ed, ed_headers, "bad_signature", "algorithm mismatch: a 64-byte signature for hmac-sha256 key 'gw-a'")
    missing = event(21)
    add(missing, A.sign(TOPIC, missing)[:2], "unsigned", "missing header meter-sig")
    doubled = event(22)
    add(doubled, [*A.sign(TOPIC, doubled), ("meter-ts", b"1")], "bad_signature", "duplicate header meter-ts")
    bare = event(23)
    add(bare, None, "unsigned", "no signature: the message carries none of")
    wrong_topic = event(24)
    add(
        wrong_topic,
        A.sign("billing", wrong_topic),
        "bad_signature",
        "wrong topic: key 'gw-a' may not sign for topic 'billing'",
    )

    values = [good[0], *(c[0] for c in cases[:7]), good[1], *(c[0] for c in cases[7:]), good[2]]
    headers = [A.sign(TOPIC, good[0]), *(c[1] for c in cases[:7]), B.sign(TOPIC, good[1])]
    headers += [*(c[1] for c in cases[7:]), A.sign(TOPIC, good[2])]
    topics_of = [TOPIC] * len(values)
    # The wrong-topic case is the same bytes consumed from another topic: run it in its own chunk.
    wt = values.index(wrong_topic)
    del values[wt], headers[wt], topics_of[wt]
    rows = run(verify, sink, values, headers)
    assert accepted(rows) == [0, 8, len(values) - 1]
    got = dlq(rows)
    expected = [c for c in cases if c[0] is not wrong_topic]
    for value, _, reason, detail in expected:
        index = values.index(value)
        assert got[index][0] == reason, (index, got[index])
        assert got[index][1].startswith(detail), (index, got[index][1])
    # A rejected message is one DLQ row holding the whole message.
    raw = dict(
        zip(rows.dlq.column("kafka_offset").to_pylist(), rows.dlq.column("raw").to_pylist(), strict=True)
    )
    assert raw[100 + values.index(tampered.replace(b'"input_tokens":110', b'"input_tokens":999'))].startswith(
        b'{"event_id":"ev-10"'
    )

    rows = run(
        verify,
        sink,
        [wrong_topic, good[0]],
        [A.sign("billing", wrong_topic), A.sign("billing", good[0])],
        topic="billing",
    )
    assert dlq(rows)[0][1].startswith("wrong topic: key 'gw-a' may not sign for topic 'billing'")


def test_ndjson_message_rejected_whole_with_one_dlq_row() -> None:
    verify, sink = steps()
    value = event(1) + b"\n" + event(2) + b"\n" + b"not json"
    rows = run(verify, sink, [value, event(3)], [A.sign(TOPIC, value + b"x"), A.sign(TOPIC, event(3))])
    assert rows.dlq.num_rows == 1 and rows.dlq.column("raw").to_pylist() == [value]
    assert rows.events.num_rows == 1
    # Signed correctly, its lines are parsed like any message's: two events and one reject.
    rows = run(verify, sink, [value], [A.sign(TOPIC, value)])
    assert rows.events.num_rows == 2 and dlq(rows)[0][0] == R.INVALID_JSON


# ---------------------------------------------------------------- policies and time


def test_policy_verify_lets_unsigned_through_but_not_bad_signatures() -> None:
    verify, sink = steps("verify")
    values = [event(0), event(1), event(2)]
    headers = [None, A.sign(TOPIC, values[1] + b"x"), A.sign(TOPIC, values[2])[:1]]
    rows = run(verify, sink, values, headers)
    assert accepted(rows) == [0, 2]
    assert dlq(rows)[1][0] == R.BAD_SIGNATURE


def test_policy_off_passes_chunks_untouched() -> None:
    sink = Sink()
    verify = Verify(sink, None)
    chunk = Chunk(TOPIC, 0, [b"x"], [1], NOW, [None], [(1, NOW)])
    verify.submit([chunk])
    assert sink.items == [[chunk]]


def test_clean_chunk_is_not_copied() -> None:
    sink = Sink()
    verify = Verify(sink, Verifier(keyring(), Policy("require", allow_create_time=True)))
    chunk = Chunk(TOPIC, 0, [event(1)], [1], NOW, [A.sign(TOPIC, event(1))], [(1, NOW)])
    verify.submit([chunk])
    assert sink.items == [[chunk]]


def test_log_append_time_decides_when_the_record_has_it() -> None:
    """LogAppendTime records are checked at their broker time, so re-reading them later
    (arrival clock far ahead) gives the same verdict; a backdated signature cannot pass."""
    verify, sink = steps(allow_create_time=False)
    value = event(1)
    signed_at = NOW - 10_000
    headers = [A.sign(TOPIC, value, signed_at)]
    rows = run(verify, sink, [value], headers, [(LOG_APPEND, signed_at + 500)])
    assert accepted(rows) == [0]
    verify.submit(
        [Chunk(TOPIC, 0, [value], [100], NOW + 40 * 86_400_000, headers, [(LOG_APPEND, signed_at + 500)])]
    )
    assert sink.items.pop().events.num_rows == 1  # re-read 40 days later: still accepted
    # The key expired (not_after 2025-12-31) by the broker time: rejected, whatever the arrival clock.
    late = 1_767_139_200_000 + 1000
    rows = run(verify, sink, [value], [A.sign(TOPIC, value, late - 100)], [(LOG_APPEND, late)])
    assert dlq(rows)[0][1].startswith("expired key 'gw-a': not_after 2025-12-31T00:00:00Z")
    # Broker time more than a day after signing: a producer cannot backdate.
    rows = run(
        verify, sink, [value], [A.sign(TOPIC, value, signed_at - 86_400_001)], [(LOG_APPEND, signed_at)]
    )
    assert dlq(rows)[0][1].startswith("stale")
    # CreateTime records carry no broker time: without allow_create_time they cannot verify.
    rows = run(verify, sink, [value], headers, [(CREATE, signed_at)])
    assert dlq(rows)[0] == (
        R.BAD_SIGNATURE,
        "no broker time: the record carries CreateTime, not LogAppendTime, and allow_create_time is off",
    )


def test_create_time_checks_the_arrival_clock_when_allowed() -> None:
    verify, sink = steps(allow_create_time=True)
    value = event(1)
    headers = [A.sign(TOPIC, value, NOW - 1000)]
    # The producer's CreateTime is ignored: only the arrival clock counts.
    rows = run(verify, sink, [value], headers, [(CREATE, NOW - 10 * 86_400_000)])
    assert accepted(rows) == [0]


# ---------------------------------------------------------------- gateways


GATEWAY_RING = """
[[key]]
kid = "gw-eu"
secret_ref = "env:METER_KEY_A"
gateway = "gw-eu"

[[key]]
kid = "any"
secret_ref = "env:METER_KEY_B"
"""


def test_gateway_bound_key_only_vouches_for_its_gateway() -> None:
    verify, sink = steps(text=GATEWAY_RING)
    eu = HmacSigner("gw-eu", SECRET_A.encode(), clock_ms=lambda: NOW)
    anyone = HmacSigner("any", SECRET_B.encode(), clock_ms=lambda: NOW)
    two = event(1, client="gw-eu/2.3") + b"\n" + event(2, client="gw-us")
    values = [event(0, client="gw-eu"), two, event(3), event(4, client="gw-us"), event(5)]
    headers = [eu.sign(TOPIC, values[0]), eu.sign(TOPIC, two), eu.sign(TOPIC, values[2])]
    headers += [anyone.sign(TOPIC, values[3]), None]
    rows = run(verify, sink, values, headers)
    assert sorted(rows.events.column("event_id").to_pylist()) == ["ev-0", "ev-1", "ev-4"]
    d = rows.dlq.to_pydict()
    by_line = {
        (o - 100, line): (r, t)
        for o, line, r, t in zip(d["kafka_offset"], d["line"], d["reason"], d["detail"], strict=True)
    }
    assert by_line[(1, 1)] == (
        R.BAD_SIGNATURE,
        "gateway mismatch: the signing key is bound to gateway 'gw-eu'; the event's client is 'gw-us'",
    )
    assert by_line[(2, 0)][1].endswith("the event's client is None")
    assert by_line[(4, 0)][0] == R.UNSIGNED
    assert gateway_matches("gw-eu/1", "gw-eu") and not gateway_matches("gw-eu2", "gw-eu")


# ---------------------------------------------------------------- Ed25519


def test_ed25519_keys_verify_and_reject() -> None:
    pytest.importorskip("cryptography")
    seed = bytes(range(32))
    signer = Ed25519Signer("gw-ed", seed, clock_ms=lambda: NOW)
    import base64

    public = base64.b64encode(signer.public_key()).decode()
    ring = f'[[key]]\nkid = "gw-ed"\nalg = "ed25519"\npublic_key = "{public}"\n'
    verify, sink = steps(text=ring)
    values = [event(1), event(2), event(3)]
    headers = [
        signer.sign(TOPIC, values[0]),
        signer.sign(TOPIC, values[1] + b" "),
        signer.sign(TOPIC, values[2]),
    ]
    hmac_forged = HmacSigner("gw-ed", b"x" * 32, clock_ms=lambda: NOW).sign(TOPIC, values[2])
    rows = run(verify, sink, [*values, values[2]], [*headers, hmac_forged])
    assert accepted(rows) == [0, 2]
    assert dlq(rows)[1][1] == "bad signature for ed25519 key 'gw-ed'"
    assert dlq(rows)[3][1] == "algorithm mismatch: a 32-byte signature for ed25519 key 'gw-ed'"


# ---------------------------------------------------------------- keyring file


def test_keyring_parses_and_reports_status() -> None:
    ring = keyring()
    assert [k.kid for k in ring.keys] == ["gw-a", "gw-b", "old", "leaked", "future"]
    assert ring.get("gw-a").topics == frozenset({"usage"})
    assert ring.get("gw-b").not_before_ms == 1_761_955_200_000
    assert [k.status(NOW) for k in ring.keys] == ["active", "active", "expired", "revoked", "not yet valid"]
    assert 'kid = "gw-a"' in key_toml(ring.get("gw-a")) and SECRET_A not in key_toml(ring.get("gw-a"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[key]]\nkid = "a b"\nsecret_ref = "env:X"', "kid must be"),
        ('[[key]]\nkid = "a"\nsecret = "inline"', "unknown field 'secret'"),
        ('[[key]]\nkid = "a"', "secret_ref (env:NAME or file:PATH) is required"),
        ('[[key]]\nkid = "a"\nsecret_ref = "env:NOPE"', "env:NOPE: the variable is not set"),
        ('[[key]]\nkid = "a"\nsecret_ref = "env:SHORT"', "is 10 bytes; at least 32 are required"),
        ('[[key]]\nkid = "a"\nsecret_ref = "vault:x"', "must start with env: or file:"),
        ('[[key]]\nkid = "a"\nalg = "rsa"\nsecret_ref = "env:METER_KEY_A"', "alg must be one of"),
        (
            '[[key]]\nkid = "a"\nsecret_ref = "env:METER_KEY_A"\n'
            'not_before = "2026-01-02"\nnot_after = "2026-01-01"',
            "not_after is not after",
        ),
        (
            '[[key]]\nkid = "a"\nsecret_ref = "env:METER_KEY_A"\nnot_after = "soon"',
            "not_after must be a date",
        ),
        (
            '[[key]]\nkid = "a"\nsecret_ref = "env:METER_KEY_A"\n' * 2,
            "occurs twice",
        ),
        ('[[key]]\nkid = "a"\nalg = "ed25519"\npublic_key = "AAAA"', "decodes to 3 bytes"),
        (
            '[[key]]\nkid = "a"\nsecret_ref = "env:METER_KEY_A"\ntopics = []',
            "topics must be a non-empty list",
        ),
        ("keys = 1", "unknown top-level entry"),
    ],
)
def test_keyring_errors_name_the_problem_never_the_secret(text: str, message: str) -> None:
    with pytest.raises(KeyringError) as info:
        loads_keyring(text, env={**ENV, "SHORT": "0123456789"})
    assert message in str(info.value)
    assert SECRET_A not in str(info.value) and "0123456789" not in str(info.value)


def test_secret_files_relative_to_the_keyring_and_permissions(tmp_path: Path) -> None:
    secret = tmp_path / "gw.secret"
    secret.write_text(SECRET_A + "\n")
    os.chmod(secret, 0o644)
    path = tmp_path / "keyring.toml"
    path.write_text('[[key]]\nkid = "gw"\nsecret_ref = "file:gw.secret"\n')
    ring = load_keyring(path, env={})
    assert ring.keys[0].secret == SECRET_A.encode()
    assert "readable by group or others" in ring.warnings[0]
    os.chmod(secret, 0o600)
    assert load_keyring(path, env={}).warnings == ()


def test_secrets_never_print() -> None:
    ring = keyring()
    key = ring.get("gw-a")
    assert isinstance(key.secret, SecretBytes)
    for text in (repr(ring), str(ring), repr(key), f"{key.secret}", str(key.secret), repr(A)):
        assert SECRET_A not in text and SECRET_B not in text


# ---------------------------------------------------------------- reload


def test_reload_swaps_the_keyring_and_keeps_it_when_the_new_one_is_bad(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keyring.toml"
    path.write_text('[[key]]\nkid = "gw-a"\nsecret_ref = "env:METER_KEY_A"\n')
    sink = Sink()
    parse = ParseAndPrice(Verified(sink), CATALOG, 35 * 86_400_000, clock_ms=lambda: NOW)
    verify = Verify(parse, Verifier(load_keyring(path, env=ENV), Policy("require", True)), str(path), env=ENV)
    values = [event(1)]
    rows = run(verify, sink, values, [B.sign(TOPIC, values[0])])
    assert dlq(rows)[0][1] == "unknown key 'gw-b'"
    # Rotation: add gw-b beside gw-a, reload on the next poll.
    path.write_text(path.read_text() + '[[key]]\nkid = "gw-b"\nsecret_ref = "env:METER_KEY_B"\n')
    verify.request_reload()
    verify.poll()
    assert accepted(run(verify, sink, values, [B.sign(TOPIC, values[0])])) == [0]
    assert accepted(run(verify, sink, values, [A.sign(TOPIC, values[0])])) == [0]
    # A broken file leaves the keyring in force.
    path.write_text('[[key]]\nkid = "gw-b"\nsecret_ref = "env:MISSING"\n')
    with caplog.at_level(logging.INFO, logger="meter.signing"):
        assert verify.reload() is False
    assert accepted(run(verify, sink, values, [B.sign(TOPIC, values[0])])) == [0]
    assert verify.reloads == {"ok": 1, "failed": 1}
    logged = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "keyring reload failed" in logged and SECRET_A not in logged and SECRET_B not in logged


def test_sighup_requests_a_reload(tmp_path: Path) -> None:
    path = tmp_path / "keyring.toml"
    path.write_text('[[key]]\nkid = "gw-a"\nsecret_ref = "env:METER_KEY_A"\n')
    verify = Verify(
        Sink(), Verifier(load_keyring(path, env=ENV), Policy("require", True)), str(path), env=ENV
    )
    previous = signal.getsignal(signal.SIGHUP)
    try:
        install_reload_signal(verify)
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 5
        while not verify._reload.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        verify.poll()
        assert verify.reloads["ok"] == 1
    finally:
        signal.signal(signal.SIGHUP, previous)


# ---------------------------------------------------------------- start-up and config


def config(**overrides: Any) -> Config:
    base: dict[str, Any] = {"brokers": "127.0.0.1:9092", "topic": ("usage",), "lake": "/tmp/lake"}
    base.update(overrides)
    return Config(**base)


def test_config_requires_a_keyring_when_signatures_are_on() -> None:
    with pytest.raises(ConfigError, match="keyring: required when signatures is require"):
        config(signatures="require")
    with pytest.raises(ConfigError, match="signatures: expected one of off, verify, require"):
        config(signatures="maybe", keyring="k.toml")
    assert (
        config(signatures="verify", keyring="k.toml", signature_max_delay_s="60").signature_max_delay_s == 60
    )


def test_start_refuses_create_time_topics_unless_allowed(caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(signatures="require", keyring="k.toml", topic=("usage", "billing"))
    with pytest.raises(
        ConfigError, match=r"billing \(not reported\), usage \(CreateTime\) do not use LogAppendTime"
    ):
        check_timestamp_types(cfg, {"usage": "CreateTime", "billing": None})
    with caplog.at_level(logging.INFO, logger="meter.signing"):
        check_timestamp_types(cfg, {"usage": "LogAppendTime", "billing": "LogAppendTime"})
    reported = {r.__dict__.get("topic"): r.__dict__.get("timestamp_type") for r in caplog.records}
    assert reported == {"usage": "LogAppendTime", "billing": "LogAppendTime"}
    check_timestamp_types(config(signatures="require", keyring="k", allow_create_time=True), {"usage": None})


def test_from_config_builds_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keyring.toml"
    path.write_text('[[key]]\nkid = "gw-a"\nsecret_ref = "env:METER_KEY_A"\n')
    monkeypatch.setenv("METER_KEY_A", SECRET_A)
    cfg = config(signatures="require", keyring=str(path), allow_create_time=True)
    verify = Verify.from_config(cfg, Sink(), describe=lambda c: {"usage": "CreateTime"})
    assert verify.verifier is not None and verify.verifier.policy.mode == "require"
    with pytest.raises(ConfigError):
        Verify.from_config(
            config(signatures="require", keyring=str(path)), Sink(), describe=lambda c: {"usage": None}
        )
    assert Verify.from_config(config(), Sink()).verifier is None


def test_signature_base_is_the_documented_bytes() -> None:
    assert signature_base("gw", 1700000000000, "usage", b'{"a":1}\n') == (
        b'meter-sig-v1\ngw\n1700000000000\nusage\n{"a":1}\n'
    )


def test_dlq_reasons_are_counted_once_per_message() -> None:
    verify, sink = steps()
    values = [event(i) for i in range(50)]
    headers = [A.sign(TOPIC, v) if i % 3 else None for i, v in enumerate(values)]
    rows = run(verify, sink, values, headers)
    assert Counter(rows.dlq.column("reason").to_pylist()) == {R.UNSIGNED: 17}
    assert rows.events.num_rows == 33
    assert isinstance(rows.dlq.column("raw"), pa.ChunkedArray)
