"""Seeded usage-event mixes: the exact bytes that benchmarks, tests and `meter gen` send.

A throughput figure only means something if the load looks like a real LLM gateway's
(a few heavy users among many, a dozen models, cache-heavy token counts, ~330-byte events)
and is the same bytes on every run, so one seed reproduces a stream exactly.

Kinds:
  reference  orjson-encoded events in a fixed key order, as a gateway emits them
  escape     non-ASCII names, `\\uXXXX` escapes (surrogate pairs too), `\\"`, `\\\\`, `\\/`
  shuffled   the reference content with the key order shuffled per event

The population (users, their teams, orgs, favourite model and client) does not depend on
the seed, so several generators with different seeds meter the same users.
"""

from __future__ import annotations

import base64
import bisect
import functools
import itertools
import math
import random
import time
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import orjson

from meter import reasons as R
from meter.schema import MAX_DEPTH, MAX_MESSAGE_BYTES, TOKEN_COLUMNS

KINDS: tuple[str, ...] = ("reference", "escape", "shuffled")

N_USERS = 50_000
N_TEAMS = 300
#: Zipf exponent of user activity: the busiest user sends ~5% of events.
ZIPF_S = 0.9


class Model(NamedTuple):
    """A model id as gateways report it; `weight` is its share of traffic."""

    name: str
    provider: str
    weight: float
    reasoning: bool


MODELS: tuple[Model, ...] = (
    Model("claude-sonnet-4-5", "anthropic", 22, False),
    Model("claude-opus-4-1", "anthropic", 4, False),
    Model("claude-haiku-4-5", "anthropic", 9, False),
    Model("claude-sonnet-4", "anthropic", 6, False),
    Model("gpt-5", "openai", 12, True),
    Model("gpt-5-mini", "openai", 10, True),
    Model("gpt-4.1", "openai", 6, False),
    Model("gpt-4o-mini", "openai", 8, False),
    Model("o3", "openai", 3, True),
    Model("o4-mini", "openai", 3, True),
    Model("gemini-2.5-pro", "google", 8, True),
    Model("gemini-2.5-flash", "google", 9, True),
)
CLIENTS: tuple[str, ...] = ("ide", "cli", "web", "batch-job")
_CLIENT_WEIGHTS = (45, 25, 20, 10)
ORGS: tuple[str, ...] = (
    "acme", "globex", "initech", "umbrella", "hooli",
    "stark", "wayne", "tyrell", "cyberdyne", "soylent",
)  # fmt: skip
#: Share of teams per org, cumulative: org sizes are skewed too.
_ORG_SHARES = (0.30, 0.50, 0.62, 0.72, 0.80, 0.86, 0.91, 0.95, 0.98, 1.0)
_DEPTS = ("platform", "search", "ml", "infra", "mobile", "web", "data", "security", "growth", "ads")

# Escape-mix vocabulary: several scripts, astral characters, quotes, backslashes and slashes.
_FIRST = (
    "José", "Zoë", "François", "Łukasz", "Søren", "Ångela", "Björk", "Çağrı", "Đorđe", "Ивана",
    "Γιώργος", "太郎", "美咲", "伟", "민준", "Ngọc", "Ümit", "Renée", "Nuño", "Dvořák",
)  # fmt: skip
_LAST = (
    "Müller", "Gonçalves", "Øster", "田中", "王", "김", "Nguyễn", "Šimůnek", "Петров",
    "Παπαδόπουλος", "李", "D'Amico", "Ó Briain", "Jäätteenmäki", "O\"Neil", "Straße",
)  # fmt: skip
_TEAM_WORDS = (
    'Équipe "Rouge"', "R&D \\ 研究開発", "Plateforme/Données", "基盤チーム", 'Ops \\ Infra "prod"',
    "Ciência de Dados", "Fórmula ✨ Labs", "🚀 Launch", "Поиск", "데이터 플랫폼", "Ωmega\\Core",
)  # fmt: skip
_ORG_NAMES = (
    "Acme Ürün A.Ş.", "株式会社ミライ", "Globex Größe GmbH", "Initech «Nord»", "Umbrella 🌂 Inc",
    "Hooli/Øst", 'Stark "Industries"', "Wayne\\Enterprises", "Тайрелл", "Soylent Ñ S.A.",
)  # fmt: skip

_CROCKFORD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", b"0123456789ABCDEFGHJKMNPQRSTVWXYZ")
_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_HEX = "0123456789abcdef"


