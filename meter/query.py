"""`meter query`: read-only SQL over the lake, in a sandbox (see DESIGN.md section 4).

An in-memory DuckDB connection with these views:

* ``events``: every column of `meter.schema.LAKE_EVENTS`, then ``date`` (DATE) and
  ``hour`` (INTEGER), the UTC event-time partition taken from the file's path
  (``events/date=YYYY-MM-DD/hour=HH/``). Filtering on them skips whole files unread.
* ``dlq``: every column of `meter.schema.DLQ`, then ``date`` (DATE, the arrival date).
* ``rollup_minute``, ``rollup_hour``, ``rollup_day``: `meter.rollup.ROLLUP` (bucket start
  ``ts``, the six dimensions, the summed measures, ``price_versions``), then ``date``
  and, but for the day grain, ``hour``.
* ``prices``: the price catalog's entries (`prices_sql`), USD per million tokens.

Each file view reads exactly the files the manifest (and the rollup records) list,
given to ``read_parquet`` as an explicit list, never a directory glob: a stray,
orphaned or forged file is never counted. The listing is read once, so every view
shows the same instant of the lake. A view with no listed file has the same columns
and no rows, so queries work on an empty lake. Timestamps are ``TIMESTAMP WITH TIME
ZONE`` and the session's time zone is UTC, so ``ts::DATE`` and ``hour(ts)`` agree with
the partitions.

The sandbox, in layers (`docs/query-sandbox.md` lists what each one stops):

1. Only ``SELECT`` statements run (`check_sql`): no ``COPY``, ``EXPORT``, ``ATTACH``,
   ``INSTALL``/``LOAD``, ``SET``/``PRAGMA``/``CALL``, ``CREATE``. This layer is needed,
   not just prudent: DuckDB lets ``COPY ... TO '<a listed file>' (USE_TMP_FILE false)``
   overwrite a lake file that ``allowed_paths`` admits, even with external access off.
2. The connection is locked down before the views exist (`lockdown_sql`): DuckDB may
   open only the listed files (``allowed_paths`` plus ``enable_external_access =
   false``), installs and loads no extension, scans no Python object, spills nothing to
   disk (no ``temp_directory``), runs under a ``memory_limit``, and accepts no setting
   change afterwards (``lock_configuration``).
3. Every listed file must be a regular file reached without a symbolic link below the
   lake's root (`lake_file`), so a link planted in the lake cannot lead a view out.
4. A timer interrupts the query at the time limit (DuckDB has no statement timeout).

`open_lake` returns the locked connection for trusted code; analyst SQL goes through
`query`, `run` or `export_parquet`, which add layers 1 and 4. Not covered: CPU beyond
the time limit (set ``threads`` to bound it); memory Python holds for a result returned
whole by `query` (`run` and `export_parquet` stream); settings are readable
(``current_setting``), including the listed paths; in-memory objects (``CREATE``) are
refused though they would touch no file.

Results render as an aligned table, CSV or a JSON array (`write_result`), or go to a
Parquet file (`export_parquet`); decimals are printed exactly (never through a float),
timestamps as RFC 3339 (``Z`` for instants).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import stat
import threading
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import Any, Final, TextIO, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from meter.lake import KIND_DLQ, KIND_EVENTS, LakePath, new_token
from meter.manifest import listed_records
from meter.pricing import PRICE_KEYS, Catalog, load_catalog
from meter.rollup import rollup_views
from meter.schema import DLQ, LAKE_EVENTS

__all__ = [
    "DEFAULT_LIMITS",
    "DLQ_PARTITIONS",
    "EVENTS_PARTITIONS",
    "FORMATS",
    "PRICES_COLUMNS",
    "ROLLUP_PARTITIONS",
    "Limits",
    "QueryError",
    "QueryOutOfMemory",
    "QueryRefused",
    "QueryTimeout",
    "allowed_paths",
    "check_sql",
    "duckdb_type",
    "export_parquet",
    "glob_escape",
    "lake_file",
    "lockdown_sql",
    "open_lake",
    "parse_size",
    "prices_sql",
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
ROLLUP_PARTITIONS: Final[dict[str, tuple[tuple[str, str], ...]]] = {
    "minute": EVENTS_PARTITIONS,
    "hour": EVENTS_PARTITIONS,
    "day": DLQ_PARTITIONS,
}
FORMATS: Final = ("table", "csv", "json")
DEFAULT_MAX_ROWS: Final = 1000
_BATCH_ROWS: Final = 10_000
_GLOB_CHARS: Final = frozenset("*?[")
_INT64_MAX: Final = 2**63 - 1
_INT32_MAX: Final = 2**31 - 1
_T = TypeVar("_T")


class QueryError(ValueError):
    """A query the sandbox refused or stopped; the message says why and what to change."""


class QueryRefused(QueryError):
    """Not run: a statement other than SELECT, a lake file that is not a plain file, an
    output inside the lake."""


class QueryTimeout(QueryError):
    """Interrupted at the time limit."""


class QueryOutOfMemory(QueryError):
    """DuckDB needed more than the memory limit (and may not spill to disk)."""


# --- pure: limits ---------------------------------------------------------------------------

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_SIZE_UNITS: Final = {
    "b": 1,
    **{f"{u}b": 1000 ** (i + 1) for i, u in enumerate("kmgt")},
    **{f"{u}ib": 1024 ** (i + 1) for i, u in enumerate("kmgt")},
}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``512MB``, ``2GiB``, ``1.5GB`` or ``1048576`` (bytes)."""
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"not a size: {text!r} (examples: 512MB, 2GiB, 1073741824)")
    n = int(Decimal(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()])
    if n < 1:
        raise ValueError(f"size must be at least 1 byte, got {text!r}")
    return n


