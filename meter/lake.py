"""The lake's layout and its durable writes (see DESIGN.md section 4).

Paths and file names are pure functions of a file's provenance (topic, partition,
offset range) and its time partition, so a retried flush writes the same names and a
reader or a cleanup can tell from a name alone what a file holds. The I/O below them
does one thing each: write a file so that readers never see it partial, and remove
what a crashed flush left behind.

Layout, all relative to LAKE::

    events/date=YYYY-MM-DD/hour=HH/{topic}.{partition}.{start:020d}-{end:020d}.parquet
    dlq/date=YYYY-MM-DD/{topic}.{partition}.{start:020d}-{end:020d}.parquet
    _meter/intent/topic=T/partition=P.json

``start`` is the first offset a flush covers (inclusive), ``end`` the offset after its
last message (exclusive): the offset committed to Kafka and the next flush's ``start``.
A file restated after a price correction (`meter.reprice`) holds the same offsets, so
its new version is named ``...{start}-{end}.v{n}.parquet`` (n >= 2; version 1, what a
flush or a compaction writes, has no suffix).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Final, Literal, NamedTuple, TypeVar

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = [
    "DICTIONARY_COLUMNS",
    "KIND_DLQ",
    "KIND_EVENTS",
    "META_DIR",
    "STALE_TEMP_S",
    "DataPath",
    "HashingFile",
    "Intent",
    "IntentCorrupt",
    "Kind",
    "LakePath",
    "OrphanRace",
    "Written",
    "abs_path",
    "check_topic",
    "clear_orphans",
    "clear_temps",
    "data_file_name",
    "dlq_dir",
    "dlq_rel_dir",
    "dlq_rel_path",
    "events_dir",
    "events_rel_dir",
    "events_rel_path",
    "fsync_dir",
    "intent_path",
    "is_temp_for",
    "make_dirs",
    "new_token",
    "next_version_path",
    "parquet_options",
    "parse_data_file_name",
    "parse_rel_path",
    "read_intent",
    "rel_path",
    "rel_posix",
    "split_by_hour",
    "split_dlq_by_date",
    "temp_final_name",
    "temp_name",
    "write_bytes_atomic",
    "write_intent",
    "write_parquet_atomic",
]

LakePath = str | os.PathLike[str]
Kind = Literal["events", "dlq"]
KIND_EVENTS: Final = "events"  # also the top-level directory of each kind
KIND_DLQ: Final = "dlq"
META_DIR: Final = "_meter"
PARQUET_SUFFIX: Final = ".parquet"
OFFSET_DIGITS: Final = 20  # an int64 offset never needs more, so names sort by offset

_TOPIC_RE = re.compile(r"[A-Za-z0-9._-]{1,249}")  # Kafka's own rule for topic names
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_TOKEN_RE = re.compile(r"[A-Za-z0-9-]+")
_OFFSETS_RE = re.compile(rf"(\d{{{OFFSET_DIGITS}}})-(\d{{{OFFSET_DIGITS}}})")
_VERSION_RE = re.compile(r"v([1-9]\d{0,8})")  # canonical digits; v1 is written without a suffix
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_T = TypeVar("_T")


class IntentCorrupt(ValueError):
    """An intent file that cannot be trusted to name only this partition's files."""


class OrphanRace(RuntimeError):
    """Orphan cleanup removed files of a flush whose manifest entry then appeared.

    Only possible when another writer (a zombie that lost the partition) was still
    flushing: its entry now lists removed files, so the range must be rewritten.
    """

    def __init__(self, topic: str, partition: int, start: int, removed: list[str]) -> None:
        super().__init__(
            f"{topic}[{partition}]: offsets from {start} became covered by the manifest "
            f"while their files were being removed as orphans: {removed}"
        )
        self.topic = topic
        self.partition = partition
        self.start = start
        self.removed = removed


# --- pure: names and paths -------------------------------------------------------------


def check_topic(topic: str) -> str:
    """Return ``topic`` if Kafka could have named it; it lands in file and dir names."""
    if not _TOPIC_RE.fullmatch(topic) or topic in (".", ".."):
        raise ValueError(f"not a valid Kafka topic name: {topic!r}")
    return topic


