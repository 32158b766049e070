"""The manifest: the truth of what is in the lake (see DESIGN.md sections 4 and 5).

One file per flush, in one directory per Kafka partition::

    LAKE/_meter/manifest/topic=T/partition=P/{start:020d}.json
    LAKE/_meter/manifest/topic=T/partition=P/origin.json   (a copy of the first entry)

Each entry covers the offsets ``[start, end)`` and lists the data files holding them.
A partition's entries form a contiguous chain; its end is where consumption resumes
and what is committed to Kafka. Several daemons share one lake, so there is no
single-writer database: entries are created with an exclusive link, which fences a
writer that lost its partition but keeps flushing (see `append_entry`).

Rewrites never edit an entry. They add a *rewrite record* beside the entries that swaps
listed files for new ones, atomically, in one numbered sequence per partition::

    LAKE/_meter/manifest/topic=T/partition=P/compaction-{seq:020d}.json   (seq 1, 2, ...)

A record is a `CompactionRecord` (`meter.compact`: several files merged into one, rows
unchanged) or a `RestatementRecord` (`meter.reprice`: a file replaced by a new version
of the same rows with costs priced again; it keeps each file's old and new cost). Both
share the sequence (the file name predates restatements), so a compaction and a
restatement planned on the same listing collide on one name and only one commits.

What the lake lists (`listed_files`, `load_files`) is the entries' files with every
record applied in ``seq`` order; a replaced file is *retired*: listed no more, deleted
once a grace period has passed. Entries keep the cost they were written with; `totals`
adds the restatements' differences.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Final, TypeVar

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from meter.lake import (
    META_DIR,
    Kind,
    LakePath,
    check_topic,
    fsync_dir,
    make_dirs,
    new_token,
    parse_rel_path,
    temp_name,
)
from meter.schema import TOKEN_COLUMNS
from meter.totals import EXACT
from meter.totals import Totals as RowTotals

__all__ = [
    "CatalogRef",
    "CompactionRecord",
    "FileRecord",
    "ManifestConflict",
    "ManifestCorrupt",
    "ManifestEntry",
    "ManifestError",
    "PartitionFiles",
    "PartitionState",
    "Replacement",
    "Restatement",
    "RestatementRecord",
    "RewriteConflict",
    "RewriteRecord",
    "Totals",
    "append_entry",
    "append_rewrite",
    "apply_rewrites",
    "entry_path",
    "event_totals",
    "format_cost",
    "list_partitions",
    "listed_files",
    "listed_records",
    "load_files",
    "load_partition",
    "load_rewrites",
    "origin_path",
    "parse_rewrite",
    "partition_dir",
    "reject_counts",
    "retired_files",
    "rewrite_path",
    "totals",
]

FORMAT_VERSION: Final = 1
ORIGIN_NAME: Final = "origin.json"
_ENTRY_RE = re.compile(r"(\d{20})\.json")
_COST_RE = re.compile(r"\d+(\.\d+)?")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_KINDS: Final = ("events", "dlq")
_T = TypeVar("_T")


class ManifestError(Exception):
    """Base of the manifest's errors."""


class ManifestConflict(ManifestError):
    """Another writer already claimed this start offset: this writer is stale.

    The partition moved on without us (a rebalance, or a second daemon on the same
    partition); reload the partition and resume from its position, discarding the batch.
    """

    def __init__(self, topic: str, partition: int, start: int, name: str) -> None:
        super().__init__(
            f"{topic}[{partition}]: {name} already exists: another writer claimed "
            f"offset {start}; reload the manifest and resume from its position"
        )
        self.topic = topic
        self.partition = partition
        self.start = start


class ManifestCorrupt(ManifestError):
    """The manifest contradicts itself (a gap or overlap, an unreadable entry)."""


class RewriteConflict(ManifestError):
    """Another rewrite already wrote record ``seq``: this one built on a stale listing."""

    def __init__(self, topic: str, partition: int, seq: int) -> None:
        super().__init__(
            f"{topic}[{partition}]: rewrite record {seq} already exists: another compaction or "
            "restatement ran meanwhile; reload the partition's files and plan again"
        )
        self.topic = topic
        self.partition = partition
        self.seq = seq


# --- pure: paths ----------------------------------------------------------------------


def partition_dir(lake: LakePath, topic: str, partition: int) -> Path:
    """``LAKE/_meter/manifest/topic=T/partition=P``: one partition's entries."""
    check_topic(topic)
    if partition < 0:
        raise ValueError(f"partition must be >= 0, got {partition}")
    return Path(lake) / META_DIR / "manifest" / f"topic={topic}" / f"partition={partition}"


def is_entry_name(name: str) -> bool:
    """Whether ``name`` is a manifest entry's file name (`entry_path`)."""
    return _ENTRY_RE.fullmatch(name) is not None


def entry_path(lake: LakePath, topic: str, partition: int, start: int) -> Path:
    """The one name an entry starting at ``start`` can have: the fence of `append_entry`."""
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    return partition_dir(lake, topic, partition) / f"{start:020d}.json"


def origin_path(lake: LakePath, topic: str, partition: int) -> Path:
    """Where the first entry of a partition is claimed (see `append_entry`)."""
    return partition_dir(lake, topic, partition) / ORIGIN_NAME


# --- pure: entries ----------------------------------------------------------------------