@dataclass(frozen=True, slots=True)
class Limits:
    """What one query may use. Validates itself.

    * ``timeout_s``: wall-clock seconds before the query is interrupted (None: none).
    * ``memory_limit``: bytes DuckDB may hold; with nothing spilled to disk, a query
      that needs more fails (`QueryOutOfMemory`).
    * ``threads``: DuckDB worker threads (None: one per core).
    """

    timeout_s: float | None = 120.0
    memory_limit: int = 2 << 30
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.timeout_s is not None and (
            not isinstance(self.timeout_s, int | float) or not 0 < self.timeout_s < float("inf")
        ):
            raise ValueError(f"timeout must be a number of seconds > 0, got {self.timeout_s!r}")
        if isinstance(self.memory_limit, bool) or not isinstance(self.memory_limit, int):
            raise ValueError(f"memory_limit must be an int of bytes, got {self.memory_limit!r}")
        if self.memory_limit < 1 << 20:
            raise ValueError(f"memory_limit must be at least 1 MiB, got {self.memory_limit} bytes")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be >= 1, got {self.threads!r}")


DEFAULT_LIMITS: Final = Limits()


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
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"{duckdb_type(t.value_type)}[]"
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


def lockdown_sql(allowed: Sequence[str], limits: Limits = DEFAULT_LIMITS) -> list[str]:
    """The statements that lock a fresh connection down, in the order they must run.

    ``allowed_paths`` can only be set while external access is still on, and
    ``lock_configuration`` comes last: after it no ``SET``/``RESET``/``PRAGMA`` of a
    setting is accepted, so analyst SQL cannot undo any of the others. No temp
    directory and a zero spill budget: a query past the memory limit fails instead of
    writing spill files (by default into ``.tmp`` of the working directory).
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
        f"SET memory_limit = '{limits.memory_limit}B'",
        "SET temp_directory = ''",
        "SET max_temp_directory_size = '0B'",
        *([f"SET threads = {limits.threads}"] if limits.threads is not None else []),
        "SET enable_external_access = false",
        "SET lock_configuration = true",
    ]


def check_sql(sql: str) -> None:
    """Refuse ``sql`` unless every statement in it is a SELECT (sandbox layer 1).

    SELECT covers ``WITH``, ``VALUES``, ``FROM``-first queries, ``DESCRIBE``, ``SHOW``,
    ``SUMMARIZE`` and ``UNPIVOT``. A ``PIVOT`` without an ``IN`` list is refused (DuckDB
    runs it as several statements, one a ``CREATE TYPE``): list the values. Raises
    `QueryRefused`, ValueError when there is no statement, ``duckdb.ParserException``
    on a syntax error.
    """
    statements = duckdb.extract_statements(sql)
    if not statements:
        raise ValueError("no SQL statement to run")
    for st in statements:
        if st.type != duckdb.StatementType.SELECT:
            text = " ".join(st.query.split())
            if len(text) > 60:
                text = text[:57] + "..."
            hint = " (a PIVOT needs an IN list of its values)" if st.type.name == "MULTI" else ""
            raise QueryRefused(
                "only SELECT statements run here (the lake is read-only); "
                f"refused {st.type.name}: {text}{hint}"
            )


#: The ``prices`` view's columns: one row per catalog entry, prices in USD per million tokens.
PRICES_COLUMNS: Final[tuple[tuple[str, str], ...]] = (
    ("id", "VARCHAR"),
    ("provider", "VARCHAR"),
    ("version", "VARCHAR"),
    ("aliases", "VARCHAR[]"),
    ("effective_from", "TIMESTAMP WITH TIME ZONE"),
    ("effective_to", "TIMESTAMP WITH TIME ZONE"),
    *((key, "DECIMAL(18, 6)") for key in PRICE_KEYS),
)


def prices_sql(catalog: Catalog) -> str:
    """``CREATE VIEW prices`` over the catalog's entries, as literal rows (no file).

    ``version`` is what the lake stores beside each cost (``price_version``), so
    ``events JOIN prices ON price_version = version`` finds the prices an event was
    billed at. ``effective_to`` is NULL for an entry still in force.
    """
    names = ", ".join(sql_identifier(c) for c, _ in PRICES_COLUMNS)
    if not catalog.entries:
        select = ", ".join(f"CAST(NULL AS {t}) AS {sql_identifier(c)}" for c, t in PRICES_COLUMNS)
        return f"CREATE VIEW prices AS SELECT {select} WHERE false"

    def instant(ms: int | None) -> str:
        return "NULL" if ms is None else f"make_timestamptz({ms * 1000})"

    rows = []
    for e in catalog.entries:
        values = [
            sql_string(e.id),
            sql_string(e.provider),
            sql_string(e.version),
            "[" + ", ".join(sql_string(a) for a in e.aliases) + "]",
            instant(e.effective_from_ms),
            instant(e.effective_to_ms),
            *(sql_string(format(Decimal(p).scaleb(-6), "f")) for p in e.prices),
        ]
        rows.append(
            "("
            + ", ".join(f"CAST({v} AS {t})" for v, (_, t) in zip(values, PRICES_COLUMNS, strict=True))
            + ")"
        )
    return f"CREATE VIEW prices AS SELECT * FROM (VALUES {', '.join(rows)}) AS p({names})"


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


_DATA_DIRS: Final = frozenset({KIND_EVENTS, KIND_DLQ, "rollups"})


def lake_file(root: Path, rel: str, checked: set[Path] | None = None) -> str:
    """The absolute path of the listed file ``rel``, once it is safe to let DuckDB read.

    Sandbox layer 3: ``rel`` must be a plain relative path into a data directory, and
    every directory below ``root`` on the way and the file itself must be real (no
    symbolic link, which DuckDB would follow out of the lake; no device or FIFO).
    ``checked`` caches directories already checked. Raises `QueryRefused`.
    """
    pure = PurePosixPath(rel)
    if pure.is_absolute() or pure.as_posix() != rel or ".." in pure.parts or pure.parts[0] not in _DATA_DIRS:
        raise QueryRefused(f"refusing to query: the manifest lists {rel!r}, not a path in the lake")
    checked = set() if checked is None else checked
    d = root
    for part in pure.parts[:-1]:
        d = d / part
        if d in checked:
            continue
        try:
            mode = os.lstat(d).st_mode
        except FileNotFoundError:
            raise QueryRefused(f"refusing to query: listed file {rel} is missing (run meter audit)") from None
        if not stat.S_ISDIR(mode):
            what = "a symbolic link" if stat.S_ISLNK(mode) else "not a directory"
            raise QueryRefused(
                f"refusing to query: {d.relative_to(root).as_posix()} in the lake is {what} (run meter audit)"
            )
        checked.add(d)
    path = d / pure.parts[-1]
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise QueryRefused(f"refusing to query: listed file {rel} is missing (run meter audit)") from None
    if not stat.S_ISREG(mode):
        what = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
        raise QueryRefused(f"refusing to query: listed file {rel} is {what} (run meter audit)")
    return os.fspath(path)


def open_lake(
    lake: LakePath, *, limits: Limits = DEFAULT_LIMITS, catalog: Catalog | None = None
) -> duckdb.DuckDBPyConnection:
    """A locked-down in-memory connection with the views of the module doc.

    For trusted code: analyst SQL must go through `query`, `run` or `export_parquet`
    (the lockdown alone lets a ``COPY`` overwrite a listed file). Reads the manifest
    once: files flushed later are not seen by this connection. ``catalog`` feeds the
    ``prices`` view (default: the packaged catalog). Raises FileNotFoundError if
    ``lake`` is not a directory, `QueryRefused` for a listed file that is not a plain
    file in the lake, and the manifest's errors (`meter.manifest.ManifestCorrupt`).
    """
    root = _lake_root(lake)
    checked: set[Path] = set()
    listed = listed_records(root)  # one read: events and DLQ of the same instant
    events = [lake_file(root, f.path, checked) for f in listed if f.kind == KIND_EVENTS]
    dlq = [lake_file(root, f.path, checked) for f in listed if f.kind == KIND_DLQ]
    rollups = [
        (v.name, v.schema, v.partitions, [lake_file(root, p, checked) for p in v.files])
        for v in rollup_views(root)
    ]
    prices = prices_sql(load_catalog() if catalog is None else catalog)
    allowed = allowed_paths([*events, *dlq, *(p for *_, paths in rollups for p in paths)])
    con = duckdb.connect(":memory:")
    try:
        for statement in lockdown_sql(allowed, limits):
            con.execute(statement)
        con.execute(view_sql("events", LAKE_EVENTS, EVENTS_PARTITIONS, events))
        con.execute(view_sql("dlq", DLQ, DLQ_PARTITIONS, dlq))
        for name, schema, partitions, paths in rollups:
            con.execute(view_sql(name, schema, partitions, paths))
        con.execute(prices)
    except BaseException:
        con.close()
        raise
    return con


def _format_size(n: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        scale = {"GiB": 1 << 30, "MiB": 1 << 20, "KiB": 1 << 10}[unit]
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n} bytes"


@contextmanager
def _limited(con: duckdb.DuckDBPyConnection, limits: Limits) -> Iterator[None]:
    """Sandbox layer 4 (the time limit), and limit errors in the sandbox's words."""
    fired = threading.Event()
    timer: threading.Timer | None = None
    if limits.timeout_s is not None:

        def stop() -> None:
            fired.set()
            with suppress(duckdb.Error):  # closed meanwhile: the query is over anyway
                con.interrupt()

        timer = threading.Timer(limits.timeout_s, stop)
        timer.daemon = True
        timer.start()
    try:
        yield
    except (duckdb.InterruptException, duckdb.OutOfMemoryException, OSError) as error:
        # A streamed result (an Arrow reader) reports DuckDB's errors as OSError.
        text = str(error)
        if fired.is_set() and (isinstance(error, duckdb.InterruptException) or "INTERRUPT" in text):
            raise QueryTimeout(
                f"query stopped at the time limit of {limits.timeout_s:g} s (raise it with --timeout)"
            ) from None
        if isinstance(error, duckdb.OutOfMemoryException) or text.startswith("Out of Memory Error"):
            raise QueryOutOfMemory(
                f"query needs more memory than its limit of {_format_size(limits.memory_limit)} and may "
                f"not spill to disk (raise it with --memory-limit): {text.splitlines()[0]}"
            ) from None
        raise
    finally:
        if timer is not None:
            timer.cancel()


