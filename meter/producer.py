"""A producer library for gateways: provider response -> usage event -> signed Kafka message.

    from meter.producer import UsageProducer
    from meter.signing import HmacSigner

    producer = UsageProducer("broker:9092", "usage", HmacSigner("gw-eu-2026-01", secret))
    producer.send_response("anthropic.messages", response_json, user="u-42", team="search")
    ...
    producer.close()          # flush, report what could not be delivered

* Events are built by :func:`build_event` from a provider's usage block through
  :mod:`meter.adapters` (so buckets never overlap) and serialised compactly; the value is
  signed as sent, byte for byte.
* The Kafka producer is idempotent with ``acks=all``: librdkafka's own retries never
  duplicate or reorder a message. A message is keyed by its user, so an application-level
  retry of the same event lands in the same partition, where the daemon's event-id dedup
  counts it once.
* Delivery failures are counted and kept (``failures``); ``close`` returns how many
  messages were not delivered.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from meter.adapters import PROVIDERS, Usage, model_name, to_usage
from meter.signing import Signer

#: Producer settings for safety first; every one can be overridden with `kafka=`.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "compression.type": "lz4",
    "message.timeout.ms": 300_000,
}
_EVENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_OPTIONAL = ("team", "org", "provider", "client", "request_id", "prompt_hash")


class ProducerError(RuntimeError):
    """Raised when a message cannot even be queued (the local queue stays full)."""


def event_id_for(request_id: str, index: int | None = None) -> str:
    """A valid event_id from a provider request id: the id itself when it fits the
    contract (``[A-Za-z0-9._:-]{1,64}``), else a digest of it; ``index`` tells apart
    several events of one request (``id:index``)."""
    candidate = request_id if index is None else f"{request_id}:{index}"
    if _EVENT_ID.fullmatch(candidate):
        return candidate
    digest = hashlib.sha256(candidate.encode()).hexdigest()
    return "h:" + digest[:62]


def build_event(
    usage: Usage,
    *,
    event_id: str,
    user: str,
    model: str,
    ts_ms: int | None = None,
    team: str | None = None,
    org: str | None = None,
    provider: str | None = None,
    client: str | None = None,
    request_id: str | None = None,
    prompt_hash: str | None = None,
) -> dict[str, Any]:
    """A usage event (docs/event-schema.md) from mapped usage; None fields are left out."""
    if not isinstance(usage, Usage):
        raise TypeError("usage must be a meter.adapters.Usage (map the provider block with to_usage)")
    if not _EVENT_ID.fullmatch(event_id):
        raise ValueError(f"event_id {event_id!r} does not match [A-Za-z0-9._:-]{{1,64}}")
    event: dict[str, Any] = {
        "event_id": event_id,
        "ts": time.time_ns() // 1_000_000 if ts_ms is None else ts_ms,
        "user": user,
        "model": model,
        **usage.buckets(),
    }
    given = {
        "team": team,
        "org": org,
        "provider": provider,
        "client": client,
        "request_id": request_id,
        "prompt_hash": prompt_hash,
    }
    event.update({k: v for k, v in given.items() if v is not None})
    return event


def response_parts(
    usage_format: str, response: Mapping[str, Any]
) -> tuple[Mapping[str, Any], str | None, str | None]:
    """(usage block, model, request id) of a whole provider response body."""
    if usage_format == "gemini":
        usage = response.get("usageMetadata") or response.get("usage_metadata") or {}
        model = response.get("modelVersion") or response.get("model_version")
        return usage, model, response.get("responseId") or response.get("response_id")
    if usage_format == "bedrock.converse":
        meta = response.get("ResponseMetadata") or {}
        return response.get("usage") or {}, None, meta.get("RequestId")
    return response.get("usage") or {}, response.get("model"), response.get("id")


@dataclass
class DeliveryReport:
    delivered: int = 0
    failures: list[str] = field(default_factory=list)


class UsageProducer:
    """Builds, signs and produces usage events to one topic."""

    def __init__(
        self,
        brokers: str,
        topic: str,
        signer: Signer | None = None,
        *,
        client: str | None = None,
        kafka: Mapping[str, Any] | None = None,
        producer_factory: Callable[[dict[str, Any]], Any] | None = None,
    ):
        settings = {**PRODUCER_DEFAULTS, **(kafka or {}), "bootstrap.servers": brokers}
        if producer_factory is None:
            from confluent_kafka import Producer

            producer_factory = Producer
        self.topic = topic
        self.signer = signer
        self.client = client
        self._producer = producer_factory(settings)
        self._lock = threading.Lock()
        self.report = DeliveryReport()

    def _on_delivery(self, error: Any, _message: Any) -> None:
        with self._lock:
            if error is None:
                self.report.delivered += 1
            else:
                self.report.failures.append(str(error))

    def send_value(self, value: bytes, key: bytes | str | None = None, ts_ms: int | None = None) -> None:
        """Sign (when a signer is set) and queue one message value as it is."""
        headers: Any = self.signer.sign(self.topic, value, ts_ms) if self.signer is not None else None
        for attempt in range(100):
            try:
                self._producer.produce(
                    self.topic, value, key=key, headers=headers, on_delivery=self._on_delivery
                )
                break
            except BufferError:
                self._producer.poll(0.05 if attempt else 0)
        else:
            raise ProducerError("the producer's local queue stayed full")
        self._producer.poll(0)

    def send(self, event: Mapping[str, Any], key: bytes | str | None = None) -> bytes:
        """Queue one event (a dict); keyed by its user unless `key` is given. Returns the value."""
        value = orjson.dumps(dict(event))
        self.send_value(value, key if key is not None else str(event.get("user", "")))
        return value

    def send_usage(
        self,
        usage_format: str,
        usage: Mapping[str, Any],
        *,
        event_id: str,
        user: str,
        model: str,
        **fields: Any,
    ) -> dict[str, Any]:
        """Map a raw usage block with its adapter, build the event and queue it."""
        mapped = to_usage(usage_format, usage)
        fields.setdefault("provider", PROVIDERS.get(usage_format))
        fields.setdefault("client", self.client)
        event = build_event(
            mapped, event_id=event_id, user=user, model=model_name(usage_format, model), **fields
        )
        self.send(event)
        return event

    def send_response(
        self,
        usage_format: str,
        response: Mapping[str, Any],
        *,
        user: str,
        model: str | None = None,
        event_id: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Queue the usage event of a whole provider response body: usage, model and request
        id are taken from it (Bedrock's body names no model: pass `model`)."""
        usage, found_model, request_id = response_parts(usage_format, response)
        model = model or found_model
        if not model:
            raise ValueError(f"{usage_format}: the response names no model; pass model=")
        if event_id is None:
            if not request_id:
                raise ValueError(f"{usage_format}: the response has no request id; pass event_id=")
            event_id = event_id_for(str(request_id))
        if request_id and len(str(request_id).encode()) <= 128:
            fields.setdefault("request_id", str(request_id))
        return self.send_usage(usage_format, usage, event_id=event_id, user=user, model=model, **fields)

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for queued messages; returns how many are still undelivered."""
        return int(self._producer.flush(timeout))

    def close(self, timeout: float = 30.0) -> int:
        """Flush; returns the number of messages not delivered (failed or still queued)."""
        remaining = self.flush(timeout)
        return remaining + len(self.report.failures)

    def __enter__(self) -> UsageProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
