"""Rollups: usage summed by minute, hour and day, built incrementally with DuckDB.

Each grain sums the lake's event rows by the bucket start ``ts`` (UTC) and the six
dimensions ``org, team, user, model, provider, client``: event count, every token
bucket, exact cost (DECIMAL(38, 12), a sum DuckDB computes in 128-bit integers and
refuses to overflow), rows without a cost, and the sorted price versions used.
``user`` is a dimension, so distinct users per team and day is exact from the day
rollup (``count(DISTINCT "user")``).

Layout, relative to LAKE::

    rollups/minute/date=YYYY-MM-DD/hour=HH/minute-{digest}.parquet
    rollups/hour/date=YYYY-MM-DD/hour=HH/hour-{digest}.parquet
    rollups/day/date=YYYY-MM-DD/day-{digest}.parquet
    _meter/rollups/date=YYYY-MM-DD/hour=HH.json   an hour partition's record
    _meter/rollups/date=YYYY-MM-DD/day.json       a date's record
    _meter/rollups/lock                           held (flock) by the one run at a time

A *record* is the rollup's manifest for one event-time partition: the source files it
was built from (the manifest-listed event files of that hour, with their sizes), their
`digest`, the rollup files it lists (rows, bytes, sha256), its totals, and the files it
replaced (``retired``, kept for a grace period so a query that opened them still can
read them). A day record is built from its hours' records and names their digests.

Incremental: a partition is rebuilt only when its digest differs from its record's.
Late events land as new files in old hour partitions, so only those hours and their
dates are redone; when the record's sources are all still there (files were only
added), just the new files are read and merged into the previous minute rollup
(sums are associative, so the result is the same to the last digit).

Crash safety, per partition: (1) write the new rollup files under names derived from
the new digest (temp + fsync + rename), (2) replace the record atomically: the commit
point, (3) retire the old files. A crash before (2) leaves unreferenced files, which
the next run removes before building; a crash after it leaves only work to redo.
Readers list rollup files from the records (`rollup_views`), never a directory glob.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import Final, Literal, NamedTuple

import duckdb
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from meter.lake import (
    KIND_EVENTS,
    META_DIR,
    LakePath,
    fsync_dir,
    parse_rel_path,
    split_by_hour,
    write_bytes_atomic,
    write_parquet_atomic,
)
from meter.manifest import format_cost, listed_records
from meter.schema import COST_TYPE, TOKEN_COLUMNS, TS_TYPE

__all__ = [
    "DIMENSIONS",
    "GRAINS",
    "MEASURES",
    "ROLLUP",
    "ROLLUPS_DIR",
    "Grain",
    "RecordCorrupt",
    "RollupBusy",
    "RollupFile",
    "RollupRecord",
    "RollupReport",
    "RollupScheduler",
    "RollupView",
    "Source",
    "build_rollups",
    "coarser_sql",
    "current_sources",
    "day_digest",
    "file_sha256",
    "hour_digest",
    "minute_sql",
    "read_records",
    "record_path",
    "rollup_file_rel",
    "rollup_running",
    "rollup_view",
    "rollup_views",
    "sql_list",
]

log = logging.getLogger("meter.rollup")

Grain = Literal["minute", "hour", "day"]
GRAINS: Final[tuple[Grain, ...]] = ("minute", "hour", "day")
DIMENSIONS: Final = ("org", "team", "user", "model", "provider", "client")
#: Summed measures, in column order after the dimensions.
MEASURES: Final = ("events", *TOKEN_COLUMNS, "cost_usd", "unpriced")
ROLLUPS_DIR: Final = "rollups"
#: Bumped when what a rollup holds changes: every partition is then rebuilt.
ROLLUP_VERSION: Final = 1
RECORD_VERSION: Final = 1
DEFAULT_GRACE_S: Final = 600.0
DEFAULT_BATCH_BYTES: Final = 256 << 20

#: The columns of every rollup file; ``ts`` is the bucket's start.
ROLLUP = pa.schema(
    [
        pa.field("ts", TS_TYPE, nullable=False),
        *(pa.field(d, pa.string()) for d in DIMENSIONS),
        pa.field("events", pa.int64(), nullable=False),
        *(pa.field(t, pa.int64(), nullable=False) for t in TOKEN_COLUMNS),
        pa.field("cost_usd", COST_TYPE),  # null where no row of the group has a cost, as SUM gives
        pa.field("unpriced", pa.int64(), nullable=False),
        pa.field("price_versions", pa.list_(pa.string()), nullable=False),
    ]
)

_HOUR_MS: Final = 3_600_000
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_HOUR_RECORD_RE = re.compile(r"hour=(\d{2})\.json")
_DAY_RECORD = "day.json"
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_NAME_DIGITS = 20  # hex digits of the digest in a file name: 80 bits
#: Hive partition columns the views add, per grain (see meter.query.view_sql).
_PARTITIONS: Final[dict[str, tuple[tuple[str, str], ...]]] = {
    "minute": (("date", "DATE"), ("hour", "INTEGER")),
    "hour": (("date", "DATE"), ("hour", "INTEGER")),
    "day": (("date", "DATE"),),
}


class RollupBusy(RuntimeError):
    """Another process holds the rollup lock of this lake."""


class RecordCorrupt(ValueError):
    """A rollup record that cannot be read or does not validate."""


# --- pure: names, digests, SQL ----------------------------------------------------------


def _check_grain(grain: str) -> Grain:
    if grain not in GRAINS:
        raise ValueError(f"grain must be one of {GRAINS}, got {grain!r}")
    return grain


def rollup_file_rel(grain: str, date: str, hour: int | None, digest: str) -> str:
    """The relative path of a rollup file; the digest of what it was built from names it."""
    _check_grain(grain)
    dt.date.fromisoformat(date)
    if not _DIGEST_RE.fullmatch(digest):
        raise ValueError(f"not a sha256 hex digest: {digest!r}")
    name = f"{grain}-{digest[:_NAME_DIGITS]}.parquet"
    if grain == "day":
        if hour is not None:
            raise ValueError("a day rollup has no hour")
        return f"{ROLLUPS_DIR}/day/date={date}/{name}"
    if hour is None or not 0 <= hour <= 23:
        raise ValueError(f"a {grain} rollup needs an hour 0..23, got {hour}")
    return f"{ROLLUPS_DIR}/{grain}/date={date}/hour={hour:02d}/{name}"


def record_path(lake: LakePath, date: str, hour: int | None) -> Path:
    """``_meter/rollups/date=D/hour=HH.json`` (hour) or ``.../date=D/day.json`` (day)."""
    dt.date.fromisoformat(date)
    name = _DAY_RECORD if hour is None else f"hour={hour:02d}.json"
    return Path(lake) / META_DIR / ROLLUPS_DIR / f"date={date}" / name


@dataclass(frozen=True, slots=True)
class Source:
    """A manifest-listed event file a partition's rollup reads, with its size."""

    path: str
    bytes: int


