"""Signed usage events (DESIGN 8): only what a trusted gateway vouched for is counted.

A producer signs the raw message value with a keyring key and sends three headers, each
exactly once: ``meter-kid`` (key id), ``meter-ts`` (signing time, epoch ms) and
``meter-sig`` (raw signature bytes) over::

    "meter-sig-v1\\n" + kid + "\\n" + ts + "\\n" + topic + "\\n" + value

The daemon checks every message before it is parsed (:class:`Verify`), in one compiled
batch per chunk with the HMACs computed outside the GIL (ext/_verify.pyx; the pure-Python
twin meter/_pyverify.py states the order of the checks). Rejected messages go to the DLQ
whole, as ``unsigned`` (no complete set of headers) or ``bad_signature`` (every other
failure), with a detail naming the check; the rest of the chunk goes on unchanged, and
:class:`Verified` (after parsing) merges the two and applies the keys' gateway binding.

Time: the record's broker time when the topic uses LogAppendTime (the production setting:
the verdict of a re-read never changes and no producer can backdate); with
``allow_create_time`` the daemon's arrival clock instead. Replays of a valid message are
the event-id dedup's job, not this module's.

Policies: ``off`` (no check), ``verify`` (unsigned messages pass, signed ones must verify),
``require`` (everything must verify).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from meter import reasons as R
from meter.keyring import ED25519, HMAC_SHA256, Keyring, KeyringError, format_ms, load_keyring
from meter.reasons import Reject
from meter.stages import Chunk, Rows, Step, Terminal, dlq_table

if TYPE_CHECKING:
    from meter.config import Config

log = logging.getLogger("meter.signing")

if os.environ.get("METER_PURE_PYTHON", "") not in ("", "0"):
    from meter import _pyverify as _impl

    COMPILED = False
else:
    try:
        from meter import _verify as _impl  # type: ignore[no-redef]
    except ImportError as error:  # pragma: no cover - a source tree without `make`
        raise ImportError(
            "meter's compiled signature check is not built; run `make` (or `pip install -e .`), "
            "or set METER_PURE_PYTHON=1 to use the pure-Python one"
        ) from error
    COMPILED = True

OFF, VERIFY, REQUIRE = "off", "verify", "require"
POLICIES = (OFF, VERIFY, REQUIRE)
HEADER_KID, HEADER_TS, HEADER_SIG = "meter-kid", "meter-ts", "meter-sig"
VERSION_TAG = b"meter-sig-v1"
DEFAULT_MAX_DELAY_MS = 86_400_000
#: How far ahead of the time checked a signature may be (clock skew between hosts).
MAX_FUTURE_MS = 300_000
#: confluent-kafka's timestamp types (message.timestamp()[0]).
TIMESTAMP_NOT_AVAILABLE, TIMESTAMP_CREATE_TIME, TIMESTAMP_LOG_APPEND_TIME = 0, 1, 2
_TIMESTAMP_TYPES = {0: "no timestamp", 1: "CreateTime", 2: "LogAppendTime"}

C = {name: code for code, name in enumerate(_impl.CODES)}
_UNSIGNED_CODES = (C["no_headers"], C["missing"])


# ---------------------------------------------------------------- signing (producers)


def signature_base(kid: str, ts_ms: int | str, topic: str, value: bytes) -> bytes:
    """What a signature covers: the tag, key id, signing time, topic, then the raw value."""
    return b"\n".join((VERSION_TAG, kid.encode(), str(ts_ms).encode(), topic.encode(), value))


def signature_headers(kid: str, ts_ms: int, sig: bytes) -> list[tuple[str, bytes]]:
    return [(HEADER_KID, kid.encode()), (HEADER_TS, str(ts_ms).encode()), (HEADER_SIG, sig)]


class Signer(Protocol):
    kid: str
    alg: str

    def sign(self, topic: str, value: bytes, ts_ms: int | None = None) -> list[tuple[str, bytes]]:
        """The three meter-* headers for `value` on `topic`, signed at `ts_ms` (default now)."""
        ...


class HmacSigner:
    """Signs with a shared HMAC-SHA256 secret (the keyring holds the same one)."""

    alg = HMAC_SHA256

    def __init__(self, kid: str, secret: bytes, clock_ms: Callable[[], int] | None = None):
        from meter.keyring import KID, SecretBytes

        if not KID.fullmatch(kid):
            raise ValueError("kid must be 1-64 characters of A-Z a-z 0-9 . _ -")
        self.kid = kid
        self._secret = SecretBytes(secret)
        self._clock_ms = clock_ms or _now_ms

    def __repr__(self) -> str:
        return f"HmacSigner(kid={self.kid!r})"

    def sign(self, topic: str, value: bytes, ts_ms: int | None = None) -> list[tuple[str, bytes]]:
        ts = self._clock_ms() if ts_ms is None else ts_ms
        sig = hmac.new(self._secret, signature_base(self.kid, ts, topic, value), hashlib.sha256).digest()
        return signature_headers(self.kid, ts, sig)


class Ed25519Signer:
    """Signs with an Ed25519 private key (32-byte seed); meter holds only the public key.
    Needs the optional `cryptography` package."""

    alg = ED25519

    def __init__(self, kid: str, private_key: bytes, clock_ms: Callable[[], int] | None = None):
        from meter.keyring import KID

        Ed25519PrivateKey = _ed25519().Ed25519PrivateKey
        if not KID.fullmatch(kid):
            raise ValueError("kid must be 1-64 characters of A-Z a-z 0-9 . _ -")
        self.kid = kid
        self._key = Ed25519PrivateKey.from_private_bytes(bytes(private_key))
        self._clock_ms = clock_ms or _now_ms

    def __repr__(self) -> str:
        return f"Ed25519Signer(kid={self.kid!r})"

    def public_key(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def sign(self, topic: str, value: bytes, ts_ms: int | None = None) -> list[tuple[str, bytes]]:
        ts = self._clock_ms() if ts_ms is None else ts_ms
        return signature_headers(self.kid, ts, self._key.sign(signature_base(self.kid, ts, topic, value)))


def _ed25519() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise KeyringError(
            "ed25519 keys need the optional 'cryptography' package (pip install 'meter[ed25519]')"
        ) from None
    return ed25519


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# ---------------------------------------------------------------- verification


@dataclass(frozen=True)
class Policy:
    """How the daemon treats signatures; validated when built."""

    mode: str = OFF
    allow_create_time: bool = False
    max_delay_ms: int = DEFAULT_MAX_DELAY_MS
    max_future_ms: int = MAX_FUTURE_MS

    def __post_init__(self) -> None:
        if self.mode not in POLICIES:
            raise ValueError(f"signatures must be one of {', '.join(POLICIES)}, got {self.mode!r}")
        if self.max_delay_ms <= 0 or self.max_future_ms < 0:
            raise ValueError("max delay must be positive and max future not negative")


class Verifier:
    """A keyring and a policy, compiled for the hot path."""

    def __init__(self, keyring: Keyring, policy: Policy):
        self.keyring = keyring
        self.policy = policy
        keys = keyring.keys
        self.kids = [k.kid for k in keys]
        self.gateways = [k.gateway for k in keys]
        self.table = _impl.Table(
            [k.kid.encode() for k in keys],
            [1 if k.alg == ED25519 else 0 for k in keys],
            [k.window for k in keys],
            [k.secret for k in keys],
            [k.topics for k in keys],
        )
        self.public_keys: dict[int, Any] = {}
        if keyring.has_ed25519:
            loader = _ed25519().Ed25519PublicKey.from_public_bytes
            self.public_keys = {i: loader(k.public_key) for i, k in enumerate(keys) if k.alg == ED25519}
        self.passing = (C["ok"],) if policy.mode == REQUIRE else (C["ok"], *_UNSIGNED_CODES)

    def check(self, chunk: Chunk) -> tuple[list[Reject], list[str | None] | None]:
        """The chunk's rejects, and per message the gateway its key is bound to (None when no
        key of the keyring is bound to one). `chunk.headers` holds per message its headers
        as message.headers() gives them, or the consumed Message itself."""
        n = len(chunk.payloads)
        headers = chunk.headers if len(chunk.headers) == n else [None] * n
        if n >= 2 and _IN_PLACE["tries"] and type(headers[0]) is _message_type():
            _try_in_place(headers[0], headers[1])
        stamps = chunk.timestamps if len(chunk.timestamps) == n else [(0, 0)] * n
        policy = self.policy
        verdicts = self.table.check(
            chunk.payloads,
            headers,
            stamps,
            chunk.topic,
            chunk.arrival_ms,
            policy.allow_create_time,
            policy.max_delay_ms,
            policy.max_future_ms,
        )
        codes = verdicts.codes
        rejects: list[Reject] = []
        slots = memoryview(verdicts.slots).cast("i")
        if sum(codes.count(c) for c in self.passing) != n:
            args = memoryview(verdicts.args).cast("q")
            ed25519 = C["ed25519"]
            for i, code in enumerate(codes):
                if code in self.passing:
                    continue
                if code == ed25519 and self._ed25519_ok(chunk, i, slots[i]):
                    continue
                reason = R.UNSIGNED if code in _UNSIGNED_CODES else R.BAD_SIGNATURE
                rejects.append(Reject(i, 0, reason, self.detail(code, args[i], slots[i], headers[i], chunk)))
        bound = None
        if self.keyring.has_gateways:
            gateways = self.gateways
            rejected = {r.message_index for r in rejects}
            bound = [
                gateways[slot] if slot >= 0 and i not in rejected else None for i, slot in enumerate(slots)
            ]
        return rejects, bound

    def _ed25519_ok(self, chunk: Chunk, index: int, slot: int) -> bool:
        """Ed25519 is verified here, one message at a time (tens of microseconds each: for
        low-volume gateways); every other check already passed in the batch."""
        from cryptography.exceptions import InvalidSignature

        items = _header_list(chunk.headers[index])
        found = {key: value for key, value in items if key in (HEADER_KID, HEADER_TS, HEADER_SIG)}
        value = chunk.payloads[index] or b""
        base = b"\n".join((VERSION_TAG, found[HEADER_KID], found[HEADER_TS], chunk.topic.encode(), value))
        try:
            self.public_keys[slot].verify(found[HEADER_SIG], base)
        except InvalidSignature:
            return False
        return True

    def detail(self, code: int, arg: int, slot: int, headers: Any, chunk: Chunk) -> str:
        """The human-readable reason of a verdict: names the failed check, never key material."""
        name = _impl.CODES[code]
        kid = repr(self.kids[slot]) if slot >= 0 else ""
        if name == "no_headers":
            return "no signature: the message carries none of the meter-kid, meter-ts, meter-sig headers"
        if name == "missing":
            return f"missing header {_impl.HEADERS[arg]}"
        if name == "duplicate":
            return f"duplicate header {_impl.HEADERS[arg]}"
        if name == "bad_kid":
            return "malformed header meter-kid: not 1-64 bytes of A-Z a-z 0-9 . _ -"
        if name == "bad_ts":
            return "malformed header meter-ts: not epoch milliseconds (1-15 ASCII digits)"
        if name == "bad_sig":
            return "malformed header meter-sig: empty"
        if name == "unknown_key":
            sent = dict((k, v) for k, v in _header_list(headers) if k == HEADER_KID).get(HEADER_KID, b"")
            return f"unknown key {sent.decode('ascii', 'replace')!r}"
        key = self.keyring.keys[slot]
        if name == "alg_mismatch":
            return f"algorithm mismatch: a {arg}-byte signature for {key.alg} key {kid}"
        if name == "wrong_topic":
            return f"wrong topic: key {kid} may not sign for topic {chunk.topic!r}"
        if name == "no_broker_time":
            kind = _TIMESTAMP_TYPES.get(arg, f"timestamp type {arg}")
            return (
                f"no broker time: the record carries {kind}, not LogAppendTime, and allow_create_time is off"
            )
        if name == "revoked":
            return f"revoked key {kid}: revoked at {format_ms(key.window[2])}, record time {format_ms(arg)}"
        if name == "not_yet_valid":
            since = format_ms(key.window[0])
            return f"key {kid} not yet valid: not_before {since}, record time {format_ms(arg)}"
        if name == "expired":
            return f"expired key {kid}: not_after {format_ms(key.window[1])}, record time {format_ms(arg)}"
        if name == "stale":
            return f"stale: signed {arg} ms before the record time (max delay {self.policy.max_delay_ms} ms)"
        if name == "future":
            return (
                f"signed in the future: {arg} ms after the record time (limit {self.policy.max_future_ms} ms)"
            )
        if name == "bad_mac":
            return f"bad MAC for key {kid}"
        if name == "ed25519":
            return f"bad signature for ed25519 key {kid}"
        return name


def _header_list(item: Any) -> list[tuple[str, Any]]:
    """A message's headers as a list, from a list or a consumed Message (rejects only)."""
    if item is None:
        return []
    if not isinstance(item, list | tuple) and hasattr(item, "headers"):
        return list(item.headers() or [])
    return list(item)


