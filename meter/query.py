"""`meter query`: read-only SQL over the lake (see DESIGN.md section 4).

An in-memory DuckDB connection with two views:

* ``events``: every column of `meter.schema.LAKE_EVENTS`, then ``date`` (DATE) and
  ``hour`` (INTEGER), the UTC event-time partition taken from the file's path
  (``events/date=YYYY-MM-DD/hour=HH/``). Filtering on them skips whole files unread.
* ``dlq``: every column of `meter.schema.DLQ`, then ``date`` (DATE, the arrival date).

Each view reads exactly the files the manifest lists, given to ``read_parquet`` as an
explicit list, never a directory glob: a stray, orphaned or forged file is never counted.
A kind with no listed file gets a view with the same columns and no rows, so queries
work on an empty lake. Timestamps are ``TIMESTAMP WITH TIME ZONE`` and the session's
time zone is UTC, so ``ts::DATE`` and ``hour(ts)`` agree with the partitions.

The connection is locked down before the views are created (`lockdown_sql`): DuckDB may
open only the listed files (``allowed_paths`` plus ``enable_external_access = false``),
installs and loads no extension, and no setting can be changed afterwards
(``lock_configuration``). So analyst SQL cannot read other files (``read_csv``,
``glob``, ``read_parquet`` of another path), write any (``COPY ... TO``, ``EXPORT``,
``ATTACH`` of a file), reach the network, or undo the lockdown with ``SET``. Not covered
(a later sandbox issue): CPU, memory and time limits; DuckDB's own spill files for
larger-than-memory queries (``temp_directory``, by default ``.tmp`` in the working
directory); in-memory objects (``CREATE TABLE``, ``ATTACH ':memory:'``) which touch no
file; settings are readable (``current_setting``), including the listed paths.

Results render as an aligned table, CSV or a JSON array (`write_result`); decimals are
printed exactly (never through a float), timestamps as RFC 3339 (``Z`` for instants).
"""

from __future__ import annotations

import csv
import json
import math
import os
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, TextIO, TypeVar

import duckdb
import pyarrow as pa

from meter.lake import KIND_DLQ, KIND_EVENTS, LakePath, abs_path
from meter.manifest import listed_files
from meter.schema import DLQ, LAKE_EVENTS

__all__ = [
    "DLQ_PARTITIONS",
    "EVENTS_PARTITIONS",
    "FORMATS",
    "allowed_paths",
    "duckdb_type",
    "glob_escape",
    "lockdown_sql",
    "open_lake",
    "query",
    "run",
    "sql_identifier",
    "sql_string",
    "view_sql",
    "write_result",
]

#: Hive partition columns each view adds after the file's own columns, with their types.
EVENTS_PARTITIONS: Final[tuple[tuple[str, str], ...]] = (("date", "DATE"), ("hour", "INTEGER"))
DLQ_PARTITIONS: Final[tuple[tuple[str, str], ...]] = (("date", "DATE"),)
FORMATS: Final = ("table", "csv", "json")
DEFAULT_MAX_ROWS: Final = 1000
_BATCH_ROWS: Final = 10_000
_GLOB_CHARS: Final = frozenset("*?[")
_INT64_MAX: Final = 2**63 - 1
_INT32_MAX: Final = 2**31 - 1
_T = TypeVar("_T")


# --- pure: SQL text ---------------------------------------------------------------------


def sql_string(text: str) -> str:
    """A SQL string literal: single quotes, an embedded quote doubled."""
    if "\x00" in text:
        raise ValueError(f"a NUL character cannot be put in a SQL string: {text!r}")
    return "'" + text.replace("'", "''") + "'"


def sql_identifier(name: str) -> str:
    """A quoted SQL identifier: double quotes, an embedded double quote doubled."""
    if "\x00" in name:
        raise ValueError(f"a NUL character cannot be put in a SQL identifier: {name!r}")
    return '"' + name.replace('"', '""') + '"'


def glob_escape(path: str) -> str:
    """``path`` as a DuckDB glob pattern that matches only ``path`` itself.

    DuckDB expands ``*``, ``?`` and ``[...]`` in every path given to ``read_parquet``,
    even in an explicit list; a lake under ``/data/lake[1]`` would otherwise read
    ``/data/lake1``. Each such character becomes a one-character class (``[*]``).
    """
    return "".join(f"[{c}]" if c in _GLOB_CHARS else c for c in path)