def hour_digest(sources: Iterable[Source]) -> str:
    """What an hour partition's rollup is a function of: its source files (and the
    rollup's version). Order-free; any added, removed or resized file changes it."""
    h = hashlib.sha256(f"meter-rollup-hour-v{ROLLUP_VERSION}\n".encode())
    for s in sorted(sources, key=lambda s: s.path):
        h.update(f"{s.path}\t{s.bytes}\n".encode())
    return h.hexdigest()


def day_digest(hours: Mapping[int, str]) -> str:
    """A date's digest: the digests of its hour partitions."""
    h = hashlib.sha256(f"meter-rollup-day-v{ROLLUP_VERSION}\n".encode())
    for hour in sorted(hours):
        h.update(f"{hour:02d}\t{hours[hour]}\n".encode())
    return h.hexdigest()


def sql_list(paths: Sequence[str]) -> str:
    """A DuckDB list literal of file paths for ``read_parquet``, glob characters escaped."""
    from meter.query import glob_escape, sql_string

    return "[" + ", ".join(sql_string(glob_escape(p)) for p in paths) + "]"


_DIMS_SQL = ", ".join(f'"{d}"' for d in DIMENSIONS)


def _sums(src_events: str) -> str:
    tokens = ", ".join(f"sum({t})::BIGINT AS {t}" for t in TOKEN_COLUMNS)
    return (
        f"{src_events}, {tokens}, sum(cost_usd) AS cost_usd, sum(unpriced)::BIGINT AS unpriced, "
        "list_sort(list_distinct(flatten(list(price_versions)))) AS price_versions"
    )


