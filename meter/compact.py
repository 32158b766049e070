"""`meter compact`: merge the small files of closed partitions, atomically with the manifest.

A daemon flushes every few seconds, so each event-time hour collects many small files
per Kafka partition; readers pay per file. Compaction merges, per Kafka partition and
directory (an ``events`` hour or a ``dlq`` date), runs of small listed files into files
of about ``target_bytes``, once the directory is *closed*: its time range ended more
than ``grace`` ago. Late events still land in a closed hour; the next run merges them in.

Per Kafka partition, in this order (each step durable before the next)::

    1. recover: remove what a crashed run left (merged files no record lists, temps)
    2. intent:  record the merged files this run is about to write
    3. merge:   write each merged file (temp name, fsync, rename, fsync the directory)
    4. record:  link rewrite record ``seq`` (`meter.manifest.append_rewrite`):
                from here readers list the merged files instead of the small ones
    5. clear the intent
    6. delete:  remove retired files whose record is older than ``delete_grace``,
                so queries that listed them before step 4 can finish reading them

A crash before 4 leaves the listing as it was (the merged files are orphans that step 1
of the next run removes); a crash after it leaves the new listing. No row is ever
listed twice or not at all, whatever the instant. Entries are never edited: a daemon
appending entries meanwhile is unaffected, and its new files are left for the next run.

One rewriter at a time per lake (an exclusive ``flock`` on ``_meter/compact/lock``,
`lake_lock`): a second compaction, or a restatement (`meter.reprice`, which reuses the
lock, the intent and recovery, `write_rows` and `delete_retired`), fails with
`CompactBusy`. Two on different machines over a shared filesystem would still be fenced
by the record's exclusive link, but step 1 of one could remove the other's in-flight
files: run one rewriter per lake.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from meter.lake import (
    META_DIR,
    DataPath,
    HashingFile,
    LakePath,
    Written,
    abs_path,
    check_topic,
    data_file_name,
    dlq_rel_path,
    events_rel_path,
    fsync_dir,
    is_temp_for,
    make_dirs,
    new_token,
    parquet_options,
    parse_rel_path,
    temp_name,
    write_bytes_atomic,
)
from meter.manifest import (
    CompactionRecord,
    FileRecord,
    PartitionFiles,
    Replacement,
    append_rewrite,
    list_partitions,
    load_files,
)

__all__ = [
    "DEFAULT_POLICY",
    "CompactBusy",
    "CompactError",
    "CompactPolicy",
    "CompactReport",
    "Group",
    "clear_intent",
    "clock_from",
    "compact",
    "compact_partition",
    "default_writer",
    "delete_retired",
    "is_closed",
    "lake_lock",
    "no_checkpoint",
    "plan",
    "recover",
    "state_dir",
    "time_range_ms",
    "write_intent",
    "write_rows",
]

MIB: Final = 1 << 20
HOUR_MS: Final = 3_600_000
DAY_MS: Final = 24 * HOUR_MS
#: Rows buffered before a row group is written: big row groups, bounded memory.
ROW_GROUP_ROWS: Final = 1 << 20
ROW_GROUP_BYTES: Final = 128 * MIB
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class CompactError(RuntimeError):
    """A rewrite that must not be committed (a file disagrees with its manifest record).

    Of either rewrite: restatement (`meter.reprice`) came later and raises it too; the
    names in code and on disk (``_meter/compact``, ``compaction-{seq}.json``) predate it.
    """


class CompactBusy(CompactError):
    """Another compaction or restatement holds this lake's lock."""