def _check_range(partition: int, start: int, end: int) -> None:
    if partition < 0:
        raise ValueError(f"partition must be >= 0, got {partition}")
    if not 0 <= start < end < 10**OFFSET_DIGITS:
        raise ValueError(f"offset range must satisfy 0 <= start < end, got {start}..{end}")


def _date_str(date: str | dt.date) -> str:
    if isinstance(date, dt.date):
        return date.isoformat()
    if not _DATE_RE.fullmatch(date):
        raise ValueError(f"date must be YYYY-MM-DD, got {date!r}")
    dt.date.fromisoformat(date)  # rejects 2026-02-30
    return date


def _check_hour(hour: int) -> int:
    if not 0 <= hour <= 23:
        raise ValueError(f"hour must be 0..23, got {hour}")
    return hour


def events_rel_dir(date: str | dt.date, hour: int) -> str:
    return f"{KIND_EVENTS}/date={_date_str(date)}/hour={_check_hour(hour):02d}"


def dlq_rel_dir(date: str | dt.date) -> str:
    return f"{KIND_DLQ}/date={_date_str(date)}"


def events_dir(lake: LakePath, date: str | dt.date, hour: int) -> Path:
    """``LAKE/events/date=YYYY-MM-DD/hour=HH``: event-time (UTC) partitions."""
    return Path(lake) / events_rel_dir(date, hour)


def dlq_dir(lake: LakePath, date: str | dt.date) -> Path:
    """``LAKE/dlq/date=YYYY-MM-DD``: partitioned by arrival date (a reject may have no ts)."""
    return Path(lake) / dlq_rel_dir(date)


def data_file_name(topic: str, partition: int, start: int, end: int, version: int = 1) -> str:
    """The one name a flush of ``[start, end)`` of a partition gives its files.

    Zero-padded offsets make lexical order offset order; a retried flush overwrites
    its own earlier attempt instead of adding a second copy. ``version`` > 1 names a
    restated copy of the same rows (``.v{version}`` before the suffix): a new name, so
    a reader that listed the old version keeps reading it whole.
    """
    check_topic(topic)
    _check_range(partition, start, end)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < 10**9:
        raise ValueError(f"file version must be an int in 1..999999999, got {version!r}")
    suffix = "" if version == 1 else f".v{version}"
    return f"{topic}.{partition}.{start:0{OFFSET_DIGITS}d}-{end:0{OFFSET_DIGITS}d}{suffix}{PARQUET_SUFFIX}"


def _parse_name(name: str) -> tuple[str, int, int, int, int]:
    if not name.endswith(PARQUET_SUFFIX):
        raise ValueError(f"not a data file name: {name!r}")
    stem = name[: -len(PARQUET_SUFFIX)]
    version = 1
    head, dot, last = stem.rpartition(".")
    if dot and (v := _VERSION_RE.fullmatch(last)) is not None:
        version = int(v.group(1))
        if version == 1:
            raise ValueError(f"not a data file name (version 1 has no suffix): {name!r}")
        stem = head
    parts = stem.rsplit(".", 2)
    if len(parts) != 3:
        raise ValueError(f"not a data file name: {name!r}")
    topic, partition_s, offsets = parts
    m = _OFFSETS_RE.fullmatch(offsets)
    if m is None or not partition_s.isdigit() or not partition_s.isascii():
        raise ValueError(f"not a data file name: {name!r}")
    if partition_s != str(int(partition_s)):
        raise ValueError(f"not a data file name (partition not canonical): {name!r}")
    partition, start, end = int(partition_s), int(m.group(1)), int(m.group(2))
    check_topic(topic)
    _check_range(partition, start, end)
    return topic, partition, start, end, version


def parse_data_file_name(name: str) -> tuple[str, int, int, int]:
    """Invert `data_file_name`: (topic, partition, start, end), whatever the version.

    Parsed from the right, since a topic may itself contain dots.
    """
    return _parse_name(name)[:4]