def minute_sql(raw: Sequence[str], previous: Sequence[str]) -> str:
    """The minute rollup of event files ``raw`` merged with earlier minute rollup files
    ``previous`` (absolute paths; either may be empty, not both).

    Rows come out sorted by (ts, dimensions), so a rebuild writes the same file.
    """
    if not raw and not previous:
        raise ValueError("minute_sql needs at least one file")
    tokens = ", ".join(f"sum({t})::BIGINT AS {t}" for t in TOKEN_COLUMNS)
    fresh = (
        f"SELECT date_trunc('minute', ts) AS ts, {_DIMS_SQL}, count(*)::BIGINT AS events, {tokens}, "
        "sum(cost_usd) AS cost_usd, (count(*) - count(cost_usd))::BIGINT AS unpriced, "
        "list_sort(list_distinct(list(price_version))) AS price_versions "
        f"FROM read_parquet({sql_list(raw)}) GROUP BY ALL"
    )
    columns = ", ".join(f'"{f.name}"' for f in ROLLUP)
    kept = f"SELECT {columns} FROM read_parquet({sql_list(previous)})"
    order = f"ORDER BY ts, {_DIMS_SQL}"
    if not previous:
        return f"{fresh} {order}"
    inputs = kept if not raw else f"{fresh} UNION ALL {kept}"
    return (
        f"SELECT ts, {_DIMS_SQL}, {_sums('sum(events)::BIGINT AS events')} "
        f"FROM ({inputs}) GROUP BY ts, {_DIMS_SQL} {order}"
    )


def coarser_sql(grain: Grain, relation: str) -> str:
    """Roll ``relation`` (a finer rollup: a registered table or a ``read_parquet``) up
    to ``grain`` (hour or day)."""
    if grain not in ("hour", "day"):
        raise ValueError(f"coarser_sql rolls up to hour or day, got {grain!r}")
    return (
        f"SELECT date_trunc('{grain}', ts) AS ts, {_DIMS_SQL}, "
        f"{_sums('sum(events)::BIGINT AS events')} FROM {relation} "
        f"GROUP BY ALL ORDER BY ts, {_DIMS_SQL}"
    )