def allowed_paths(paths: Iterable[str]) -> list[str]:
    """The ``allowed_paths`` that let the views read ``paths`` (absolute) and nothing else.

    DuckDB checks both the pattern a view passes (`glob_escape`) and the file it
    expands to, so a path with glob characters is allowed in both forms (the pattern
    matches that one file only). Order kept, duplicates dropped.
    """
    out: dict[str, None] = {}
    for p in paths:
        out[p] = None
        out[glob_escape(p)] = None
    return list(out)


_SCALAR_TYPES: Final[dict[pa.DataType, str]] = {
    pa.string(): "VARCHAR",
    pa.large_string(): "VARCHAR",
    pa.binary(): "BLOB",
    pa.large_binary(): "BLOB",
    pa.bool_(): "BOOLEAN",
    pa.int8(): "TINYINT",
    pa.int16(): "SMALLINT",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE",
    pa.date32(): "DATE",
}


def duckdb_type(t: pa.DataType) -> str:
    """The DuckDB type DuckDB gives an Arrow column of type ``t`` read back from Parquet.

    Covers the types of the lake schemas; raises TypeError on anything else, so a new
    column type is noticed here rather than giving the empty view other columns.
    """
    if pa.types.is_timestamp(t):
        return "TIMESTAMP WITH TIME ZONE" if t.tz is not None else "TIMESTAMP"
    if pa.types.is_decimal(t):
        return f"DECIMAL({t.precision}, {t.scale})"
    try:
        return _SCALAR_TYPES[t]
    except KeyError:
        raise TypeError(f"no DuckDB type mapped for Arrow type {t}") from None


def view_sql(
    name: str, schema: pa.Schema, partitions: Sequence[tuple[str, str]], paths: Sequence[str]
) -> str:
    """``CREATE VIEW name`` over exactly ``paths`` (absolute), or over no row when empty.

    Columns: ``schema``'s in order, then the hive ``partitions`` (name, DuckDB type)
    parsed from each path. The projection is explicit so both forms have the same
    columns, and any other ``key=value`` directory above the lake adds none.
    """
    columns = [*(f.name for f in schema), *(p for p, _ in partitions)]
    if not paths:
        types = [*(duckdb_type(f.type) for f in schema), *(t for _, t in partitions)]
        select = ", ".join(
            f"CAST(NULL AS {t}) AS {sql_identifier(c)}" for c, t in zip(columns, types, strict=True)
        )
        return f"CREATE VIEW {sql_identifier(name)} AS SELECT {select} WHERE false"
    files = ", ".join(sql_string(glob_escape(p)) for p in paths)
    hive_types = ", ".join(f"{sql_string(p)}: {t}" for p, t in partitions)
    return (
        f"CREATE VIEW {sql_identifier(name)} AS SELECT "
        + ", ".join(sql_identifier(c) for c in columns)
        + f" FROM read_parquet([{files}], hive_partitioning = true, hive_types = {{{hive_types}}})"
    )


def lockdown_sql(allowed: Sequence[str]) -> list[str]:
    """The statements that lock a fresh connection down, in the order they must run.

    ``allowed_paths`` can only be set while external access is still on, and
    ``lock_configuration`` comes last: after it no ``SET``/``RESET``/``PRAGMA`` of a
    setting is accepted, so analyst SQL cannot undo any of the others.
    """
    return [
        "SET TimeZone = 'UTC'",
        f"SET allowed_paths = [{', '.join(sql_string(p) for p in allowed)}]",
        "SET allowed_directories = []",
        "SET autoinstall_known_extensions = false",
        "SET autoload_known_extensions = false",
        "SET allow_community_extensions = false",
        "SET allow_extension_repositories = 'forbidden'",
        "SET python_enable_replacements = false",
        "SET enable_external_access = false",
        "SET lock_configuration = true",
    ]


# --- I/O: the connection ---------------------------------------------------------------


def _lake_root(lake: LakePath) -> Path:
    root = Path(os.path.abspath(lake))
    if not root.is_dir():
        raise FileNotFoundError(f"no lake directory at {os.fspath(lake)}")
    clash = [p for p in root.parts if p.startswith(("date=", "hour="))]
    if clash:
        # DuckDB takes the first key=value of a path: it would read the partition from here.
        raise ValueError(f"lake path {root} has a partition-like directory {clash[0]!r}")
    return root


