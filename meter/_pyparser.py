"""Pure-Python reference parser: the usage-event contract written for clarity.

It has the compiled parser's signature and must agree with it on every input
(tests/test_parser_fuzz.py holds the two equal). It does not use `json` or
orjson on purpose: both keep the last of duplicate keys and orjson turns
integers beyond 64 bits into floats, and the contract forbids inheriting either.

Order of checks for one line (the first failure names the reject):
  1. raw bytes are UTF-8                          -> invalid_utf8
  2. JSON syntax, in text order                   -> invalid_json, too_deep,
                                                     invalid_utf8 (lone surrogate escape)
  3. the value is an object                       -> not_object
  4. no object at any depth repeats a key         -> duplicate_field
  5. each field in schema.FIELD_ORDER             -> missing_field, wrong_type,
                                                     out_of_range, invalid_value, invalid_timestamp
  6. reasoning_tokens <= output_tokens            -> out_of_range
  7. ts inside the window around now              -> timestamp_out_of_range
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from meter import reasons as R
from meter.reasons import Reject, format_detail
from meter.schema import (
    DEFAULT_LATENESS_MS,
    EVENTS,
    FIELD_ORDER,
    MAX_DEPTH,
    MAX_FUTURE_MS,
    MAX_MESSAGE_BYTES,
    STRING_FIELDS,
    TOKEN_COLUMNS,
    TOKEN_MAX,
)

_WS = b" \t\r\n"
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_ESCAPES = {
    ord('"'): '"',
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}
_HEX = frozenset(b"0123456789abcdefABCDEF")
_EVENT_ID_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")
_RFC3339 = re.compile(
    rb"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:(Z)|([+-])(\d{2}):(\d{2}))"
)
_INT64_MAX = (1 << 63) - 1
_INT64_MIN = -(1 << 63)
#: A JSON integer with more digits than this is beyond int64 (no leading zeros), so it is
#: rejected without int(), which refuses texts over sys.get_int_max_str_digits() digits.
_MAX_INT_DIGITS = 19


class _Reject(Exception):
    """A line fails: reason code, detail template, field and integer argument."""

    def __init__(self, reason: str, template: int, field: str = "", arg: int = 0, key: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.template = template
        self.field = field
        self.arg = arg
        self.key = key


def _syntax(pos: int) -> _Reject:
    return _Reject(R.INVALID_JSON, 4, arg=pos)


class _Value:
    """A parsed JSON value: its kind and, for strings and numbers, what the fields need."""

    __slots__ = ("is_integer", "kind", "text")

    def __init__(self, kind: int, text: Any = None, is_integer: bool = False):
        self.kind = kind
        self.text = text  # decoded str for strings; raw bytes for numbers
        self.is_integer = is_integer


class _Scanner:
    """Recursive descent over one line's bytes, remembering the first repeated key."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.duplicate: str | None = None

    def skip_ws(self) -> None:
        data, pos = self.data, self.pos
        while pos < len(data) and data[pos] in _WS:
            pos += 1
        self.pos = pos

    def peek(self) -> int:
        return self.data[self.pos] if self.pos < len(self.data) else -1

    def value(self, depth: int) -> _Value | dict[str, _Value]:
        self.skip_ws()
        c = self.peek()
        if c == ord("{"):
            return self.object(depth + 1)
        if c == ord("["):
            self.array(depth + 1)
            return _Value(R.K_ARRAY)
        if c == ord('"'):
            return _Value(R.K_STRING, self.string())
        if c == ord("-") or ord("0") <= c <= ord("9"):
            return self.number()
        for word, kind in ((b"true", R.K_BOOL), (b"false", R.K_BOOL), (b"null", R.K_NULL)):
            if self.data.startswith(word, self.pos):
                self.pos += len(word)
                return _Value(kind)
        raise _syntax(self.pos)

    def object(self, depth: int) -> dict[str, _Value]:
        if depth > MAX_DEPTH:
            raise _Reject(R.TOO_DEEP, 5, arg=self.pos)
        self.pos += 1
        members: dict[str, _Value] = {}
        self.skip_ws()
        if self.peek() == ord("}"):
            self.pos += 1
            return members
        while True:
            self.skip_ws()
            if self.peek() != ord('"'):
                raise _syntax(self.pos)
            key = self.string()
            repeated = key in members
            if repeated and self.duplicate is None:
                self.duplicate = key
            self.skip_ws()
            if self.peek() != ord(":"):
                raise _syntax(self.pos)
            self.pos += 1
            item = self.value(depth)
            if not repeated:
                members[key] = item if isinstance(item, _Value) else _Value(R.K_OBJECT)
            self.skip_ws()
            c = self.peek()
            self.pos += 1
            if c == ord("}"):
                return members
            if c != ord(","):
                raise _syntax(self.pos - 1)

    def array(self, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise _Reject(R.TOO_DEEP, 5, arg=self.pos)
        self.pos += 1
        self.skip_ws()
        if self.peek() == ord("]"):
            self.pos += 1
            return
        while True:
            self.value(depth)
            self.skip_ws()
            c = self.peek()
            self.pos += 1
            if c == ord("]"):
                return
            if c != ord(","):
                raise _syntax(self.pos - 1)

    def number(self) -> _Value:
        match = _NUMBER.match(self.data, self.pos)
        if match is None:
            raise _syntax(self.pos)
        self.pos = match.end()
        is_integer = match.group(1) is None and match.group(2) is None
        return _Value(R.K_INTEGER if is_integer else R.K_NUMBER, match.group(0), is_integer)

    def hex4(self, at: int) -> int:
        digits = self.data[at : at + 4]
        if len(digits) != 4 or any(b not in _HEX for b in digits):
            raise _syntax(at)
        return int(digits, 16)

    def string(self) -> str:
        data = self.data
        pos = self.pos + 1
        out: list[str] = []
        start = pos
        while True:
            if pos >= len(data):
                raise _syntax(pos)
            c = data[pos]
            if c == ord('"'):
                out.append(data[start:pos].decode("utf-8"))
                self.pos = pos + 1
                return "".join(out)
            if c < 0x20:
                raise _syntax(pos)
            if c != ord("\\"):
                pos += 1
                continue
            out.append(data[start:pos].decode("utf-8"))
            escape_at = pos
            code = data[pos + 1] if pos + 1 < len(data) else -1
            if code in _ESCAPES:
                out.append(_ESCAPES[code])
                pos += 2
            elif code == ord("u"):
                unit = self.hex4(pos + 2)
                pos += 6
                if 0xDC00 <= unit <= 0xDFFF:
                    raise _Reject(R.INVALID_UTF8, 3, arg=escape_at)
                if 0xD800 <= unit <= 0xDBFF:
                    if data[pos : pos + 2] != b"\\u":
                        raise _Reject(R.INVALID_UTF8, 3, arg=escape_at)
                    low = self.hex4(pos + 2)
                    if not 0xDC00 <= low <= 0xDFFF:
                        raise _Reject(R.INVALID_UTF8, 3, arg=escape_at)
                    pos += 6
                    unit = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)
                out.append(chr(unit))
            else:
                raise _syntax(pos + 1)
            start = pos


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _days_in_month(y: int, m: int) -> int:
    if m == 2:
        return 29 if (y % 4 == 0 and y % 100 != 0) or y % 400 == 0 else 28
    return 30 if m in (4, 6, 9, 11) else 31


