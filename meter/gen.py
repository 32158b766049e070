"""`meter gen`: a load generator that produces realistic usage events to a Kafka topic.

The traffic is a seeded :class:`meter.mix.Mix` (reference kind), so one seed, start and
clock reproduce the same bytes in the same order. On top of it:

* ``bad_ratio``: that fraction of the event slots, spread evenly over the stream, carry an
  invalid event instead, cycling through every parser reason code (``meter.reasons.
  PARSER_REASONS``). A ``too_large`` event always travels as a message of its own (the
  parser rejects the whole message as one DLQ row); every other bad event is one line of a
  message, between valid ones.
* ``duplicate_ratio``: that fraction of the messages is sent a second time, byte for byte
  and under the same key, right after the original or a few messages later, as a gateway
  retry would.

:func:`plan` is the pure part (no Kafka): the exact messages, in order. :func:`generate`
sends them, paced by a token bucket, and returns a :class:`GenSummary` tallied from what was
actually sent: the valid payloads are parsed with :func:`meter.parse_batch`, priced with the
catalog and summed with :class:`meter.totals.Totals`, the same arithmetic the daemon uses,
so a test can compare the summary with the lake.
"""

from __future__ import annotations

import heapq
import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from meter.mix import Mix, bad_event, rfc3339_ms
from meter.parser import parse_batch
from meter.pricing import Catalog, load_catalog
from meter.reasons import PARSER_REASONS, TOO_LARGE
from meter.schema import DEFAULT_LATENESS_MS, MAX_FUTURE_MS, TOKEN_COLUMNS
from meter.totals import Totals

__all__ = [
    "PRODUCER_DEFAULTS",
    "GenError",
    "GenProgress",
    "GenSummary",
    "Message",
    "Tally",
    "generate",
    "plan",
]

#: Producer settings for throughput and safety; every one can be overridden (``--kafka``).
PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 10,
    "batch.size": 1_000_000,
    "batch.num.messages": 100_000,
    "queue.buffering.max.messages": 1_000_000,
    # A too_large bad event is just over 1 MiB: the client must let it through so that the
    # daemon, not the producer, is the one that rejects it.
    "message.max.bytes": 4 << 20,
    "message.timeout.ms": 120_000,
    # Successful deliveries need no Python callback: count them as sent minus failed.
    "delivery.report.only.error": True,
}

#: Most messages a re-send may trail its original by (0 = right after it).
MAX_RESEND_DELAY = 5
#: Valid payloads per parse call while tallying.
_TALLY_CHUNK = 65_536
#: Seconds between progress callbacks.
_PROGRESS_EVERY = 0.5
_USER = re.compile(rb"[\"']user[\"']:\"((?:[^\"\\]|\\.)+)\"")
#: Key of a message none of whose events has a recoverable user id.
NO_USER_KEY = b"-"


class GenError(RuntimeError):
    """The generator could not do its job (topic, broker or delivery trouble)."""


class Message(NamedTuple):
    """One Kafka message of a plan.

    ``reasons`` has one entry per NDJSON line of ``value``: None for a valid event, else
    the reason code the parser must reject that line (or, for ``too_large``, the whole
    message) with.
    """

    key: bytes
    value: bytes
    is_resend: bool
    reasons: tuple[str | None, ...]


def _ratio(value: float, name: str) -> Fraction:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be between 0 and 1, got {value}")
    # Through str so that 0.1 means one in ten exactly, not the binary float's fraction.
    return Fraction(str(value))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _check_window(start_ms: int, span_ms: int, now_ms: int) -> None:
    """Valid events must be valid for the daemon too: inside its timestamp window."""
    if start_ms < now_ms - DEFAULT_LATENESS_MS or start_ms + span_ms - 1 > now_ms + MAX_FUTURE_MS:
        raise ValueError(
            f"event-time range {rfc3339_ms(start_ms)} .. {rfc3339_ms(start_ms + span_ms - 1)} "
            f"is outside the window the daemon accepts around {rfc3339_ms(now_ms)} "
            f"(at most {DEFAULT_LATENESS_MS // 86_400_000} days old, "
            f"{MAX_FUTURE_MS // 60_000} minutes ahead)"
        )


def _key_of(line: bytes) -> bytes | None:
    """The user id of a bad line, as raw JSON string bytes, where one can be found."""
    found = _USER.search(line, 0, 4096)
    return found.group(1) if found else None