def _typed(value: object, typ: type[_T], what: str) -> _T:
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ValueError(f"{what}: expected {typ.__name__}, got {value!r}")
    return value


def _count(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be an int >= 0, got {value!r}")


def format_cost(cost: Decimal) -> str:
    """The manifest's form of a cost: plain decimal digits, no exponent, exact."""
    if not cost.is_finite() or cost < 0:
        raise ValueError(f"cost must be a finite decimal >= 0, got {cost}")
    return format(cost, "f")


@dataclass(frozen=True, slots=True)
class FileRecord:
    """One data file a flush or rewrite wrote: its path relative to LAKE, kind, rows, size
    and the sha256 of its bytes, hashed as they were written (`meter.lake.HashingFile`).

    ``sha256`` is None only in records written before files carried one; an audit checks
    those against the checksums it recorded itself.
    """

    path: str
    kind: Kind
    rows: int
    bytes: int
    sha256: str | None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"file kind must be one of {_KINDS}, got {self.kind!r}")
        if parse_rel_path(self.path).kind != self.kind:
            raise ValueError(f"{self.path} is not a {self.kind} file")
        _count(self.rows, "rows")
        _count(self.bytes, "bytes")
        sha256 = self.sha256
        if sha256 is not None and not (isinstance(sha256, str) and _SHA256_RE.fullmatch(sha256)):
            raise ValueError(f"{self.path}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}")


def _file_json(f: FileRecord) -> dict[str, object]:
    """A file's JSON object, the same in entries and rewrite records; ``sha256`` only when
    known, so records written before it existed keep their bytes."""
    d: dict[str, object] = {"path": f.path, "kind": f.kind, "rows": f.rows, "bytes": f.bytes}
    if f.sha256 is not None:
        d["sha256"] = f.sha256
    return d


def _file_from_json(d: object) -> FileRecord:
    d = _typed(d, dict, "file")
    return FileRecord(
        path=_typed(d["path"], str, "path"),
        kind=_typed(d["kind"], str, "kind"),  # type: ignore[arg-type]
        rows=_typed(d["rows"], int, "rows"),
        bytes=_typed(d["bytes"], int, "bytes"),
        sha256=_typed(d["sha256"], str, "sha256") if "sha256" in d else None,
    )