def parse_rfc3339_ms(text: bytes) -> int:
    """UTC epoch milliseconds of an RFC 3339 date-time; sub-millisecond digits are truncated."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise _Reject(R.INVALID_TIMESTAMP, 15, "ts")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, zulu, sign, off_h, off_m = match.groups()[6:]
    if not (
        year >= 1
        and 1 <= month <= 12
        and 1 <= day <= _days_in_month(year, month)
        and hour <= 23
        and minute <= 59
        and second <= 59
        and (zulu or (int(off_h) <= 23 and int(off_m) <= 59))
    ):
        raise _Reject(R.INVALID_TIMESTAMP, 16, "ts")
    millis = int((fraction or b"").ljust(3, b"0")[:3])
    offset_s = 0 if zulu else (1 if sign == b"+" else -1) * (int(off_h) * 3600 + int(off_m) * 60)
    seconds = _days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second
    return (seconds - offset_s) * 1000 + millis


def _check_string(name: str, value: _Value) -> str:
    if value.kind != R.K_STRING:
        raise _Reject(R.WRONG_TYPE, 10, name, value.kind)
    text: str = value.text
    encoded = text.encode("utf-8")
    limit = STRING_FIELDS[name][1]
    if not 1 <= len(encoded) <= limit:
        raise _Reject(R.INVALID_VALUE, 12, name, len(encoded))
    if name == "event_id":
        if any(b not in _EVENT_ID_CHARS for b in encoded):
            raise _Reject(R.INVALID_VALUE, 14, name)
    elif any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F for ch in text):
        raise _Reject(R.INVALID_VALUE, 13, name)
    return text


def _small_int(text: bytes) -> int | None:
    """The value of a JSON integer's text, or None when it has too many digits for int64."""
    if len(text) - text.startswith(b"-") > _MAX_INT_DIGITS:
        return None
    return int(text)


def _check_tokens(name: str, value: _Value) -> int:
    if value.kind != R.K_INTEGER:
        raise _Reject(R.WRONG_TYPE, 10, name, value.kind)
    number = _small_int(value.text)
    if number is None or not 0 <= number <= TOKEN_MAX:
        raise _Reject(R.OUT_OF_RANGE, 11, name)
    return number