def plan(
    *,
    events: int,
    seed: int = 1,
    per_message: int = 1,
    bad_ratio: float = 0.0,
    duplicate_ratio: float = 0.0,
    start_ms: int | None = None,
    span_ms: int = 3600_000,
    now_ms: int | None = None,
    bad_reasons: Sequence[str] = PARSER_REASONS,
) -> Iterator[Message]:
    """The messages `generate` sends, in order, without Kafka (a lazy iterator).

    ``events`` event slots are filled: ``floor(events * bad_ratio)`` of them, spread evenly,
    with bad events cycling through ``bad_reasons`` (all parser reasons by default), the rest
    with valid events of ``Mix(seed)`` spread over [start_ms, start_ms + span_ms). Slots are packed
    ``per_message`` to a message (NDJSON); a too_large bad event leaves its message and
    travels alone. ``floor(unique_messages * duplicate_ratio)`` messages, spread evenly, are
    followed by a verbatim re-send 0..MAX_RESEND_DELAY messages later. ``now_ms`` is the
    daemon's clock the bad events are built around (default: the wall clock); ``start_ms``
    defaults to ``now_ms - span_ms``. Arguments are checked before the first message.
    """
    if events < 0:
        raise ValueError("events must not be negative")
    if per_message < 1:
        raise ValueError("per_message must be at least 1")
    if span_ms < 1:
        raise ValueError("span_ms must be positive")
    bad = _ratio(bad_ratio, "bad_ratio")
    dup = _ratio(duplicate_ratio, "duplicate_ratio")
    now = _now_ms() if now_ms is None else now_ms
    start = now - span_ms if start_ms is None else start_ms
    n_bad = int(events * bad)
    if n_bad < events:
        _check_window(start, span_ms, now)
    unknown = set(bad_reasons) - set(PARSER_REASONS)
    if unknown or not bad_reasons:
        raise ValueError(f"bad_reasons must be parser reason codes, got {sorted(unknown) or 'none'}")
    return _plan(events, seed, per_message, bad, dup, n_bad, start, span_ms, now, tuple(bad_reasons))