_IN_PLACE = {"tries": 20}


def _message_type() -> Any:
    from confluent_kafka import Message

    return Message


def _header_get_all_address() -> int:
    """rd_kafka_header_get_all of the librdkafka image confluent-kafka loaded (0: not found)."""
    import ctypes

    import confluent_kafka.cimpl as cimpl

    candidates = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and os.path.basename(fields[5]).startswith("librdkafka"):
                    candidates.append(fields[5])
    except OSError:
        pass
    candidates.append(cimpl.__file__ or "")  # librdkafka linked into the extension itself
    for path in dict.fromkeys(candidates):
        try:
            function = ctypes.CDLL(path).rd_kafka_header_get_all
        except (OSError, AttributeError):
            continue
        return int(ctypes.cast(function, ctypes.c_void_p).value or 0)
    return 0


def _try_in_place(first: Any, second: Any) -> None:
    """Turn on reading Message headers in place (compiled check only), proven on the first
    two messages of a chunk; a few chunks are tried, then headers() is used for good."""
    _IN_PLACE["tries"] -= 1
    if not COMPILED:
        _IN_PLACE["tries"] = 0
        return
    address = _header_get_all_address()
    if address and _impl.enable_message_headers(_message_type(), address, first, second):
        _IN_PLACE["tries"] = 0
        log.info("reading Kafka headers in place")
    elif not _IN_PLACE["tries"]:
        log.info("reading Kafka headers through message.headers()")


