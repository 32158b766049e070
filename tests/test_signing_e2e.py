"""Signed events end to end: `meter run --signatures require` as a real process against a
real broker (Tansu). Signed traffic from meter.producer lands exactly; every forged variant
lands in the DLQ with its detail while the good messages around it are all counted; a
replayed signed message is counted once (event-id dedup); a key rotation with overlapping
keys, finished by a SIGHUP keyring reload, loses nothing.

Neither broker here applies LogAppendTime (DESIGN 8), so the daemon runs with
--allow-create-time; the LogAppendTime logic is tested in tests/test_signing.py.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from meter.manifest import listed_files, totals
from meter.signing import Ed25519Signer, HmacSigner

pytestmark = pytest.mark.integration

SESSION_TIMEOUT_MS = 6000
PARTITIONS = 2
SECRET_OLD = "old-" + "o" * 40
SECRET_NEW = "new-" + "n" * 40
SECRET_MISC = "misc-" + "m" * 40


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Daemon:
    def __init__(self, brokers: str, topic: str, lake: Path, keyring: Path, log: Path, env: dict[str, str]):
        from meter.brokers import free_port

        self.log = log
        cmd = [
            sys.executable, "-m", "meter", "run",
            "--brokers", brokers, "--topic", topic, "--lake", str(lake),
            "--group", f"meter-{topic}", "--batch-max-age-s", "0.3",
            "--session-timeout-ms", str(SESSION_TIMEOUT_MS),
            "--metrics-addr", f"127.0.0.1:{free_port()}", "--log-format", "json",
            "--signatures", "require", "--keyring", str(keyring), "--allow-create-time",
        ]  # fmt: skip
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = 40.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.text().count(needle) < count:
            assert self.proc.poll() is None, (
                f"meter run exited {self.proc.returncode}:\n{self.text()[-4000:]}"
            )
            assert time.monotonic() < deadline, f"no {needle!r} in the log within {timeout}s"
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.fixture
def setup(tansu: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    topic = f"signed-{uuid.uuid4().hex[:10]}"
    tansu.create_topic(topic, PARTITIONS)
    tansu.create_topic(f"{topic}-billing", 1)
    state: dict[str, Any] = {"topic": topic, "lake": tmp_path / "lake", "daemons": []}
    try:
        yield state
    finally:
        for daemon in state["daemons"]:
            if daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.proc.wait()
            print(f"===== {daemon.log.name} =====\n{daemon.text()[-6000:]}")


def wait_landed(lake: Path, messages: int, daemon: Daemon, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    got = None
    while True:
        if lake.is_dir():
            got = totals(lake)
            if got.messages >= messages:
                return
        assert daemon.proc.poll() is None, f"meter run exited {daemon.proc.returncode}"
        assert time.monotonic() < deadline, (
            f"the manifest covers {got and got.messages} of {messages} messages"
        )
        time.sleep(0.2)


def event(n: int, user: str | None = None, **extra: Any) -> dict[str, Any]:
    doc = {
        "event_id": f"ev-{n}",
        "ts": _now_ms() - 1000,
        "user": user or f"user-{n % 7}",
        "model": "claude-sonnet-4-5",
        "input_tokens": 1000 + n,
        "output_tokens": 100 + n,
        "cache_read_tokens": n % 5,
    }
    doc.update(extra)
    return doc


def test_signed_traffic_forgeries_replay_and_rotation(
    tansu: Any, setup: dict[str, Any], tmp_path: Path
) -> None:
    from confluent_kafka import Producer

    from meter.producer import UsageProducer

    pytest.importorskip("cryptography")
    topic, lake = setup["topic"], setup["lake"]
    brokers = tansu.bootstrap_servers
    ed = Ed25519Signer("gw-ed", bytes(range(32)))
    now = _now_ms()
    day = 86_400_000
    ring = tmp_path / "keyring.toml"
    base = f"""
[[key]]
kid = "gw-old"
secret_ref = "env:E2E_OLD"
topics = ["{topic}"]

[[key]]
kid = "gw-ed"
alg = "ed25519"
public_key = "{base64.b64encode(ed.public_key()).decode()}"

[[key]]
kid = "gw-billing"
secret_ref = "env:E2E_MISC"
topics = ["{topic}-billing"]

[[key]]
kid = "gw-expired"
secret_ref = "env:E2E_MISC"
not_after = "{_rfc(now - day)}"