def _nth(k: int, ratio: Fraction) -> int:
    """The 1-based position of the k-th (from 0) pick when position i is picked whenever
    floor(i * ratio) steps up: the smallest i with i * ratio >= k + 1."""
    if ratio == 0:
        return -1
    p, q = ratio.numerator, ratio.denominator
    return -(-(k + 1) * q // p)


def _plan(
    events: int,
    seed: int,
    per_message: int,
    bad: Fraction,
    dup: Fraction,
    n_bad: int,
    start_ms: int,
    span_ms: int,
    now_ms: int,
    bad_reasons: tuple[str, ...],
) -> Iterator[Message]:
    mix = Mix(seed, start_ms=start_ms, span_ms=span_ms)
    valid = mix.events(events - n_bad)
    encode = mix.encode
    bad_rng = random.Random(f"meter-gen-bad-{seed}")
    dup_rng = random.Random(f"meter-gen-dup-{seed}")
    pending: list[tuple[int, int, Message]] = []  # (due after unique #, order, message)
    unique = 0
    n_dup = 0
    next_dup = _nth(0, dup)

    def after(message: Message) -> list[Message]:
        """Book-keeping after a unique message: the re-sends now due, in order."""
        nonlocal unique, n_dup, next_dup
        unique += 1
        if unique == next_dup:
            n_dup += 1
            next_dup = _nth(n_dup, dup)
            due = unique + dup_rng.randint(0, MAX_RESEND_DELAY)
            heapq.heappush(pending, (due, unique, message._replace(is_resend=True)))
        due_now = []
        while pending and pending[0][0] <= unique:
            due_now.append(heapq.heappop(pending)[2])
        return due_now

    key: bytes | None = None  # the first user id found among the message's events
    lines: list[bytes] = []
    reasons: list[str | None] = []
    n_bad_sent = 0
    next_bad = _nth(0, bad) - 1 if n_bad else -1  # 0-based slot of the next bad event
    for slot in range(events):
        if slot == next_bad:
            reason = bad_reasons[n_bad_sent % len(bad_reasons)]
            n_bad_sent += 1
            next_bad = _nth(n_bad_sent, bad) - 1 if n_bad_sent < n_bad else -1
            line = bad_event(reason, bad_rng, now_ms=now_ms)
            if reason == TOO_LARGE:
                message = Message(_key_of(line) or NO_USER_KEY, line, False, (reason,))
                yield message
                yield from after(message)
                continue
            if key is None:
                key = _key_of(line)
            lines.append(line)
            reasons.append(reason)
        else:
            event = next(valid)
            if per_message == 1:
                message = Message(event["user"].encode(), encode(event), False, (None,))
                yield message
                if pending or unique + 1 == next_dup:
                    yield from after(message)
                else:
                    unique += 1
                continue
            if key is None:
                key = event["user"].encode()
            lines.append(encode(event))
            reasons.append(None)
        if len(lines) == per_message:
            message = Message(key or NO_USER_KEY, b"\n".join(lines), False, tuple(reasons))
            yield message
            yield from after(message)
            key, lines, reasons = None, [], []
    if lines:
        message = Message(key or NO_USER_KEY, b"\n".join(lines), False, tuple(reasons))
        yield message
        yield from after(message)
    while pending:
        yield heapq.heappop(pending)[2]


# --- accounting -------------------------------------------------------------------------


@dataclass
class GenSummary:
    """What a generator run sent, tallied message by message.

    ``events``, ``tokens``, ``cost_usd``, ``unpriced`` and ``bad_events`` count each
    unique message once: they are what the lake must hold after the first send (accepted
    rows, and DLQ rows by reason). Re-sends are counted apart (``resent_*``); a lake that
    does not deduplicate holds ``events + resent_events`` rows and ``bad_events +
    resent_bad_events`` DLQ rows.
    """

    topic: str = ""
    seed: int = 1
    messages: int = 0
    unique_messages: int = 0
    events: int = 0
    bad_events: dict[str, int] = field(default_factory=dict)
    resent_messages: int = 0
    resent_events: int = 0
    resent_bad_events: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOKEN_COLUMNS, 0))
    cost_usd: Decimal = Decimal(0)
    unpriced: int = 0
    catalog: str = ""
    first_ts_ms: int | None = None
    last_ts_ms: int | None = None
    now_ms: int = 0
    bytes: int = 0
    partitions: int | None = None
    delivered: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    stopped: bool = False

    @property
    def lines(self) -> int:
        """Every NDJSON line sent, valid or bad, re-sends included."""
        return (
            self.events
            + sum(self.bad_events.values())
            + self.resent_events
            + sum(self.resent_bad_events.values())
        )

    def to_json(self) -> dict[str, Any]:
        def instant(ms: int | None) -> str | None:
            return None if ms is None else rfc3339_ms(ms)

        elapsed = max(self.elapsed_s, 1e-9)
        return {
            "topic": self.topic,
            "seed": self.seed,
            "messages": self.messages,
            "unique_messages": self.unique_messages,
            "events": self.events,
            "bad_events": dict(sorted(self.bad_events.items())),
            "resent_messages": self.resent_messages,
            "resent_events": self.resent_events,
            "resent_bad_events": dict(sorted(self.resent_bad_events.items())),
            "tokens": dict(self.tokens),
            "cost_usd": format(self.cost_usd, "f"),
            "unpriced": self.unpriced,
            "catalog": self.catalog,
            "event_time": {
                "first": instant(self.first_ts_ms),
                "last": instant(self.last_ts_ms),
                "first_ms": self.first_ts_ms,
                "last_ms": self.last_ts_ms,
            },
            "now_ms": self.now_ms,
            "bytes": self.bytes,
            "partitions": self.partitions,
            "delivered": self.delivered,
            "failed": self.failed,
            "errors": dict(sorted(self.errors.items())),
            "elapsed_s": round(self.elapsed_s, 3),
            "events_per_s": round(self.lines / elapsed, 1) if self.elapsed_s else None,
            "messages_per_s": round(self.messages / elapsed, 1) if self.elapsed_s else None,
            "stopped": self.stopped,
        }


