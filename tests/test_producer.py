"""meter.producer, `meter keys` / `meter sign`, and the two gateway examples (LiteLLM
callback, HTTP signing relay), with a fake Kafka producer: what they send verifies with
the daemon's own Verifier and parses into the expected buckets."""

from __future__ import annotations

import base64
import importlib.util
import json
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest

from meter.cli import main
from meter.keyring import load_keyring, loads_keyring
from meter.parser import parse_batch
from meter.producer import PRODUCER_DEFAULTS, UsageProducer, build_event, event_id_for
from meter.signing import HmacSigner, Policy, Verifier
from meter.stages import Chunk

ROOT = Path(__file__).resolve().parent.parent
SECRET = "gateway-secret-" + "s" * 32
TOPIC = "usage"


class FakeKafka:
    """Records produce() calls; raises BufferError `full` times first."""

    def __init__(self, settings: dict[str, Any], full: int = 0) -> None:
        self.settings = settings
        self.sent: list[dict[str, Any]] = []
        self.full = full

    def produce(
        self, topic: str, value: bytes, key: Any = None, headers: Any = None, on_delivery: Any = None
    ) -> None:
        if self.full:
            self.full -= 1
            raise BufferError("queue full")
        self.sent.append({"topic": topic, "value": value, "key": key, "headers": headers})
        if on_delivery is not None:
            on_delivery(None, None)

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        return 0


def producer(client: str | None = "gw/1", full: int = 0) -> tuple[UsageProducer, FakeKafka]:
    holder: dict[str, FakeKafka] = {}

    def factory(settings: dict[str, Any]) -> FakeKafka:
        holder["k"] = FakeKafka(settings, full)
        return holder["k"]

    p = UsageProducer(
        "127.0.0.1:9", TOPIC, HmacSigner("gw", SECRET.encode()), client=client, producer_factory=factory
    )
    return p, holder["k"]


def verify(sent: list[dict[str, Any]]) -> list[Any]:
    ring = loads_keyring('[[key]]\nkid = "gw"\nsecret_ref = "env:S"\n', env={"S": SECRET})
    verifier = Verifier(ring, Policy("require", allow_create_time=True))
    n = len(sent)
    now = time.time_ns() // 1_000_000
    chunk = Chunk(
        TOPIC,
        0,
        [s["value"] for s in sent],
        list(range(n)),
        now,
        [s["headers"] for s in sent],
        [(1, now)] * n,
    )
    rejects, _ = verifier.check(chunk)
    return rejects


ANTHROPIC_RESPONSE = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "model": "claude-sonnet-4-5-20250929",
    "usage": {
        "input_tokens": 12,
        "cache_read_input_tokens": 2000,
        "cache_creation_input_tokens": 0,
        "output_tokens": 50,
    },
}


def test_producer_settings_are_idempotent_and_overridable() -> None:
    _, kafka = producer()
    assert kafka.settings["enable.idempotence"] is True and kafka.settings["acks"] == "all"
    assert kafka.settings["bootstrap.servers"] == "127.0.0.1:9"
    assert PRODUCER_DEFAULTS["enable.idempotence"] is True


def test_send_response_builds_signs_and_keys_by_user() -> None:
    p, kafka = producer()
    event = p.send_response("anthropic.messages", ANTHROPIC_RESPONSE, user="u-42", team="search")
    assert event["event_id"] == "msg_01XFDUDYJgAACzvnptvVoYEL" and event["request_id"] == event["event_id"]
    assert (event["provider"], event["client"], event["team"]) == ("anthropic", "gw/1", "search")
    [sent] = kafka.sent
    assert sent["key"] == "u-42" and sent["topic"] == TOPIC
    assert [h[0] for h in sent["headers"]] == ["meter-kid", "meter-ts", "meter-sig"]
    assert verify(kafka.sent) == []
    result = parse_batch([sent["value"]])
    assert not result.rejects
    row = result.batch.to_pylist()[0]
    assert (row["input_tokens"], row["cache_read_tokens"], row["output_tokens"]) == (12, 2000, 50)
    assert p.close() == 0 and p.report.delivered == 1