# ---------------------------------------------------------------- the pipeline's steps


@dataclass
class SignedChunk(Chunk):
    """What Verify hands the parser when it rejected something or keys are bound to
    gateways: the chunk with rejected payloads blanked (so they are not parsed), and what
    Verified needs to put it back together."""

    original: Chunk | None = None
    rejects: list[Reject] = field(default_factory=list)
    gateways: list[str | None] | None = None


class Verify(Terminal[list[Chunk]]):
    """Check each chunk's signatures before parsing (pass-through when signatures are off).

    The keyring is reloaded on :meth:`request_reload` (SIGHUP), between two consume batches, on the
    consumer's thread: a keyring that fails to load leaves the one in force unchanged.
    """

    def __init__(
        self,
        next_step: Step[list[Chunk]],
        verifier: Verifier | None,
        keyring_path: str | None = None,
        env: Mapping[str, str] | None = None,
    ):
        self.next_step = next_step
        self.verifier = verifier
        self.keyring_path = keyring_path
        self.env = env
        self._reload = threading.Event()
        self.reloads = {"ok": 0, "failed": 0}

    @classmethod
    def from_config(
        cls,
        config: Config,
        next_step: Step[list[Chunk]],
        describe: Callable[[Config], Mapping[str, str | None]] | None = None,
    ) -> Verify:
        """The step the daemon runs: loads the keyring, and refuses to start when a topic is
        not known to use LogAppendTime unless allow_create_time is set (ConfigError)."""
        if config.signatures == OFF:
            return cls(next_step, None)
        policy = policy_from_config(config)
        assert config.keyring is not None
        keyring = load_keyring(config.keyring)
        for warning in keyring.warnings:
            log.warning("keyring: %s", warning)
        check_timestamp_types(config, (describe or describe_timestamp_types)(config))
        log.info(
            "signatures %s",
            config.signatures,
            extra={"keys": [k.kid for k in keyring.keys], "allow_create_time": policy.allow_create_time},
        )
        return cls(next_step, Verifier(keyring, policy), config.keyring)

    def submit(self, chunks: list[Chunk]) -> None:
        if self.verifier is None:
            self.next_step.submit(chunks)
            return
        self.next_step.submit([self._check(chunk, self.verifier) for chunk in chunks])

    @staticmethod
    def _check(chunk: Chunk, verifier: Verifier) -> Chunk:
        if not chunk.payloads:
            return chunk
        rejects, gateways = verifier.check(chunk)
        # Nothing downstream reads headers or record times; chunks live in the buffer until
        # the flush, and a few hundred thousand header lists there make every full GC pass
        # slow (measured: about 1 us a message).
        chunk.headers = []
        chunk.timestamps = []
        if not rejects and gateways is None:
            return chunk
        payloads = chunk.payloads
        if rejects:
            payloads = list(payloads)
            for reject in rejects:
                payloads[reject.message_index] = None
        return SignedChunk(
            chunk.topic,
            chunk.partition,
            payloads,
            chunk.offsets,
            chunk.arrival_ms,
            original=chunk,
            rejects=rejects,
            gateways=gateways,
        )

    def request_reload(self) -> None:
        """Ask for a keyring reload at the next poll (safe to call from a signal handler)."""
        self._reload.set()

    def poll(self) -> None:
        if self._reload.is_set():
            self._reload.clear()
            self.reload()

    def reload(self) -> bool:
        """Load the keyring file again; keep the one in force if the new one is invalid."""
        if self.verifier is None or self.keyring_path is None:
            return False
        try:
            keyring = load_keyring(self.keyring_path, env=self.env)
            verifier = Verifier(keyring, self.verifier.policy)
        except (KeyringError, OSError) as error:
            self.reloads["failed"] += 1
            log.error("keyring reload failed; the keyring in force stays", extra={"error": str(error)})
            return False
        for warning in keyring.warnings:
            log.warning("keyring: %s", warning)
        self.verifier = verifier
        self.reloads["ok"] += 1
        log.info("keyring reloaded", extra={"keys": [k.kid for k in keyring.keys]})
        return True