@dataclass(frozen=True, slots=True)
class CompactPolicy:
    """When and how much to merge. Validates itself.

    * ``target_bytes``: a merged file grows up to this (the inputs' bytes summed; zstd
      usually makes the output smaller); a file already this big is left alone.
    * ``grace_s``: a directory is closed, and compacted, once its time range ended this
      long ago, so the daemon's regular flushes into it are over.
    * ``delete_grace_s``: a replaced file stays on disk this long after its record, so
      a query that listed it before finishes reading it. Keep it above the longest
      query (`meter query --timeout`).
    * ``max_groups_per_record``: merges committed together in one record.
    """

    target_bytes: int = 128 * MIB
    grace_s: float = 2 * 3600.0
    delete_grace_s: float = 15 * 60.0
    max_groups_per_record: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.target_bytes, bool) or not isinstance(self.target_bytes, int):
            raise ValueError(f"target_bytes must be an int, got {self.target_bytes!r}")
        if self.target_bytes < 1:
            raise ValueError(f"target_bytes must be >= 1, got {self.target_bytes}")
        for name in ("grace_s", "delete_grace_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.max_groups_per_record, int) or self.max_groups_per_record < 1:
            raise ValueError(f"max_groups_per_record must be >= 1, got {self.max_groups_per_record!r}")


DEFAULT_POLICY: Final = CompactPolicy()


# --- pure: what to merge --------------------------------------------------------------------


def time_range_ms(p: DataPath) -> tuple[int, int]:
    """``[start, end)`` in epoch ms of the directory of ``p``: an events hour or a DLQ day."""
    day = dt.datetime.fromisoformat(p.date).replace(tzinfo=dt.UTC)
    start = int((day - _EPOCH).total_seconds()) * 1000
    if p.hour is None:
        return start, start + DAY_MS
    start += p.hour * HOUR_MS
    return start, start + HOUR_MS


def is_closed(p: DataPath, now_ms: int, grace_ms: int) -> bool:
    """Whether the directory of ``p`` (an hour of events, a day of DLQ) ended ``grace`` ago."""
    return time_range_ms(p)[1] + grace_ms <= now_ms


@dataclass(frozen=True, slots=True)
class Group:
    """Listed files of one directory and Kafka partition, adjacent in offset order, to merge."""

    files: tuple[FileRecord, ...]

    @property
    def output(self) -> str:
        """The merged file's path: named for the offsets from the first start to the last end."""
        first, last = parse_rel_path(self.files[0].path), parse_rel_path(self.files[-1].path)
        name = data_file_name(first.topic, first.partition, first.start, last.end)
        if first.hour is None:
            return dlq_rel_path(first.date, name)
        return events_rel_path(first.date, first.hour, name)

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)


def plan(files: Sequence[FileRecord], now_ms: int, policy: CompactPolicy = DEFAULT_POLICY) -> list[Group]:
    """The merges for one Kafka partition's listed ``files``.

    Per closed directory, files in offset order are cut into runs: a file of at least
    ``target_bytes`` ends a run and joins none, and a run ends before the file that
    would take it past ``target_bytes``. Runs of two files or more are merged. A run is
    adjacent in offset order (no listed file of the directory between its first and
    last), so merged files' offset ranges never overlap the remaining ones.
    """
    grace_ms = int(policy.grace_s * 1000)
    by_dir: dict[tuple[str, str, int | None, str, int], list[tuple[int, FileRecord]]] = {}
    for f in files:
        p = parse_rel_path(f.path)
        if is_closed(p, now_ms, grace_ms):
            by_dir.setdefault((p.kind, p.date, p.hour, p.topic, p.partition), []).append((p.start, f))
    groups: list[Group] = []
    for key in sorted(by_dir, key=lambda k: (k[0], k[1], -1 if k[2] is None else k[2], k[3], k[4])):
        run: list[FileRecord] = []
        size = 0
        for _, f in sorted(by_dir[key], key=lambda sf: sf[0]):
            if f.bytes >= policy.target_bytes or size + f.bytes > policy.target_bytes:
                if len(run) >= 2:
                    groups.append(Group(tuple(run)))
                run, size = [], 0
            if f.bytes < policy.target_bytes:
                run.append(f)
                size += f.bytes
        if len(run) >= 2:
            groups.append(Group(tuple(run)))
    return groups


# --- I/O -----------------------------------------------------------------------------------------


