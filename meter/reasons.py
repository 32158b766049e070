"""Reject reason codes: stable names that tests, DLQ rows and dashboards depend on."""

from __future__ import annotations

from typing import Final, NamedTuple

INVALID_JSON: Final = "invalid_json"
INVALID_UTF8: Final = "invalid_utf8"
NOT_OBJECT: Final = "not_object"
MISSING_FIELD: Final = "missing_field"
WRONG_TYPE: Final = "wrong_type"
OUT_OF_RANGE: Final = "out_of_range"
INVALID_VALUE: Final = "invalid_value"
INVALID_TIMESTAMP: Final = "invalid_timestamp"
TIMESTAMP_OUT_OF_RANGE: Final = "timestamp_out_of_range"
DUPLICATE_FIELD: Final = "duplicate_field"
TOO_LARGE: Final = "too_large"
TOO_DEEP: Final = "too_deep"
UNKNOWN_MODEL: Final = "unknown_model"
UNSIGNED: Final = "unsigned"
BAD_SIGNATURE: Final = "bad_signature"
DUPLICATE_EVENT: Final = "duplicate_event"

#: Reasons the parser can give, in the order of its numeric codes (the compiled parser uses the index).
PARSER_REASONS: tuple[str, ...] = (
    INVALID_JSON,
    INVALID_UTF8,
    NOT_OBJECT,
    MISSING_FIELD,
    WRONG_TYPE,
    OUT_OF_RANGE,
    INVALID_VALUE,
    INVALID_TIMESTAMP,
    TIMESTAMP_OUT_OF_RANGE,
    DUPLICATE_FIELD,
    TOO_LARGE,
    TOO_DEEP,
)
ALL_REASONS: tuple[str, ...] = (*PARSER_REASONS, UNKNOWN_MODEL, UNSIGNED, BAD_SIGNATURE, DUPLICATE_EVENT)


class Reject(NamedTuple):
    """One rejected event (or whole message): where it was, why, and a detail naming the field."""

    message_index: int
    line: int
    reason: str
    detail: str


# Detail templates shared by both parsers, so a reject reads the same whichever produced it.
# The compiled parser records (template index, field, integer argument); both format here.
DETAILS: tuple[str, ...] = (
    "message holds no event",  # 0
    "message is {arg} bytes; the limit is 1048576",  # 1
    "invalid UTF-8 at byte {arg}",  # 2
    "lone surrogate escape at byte {arg}",  # 3
    "malformed JSON at byte {arg}",  # 4
    "nesting deeper than 64 levels at byte {arg}",  # 5
    "top-level value is {kind}, not an object",  # 6
    "field {key} occurs twice",  # 7
    "{field} is missing",  # 8
    "{field} is null",  # 9
    "{field}: expected {expected}, got {kind}",  # 10
    "{field}: not in 0..1000000000",  # 11
    "{field}: length {arg} bytes not in 1..{max} bytes",  # 12
    "{field}: contains a control character",  # 13
    "{field}: only A-Z a-z 0-9 . _ : - are allowed",  # 14
    "ts: not an RFC 3339 date-time with seconds and a Z or +hh:mm offset",  # 15
    "ts: not a real calendar instant",  # 16
    "ts: epoch milliseconds out of range",  # 17
    "ts is more than 5 minutes ahead of the clock ({arg} ms)",  # 18
    "ts is older than the lateness window ({arg} ms)",  # 19
    "reasoning_tokens exceeds output_tokens",  # 20
)

#: JSON kinds as named in details; index = kind code.
KINDS: tuple[str, ...] = ("an object", "an array", "a string", "an integer", "a number", "a boolean", "null")
K_OBJECT, K_ARRAY, K_STRING, K_INTEGER, K_NUMBER, K_BOOL, K_NULL = range(7)


def format_detail(template: int, field: str = "", arg: int = 0, key: str = "") -> str:
    """Render a detail template; `arg` doubles as a kind code for type errors."""
    from meter.schema import STRING_FIELDS

    text = DETAILS[template]
    kind = KINDS[arg] if template in (6, 10) and 0 <= arg < len(KINDS) else ""
    expected = "a string" if field in STRING_FIELDS else "an integer"
    if field == "ts":
        expected = "a string or an integer"
    limit = STRING_FIELDS.get(field, (False, 0))[1]
    return text.format(arg=arg, field=field, kind=kind, expected=expected, max=limit, key=key)