def temp_name(final_name: str, token: str) -> str:
    """The hidden name a file is written under before its rename into place.

    ``.{final_name}.{token}.tmp``: found from the final name alone (`is_temp_for`), so
    orphan cleanup removes a crashed write's temp; unique per writer (``token``), so two
    writers of the same range (a zombie and the partition's new owner) never write into
    one temp file; hidden, so directory scans by other tools skip it. (A topic starting
    with '.' or '_' makes final names look hidden too: harmless, readers go by the
    manifest.)
    """
    if not final_name or "/" in final_name or final_name.endswith(".tmp"):
        raise ValueError(f"not a final file name: {final_name!r}")
    if not _TOKEN_RE.fullmatch(token):
        raise ValueError(f"temp token must be [A-Za-z0-9-]+, got {token!r}")
    return f".{final_name}.{token}.tmp"


def is_temp_for(name: str, final_name: str) -> bool:
    """Whether ``name`` is a `temp_name` of ``final_name`` (any writer's)."""
    prefix = f".{final_name}."
    token = name[len(prefix) : -len(".tmp")]
    return name.startswith(prefix) and name.endswith(".tmp") and bool(_TOKEN_RE.fullmatch(token))


def new_token() -> str:
    """A temp token unique to this process and call."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:16]}"


def events_rel_path(date: str | dt.date, hour: int, name: str) -> str:
    """The manifest's (POSIX, relative to LAKE) path of an events file."""
    parse_data_file_name(name)
    return f"{events_rel_dir(date, hour)}/{name}"


def dlq_rel_path(date: str | dt.date, name: str) -> str:
    """The manifest's (POSIX, relative to LAKE) path of a DLQ file."""
    parse_data_file_name(name)
    return f"{dlq_rel_dir(date)}/{name}"


@dataclass(frozen=True, slots=True)
class DataPath:
    """What a data file's relative path says about it."""

    kind: Kind
    date: str
    hour: int | None  # None for DLQ files
    topic: str
    partition: int
    start: int
    end: int
    version: int = 1  # > 1: a restated copy (see `data_file_name`)


def parse_rel_path(rel: str) -> DataPath:
    """Parse and validate a manifest path; rejects anything that is not a data file."""
    parts = rel.split("/")
    if len(parts) == 4 and parts[0] == KIND_EVENTS and parts[2].startswith("hour="):
        kind: Kind = "events"
        hour_s = parts[2].removeprefix("hour=")
        if len(hour_s) != 2 or not hour_s.isdigit():
            raise ValueError(f"not a data file path: {rel!r}")
        hour: int | None = _check_hour(int(hour_s))
    elif len(parts) == 3 and parts[0] == KIND_DLQ:
        kind, hour = "dlq", None
    else:
        raise ValueError(f"not a data file path: {rel!r}")
    if not parts[1].startswith("date="):
        raise ValueError(f"not a data file path: {rel!r}")
    date = _date_str(parts[1].removeprefix("date="))
    topic, partition, start, end, version = _parse_name(parts[-1])
    return DataPath(kind, date, hour, topic, partition, start, end, version)


def next_version_path(rel: str) -> str:
    """The path of a data file's next version: same directory and offsets, version + 1."""
    p = parse_rel_path(rel)
    directory = rel.rsplit("/", 1)[0]
    return f"{directory}/{data_file_name(p.topic, p.partition, p.start, p.end, p.version + 1)}"


def abs_path(lake: LakePath, rel: str) -> Path:
    """LAKE joined with a validated manifest path (never escapes LAKE)."""
    parse_rel_path(rel)
    return Path(lake).joinpath(*PurePosixPath(rel).parts)


def rel_path(lake: LakePath, path: LakePath) -> str:
    """The manifest's form of a path under LAKE: POSIX, relative, validated."""
    rel = Path(path).relative_to(Path(lake)).as_posix()
    parse_rel_path(rel)
    return rel