def _json_object(data: bytes, what: str) -> dict[str, object]:
    """``data`` decoded as one JSON object; ValueError otherwise."""
    try:
        return _typed(orjson.loads(data), dict, what)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e}") from e


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One durable flush of offsets ``[start, end)`` of a partition.

    ``end`` is the offset committed to Kafka after this entry is durable. ``messages``
    counts consumed messages (fewer than ``end - start`` where offsets are missing:
    compaction, transaction markers); one message may hold several events, so
    ``accepted + rejected >= messages``. ``cost_usd`` is the exact decimal sum of
    non-null costs; ``unpriced`` counts accepted rows with a null cost.
    Validated on construction, so a loaded entry is a consistent one.
    """

    topic: str
    partition: int
    start: int
    end: int
    messages: int
    accepted: int
    rejected: int
    rejects_by_reason: Mapping[str, int] = field(hash=False)
    tokens: Mapping[str, int] = field(hash=False)
    cost_usd: str
    unpriced: int
    files: tuple[FileRecord, ...]
    writer: str
    written_at_ms: int

    def __post_init__(self) -> None:
        check_topic(self.topic)
        for name in ("partition", "start", "messages", "accepted", "rejected", "unpriced"):
            _count(getattr(self, name), name)
        _count(self.written_at_ms, "written_at_ms")
        _count(self.end, "end")
        where = f"{self.topic}[{self.partition}] {self.start}..{self.end}"
        if self.start >= self.end:
            raise ValueError(f"{where}: start must be < end")
        if not 1 <= self.messages <= self.end - self.start:
            raise ValueError(f"{where}: messages must be in 1..end-start, got {self.messages}")
        if self.accepted + self.rejected < self.messages:
            raise ValueError(
                f"{where}: accepted {self.accepted} + rejected {self.rejected} < "
                f"messages {self.messages}: a message went missing"
            )
        if self.unpriced > self.accepted:
            raise ValueError(f"{where}: unpriced {self.unpriced} > accepted {self.accepted}")
        if not isinstance(self.writer, str):
            raise ValueError(f"{where}: writer must be a string")

        reasons = dict(sorted(self.rejects_by_reason.items()))
        for reason, n in reasons.items():
            _typed(reason, str, "reason")
            _count(n, f"rejects_by_reason[{reason!r}]")
        if sum(reasons.values()) != self.rejected:
            raise ValueError(
                f"{where}: rejects_by_reason sums to {sum(reasons.values())}, rejected is {self.rejected}"
            )
        unknown = set(self.tokens) - set(TOKEN_COLUMNS)
        if unknown:
            raise ValueError(f"{where}: unknown token buckets {sorted(unknown)}")
        tokens = {k: self.tokens.get(k, 0) for k in TOKEN_COLUMNS}
        for k, n in tokens.items():
            _count(n, f"tokens[{k!r}]")
        if not isinstance(self.cost_usd, str) or not _COST_RE.fullmatch(self.cost_usd):
            raise ValueError(f"{where}: cost_usd must be a plain decimal string, got {self.cost_usd!r}")

        files = tuple(self.files)
        rows = {k: 0 for k in _KINDS}
        for f in files:
            _typed(f, FileRecord, "files[]")
            p = parse_rel_path(f.path)
            if (p.topic, p.partition, p.start, p.end) != (
                self.topic,
                self.partition,
                self.start,
                self.end,
            ):
                raise ValueError(f"{where}: file {f.path} is named for another range")
            rows[f.kind] += f.rows
        if len({f.path for f in files}) != len(files):
            raise ValueError(f"{where}: a file is listed twice")
        if rows["events"] != self.accepted or rows["dlq"] != self.rejected:
            raise ValueError(
                f"{where}: files hold {rows['events']} event and {rows['dlq']} DLQ rows, "
                f"entry says accepted {self.accepted}, rejected {self.rejected}"
            )
        object.__setattr__(self, "rejects_by_reason", reasons)
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "files", files)

    @property
    def cost(self) -> Decimal:
        return Decimal(self.cost_usd)

    def to_json(self) -> bytes:
        """Deterministic JSON: sorted keys, so equal entries are equal bytes."""
        return orjson.dumps(
            {
                "v": FORMAT_VERSION,
                "topic": self.topic,
                "partition": self.partition,
                "start": self.start,
                "end": self.end,
                "messages": self.messages,
                "accepted": self.accepted,
                "rejected": self.rejected,
                "rejects_by_reason": dict(self.rejects_by_reason),
                "tokens": dict(self.tokens),
                "cost_usd": self.cost_usd,
                "unpriced": self.unpriced,
                "files": [_file_json(f) for f in self.files],
                "writer": self.writer,
                "written_at_ms": self.written_at_ms,
            },
            option=orjson.OPT_SORT_KEYS,
        )

    @classmethod
    def from_json(cls, data: bytes) -> ManifestEntry:
        """Parse and validate; raises ValueError on anything malformed."""
        d = _json_object(data, "entry")
        try:
            if d["v"] != FORMAT_VERSION:
                raise ValueError(f"unknown manifest format version {d['v']!r}")
            files = tuple(_file_from_json(f) for f in _typed(d["files"], list, "files"))
            return cls(
                topic=_typed(d["topic"], str, "topic"),
                partition=_typed(d["partition"], int, "partition"),
                start=_typed(d["start"], int, "start"),
                end=_typed(d["end"], int, "end"),
                messages=_typed(d["messages"], int, "messages"),
                accepted=_typed(d["accepted"], int, "accepted"),
                rejected=_typed(d["rejected"], int, "rejected"),
                rejects_by_reason=_typed(d["rejects_by_reason"], dict, "rejects_by_reason"),
                tokens=_typed(d["tokens"], dict, "tokens"),
                cost_usd=_typed(d["cost_usd"], str, "cost_usd"),
                unpriced=_typed(d["unpriced"], int, "unpriced"),
                files=files,
                writer=_typed(d["writer"], str, "writer"),
                written_at_ms=_typed(d["written_at_ms"], int, "written_at_ms"),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed entry: {e!r}") from e


def event_totals(events: pa.Table) -> tuple[dict[str, int], str, int]:
    """(tokens per bucket, exact cost string, unpriced rows) of accepted event rows."""
    cost_type = events.schema.field("cost_usd").type
    if not pa.types.is_decimal(cost_type):
        raise TypeError(f"cost_usd must be a decimal column, got {cost_type}")
    sums = RowTotals()  # the one way meter sums priced rows (decimal256: no overflow at 38 digits)
    sums.add_batch(events)
    cost = sums.cost_usd if sums.events > sums.unpriced else Decimal(0)  # no priced row: no cost
    return dict(sums.tokens), format_cost(cost), sums.unpriced


def reject_counts(dlq: pa.Table) -> dict[str, int]:
    """Rejected rows per reason code of a DLQ table."""
    counts = pc.value_counts(dlq.column("reason")).to_pylist()
    return {c["values"]: c["counts"] for c in sorted(counts, key=lambda c: c["values"])}


# --- I/O: the fenced append -------------------------------------------------------------


def _link_exclusive(src: Path, dst: Path, entry: ManifestEntry) -> None:
    try:
        os.link(src, dst)
    except FileExistsError:
        raise ManifestConflict(entry.topic, entry.partition, entry.start, dst.name) from None


def append_entry(lake: LakePath, entry: ManifestEntry, *, after: int | None) -> Path:
    """Durably add ``entry`` to its partition's chain, or raise `ManifestConflict`.

    ``after`` is the partition position this writer built on: the chain end it read
    from the manifest (or its own previous entry's end), or None if it read no entry.

    Why this fences a zombie: every writer starts an entry at a chain end it read, and
    the chain only grows at its end, so every position a writer can have read is, once
    passed, the start of an existing entry. Two writers that raced from the same
    position therefore collide on the same file name, and ``os.link`` (unlike rename)
    never replaces: the second one fails with EEXIST and must not commit to Kafka.
    A partition's first entry has no earlier end to collide on (two writers may start
    from different low watermarks), so it first claims ``origin.json``, a copy of the
    entry, the same way.

    Steps: write a uniquely named temp file and fsync it; link it to ``origin.json``
    when first; link it to the entry's name; fsync the directory (the entry is now
    durable: only then may offsets be committed); drop the temp name.
    """
    if after is not None and after != entry.start:
        raise ValueError(
            f"{entry.topic}[{entry.partition}]: entry starts at {entry.start}, "
            f"but the chain this writer read ends at {after}"
        )
    final = entry_path(lake, entry.topic, entry.partition, entry.start)
    make_dirs(final.parent)
    tmp = final.with_name(temp_name(final.name, new_token()))
    try:
        with open(tmp, "xb") as f:
            f.write(entry.to_json())
            f.flush()
            os.fsync(f.fileno())
        if after is None:
            _link_exclusive(tmp, final.with_name(ORIGIN_NAME), entry)
        _link_exclusive(tmp, final, entry)
        fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return final


# --- I/O: reading -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PartitionState:
    """A partition's validated chain of entries, sorted by start."""

    topic: str
    partition: int
    entries: tuple[ManifestEntry, ...]

    @property
    def position(self) -> int | None:
        """Where consumption resumes: the chain's end, or None if nothing was flushed."""
        return self.entries[-1].end if self.entries else None

    @property
    def first(self) -> int | None:
        """The first offset the chain covers, or None."""
        return self.entries[0].start if self.entries else None

    def covers(self, offset: int) -> bool:
        """Whether a durable entry holds ``offset`` (the chain has no holes)."""
        return bool(self.entries) and self.entries[0].start <= offset < self.entries[-1].end