class Tally:
    """Running accounts of sent messages; valid payloads are parsed and priced in chunks
    with the daemon's own parser, catalog and Totals."""

    def __init__(self, catalog: Catalog, now_ms: int, lateness_ms: int = DEFAULT_LATENESS_MS):
        self.catalog = catalog
        self.now_ms = now_ms
        self.lateness_ms = lateness_ms
        self.totals = Totals()
        self.messages = self.unique_messages = 0
        self.resent_messages = self.resent_events = 0
        self.bad: Counter[str] = Counter()
        self.resent_bad: Counter[str] = Counter()
        self.bytes = 0
        self.first_ts_ms: int | None = None
        self.last_ts_ms: int | None = None
        self._pending: list[bytes] = []

    def add(self, message: Message) -> None:
        self.messages += 1
        self.bytes += len(message.value)
        reasons = message.reasons
        if message.is_resend:
            self.resent_messages += 1
            self.resent_events += reasons.count(None)
            self.resent_bad.update(r for r in reasons if r is not None)
            return
        self.unique_messages += 1
        if len(reasons) == 1:
            if reasons[0] is None:
                self._pending.append(message.value)
            else:
                self.bad[reasons[0]] += 1
        else:
            for line, reason in zip(message.value.split(b"\n"), reasons, strict=True):
                if reason is None:
                    self._pending.append(line)
                else:
                    self.bad[reason] += 1
        if len(self._pending) >= _TALLY_CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        result = parse_batch(self._pending, now_ms=self.now_ms, lateness_ms=self.lateness_ms)
        if result.rejects:
            first = result.rejects[0]
            raise GenError(
                f"{len(result.rejects)} generated event(s) rejected by the parser, e.g. "
                f"{first.reason}: {first.detail}: {self._pending[first.message_index][:200]!r}"
            )
        self._pending = []
        self.totals.add_batch(self.catalog.price(result.batch))
        if result.batch.num_rows:
            extremes = pc.min_max(result.batch.column("ts").cast(pa.int64()))
            low, high = extremes["min"].as_py(), extremes["max"].as_py()
            self.first_ts_ms = low if self.first_ts_ms is None else min(self.first_ts_ms, low)
            self.last_ts_ms = high if self.last_ts_ms is None else max(self.last_ts_ms, high)

    def summary(self, **extra: Any) -> GenSummary:
        """The accounts so far (pending payloads are parsed first)."""
        self._flush()
        totals = self.totals
        return GenSummary(
            messages=self.messages,
            unique_messages=self.unique_messages,
            events=totals.events,
            bad_events=dict(sorted(self.bad.items())),
            resent_messages=self.resent_messages,
            resent_events=self.resent_events,
            resent_bad_events=dict(sorted(self.resent_bad.items())),
            tokens=dict(totals.tokens),
            cost_usd=totals.cost_usd,
            unpriced=totals.unpriced,
            catalog=self.catalog.name,
            first_ts_ms=self.first_ts_ms,
            last_ts_ms=self.last_ts_ms,
            now_ms=self.now_ms,
            bytes=self.bytes,
            **extra,
        )


# --- sending ----------------------------------------------------------------------------


class GenProgress(NamedTuple):
    """Passed to ``on_progress`` about twice a second and once at the end."""

    messages: int
    lines: int
    failed: int
    elapsed_s: float


class _Bucket:
    """A token bucket of `rate` events per second that may run into debt: a message of
    any size is sent at once, then the bucket waits until the debt is paid, so the rate is
    steady and a burst after a stall is at most `burst` events."""

    def __init__(self, rate: float, burst: float):
        self.rate = rate
        self.burst = burst
        self.tokens = 0.0
        self.stamp = time.monotonic()

    def take(self, n: int) -> float:
        """Spend n tokens; return the seconds to wait before the next send."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate) - n
        self.stamp = now
        return -self.tokens / self.rate if self.tokens < 0 else 0.0


def _resolve_catalog(catalog: Catalog | str | os.PathLike[str] | None) -> Catalog:
    return catalog if isinstance(catalog, Catalog) else load_catalog(catalog)


def _ensure_topic(
    brokers: str, topic: str, partitions: int | None, kafka: Mapping[str, Any], timeout: float
) -> int | None:
    """Create the topic with `partitions` if it is missing; return its partition count
    (None when it is not known yet: a broker that creates topics on first use)."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    conf = {k: v for k, v in kafka.items() if k.startswith(("security.", "sasl.", "ssl."))}
    admin = AdminClient({**conf, "bootstrap.servers": brokers})

    def count() -> int | None:
        try:
            # All topics: asking for this one by name may auto-create it with the broker's
            # default partition count before it could be created with `partitions`.
            md = admin.list_topics(timeout=min(5.0, timeout))
        except KafkaException as error:
            raise GenError(f"cannot reach brokers {brokers}: {error}") from None
        found = md.topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            return None
        if any(p.leader < 0 for p in found.partitions.values()):
            return None
        return len(found.partitions)

    existing = count()
    if existing is not None or partitions is None:
        return existing
    future = admin.create_topics(
        [NewTopic(topic, partitions)], request_timeout=timeout, operation_timeout=timeout
    )[topic]
    try:
        future.result(timeout=timeout + 1)
    except KafkaException as error:
        err = error.args[0] if error.args else None
        if not (isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS):
            raise GenError(f"cannot create topic {topic!r} ({partitions} partitions): {error}") from None
    deadline = time.monotonic() + timeout
    while (got := count()) is None:
        if time.monotonic() > deadline:
            raise GenError(f"topic {topic!r} not ready {timeout:.0f}s after creating it")
        time.sleep(0.05)
    return got


