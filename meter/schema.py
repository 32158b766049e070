"""The usage-event v1 contract as Arrow schemas (see docs/event-schema.md).

EVENTS is what the parser emits; PRICED adds what pricing stamps on each row;
LAKE_EVENTS adds the Kafka provenance the sink writes; DLQ is a dead-letter row.
"""

from __future__ import annotations

import pyarrow as pa

#: Token buckets in schema order; they never overlap (input excludes cache reads/writes).
TOKEN_COLUMNS: tuple[str, ...] = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "reasoning_tokens",
)
#: Token fields an event must carry; the others default to 0.
REQUIRED_TOKENS: tuple[str, ...] = ("input_tokens", "output_tokens")
#: String fields in schema order with (required, max bytes).
STRING_FIELDS: dict[str, tuple[bool, int]] = {
    "event_id": (True, 64),
    "user": (True, 128),
    "team": (False, 128),
    "org": (False, 128),
    "model": (True, 128),
    "provider": (False, 128),
    "client": (False, 128),
    "request_id": (False, 128),
    "prompt_hash": (False, 128),
}
#: Inclusive bounds of every token count.
TOKEN_MIN = 0
TOKEN_MAX = 1_000_000_000
#: Limits on one Kafka message.
MAX_MESSAGE_BYTES = 1 << 20
MAX_DEPTH = 64
#: Timestamp window around the daemon's clock.
MAX_FUTURE_MS = 5 * 60 * 1000
DEFAULT_LATENESS_MS = 35 * 24 * 3600 * 1000

#: Field order used for validation: the first failing field (in this order) names the reject.
FIELD_ORDER: tuple[str, ...] = (
    "event_id",
    "ts",
    "user",
    "team",
    "org",
    "model",
    "provider",
    "client",
    "request_id",
    "prompt_hash",
    *TOKEN_COLUMNS,
)

TS_TYPE = pa.timestamp("ms", tz="UTC")
COST_TYPE = pa.decimal128(38, 12)


def _string(name: str) -> pa.Field:
    required, _ = STRING_FIELDS[name]
    return pa.field(name, pa.string(), nullable=not required)


EVENTS = pa.schema(
    [
        _string("event_id"),
        pa.field("ts", TS_TYPE, nullable=False),
        *(_string(n) for n in FIELD_ORDER[2:10]),
        *(pa.field(n, pa.int64(), nullable=False) for n in TOKEN_COLUMNS),
    ]
)

PRICED = EVENTS.append(pa.field("cost_usd", COST_TYPE)).append(pa.field("price_version", pa.string()))

PROVENANCE = pa.schema(
    [
        pa.field("kafka_topic", pa.string(), nullable=False),
        pa.field("kafka_partition", pa.int32(), nullable=False),
        pa.field("kafka_offset", pa.int64(), nullable=False),
    ]
)

LAKE_EVENTS = pa.schema(list(PRICED) + list(PROVENANCE))

DLQ = pa.schema(
    [
        pa.field("raw", pa.binary(), nullable=False),
        *PROVENANCE,
        pa.field("line", pa.int32(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
        pa.field("arrival_ts", TS_TYPE, nullable=False),
    ]
)