def test_a_retry_is_the_same_message_in_the_same_partition() -> None:
    """An application retry resends the same event: same id, same key (so the same
    partition), so the daemon's dedup counts it once."""
    p, kafka = producer()
    first = p.send_response("openai.chat", {"id": "chatcmpl-1", "model": "gpt-5", "usage": {
        "prompt_tokens": 10, "completion_tokens": 2}}, user="u", ts_ms=1)  # fmt: skip
    again = p.send_response("openai.chat", {"id": "chatcmpl-1", "model": "gpt-5", "usage": {
        "prompt_tokens": 10, "completion_tokens": 2}}, user="u", ts_ms=1)  # fmt: skip
    assert first == again and kafka.sent[0]["value"] == kafka.sent[1]["value"]
    assert kafka.sent[0]["key"] == kafka.sent[1]["key"]


def test_full_queue_is_retried() -> None:
    p, kafka = producer(full=3)
    p.send({"event_id": "e", "user": "u"})
    assert len(kafka.sent) == 1


def test_event_ids_and_events() -> None:
    assert event_id_for("msg_01") == "msg_01"
    assert event_id_for("msg_01", 2) == "msg_01:2"
    long = event_id_for("x" * 100)
    assert long.startswith("h:") and len(long) == 64 and long == event_id_for("x" * 100)
    assert event_id_for("id with spaces").startswith("h:")
    with pytest.raises(TypeError):
        build_event({"input_tokens": 1}, event_id="e", user="u", model="m")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"bedrock\.converse: the response names no model"):
        producer()[0].send_response(
            "bedrock.converse", {"usage": {"inputTokens": 1, "outputTokens": 1}}, user="u"
        )


# ---------------------------------------------------------------- CLI