class Verified(Terminal[Rows]):
    """After parsing: put back the messages Verify rejected (as whole-message DLQ rows, in
    place of the parser's reject of their blanked payload), then move events whose
    `client` does not carry the gateway their key is bound to into the DLQ."""

    def __init__(self, next_step: Step[Rows]):
        self.next_step = next_step

    def submit(self, rows: Rows) -> None:
        chunk = rows.chunk
        if not isinstance(chunk, SignedChunk) or chunk.original is None:
            self.next_step.submit(rows)
            return
        original = chunk.original
        dlq = rows.dlq
        if chunk.rejects:
            blanked = pa.array(sorted({original.offsets[r.message_index] for r in chunk.rejects}), pa.int64())
            dlq = dlq.filter(pc.invert(pc.is_in(dlq.column("kafka_offset"), value_set=blanked)))
            ours = dlq_table(original, chunk.rejects)
            whole = [original.payloads[r.message_index] or b"" for r in chunk.rejects]
            index = ours.schema.get_field_index("raw")
            ours = ours.set_column(index, ours.schema.field(index), pa.array(whole, pa.binary()))
            dlq = pa.concat_tables([dlq, ours])
        merged = Rows(original, rows.events, dlq, rows.origin, rows.lines)
        if chunk.gateways is not None and merged.events.num_rows:
            merged = _check_gateways(merged, chunk.gateways)
        self.next_step.submit(merged)


