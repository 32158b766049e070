"""Pure-Python twin of the compiled signature check (ext/_verify.pyx): the readable
statement of the contract, used when METER_PURE_PYTHON=1 or the extension is not built.

For each message the checks run in this order, and the first that fails gives the code:

1. headers: none of meter-kid/meter-ts/meter-sig -> no_headers; one of them twice ->
   duplicate; one missing -> missing (arg: 0 kid, 1 ts, 2 sig);
2. meter-kid is 1-64 bytes of [A-Za-z0-9._-] (bad_kid); meter-ts is 1-15 ASCII digits of
   epoch milliseconds (bad_ts); meter-sig is non-empty (bad_sig);
3. the key id is in the keyring (unknown_key); the signature's length fits the key's
   algorithm, 32 bytes for hmac-sha256, 64 for ed25519 (alg_mismatch, arg: length); the key
   admits the record's topic (wrong_topic);
4. the time checked: the record's timestamp when its type is LogAppendTime, else the
   arrival clock when create time is allowed, else no_broker_time (arg: timestamp type);
5. against that time: revoked (>= revoked_at), not_yet_valid (< not_before), expired
   (>= not_after), stale (time - meter-ts > max delay), future (meter-ts - time > max future);
6. the signature: HMAC-SHA256 compared in constant time (bad_mac), or ed25519 for the
   caller to verify.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from collections.abc import Sequence

CODES = (
    "ok",
    "no_headers",
    "missing",
    "duplicate",
    "bad_kid",
    "bad_ts",
    "bad_sig",
    "unknown_key",
    "alg_mismatch",
    "wrong_topic",
    "no_broker_time",
    "revoked",
    "not_yet_valid",
    "expired",
    "stale",
    "future",
    "bad_mac",
    "ed25519",
)
HEADERS = ("meter-kid", "meter-ts", "meter-sig")
SHANI = False
DEBUG = False

(
    C_OK,
    C_NO_HEADERS,
    C_MISSING,
    C_DUPLICATE,
    C_BAD_KID,
    C_BAD_TS,
    C_BAD_SIG,
    C_UNKNOWN_KEY,
    C_ALG_MISMATCH,
    C_WRONG_TOPIC,
    C_NO_BROKER_TIME,
    C_REVOKED,
    C_NOT_YET_VALID,
    C_EXPIRED,
    C_STALE,
    C_FUTURE,
    C_BAD_MAC,
    C_ED25519,
) = range(len(CODES))
ALG_HMAC, ALG_ED25519 = 0, 1
TS_LOG_APPEND_TIME = 2
_KID = re.compile(rb"[A-Za-z0-9._-]{1,64}")
_TS = re.compile(rb"[0-9]{1,15}")
_INDEX = {name: i for i, name in enumerate(HEADERS)}


def select_backend(shani: bool) -> bool:
    return False


def enable_message_headers(message_type: object, header_get_all: int, first: object, second: object) -> bool:
    return False


def message_headers_in_place() -> bool:
    return False


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def signature_base(kid: bytes, ts: bytes, topic: bytes, value: bytes) -> bytes:
    """DESIGN 8: what a signature covers, the raw value bytes last."""
    return b"meter-sig-v1\n" + kid + b"\n" + ts + b"\n" + topic + b"\n" + value


class Verdicts:
    """Per message: a code (index into CODES), its integer argument, the keyring slot (-1 if none)."""

    __slots__ = ("args", "codes", "slots")

    def __init__(self, codes: bytes, args: bytes, slots: bytes):
        self.codes = codes
        self.args = args
        self.slots = slots


class Table:
    """A keyring compiled for checking: see the compiled Table for the arguments."""

    def __init__(
        self,
        kids: Sequence[bytes],
        algs: Sequence[int],
        windows: Sequence[tuple[int, int, int]],
        secrets: Sequence[bytes | None],
        topics: Sequence[frozenset[str] | None],
    ):
        if not len(kids) == len(algs) == len(windows) == len(secrets) == len(topics):
            raise ValueError("keyring columns differ in length")
        self._slots: dict[bytes, int] = {}
        for slot, kid in enumerate(kids):
            if not isinstance(kid, bytes):
                raise TypeError("kid must be bytes")
            if kid in self._slots:
                raise ValueError(f"kid {kid.decode(errors='replace')!r} occurs twice")
            self._slots[kid] = slot
        self._algs = [ALG_ED25519 if a == ALG_ED25519 else ALG_HMAC for a in algs]
        self._windows = [tuple(w) for w in windows]
        self._secrets = [s if a == ALG_HMAC else None for s, a in zip(secrets, self._algs, strict=True)]
        self._topics = list(topics)

    def __len__(self) -> int:
        return len(self._slots)

    def slot(self, kid: bytes) -> int:
        return self._slots.get(kid, -1)

    def check(
        self,
        payloads: Sequence[bytes | None],
        headers: Sequence[Sequence[tuple[str, bytes | None]] | None],
        timestamps: Sequence[tuple[int, int]],
        topic: str,
        arrival_ms: int,
        allow_create_time: bool,
        max_delay_ms: int,
        max_future_ms: int,
    ) -> Verdicts:
        if not len(payloads) == len(headers) == len(timestamps):
            raise ValueError("payloads, headers and timestamps differ in length")
        codes, args, slots = [], [], []
        for value, heads, stamp in zip(payloads, headers, timestamps, strict=True):
            code, arg, slot = self._one(
                value, heads, stamp, topic, arrival_ms, allow_create_time, max_delay_ms, max_future_ms
            )
            codes.append(code)
            args.append(arg)
            slots.append(slot)
        n = len(codes)
        return Verdicts(bytes(codes), struct.pack(f"={n}q", *args), struct.pack(f"={n}i", *slots))

    def _one(
        self,
        value: bytes | None,
        heads: Sequence[tuple[str, bytes | None]] | None,
        stamp: tuple[int, int],
        topic: str,
        arrival_ms: int,
        allow_create_time: bool,
        max_delay_ms: int,
        max_future_ms: int,
    ) -> tuple[int, int, int]:
        if heads is not None and not isinstance(heads, list | tuple) and hasattr(heads, "headers"):
            heads = heads.headers()  # a consumed confluent-kafka Message
        count = [0, 0, 0]
        found: list[object] = [None, None, None]
        for header in heads or ():
            if isinstance(header, tuple) and len(header) == 2 and header[0] in _INDEX:
                which = _INDEX[header[0]]
                count[which] += 1
                found[which] = header[1]
        if count == [0, 0, 0]:
            return C_NO_HEADERS, 0, -1
        for which in range(3):
            if count[which] > 1:
                return C_DUPLICATE, which, -1
        for which in range(3):
            if count[which] == 0:
                return C_MISSING, which, -1
        kid, ts_text, sig = found
        if not isinstance(kid, bytes) or not _KID.fullmatch(kid):
            return C_BAD_KID, 0, -1
        if not isinstance(ts_text, bytes) or not _TS.fullmatch(ts_text):
            return C_BAD_TS, 0, -1
        if not isinstance(sig, bytes) or not sig:
            return C_BAD_SIG, 0, -1
        slot = self._slots.get(kid, -1)
        if slot < 0:
            return C_UNKNOWN_KEY, 0, -1
        alg = self._algs[slot]
        if len(sig) != (64 if alg == ALG_ED25519 else 32):
            return C_ALG_MISMATCH, len(sig), slot
        allowed = self._topics[slot]
        if allowed is not None and topic not in allowed:
            return C_WRONG_TOPIC, 0, slot
        kind = stamp[0] if isinstance(stamp, tuple) and len(stamp) == 2 else 0
        if kind == TS_LOG_APPEND_TIME:
            when = stamp[1]
        elif allow_create_time:
            when = arrival_ms
        else:
            return C_NO_BROKER_TIME, kind, slot
        ts = int(ts_text)
        not_before, not_after, revoked_at = self._windows[slot]
        if when >= revoked_at:
            return C_REVOKED, when, slot
        if when < not_before:
            return C_NOT_YET_VALID, when, slot
        if when >= not_after:
            return C_EXPIRED, when, slot
        if when - ts > max_delay_ms:
            return C_STALE, when - ts, slot
        if ts - when > max_future_ms:
            return C_FUTURE, ts - when, slot
        if alg == ALG_ED25519:
            return C_ED25519, 0, slot
        secret = self._secrets[slot]
        assert secret is not None
        base = signature_base(kid, ts_text, topic.encode(), value or b"")
        ok = hmac.compare_digest(hmac.new(secret, base, hashlib.sha256).digest(), sig)
        return (C_OK if ok else C_BAD_MAC), 0, slot