@dataclass
class CompactReport:
    """What one `compact` did (or, with ``dry_run``, would do)."""

    partitions: int = 0  # Kafka partitions looked at
    groups: int = 0  # merges committed (planned, in a dry run)
    files_replaced: int = 0
    files_written: int = 0
    rows: int = 0  # rows moved into merged files
    bytes_before: int = 0  # of the replaced files
    bytes_after: int = 0  # of the merged files
    records: int = 0  # compaction records written
    orphans_removed: int = 0  # files a crashed run left, removed
    retired_deleted: int = 0  # replaced files deleted after their grace
    dry_run: bool = False
    errors: list[str] = field(default_factory=list)  # merges skipped, with the reason

    def add(self, other: CompactReport) -> None:
        for name in (
            "groups",
            "files_replaced",
            "files_written",
            "rows",
            "bytes_before",
            "bytes_after",
            "records",
            "orphans_removed",
            "retired_deleted",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors += other.errors

    def to_json(self) -> dict[str, object]:
        return {
            name: getattr(self, name)
            for name in (
                "partitions",
                "groups",
                "files_replaced",
                "files_written",
                "rows",
                "bytes_before",
                "bytes_after",
                "records",
                "orphans_removed",
                "retired_deleted",
                "dry_run",
                "errors",
            )
        }


def no_checkpoint(step: str) -> None:
    """The default ``checkpoint`` of a rewrite: tests pass one that crashes at a step."""


def clock_from(now_ms: int) -> Callable[[], int]:
    """Epoch ms: ``now_ms`` advanced by the monotonic clock since this call, so a rewrite
    stamps records, and ends deletion graces, at the time they happen (a long write does
    not shorten the grace of the records it writes) whatever ``now_ms`` a test passes."""
    started = time.monotonic_ns()

    def clock() -> int:
        return now_ms + (time.monotonic_ns() - started) // 1_000_000

    return clock


def state_dir(lake: LakePath, topic: str, partition: int) -> Path:
    """``LAKE/_meter/compact/topic=T/partition=P``: a partition's intent and deletion mark,
    shared by compaction and restatement (one rewriter at a time)."""
    check_topic(topic)
    if partition < 0:
        raise ValueError(f"partition must be >= 0, got {partition}")
    return Path(lake) / META_DIR / "compact" / f"topic={topic}" / f"partition={partition}"


@contextmanager
def lake_lock(lake: LakePath) -> Iterator[None]:
    """Held by the one rewriter (compaction or restatement) of a lake; `CompactBusy` if taken."""
    path = Path(lake) / META_DIR / "compact" / "lock"
    make_dirs(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CompactBusy(f"another compaction or restatement is running on {os.fspath(lake)}") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_json(path: Path) -> dict[str, object] | None:
    try:
        doc = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except orjson.JSONDecodeError as e:
        raise CompactError(f"{path}: unreadable: {e}") from e
    if not isinstance(doc, dict) or doc.get("v") != 1:
        raise CompactError(f"{path}: not a compaction state file")
    return doc


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _intent_file(lake: LakePath, topic: str, partition: int) -> Path:
    return state_dir(lake, topic, partition) / "intent.json"


def write_intent(lake: LakePath, topic: str, partition: int, paths: Sequence[str]) -> None:
    """Durably name the files a rewrite of the partition is about to write (step 2)."""
    write_bytes_atomic(orjson.dumps({"v": 1, "files": list(paths)}), _intent_file(lake, topic, partition))


def clear_intent(lake: LakePath, topic: str, partition: int) -> None:
    """Drop the intent once its record is linked or its files are removed (step 5)."""
    path = _intent_file(lake, topic, partition)
    _unlink(path)
    fsync_dir(path.parent)


def recover(lake: LakePath, pf: PartitionFiles, checkpoint: Callable[[str], None]) -> int:
    """Remove the new files (and temps) of a crashed rewrite that no record lists."""
    s = pf.state
    intent_file = _intent_file(lake, s.topic, s.partition)
    intent = _read_json(intent_file)
    if intent is None:
        return 0
    paths = intent.get("files")
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise CompactError(f"{intent_file}: malformed intent")
    live = {f.path for f in pf.live}
    removed = 0
    dirs: set[Path] = set()
    for rel in paths:
        if rel in live:
            continue  # committed: the record lists it
        final = abs_path(lake, rel)
        try:
            temps = [n for n in os.listdir(final.parent) if is_temp_for(n, final.name)]
        except FileNotFoundError:
            temps = []
        for path in (final, *(final.with_name(n) for n in temps)):
            if _unlink(path):
                removed += 1
                dirs.add(path.parent)
    for d in sorted(dirs):
        fsync_dir(d)
    if _unlink(intent_file):
        fsync_dir(intent_file.parent)
    checkpoint("recovered")
    return removed


def write_rows(
    lake: LakePath,
    rel: str,
    schema: pa.Schema,
    tables: Iterable[pa.Table],
    rows: int,
    checkpoint: Callable[[str], None],
    step: str,
) -> Written:
    """Write ``tables`` as one Parquet file at ``rel`` the way the daemon writes its files
    (`meter.lake.parquet_options`); readers never see it partial.

    Row groups of up to `ROW_GROUP_ROWS`, buffered a few inputs at a time, so memory
    stays bounded whatever the file size; ``checkpoint(step)`` once the first table is
    in. The row count written is checked against ``rows`` before the rename into place
    (temp name, fsync, rename, fsync the directory). Returns the file's bytes and sha256,
    hashed as written (`meter.lake.HashingFile`).
    """
    final = abs_path(lake, rel)
    make_dirs(final.parent)
    tmp = final.with_name(temp_name(final.name, new_token()))
    try:
        with open(tmp, "xb") as f:
            sink = HashingFile(f)
            with pq.ParquetWriter(sink, schema, **parquet_options(schema.names)) as writer:
                pending: list[pa.Table] = []
                pending_rows = pending_bytes = 0
                for i, table in enumerate(tables):
                    pending.append(table)
                    pending_rows += table.num_rows
                    pending_bytes += table.nbytes
                    if pending_rows >= ROW_GROUP_ROWS or pending_bytes >= ROW_GROUP_BYTES:
                        writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
                        pending, pending_rows, pending_bytes = [], 0, 0
                    if i == 0:
                        checkpoint(step)
                if pending:
                    writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
            f.flush()
            os.fsync(f.fileno())
        written_rows = pq.read_metadata(tmp).num_rows
        if written_rows != rows:
            raise CompactError(f"{rel}: wrote {written_rows} rows, expected {rows}")
        os.replace(tmp, final)
    except BaseException:
        _unlink(tmp)
        raise
    fsync_dir(final.parent)
    return sink.written()


def _merge(lake: LakePath, group: Group, checkpoint: Callable[[str], None]) -> FileRecord:
    """Write the group's rows, in offset order, as one Parquet file (`write_rows`).

    Reads one input at a time. Every input must have the rows its record says and the
    first input's schema.
    """

    def read(rec: FileRecord) -> pa.Table:
        table = pq.read_table(abs_path(lake, rec.path))
        if table.num_rows != rec.rows:
            raise CompactError(f"{rec.path} holds {table.num_rows} rows, its record says {rec.rows}")
        return table

    first = read(group.files[0])

    def inputs() -> Iterator[pa.Table]:
        yield first
        for rec in group.files[1:]:
            table = read(rec)
            if not table.schema.equals(first.schema, check_metadata=False):
                raise CompactError(f"{rec.path} has another schema than {group.files[0].path}")
            yield table

    out = write_rows(lake, group.output, first.schema, inputs(), group.rows, checkpoint, "merging")
    return FileRecord(group.output, group.files[0].kind, group.rows, out.bytes, out.sha256)


def delete_retired(
    lake: LakePath, pf: PartitionFiles, now_ms: int, grace_ms: int, checkpoint: Callable[[str], None]
) -> int:
    """Delete the files replaced by records (of either type) older than the grace, oldest first.

    The grace is the running rewrite's, whichever rewrite retired a file: it protects the
    queries that listed the file, which do not care why it left the listing (a record does
    not keep the grace it was written with). ``deleted.json`` remembers the last record
    done, so each retired file is looked at once. Never deletes a listed file. Stops at
    the first record still in its grace.
    """
    s = pf.state
    mark = state_dir(lake, s.topic, s.partition) / "deleted.json"
    doc = _read_json(mark)
    through = doc.get("through", 0) if doc else 0
    if not isinstance(through, int):
        raise CompactError(f"{mark}: malformed")
    live = {f.path for f in pf.live}
    deleted = 0
    done = through
    for record in pf.rewrites[through:]:
        if record.written_at_ms + grace_ms > now_ms:
            break
        dirs: set[Path] = set()
        for replaces, _ in record.swaps:
            for f in replaces:
                if f.path not in live and _unlink(abs_path(lake, f.path)):
                    deleted += 1
                    dirs.add(abs_path(lake, f.path).parent)
                    checkpoint("deleting")
        for d in sorted(dirs):
            fsync_dir(d)
        done = record.seq
    if done != through:
        write_bytes_atomic(orjson.dumps({"v": 1, "through": done}), mark)
        checkpoint("deleted")
    return deleted


def compact_partition(
    lake: LakePath,
    topic: str,
    partition: int,
    policy: CompactPolicy = DEFAULT_POLICY,
    *,
    now_ms: int,
    writer: str,
    dry_run: bool = False,
    checkpoint: Callable[[str], None] = no_checkpoint,
) -> CompactReport:
    """Compact one Kafka partition's closed directories (steps 1-6 of the module doc).

    ``now_ms`` decides which directories are closed; records are stamped, and deletion
    graces end, by `clock_from` ``now_ms``. The caller holds the lake's lock (`compact` does).
    """
    clock = clock_from(now_ms)
    report = CompactReport(partitions=1, dry_run=dry_run)
    pf = load_files(lake, topic, partition)
    if not dry_run:
        report.orphans_removed += recover(lake, pf, checkpoint)
    groups = plan(pf.live, now_ms, policy)
    if dry_run:
        report.groups = len(groups)
        report.files_replaced = sum(len(g.files) for g in groups)
        report.rows = sum(g.rows for g in groups)
        report.bytes_before = sum(g.bytes for g in groups)
        return report
    seq = len(pf.rewrites)
    for i in range(0, len(groups), policy.max_groups_per_record):
        batch = groups[i : i + policy.max_groups_per_record]
        write_intent(lake, topic, partition, [g.output for g in batch])
        checkpoint("intent")
        done: list[Replacement] = []
        for g in batch:
            try:
                merged = _merge(lake, g, checkpoint)
            except (CompactError, OSError, pa.ArrowException) as error:
                report.errors.append(f"{g.output}: {error}")
                continue
            done.append(Replacement(replaces=g.files, file=merged))
            checkpoint("output")
        if done:
            seq += 1
            record = CompactionRecord(
                topic=topic,
                partition=partition,
                seq=seq,
                groups=tuple(done),
                writer=writer,
                written_at_ms=clock(),
            )
            append_rewrite(lake, record)
            checkpoint("record")
            report.records += 1
            report.groups += len(done)
            report.files_replaced += sum(len(r.replaces) for r in done)
            report.files_written += len(done)
            report.rows += sum(r.file.rows for r in done)
            report.bytes_before += sum(f.bytes for r in done for f in r.replaces)
            report.bytes_after += sum(r.file.bytes for r in done)
        if len(done) < len(batch):
            report.orphans_removed += _remove_failed(lake, batch, done)
        clear_intent(lake, topic, partition)
        checkpoint("committed")
    if report.records:
        pf = load_files(lake, topic, partition)
    report.retired_deleted += delete_retired(lake, pf, clock(), int(policy.delete_grace_s * 1000), checkpoint)
    return report


def _remove_failed(lake: LakePath, batch: Sequence[Group], done: Sequence[Replacement]) -> int:
    """Remove the output of a merge that failed after its rename (no record lists it)."""
    committed = {r.file.path for r in done}
    removed = 0
    for g in batch:
        if g.output not in committed and _unlink(abs_path(lake, g.output)):
            removed += 1
            fsync_dir(abs_path(lake, g.output).parent)
    return removed


def default_writer() -> str:
    """``host/pid``: who wrote a rewrite record."""
    return f"{socket.gethostname()}/{os.getpid()}"


def compact(
    lake: LakePath,
    policy: CompactPolicy = DEFAULT_POLICY,
    *,
    now_ms: int | None = None,
    writer: str | None = None,
    dry_run: bool = False,
    checkpoint: Callable[[str], None] = no_checkpoint,
) -> CompactReport:
    """Compact every Kafka partition of the lake; return what was done.

    ``now_ms`` (default: the clock) decides which directories are closed, stamps the
    records and ends deletion graces. ``checkpoint`` is called with a step name after
    each durable step ("recovered", "intent", "merging", "output", "record",
    "committed", "deleting", "deleted"): tests inject crashes there.
    Raises `CompactBusy` if another compaction runs on the lake.
    """
    if not Path(lake).is_dir():
        raise FileNotFoundError(f"no lake directory at {os.fspath(lake)}")
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    who = writer or default_writer()
    report = CompactReport(dry_run=dry_run)
    with nullcontext() if dry_run else lake_lock(lake):
        for topic, partition in list_partitions(lake):
            part = compact_partition(
                lake,
                topic,
                partition,
                policy,
                now_ms=now,
                writer=who,
                dry_run=dry_run,
                checkpoint=checkpoint,
            )
            report.partitions += 1
            report.add(part)
    return report