def gateway_matches(client: str | None, gateway: str) -> bool:
    """An event carries gateway G when its client is G or starts with "G/" (e.g. G/2.3)."""
    return client is not None and (client == gateway or client.startswith(gateway + "/"))


def _check_gateways(rows: Rows, gateways: list[str | None]) -> Rows:
    required = pc.take(pa.array(gateways, pa.string()), rows.origin)
    client = rows.events.column("client").combine_chunks()
    head = pc.list_element(pc.split_pattern(client, "/", max_splits=1), 0)
    ok = pc.or_kleene(
        pc.is_null(required), pc.or_kleene(pc.equal(client, required), pc.equal(head, required))
    )
    bad = pc.invert(pc.fill_null(ok, False))
    if not pc.any(bad).as_py():
        return rows
    details = [
        f"gateway mismatch: the signing key is bound to gateway {gw!r}; the event's client is {c!r}"
        for gw, c in zip(
            pc.filter(required, bad).to_pylist(), pc.filter(client, bad).to_pylist(), strict=True
        )
    ]
    return rows.reject(bad, R.BAD_SIGNATURE, details)


# ---------------------------------------------------------------- configuration and start


def policy_from_config(config: Config) -> Policy:
    return Policy(
        mode=config.signatures,
        allow_create_time=config.allow_create_time,
        max_delay_ms=int(config.signature_max_delay_s * 1000),
    )