@contextmanager
def _sandbox(
    lake: LakePath, sql: str, limits: Limits, catalog: Catalog | None
) -> Iterator[duckdb.DuckDBPyConnection]:
    check_sql(sql)
    con = open_lake(lake, limits=limits, catalog=catalog)
    try:
        with _limited(con, limits):
            yield con
    finally:
        con.close()


def _relation(
    con: duckdb.DuckDBPyConnection, sql: str, params: Mapping[str, object] | None
) -> duckdb.DuckDBPyRelation:
    rel = con.sql(sql, params=dict(params) if params else None)
    if rel is None:
        raise ValueError("no SQL statement to run")
    return rel


def query(
    lake: LakePath,
    sql: str,
    params: Mapping[str, object] | None = None,
    *,
    limits: Limits = DEFAULT_LIMITS,
    catalog: Catalog | None = None,
) -> pa.Table:
    """Run analyst ``sql`` in the sandbox and return the whole result as an Arrow table.

    ``params`` are bound as prepared parameters (``$name`` in ``sql``). Raises
    `QueryRefused`, `QueryTimeout`, `QueryOutOfMemory` (all `QueryError`, a ValueError),
    ``duckdb.Error`` for SQL errors, ValueError when ``sql`` holds no statement.
    """
    with _sandbox(lake, sql, limits, catalog) as con:
        return _relation(con, sql, params).to_arrow_table()