def generate(
    brokers: str,
    topic: str,
    *,
    events: int,
    rate: float = 0,
    seed: int = 1,
    per_message: int = 1,
    bad_ratio: float = 0.0,
    duplicate_ratio: float = 0.0,
    start_ms: int | None = None,
    span_ms: int = 3600_000,
    partitions: int | None = None,
    catalog: Catalog | str | os.PathLike[str] | None = None,
    kafka: Mapping[str, Any] | None = None,
    now_ms: int | None = None,
    stop: threading.Event | None = None,
    on_progress: Callable[[GenProgress], None] | None = None,
    bad_reasons: Sequence[str] = PARSER_REASONS,
) -> GenSummary:
    """Send `plan(...)` to `topic` and return what was sent.

    ``rate`` is events (NDJSON lines, bad ones and re-sends included) per second, 0 for as
    fast as possible. ``partitions`` creates the topic if it is missing. ``kafka`` overrides
    PRODUCER_DEFAULTS. Setting ``stop`` ends the run early: what was produced is flushed
    and the summary says ``stopped``. Delivery failures are counted in the summary
    (``failed``, ``errors``), never raised: the caller decides.
    """
    from confluent_kafka import KafkaError, KafkaException, Producer

    if rate < 0:
        raise ValueError("rate must not be negative")
    if partitions is not None and partitions < 1:
        raise ValueError("partitions must be at least 1")
    now = _now_ms() if now_ms is None else now_ms
    messages = plan(
        events=events,
        seed=seed,
        per_message=per_message,
        bad_ratio=bad_ratio,
        duplicate_ratio=duplicate_ratio,
        start_ms=start_ms,
        span_ms=span_ms,
        now_ms=now,
        bad_reasons=bad_reasons,
    )
    tally = Tally(_resolve_catalog(catalog), now)
    kafka = dict(kafka or {})
    conf: dict[str, Any] = {**PRODUCER_DEFAULTS, **kafka, "bootstrap.servers": brokers}
    found = _ensure_topic(brokers, topic, partitions, kafka, 10.0)

    errors: Counter[str] = Counter()

    def on_delivery(error: KafkaError | None, _msg: Any) -> None:
        if error is not None:
            errors[error.name()] += 1

    try:
        producer = Producer({**conf, "on_delivery": on_delivery})
    except KafkaException as error:
        raise ValueError(f"producer settings: {error}") from None
    stop = stop or threading.Event()
    bucket = _Bucket(rate, max(float(per_message), rate / 100)) if rate > 0 else None
    started = time.monotonic()
    next_progress = started + _PROGRESS_EVERY
    lines_sent = 0
    stopped = False

    def progress() -> None:
        if on_progress is not None:
            on_progress(
                GenProgress(tally.messages, lines_sent, sum(errors.values()), time.monotonic() - started)
            )

    for n, message in enumerate(messages):
        if stop.is_set():
            stopped = True
            break
        while True:
            try:
                producer.produce(topic, message.value, message.key)
                break
            except BufferError:
                producer.poll(0.05)  # the local queue is full: let deliveries drain it
            except KafkaException as error:
                producer.flush(5.0)  # what was accepted before still goes out
                raise GenError(f"produce to {topic!r}: {error}") from None
        tally.add(message)
        lines_sent += len(message.reasons)
        if n % 1024 == 0:
            producer.poll(0)
        if bucket is not None:
            wait = bucket.take(len(message.reasons))
            deadline = time.monotonic() + wait
            while wait > 0 and not stop.is_set():
                producer.poll(min(wait, 0.05))
                wait = deadline - time.monotonic()
        if on_progress is not None and time.monotonic() >= next_progress:
            next_progress = time.monotonic() + _PROGRESS_EVERY
            progress()

    timeout_s = float(conf.get("message.timeout.ms", 300_000)) / 1000 + 5
    deadline = time.monotonic() + timeout_s
    while len(producer) and time.monotonic() < deadline:
        producer.flush(min(1.0, max(0.0, deadline - time.monotonic())))
    undelivered = len(producer)
    if undelivered:
        errors["_NOT_FLUSHED"] += undelivered
    progress()
    failed = sum(errors.values())
    if found is None:
        try:
            found = len(producer.list_topics(topic, timeout=5).topics[topic].partitions) or None
        except (KafkaException, KeyError):
            found = None
    return tally.summary(
        topic=topic,
        seed=seed,
        partitions=found,
        delivered=tally.messages - failed,
        failed=failed,
        errors=dict(errors),
        elapsed_s=time.monotonic() - started,
        stopped=stopped,
    )