def describe_timestamp_types(config: Config, timeout_s: float = 5.0) -> dict[str, str | None]:
    """Each topic's message.timestamp.type as the broker describes it (None: not reported,
    or the broker did not answer in time)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

    settings = {
        k: v for k, v in config.consumer_settings().items() if not k.startswith(("group.", "enable."))
    }
    admin_settings = {"bootstrap.servers": settings["bootstrap.servers"]}
    admin_settings.update({k: v for k, v in settings.items() if k.startswith(("security.", "sasl.", "ssl."))})
    admin = AdminClient(admin_settings)
    out: dict[str, str | None] = {}
    resources = [ConfigResource(ResourceType.TOPIC, topic) for topic in config.topic]
    try:
        futures = admin.describe_configs(resources, request_timeout=timeout_s)
    except KafkaException:
        return dict.fromkeys(config.topic)
    for resource, future in futures.items():
        try:
            entries = future.result(timeout=timeout_s + 1)
            entry = entries.get("message.timestamp.type")
            out[resource.name] = entry.value if entry is not None else None
        except (KafkaException, TimeoutError, Exception):
            out[resource.name] = None
    return {topic: out.get(topic) for topic in config.topic}


def check_timestamp_types(config: Config, types: Mapping[str, str | None]) -> None:
    """Report each topic's timestamp type; refuse to check signatures against producer
    time unless allow_create_time says so (a ConfigError the daemon exits with)."""
    from meter.config import ConfigError

    for topic in config.topic:
        log.info(
            "topic timestamp type", extra={"topic": topic, "timestamp_type": types.get(topic) or "unknown"}
        )
    weak = {t: k for t, k in types.items() if k != "LogAppendTime"}
    if weak and not config.allow_create_time:
        listed = ", ".join(f"{t} ({k or 'not reported'})" for t, k in sorted(weak.items()))
        raise ConfigError(
            f"signatures={config.signatures}: topic(s) {listed} do not use LogAppendTime, so records "
            "carry no broker time to check signatures against. Set the topic's "
            "message.timestamp.type=LogAppendTime, or set allow_create_time to check against "
            "this daemon's arrival clock (a re-read after max delay then fails as stale)"
        )
    if weak:
        log.warning(
            "checking signatures against the arrival clock (allow_create_time)",
            extra={"topics": sorted(weak)},
        )


def install_reload_signal(verify: Verify) -> None:
    """SIGHUP reloads the keyring (main thread only; the reload itself runs on poll)."""
    if verify.verifier is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, lambda _signum, _frame: verify.request_reload())