class _Profile(NamedTuple):
    user: str
    team: str
    org: str
    model: int
    client: str


def _hash(k: int, salt: int) -> int:
    """splitmix64 finaliser: a stable per-user draw that no seed can move."""
    z = (k * 0x9E3779B97F4A7C15 + salt) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def _weighted(weights: Iterable[float]) -> list[float]:
    """Cumulative weights normalised to 1, for `bisect` draws."""
    cumulative = list(itertools.accumulate(weights))
    return [c / cumulative[-1] for c in cumulative]


_MODEL_CUM = _weighted(m.weight for m in MODELS)
_CLIENT_CUM = _weighted(_CLIENT_WEIGHTS)
_USER_CUM = _weighted(1.0 / (rank + 1) ** ZIPF_S for rank in range(N_USERS))


@functools.cache
def _population(escape: bool) -> tuple[_Profile, ...]:
    """Users by activity rank; the busiest are scattered over ids, teams and orgs."""
    profiles = []
    for rank in range(N_USERS):
        k = (rank * 7919) % N_USERS
        team = _hash(k, 1) % N_TEAMS
        org = bisect.bisect_right(_ORG_SHARES, team / N_TEAMS)
        if escape:
            first, last = _FIRST[_hash(k, 2) % len(_FIRST)], _LAST[_hash(k, 3) % len(_LAST)]
            user = f"{first} {last} #{k:05d}"
            team_name = f"{_TEAM_WORDS[team % len(_TEAM_WORDS)]} {team:03d}"
            org_name = _ORG_NAMES[org]
        else:
            user = f"u{k:05d}"
            team_name = f"{ORGS[org]}-{_DEPTS[team % len(_DEPTS)]}-{team:03d}"
            org_name = ORGS[org]
        model = bisect.bisect_right(_MODEL_CUM, _hash(k, 4) / 2**64)
        client = CLIENTS[bisect.bisect_right(_CLIENT_CUM, _hash(k, 5) / 2**64)]
        profiles.append(_Profile(user, team_name, org_name, model, client))
    return tuple(profiles)


def ulid(ms: int, randomness: int) -> str:
    """A ULID: 48-bit milliseconds then 80 random bits, 26 chars of Crockford base32."""
    value = (ms << 80) | randomness
    # Two zero bits in front make 130 bits = 26 base32 digits; RFC 4648 base32 then
    # translates digit for digit into Crockford's alphabet.
    return base64.b32encode((value << 6).to_bytes(17, "big"))[:26].translate(_CROCKFORD).decode()


def rfc3339_ms(ms: int) -> str:
    """UTC epoch milliseconds as RFC 3339 with milliseconds and Z."""
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _lognormal(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return min(high, max(low, int(rng.lognormvariate(math.log(median), sigma))))


def _json_string(text: str) -> str:
    """A JSON string literal that escapes every other non-ASCII char as `\\uXXXX`.

    Raw UTF-8 and escapes both appear, upper- and lower-case hex, surrogate pairs for
    astral chars; `/` is escaped too, which JSON allows and few encoders do.
    """
    out = ['"']
    for i, ch in enumerate(text):
        code = ord(ch)
        if ch in '"\\/':
            out.append("\\" + ch)
        elif code < 0x80 or i % 2 == 0:
            out.append(ch)
        elif code > 0xFFFF:
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04X}\\u{0xDC00 + (code & 0x3FF):04X}")
        else:
            out.append(f"\\u{code:04x}")
    out.append('"')
    return "".join(out)


@functools.lru_cache(maxsize=1 << 17)
def _json_string_cached(text: str) -> str:
    return _json_string(text)


def _json_value(value: Any) -> str:
    if isinstance(value, int):
        return str(value)
    if value.isascii() and not any(c in value for c in '"\\/'):
        return f'"{value}"'
    return _json_string_cached(value)