def intent_path(lake: LakePath, topic: str, partition: int) -> Path:
    """``LAKE/_meter/intent/topic=T/partition=P.json``: one per partition, overwritten."""
    check_topic(topic)
    if partition < 0:
        raise ValueError(f"partition must be >= 0, got {partition}")
    return Path(lake) / META_DIR / "intent" / f"topic={topic}" / f"partition={partition}.json"


# --- pure: splitting a batch into time partitions ----------------------------------------


def _split(table: pa.Table, column: str, unit: str) -> list[tuple[dt.datetime, pa.Table]]:
    """Group rows by the UTC ``unit`` bucket of a timestamp column, vectorised.

    A stable sort on the bucket then zero-copy slices: rows keep their input order
    within a bucket and Python only loops over buckets, never rows.
    """
    if table.num_rows == 0:
        return []
    col = table.column(column)
    if not pa.types.is_timestamp(col.type):
        raise TypeError(f"column {column!r} must be a timestamp, got {col.type}")
    if col.null_count:
        raise ValueError(f"column {column!r} has {col.null_count} null timestamps")
    if col.type.unit != "ms":
        col = col.cast(pa.timestamp("ms", tz=col.type.tz))  # safe cast: raises on truncation
    # Drop the zone (values are UTC instants) so buckets are UTC whatever the zone says.
    naive = col.cast(pa.int64()).cast(pa.timestamp("ms"))
    keys = pc.floor_temporal(naive, multiple=1, unit=unit).cast(pa.int64())
    if pc.count_distinct(keys).as_py() == 1:
        return [(_EPOCH + dt.timedelta(milliseconds=keys[0].as_py()), table)]
    order = pc.sort_indices(keys)
    sorted_table = table.take(order)
    out = []
    offset = 0
    for item in pc.value_counts(keys.take(order)).to_pylist():
        count = item["counts"]
        key = _EPOCH + dt.timedelta(milliseconds=item["values"])
        out.append((key, sorted_table.slice(offset, count)))
        offset += count
    return out


def split_by_hour(table: pa.Table) -> list[tuple[tuple[str, int], pa.Table]]:
    """Split a LAKE_EVENTS table by the UTC hour of ``ts``: ((date, hour), rows), ascending."""
    return [((k.date().isoformat(), k.hour), t) for k, t in _split(table, "ts", "hour")]


def split_dlq_by_date(table: pa.Table) -> list[tuple[str, pa.Table]]:
    """Split a DLQ table by the UTC date of ``arrival_ts``: (date, rows), ascending."""
    return [(k.date().isoformat(), t) for k, t in _split(table, "arrival_ts", "day")]


# --- I/O: durable writes ---------------------------------------------------------------


def fsync_dir(path: LakePath) -> None:
    """Make a directory's entries (a rename, link, create or unlink in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: LakePath) -> None:
    """``mkdir -p`` that also fsyncs each new directory's parent, so a file renamed
    into a fresh directory cannot vanish with that directory after a power loss."""
    path = Path(path)
    missing: list[Path] = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:
            if not new.is_dir():
                raise
        fsync_dir(new.parent)


def _unlink_quiet(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


#: Columns whose values repeat within a file (people, teams, models; the file's one topic and
#: partition; reasons): dictionary encoding shrinks them. Ids, hashes, raw bytes and numbers
#: are left plain: a dictionary of unique values only costs time (a quarter of the write).
DICTIONARY_COLUMNS: Final = frozenset(
    {
        "user",
        "team",
        "org",
        "model",
        "provider",
        "client",
        "price_version",
        "kafka_topic",
        "kafka_partition",
        "reason",
    }
)


def parquet_options(columns: Iterable[str]) -> dict[str, Any]:
    """How every lake file is written: zstd; timestamps as ms, never ns (unreadable by some
    engines), raising where ms would truncate; dictionaries only where values repeat."""
    return {
        "compression": "zstd",
        "use_dictionary": [c for c in columns if c in DICTIONARY_COLUMNS],
        "coerce_timestamps": "ms",
        "allow_truncated_timestamps": False,
    }


class Written(NamedTuple):
    """What a durable write left on disk: its size and the sha256 of exactly those bytes."""

    bytes: int
    sha256: str


class HashingFile:
    """An open binary file that hashes every byte written through it.

    pyarrow writes into any object with ``write`` and ``closed``, so a writer learns the
    sha256 of the bytes it wrote as they pass, without reading the file back.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._sha256 = hashlib.sha256()
        self._size = 0

    @property
    def closed(self) -> bool:
        return self._f.closed

    def write(self, data: bytes) -> int:
        self._sha256.update(data)
        n = self._f.write(data)
        self._size += n
        return n

    def written(self) -> Written:
        return Written(self._size, self._sha256.hexdigest())