def open_lake(lake: LakePath) -> duckdb.DuckDBPyConnection:
    """A locked-down in-memory connection with views ``events`` and ``dlq``.

    Reads the manifest once: files flushed later are not seen by this connection.
    Raises FileNotFoundError if ``lake`` is not a directory, and the manifest's
    errors (`meter.manifest.ManifestCorrupt`) if it contradicts itself.
    """
    root = _lake_root(lake)
    events = [os.fspath(abs_path(root, rel)) for rel in listed_files(root, KIND_EVENTS)]
    dlq = [os.fspath(abs_path(root, rel)) for rel in listed_files(root, KIND_DLQ)]
    con = duckdb.connect(":memory:")
    try:
        for statement in lockdown_sql(allowed_paths([*events, *dlq])):
            con.execute(statement)
        con.execute(view_sql("events", LAKE_EVENTS, EVENTS_PARTITIONS, events))
        con.execute(view_sql("dlq", DLQ, DLQ_PARTITIONS, dlq))
    except BaseException:
        con.close()
        raise
    return con


def _relation(
    con: duckdb.DuckDBPyConnection, sql: str, params: Mapping[str, object] | None
) -> duckdb.DuckDBPyRelation:
    rel = con.sql(sql, params=dict(params) if params else None)
    if rel is None:
        raise ValueError("no SQL statement to run")
    return rel


def query(lake: LakePath, sql: str, params: Mapping[str, object] | None = None) -> pa.Table:
    """Run ``sql`` on `open_lake` and return the whole result.

    ``params`` are bound as prepared parameters (``$name`` in ``sql``). Raises
    ``duckdb.Error`` for SQL errors and ValueError when ``sql`` holds no statement.
    """
    con = open_lake(lake)
    try:
        return _relation(con, sql, params).to_arrow_table()
    finally:
        con.close()


def run(
    lake: LakePath,
    sql: str,
    out: TextIO,
    *,
    fmt: str = "table",
    params: Mapping[str, object] | None = None,
    max_rows: int | None = DEFAULT_MAX_ROWS,
) -> int:
    """Run ``sql`` on `open_lake` and stream the result to ``out``; return rows written."""
    con = open_lake(lake)
    try:
        reader = _relation(con, sql, params).to_arrow_reader(_BATCH_ROWS)
        return write_result(reader, out, fmt, max_rows=max_rows)
    finally:
        con.close()


# --- pure: values as text ----------------------------------------------------------------


def _civil_from_days(days: int) -> tuple[int, int, int]:
    """Proleptic Gregorian (year, month, day) of a day count from 1970-01-01, any range.

    H. Hinnant's algorithm; Python's datetime stops at years 1 and 9999, DuckDB does not.
    """
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


def _format_date(days: int) -> str:
    if abs(days) == _INT32_MAX:  # DuckDB's infinite dates
        return "infinity" if days > 0 else "-infinity"
    y, m, d = _civil_from_days(days)
    year = f"{y:04d}" if 0 <= y <= 9999 else f"{y:+05d}"  # ISO 8601 expanded years
    return f"{year}-{m:02d}-{d:02d}"


_BLOB_ESCAPED: Final = frozenset([*range(0x20), *range(0x7F, 0x100), ord('"'), ord("'"), ord("\\")])
_PER_SECOND: Final = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def _fraction(value: int, per_second: int) -> str:
    """``.fff``, ``.ffffff`` or ``.fffffffff``: the fewest digit groups that are exact."""
    if value == 0:
        return ""
    digits = f"{value:0{len(str(per_second)) - 1}d}".ljust(9, "0")
    while digits.endswith("000"):
        digits = digits[:-3]
    return "." + digits


def _format_time_of_day(seconds: int, frac: int, per_second: int) -> str:
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h:02d}:{m:02d}:{s:02d}{_fraction(frac, per_second)}"


def _format_timestamp(raw: int, unit: str, utc: bool) -> str:
    """RFC 3339 from a raw Arrow timestamp; ``Z`` when it is an instant (has a zone)."""
    if abs(raw) == _INT64_MAX:  # DuckDB's infinite timestamps
        return "infinity" if raw > 0 else "-infinity"
    per = _PER_SECOND[unit]
    seconds, frac = divmod(raw, per)
    days, sod = divmod(seconds, 86_400)
    return f"{_format_date(days)}T{_format_time_of_day(sod, frac, per)}{'Z' if utc else ''}"