class Mix:
    """A seeded stream of usage events of one kind.

    The stream continues across calls (ids never repeat within one Mix); each call to
    `events(n)` spreads its n events over [start_ms, start_ms + span_ms) in time order.
    `start_ms=None` means the span that ends now: pass it for byte-identical output.
    """

    def __init__(
        self,
        seed: int,
        kind: str = "reference",
        start_ms: int | None = None,
        span_ms: int = 3600_000,
    ):
        if kind not in KINDS:
            raise ValueError(f"unknown mix kind {kind!r}; expected one of {', '.join(KINDS)}")
        if span_ms < 1:
            raise ValueError("span_ms must be positive")
        self.seed = seed
        self.kind = kind
        self.span_ms = span_ms
        self.start_ms = time.time_ns() // 1_000_000 - span_ms if start_ms is None else start_ms
        self._rng = random.Random(seed)
        self._profiles = _population(kind == "escape")
        self._recent_hashes: list[str] = []
        self._last_ms = -1
        self._last_rand = 0

    def _event_id(self, ms: int) -> str:
        """Monotonic ULIDs: within one millisecond the random part counts up."""
        if ms == self._last_ms:
            self._last_rand = (self._last_rand + 1) & ((1 << 80) - 1)
        else:
            self._last_ms, self._last_rand = ms, self._rng.getrandbits(80)
        return ulid(ms, self._last_rand)

    def _request_id(self, provider: str) -> str:
        rng = self._rng
        if provider == "anthropic":
            return "req_011C" + "".join(rng.choices(_BASE58, k=18))
        if provider == "openai":
            return "req_" + "".join(rng.choices(_HEX, k=24))
        if self.kind == "escape":
            return f"projects/p{rng.randrange(10**6)}/locations/us-central1/r/{rng.getrandbits(48):x}"
        return "".join(rng.choices(_BASE58, k=22))

    def _prompt_hash(self) -> str:
        """A 64-bit digest; one request in ten repeats a recent prompt."""
        recent, rng = self._recent_hashes, self._rng
        if recent and rng.random() < 0.1:
            return rng.choice(recent)
        digest = f"{rng.getrandbits(64):016x}"
        if len(recent) < 256:
            recent.append(digest)
        else:
            recent[rng.randrange(256)] = digest
        return digest

    def events(self, n: int) -> Iterator[dict[str, Any]]:
        """n events as dicts; optional token counts that are 0 are left out, as gateways do."""
        rng = self._rng
        end = self.start_ms + self.span_ms - 1
        clock = 0.0
        rate = n / self.span_ms
        ts_second, ts_prefix = -1, ""
        for _ in range(n):
            clock += rng.expovariate(rate)
            ms = min(self.start_ms + int(clock), end)
            seconds, millis = divmod(ms, 1000)
            if seconds != ts_second:
                ts_second, ts_prefix = seconds, rfc3339_ms(seconds * 1000)[:-5]
            profile = self._profiles[bisect.bisect_right(_USER_CUM, rng.random())]
            model = MODELS[
                profile.model if rng.random() < 0.7 else bisect.bisect_right(_MODEL_CUM, rng.random())
            ]
            client = (
                profile.client
                if rng.random() < 0.85
                else CLIENTS[bisect.bisect_right(_CLIENT_CUM, rng.random())]
            )
            output = _lognormal(rng, 500 if model.reasoning else 300, 1.0, 10, 4_000)
            event: dict[str, Any] = {
                "event_id": self._event_id(ms),
                "ts": f"{ts_prefix}.{millis:03d}Z",
                "user": profile.user,
                "team": profile.team,
                "org": profile.org,
                "model": model.name,
                "provider": model.provider,
                "client": client,
                "request_id": self._request_id(model.provider),
                "prompt_hash": self._prompt_hash(),
                "input_tokens": _lognormal(rng, 1_800, 1.3, 100, 50_000),
                "output_tokens": output,
            }
            if rng.random() < 0.6:
                event["cache_read_tokens"] = _lognormal(rng, 12_000, 1.2, 1, 200_000)
            if model.provider == "anthropic":
                if rng.random() < 0.2:
                    event["cache_write_tokens"] = _lognormal(rng, 3_000, 1.0, 1, 100_000)
                if rng.random() < 0.03:
                    event["cache_write_1h_tokens"] = _lognormal(rng, 8_000, 1.0, 1, 100_000)
            if model.reasoning:
                event["reasoning_tokens"] = int(output * rng.uniform(0.2, 0.85))
            if self.kind == "shuffled":
                keys = list(event)
                rng.shuffle(keys)
                event = {key: event[key] for key in keys}
            yield event

    def encode(self, event: dict[str, Any]) -> bytes:
        """One event as exact JSON bytes, in the dict's key order."""
        if self.kind == "escape":
            body = ",".join(f'"{key}":{_json_value(value)}' for key, value in event.items())
            return ("{" + body + "}").encode("utf-8")
        return orjson.dumps(event)

    def messages(self, n_events: int, per_message: int = 1) -> Iterator[bytes]:
        """Kafka message values: `per_message` events each as NDJSON (the last may hold fewer)."""
        if per_message < 1:
            raise ValueError("per_message must be at least 1")
        encoded = map(self.encode, self.events(n_events))
        if per_message == 1:
            yield from encoded
            return
        while chunk := list(itertools.islice(encoded, per_message)):
            yield b"\n".join(chunk)