def _read_entry(path: Path) -> ManifestEntry:
    try:
        return ManifestEntry.from_json(path.read_bytes())
    except ValueError as e:
        raise ManifestCorrupt(f"{path.name}: {e}") from e


def load_partition(lake: LakePath, topic: str, partition: int) -> PartitionState:
    """Read and check one partition's chain; raises `ManifestCorrupt` on gap or overlap.

    Hidden names (temp files of an append in flight or crashed) and other stray names
    are not entries and are skipped. ``origin.json`` stands in for the first entry if
    a crash came between its two links.
    """
    where = f"{topic}[{partition}]"
    d = partition_dir(lake, topic, partition)
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return PartitionState(topic, partition, ())
    entries: dict[int, ManifestEntry] = {}
    origin: ManifestEntry | None = None
    for name in names:
        if name == ORIGIN_NAME:
            origin = _read_entry(d / name)
            continue
        m = _ENTRY_RE.fullmatch(name)
        if m is None:
            continue
        e = _read_entry(d / name)
        if e.start != int(m.group(1)):
            raise ManifestCorrupt(f"{where}: {name} holds an entry starting at {e.start}")
        entries[e.start] = e
    for e in (*entries.values(), *([origin] if origin else [])):
        if (e.topic, e.partition) != (topic, partition):
            raise ManifestCorrupt(f"{where}: entry {e.start} is for {e.topic}[{e.partition}]")
    if origin is not None:
        same = entries.setdefault(origin.start, origin)
        if same != origin:
            raise ManifestCorrupt(f"{where}: {ORIGIN_NAME} differs from entry {origin.start}")
    chain = tuple(entries[s] for s in sorted(entries))
    if origin is not None and chain[0].start != origin.start:
        raise ManifestCorrupt(f"{where}: entry {chain[0].start} precedes the first entry {origin.start}")
    for prev, e in itertools.pairwise(chain):
        if e.start > prev.end:
            raise ManifestCorrupt(
                f"{where}: gap: offsets {prev.end}..{e.start} are in no entry "
                f"(entry {prev.start}..{prev.end}, then {e.start}..{e.end})"
            )
        if e.start < prev.end:
            raise ManifestCorrupt(
                f"{where}: overlap: entry {prev.start}..{prev.end} and "
                f"entry {e.start}..{e.end} both cover {e.start}..{prev.end}"
            )
    return PartitionState(topic, partition, chain)


def list_partitions(lake: LakePath) -> list[tuple[str, int]]:
    """Every (topic, partition) with a manifest directory, sorted."""
    root = Path(lake) / META_DIR / "manifest"
    out: list[tuple[str, int]] = []
    if not root.is_dir():
        return out
    for tdir in root.iterdir():
        if not tdir.is_dir() or not tdir.name.startswith("topic="):
            continue
        topic = tdir.name.removeprefix("topic=")
        check_topic(topic)
        for pdir in tdir.iterdir():
            p = pdir.name.removeprefix("partition=")
            if pdir.is_dir() and p != pdir.name and p.isascii() and p.isdigit():
                out.append((topic, int(p)))
    return sorted(out)


def listed_files(lake: LakePath, kind: Kind) -> list[str]:
    """Paths (POSIX, relative to LAKE) of every ``kind`` file the manifest lists.

    What analyst views read, never a directory glob: a file no entry lists (an orphan,
    a stray or forged one) is never counted. Compaction records are applied: a merged
    file stands in for the files it replaced.
    """
    return [f.path for f in listed_records(lake, kind)]


def listed_records(lake: LakePath, kind: Kind | None = None) -> list[FileRecord]:
    """The `FileRecord` (path, rows, bytes) of every listed file, or of every ``kind`` one."""
    if kind is not None and kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    return [
        f
        for t, p in list_partitions(lake)
        for f in load_files(lake, t, p).live
        if kind is None or f.kind == kind
    ]


def retired_files(lake: LakePath) -> list[str]:
    """Paths of files compaction replaced: listed no more, on disk until their grace ends.

    A check for unlisted files in the lake (an audit) should expect these, not flag them.
    """
    return [f.path for t, p in list_partitions(lake) for f, _ in load_files(lake, t, p).retired]


