"""Accept/reject corpus for the usage-event v1 wire contract (DESIGN.md section 2).

Each case is a batch of Kafka message payloads and what the parser must make of it:
accepted rows (field by field, ts as UTC epoch milliseconds, with the message they came
from) and rejects as (message, line, reason), optionally with a text the detail must
contain (by default the field the reject names). The expectations come from the
contract and from the order of checks in meter/_pyparser.py's docstring, which decides
the reason when a line has several problems; they are never read back from a parser.

Both parsers run the whole corpus (tests/test_parser.py), in the spirit of
JSONTestSuite's y_/n_ files.
"""

from __future__ import annotations

import calendar
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from meter.schema import DEFAULT_LATENESS_MS, FIELD_ORDER, MAX_MESSAGE_BYTES, TOKEN_COLUMNS

IMPLEMENTATIONS = ("python", "compiled")


def pure_python_only() -> bool:
    """METER_PURE_PYTHON=1 (as meter.parser reads it): a tree without the compiled parser."""
    return os.environ.get("METER_PURE_PYTHON", "") not in ("", "0")


def load_parse_batch(name: str) -> Callable[..., Any]:
    """The parse_batch of one implementation; a missing compiled parser fails the test
    unless METER_PURE_PYTHON=1, where it is skipped."""
    if name == "python":
        from meter._pyparser import parse_batch

        return parse_batch
    try:
        from meter._parser import parse_batch as compiled
    except ImportError as error:
        if pure_python_only():
            pytest.skip(f"compiled parser not built and METER_PURE_PYTHON=1 ({error})")
        pytest.fail(
            f"the compiled parser meter._parser does not import ({error}); build it "
            "(`make build`) or set METER_PURE_PYTHON=1 to test the pure-Python parser alone",
            pytrace=False,
        )
    return compiled


def ms(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, milli: int = 0) -> int:
    """UTC epoch milliseconds of a calendar instant (computed by the stdlib, not a parser)."""
    return calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) * 1000 + milli


#: The fixed clock of every case unless a case says otherwise.
NOW = ms(2026, 11, 15, 12)
LATENESS = DEFAULT_LATENESS_MS
#: A lateness that admits any calendar instant (for cases about the calendar, not the window).
FAR = 10**15
FUTURE_MS = 5 * 60 * 1000
TOKEN_FIELDS = TOKEN_COLUMNS
OPTIONAL_STRINGS = ("team", "org", "provider", "client", "request_id", "prompt_hash")
STRING_FIELDS_128 = ("user", "model", *OPTIONAL_STRINGS)


@dataclass(frozen=True)
class Row:
    """An accepted event: the full expected row and the message it came from."""

    values: dict[str, Any]
    msg: int = 0


@dataclass(frozen=True)
class Rej:
    """A reject: line within the message, reason code, and a text the detail must contain
    (the field name for field rejects)."""

    line: int
    reason: str
    detail: str | None = None
    msg: int = 0


@dataclass(frozen=True)
class Case:
    name: str
    payloads: tuple[bytes | None, ...]
    expect: tuple[Row | Rej, ...]
    now_ms: int = NOW
    lateness_ms: int = LATENESS
    tags: frozenset[str] = field(default_factory=frozenset)

    @property
    def rows(self) -> list[Row]:
        return [e for e in self.expect if isinstance(e, Row)]

    @property
    def rejects(self) -> list[Rej]:
        return [e for e in self.expect if isinstance(e, Rej)]


# --------------------------------------------------------------------------- builders

DROP: Any = object()  # a field value that leaves the field out

#: The base event (raw JSON text per field, in this key order) and the row it makes.
BASE: dict[str, bytes] = {
    "event_id": b'"evt-1"',
    "ts": b'"2026-11-15T11:59:00Z"',
    "user": b'"u-1"',
    "model": b'"m-1"',
    "input_tokens": b"10",
    "output_tokens": b"20",
}
BASE_ROW: dict[str, Any] = {
    "event_id": "evt-1",
    "ts": NOW - 60_000,
    "user": "u-1",
    "team": None,
    "org": None,
    "model": "m-1",
    "provider": None,
    "client": None,
    "request_id": None,
    "prompt_hash": None,
    "input_tokens": 10,
    "output_tokens": 20,
    "cache_read_tokens": 0,
    "cache_write_tokens": 0,
    "cache_write_1h_tokens": 0,
    "reasoning_tokens": 0,
}
assert list(BASE_ROW) == list(FIELD_ORDER)


def _b(x: str | bytes) -> bytes:
    return x if isinstance(x, bytes) else x.encode("utf-8")


def s(text: str) -> bytes:
    """A JSON string literal (control characters escaped, the rest raw UTF-8)."""
    return json.dumps(text, ensure_ascii=False).encode("utf-8")