def write_parquet_atomic(table: pa.Table, final_path: LakePath) -> Written:
    """Write ``table`` as zstd Parquet at ``final_path`` so no reader sees it partial.

    Written to a `temp_name` of its own in the same directory (a rename within one
    filesystem is atomic), fsynced, renamed into place, then the directory fsynced so
    the rename survives a power loss. Written with `parquet_options`.
    A retry of the same flush replaces its own earlier file. Returns the file's bytes
    and sha256, hashed as written (`HashingFile`).
    """
    final_path = Path(final_path)
    make_dirs(final_path.parent)
    tmp = final_path.with_name(temp_name(final_path.name, new_token()))
    try:
        with open(tmp, "wb") as f:
            sink = HashingFile(f)
            pq.write_table(table, sink, **parquet_options(table.column_names))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final_path)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    fsync_dir(final_path.parent)
    return sink.written()


def write_bytes_atomic(data: bytes, final_path: LakePath) -> None:
    """Small-file twin of `write_parquet_atomic` for JSON state (intents)."""
    final_path = Path(final_path)
    make_dirs(final_path.parent)
    tmp = final_path.with_name(temp_name(final_path.name, new_token()))
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final_path)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    fsync_dir(final_path.parent)


# --- I/O: intents and crash cleanup ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Intent:
    """The files one flush of ``[start, end)`` is about to write."""

    topic: str
    partition: int
    start: int
    end: int
    files: tuple[str, ...]

    def __post_init__(self) -> None:
        check_topic(self.topic)
        _check_range(self.partition, self.start, self.end)
        for rel in self.files:
            p = parse_rel_path(rel)
            if (p.topic, p.partition, p.start, p.end) != (
                self.topic,
                self.partition,
                self.start,
                self.end,
            ):
                raise ValueError(f"intent for {self._what()} lists a foreign file: {rel}")

    def _what(self) -> str:
        return f"{self.topic}[{self.partition}] {self.start}..{self.end}"

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "v": 1,
                "topic": self.topic,
                "partition": self.partition,
                "start": self.start,
                "end": self.end,
                "files": list(self.files),
            },
            option=orjson.OPT_SORT_KEYS,
        )

    @classmethod
    def from_json(cls, data: bytes) -> Intent:
        try:
            d = orjson.loads(data)
            if d["v"] != 1:
                raise ValueError(f"unknown intent version {d['v']!r}")
            return cls(
                topic=_typed(d["topic"], str),
                partition=_typed(d["partition"], int),
                start=_typed(d["start"], int),
                end=_typed(d["end"], int),
                files=tuple(_typed(f, str) for f in _typed(d["files"], list)),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise IntentCorrupt(f"unreadable intent: {e}") from e


def _typed(value: object, typ: type[_T]) -> _T:
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise TypeError(f"expected {typ.__name__}, got {value!r}")
    return value


def write_intent(
    lake: LakePath, topic: str, partition: int, start: int, end: int, rel_paths: Iterable[str]
) -> Intent:
    """Durably record the files a flush is about to write, before it writes any.

    Call this first in a flush, then write the files, then append the manifest entry.
    One intent per partition, overwritten by each flush: it names the only flush that
    can be in flight for the partition, so cleanup after a crash is O(1) (no scan of
    the lake for files no entry lists).
    """
    intent = Intent(topic, partition, start, end, tuple(rel_paths))
    write_bytes_atomic(intent.to_json(), intent_path(lake, topic, partition))
    return intent


def read_intent(lake: LakePath, topic: str, partition: int) -> Intent | None:
    """The partition's intent, or None if there is none."""
    try:
        data = intent_path(lake, topic, partition).read_bytes()
    except FileNotFoundError:
        return None
    intent = Intent.from_json(data)
    if (intent.topic, intent.partition) != (topic, partition):
        raise IntentCorrupt(f"intent at {topic}[{partition}] is for {intent._what()}")
    return intent


def clear_orphans(lake: LakePath, topic: str, partition: int, covered: Callable[[int], bool]) -> list[str]:
    """Remove what a crashed flush of this partition left behind; return what was removed.

    Run when taking a partition (start, assignment) before its first flush. If the
    manifest covers the intent's ``start`` (``covered(start)``), the flush completed and
    its files are the lake's: only the intent goes. Otherwise its files and their temp
    names (whichever exist) are removed: no entry lists them, and the next flush from
    the same position rewrites that range under the same names.

    Exact after a crash, when the flush that wrote the intent is dead. A zombie (a
    writer that lost the partition but is still flushing) could append its entry after
    the check, listing files removed here; the check is repeated after the removal so
    that case raises `OrphanRace` instead of passing silently. A zombie appending after
    the re-check is not caught here: fencing zombies is the consumer group's job (flush
    on revocation, a poll interval the flush fits in).
    """
    intent = read_intent(lake, topic, partition)
    if intent is None:
        return []
    removed: list[str] = []
    if not covered(intent.start):
        dirs: set[Path] = set()
        listings: dict[Path, list[str]] = {}
        for rel in intent.files:
            final = abs_path(lake, rel)
            if final.parent not in listings:
                try:
                    listings[final.parent] = os.listdir(final.parent)
                except FileNotFoundError:
                    listings[final.parent] = []
            temps = [n for n in listings[final.parent] if is_temp_for(n, final.name)]
            for path in (final, *(final.with_name(n) for n in temps)):
                if _unlink_quiet(path):
                    removed.append(rel_posix(lake, path))
                    dirs.add(path.parent)
        for d in sorted(dirs):
            fsync_dir(d)
        if removed and covered(intent.start):
            raise OrphanRace(topic, partition, intent.start, removed)
    path = intent_path(lake, topic, partition)
    if _unlink_quiet(path):
        fsync_dir(path.parent)
    return removed


#: A hidden temp file older than this belongs to a write that died: a live write renames or
#: links its temp within milliseconds.
STALE_TEMP_S: Final = 600.0


def temp_final_name(name: str) -> str | None:
    """The final name a `temp_name` stands for; None when ``name`` is not a temp name."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    final, _, token = name[1:-4].rpartition(".")
    return final if final and _TOKEN_RE.fullmatch(token) else None


def clear_temps(
    dirs: Iterable[Path], ours: Callable[[str], bool], now: float, older_than_s: float = STALE_TEMP_S
) -> list[Path]:
    """Remove temp files from ``dirs``: those of final names ``ours`` whatever their age, any
    other older than ``older_than_s``; return what was removed.

    A SIGKILL during an intent, manifest entry or record write leaves its hidden temp; no
    reader looks at it, but nothing else would remove it. ``ours`` names the writes of a
    partition the caller has just taken, whose writer is dead or fenced; other temps may be
    a write in progress elsewhere (a compaction's record), so only old ones go.
    """
    removed = []
    for d in dirs:
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            continue
        for name in names:
            final = temp_final_name(name)
            if final is None:
                continue
            path = d / name
            try:
                dead = ours(final) or now - path.stat().st_mtime > older_than_s
            except FileNotFoundError:
                continue
            if dead and _unlink_quiet(path):
                removed.append(path)
        if any(p.parent == d for p in removed):
            fsync_dir(d)
    return removed


def rel_posix(lake: LakePath, path: LakePath) -> str:
    """POSIX path relative to LAKE, without validating it as a data file."""
    return Path(path).relative_to(Path(lake)).as_posix()