def test_keys_new_list_check_and_sign(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret_file = tmp_path / "gw-1.secret"
    assert (
        main(["keys", "new", "gw-1", "--secret-file", str(secret_file), "--topic", TOPIC, "--gateway", "gw"])
        == 0
    )
    table = capsys.readouterr().out
    assert secret_file.stat().st_mode & 0o777 == 0o600
    secret = secret_file.read_text().strip()
    assert secret not in table and 'kid = "gw-1"' in table and 'gateway = "gw"' in table
    ring = tmp_path / "keyring.toml"
    ring.write_text(table)
    assert main(["keys", "new", "gw-1", "--secret-file", str(secret_file)]) == 2  # never overwrites a secret
    assert "File exists" in capsys.readouterr().err

    assert main(["keys", "list", "--keyring", str(ring), "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["kid"], row["status"], row["topics"]) == ("gw-1", "active", TOPIC)
    assert main(["keys", "check", "--keyring", str(ring)]) == 0
    out = capsys.readouterr()
    assert "gw-1" in out.out and secret not in out.out + out.err
    fingerprint = load_keyring(ring).keys[0].fingerprint()
    assert fingerprint in out.out

    messages = tmp_path / "events.ndjson"
    messages.write_text('{"event_id":"a","user":"u"}\n\n{"event_id":"b","user":"v"}\n')
    assert (
        main(
            [
                "sign",
                str(messages),
                "--keyring",
                str(ring),
                "--kid",
                "gw-1",
                "--topic",
                TOPIC,
                "--ts",
                "1700000000000",
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["headers"]["meter-ts"] for d in lines] == ["1700000000000"] * 2
    signer = HmacSigner("gw-1", secret.encode())
    expected = signer.sign(TOPIC, b'{"event_id":"a","user":"u"}', 1700000000000)[2][1]
    assert base64.b64decode(lines[0]["headers"]["meter-sig"]) == expected

    broken = tmp_path / "broken.toml"
    broken.write_text('[[key]]\nkid = "x"\nsecret_ref = "env:METER_TEST_UNSET_VARIABLE"\n')
    assert main(["keys", "check", "--keyring", str(broken)]) == 1
    assert "the variable is not set" in capsys.readouterr().err


def test_keys_new_ed25519(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("cryptography")
    key_file = tmp_path / "gw-ed.key"
    assert main(["keys", "new", "gw-ed", "--alg", "ed25519", "--secret-file", str(key_file)]) == 0
    ring = tmp_path / "keyring.toml"
    ring.write_text(capsys.readouterr().out)
    assert load_keyring(ring).keys[0].alg == "ed25519"
    messages = tmp_path / "m.ndjson"
    messages.write_text("hello\n")
    assert (
        main(["sign", str(messages), "--ed25519-key", str(key_file), "--kid", "gw-ed", "--topic", TOPIC]) == 0
    )
    [doc] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(base64.b64decode(doc["headers"]["meter-sig"])) == 64


# ---------------------------------------------------------------- examples


def _load(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_litellm_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example runs against LiteLLM's CustomLogger interface (a stand-in here: LiteLLM is
    not a dependency), maps LiteLLM's normalised usage once, and signs what it sends."""
    fake = types.ModuleType("litellm.integrations.custom_logger")

    class CustomLogger:
        def __init__(self) -> None:
            pass

    fake.CustomLogger = CustomLogger  # type: ignore[attr-defined]
    for name in ("litellm", "litellm.integrations"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "litellm.integrations.custom_logger", fake)
    module = _load("litellm_callback")
    p, kafka = producer(client="litellm-proxy")
    callback = module.MeterCallback(p)
    response = {
        "id": "chatcmpl-7d9c3d70",
        "model": "anthropic/claude-opus-4-5-20251101",
        "usage": {"prompt_tokens": 98805, "completion_tokens": 5120, "total_tokens": 103925,
                  "prompt_tokens_details": {"cached_tokens": 66360, "cache_creation_tokens": 32435},
                  "completion_tokens_details": {"reasoning_tokens": 1710}},
    }  # fmt: skip
    kwargs = {
        "standard_logging_object": {
            "metadata": {"user_api_key_user_id": "u-7", "user_api_key_team_id": "t-1"}
        }
    }
    import asyncio

    asyncio.run(callback.async_log_success_event(kwargs, response, None, None))
    callback.log_success_event({}, {"id": "x", "model": "m"}, None, None)  # no usage: skipped, no raise
    callback.log_success_event({}, {"id": "y", "model": "m", "usage": {"prompt_tokens": 1}}, None, None)
    assert (callback.sent, callback.skipped) == (1, 2)
    [sent] = kafka.sent
    assert verify(kafka.sent) == []
    doc = orjson.loads(sent["value"])
    assert (doc["input_tokens"], doc["cache_read_tokens"], doc["cache_write_tokens"]) == (10, 66360, 32435)
    assert (doc["model"], doc["user"], doc["team"], doc["client"]) == (
        "claude-opus-4-5-20251101",
        "u-7",
        "t-1",
        "litellm-proxy",
    )


def test_signing_relay_over_http() -> None:
    module = _load("signing_relay")
    p, kafka = producer()
    server = module.make_server(p, "relay-token", "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/usage"

    def post(body: bytes, token: str = "relay-token") -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            url, data=body, method="POST", headers={"Authorization": f"Bearer {token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    try:
        now = time.time_ns() // 1_000_000
        good = [
            orjson.dumps(
                {
                    "event_id": f"e{i}",
                    "ts": now,
                    "user": f"u{i}",
                    "model": "gpt-5",
                    "input_tokens": i,
                    "output_tokens": 1,
                }
            )
            for i in range(3)
        ]
        assert post(b"\n".join(good) + b"\n") == (202, {"queued": 3})
        assert [s["value"] for s in kafka.sent] == good and [s["key"] for s in kafka.sent] == [
            "u0",
            "u1",
            "u2",
        ]
        assert verify(kafka.sent) == []
        code, body = post(good[0] + b"\n" + b'{"event_id":"bad"}')
        assert code == 400 and body["rejects"][0]["reason"] == "missing_field" and len(kafka.sent) == 3
        assert post(good[0], token="wrong")[0] == 401
    finally:
        server.shutdown()
        server.server_close()