def run(
    lake: LakePath,
    sql: str,
    out: TextIO,
    *,
    fmt: str = "table",
    params: Mapping[str, object] | None = None,
    max_rows: int | None = DEFAULT_MAX_ROWS,
    limits: Limits = DEFAULT_LIMITS,
    catalog: Catalog | None = None,
) -> int:
    """Run analyst ``sql`` in the sandbox and stream the result to ``out`` in ``fmt``
    (`write_result`); return the rows written. The time limit covers the writing."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    with _sandbox(lake, sql, limits, catalog) as con:
        reader = _relation(con, sql, params).to_arrow_reader(_BATCH_ROWS)
        return write_result(reader, out, fmt, max_rows=max_rows)


@contextmanager
def output_file(lake: LakePath, path: LakePath) -> Iterator[Path]:
    """A temporary path to write a result to, renamed to ``path`` once written whole.

    Refuses (`QueryRefused`) a ``path`` inside the lake: a query leaves the lake as it
    found it. The temporary file is removed on any error.
    """
    real_root = os.path.realpath(_lake_root(lake))
    target = Path(os.path.abspath(path))
    real_target = os.path.realpath(target)
    if real_target == real_root or real_target.startswith(real_root.rstrip(os.sep) + os.sep):
        raise QueryRefused(f"refusing to write {os.fspath(path)}: it is inside the lake")
    tmp = target.with_name(f".{target.name}.{new_token()}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def export_parquet(
    lake: LakePath,
    sql: str,
    path: LakePath,
    *,
    params: Mapping[str, object] | None = None,
    limits: Limits = DEFAULT_LIMITS,
    catalog: Catalog | None = None,
) -> int:
    """Run analyst ``sql`` in the sandbox and write the result to the Parquet file ``path``
    (outside the lake; zstd), streamed batch by batch; return the rows written.

    Python writes the file, not DuckDB, which may write nothing. ``path`` appears only
    once complete.
    """
    with _sandbox(lake, sql, limits, catalog) as con, output_file(lake, path) as tmp:
        reader = _relation(con, sql, params).to_arrow_reader(_BATCH_ROWS)
        rows = 0
        try:
            with pq.ParquetWriter(tmp, reader.schema, compression="zstd") as writer:
                for batch in reader:
                    writer.write_batch(batch)
                    rows += batch.num_rows
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid) as error:
            raise QueryError(f"the result cannot be written as Parquet: {error}") from None
        return rows


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