# --- records ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RollupFile:
    """A rollup file a record lists."""

    path: str
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class RollupRecord:
    """One partition's rollup state: an hour (``hour`` set, ``sources`` the event
    files) or a day (``hour`` None, ``hours`` the digests of its hour records)."""

    date: str
    hour: int | None
    digest: str
    sources: tuple[Source, ...]
    hours: Mapping[int, str]
    events: int
    tokens: Mapping[str, int]
    cost_usd: str
    unpriced: int
    files: Mapping[str, RollupFile]
    retired: tuple[tuple[str, int], ...]  # (path, retired at ms)
    built_at_ms: int

    def __post_init__(self) -> None:
        where = f"rollup record {self.date}" + ("" if self.hour is None else f" hour {self.hour:02d}")
        dt.date.fromisoformat(self.date)
        if not _DIGEST_RE.fullmatch(self.digest):
            raise ValueError(f"{where}: bad digest")
        expected = hour_digest(self.sources) if self.hour is not None else day_digest(self.hours)
        if expected != self.digest:
            raise ValueError(f"{where}: digest does not match its sources")
        grains = ("minute", "hour") if self.hour is not None else ("day",)
        if set(self.files) != set(grains):
            raise ValueError(f"{where}: files must be {grains}, got {sorted(self.files)}")
        for grain in grains:
            if self.files[grain].path != rollup_file_rel(grain, self.date, self.hour, self.digest):
                raise ValueError(f"{where}: {grain} file has a foreign name {self.files[grain].path}")
        if set(self.tokens) != set(TOKEN_COLUMNS):
            raise ValueError(f"{where}: tokens must name every bucket")

    @property
    def key(self) -> tuple[str, int | None]:
        return (self.date, self.hour)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "v": RECORD_VERSION,
                "date": self.date,
                "hour": self.hour,
                "digest": self.digest,
                "sources": [{"path": s.path, "bytes": s.bytes} for s in self.sources],
                "hours": {f"{h:02d}": d for h, d in sorted(self.hours.items())},
                "events": self.events,
                "tokens": dict(self.tokens),
                "cost_usd": self.cost_usd,
                "unpriced": self.unpriced,
                "files": {
                    g: {"path": f.path, "rows": f.rows, "bytes": f.bytes, "sha256": f.sha256}
                    for g, f in self.files.items()
                },
                "retired": [{"path": p, "at_ms": at} for p, at in self.retired],
                "built_at_ms": self.built_at_ms,
            },
            option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2,
        )

    @classmethod
    def from_json(cls, data: bytes) -> RollupRecord:
        try:
            d = orjson.loads(data)
            if d["v"] != RECORD_VERSION:
                raise ValueError(f"unknown record version {d['v']!r}")
            return cls(
                date=str(d["date"]),
                hour=None if d["hour"] is None else int(d["hour"]),
                digest=str(d["digest"]),
                sources=tuple(Source(str(s["path"]), int(s["bytes"])) for s in d["sources"]),
                hours={int(h): str(v) for h, v in d["hours"].items()},
                events=int(d["events"]),
                tokens={str(k): int(v) for k, v in d["tokens"].items()},
                cost_usd=str(d["cost_usd"]),
                unpriced=int(d["unpriced"]),
                files={
                    str(g): RollupFile(str(f["path"]), int(f["rows"]), int(f["bytes"]), str(f["sha256"]))
                    for g, f in d["files"].items()
                },
                retired=tuple((str(r["path"]), int(r["at_ms"])) for r in d["retired"]),
                built_at_ms=int(d["built_at_ms"]),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise RecordCorrupt(f"unreadable rollup record: {e}") from e


def read_records(lake: LakePath) -> tuple[dict[tuple[str, int | None], RollupRecord], list[str]]:
    """Every rollup record by (date, hour) (hour None: the day), and the problems met:
    records that do not parse, or that sit under another partition's name."""
    root = Path(lake) / META_DIR / ROLLUPS_DIR
    records: dict[tuple[str, int | None], RollupRecord] = {}
    problems: list[str] = []
    if not root.is_dir():
        return records, problems
    for ddir in sorted(root.iterdir()):
        if not ddir.is_dir() or not ddir.name.startswith("date="):
            continue
        date = ddir.name.removeprefix("date=")
        for path in sorted(ddir.iterdir()):
            m = _HOUR_RECORD_RE.fullmatch(path.name)
            if m is None and path.name != _DAY_RECORD:
                continue  # temp files of a record write in flight or crashed
            hour = None if m is None else int(m.group(1))
            rel = path.relative_to(lake).as_posix()
            try:
                record = RollupRecord.from_json(path.read_bytes())
            except RecordCorrupt as e:
                problems.append(f"{rel}: {e}")
                continue
            if record.key != (date, hour):
                problems.append(f"{rel}: holds the record of {record.date} hour {record.hour}")
                continue
            records[record.key] = record
    return records, problems


def file_sha256(path: LakePath) -> str:
    """The sha256 of a file read back: what a check compares with the digest a writer
    hashed as it wrote (`meter.lake.HashingFile`)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def current_sources(lake: LakePath) -> dict[tuple[str, int], tuple[Source, ...]]:
    """The manifest-listed event files of each (date, hour) partition, with the sizes
    the manifest records (compaction applied)."""
    out: dict[tuple[str, int], list[Source]] = {}
    for f in listed_records(lake, KIND_EVENTS):
        p = parse_rel_path(f.path)
        assert p.hour is not None
        out.setdefault((p.date, p.hour), []).append(Source(f.path, f.bytes))
    return {k: tuple(sorted(v, key=lambda s: s.path)) for k, v in sorted(out.items())}


def _abs(lake: LakePath, rel: str) -> Path:
    parts = PurePosixPath(rel).parts
    if not parts or ".." in parts or PurePosixPath(rel).is_absolute():
        raise ValueError(f"not a lake-relative path: {rel!r}")
    return Path(os.path.abspath(lake)).joinpath(*parts)


# --- views for meter query ---------------------------------------------------------------


class RollupView(NamedTuple):
    """What `meter query` needs to create one rollup view (see meter.query.view_sql)."""

    name: str  # rollup_minute, rollup_hour, rollup_day
    files: list[str]  # relative POSIX paths, like meter.manifest.listed_files
    schema: pa.Schema  # the files' columns (ROLLUP)
    partitions: tuple[tuple[str, str], ...]  # hive columns from the path, with DuckDB types


def rollup_view(
    lake: LakePath, grain: str, records: Mapping[tuple[str, int | None], RollupRecord] | None = None
) -> RollupView:
    """The view ``rollup_<grain>`` over exactly the files the current records list."""
    _check_grain(grain)
    if records is None:
        records = read_records(lake)[0]
    files = sorted(r.files[grain].path for r in records.values() if grain in r.files)
    return RollupView(f"rollup_{grain}", files, ROLLUP, _PARTITIONS[grain])


def rollup_views(lake: LakePath) -> list[RollupView]:
    """`rollup_view` of every grain, from one read of the records."""
    records = read_records(lake)[0]
    return [rollup_view(lake, g, records) for g in GRAINS]


# --- the build --------------------------------------------------------------------------


@dataclass
class RollupReport:
    """What one `build_rollups` run did."""

    hours_rebuilt: int = 0
    hours_merged: int = 0  # rebuilt by merging only new files into the previous rollup
    hours_unchanged: int = 0
    hours_removed: int = 0
    days_rebuilt: int = 0
    days_unchanged: int = 0
    days_removed: int = 0
    source_rows: int = 0  # event rows read
    rows_written: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GRAINS, 0))
    files_removed: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "hours_rebuilt": self.hours_rebuilt,
            "hours_merged": self.hours_merged,
            "hours_unchanged": self.hours_unchanged,
            "hours_removed": self.hours_removed,
            "days_rebuilt": self.days_rebuilt,
            "days_unchanged": self.days_unchanged,
            "days_removed": self.days_removed,
            "source_rows": self.source_rows,
            "rows_written": dict(self.rows_written),
            "files_removed": self.files_removed,
            "seconds": round(self.seconds, 3),
        }


def rollup_running(lake: LakePath) -> bool:
    """Whether a rollup run holds this lake's lock now (its new files are not listed yet)."""
    try:
        with _lock(lake, create=False):
            return False
    except RollupBusy:
        return True
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _lock(lake: LakePath, create: bool = True) -> Iterator[None]:
    path = Path(lake) / META_DIR / ROLLUPS_DIR / "lock"
    if not create:
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RollupBusy(f"another rollup run holds {path}") from None
            yield
        finally:
            os.close(fd)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RollupBusy(f"another rollup run holds {path}") from None
        yield
    finally:
        os.close(fd)


def _connect(threads: int | None, memory_limit: str | None) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(":memory:")
    con.execute("SET enable_progress_bar = false")
    con.execute("SET TimeZone = 'UTC'")  # date_trunc('day', ...) must cut UTC days
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    if memory_limit:
        con.execute(f"SET memory_limit = '{memory_limit.replace(chr(39), '')}'")
    return con


def _to_rollup(table: pa.Table) -> pa.Table:
    """A DuckDB result as a ROLLUP table (ms timestamps, exact types)."""
    cols = []
    for f in ROLLUP:
        col = table.column(f.name)
        if f.name == "ts":
            col = col.cast(pa.timestamp(col.type.unit, tz="UTC")).cast(TS_TYPE)  # safe: buckets
        cols.append(col.cast(f.type))
    return pa.Table.from_arrays(cols, schema=ROLLUP)


def _by_hour(table: pa.Table) -> dict[tuple[str, int], pa.Table]:
    """A rollup table (sorted by ``ts``, as the SQL orders it) cut into its UTC hours:
    zero-copy slices at the hour boundaries; any other order falls back to a sort."""
    n = table.num_rows
    if n == 0:
        return {}
    hour = pc.divide(table.column("ts").cast(pa.int64()), _HOUR_MS).combine_chunks()  # ts >= 1970
    before, after = hour.slice(0, n - 1), hour.slice(1)
    if not pc.all(pc.greater_equal(after, before)).as_py():
        return dict(split_by_hour(table))
    cuts = [0, *(i + 1 for i in pc.indices_nonzero(pc.not_equal(after, before)).to_pylist()), n]
    out = {}
    for lo, hi in itertools.pairwise(cuts):
        start = _EPOCH + dt.timedelta(hours=hour[lo].as_py())
        out[(start.date().isoformat(), start.hour)] = table.slice(lo, hi - lo)
    return out


def _totals(table: pa.Table) -> tuple[int, dict[str, int], str, int]:
    events = int(pc.sum(table.column("events")).as_py() or 0)
    tokens = {t: int(pc.sum(table.column(t)).as_py() or 0) for t in TOKEN_COLUMNS}
    cost = pc.sum(table.column("cost_usd").cast(pa.decimal256(76, 12))).as_py()
    unpriced = int(pc.sum(table.column("unpriced")).as_py() or 0)
    return events, tokens, format_cost(cost if cost is not None else Decimal(0)), unpriced


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Builder:
    """One run: holds the connection, the records and the report; see `build_rollups`."""

    def __init__(
        self,
        lake: LakePath,
        con: duckdb.DuckDBPyConnection,
        grace_s: float,
        full: bool,
        batch_bytes: int,
        on_step: Callable[[str], None],
        clock_ms: Callable[[], int],
        pool: ThreadPoolExecutor,
    ) -> None:
        self.lake = Path(os.path.abspath(lake))
        self.pool = pool
        self.con = con
        self.grace_ms = int(grace_s * 1000)
        self.full = full
        self.batch_bytes = batch_bytes
        self.on_step = on_step
        self.clock_ms = clock_ms
        self.report = RollupReport()
        self.records, problems = read_records(self.lake)
        for p in problems:
            log.warning("ignoring a rollup record; its partition is rebuilt", extra={"problem": p})

    def abs(self, rel: str) -> str:
        return os.fspath(_abs(self.lake, rel))

    # -- files

    def write(self, table: pa.Table, rel: str) -> RollupFile:
        out = write_parquet_atomic(table, self.abs(rel))
        return RollupFile(rel, table.num_rows, out.bytes, out.sha256)

    def commit(self, record: RollupRecord, old: RollupRecord | None) -> None:
        """Replace the partition's record (the commit point) and retire replaced files."""
        now = self.clock_ms()
        retired = dict(old.retired) if old is not None else {}
        if old is not None:
            for f in old.files.values():
                retired.setdefault(f.path, now)
        current = {f.path for f in record.files.values()}
        kept = tuple(sorted((p, at) for p, at in retired.items() if p not in current))
        record = dataclasses.replace(record, retired=kept)
        write_bytes_atomic(record.to_json(), record_path(self.lake, record.date, record.hour))
        self.records[record.key] = record
        self.on_step(f"record {record.date} {record.hour}")

    def drop(self, old: RollupRecord) -> None:
        """A partition without sources any more: its rollup files go, then its record."""
        path = record_path(self.lake, old.date, old.hour)
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)
        del self.records[old.key]
        for f in old.files.values():
            self._unlink(f.path)
        for p, _ in old.retired:
            self._unlink(p)
        self.on_step(f"dropped {old.date} {old.hour}")

    def _unlink(self, rel: str) -> None:
        path = Path(self.abs(rel))
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            self.report.files_removed += 1

    # -- garbage

    def collect_garbage(self) -> None:
        """Remove files under rollups/ that no record lists as current, and retired
        ones past the grace period; prune the retired lists that point at them."""
        now = self.clock_ms()
        keep: set[str] = set()
        for key, record in list(self.records.items()):
            current = {f.path for f in record.files.values()}
            young = tuple(
                (p, at) for p, at in record.retired if now - at < self.grace_ms and p not in current
            )
            if young != record.retired:
                record = dataclasses.replace(record, retired=young)
                write_bytes_atomic(record.to_json(), record_path(self.lake, record.date, record.hour))
                self.records[key] = record
            keep |= current
            keep.update(p for p, _ in young)
        root = self.lake / ROLLUPS_DIR
        if not root.is_dir():
            return
        for dirpath, _dirs, filenames in os.walk(root, topdown=False):
            for name in filenames:
                rel = Path(dirpath, name).relative_to(self.lake).as_posix()
                if rel not in keep:
                    self._unlink(rel)
            if Path(dirpath) != root:
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)  # only succeeds when empty

    # -- hours

    def build_hours(self, sources: Mapping[tuple[str, int], tuple[Source, ...]]) -> None:
        todo: list[tuple[tuple[str, int], tuple[Source, ...], str]] = []
        for key, srcs in sources.items():
            digest = hour_digest(srcs)
            old = self.records.get(key)
            if not self.full and old is not None and old.digest == digest:
                self.report.hours_unchanged += 1
                continue
            todo.append((key, srcs, digest))
        for (date, hour), old in sorted(
            ((k, r) for k, r in self.records.items() if k[1] is not None), key=lambda kr: kr[0]
        ):
            if (date, hour) not in sources:
                self.drop(old)
                self.report.hours_removed += 1
        batch: list[tuple[tuple[str, int], tuple[Source, ...], str]] = []
        size = 0
        for item in todo:
            batch.append(item)
            size += sum(s.bytes for s in item[1])
            if size >= self.batch_bytes:
                self._build_batch(batch)
                batch, size = [], 0
        if batch:
            self._build_batch(batch)

    def _plan(self, key: tuple[str, int], srcs: tuple[Source, ...]) -> tuple[list[Source], str | None]:
        """(event files to read, previous minute file to merge) for one dirty hour."""
        old = self.records.get(key)
        if self.full or old is None:
            return list(srcs), None
        before = set(old.sources)
        minute = old.files["minute"]
        if not before <= set(srcs):
            return list(srcs), None  # a file went (compaction): rebuild from the sources
        try:
            if os.stat(self.abs(minute.path)).st_size != minute.bytes:
                return list(srcs), None
        except FileNotFoundError:
            return list(srcs), None
        return [s for s in srcs if s not in before], minute.path

    def _build_batch(self, batch: list[tuple[tuple[str, int], tuple[Source, ...], str]]) -> None:
        raw: list[str] = []
        previous: list[str] = []
        merged_events = 0
        for key, srcs, _ in batch:
            read, prev = self._plan(key, srcs)
            raw += [self.abs(s.path) for s in read]
            if prev is not None:
                previous.append(self.abs(prev))
                merged_events += self.records[key].events
                self.report.hours_merged += 1
            else:
                self.report.hours_rebuilt += 1
        minute = _to_rollup(self.con.sql(minute_sql(raw, previous)).to_arrow_table())
        self.report.source_rows += int(pc.sum(minute.column("events")).as_py() or 0) - merged_events
        self.con.register("_minute", minute)
        try:
            hour = _to_rollup(self.con.sql(coarser_sql("hour", "_minute")).to_arrow_table())
        finally:
            self.con.unregister("_minute")
        minutes = _by_hour(minute)
        hours = _by_hour(hour)
        # Files are written in parallel (pyarrow and hashlib release the GIL); records are
        # committed in order, each once both its files are durable.
        writes = []
        for key, _, digest in batch:
            date, h = key
            m_table = minutes.get(key, minute.slice(0, 0))
            h_table = hours.get(key, hour.slice(0, 0))
            writes.append(
                (
                    self.pool.submit(self.write, m_table, rollup_file_rel("minute", date, h, digest)),
                    self.pool.submit(self.write, h_table, rollup_file_rel("hour", date, h, digest)),
                    h_table,
                )
            )
        for (key, srcs, digest), (m_future, h_future, h_table) in zip(batch, writes, strict=True):
            date, h = key
            files = {"minute": m_future.result()}
            self.on_step(f"minute {date} {h}")
            files["hour"] = h_future.result()
            self.on_step(f"hour {date} {h}")
            events, tokens, cost, unpriced = _totals(h_table)
            record = RollupRecord(
                date=date,
                hour=h,
                digest=digest,
                sources=srcs,
                hours={},
                events=events,
                tokens=tokens,
                cost_usd=cost,
                unpriced=unpriced,
                files=files,
                retired=(),
                built_at_ms=self.clock_ms(),
            )
            self.commit(record, self.records.get(key))
            self.report.rows_written["minute"] += files["minute"].rows
            self.report.rows_written["hour"] += files["hour"].rows

    # -- days

    def build_days(self) -> None:
        by_date: dict[str, dict[int, RollupRecord]] = {}
        for (date, hour), record in self.records.items():
            if hour is not None:
                by_date.setdefault(date, {})[hour] = record
        for date in sorted(by_date):
            hours = by_date[date]
            digest = day_digest({h: r.digest for h, r in hours.items()})
            old = self.records.get((date, None))
            if not self.full and old is not None and old.digest == digest:
                self.report.days_unchanged += 1
                continue
            files = [self.abs(r.files["hour"].path) for _, r in sorted(hours.items())]
            relation = f"read_parquet({sql_list(files)})"
            table = _to_rollup(self.con.sql(coarser_sql("day", relation)).to_arrow_table())
            rollup = self.write(table, rollup_file_rel("day", date, None, digest))
            self.on_step(f"day {date}")
            events, tokens, cost, unpriced = _totals(table)
            record = RollupRecord(
                date=date,
                hour=None,
                digest=digest,
                sources=(),
                hours={h: r.digest for h, r in hours.items()},
                events=events,
                tokens=tokens,
                cost_usd=cost,
                unpriced=unpriced,
                files={"day": rollup},
                retired=(),
                built_at_ms=self.clock_ms(),
            )
            self.commit(record, old)
            self.report.days_rebuilt += 1
            self.report.rows_written["day"] += table.num_rows
        for (date, _), old in sorted(
            ((k, r) for k, r in self.records.items() if k[1] is None), key=lambda kr: kr[0]
        ):
            if date not in by_date:
                self.drop(old)
                self.report.days_removed += 1