def _check_ts(value: _Value) -> int:
    if value.kind == R.K_STRING:
        return parse_rfc3339_ms(value.text.encode("utf-8"))
    if value.kind == R.K_INTEGER:
        number = _small_int(value.text)
        if number is None or not _INT64_MIN <= number <= _INT64_MAX:
            raise _Reject(R.INVALID_TIMESTAMP, 17, "ts")
        return number
    raise _Reject(R.WRONG_TYPE, 10, "ts", value.kind)


def _event(line: bytes, now_ms: int, lateness_ms: int) -> dict[str, Any]:
    """Validate one non-blank line and return its row, or raise _Reject."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _Reject(R.INVALID_UTF8, 2, arg=error.start) from None
    scanner = _Scanner(line)
    top = scanner.value(0)
    scanner.skip_ws()
    if scanner.pos != len(line):
        raise _syntax(scanner.pos)
    if not isinstance(top, dict):
        raise _Reject(R.NOT_OBJECT, 6, arg=top.kind)
    if scanner.duplicate is not None:
        raise _Reject(R.DUPLICATE_FIELD, 7, key=scanner.duplicate)
    row: dict[str, Any] = {}
    for name in FIELD_ORDER:
        value = top.get(name)
        required = name in ("ts", "input_tokens", "output_tokens") or STRING_FIELDS.get(name, (False, 0))[0]
        if value is None or value.kind == R.K_NULL:
            if required:
                raise _Reject(R.MISSING_FIELD, 8 if value is None else 9, name)
            row[name] = 0 if name in TOKEN_COLUMNS else None
        elif name == "ts":
            row[name] = _check_ts(value)
        elif name in TOKEN_COLUMNS:
            row[name] = _check_tokens(name, value)
        else:
            row[name] = _check_string(name, value)
    if row["reasoning_tokens"] > row["output_tokens"]:
        raise _Reject(R.OUT_OF_RANGE, 20, "reasoning_tokens")
    if row["ts"] > now_ms + MAX_FUTURE_MS:
        raise _Reject(R.TIMESTAMP_OUT_OF_RANGE, 18, "ts", row["ts"])
    if row["ts"] < now_ms - lateness_ms:
        raise _Reject(R.TIMESTAMP_OUT_OF_RANGE, 19, "ts", row["ts"])
    return row


def _lines(payload: bytes) -> list[tuple[int, bytes]]:
    """Non-blank lines of a message with their 0-based line numbers; a trailing CR is dropped."""
    out = []
    for number, line in enumerate(payload.split(b"\n")):
        if line.endswith(b"\r"):
            line = line[:-1]
        if line.strip(_WS):
            out.append((number, line))
    return out


class PyParseResult:
    """Accepted rows as an Arrow batch, rejects, and where each row came from (message, line)."""

    __slots__ = ("batch", "line_index", "message_index", "rejects")

    def __init__(
        self,
        batch: pa.RecordBatch,
        rejects: list[Reject],
        message_index: pa.Array,
        line_index: pa.Array,
    ):
        self.batch = batch
        self.rejects = rejects
        self.message_index = message_index
        self.line_index = line_index


def parse_batch(
    payloads: Sequence[bytes | None],
    now_ms: int | None = None,
    lateness_ms: int = DEFAULT_LATENESS_MS,
) -> PyParseResult:
    """Parse and validate Kafka message payloads (one or more NDJSON events each)."""
    if now_ms is None:
        now_ms = time.time_ns() // 1_000_000
    rows: list[dict[str, Any]] = []
    origins: list[int] = []
    line_numbers: list[int] = []
    rejects: list[Reject] = []
    for index, payload in enumerate(payloads):
        data = b"" if payload is None else bytes(payload)
        if len(data) > MAX_MESSAGE_BYTES:
            rejects.append(Reject(index, 0, R.TOO_LARGE, format_detail(1, arg=len(data))))
            continue
        lines = _lines(data)
        if not lines:
            rejects.append(Reject(index, 0, R.INVALID_JSON, format_detail(0)))
        for number, line in lines:
            try:
                rows.append(_event(line, now_ms, lateness_ms))
                origins.append(index)
                line_numbers.append(number)
            except _Reject as bad:
                detail = format_detail(bad.template, bad.field, bad.arg, bad.key)
                rejects.append(Reject(index, number, bad.reason, detail))
    columns = {name: [row[name] for row in rows] for name in EVENTS.names}
    batch = pa.RecordBatch.from_pydict(columns, schema=EVENTS)
    return PyParseResult(
        batch, rejects, pa.array(origins, type=pa.int32()), pa.array(line_numbers, type=pa.int32())
    )