def totals(events: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Event count and the sum of every token bucket: what the lake must end up holding."""
    sums = dict.fromkeys(("events", *TOKEN_COLUMNS), 0)
    for event in events:
        sums["events"] += 1
        for name in TOKEN_COLUMNS:
            sums[name] += event.get(name) or 0
    return sums


# --- invalid events, one family per parser reason code ---------------------------------

_Pairs = list[tuple[str, bytes]]


def _join(pairs: _Pairs) -> bytes:
    return b"{" + b",".join(b'"' + key.encode() + b'":' + raw for key, raw in pairs) + b"}"


def _replace(pairs: _Pairs, key: str, raw: bytes | None) -> _Pairs:
    """The pairs with `key`'s raw value replaced (added at the end if absent), or dropped."""
    out = [(k, v) for k, v in pairs if k != key]
    if raw is not None:
        index = next((i for i, (k, _) in enumerate(pairs) if k == key), len(out))
        out.insert(index, (key, raw))
    return out


def _string_raw(text: str) -> bytes:
    return b'"' + text.encode() + b'"'


_REQUIRED = ("event_id", "ts", "user", "model", "input_tokens", "output_tokens")
_STRINGS = ("event_id", "user", "team", "org", "model", "provider", "client", "request_id")
_DAY_MS = 86_400_000


def _invalid_json(pairs: _Pairs, rng: random.Random, now_ms: int) -> bytes:
    doc = _join(pairs)
    return rng.choice(
        (
            doc[: rng.randrange(1, len(doc))],
            doc[:-1] + b",}",
            doc + doc,
            doc.replace(b'"user":', b"'user':"),
            _join(_replace(pairs, "input_tokens", rng.choice((b"NaN", b"007", b"+5", b"1.", b".5")))),
            _join(_replace(pairs, "user", b'"unterminated')),
            _join(_replace(pairs, "team", b'"bad \\x escape"')),
        )
    )


def _invalid_utf8(pairs: _Pairs, rng: random.Random, now_ms: int) -> bytes:
    bad = rng.choice(
        (
            b"\xff",
            b"\xc0\xaf",
            b"\xed\xa0\x80",
            b"\xe6\x97",
            b"\\ud800",
            b"\\udc00",
            b"\\ud83d\\u0041",
        )
    )
    return _join(_replace(pairs, "user", b'"alice' + bad + b'"'))


def _not_object(pairs: _Pairs, rng: random.Random, now_ms: int) -> bytes:
    doc = _join(pairs)
    return rng.choice((b"[" + doc + b"]", b'"event"', b"42", b"null", b"true", b"[]"))


def _missing_field(pairs: _Pairs, rng: random.Random, now_ms: int) -> bytes:
    return _join(_replace(pairs, rng.choice(_REQUIRED), rng.choice((None, b"null"))))


def _wrong_type(pairs: _Pairs, rng: random.Random, now_ms: int) -> bytes:
    if rng.random() < 0.5:
        field = rng.choice(TOKEN_COLUMNS)
        raw = rng.choice((b'"123"', b"1.0", b"1e3", b"true", b"[1]", b'{"n":1}', b"-0.0"))
    else:
        field = rng.choice((*_STRINGS, "ts"))
        raws = (b"false", b"[]", b"{}", b"1.5") if field == "ts" else (b"42", b"false", b"[]", b"{}")
        raw = rng.choice(raws)
    return _join(_replace(pairs, field, raw))


def _out_of_range(pairs: _Pairs, rng: random.Random, now_ms: int) -> bytes:
    if rng.random() < 0.25:
        output = rng.randrange(0, 1000)
        pairs = _replace(pairs, "output_tokens", str(output).encode())
        return _join(_replace(pairs, "reasoning_tokens", str(output + 1).encode()))
    value = rng.choice((-1, 1_000_000_001, -(2**64), 2**70, 10**40))
    return _join(_replace(pairs, rng.choice(TOKEN_COLUMNS), str(value).encode()))


def _invalid_value(pairs: _Pairs, rng: random.Random, now_ms: int) -> bytes:
    field, raw = rng.choice(
        (
            ("event_id", b'"01 AB"'),
            ("event_id", b'"evt/1"'),
            ("event_id", b'"\\u00e9v\\u00e9nement"'),
            ("event_id", _string_raw("e" * 65)),
            ("user", b'""'),
            ("user", _string_raw("u" * 129)),
            ("user", b'"tab\\there"'),
            ("team", b'"nul\\u0000"'),
            ("org", b'"del\\u007f"'),
            ("client", b'"c1\\u0085"'),
            ("model", _string_raw("é" * 65)),
        )
    )
    return _join(_replace(pairs, field, raw))


def _invalid_timestamp(pairs: _Pairs, rng: random.Random, now_ms: int) -> bytes:
    raw = rng.choice(
        (
            b'"2025-13-01T00:00:00Z"',
            b'"2025-02-30T12:00:00Z"',
            b'"2025-11-29T24:00:00Z"',
            b'"2025-11-29 04:56:12Z"',
            b'"2025-11-29T04:56:12"',
            b'"2025-11-29T04:56Z"',
            b'"2025-11-29T04:56:12.1234567890Z"',
            b'"2025-11-29T04:56:12+2:00"',
            b'"yesterday"',
            b'""',
            str(2**63).encode(),
        )
    )
    return _join(_replace(pairs, "ts", raw))


def _timestamp_out_of_range(pairs: _Pairs, rng: random.Random, now_ms: int) -> bytes:
    if rng.random() < 0.5:
        ms = now_ms - 40 * _DAY_MS - rng.randrange(_DAY_MS)
    else:
        ms = now_ms + 3_600_000 + rng.randrange(_DAY_MS)
    raw = _string_raw(rfc3339_ms(ms)) if rng.random() < 0.7 else str(ms).encode()
    return _join(_replace(pairs, "ts", raw))


def _duplicate_field(pairs: _Pairs, rng: random.Random, now_ms: int) -> bytes:
    choice = rng.randrange(4)
    if choice == 0:
        key, raw = rng.choice(pairs)
        return _join([*pairs, (key, raw)])
    if choice == 1:
        return _join([("input_tokens", b"1"), *pairs])
    if choice == 2:
        return _join([*pairs, ("us\\u0065r", b'"mallory"')])
    return _join([*pairs, ("meta", b'{"k":1,"k":2}')])


def _too_large(pairs: _Pairs, rng: random.Random, now_ms: int) -> bytes:
    padding = b"x" * (MAX_MESSAGE_BYTES + rng.randrange(1, 4096))
    return _join([*pairs, ("padding", b'"' + padding + b'"')])


def _too_deep(pairs: _Pairs, rng: random.Random, now_ms: int) -> bytes:
    depth = rng.randrange(MAX_DEPTH + 1, 4 * MAX_DEPTH)
    if rng.random() < 0.5:
        nested = b"[" * depth + b"]" * depth
    else:
        nested = b'{"a":' * depth + b"1" + b"}" * depth
    return _join([*pairs, ("extra", nested)])


_BAD = {
    R.INVALID_JSON: _invalid_json,
    R.INVALID_UTF8: _invalid_utf8,
    R.NOT_OBJECT: _not_object,
    R.MISSING_FIELD: _missing_field,
    R.WRONG_TYPE: _wrong_type,
    R.OUT_OF_RANGE: _out_of_range,
    R.INVALID_VALUE: _invalid_value,
    R.INVALID_TIMESTAMP: _invalid_timestamp,
    R.TIMESTAMP_OUT_OF_RANGE: _timestamp_out_of_range,
    R.DUPLICATE_FIELD: _duplicate_field,
    R.TOO_LARGE: _too_large,
    R.TOO_DEEP: _too_deep,
}


def bad_event(reason: str, rng: random.Random, now_ms: int | None = None) -> bytes:
    """One message the parser must reject with exactly `reason` (a PARSER_REASONS code).

    It starts from a valid reference event stamped within the 10 minutes before `now_ms`
    (default: the wall clock) and breaks one thing, picked by `rng` among several ways.
    """
    if reason not in _BAD:
        raise ValueError(f"no bad-event family for reason {reason!r}")
    if now_ms is None:
        now_ms = time.time_ns() // 1_000_000
    mix = Mix(rng.getrandbits(64), start_ms=now_ms - 600_000, span_ms=600_000)
    event = next(mix.events(1))
    event.setdefault("reasoning_tokens", 0)
    pairs = [(key, orjson.dumps(value)) for key, value in event.items()]
    return _BAD[reason](pairs, rng, now_ms)