[[key]]
kid = "gw-revoked"
secret_ref = "env:E2E_MISC"
revoked_at = "{_rfc(now - 3_600_000)}"
"""
    ring.write_text(base)
    env = {"E2E_OLD": SECRET_OLD, "E2E_NEW": SECRET_NEW, "E2E_MISC": SECRET_MISC}
    daemon = Daemon(brokers, topic, lake, ring, tmp_path / "meter-run.log", env)
    setup["daemons"].append(daemon)

    old = HmacSigner("gw-old", SECRET_OLD.encode())
    new = HmacSigner("gw-new", SECRET_NEW.encode())
    misc = {
        k: HmacSigner(k, SECRET_MISC.encode())
        for k in ("gw-billing", "gw-expired", "gw-revoked", "gw-nobody")
    }
    lib = UsageProducer(brokers, topic, old, client="gw-eu/1.0")
    raw = Producer({"bootstrap.servers": brokers, "enable.idempotence": True, "acks": "all"})
    good: list[dict[str, Any]] = []

    def send_good(n: int, producer: UsageProducer | None = None) -> None:
        doc = event(n)
        (producer or lib).send(doc)
        good.append(doc)

    def send_raw(value: bytes, headers: Any, key: str = "forger") -> None:
        raw.produce(topic, value, key=key, headers=headers)

    # Phase 1: gw-old only, the forgeries between good messages; a replayed message.
    forged: dict[str, tuple[str, str]] = {}

    def forge(name: str, value: bytes, headers: Any, reason: str, detail: str) -> None:
        forged[name] = (reason, detail)
        send_raw(value, headers)

    n = 0
    for name in ("tokens", "dupkey", "user", "topic", "wrong_topic", "stale", "future", "unknown", "expired",
                 "revoked", "ed_for_hmac", "missing", "doubled", "bare", "ed_bad"):  # fmt: skip
        for _ in range(3):
            send_good(n)
            n += 1
        doc = orjson.dumps(event(1000 + len(forged), forged=name))
        ts = _now_ms()
        if name == "tokens":
            forge(name, doc.replace(b'"input_tokens":', b'"input_tokens":9'), old.sign(topic, doc),
                  "bad_signature", "bad MAC for key 'gw-old'")  # fmt: skip
        elif name == "dupkey":
            forge(name, doc[:-1] + b',"output_tokens":1}', old.sign(topic, doc), "bad_signature", "bad MAC")
        elif name == "user":
            forge(
                name,
                doc.replace(b'"user":"user-', b'"user":"boss-'),
                old.sign(topic, doc),
                "bad_signature",
                "bad MAC",
            )
        elif name == "topic":
            forge(name, doc, old.sign(f"{topic}-other", doc), "bad_signature", "bad MAC")
        elif name == "wrong_topic":
            forge(name, doc, misc["gw-billing"].sign(topic, doc), "bad_signature",
                  f"wrong topic: key 'gw-billing' may not sign for topic '{topic}'")  # fmt: skip
        elif name == "stale":
            forge(name, doc, old.sign(topic, doc, ts - 86_400_000 - 60_000), "bad_signature", "stale: signed")
        elif name == "future":
            forge(name, doc, old.sign(topic, doc, ts + 600_000), "bad_signature", "signed in the future")
        elif name == "unknown":
            forge(name, doc, misc["gw-nobody"].sign(topic, doc), "bad_signature", "unknown key 'gw-nobody'")
        elif name == "expired":
            forge(name, doc, misc["gw-expired"].sign(topic, doc), "bad_signature", "expired key 'gw-expired'")
        elif name == "revoked":
            forge(name, doc, misc["gw-revoked"].sign(topic, doc), "bad_signature", "revoked key 'gw-revoked'")
        elif name == "ed_for_hmac":
            headers = Ed25519Signer("gw-old", bytes(32)).sign(topic, doc)
            forge(
                name, doc, headers, "bad_signature", "algorithm mismatch: a 64-byte signature for hmac-sha256"
            )
        elif name == "missing":
            forge(name, doc, old.sign(topic, doc)[1:], "unsigned", "missing header meter-kid")
        elif name == "doubled":
            forge(
                name,
                doc,
                [*old.sign(topic, doc), ("meter-sig", b"x" * 32)],
                "bad_signature",
                "duplicate header meter-sig",
            )
        elif name == "bare":
            forge(name, doc, None, "unsigned", "no signature")
        elif name == "ed_bad":
            forge(
                name,
                doc,
                ed.sign(topic, doc + b" "),
                "bad_signature",
                "bad signature for ed25519 key 'gw-ed'",
            )
    # Good Ed25519 traffic from a low-volume gateway.
    ed_lib = UsageProducer(brokers, topic, ed)
    for _ in range(5):
        send_good(n, ed_lib)
        n += 1
    # A replay: a signed message sent again byte for byte, headers included.
    replay = orjson.dumps(event(n))
    replay_headers = old.sign(topic, replay)
    lib._producer.produce(topic, replay, key=b"user-r", headers=replay_headers)
    lib._producer.produce(topic, replay, key=b"user-r", headers=replay_headers)
    good.append(orjson.loads(replay))
    n += 1
    assert lib.flush(30) == 0 and ed_lib.flush(30) == 0 and raw.flush(30) == 0
    phase1 = len(good) + len(forged) + 1  # + the replay's second copy
    daemon.wait_for('"msg":"partitions assigned"')
    wait_landed(lake, phase1, daemon)

    # Phase 2: rotation. gw-new joins the keyring (SIGHUP), both keys sign while they
    # overlap, then gw-old retires (SIGHUP again). Nothing is lost on the way.
    ring.write_text(base + '\n[[key]]\nkid = "gw-new"\nsecret_ref = "env:E2E_NEW"\n')
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for('"msg":"keyring reloaded"')
    lib_new = UsageProducer(brokers, topic, new, client="gw-eu/1.1")
    for i in range(60):
        send_good(n, lib if i % 2 else lib_new)
        n += 1
    assert lib.flush(30) == 0 and lib_new.flush(30) == 0
    wait_landed(lake, phase1 + 60, daemon)
    retired = base.replace(f'kid = "gw-old"\nsecret_ref = "env:E2E_OLD"\ntopics = ["{topic}"]',
                           f'kid = "gw-old"\nsecret_ref = "env:E2E_OLD"\n'
                           f'not_after = "{_rfc(_now_ms())}"')  # fmt: skip
    ring.write_text(retired + '\n[[key]]\nkid = "gw-new"\nsecret_ref = "env:E2E_NEW"\n')
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for('"msg":"keyring reloaded"', count=2)
    for _ in range(20):
        send_good(n, lib_new)
        n += 1
    late = orjson.dumps(event(5000))
    send_raw(late, old.sign(topic, late))  # the retired key no longer vouches
    assert lib_new.flush(30) == 0 and raw.flush(30) == 0
    total = phase1 + 60 + 21
    wait_landed(lake, total, daemon)
    assert daemon.stop() == 0

    t = totals(lake)
    assert t.messages == total
    events = pa.concat_tables(pq.read_table(lake / f) for f in listed_files(lake, "events"))
    dlq = pa.concat_tables(pq.read_table(lake / f) for f in listed_files(lake, "dlq"))
    # Every good event once (the replay included), nothing forged.
    assert sorted(events.column("event_id").to_pylist()) == sorted(d["event_id"] for d in good)
    assert pc.sum(events.column("input_tokens")).as_py() == sum(d["input_tokens"] for d in good)
    assert t.accepted == len(good)
    reasons = Counter(dlq.column("reason").to_pylist())
    assert reasons == {"bad_signature": 14, "unsigned": 2, "duplicate_event": 1}, reasons
    by_event = {}
    for value, reason, detail in zip(
        dlq.column("raw").to_pylist(),
        dlq.column("reason").to_pylist(),
        dlq.column("detail").to_pylist(),
        strict=True,
    ):
        doc = orjson.loads(value)
        by_event[doc.get("forged") or doc["event_id"]] = (reason, detail)
    for name, (reason, detail) in forged.items():
        assert by_event[name][0] == reason, (name, by_event[name])
        assert by_event[name][1].startswith(detail), (name, by_event[name])
    assert by_event["ev-5000"][1].startswith("expired key 'gw-old'")
    assert by_event[orjson.loads(replay)["event_id"]][0] == "duplicate_event"
    log = daemon.text()
    for secret in (SECRET_OLD, SECRET_NEW, SECRET_MISC):
        assert secret not in log


def _rfc(ms: int) -> str:
    from meter.keyring import format_ms

    return format_ms(ms)


def test_refuses_to_start_on_create_time_without_the_opt_in(tansu: Any, tmp_path: Path) -> None:
    topic = f"signed-refuse-{uuid.uuid4().hex[:10]}"
    tansu.create_topic(topic, 1)
    ring = tmp_path / "keyring.toml"
    ring.write_text('[[key]]\nkid = "k"\nsecret_ref = "env:E2E_OLD"\n')
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "meter",
            "run",
            "--brokers",
            tansu.bootstrap_servers,
            "--topic",
            topic,
            "--lake",
            str(tmp_path / "lake"),
            "--signatures",
            "require",
            "--keyring",
            str(ring),
            "--metrics-addr",
            "",
            "--log-format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "E2E_OLD": SECRET_OLD},
    )
    assert done.returncode == 2, done.stderr
    assert "do not use LogAppendTime" in done.stderr and "allow_create_time" in done.stderr
    assert f'"topic":"{topic}"' in done.stderr and '"timestamp_type":"unknown"' in done.stderr
    assert SECRET_OLD not in done.stderr + done.stdout