def _format_interval(months: int, days: int, nanoseconds: int) -> str:
    """An ISO 8601 duration (``P1M2DT3.5S``), exact."""
    out = "P" + (f"{months}M" if months else "") + (f"{days}D" if days else "")
    if nanoseconds or out == "P":
        out += "T" + format(Decimal(nanoseconds).scaleb(-9).normalize(), "f") + "S"
    return out


def _format_blob(data: bytes) -> str:
    """Bytes as DuckDB casts a BLOB to text: printable ASCII kept, except quotes and
    backslash, the rest as ``\\xHH`` (so the text maps back to the bytes)."""
    return "".join(chr(b) if b not in _BLOB_ESCAPED else f"\\x{b:02X}" for b in data)


def _format_float(v: float) -> float | str:
    if math.isfinite(v):
        return v
    return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")


def _raw_ints(arr: pa.Array, width: pa.DataType) -> list[int | None]:
    return arr.view(width).to_pylist()


def _values(arr: pa.Array) -> list[Any]:
    """JSON-ready Python values of one Arrow array (None for null).

    Decimals become exact strings, timestamps/dates/times RFC 3339 strings, blobs
    DuckDB-style escaped strings, non-finite floats the strings ``NaN``/``Infinity``;
    lists, structs and maps become lists and objects of the same.
    """
    t = arr.type
    if pa.types.is_dictionary(t):
        return _values(arr.dictionary_decode())
    if pa.types.is_decimal(t):
        return [None if v is None else format(v, "f") for v in arr.to_pylist()]
    if pa.types.is_floating(t):
        return [None if v is None else _format_float(v) for v in arr.to_pylist()]
    if pa.types.is_timestamp(t):
        return [
            None if v is None else _format_timestamp(v, t.unit, t.tz is not None)
            for v in _raw_ints(arr, pa.int64())
        ]
    if pa.types.is_date32(t):
        return [None if v is None else _format_date(v) for v in _raw_ints(arr, pa.int32())]
    if pa.types.is_date64(t):
        return [None if v is None else _format_date(v // 86_400_000) for v in _raw_ints(arr, pa.int64())]
    if pa.types.is_time(t):
        per = _PER_SECOND[t.unit]
        width = pa.int32() if pa.types.is_time32(t) else pa.int64()
        return [
            None if v is None else _format_time_of_day(*divmod(v, per), per) for v in _raw_ints(arr, width)
        ]
    if t == pa.month_day_nano_interval():
        return [
            None if v is None else _format_interval(v.months, v.days, v.nanoseconds) for v in arr.to_pylist()
        ]
    if (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
        or pa.types.is_binary_view(t)
    ):
        return [None if v is None else _format_blob(v) for v in arr.to_pylist()]
    if pa.types.is_map(t):
        return _map_values(arr)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _list_values(arr)
    if pa.types.is_struct(t):
        return _struct_values(arr)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return arr.to_pylist()
    if pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_null(t):
        return arr.to_pylist()
    return [None if v is None else str(v) for v in arr.to_pylist()]


def _split(arr: pa.Array, flat: Sequence[_T]) -> list[list[_T] | None]:
    """Cut ``flat`` (the values of a list array's non-null lists) back into lists."""
    out: list[list[_T] | None] = []
    pos = 0
    for n in arr.value_lengths().to_pylist():
        if n is None:
            out.append(None)
        else:
            out.append(list(flat[pos : pos + n]))
            pos += n
    return out


def _list_values(arr: pa.Array) -> list[Any]:
    return _split(arr, _values(arr.flatten()))


def _struct_values(arr: pa.Array) -> list[Any]:
    names = _unique_names([f.name for f in arr.type])
    rows = zip(*(_values(c) for c in arr.flatten()), strict=True) if names else ()
    valid = arr.is_valid().to_pylist()
    if not names:
        return [{} if ok else None for ok in valid]
    return [dict(zip(names, row, strict=True)) if ok else None for ok, row in zip(valid, rows, strict=True)]


def _map_values(arr: pa.Array) -> list[Any]:
    t = arr.type
    entry = pa.struct([t.key_field, t.item_field])
    as_list = arr.cast(pa.list_(entry))  # a map is a list of (key, value) structs
    keys, items = as_list.flatten().flatten()
    pairs = list(zip((_text(k) for k in _values(keys)), _values(items), strict=True))
    return [None if e is None else dict(e) for e in _split(as_list, pairs)]


def _unique_names(names: Sequence[str]) -> list[str]:
    """Names made unique for JSON objects: a repeated ``a`` becomes ``a_2``, ``a_3``..."""
    taken = set(names)
    seen: set[str] = set()
    out = []
    for name in names:
        new, n = name, 1
        while new in seen or (new != name and new in taken):
            n += 1
            new = f"{name}_{n}"
        seen.add(new)
        out.append(new)
    return out


def _text(value: object) -> str | None:
    """A `_values` value as one text cell (table, CSV); nested values as JSON."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def _is_numeric(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _columns(batch: pa.RecordBatch) -> list[list[object]]:
    return [_values(col) for col in batch.columns]


def _rows(batches: Iterable[pa.RecordBatch]) -> Iterator[tuple[object, ...]]:
    for batch in batches:
        if batch.num_rows:
            yield from zip(*_columns(batch), strict=True)


# --- pure: output formats ----------------------------------------------------------------

_TABLE_ESCAPES: Final = {
    c: ({"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(chr(c)) or f"\\x{c:02X}")
    for c in (*range(0x20), *range(0x7F, 0xA0))
}


def _width(text: str) -> int:
    """Terminal columns of ``text``: wide East Asian characters 2, combining marks 0."""
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text
    )


def _pad(text: str, width: int, right: bool) -> str:
    fill = " " * (width - _width(text))
    return fill + text if right else text + fill


def _write_table(
    schema: pa.Schema, batches: Iterable[pa.RecordBatch], out: TextIO, max_rows: int | None
) -> int:
    shown: list[list[str]] = []
    more = False
    for row in _rows(batches):
        if max_rows is not None and len(shown) >= max_rows:
            more = True
            break
        shown.append(["NULL" if v is None else (_text(v) or "").translate(_TABLE_ESCAPES) for v in row])
    names = [f.name.translate(_TABLE_ESCAPES) for f in schema]
    right = [_is_numeric(f.type) for f in schema]
    widths = [max([_width(n), *(_width(r[i]) for r in shown)]) for i, n in enumerate(names)]

    def line(cells: Sequence[str], align: Sequence[bool]) -> str:
        return "  ".join(_pad(c, w, a) for c, w, a in zip(cells, widths, align, strict=True))

    out.write(line(names, right).rstrip() + "\n")
    out.write(line(["-" * w for w in widths], right) + "\n")
    for r in shown:
        out.write(line(r, right).rstrip() + "\n")
    n = len(shown)
    if more:
        out.write(f"({n} row{'' if n == 1 else 's'} shown, more not shown: raise --max-rows)\n")
    else:
        out.write(f"({n} row{'' if n == 1 else 's'})\n")
    return n


def _write_csv(schema: pa.Schema, batches: Iterable[pa.RecordBatch], out: TextIO) -> int:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(schema.names)
    n = 0
    for row in _rows(batches):
        writer.writerow([_text(v) for v in row])  # None is written as an empty field
        n += 1
    return n


def _write_json(schema: pa.Schema, batches: Iterable[pa.RecordBatch], out: TextIO) -> int:
    names = _unique_names(schema.names)
    n = 0
    out.write("[")
    for row in _rows(batches):
        out.write(",\n" if n else "\n")
        out.write(json.dumps(dict(zip(names, row, strict=True)), ensure_ascii=False, allow_nan=False))
        n += 1
    out.write("\n]\n" if n else "]\n")
    return n


def write_result(
    result: pa.RecordBatchReader | pa.Table,
    out: TextIO,
    fmt: str = "table",
    *,
    max_rows: int | None = DEFAULT_MAX_ROWS,
) -> int:
    """Write a query result to ``out`` in ``fmt``; return the rows written.

    * ``table``: aligned columns for a terminal, a header and a rule, numbers
      right-aligned, NULL as ``NULL``, control characters escaped, a row count at the
      end; at most ``max_rows`` rows (None: all), then a note that more were left out.
    * ``csv``: the csv module's quoting, a header row, NULL as an empty field.
    * ``json``: an array of objects, one per row (repeated column names made unique
      with ``_2``...); decimals as exact strings, timestamps RFC 3339.

    Rows are read batch by batch, so CSV and JSON of any size stream in bounded memory.
    """
    batches: Iterable[pa.RecordBatch] = result.to_batches() if isinstance(result, pa.Table) else result
    if fmt == "table":
        return _write_table(result.schema, batches, out, max_rows)
    if fmt == "csv":
        return _write_csv(result.schema, batches, out)
    if fmt == "json":
        return _write_json(result.schema, batches, out)
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