@dataclass(frozen=True, slots=True)
class Totals:
    """Sums over every entry of the lake (cost and unpriced: restatements applied)."""

    partitions: int
    entries: int
    messages: int
    accepted: int
    rejected: int
    rejects_by_reason: dict[str, int]
    tokens: dict[str, int]
    cost_usd: str
    unpriced: int
    files: int
    bytes: int


def totals(lake: LakePath) -> Totals:
    """Sum the manifest: what the lake holds, without reading a data file.

    Row and token sums come from the entries (rewrites move rows between files, never
    change them); cost and unpriced sums are the entries' plus each restatement's
    difference (new - old), so they are what the listed files hold now; ``files`` and
    ``bytes`` count the listed files, after the rewrites.
    """
    loaded = [load_files(lake, t, p) for t, p in list_partitions(lake)]
    entries = [e for pf in loaded for e in pf.state.entries]
    live = [f for pf in loaded for f in pf.live]
    reasons: dict[str, int] = {}
    tokens = dict.fromkeys(TOKEN_COLUMNS, 0)
    restatements = [r for pf in loaded for r in pf.rewrites if isinstance(r, RestatementRecord)]
    cost = Decimal(0)
    with localcontext(EXACT):
        for e in entries:
            cost += Decimal(e.cost_usd)
        for rs in restatements:
            cost += rs.cost_change
    for e in entries:
        for r, n in e.rejects_by_reason.items():
            reasons[r] = reasons.get(r, 0) + n
        for k, n in e.tokens.items():
            tokens[k] += n
    return Totals(
        partitions=len({(e.topic, e.partition) for e in entries}),
        entries=len(entries),
        messages=sum(e.messages for e in entries),
        accepted=sum(e.accepted for e in entries),
        rejected=sum(e.rejected for e in entries),
        rejects_by_reason=dict(sorted(reasons.items())),
        tokens=tokens,
        cost_usd=format_cost(cost),
        unpriced=sum(e.unpriced for e in entries) + sum(rs.unpriced_change for rs in restatements),
        files=len(live),
        bytes=sum(f.bytes for f in live),
    )


# --- rewrite records: compactions and restatements ------------------------------------------

REWRITE_VERSION: Final = 1
_REWRITE_RE = re.compile(r"compaction-(\d{20})\.json")


def rewrite_path(lake: LakePath, topic: str, partition: int, seq: int) -> Path:
    """``.../partition=P/compaction-{seq:020d}.json``: the one name record ``seq`` can have."""
    if seq < 1:
        raise ValueError(f"rewrite seq must be >= 1, got {seq}")
    return partition_dir(lake, topic, partition) / f"compaction-{seq:020d}.json"


def _check_header(topic: str, partition: int, seq: int, writer: str, written_at_ms: int, what: str) -> str:
    """Validate what every rewrite record has; return its name for messages."""
    check_topic(topic)
    _count(partition, "partition")
    _count(written_at_ms, "written_at_ms")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise ValueError(f"{what} seq must be an int >= 1, got {seq!r}")
    where = f"{topic}[{partition}] {what} {seq}"
    if not isinstance(writer, str):
        raise ValueError(f"{where}: writer must be a string")
    return where


def _check_swapped(
    where: str, topic: str, partition: int, swaps: Sequence[tuple[tuple[FileRecord, ...], FileRecord]]
) -> None:
    """Every file of the record is this partition's and appears once."""
    paths: list[str] = []
    for replaces, file in swaps:
        p = parse_rel_path(file.path)
        if (p.topic, p.partition) != (topic, partition):
            raise ValueError(f"{where}: {file.path} is another partition's file")
        paths += [file.path, *(f.path for f in replaces)]
    if len(set(paths)) != len(paths):
        raise ValueError(f"{where}: a file appears in two replacements")


def _loads(data: bytes, kind: str) -> dict[str, object]:
    d = _json_object(data, "record")
    if d.get("v") != REWRITE_VERSION or d.get("type") != kind:
        raise ValueError(f"not a {kind} record: format {d.get('v')!r}/{d.get('type')!r}")
    return d


@dataclass(frozen=True, slots=True)
class Replacement:
    """One merge: the listed files ``replaces`` leave the listing, ``file`` takes their place.

    All in one directory (one kind and time partition) and of one Kafka partition, with
    disjoint offset ranges; ``file`` holds exactly their rows and is named for the offsets
    from the first one's start to the last one's end, so a name still tells whose rows
    a file holds. At least two files: merging one would only rename it.
    """

    replaces: tuple[FileRecord, ...]
    file: FileRecord

    def __post_init__(self) -> None:
        replaces = tuple(self.replaces)
        _typed(self.file, FileRecord, "file")
        if len(replaces) < 2:
            raise ValueError(f"{self.file.path}: a replacement merges at least two files")
        out = parse_rel_path(self.file.path)
        ranges = []
        for f in replaces:
            _typed(f, FileRecord, "replaces[]")
            p = parse_rel_path(f.path)
            if (p.kind, p.date, p.hour, p.topic, p.partition) != (
                out.kind,
                out.date,
                out.hour,
                out.topic,
                out.partition,
            ):
                raise ValueError(f"{f.path} is not in the directory and partition of {self.file.path}")
            ranges.append((p.start, p.end))
        if len({f.path for f in replaces}) != len(replaces):
            raise ValueError(f"{self.file.path}: a file is replaced twice")
        ranges.sort()
        for (_, end), (start, _) in itertools.pairwise(ranges):
            if start < end:
                raise ValueError(f"{self.file.path}: replaced files overlap at offset {start}")
        if (out.start, out.end) != (ranges[0][0], ranges[-1][1]):
            raise ValueError(
                f"{self.file.path} must be named for offsets {ranges[0][0]}..{ranges[-1][1]}, "
                "the range of the files it replaces"
            )
        rows = sum(f.rows for f in replaces)
        if rows != self.file.rows:
            raise ValueError(f"{self.file.path} holds {self.file.rows} rows, the files it replaces {rows}")
        object.__setattr__(self, "replaces", replaces)