def build_rollups(
    lake: LakePath,
    *,
    full: bool = False,
    grace_s: float = DEFAULT_GRACE_S,
    threads: int | None = None,
    memory_limit: str | None = None,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    workers: int | None = None,
    on_step: Callable[[str], None] | None = None,
    clock_ms: Callable[[], int] = _now_ms,
) -> RollupReport:
    """Bring every rollup up to date with the manifest; return what was done.

    Steps: take the lake's rollup lock (`RollupBusy` if another run holds it); remove
    what a crashed run left (files no record lists) and retired files older than
    ``grace_s``; rebuild each hour partition whose sources changed (``full``: all), in
    batches of about ``batch_bytes`` of source files, then each date whose hours
    changed. ``on_step`` is called after each durable step with its name (tests crash
    there). ``threads`` and ``memory_limit`` bound DuckDB; ``workers`` threads write
    the files (default: the cores, at most 8).
    """
    started = time.perf_counter()
    root = Path(lake)
    if not root.is_dir():
        raise FileNotFoundError(f"no lake directory at {os.fspath(lake)}")
    with _lock(root), ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        con = _connect(threads, memory_limit)
        try:
            step = on_step or (lambda _: None)
            builder = _Builder(root, con, grace_s, full, batch_bytes, step, clock_ms, pool)
            builder.collect_garbage()
            builder.build_hours(current_sources(root))
            builder.build_days()
            builder.collect_garbage()
        finally:
            con.close()
    builder.report.seconds = time.perf_counter() - started
    return builder.report


class RollupScheduler:
    """Runs `build_rollups` every ``interval_s`` on a background thread until ``stop``.

    Several daemons share one lake: a run that finds the lock taken skips its turn.
    A failed run is logged and retried at the next interval (a crashed run leaves
    nothing a later one cannot finish).
    """

    def __init__(self, lake: LakePath, interval_s: float, stop: threading.Event, threads: int = 1) -> None:
        self.lake = lake
        self.interval_s = interval_s
        self.stop = stop
        self.threads = threads
        self.thread = threading.Thread(target=self._loop, name="meter-rollup", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                report = build_rollups(self.lake, threads=self.threads, workers=self.threads)
            except RollupBusy:
                continue
            except Exception:
                log.exception("rollup run failed; retrying at the next interval")
                continue
            log.info("rollups up to date", extra=report.to_json())

    def join(self, timeout: float | None = None) -> None:
        if self.thread.is_alive():
            self.thread.join(timeout)
