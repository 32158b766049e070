"""Differential fuzz: the compiled parser and the pure-Python reference agree on every input.

Hypothesis builds batches of Kafka payloads from valid-ish events (random subsets of the
fields, random JSON types per field, random key order, unknown fields with nested values,
strings with escapes and non-ASCII) and byte-level mutations of them (truncation, bit
flips, inserted escapes, duplicated keys, deep nesting, invalid UTF-8, inserted newlines).
Both parsers must give equal accepted rows (`batch.equals`), equal message indexes and
equal (message_index, line, reason) rejects.

CI runs a fixed, derandomized budget; METER_FUZZ_EXAMPLES=N runs N random examples
instead (failures are then kept in the local Hypothesis database and replayed first).
A compiled parser that does not import fails the differential test unless
METER_PURE_PYTHON=1, where it is skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest
from corpus import FAR, IMPLEMENTATIONS, NOW, load_parse_batch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter.schema import (
    DEFAULT_LATENESS_MS,
    FIELD_ORDER,
    MAX_FUTURE_MS,
    MAX_MESSAGE_BYTES,
    STRING_FIELDS,
    TOKEN_COLUMNS,
    TOKEN_MAX,
)

_EXAMPLES = int(os.environ.get("METER_FUZZ_EXAMPLES") or 0)
settings.register_profile(
    "meter-fuzz-ci",
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
settings.register_profile(
    "meter-fuzz-long",
    parent=settings.get_profile("meter-fuzz-ci"),
    max_examples=max(_EXAMPLES, 1),
    derandomize=False,
    database=settings.default.database,
)
FUZZ = settings.get_profile("meter-fuzz-long" if _EXAMPLES else "meter-fuzz-ci")

ParseBatch = Callable[..., Any]

# --------------------------------------------------------------------------- JSON text

_SHORT_ESCAPES = {
    '"': b'\\"',
    "\\": b"\\\\",
    "/": b"\\/",
    "\b": b"\\b",
    "\f": b"\\f",
    "\n": b"\\n",
    "\r": b"\\r",
    "\t": b"\\t",
}
_ID_CHARS = "ABCXYZabcxyz0129._:-"
_TRICKY = '"\\/\x00\x01\x1f\x7f\x80\x85\x9f\xa0é€😀\ufeff\ufffd\uffff\U00010000\U0010ffff'
_chars = st.one_of(
    st.characters(codec="utf-8"),
    st.sampled_from(_ID_CHARS),
    st.sampled_from(_TRICKY),
)
_texts = st.one_of(
    st.text(_chars, max_size=12),
    st.text(st.sampled_from(_ID_CHARS), min_size=1, max_size=70),
    # Around the 128-byte limit, in 1- to 4-byte characters.
    st.builds(
        lambda n, tail: "x" * n + tail,
        st.integers(120, 130),
        st.sampled_from(["", "é", "€", "😀", "\x7f"]),
    ),
    st.sampled_from(["", "user", "event_id", "ts", "input_tokens", "reasoning_tokens"]),
)


def _escape_unit(code: int, upper: bool) -> bytes:
    text = f"\\u{code:04X}" if upper else f"\\u{code:04x}"
    return text.encode()


@st.composite
def json_string(draw: st.DrawFn, texts: st.SearchStrategy[str] = _texts) -> bytes:
    """A JSON string literal of a drawn text: characters raw, short-escaped or \\u-escaped
    (lower or upper hex, surrogate pairs beyond the BMP), one style for the whole string
    or, for short strings, one per character."""
    text = draw(texts)
    style = draw(st.integers(0, 4))
    if style == 4 and len(text) <= 16:
        modes = draw(st.lists(st.integers(0, 3), min_size=len(text), max_size=len(text)))
    else:
        modes = [style % 4] * len(text)
    out = [b'"']
    for ch, mode in zip(text, modes, strict=True):
        code = ord(ch)
        if mode == 0 and (ch in '"\\' or code < 0x20):
            mode = 1
        if mode == 0:
            out.append(ch.encode())
        elif mode == 1 and ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        elif code >= 0x10000:
            code -= 0x10000
            out.append(_escape_unit(0xD800 + (code >> 10), mode == 3))
            out.append(_escape_unit(0xDC00 + (code & 0x3FF), mode == 3))
        else:
            out.append(_escape_unit(code, mode == 3))
    out.append(b'"')
    return b"".join(out)


_EDGE_INTS = [
    0,
    1,
    TOKEN_MAX,
    TOKEN_MAX + 1,
    -1,
    2**31,
    2**32,
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    2**64,
    2**64 + 5,
    10**40,
]
_integers = st.one_of(
    st.integers(0, 1000),
    st.sampled_from(_EDGE_INTS),
    st.integers(-(10**25), 10**25),
).map(lambda n: str(n).encode())
_not_integers = st.sampled_from(
    [
        b"-0",
        b"1.0",
        b"0.0",
        b"-0.0",
        b"1e3",
        b"1E+2",
        b"2.5e-3",
        b'"5"',
        b"true",
        b"false",
        b"null",
        b"[]",
        b"{}",
        b"9" * 30,
        b"1e400",
    ]
)
_scalars = st.one_of(
    json_string(),
    _integers,
    _not_integers,
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).encode()),
)


def _array(items: list[bytes]) -> bytes:
    return b"[" + b",".join(items) + b"]"


@st.composite
def _objects(draw: st.DrawFn, values: st.SearchStrategy[bytes]) -> bytes:
    """An object with distinct keys (repeats come from members() and the mutations)."""
    keys = draw(st.lists(_texts, max_size=3, unique=True))
    pairs = [draw(json_string(st.just(k))) + b":" + draw(values) for k in keys]
    return b"{" + b",".join(pairs) + b"}"


json_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3).map(_array), _objects(inner)),
    max_leaves=6,
)

# --------------------------------------------------------------------------- field values

_DAY_MS = 86_400_000


@st.composite
def rfc3339(draw: st.DrawFn, wild: bool) -> bytes:
    """A date-time in the window around NOW: any offset, 0-9 fraction digits. When wild,
    it may also fall outside the window, carry 10 fraction digits, have a component
    pushed out of range or a format slip."""
    low, high = (-40 * _DAY_MS, 2 * MAX_FUTURE_MS) if wild else (-30 * _DAY_MS, MAX_FUTURE_MS)
    instant = NOW + draw(st.integers(low, high))
    offset = draw(st.sampled_from([0, 0, 330, -480, 1439, -1439, 60]))
    local = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=instant + offset * 60_000)
    parts = [local.year, local.month, local.day, local.hour, local.minute, local.second]
    if wild and draw(st.booleans()):
        index = draw(st.integers(0, 5))
        parts[index] = draw(st.sampled_from([0, 2024, 2025, 9999, 13, 24, 29, 30, 31, 32, 60]))
        if index == 0:
            parts[1:3] = [2, draw(st.sampled_from([28, 29, 30]))]
    year, month, day, hour, minute, second = parts
    text = f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}"
    digits = draw(st.integers(0, 10 if wild else 9))
    if digits:
        extra = "0123456789"
        tail = draw(st.text(extra, min_size=max(digits - 3, 0), max_size=max(digits - 3, 0)))
        text += "." + (f"{local.microsecond // 1000:03d}" + tail)[:digits]
    if offset == 0 and draw(st.booleans()):
        text += draw(st.sampled_from(["Z", "Z", "+00:00", "-00:00", *(["z"] if wild else [])]))
    else:
        sign = "-" if offset < 0 else "+"
        text += f"{sign}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"
    if wild and draw(st.booleans()):
        text = text.replace("T", draw(st.sampled_from(["t", " ", "TT"])))
    return draw(json_string(st.just(text)))


def _int_text(low: int, high: int) -> st.SearchStrategy[bytes]:
    return st.integers(low, high).map(lambda n: str(n).encode())


_name_texts = st.text(
    st.one_of(st.characters(codec="utf-8", exclude_categories=["Cc"]), st.sampled_from("é€😀")),
    min_size=1,
    max_size=24,
)
#: Per field: a value the contract accepts, and anything else that field may be sent.
_VALID: dict[str, st.SearchStrategy[bytes]] = {
    "event_id": json_string(st.text(st.sampled_from(_ID_CHARS), min_size=1, max_size=64)),
    "ts": st.one_of(rfc3339(wild=False), _int_text(NOW - 30 * _DAY_MS, NOW + MAX_FUTURE_MS)),
    "input_tokens": _int_text(0, 5000),
    "output_tokens": _int_text(100, 5000),
    "cache_read_tokens": _int_text(0, 5000),
    "cache_write_tokens": _int_text(0, 5000),
    "cache_write_1h_tokens": _int_text(0, 5000),
    "reasoning_tokens": _int_text(0, 100),
}
_WILD: dict[str, st.SearchStrategy[bytes]] = {
    "event_id": json_string(),
    "ts": st.one_of(
        rfc3339(wild=True),
        _int_text(NOW - 40 * _DAY_MS, NOW + 2 * MAX_FUTURE_MS),
        _integers,
        _not_integers,
        json_string(),
    ),
}
for _name in FIELD_ORDER:
    if _name in TOKEN_COLUMNS:
        _WILD[_name] = st.one_of(_integers, _not_integers)
    elif _name not in _VALID:
        _VALID[_name] = json_string(_name_texts)
        _WILD[_name] = json_string()
_REQUIRED = frozenset(("event_id", "ts", "user", "model", "input_tokens", "output_tokens"))


def _key(name: str) -> bytes:
    return b'"' + name.encode() + b'"'


@st.composite
def members(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """An event's members in random order. A clean event has every required field and
    valid values; otherwise fields go missing, take wild values or any JSON value, a key
    may repeat (maybe spelled with escapes) and nesting goes around the 64-level limit."""
    clean = draw(st.integers(0, 2)) == 0
    out = []
    for name in FIELD_ORDER:
        required = name in _REQUIRED
        if not (clean and required) and draw(st.integers(0, 29 if required else 1)) == 0:
            continue
        pick = 0 if clean else draw(st.integers(0, 19))
        if pick < 14:
            value = draw(_VALID[name])
        elif pick < 19:
            value = draw(_WILD[name])
        else:
            value = draw(st.one_of(st.just(b"null"), json_values))
        out.append((_key(name), value))
    unknown = draw(st.lists(st.tuples(_texts, json_values), max_size=2, unique_by=lambda m: m[0]))
    known = set(FIELD_ORDER)
    for text, value in unknown:
        if text not in known:
            out.append((draw(json_string(st.just(text))), value))
    if not clean and out and draw(st.integers(0, 14)) == 0:
        key, _ = draw(st.sampled_from(out))
        if draw(st.booleans()):
            key = b'"' + b"".join(_escape_unit(c, False) for c in key[1:-1]) + b'"'
        out.append((key, draw(json_values)))
    if draw(st.integers(0, 14)) == 0:
        depth = draw(st.sampled_from([62, 63]) if clean else st.sampled_from([63, 64, 65, 200]))
        out.append((b'"deep"', b"[" * depth + b"]" * depth))
    return draw(st.permutations(out))


@st.composite
def events(draw: st.DrawFn) -> bytes:
    ws = draw(st.sampled_from([b"", b"", b" ", b"\t", b" \r "]))
    body = (b"," + ws).join(k + ws + b":" + ws + v for k, v in draw(members()))
    return ws + b"{" + ws + body + ws + b"}" + ws


# --------------------------------------------------------------------------- mutations

_INSERTS = [
    b"\\u0000",
    b"\\u001f",
    b"\\u007f",
    b"\\u0085",
    b"\\ud800",
    b"\\udc00",
    b"\\ud83d\\ude00",
    b'\\"',
    b"\\\\",
    b"\\",
    b'"',
    b"\\x",
    b"\\u12",
    b"\xff",
    b"\x80",
    b"\xc0\xaf",
    b"\xe0\x80\xaf",
    b"\xf0\x80\x80\xaf",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\xc3",
    b"\xe2\x82",
    b"\xc2\x85",
    b"\x7f",
    b"\n",
    b"\r\n",
    b"\r",
    b"\x00",
    b"\t",
    b",",
    b":",
    b"{",
    b"}",
    b"[",
    b"]",
    b" ",
    b"-",
    b"0",
    b"-0",
    b"1e3",
    b".5",
    b"null",
    b"[" * 70,
    b'{"a":' * 70,
]


@st.composite
def mutated(draw: st.DrawFn, line: bytes) -> bytes:
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(line)))
        op = draw(st.sampled_from(["truncate", "flip", "insert", "insert", "delete", "repeat"]))
        if op == "truncate":
            line = line[:at]
        elif op == "flip" and at < len(line):
            bit = 1 << draw(st.integers(0, 7))
            line = line[:at] + bytes([line[at] ^ bit]) + line[at + 1 :]
        elif op == "insert":
            line = line[:at] + draw(st.sampled_from(_INSERTS)) + line[at:]
        elif op == "delete":
            line = line[:at] + line[at + draw(st.integers(1, 8)) :]
        elif op == "repeat":
            end = draw(st.integers(at, min(len(line), at + 40)))
            line = line[:end] + line[at:end] + line[end:]
    return line


_lines = st.one_of(
    events(),
    events(),
    events(),
    events().flatmap(mutated),
    events().flatmap(mutated),
    st.sampled_from([b"", b"   ", b"\t", b"[]", b"{}", b"null", b"\xff", b'"x"']),
)


@st.composite
def payloads(draw: st.DrawFn) -> bytes | None:
    kind = draw(st.integers(0, 39))
    if kind == 0:
        return None
    lines = draw(st.lists(_lines, min_size=1, max_size=4))
    newline = draw(st.sampled_from([b"\n", b"\n", b"\r\n"]))
    message = newline.join(lines) + draw(st.sampled_from([b"", b"", newline]))
    if kind == 1:  # pad to the size limit (or one byte past it) with a string field
        pad = b'{"pad":"' + b"x" * 8 + b'"}'
        target = MAX_MESSAGE_BYTES + draw(st.integers(0, 1))
        room = target - len(message) - len(newline) - len(pad)
        if room >= 0:
            message += newline + pad.replace(b"x" * 8, b"x" * (8 + room))
    return message


batches = st.lists(payloads(), min_size=1, max_size=4)
lateness = st.sampled_from([DEFAULT_LATENESS_MS, DEFAULT_LATENESS_MS, 0, 60_000, FAR])

# --------------------------------------------------------------------------- tests


def _rows(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    """Rows with ts as epoch ms (to_pylist of a timestamp can overflow datetime)."""
    columns = {
        name: (col.cast(pa.int64()) if name == "ts" else col).to_pylist()
        for name, col in zip(batch.schema.names, batch.columns, strict=True)
    }
    return [{n: columns[n][i] for n in columns} for i in range(batch.num_rows)]


@pytest.fixture(scope="module")
def reference() -> ParseBatch:
    return load_parse_batch("python")


@pytest.fixture(scope="module")
def compiled() -> ParseBatch:
    return load_parse_batch("compiled")


@FUZZ
@given(batch=batches, lateness_ms=lateness)
def test_compiled_matches_reference(
    reference: ParseBatch, compiled: ParseBatch, batch: list[bytes | None], lateness_ms: int
) -> None:
    want = reference(batch, now_ms=NOW, lateness_ms=lateness_ms)
    got = compiled(batch, now_ms=NOW, lateness_ms=lateness_ms)
    assert [(r.message_index, r.line, r.reason) for r in got.rejects] == [
        (r.message_index, r.line, r.reason) for r in want.rejects
    ]
    assert got.message_index.type == pa.int32()
    assert got.message_index.to_pylist() == want.message_index.to_pylist()
    assert got.batch.schema.equals(want.batch.schema)
    assert got.batch.equals(want.batch), (_rows(got.batch), _rows(want.batch))


def _nonblank_lines(payload: bytes) -> list[int]:
    return [n for n, line in enumerate(payload.split(b"\n")) if line.strip(b" \t\r")]


@pytest.fixture(scope="module", params=IMPLEMENTATIONS)
def parse(request: pytest.FixtureRequest) -> ParseBatch:
    return load_parse_batch(request.param)


@FUZZ
@given(batch=batches, lateness_ms=lateness)
def test_every_line_accounted_for(parse: ParseBatch, batch: list[bytes | None], lateness_ms: int) -> None:
    """Each parser on its own: one outcome per non-blank line (or one per message for a
    message-level reject), and every accepted row inside the contract."""
    result = parse(batch, now_ms=NOW, lateness_ms=lateness_ms)
    origins = result.message_index.to_pylist()
    rows = _rows(result.batch)
    for index, payload in enumerate(batch):
        data = payload or b""
        rejects = [r for r in result.rejects if r.message_index == index]
        accepted = origins.count(index)
        lines = _nonblank_lines(data)
        if len(data) > MAX_MESSAGE_BYTES or not lines:
            assert accepted == 0
            assert [(r.line, r.reason) for r in rejects] == [
                (0, "too_large" if len(data) > MAX_MESSAGE_BYTES else "invalid_json")
            ]
            continue
        assert accepted + len(rejects) == len(lines)
        assert {r.line for r in rejects} <= set(lines)
        assert [r.line for r in rejects] == sorted({r.line for r in rejects})
    assert origins == sorted(origins)
    for row in rows:
        assert NOW - lateness_ms <= row["ts"] <= NOW + MAX_FUTURE_MS
        for column in TOKEN_COLUMNS:
            assert 0 <= row[column] <= TOKEN_MAX
        assert row["reasoning_tokens"] <= row["output_tokens"]
        for field, (required, limit) in STRING_FIELDS.items():
            value = row[field]
            if value is None:
                assert not required
                continue
            assert 1 <= len(value.encode("utf-8")) <= limit
            assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value)