@dataclass(frozen=True, slots=True)
class CompactionRecord:
    """Compaction number ``seq`` of a partition's files: one or more `Replacement`.

    Records apply in ``seq`` order (1, 2, ... without gaps) on top of the entries' files;
    each one replaces only files listed at that point, so applying them is deterministic.
    """

    topic: str
    partition: int
    seq: int
    groups: tuple[Replacement, ...]
    writer: str
    written_at_ms: int

    def __post_init__(self) -> None:
        where = _check_header(
            self.topic, self.partition, self.seq, self.writer, self.written_at_ms, "compaction"
        )
        groups = tuple(self.groups)
        if not groups:
            raise ValueError(f"{where}: no replacement")
        for g in groups:
            _typed(g, Replacement, "groups[]")
        object.__setattr__(self, "groups", groups)
        _check_swapped(where, self.topic, self.partition, self.swaps)

    @property
    def swaps(self) -> tuple[tuple[tuple[FileRecord, ...], FileRecord], ...]:
        """(files leaving the listing, the file taking their place), per replacement."""
        return tuple((g.replaces, g.file) for g in self.groups)

    def to_json(self) -> bytes:
        """Deterministic JSON, like `ManifestEntry.to_json`."""
        return orjson.dumps(
            {
                "v": REWRITE_VERSION,
                "type": "compaction",
                "topic": self.topic,
                "partition": self.partition,
                "seq": self.seq,
                "groups": [
                    {"replaces": [_file_json(f) for f in g.replaces], "file": _file_json(g.file)}
                    for g in self.groups
                ],
                "writer": self.writer,
                "written_at_ms": self.written_at_ms,
            },
            option=orjson.OPT_SORT_KEYS,
        )

    @classmethod
    def from_json(cls, data: bytes) -> CompactionRecord:
        """Parse and validate; raises ValueError on anything malformed."""
        d = _loads(data, "compaction")
        try:
            groups = tuple(
                Replacement(
                    replaces=tuple(_file_from_json(f) for f in _typed(g["replaces"], list, "replaces")),
                    file=_file_from_json(g["file"]),
                )
                for g in (_typed(g, dict, "group") for g in _typed(d["groups"], list, "groups"))
            )
            return cls(
                topic=_typed(d["topic"], str, "topic"),
                partition=_typed(d["partition"], int, "partition"),
                seq=_typed(d["seq"], int, "seq"),
                groups=groups,
                writer=_typed(d["writer"], str, "writer"),
                written_at_ms=_typed(d["written_at_ms"], int, "written_at_ms"),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed compaction record: {e!r}") from e


@dataclass(frozen=True, slots=True)
class CatalogRef:
    """Which price catalog a restatement priced with: its file name and the sha256 of its bytes."""

    name: str
    sha256: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"catalog name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.sha256, str) or not _SHA256_RE.fullmatch(self.sha256):
            raise ValueError(f"catalog sha256 must be 64 lowercase hex digits, got {self.sha256!r}")


def _cost_string(value: str, what: str) -> Decimal:
    if not isinstance(value, str) or not _COST_RE.fullmatch(value):
        raise ValueError(f"{what} must be a plain decimal string, got {value!r}")
    return Decimal(value)


@dataclass(frozen=True, slots=True)
class Restatement:
    """One events file ``replaces`` swapped for ``file``: the same rows (same directory and
    offsets, a higher version), with costs priced again.

    ``old_cost_usd`` and ``new_cost_usd`` are the exact sums of the two files' ``cost_usd``
    (`format_cost`); ``old_unpriced`` and ``new_unpriced`` their rows without a cost;
    ``changed`` the rows whose cost differs (at least one: an unchanged file is left alone).
    """

    replaces: FileRecord
    file: FileRecord
    old_cost_usd: str
    new_cost_usd: str
    old_unpriced: int
    new_unpriced: int
    changed: int

    def __post_init__(self) -> None:
        _typed(self.replaces, FileRecord, "replaces")
        _typed(self.file, FileRecord, "file")
        where = self.file.path
        old, new = parse_rel_path(self.replaces.path), parse_rel_path(self.file.path)
        if old.kind != "events":
            raise ValueError(f"{where}: only events files are restated, not {self.replaces.path}")
        if (old.date, old.hour, old.topic, old.partition, old.start, old.end) != (
            new.date,
            new.hour,
            new.topic,
            new.partition,
            new.start,
            new.end,
        ):
            raise ValueError(f"{where} must be in the directory and have the offsets of {self.replaces.path}")
        if new.version <= old.version:
            raise ValueError(f"{where} must have a higher version than {self.replaces.path}")
        if self.file.rows != self.replaces.rows:
            raise ValueError(
                f"{where} holds {self.file.rows} rows, the file it restates {self.replaces.rows}"
            )
        _cost_string(self.old_cost_usd, f"{where}: old_cost_usd")
        _cost_string(self.new_cost_usd, f"{where}: new_cost_usd")
        for name in ("old_unpriced", "new_unpriced", "changed"):
            _count(getattr(self, name), f"{where}: {name}")
            if getattr(self, name) > self.file.rows:
                raise ValueError(f"{where}: {name} {getattr(self, name)} > rows {self.file.rows}")
        if self.changed < 1:
            raise ValueError(f"{where}: no row changed: nothing to restate")

    @property
    def cost_change(self) -> Decimal:
        """new - old, exact."""
        with localcontext(EXACT):
            return Decimal(self.new_cost_usd) - Decimal(self.old_cost_usd)

    def to_dict(self) -> dict[str, object]:
        return {
            "replaces": _file_json(self.replaces),
            "file": _file_json(self.file),
            "old_cost_usd": self.old_cost_usd,
            "new_cost_usd": self.new_cost_usd,
            "old_unpriced": self.old_unpriced,
            "new_unpriced": self.new_unpriced,
            "changed": self.changed,
        }

    @classmethod
    def from_dict(cls, d: object) -> Restatement:
        d = _typed(d, dict, "restated file")
        return cls(
            replaces=_file_from_json(d["replaces"]),
            file=_file_from_json(d["file"]),
            old_cost_usd=_typed(d["old_cost_usd"], str, "old_cost_usd"),
            new_cost_usd=_typed(d["new_cost_usd"], str, "new_cost_usd"),
            old_unpriced=_typed(d["old_unpriced"], int, "old_unpriced"),
            new_unpriced=_typed(d["new_unpriced"], int, "new_unpriced"),
            changed=_typed(d["changed"], int, "changed"),
        )


@dataclass(frozen=True, slots=True)
class RestatementRecord:
    """Restatement number ``seq`` of a partition's files: events priced again with ``catalog``.

    Shares the sequence of `CompactionRecord` and applies the same way. Rows with event
    time in ``[start_ms, end_ms)`` (None: unbounded) were priced again; the others kept
    their stored cost. The entries keep the cost they were written with: a file's old
    and new cost here are what makes the lake's cost traceable (`totals` adds the
    differences, `meter.audit` checks them against the files).
    """

    topic: str
    partition: int
    seq: int
    files: tuple[Restatement, ...]
    catalog: CatalogRef
    start_ms: int | None
    end_ms: int | None
    writer: str
    written_at_ms: int

    def __post_init__(self) -> None:
        where = _check_header(
            self.topic, self.partition, self.seq, self.writer, self.written_at_ms, "restatement"
        )
        files = tuple(self.files)
        if not files:
            raise ValueError(f"{where}: no restated file")
        for f in files:
            _typed(f, Restatement, "files[]")
        _typed(self.catalog, CatalogRef, "catalog")
        for name in ("start_ms", "end_ms"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{where}: {name} must be an int or None, got {value!r}")
        if self.start_ms is not None and self.end_ms is not None and self.start_ms >= self.end_ms:
            raise ValueError(f"{where}: start_ms must be < end_ms")
        object.__setattr__(self, "files", files)
        _check_swapped(where, self.topic, self.partition, self.swaps)

    @property
    def swaps(self) -> tuple[tuple[tuple[FileRecord, ...], FileRecord], ...]:
        """(the file leaving the listing, its new version), per restated file."""
        return tuple(((f.replaces,), f.file) for f in self.files)

    @property
    def cost_change(self) -> Decimal:
        """Σ (new - old) cost over the record's files, exact."""
        with localcontext(EXACT):
            return sum((f.cost_change for f in self.files), Decimal(0))

    @property
    def unpriced_change(self) -> int:
        return sum(f.new_unpriced - f.old_unpriced for f in self.files)

    def to_json(self) -> bytes:
        """Deterministic JSON, like `ManifestEntry.to_json`."""
        return orjson.dumps(
            {
                "v": REWRITE_VERSION,
                "type": "restatement",
                "topic": self.topic,
                "partition": self.partition,
                "seq": self.seq,
                "files": [f.to_dict() for f in self.files],
                "catalog": {"name": self.catalog.name, "sha256": self.catalog.sha256},
                "start_ms": self.start_ms,
                "end_ms": self.end_ms,
                "writer": self.writer,
                "written_at_ms": self.written_at_ms,
            },
            option=orjson.OPT_SORT_KEYS,
        )

    @classmethod
    def from_json(cls, data: bytes) -> RestatementRecord:
        """Parse and validate; raises ValueError on anything malformed."""
        d = _loads(data, "restatement")
        try:
            catalog = _typed(d["catalog"], dict, "catalog")
            start, end = d["start_ms"], d["end_ms"]
            return cls(
                topic=_typed(d["topic"], str, "topic"),
                partition=_typed(d["partition"], int, "partition"),
                seq=_typed(d["seq"], int, "seq"),
                files=tuple(Restatement.from_dict(f) for f in _typed(d["files"], list, "files")),
                catalog=CatalogRef(
                    name=_typed(catalog["name"], str, "catalog name"),
                    sha256=_typed(catalog["sha256"], str, "catalog sha256"),
                ),
                start_ms=None if start is None else _typed(start, int, "start_ms"),
                end_ms=None if end is None else _typed(end, int, "end_ms"),
                writer=_typed(d["writer"], str, "writer"),
                written_at_ms=_typed(d["written_at_ms"], int, "written_at_ms"),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed restatement record: {e!r}") from e


RewriteRecord = CompactionRecord | RestatementRecord
_REWRITE_TYPES: Final[dict[str, type[CompactionRecord] | type[RestatementRecord]]] = {
    "compaction": CompactionRecord,
    "restatement": RestatementRecord,
}


def parse_rewrite(data: bytes) -> RewriteRecord:
    """Parse a rewrite record of either type; raises ValueError on anything malformed."""
    kind = _json_object(data, "record").get("type")
    if not isinstance(kind, str) or kind not in _REWRITE_TYPES:
        raise ValueError(f"unknown rewrite record type {kind!r}")
    return _REWRITE_TYPES[kind].from_json(data)


def append_rewrite(lake: LakePath, record: RewriteRecord) -> Path:
    """Durably add ``record``, or raise `RewriteConflict` if its ``seq`` is taken.

    The one atomic step of a compaction or a restatement: before the link, readers list
    the old files; after it, the new ones (which must be durable before this is called).
    ``seq`` is one past the last record the caller read, so two rewrites planned on the
    same listing collide on one name and ``os.link`` lets only the first through.
    Record ``seq - 1`` must exist, so the records never have a gap.
    """
    final = rewrite_path(lake, record.topic, record.partition, record.seq)
    if record.seq > 1 and not rewrite_path(lake, record.topic, record.partition, record.seq - 1).exists():
        raise ValueError(f"{final.name}: record {record.seq - 1} does not exist")
    make_dirs(final.parent)
    tmp = final.with_name(temp_name(final.name, new_token()))
    try:
        with open(tmp, "xb") as f:
            f.write(record.to_json())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, final)
        except FileExistsError:
            raise RewriteConflict(record.topic, record.partition, record.seq) from None
        fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _rewrite_seqs(d: Path) -> list[tuple[int, str]]:
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    return sorted((int(m.group(1)), n) for n in names if (m := _REWRITE_RE.fullmatch(n)))


def load_rewrites(lake: LakePath, topic: str, partition: int) -> tuple[RewriteRecord, ...]:
    """A partition's rewrite records in ``seq`` order; `ManifestCorrupt` on a gap.

    A directory listing taken while records are linked may show record ``n + 1`` but
    not ``n`` (both created during the listing); a gap is only corruption if a second
    listing shows it too.
    """
    where = f"{topic}[{partition}]"
    d = partition_dir(lake, topic, partition)
    seqs = _rewrite_seqs(d)
    if [s for s, _ in seqs] != list(range(1, len(seqs) + 1)):
        seqs = _rewrite_seqs(d)
        missing = sorted(set(range(1, len(seqs) + 1)) - {s for s, _ in seqs})
        if missing:
            raise ManifestCorrupt(f"{where}: rewrite record {missing[0]} is missing")
    records = []
    for seq, name in seqs:
        try:
            r = parse_rewrite((d / name).read_bytes())
        except ValueError as e:
            raise ManifestCorrupt(f"{where}: {name}: {e}") from e
        if (r.topic, r.partition, r.seq) != (topic, partition, seq):
            raise ManifestCorrupt(f"{where}: {name} holds {r.topic}[{r.partition}] record {r.seq}")
        records.append(r)
    return tuple(records)


def apply_rewrites(
    entries: Sequence[ManifestEntry], records: Sequence[RewriteRecord]
) -> tuple[tuple[FileRecord, ...], tuple[tuple[FileRecord, int], ...]]:
    """(listed files, retired files with the ms their record was written) after ``records``.

    Raises `ManifestCorrupt` when a record replaces a file that is not listed at that
    point (or is listed with other rows or bytes), or names a new file that is or was
    listed already.
    """
    live: dict[str, FileRecord] = {f.path: f for e in entries for f in e.files}
    retired: dict[str, tuple[FileRecord, int]] = {}
    for r in records:
        where = f"{r.topic}[{r.partition}] record {r.seq}"
        for replaces, file in r.swaps:
            for f in replaces:
                if live.get(f.path) != f:
                    raise ManifestCorrupt(f"{where}: replaces {f.path}, which is not listed as {f}")
            if file.path in live or file.path in retired:
                raise ManifestCorrupt(f"{where}: {file.path} is or was listed already")
            for f in replaces:
                del live[f.path]
                retired[f.path] = (f, r.written_at_ms)
            live[file.path] = file
    return tuple(live.values()), tuple(retired.values())


@dataclass(frozen=True, slots=True)
class PartitionFiles:
    """A partition's chain, its rewrite records, and the files they list and retired."""

    state: PartitionState
    rewrites: tuple[RewriteRecord, ...]
    live: tuple[FileRecord, ...]
    retired: tuple[tuple[FileRecord, int], ...]


def load_files(lake: LakePath, topic: str, partition: int) -> PartitionFiles:
    """Load a partition's rewrite records, then its entries, and apply the records.

    Records first: a record only replaces files of entries that existed before it was
    linked, and entries are never removed, so the entries read afterwards hold every
    file the records read replace. A record linked meanwhile is seen whole or not at
    all: a reader lists the files before or after a rewrite, never a mix.
    """
    records = load_rewrites(lake, topic, partition)
    state = load_partition(lake, topic, partition)
    live, retired = apply_rewrites(state.entries, records)
    return PartitionFiles(state, records, live, retired)