def obj(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """An object from raw (key text without quotes, value JSON) pairs, in that order."""
    return b"{" + b",".join(b'"' + k + b'":' + v for k, v in pairs) + b"}"


def ev(
    *,
    first: tuple[tuple[str | bytes, str | bytes], ...] = (),
    extra: tuple[tuple[str | bytes, str | bytes], ...] = (),
    **fields: Any,
) -> bytes:
    """The base event with fields replaced (raw JSON text) or dropped (DROP); `first` and
    `extra` are raw (key, value) members put before and after the others."""
    members = dict(BASE)
    for name, value in fields.items():
        if value is DROP:
            members.pop(name, None)
        else:
            members[name] = _b(value)
    pairs = [(_b(k), _b(v)) for k, v in first]
    pairs += [(k.encode(), v) for k, v in members.items()]
    pairs += [(_b(k), _b(v)) for k, v in extra]
    return obj(pairs)


def row(**values: Any) -> dict[str, Any]:
    out = dict(BASE_ROW)
    out.update(values)
    return out


CASES: list[Case] = []


def case(
    name: str,
    payloads: list[bytes | None] | tuple[bytes | None, ...],
    *expect: Row | Rej,
    now_ms: int = NOW,
    lateness_ms: int = LATENESS,
    tags: tuple[str, ...] = (),
) -> None:
    CASES.append(Case(name, tuple(payloads), expect, now_ms, lateness_ms, frozenset(tags)))


def ok(name: str, payload: bytes, expected: dict[str, Any] | None = None, **opts: Any) -> None:
    case(name, [payload], Row(expected if expected is not None else row()), **opts)


def bad(
    name: str,
    payload: bytes | None,
    reason: str,
    detail: str | None = None,
    line: int = 0,
    **opts: Any,
) -> None:
    case(name, [payload], Rej(line, reason, detail), **opts)


def nest(depth: int, kind: str = "array", inner: bytes = b"1") -> bytes:
    """A value with `depth` levels of arrays, objects or both alternating."""
    out = inner
    for level in range(depth):
        use_array = kind == "array" or (kind == "mixed" and level % 2 == 0)
        out = b"[" + out + b"]" if use_array else b'{"k":' + out + b"}"
    return out


# --------------------------------------------------------------------------- accepted basics

ok("minimal", ev())
ALL_FIELDS = ev(
    event_id=s("A.z_0:9-x"),
    user=s("user@example.com"),
    team=s("team a"),
    org=s("org/1"),
    model=s("claude-sonnet-4-5"),
    provider=s("anthropic"),
    client=s("cli 1.2"),
    request_id=s("req_011CUo"),
    prompt_hash=s("sha256:ab12"),
    input_tokens=b"1",
    output_tokens=b"1000",
    cache_read_tokens=b"2",
    cache_write_tokens=b"3",
    cache_write_1h_tokens=b"4",
    reasoning_tokens=b"1000",
)
ALL_ROW = row(
    event_id="A.z_0:9-x",
    user="user@example.com",
    team="team a",
    org="org/1",
    model="claude-sonnet-4-5",
    provider="anthropic",
    client="cli 1.2",
    request_id="req_011CUo",
    prompt_hash="sha256:ab12",
    input_tokens=1,
    output_tokens=1000,
    cache_read_tokens=2,
    cache_write_tokens=3,
    cache_write_1h_tokens=4,
    reasoning_tokens=1000,
)
ok("all_fields", ALL_FIELDS, ALL_ROW)
ok(
    "optional_fields_null",
    ev(**{n: b"null" for n in (*OPTIONAL_STRINGS, *TOKEN_FIELDS[2:])}),
)
ok(
    "whitespace_everywhere",
    b' \t{ "event_id" :\t"evt-1" , "ts"\r: "2026-11-15T11:59:00Z",'
    b' "user" : "u-1" ,"model":"m-1", "input_tokens" : 10 , "output_tokens":20 \t}\t \r',
)
ok("leading_trailing_spaces", b"   " + ev() + b"   ")

# Any key order gives the same row.
_ALL_PAIRS = [
    (b'"' + k + b'":' + v)
    for k, v in (
        (b"event_id", s("A.z_0:9-x")),
        (b"ts", b'"2026-11-15T11:59:00Z"'),
        (b"user", s("user@example.com")),
        (b"team", s("team a")),
        (b"org", s("org/1")),
        (b"model", s("claude-sonnet-4-5")),
        (b"provider", s("anthropic")),
        (b"client", s("cli 1.2")),
        (b"request_id", s("req_011CUo")),
        (b"prompt_hash", s("sha256:ab12")),
        (b"input_tokens", b"1"),
        (b"output_tokens", b"1000"),
        (b"cache_read_tokens", b"2"),
        (b"cache_write_tokens", b"3"),
        (b"cache_write_1h_tokens", b"4"),
        (b"reasoning_tokens", b"1000"),
        (b"zz_unknown", b'{"a":[1,2,{"b":null}]}'),
    )
]
ok("key_order_reversed", b"{" + b",".join(reversed(_ALL_PAIRS)) + b"}", ALL_ROW)
for _seed in range(6):
    _pairs = list(_ALL_PAIRS)
    random.Random(_seed).shuffle(_pairs)
    ok(f"key_order_shuffled_{_seed}", b"{" + b",".join(_pairs) + b"}", ALL_ROW)

# --------------------------------------------------------------------------- required fields

for _name in ("event_id", "ts", "user", "model", "input_tokens", "output_tokens"):
    bad(f"missing_{_name}", ev(**{_name: DROP}), "missing_field", _name)
    # A required null is missing_field (DESIGN allows wrong_type or missing_field; the
    # reference says missing_field, detail "<field> is null").
    bad(f"null_{_name}", ev(**{_name: b"null"}), "missing_field", f"{_name} is null")
bad("empty_object", b"{}", "missing_field", "event_id")
bad("only_unknown_fields", b'{"a":1,"b":"x"}', "missing_field", "event_id")
for _name in OPTIONAL_STRINGS:
    ok(f"null_{_name}", ev(**{_name: b"null"}))
for _name in TOKEN_FIELDS[2:]:
    ok(f"null_{_name}", ev(**{_name: b"null"}))

# --------------------------------------------------------------------------- event_id

ok("event_id_64_bytes", ev(event_id=s("a" * 64)), row(event_id="a" * 64))
ok("event_id_1_byte", ev(event_id=s("Z")), row(event_id="Z"))
ok("event_id_all_classes", ev(event_id=s("AZaz09._:-")), row(event_id="AZaz09._:-"))
ok(
    "event_id_uuid",
    ev(event_id=s("0f8fad5b-d9cb-469f-a165-70867728950e")),
    row(event_id="0f8fad5b-d9cb-469f-a165-70867728950e"),
)
ok("event_id_escaped_allowed", ev(event_id=rb'"evt\u002d1\u002E"'), row(event_id="evt-1."))
bad("event_id_65_bytes", ev(event_id=s("a" * 65)), "invalid_value", "event_id")
bad("event_id_empty", ev(event_id=b'""'), "invalid_value", "event_id")
for _label, _text in (
    ("space", "evt 1"),
    ("slash", "evt/1"),
    ("at", "evt@1"),
    ("plus", "evt+1"),
    ("hash", "evt#1"),
    ("comma", "evt,1"),
    ("quote", 'evt"1'),
    ("backslash", "evt\\1"),
    ("tilde", "evt~1"),
    ("latin1", "evté"),
    ("emoji", "evt😀"),
    ("nul", "evt\x00"),
    ("newline", "evt\n"),
    ("del", "evt\x7f"),
):
    bad(f"event_id_charset_{_label}", ev(event_id=s(_text)), "invalid_value", "event_id")
bad("event_id_escaped_space", ev(event_id=rb'"evt\u00201"'), "invalid_value", "event_id")
# 64 characters but 65+ bytes: the length rule comes first, the reason is the same.
bad("event_id_64_chars_multibyte", ev(event_id=s("é" * 64)), "invalid_value", "event_id")
for _kind, _raw in (
    ("integer", b"123"),
    ("number", b"1.5"),
    ("true", b"true"),
    ("array", b'["evt-1"]'),
    ("object", b'{"id":"evt-1"}'),
):
    bad(f"event_id_wrong_type_{_kind}", ev(event_id=_raw), "wrong_type", "event_id")

# --------------------------------------------------------------------------- 128-byte strings

for _name in STRING_FIELDS_128:
    _opt = _name in OPTIONAL_STRINGS
    ok(f"{_name}_1_byte", ev(**{_name: s("x")}), row(**{_name: "x"}))
    ok(f"{_name}_128_ascii", ev(**{_name: s("x" * 128)}), row(**{_name: "x" * 128}))
    bad(f"{_name}_129_ascii", ev(**{_name: s("x" * 129)}), "invalid_value", _name)
    bad(f"{_name}_empty", ev(**{_name: b'""'}), "invalid_value", _name)
    ok(f"{_name}_128_bytes_2byte_chars", ev(**{_name: s("é" * 64)}), row(**{_name: "é" * 64}))
    bad(f"{_name}_130_bytes_65_chars", ev(**{_name: s("é" * 65)}), "invalid_value", _name)
    ok(f"{_name}_128_bytes_4byte_chars", ev(**{_name: s("😀" * 32)}), row(**{_name: "😀" * 32}))
    bad(f"{_name}_132_bytes_33_chars", ev(**{_name: s("😀" * 33)}), "invalid_value", _name)
    # Counted after decoding: 768 bytes of escapes that decode to 128 bytes.
    ok(
        f"{_name}_128_bytes_escaped",
        ev(**{_name: b'"' + rb"\u00e9" * 64 + b'"'}),
        row(**{_name: "é" * 64}),
    )
    bad(
        f"{_name}_129_bytes_escaped",
        ev(**{_name: b'"' + rb"\u0041" * 129 + b'"'}),
        "invalid_value",
        _name,
    )
    ok(
        f"{_name}_125_plus_euro_is_128",
        ev(**{_name: s("x" * 125 + "€")}),
        row(**{_name: "x" * 125 + "€"}),
    )
    bad(f"{_name}_126_plus_euro_is_129", ev(**{_name: s("x" * 126 + "€")}), "invalid_value", _name)
    for _kind, _raw in (
        ("integer", b"1"),
        ("number", b"1.5"),
        ("false", b"false"),
        ("array", b"[]"),
        ("object", b"{}"),
    ):
        bad(f"{_name}_wrong_type_{_kind}", ev(**{_name: _raw}), "wrong_type", _name)
    # Control characters (U+0000-U+001F, U+007F-U+009F), escaped or raw, are invalid_value.
    for _label, _raw in (
        ("esc_nul", rb'"a\u0000"'),
        ("esc_1f", rb'"a\u001F"'),
        ("esc_newline", rb'"a\n"'),
        ("esc_tab", rb'"\tb"'),
        ("esc_cr", rb'"a\rb"'),
        ("esc_backspace", rb'"a\b"'),
        ("esc_formfeed", rb'"a\f"'),
        ("esc_7f", rb'"a\u007f"'),
        ("esc_80", rb'"a\u0080"'),
        ("esc_9f", rb'"a\u009F"'),
        ("raw_7f", b'"a\x7fb"'),
        ("raw_c2_80", b'"a\xc2\x80"'),
        ("raw_c2_85", b'"\xc2\x85b"'),
        ("raw_c2_9f", b'"a\xc2\x9f"'),
    ):
        bad(f"{_name}_control_{_label}", ev(**{_name: _raw}), "invalid_value", _name)
    ok(f"{_name}_nbsp_a0", ev(**{_name: rb'"a\u00a0b"'}), row(**{_name: "a\u00a0b"}))

# Escapes decode in known fields (those that are not control characters).
ok("user_escapes_quote_backslash_slash", ev(user=rb'"a\"b\\c\/d"'), row(user='a"b\\c/d'))
ok("user_escape_u_lower_upper", ev(user=rb'"\u0041\u00e9\u00E9\u20ac\u20AC"'), row(user="Aéé€€"))
ok("user_escape_surrogate_pair", ev(user=rb'"x\ud83d\ude00y"'), row(user="x😀y"))
ok("user_escape_surrogate_pair_upper", ev(user=rb'"\uD83D\uDE00"'), row(user="😀"))
ok("user_escape_min_astral", ev(user=rb'"\uD800\uDC00"'), row(user="\U00010000"))
ok("user_escape_max_astral", ev(user=rb'"\uDBFF\uDFFF"'), row(user="\U0010ffff"))
ok(
    "user_escape_bmp_edges",
    ev(user=rb'"\uD7FF\uE000\uFFFD\uFFFF"'),
    row(user="\ud7ff\ue000\ufffd\uffff"),
)
ok("user_raw_non_ascii", ev(user=s("jörg 日本 😀")), row(user="jörg 日本 😀"))
ok(
    "user_raw_utf8_edges",
    ev(
        user=b'"\xc2\xa0\xdf\xbf\xe0\xa0\x80\xed\x9f\xbf\xee\x80\x80\xef\xbf\xbf'
        b'\xf0\x90\x80\x80\xf4\x8f\xbf\xbf"'
    ),
    row(user="\u00a0\u07ff\u0800\ud7ff\ue000\uffff\U00010000\U0010ffff"),
)
ok("user_escaped_and_raw_mix", ev(user=b'"\xc3\xa9\\u00e9"'), row(user="éé"))
ok(
    "model_with_spaces_and_symbols",
    ev(model=s(" gpt-4o (2024-08-06) ")),
    row(model=" gpt-4o (2024-08-06) "),
)

# --------------------------------------------------------------------------- integers

for _name in TOKEN_FIELDS:
    _required = _name in ("input_tokens", "output_tokens")
    # reasoning_tokens must stay <= output_tokens in the accepted cases.
    _out = {"output_tokens": b"1000000000"} if _name == "reasoning_tokens" else {}
    _out_row = {"output_tokens": 1_000_000_000} if _name == "reasoning_tokens" else {}
    for _label, _raw, _value in (
        ("zero", b"0", 0),
        ("one", b"1", 1),
        ("max", b"1000000000", 1_000_000_000),
        ("minus_zero", b"-0", 0),
        ("999999999", b"999999999", 999_999_999),
    ):
        ok(f"{_name}_{_label}", ev(**{**_out, _name: _raw}), row(**{**_out_row, _name: _value}))
    for _label, _raw in (
        ("max_plus_1", b"1000000001"),
        ("minus_1", b"-1"),
        ("minus_max", b"-1000000000"),
        ("1e10_digits", b"10000000000"),
        ("int32_max_plus_1", b"2147483648"),
        ("uint32_wrap", b"4294967296"),
        ("int64_max", b"9223372036854775807"),
        ("int64_max_plus_1", b"9223372036854775808"),
        ("int64_min", b"-9223372036854775808"),
        ("int64_min_minus_1", b"-9223372036854775809"),
        ("uint64_wrap_to_0", b"18446744073709551616"),
        ("uint64_wrap_to_5", b"18446744073709551621"),
        ("uint64_minus_wrap", b"-18446744073709551611"),
        ("10e40", b"1" + b"0" * 40),
        ("minus_10e40", b"-1" + b"0" * 40),
        ("5000_digits", b"9" * 5000),
        ("minus_5000_digits", b"-" + b"1" * 5000),
    ):
        bad(f"{_name}_out_of_range_{_label}", ev(**{**_out, _name: _raw}), "out_of_range", _name)
    for _label, _raw in (
        ("1.0", b"1.0"),
        ("0.0", b"0.0"),
        ("-0.0", b"-0.0"),
        ("1.5", b"1.5"),
        ("1e3", b"1e3"),
        ("1E3", b"1E3"),
        ("1e+3", b"1e+3"),
        ("1e-3", b"1e-3"),
        ("0e0", b"0e0"),
        ("1e400", b"1e400"),
        ("string_5", b'"5"'),
        ("string_empty", b'""'),
        ("true", b"true"),
        ("false", b"false"),
        ("array", b"[5]"),
        ("object", b'{"n":5}'),
    ):
        bad(f"{_name}_wrong_type_{_label}", ev(**{**_out, _name: _raw}), "wrong_type", _name)
    if not _required:
        ok(f"{_name}_absent_is_0", ev(**{_name: DROP}))
    # Not JSON at all: the syntax check comes before any field rule.
    for _label, _raw in (
        ("leading_zero", b"01"),
        ("leading_zeros", b"00"),
        ("minus_leading_zero", b"-01"),
        ("plus", b"+1"),
        ("dot_first", b".5"),
        ("dot_last", b"1."),
        ("exp_no_digits", b"1e"),
        ("exp_sign_only", b"1e+"),
        ("minus_alone", b"-"),
        ("hex", b"0x10"),
        ("nan", b"NaN"),
        ("infinity", b"Infinity"),
        ("minus_infinity", b"-Infinity"),
        ("digit_space_digit", b"1 2"),
        ("underscore", b"1_000"),
    ):
        bad(f"{_name}_invalid_json_{_label}", ev(**{**_out, _name: _raw}), "invalid_json")

ok(
    "tokens_all_max",
    ev(**{n: b"1000000000" for n in TOKEN_FIELDS}),
    row(**{n: 1_000_000_000 for n in TOKEN_FIELDS}),
)
ok(
    "reasoning_equals_output",
    ev(output_tokens=b"7", reasoning_tokens=b"7"),
    row(output_tokens=7, reasoning_tokens=7),
)
ok(
    "reasoning_zero_output_zero",
    ev(output_tokens=b"0", reasoning_tokens=b"0"),
    row(output_tokens=0),
)
bad(
    "reasoning_exceeds_output",
    ev(output_tokens=b"7", reasoning_tokens=b"8"),
    "out_of_range",
    "reasoning_tokens",
)
bad(
    "reasoning_exceeds_output_zero",
    ev(output_tokens=b"0", reasoning_tokens=b"1"),
    "out_of_range",
    "reasoning_tokens",
)
bad(
    "reasoning_exceeds_output_key_first",
    ev(first=(("reasoning_tokens", "21"),)),
    "out_of_range",
    "reasoning_tokens",
)
ok(
    "cache_buckets_independent_of_input",
    ev(
        input_tokens=b"0",
        cache_read_tokens=b"900",
        cache_write_tokens=b"50",
        cache_write_1h_tokens=b"50",
    ),
    row(input_tokens=0, cache_read_tokens=900, cache_write_tokens=50, cache_write_1h_tokens=50),
)

# --------------------------------------------------------------------------- ts

_TS_OK: list[tuple[str, str, int, dict[str, int]]] = [
    ("zulu", "2026-11-15T11:59:00Z", NOW - 60_000, {}),
    ("plus_0530", "2026-11-15T17:29:00+05:30", NOW - 60_000, {}),
    ("minus_0000", "2026-11-15T11:59:00-00:00", NOW - 60_000, {}),
    ("plus_0000", "2026-11-15T11:59:00+00:00", NOW - 60_000, {}),
    ("minus_0800", "2026-11-15T03:59:00-08:00", NOW - 60_000, {}),
    ("plus_2359", "2026-11-16T11:58:00+23:59", NOW - 60_000, {}),
    ("minus_2359", "2026-11-14T12:00:00-23:59", NOW - 60_000, {}),
    ("offset_crosses_day", "2026-11-15T00:30:00+01:00", ms(2026, 11, 14, 23, 30), {}),
    ("frac_1", "2026-11-15T11:59:00.1Z", NOW - 60_000 + 100, {}),
    ("frac_2", "2026-11-15T11:59:00.12Z", NOW - 60_000 + 120, {}),
    ("frac_3", "2026-11-15T11:59:00.123Z", NOW - 60_000 + 123, {}),
    ("frac_4_truncated", "2026-11-15T11:59:00.1239Z", NOW - 60_000 + 123, {}),
    ("frac_5_truncated", "2026-11-15T11:59:00.12399Z", NOW - 60_000 + 123, {}),
    ("frac_6_truncated", "2026-11-15T11:59:00.123999Z", NOW - 60_000 + 123, {}),
    ("frac_7_truncated", "2026-11-15T11:59:00.1239999Z", NOW - 60_000 + 123, {}),
    ("frac_8_truncated", "2026-11-15T11:59:00.12399999Z", NOW - 60_000 + 123, {}),
    ("frac_9_truncated", "2026-11-15T11:59:00.123999999Z", NOW - 60_000 + 123, {}),
    ("frac_all_nines_not_rounded", "2026-11-15T11:59:59.999999999Z", NOW - 1, {}),
    ("frac_below_ms", "2026-11-15T11:59:00.0009Z", NOW - 60_000, {}),
    ("frac_one_ns", "2026-11-15T11:59:00.000000001Z", NOW - 60_000, {}),
    ("frac_zeros", "2026-11-15T11:59:00.000Z", NOW - 60_000, {}),
    ("frac_with_offset", "2026-11-15T17:29:00.987654+05:30", NOW - 60_000 + 987, {}),
    ("month_end_30", "2026-04-30T00:00:00Z", ms(2026, 4, 30), {"lateness_ms": FAR}),
    ("month_end_31", "2026-01-31T23:59:59Z", ms(2026, 1, 31, 23, 59, 59), {"lateness_ms": FAR}),
    ("feb_29_leap_2024", "2024-02-29T00:00:00Z", ms(2024, 2, 29), {"lateness_ms": FAR}),
    ("feb_29_leap_2000", "2000-02-29T12:00:00Z", ms(2000, 2, 29, 12), {"lateness_ms": FAR}),
    ("feb_29_leap_1600", "1600-02-29T12:00:00Z", ms(1600, 2, 29, 12), {"lateness_ms": FAR}),
    ("feb_28_non_leap", "2025-02-28T23:59:59Z", ms(2025, 2, 28, 23, 59, 59), {"lateness_ms": FAR}),
    ("epoch", "1970-01-01T00:00:00Z", 0, {"lateness_ms": FAR}),
    ("before_epoch_fraction", "1969-12-31T23:59:59.9999Z", -1, {"lateness_ms": FAR}),
    ("year_0001", "0001-01-01T00:00:00Z", ms(1, 1, 1), {"lateness_ms": FAR}),
    (
        "year_9999",
        "9999-12-31T23:59:59.999Z",
        ms(9999, 12, 31, 23, 59, 59, 999),
        {"now_ms": ms(9999, 12, 31, 23, 59, 59, 999)},
    ),
]
for _label, _text, _ms, _opts in _TS_OK:
    ok(f"ts_{_label}", ev(ts=s(_text)), row(ts=_ms), **_opts)
ok("ts_escaped_z", ev(ts=rb'"2026-11-15T11:59:00\u005A"'), row(ts=NOW - 60_000))
ok("ts_escaped_digits", ev(ts=rb'"\u0032026-11-15T11:59:00Z"'), row(ts=NOW - 60_000))
ok("ts_epoch_ms_integer", ev(ts=str(NOW - 60_000)), row(ts=NOW - 60_000))
ok("ts_epoch_ms_zero", ev(ts=b"0"), row(ts=0), lateness_ms=FAR)
ok("ts_epoch_ms_minus_zero", ev(ts=b"-0"), row(ts=0), lateness_ms=FAR)
ok("ts_epoch_ms_negative", ev(ts=b"-1"), row(ts=-1), lateness_ms=FAR)
ok("ts_epoch_ms_year_0001", ev(ts=b"-62135596800000"), row(ts=ms(1, 1, 1)), lateness_ms=FAR)

_TS_BAD = [
    ("lowercase_t", "2026-11-15t11:59:00Z"),
    ("lowercase_z", "2026-11-15T11:59:00z"),
    ("space_separator", "2026-11-15 11:59:00Z"),
    ("missing_seconds", "2026-11-15T11:59Z"),
    ("missing_offset", "2026-11-15T11:59:00"),
    ("missing_offset_with_fraction", "2026-11-15T11:59:00.123"),
    ("offset_no_colon", "2026-11-15T17:29:00+0530"),
    ("offset_hours_only", "2026-11-15T17:29:00+05"),
    ("offset_one_digit_hour", "2026-11-15T17:29:00+5:30"),
    ("offset_unicode_minus", "2026-11-15T03:59:00\u221208:00"),
    ("zulu_and_offset", "2026-11-15T11:59:00Z+00:00"),
    ("double_z", "2026-11-15T11:59:00ZZ"),
    ("utc_word", "2026-11-15T11:59:00UTC"),
    ("frac_10_digits", "2026-11-15T11:59:00.1234567890Z"),
    ("frac_dot_only", "2026-11-15T11:59:00.Z"),
    ("frac_comma", "2026-11-15T11:59:00,123Z"),
    ("date_only", "2026-11-15"),
    ("time_only", "11:59:00Z"),
    ("one_digit_month", "2026-1-15T11:59:00Z"),
    ("one_digit_hour", "2026-11-15T1:59:00Z"),
    ("five_digit_year", "02026-11-15T11:59:00Z"),
    ("two_digit_year", "26-11-15T11:59:00Z"),
    ("basic_format", "20261115T115900Z"),
    ("leading_space", " 2026-11-15T11:59:00Z"),
    ("trailing_space", "2026-11-15T11:59:00Z "),
    ("trailing_newline", "2026-11-15T11:59:00Z\n"),
    ("fullwidth_digit", "２026-11-15T11:59:00Z"),
    ("arabic_indic_digit", "٢026-11-15T11:59:00Z"),
    ("empty", ""),
    ("word", "now"),
    ("epoch_as_string", str(NOW)),
    ("negative_year", "-2026-11-15T11:59:00Z"),
]
for _label, _text in _TS_BAD:
    bad(f"ts_format_{_label}", ev(ts=s(_text)), "invalid_timestamp", "ts")
_TS_NOT_REAL = [
    ("month_13", "2026-13-15T11:59:00Z"),
    ("month_00", "2026-00-15T11:59:00Z"),
    ("day_00", "2026-11-00T11:59:00Z"),
    ("day_32", "2026-01-32T11:59:00Z"),
    ("apr_31", "2026-04-31T11:59:00Z"),
    ("nov_31", "2026-11-31T11:59:00Z"),
    ("feb_29_non_leap_2025", "2025-02-29T00:00:00Z"),
    ("feb_29_non_leap_1900", "1900-02-29T00:00:00Z"),
    ("feb_29_non_leap_2100", "2100-02-29T00:00:00Z"),
    ("feb_30_leap", "2024-02-30T00:00:00Z"),
    ("hour_24", "2026-11-15T24:00:00Z"),
    ("minute_60", "2026-11-15T11:60:00Z"),
    ("second_60_leap_second", "2016-12-31T23:59:60Z"),
    ("second_99", "2026-11-15T11:59:99Z"),
    ("offset_hour_24", "2026-11-15T11:59:00+24:00"),
    ("offset_minute_60", "2026-11-15T11:59:00+05:60"),
    ("year_0000", "0000-01-01T00:00:00Z"),
]
for _label, _text in _TS_NOT_REAL:
    bad(f"ts_not_real_{_label}", ev(ts=s(_text)), "invalid_timestamp", "ts", lateness_ms=FAR)
for _label, _raw in (
    ("int64_max_plus_1", b"9223372036854775808"),
    ("int64_min_minus_1", b"-9223372036854775809"),
    ("uint64_wrap", b"18446744073709551616"),
    ("10e40", b"1" + b"0" * 40),
    ("minus_10e40", b"-1" + b"0" * 40),
    ("5000_digits", b"1" * 5000),
    ("minus_5000_digits", b"-" + b"9" * 5000),
):
    bad(f"ts_epoch_beyond_int64_{_label}", ev(ts=_raw), "invalid_timestamp", "ts")
for _label, _raw in (
    ("number_1.0", b"1.0"),
    ("number_exponent", b"1.7632e12"),
    ("number_exponent_int_valued", b"1e12"),
    ("true", b"true"),
    ("false", b"false"),
    ("array", b'["2026-11-15T11:59:00Z"]'),
    ("object", b'{"ms":1}'),
):
    bad(f"ts_wrong_type_{_label}", ev(ts=_raw), "wrong_type", "ts")
bad("ts_epoch_ms_int64_max_window", ev(ts=b"9223372036854775807"), "timestamp_out_of_range", "ts")
bad("ts_epoch_ms_int64_min_window", ev(ts=b"-9223372036854775808"), "timestamp_out_of_range", "ts")

# --------------------------------------------------------------------------- ts window

ok("window_future_exactly_5_min_int", ev(ts=str(NOW + FUTURE_MS)), row(ts=NOW + FUTURE_MS))
bad(
    "window_future_5_min_plus_1ms_int",
    ev(ts=str(NOW + FUTURE_MS + 1)),
    "timestamp_out_of_range",
    "ts",
)
ok("window_future_exactly_5_min_str", ev(ts=s("2026-11-15T12:05:00Z")), row(ts=NOW + FUTURE_MS))
ok(
    "window_future_5_min_plus_sub_ms_truncated",
    ev(ts=s("2026-11-15T12:05:00.000999999Z")),
    row(ts=NOW + FUTURE_MS),
)
bad(
    "window_future_5_min_plus_1ms_str",
    ev(ts=s("2026-11-15T12:05:00.001Z")),
    "timestamp_out_of_range",
    "ts",
)
bad(
    "window_future_5_min_plus_1ms_offset",
    ev(ts=s("2026-11-15T17:35:00.001+05:30")),
    "timestamp_out_of_range",
    "ts",
)
bad("window_future_one_day", ev(ts=s("2026-11-16T12:00:00Z")), "timestamp_out_of_range", "ts")
ok("window_now", ev(ts=str(NOW)), row(ts=NOW))
ok(
    "window_lateness_exactly_default",
    ev(ts=str(NOW - DEFAULT_LATENESS_MS)),
    row(ts=NOW - DEFAULT_LATENESS_MS),
)
bad(
    "window_lateness_default_plus_1ms",
    ev(ts=str(NOW - DEFAULT_LATENESS_MS - 1)),
    "timestamp_out_of_range",
    "ts",
)
ok(
    "window_lateness_35_days_str",
    ev(ts=s("2026-10-11T12:00:00Z")),
    row(ts=NOW - DEFAULT_LATENESS_MS),
)
bad(
    "window_lateness_35_days_plus_1ms_str",
    ev(ts=s("2026-10-11T11:59:59.999Z")),
    "timestamp_out_of_range",
    "ts",
)
ok("window_custom_lateness_edge", ev(ts=str(NOW - 1000)), row(ts=NOW - 1000), lateness_ms=1000)
bad(
    "window_custom_lateness_beyond",
    ev(ts=str(NOW - 1001)),
    "timestamp_out_of_range",
    "ts",
    lateness_ms=1000,
)
ok("window_zero_lateness_now", ev(ts=str(NOW)), row(ts=NOW), lateness_ms=0)
bad(
    "window_zero_lateness_1ms_old",
    ev(ts=str(NOW - 1)),
    "timestamp_out_of_range",
    "ts",
    lateness_ms=0,
)
bad("window_epoch_zero_default_lateness", ev(ts=b"0"), "timestamp_out_of_range", "ts")

# --------------------------------------------------------------------------- escapes, surrogates

for _label, _raw in (
    ("quote", rb'"a\"b"'),
    ("backslash", rb'"a\\b"'),
    ("slash", rb'"a\/b"'),
    ("backspace", rb'"a\bb"'),
    ("formfeed", rb'"a\fb"'),
    ("newline", rb'"a\nb"'),
    ("cr", rb'"a\rb"'),
    ("tab", rb'"a\tb"'),
    ("u_nul", rb'"a\u0000b"'),
    ("u_1f", rb'"\u001f"'),
    ("u_7f", rb'"\u007f"'),
    ("u_9f", rb'"\u009f"'),
    ("pair", rb'"\ud83d\ude00"'),
    ("all", rb'"\"\\\/\b\f\n\r\t\u0000\u00e9\uFFFF\uDBFF\uDFFF"'),
):
    # Control characters are fine outside the known string fields.
    ok(f"unknown_field_escape_{_label}", ev(extra=(("note", _raw),)))
    ok(f"unknown_key_escape_{_label}", ev(extra=((_raw[1:-1], b"1"),)))

for _where, _make in (
    ("user", lambda v: ev(user=v)),
    ("unknown_value", lambda v: ev(extra=(("note", v),))),
    ("key", lambda v: ev(extra=((v[1:-1], b"1"),))),
    ("nested", lambda v: ev(extra=(("meta", b'{"a":[' + v + b"]}"),))),
    ("top_level_string", lambda v: v),
):
    for _label, _raw in (
        ("high_alone_end", rb'"a\ud83d"'),
        ("high_alone_then_char", rb'"\ud83dx"'),
        ("low_alone", rb'"\ude00"'),
        ("low_then_high", rb'"\ude00\ud83d"'),
        ("high_then_high", rb'"\ud83d\ud83d"'),
        ("high_then_non_surrogate_escape", rb'"\ud83d\u0041"'),
        ("high_then_short_escape", rb'"\ud83d\n"'),
        ("high_then_raw_astral", b'"\\ud83d\xf0\x9f\x98\x80"'),
        ("min_high_alone", rb'"\uD800"'),
        ("max_low_alone", rb'"\uDFFF"'),
    ):
        bad(f"lone_surrogate_{_where}_{_label}", _make(_raw), "invalid_utf8")

for _label, _raw in (
    ("x_escape", rb'"\x41"'),
    ("upper_u", rb'"\U0041"'),
    ("short_hex", rb'"\u12"'),
    ("short_hex_at_end", rb'"\u12'),
    ("non_hex", rb'"\u12G4"'),
    ("single_quote", rb'"\'"'),
    ("a_escape", rb'"\a"'),
    ("zero_escape", rb'"\0"'),
    ("backslash_space", rb'"\ "'),
    ("backslash_at_end", b'"abc\\'),
    ("high_then_bad_hex", rb'"\ud83d\uZZZZ"'),
    ("high_then_short_hex", rb'"\ud83d\u12"'),
):
    bad(f"bad_escape_user_{_label}", ev(user=_raw), "invalid_json")
    bad(f"bad_escape_unknown_{_label}", ev(extra=(("note", _raw),)), "invalid_json")

# --------------------------------------------------------------------------- raw control chars

for _label, _byte in (
    ("nul", b"\x00"),
    ("01", b"\x01"),
    ("tab", b"\t"),
    ("cr", b"\r"),
    ("1f", b"\x1f"),
    ("esc", b"\x1b"),
):
    bad(f"raw_control_in_user_{_label}", ev(user=b'"a' + _byte + b'b"'), "invalid_json")
    bad(
        f"raw_control_in_unknown_{_label}",
        ev(extra=(("note", b'"a' + _byte + b'b"'),)),
        "invalid_json",
    )
    bad(f"raw_control_in_key_{_label}", ev(extra=((b"k" + _byte, b"1"),)), "invalid_json")
ok("raw_del_in_unknown_ok", ev(extra=(("note", b'"a\x7fb\xc2\x85"'),)))
ok("raw_del_in_unknown_key_ok", ev(extra=((b"k\x7f\xc2\x9f", b"1"),)))
for _label, _byte in (
    ("nul", b"\x00"),
    ("vt", b"\x0b"),
    ("ff", b"\x0c"),
    ("nbsp", b"\xc2\xa0"),
    ("bom", b"\xef\xbb\xbf"),
    ("del", b"\x7f"),
):
    bad(f"non_json_whitespace_{_label}", ev().replace(b'"user"', _byte + b'"user"'), "invalid_json")
bad("bom_at_line_start", b"\xef\xbb\xbf" + ev(), "invalid_json")
ok("cr_inside_line_is_whitespace", ev().replace(b",", b"\r,"))

# --------------------------------------------------------------------------- invalid UTF-8

_BAD_UTF8 = (
    ("lead_ff", b"\xff"),
    ("lead_fe", b"\xfe"),
    ("lone_continuation_80", b"\x80"),
    ("lone_continuation_bf", b"\xbf"),
    ("overlong_2_c0_af", b"\xc0\xaf"),
    ("overlong_2_c1_bf", b"\xc1\xbf"),
    ("overlong_2_nul", b"\xc0\x80"),
    ("overlong_3_e0_80_af", b"\xe0\x80\xaf"),
    ("overlong_3_e0_9f_bf", b"\xe0\x9f\xbf"),
    ("overlong_4_f0_80_80_af", b"\xf0\x80\x80\xaf"),
    ("overlong_4_f0_8f_bf_bf", b"\xf0\x8f\xbf\xbf"),
    ("surrogate_ed_a0_80", b"\xed\xa0\x80"),
    ("surrogate_ed_bf_bf", b"\xed\xbf\xbf"),
    ("surrogate_pair_cesu8", b"\xed\xa0\xbd\xed\xb8\x80"),
    ("above_max_f4_90", b"\xf4\x90\x80\x80"),
    ("lead_f5", b"\xf5\x80\x80\x80"),
    ("lead_f7", b"\xf7\xbf\xbf\xbf"),
    ("five_byte_f8", b"\xf8\x88\x80\x80\x80"),
    ("six_byte_fc", b"\xfc\x84\x80\x80\x80\x80"),
    ("truncated_2", b"\xc3"),
    ("truncated_3", b"\xe2\x82"),
    ("truncated_4", b"\xf0\x9f\x98"),
    ("truncated_3_then_ascii", b"\xe2x\x82"),
    ("continuation_after_complete", b"\xc3\xa9\xa9"),
)
for _label, _bytes in _BAD_UTF8:
    bad(f"utf8_{_label}_in_user", ev(user=b'"u' + _bytes + b'"'), "invalid_utf8")
for _label, _bytes in _BAD_UTF8[::3]:
    bad(f"utf8_{_label}_line_start", _bytes + ev(), "invalid_utf8")
    bad(f"utf8_{_label}_line_end", ev() + _bytes, "invalid_utf8")
    bad(f"utf8_{_label}_in_key", ev(extra=((b"no" + _bytes + b"te", b"1"),)), "invalid_utf8")
    bad(
        f"utf8_{_label}_in_known_key",
        ev().replace(b'"user"', b'"us' + _bytes + b'er"'),
        "invalid_utf8",
    )
    bad(
        f"utf8_{_label}_in_unknown_value",
        ev(extra=(("note", b'"' + _bytes + b'"'),)),
        "invalid_utf8",
    )
    bad(f"utf8_{_label}_between_tokens", ev().replace(b",", b"," + _bytes, 1), "invalid_utf8")
    bad(f"utf8_{_label}_in_event_id", ev(event_id=b'"evt' + _bytes + b'"'), "invalid_utf8")
    bad(f"utf8_{_label}_in_ts", ev(ts=b'"2026-11-15T11:59:00Z' + _bytes + b'"'), "invalid_utf8")
bad("utf8_truncated_at_very_end", ev()[:-1] + b'"\xe2\x82', "invalid_utf8")
bad("utf8_alone_on_line", b"\xff", "invalid_utf8")
bad("utf8_only_line_of_spaces", b"  \xc0\xaf  ", "invalid_utf8")

# --------------------------------------------------------------------------- unknown fields

for _label, _raw in (
    ("string", b'"x"'),
    ("empty_string", b'""'),
    ("long_string", s("x" * 5000)),
    ("integer", b"42"),
    ("negative", b"-42"),
    ("huge_integer", b"1" * 5000),
    ("float", b"3.14"),
    ("exponent", b"-1.5E-300"),
    ("huge_exponent", b"1e999999"),
    ("minus_zero_float", b"-0.0"),
    ("true", b"true"),
    ("false", b"false"),
    ("null", b"null"),
    ("empty_object", b"{}"),
    ("empty_array", b"[]"),
    ("nested", b'{"a":[1,{"b":[null,true,"c",{"d":{}}]}],"e":-0.5e1}'),
    ("array_of_everything", b'[1,-1.5,"s",true,false,null,[],{},[[{"x":[]}]]]'),
    ("known_names_nested", b'{"user":"other","input_tokens":-5,"ts":"bad"}'),
    ("whitespace_inside", b'[ 1 , { "a" : [ ] } ]'),
):
    ok(f"unknown_field_{_label}", ev(extra=(("x_extra", _raw),)))
ok("unknown_field_first", ev(first=(("aaa", b'{"z":[1,2]}'),)))
ok("unknown_empty_key", ev(extra=((b"", b"1"),)))
ok("unknown_key_case_differs", ev(extra=(("User", s("not the user")), ("USER", b"1"))))
ok("unknown_key_trailing_space", ev(extra=((b"user ", b"1"),)))
ok("unknown_key_non_ascii", ev(extra=(("usér", b"1"), ("😀", b"[]"))))
ok("unknown_many_fields", ev(extra=tuple((f"k{i}", str(i)) for i in range(500))))
ok("escaped_known_key_counts", ev(user=DROP, extra=((rb"\u0075ser", s("bob")),)), row(user="bob"))
ok(
    "escaped_known_key_all_escaped",
    ev(model=DROP, extra=((rb"\u006d\u006F\u0064\u0065\u006c", s("m-2")),)),
    row(model="m-2"),
)
bad("unknown_field_syntax_error", ev(extra=(("x", b"[1,2"),)), "invalid_json")
bad("unknown_field_bad_literal", ev(extra=(("x", b"tru"),)), "invalid_json")
bad("unknown_field_bad_number", ev(extra=(("x", b"01"),)), "invalid_json")

# --------------------------------------------------------------------------- duplicate keys

bad("dup_known_same_value", ev(extra=(("user", b'"u-1"'),)), "duplicate_field", "user")
bad(
    "dup_known_other_value",
    ev(extra=(("input_tokens", b"999"),)),
    "duplicate_field",
    "input_tokens",
)
bad("dup_known_second_null", ev(extra=(("user", b"null"),)), "duplicate_field", "user")
bad(
    "dup_optional_null_then_value",
    ev(team=b"null", extra=(("team", s("t")),)),
    "duplicate_field",
    "team",
)
bad("dup_ts", ev(extra=(("ts", str(NOW)),)), "duplicate_field", "ts")
bad("dup_unknown", ev(extra=(("x", b"1"), ("x", b"1"))), "duplicate_field", "x")
bad("dup_unknown_empty_key", ev(extra=((b"", b"1"), (b"", b"2"))), "duplicate_field")
bad("dup_nested_object", ev(extra=(("meta", b'{"a":1,"a":2}'),)), "duplicate_field", "a")
bad("dup_nested_in_array", ev(extra=(("meta", b'[1,{"a":1,"b":2,"a":1}]'),)), "duplicate_field", "a")
bad(
    "dup_deeply_nested",
    ev(extra=(("meta", nest(40, "mixed", b'{"q":1,"q":1}')),)),
    "duplicate_field",
    "q",
)
bad("dup_escaped_equal_user", ev(extra=((rb"\u0075ser", s("mallory")),)), "duplicate_field", "user")
bad(
    "dup_escaped_equal_tokens",
    ev(extra=((rb"input\u005ftokens", b"1"),)),
    "duplicate_field",
    "input_tokens",
)
bad(
    "dup_escaped_equal_unknown",
    ev(extra=(("x/y", b"1"), (rb"x\/y", b"2"))),
    "duplicate_field",
    "x/y",
)
bad(
    "dup_escaped_equal_astral",
    ev(extra=(("😀", b"1"), (rb"\ud83d\ude00", b"2"))),
    "duplicate_field",
)
ok("same_key_in_sibling_objects", ev(extra=(("a", b'{"k":1}'), ("b", b'{"k":1}'))))
ok("known_key_also_nested", ev(extra=(("meta", b'{"user":"x","event_id":1}'),)))
ok("keys_differ_by_case", ev(extra=(("x", b"1"), ("X", b"1"))))
# Order: duplicate_field beats field rules; syntax and not_object beat duplicates.
bad(
    "dup_beats_missing_field",
    ev(model=DROP, extra=(("x", b"1"), ("x", b"2"))),
    "duplicate_field",
    "x",
)
bad(
    "dup_beats_wrong_type",
    ev(input_tokens=b'"5"', extra=(("x", b"1"), ("x", b"2"))),
    "duplicate_field",
)
bad("dup_later_syntax_error_wins", ev(extra=(("user", b'"x"'), ("y", b"[1,]"))), "invalid_json")
bad("dup_in_not_object", b'[{"a":1,"a":2}]', "not_object")

# --------------------------------------------------------------------------- syntax

ok("empty_arrays_objects_in_unknown", ev(extra=(("a", b"[ ]"), ("b", b"{ }"))))
for _label, _payload in (
    ("trailing_garbage", ev() + b" x"),
    ("trailing_comma_after_object", ev() + b","),
    ("two_objects_one_line", ev() + ev()),
    ("two_objects_space", ev() + b" " + ev()),
    ("trailing_closing_brace", ev() + b"}"),
    ("trailing_comma_in_object", ev()[:-1] + b",}"),
    ("trailing_comma_in_array", ev(extra=(("a", b"[1,2,]"),))),
    ("leading_comma_in_array", ev(extra=(("a", b"[,1]"),))),
    ("double_comma", ev().replace(b",", b",,", 1)),
    ("leading_comma_in_object", b"{," + ev()[1:]),
    ("missing_comma", ev().replace(b",", b" ", 1)),
    ("missing_colon", ev().replace(b'"user":', b'"user" ')),
    ("double_colon", ev().replace(b'"user":', b'"user"::')),
    ("single_quoted_key", ev().replace(b'"user"', b"'user'")),
    ("single_quoted_value", ev(user=b"'u-1'")),
    ("unquoted_key", ev().replace(b'"user"', b"user")),
    ("number_key", b"{1:2}"),
    ("comment_line", ev() + b" // note"),
    ("comment_block", ev().replace(b",", b"/* c */,", 1)),
    ("unterminated_string", ev()[:-1].replace(b'"m-1"', b'"m-1')),
    ("unterminated_object", ev()[:-1]),
    ("unterminated_nested", ev(extra=(("a", b"{"),))[:-1]),
    ("unclosed_array", ev(extra=(("a", b"[1"),))),
    ("mismatched_brackets", ev(extra=(("a", b"[1}"),))),
    ("closing_brace_only", b"}"),
    ("closing_bracket_only", b"]"),
    ("comma_only", b","),
    ("colon_only", b":"),
    ("empty_key_no_value", b'{"":}'),
    ("object_comma_only", b"{,}"),
    ("open_brace_only", b"{"),
    ("literal_truncated_tru", ev(extra=(("a", b"tru"),))),
    ("literal_capital_true", ev(extra=(("a", b"True"),))),
    ("literal_upper_null", ev(extra=(("a", b"NULL"),))),
    ("literal_nil", ev(extra=(("a", b"nil"),))),
    ("literal_undefined", ev(extra=(("a", b"undefined"),))),
    ("literal_with_suffix", ev(extra=(("a", b"nullx"),))),
    ("literal_run_together", ev(extra=(("a", b"truefalse"),))),
    ("value_missing", ev(extra=(("a", b""),))),
    ("bare_word_line", b"hello"),
    ("python_repr", b"{'event_id': 'evt-1'}"),
    ("string_then_object", b'"x"' + ev()),
    ("garbage_before_object", b"x" + ev()),
    ("nul_after_object", ev() + b"\x00"),
):
    bad(f"syntax_{_label}", _payload, "invalid_json")

# --------------------------------------------------------------------------- not an object

for _label, _payload in (
    ("empty_array", b"[]"),
    ("array_of_event", b"[" + ev() + b"]"),
    ("array_of_events", b"[" + ev() + b"," + ev() + b"]"),
    ("string", b'"evt"'),
    ("string_with_escapes", rb'"\u0041\n"'),
    ("integer", b"123"),
    ("huge_integer", b"9" * 5000),
    ("negative_number", b"-1.5e3"),
    ("true", b"true"),
    ("false", b"false"),
    ("null", b"null"),
    ("padded_number", b"  0  "),
):
    bad(f"not_object_{_label}", _payload, "not_object")
# A syntax error (or lone surrogate) anywhere beats not_object.
bad("not_object_but_syntax_first", b"[1,]", "invalid_json")
bad("not_object_but_lone_surrogate_first", rb'["\udc00"]', "invalid_utf8")
bad("not_object_array_then_garbage", b"[] x", "invalid_json")

# --------------------------------------------------------------------------- nesting depth

for _kind in ("array", "object", "mixed"):
    ok(f"depth_64_{_kind}", ev(extra=(("x", nest(63, _kind)),)))
    bad(f"depth_65_{_kind}", ev(extra=(("x", nest(64, _kind)),)), "too_deep")
    ok(f"depth_64_{_kind}_first", ev(first=(("x", nest(63, _kind)),)))
    bad(f"depth_65_{_kind}_first", ev(first=(("x", nest(64, _kind)),)), "too_deep")
ok("depth_64_empty_innermost", ev(extra=(("x", nest(62, "array", b"[]")),)))
bad("depth_65_empty_innermost", ev(extra=(("x", nest(63, "array", b"{}")),)), "too_deep")
ok("depth_64_many_siblings", ev(extra=tuple((f"x{i}", nest(63, "mixed")) for i in range(20))))
bad("top_level_array_depth_64_is_not_object", nest(64), "not_object")
bad("top_level_array_depth_65", nest(65), "too_deep")
bad("top_level_object_depth_65", nest(65, "object"), "too_deep")
_DEEP = 100_000
bad("deep_100k_open_brackets", b"[" * _DEEP, "too_deep")
bad("deep_100k_balanced_brackets", b"[" * _DEEP + b"]" * _DEEP, "too_deep")
bad("deep_100k_open_objects", b'{"a":' * _DEEP, "too_deep")
bad("deep_100k_balanced_objects", b'{"a":' * _DEEP + b"1" + b"}" * _DEEP, "too_deep")
bad("deep_100k_in_event", ev(extra=(("x", b"[" * _DEEP + b"]" * _DEEP),)), "too_deep")
bad("deep_100k_mixed_unclosed", b'{"x":' + b'[{"a":' * (_DEEP // 2), "too_deep")
# Order: in text order, the first of (syntax error, too deep, lone surrogate) wins.
bad("deep_after_syntax_error", ev(extra=(("a", b"[1,]"), ("x", nest(70)))), "invalid_json")
bad("syntax_error_after_deep", ev(extra=(("x", nest(70)), ("a", b"[1,]"))), "too_deep")
bad("deep_after_lone_surrogate", ev(extra=(("a", rb'"\udc00"'), ("x", nest(70)))), "invalid_utf8")
bad("lone_surrogate_after_deep", ev(extra=(("x", nest(70)), ("a", rb'"\udc00"'))), "too_deep")
bad("deep_beats_missing_field", ev(user=DROP, extra=(("x", nest(65)),)), "too_deep")
bad("deep_beats_duplicate", ev(extra=(("x", nest(65)), ("x", b"1"))), "too_deep")
bad("deep_unclosed_after_65", ev()[:-1] + b',"x":' + b"[" * 65, "too_deep")

# --------------------------------------------------------------------------- order of checks

bad("order_utf8_beats_syntax", b'{"a" x \xff', "invalid_utf8")
bad("order_utf8_after_syntax_error_still_wins", b"{,}\xff", "invalid_utf8")
bad("order_utf8_beats_not_object", b'["\xff"]', "invalid_utf8")
bad("order_utf8_beats_missing", b'{"user":"\xc0\xaf"}', "invalid_utf8")
bad(
    "order_lone_surrogate_before_syntax_error",
    ev(extra=(("a", rb'"\ud800"'), ("b", b"["))),
    "invalid_utf8",
)
bad(
    "order_syntax_error_before_lone_surrogate",
    ev(first=(("b", b"[,"), ("a", rb'"\ud800"'))),
    "invalid_json",
)
bad("order_event_id_before_ts", ev(event_id=b"1", ts=b"true"), "wrong_type", "event_id")
bad("order_ts_before_user", ev(ts=s("bad"), user=b'""'), "invalid_timestamp", "ts")
bad("order_user_before_model", ev(user=b"1", model=DROP), "wrong_type", "user")
bad("order_team_before_model", ev(team=b'""', model=DROP), "invalid_value", "team")
bad("order_model_before_provider", ev(model=b'""', provider=b"1"), "invalid_value", "model")
bad(
    "order_prompt_hash_before_tokens",
    ev(prompt_hash=b"[]", input_tokens=DROP),
    "wrong_type",
    "prompt_hash",
)
bad(
    "order_input_before_output",
    ev(input_tokens=b"-1", output_tokens=b"1.0"),
    "out_of_range",
    "input_tokens",
)
bad(
    "order_output_before_cache_read",
    ev(output_tokens=DROP, cache_read_tokens=b"-1"),
    "missing_field",
    "output_tokens",
)
bad(
    "order_cache_write_before_1h",
    ev(cache_write_tokens=b"true", cache_write_1h_tokens=b"-1"),
    "wrong_type",
    "cache_write_tokens",
)
bad(
    "order_field_order_not_key_order",
    ev(first=(("output_tokens", b'"x"'),), event_id=DROP, output_tokens=DROP),
    "missing_field",
    "event_id",
)
bad(
    "order_reasoning_field_rule_before_cross_check",
    ev(output_tokens=b"1", reasoning_tokens=b"1.5"),
    "wrong_type",
    "reasoning_tokens",
)
bad(
    "order_reasoning_beats_window",
    ev(output_tokens=b"1", reasoning_tokens=b"2", ts=str(NOW + 10 * FUTURE_MS)),
    "out_of_range",
    "reasoning_tokens",
)
bad(
    "order_field_rule_beats_window",
    ev(user=b'""', ts=str(NOW + 10 * FUTURE_MS)),
    "invalid_value",
    "user",
)
bad(
    "order_field_rules_before_reasoning_check",
    ev(reasoning_tokens=b"21", team=b"5"),
    "wrong_type",
    "team",
)

# --------------------------------------------------------------------------- messages, NDJSON


def _ev_n(i: int, **fields: Any) -> bytes:
    return ev(event_id=s(f"evt-{i}"), **fields)


def _row_n(i: int, **values: Any) -> dict[str, Any]:
    return row(event_id=f"evt-{i}", **values)


bad("message_empty", b"", "invalid_json", "message holds no event")
bad("message_none", None, "invalid_json", "message holds no event")
bad("message_only_newlines", b"\n\n\n", "invalid_json", "message holds no event")
bad("message_only_whitespace", b" \t\r\n \r\n\t", "invalid_json", "message holds no event")
bad("message_only_cr", b"\r", "invalid_json", "message holds no event")
case(
    "ndjson_three_events",
    [b"\n".join(_ev_n(i) for i in range(3))],
    *(Row(_row_n(i)) for i in range(3)),
)
case("ndjson_trailing_newline", [_ev_n(0) + b"\n" + _ev_n(1) + b"\n"], Row(_row_n(0)), Row(_row_n(1)))
case("ndjson_crlf", [_ev_n(0) + b"\r\n" + _ev_n(1) + b"\r\n"], Row(_row_n(0)), Row(_row_n(1)))
case(
    "ndjson_crlf_reject_line_numbers",
    [_ev_n(0) + b"\r\n\r\n" + b"{bad}\r\n" + _ev_n(3)],
    Row(_row_n(0)),
    Rej(2, "invalid_json"),
    Row(_row_n(3)),
)
case(
    "ndjson_blank_lines_count",
    [b"\n\n" + _ev_n(2) + b"\n   \n\t\n" + _ev_n(5, user=b"1") + b"\n\n\n" + _ev_n(8)],
    Row(_row_n(2)),
    Rej(5, "wrong_type", "user"),
    Row(_row_n(8)),
)
case(
    "ndjson_mixed_outcomes",
    [b"\n".join([_ev_n(0), b"[]", _ev_n(2, ts=b"1.5"), b"\xff", _ev_n(4), b"{", _ev_n(6)])],
    Row(_row_n(0)),
    Rej(1, "not_object"),
    Rej(2, "wrong_type", "ts"),
    Rej(3, "invalid_utf8"),
    Row(_row_n(4)),
    Rej(5, "invalid_json"),
    Row(_row_n(6)),
)
case(
    "ndjson_all_rejected",
    [b"[]\n{}\n1"],
    Rej(0, "not_object"),
    Rej(1, "missing_field", "event_id"),
    Rej(2, "not_object"),
)
case(
    "ndjson_pretty_printed_object_spans_lines",
    [b'{\n  "event_id": "evt-1",\n  "ts": 0\n}'],
    Rej(0, "invalid_json"),
    Rej(1, "invalid_json"),
    Rej(2, "invalid_json"),
    Rej(3, "invalid_json"),
)
case("ndjson_lone_cr_is_not_a_separator", [_ev_n(0) + b"\r" + _ev_n(1)], Rej(0, "invalid_json"))
case("ndjson_cr_cr_lf", [_ev_n(0) + b"\r\r\n" + _ev_n(1)], Row(_row_n(0)), Row(_row_n(1)))
case("ndjson_same_event_id_twice_both_accepted", [ev() + b"\n" + ev()], Row(row()), Row(row()))
case(
    "ndjson_newline_inside_string_splits_line",
    [ev(user=b'"a\nb"')],
    Rej(0, "invalid_json"),
    Rej(1, "invalid_json"),
)
case(
    "ndjson_invalid_utf8_only_its_line",
    [_ev_n(0) + b"\n" + _ev_n(1, user=b'"\xed\xa0\x80"') + b"\n" + _ev_n(2)],
    Row(_row_n(0)),
    Rej(1, "invalid_utf8"),
    Row(_row_n(2)),
)
case(
    "ndjson_deep_line_between_good_ones",
    [_ev_n(0) + b"\n" + b"[" * 1000 + b"\n" + _ev_n(2)],
    Row(_row_n(0)),
    Rej(1, "too_deep"),
    Row(_row_n(2)),
)
_MANY = 2000
case(
    "ndjson_many_events",
    [b"\n".join(_ev_n(i, input_tokens=str(i)) for i in range(_MANY))],
    *(Row(_row_n(i, input_tokens=i)) for i in range(_MANY)),
)

case(
    "batch_message_index",
    [
        _ev_n(0),
        None,
        _ev_n(2) + b"\n" + _ev_n(3, model=b"7") + b"\n" + _ev_n(4),
        b"",
        b"x" * (MAX_MESSAGE_BYTES + 1),
        b"\n\n" + _ev_n(5),
        _ev_n(6) + b"\n" + _ev_n(7),
    ],
    Row(_row_n(0), msg=0),
    Rej(0, "invalid_json", "message holds no event", msg=1),
    Row(_row_n(2), msg=2),
    Rej(1, "wrong_type", "model", msg=2),
    Row(_row_n(4), msg=2),
    Rej(0, "invalid_json", "message holds no event", msg=3),
    Rej(0, "too_large", msg=4),
    Row(_row_n(5), msg=5),
    Row(_row_n(6), msg=6),
    Row(_row_n(7), msg=6),
)
case("batch_no_payloads", [])
case(
    "batch_all_rejected",
    [b"[]", None, b"{}"],
    Rej(0, "not_object", msg=0),
    Rej(0, "invalid_json", msg=1),
    Rej(0, "missing_field", "event_id", msg=2),
)
case(
    "batch_many_messages",
    [_ev_n(i) for i in range(300)],
    *(Row(_row_n(i), msg=i) for i in range(300)),
)

# --------------------------------------------------------------------------- message size


def _padded(total: int, body: bytes | None = None) -> bytes:
    """The base event padded with an unknown string field to exactly `total` bytes."""
    base = ev(extra=(("pad", b'""'),)) if body is None else body
    payload = base[:-2] + b"x" * (total - len(base)) + base[-2:]
    assert len(payload) == total
    return payload


def _fill(template: bytes, digit: bytes, total: int = MAX_MESSAGE_BYTES) -> bytes:
    """The template with its one "@" replaced by a run of `digit` to exactly `total` bytes."""
    assert template.count(b"@") == 1
    return template.replace(b"@", digit * (total - len(template) + 1))


ok("size_exactly_1mib_valid", _padded(MAX_MESSAGE_BYTES))
ok("size_1mib_minus_1_valid", _padded(MAX_MESSAGE_BYTES - 1))
bad("size_1mib_plus_1_valid_event", _padded(MAX_MESSAGE_BYTES + 1), "too_large", "1048577")
bad("size_1mib_plus_1_garbage", b"\xff" * (MAX_MESSAGE_BYTES + 1), "too_large")
bad("size_1mib_plus_1_blank", b"\n" * (MAX_MESSAGE_BYTES + 1), "too_large")
bad("size_2mib_ndjson", b"\n".join([_padded(MAX_MESSAGE_BYTES // 2)] * 4), "too_large")
bad("size_exactly_1mib_deep", b"[" * MAX_MESSAGE_BYTES, "too_deep")
ok("size_exactly_1mib_huge_unknown_number", _fill(ev(extra=(("n", "@"),)), b"1"))
bad(
    "size_exactly_1mib_huge_token",
    _fill(ev(input_tokens="@"), b"9"),
    "out_of_range",
    "input_tokens",
)
bad("size_exactly_1mib_huge_ts", _fill(ev(ts="@"), b"9"), "invalid_timestamp", "ts")
_HALF = _padded(MAX_MESSAGE_BYTES // 2 - 1)
case("size_exactly_1mib_two_events", [_HALF + b"\n" + _HALF + b"\n"], Row(row()), Row(row()))


def _check_corpus() -> None:
    names = [c.name for c in CASES]
    duplicates = {n for n in names if names.count(n) > 1}
    assert not duplicates, f"duplicate case names: {sorted(duplicates)}"
    for c in CASES:
        if c.name.startswith("size_exactly_1mib"):
            assert sum(len(p or b"") for p in c.payloads) == MAX_MESSAGE_BYTES, c.name


_check_corpus()
