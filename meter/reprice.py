"""`meter reprice`: what the stored usage would cost under another catalog, and restating it.

Every listed event row in the time range is priced again with the other catalog, at
its own event time exactly as the daemon prices (`meter.pricing.Catalog.price`), and
summed per group beside its stored cost (`reprice`). Nothing in the lake changes.

`restate` (``--apply``) writes the new costs after a price correction: each listed
events file holding a row in the range whose cost changes is replaced by a new version
of itself (same rows and offsets, ``cost_usd`` and ``price_version`` priced again for
the rows in the range, named ``...v{n}.parquet``) through a `RestatementRecord` that
keeps the file's old and new cost and the catalog's digest. It runs as a rewrite, the
way `meter.compact` does and under its lock, per Kafka partition::

    1. recover: remove what a crashed rewrite left (files its intent names, no record lists)
    2. plan:    the listed files with a changed row
    3. intent:  name the new versions about to be written
    4. write:   each new version (temp name, fsync, rename, fsync the directory)
    5. record:  link rewrite record ``seq``: from here readers list the new versions
    6. clear the intent; later, delete the old versions after the deletion grace

A crash before 5 leaves the old listing (and orphans that step 1 removes), after it the
new one: a file is read old or new, never a mix, never both. A record whose ``seq`` a
compaction on another machine took meanwhile (`RewriteConflict`) is dropped and the
partition planned again on a fresh listing. Rollups are rebuilt afterwards (their
sources changed names, so `meter.rollup` rebuilds those hours from the raw files).

Columns of the result, after the group keys: ``events``; ``stored_cost_usd`` and
``new_cost_usd``, exact DECIMAL(38, 12) sums in which a row without a cost counts 0;
``difference_usd`` (new - stored); ``stored_unpriced`` and ``new_unpriced``, the rows
without a cost under each (a model one catalog lacks); ``changed_events``, rows whose
cost differs. Sums run in DuckDB, which raises rather than overflow.

Group keys: the rollup dimensions (``org team user model provider client``), ``date``
and ``month`` of the event time (UTC), ``price_version`` (stored) and
``new_price_version``.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Final

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from meter.compact import (
    DEFAULT_POLICY,
    CompactError,
    clear_intent,
    clock_from,
    default_writer,
    delete_retired,
    lake_lock,
    no_checkpoint,
    recover,
    time_range_ms,
    write_intent,
    write_rows,
)
from meter.lake import KIND_EVENTS, DataPath, LakePath, abs_path, next_version_path, parse_rel_path
from meter.manifest import (
    CatalogRef,
    FileRecord,
    Restatement,
    RestatementRecord,
    RewriteConflict,
    append_rewrite,
    format_cost,
    list_partitions,
    listed_records,
    load_files,
)
from meter.pricing import Catalog, CatalogError
from meter.schema import COST_TYPE, EVENTS, TS_TYPE
from meter.totals import EXACT, Totals

__all__ = [
    "GROUP_KEYS",
    "RepriceResult",
    "RestateError",
    "RestateReport",
    "files_in_range",
    "load_catalog_file",
    "reprice",
    "reprice_sql",
    "restate",
]

GROUP_KEYS: Final = (
    "org", "team", "user", "model", "provider", "client",
    "date", "month", "price_version", "new_price_version",
)  # fmt: skip
_BATCH_ROWS: Final = 256 * 1024
_STREAM: Final = pa.schema(
    [
        *(EVENTS.field(n) for n in ("ts", "org", "team", "user", "model", "provider", "client")),
        pa.field("price_version", pa.string()),
        pa.field("new_price_version", pa.string()),
        pa.field("stored_cost", COST_TYPE),
        pa.field("new_cost", COST_TYPE),
    ]
)
_KEY_SQL: Final = {
    "date": "CAST(ts AS DATE) AS date",
    "month": "strftime(ts, '%Y-%m') AS month",
}


@dataclass(frozen=True)
class RepriceResult:
    """Per-group comparison (`table`) and the whole range's sums (`total`, one row)."""

    table: pa.Table
    total: pa.Table
    files: int


def _check_by(by: Sequence[str]) -> tuple[str, ...]:
    keys = tuple(by)
    unknown = [k for k in keys if k not in GROUP_KEYS]
    if unknown:
        raise ValueError(f"cannot group by {', '.join(unknown)}; choose from {', '.join(GROUP_KEYS)}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"a group key is repeated in {', '.join(keys)}")
    return keys


def reprice_sql(by: Sequence[str], relation: str = "priced") -> str:
    """The per-group SQL over ``relation``, a stream of priced rows (``_STREAM``)."""
    keys = _check_by(by)

    def q(name: str) -> str:
        return '"' + name + '"'

    measures = (
        "count(*)::BIGINT AS events, "
        "coalesce(sum(stored_cost), 0::DECIMAL(38, 12)) AS stored_cost_usd, "
        "coalesce(sum(new_cost), 0::DECIMAL(38, 12)) AS new_cost_usd, "
        "coalesce(sum(new_cost), 0::DECIMAL(38, 12)) - coalesce(sum(stored_cost), 0::DECIMAL(38, 12)) "
        "AS difference_usd, "
        "count(*) FILTER (WHERE stored_cost IS NULL)::BIGINT AS stored_unpriced, "
        "count(*) FILTER (WHERE new_cost IS NULL)::BIGINT AS new_unpriced, "
        "count(*) FILTER (WHERE stored_cost IS DISTINCT FROM new_cost)::BIGINT AS changed_events"
    )
    select = ", ".join(_KEY_SQL.get(k, q(k)) for k in keys)
    if not keys:
        return f"SELECT {measures} FROM {relation}"
    order = ", ".join(f"{q(k)} NULLS FIRST" for k in keys)
    return f"SELECT {select}, {measures} FROM {relation} GROUP BY ALL ORDER BY {order}"


def _overlaps(p: DataPath, start_ms: int | None, end_ms: int | None) -> bool:
    lo, hi = time_range_ms(p)
    return (start_ms is None or hi > start_ms) and (end_ms is None or lo < end_ms)


def _lake_root(lake: LakePath, start_ms: int | None, end_ms: int | None) -> Path:
    """The lake's absolute path, once the range and the lake are known to be usable."""
    if start_ms is not None and end_ms is not None and start_ms >= end_ms:
        raise ValueError("the range is empty: --from must be before --to")
    root = Path(os.path.abspath(lake))
    if not root.is_dir():
        raise FileNotFoundError(f"no lake directory at {os.fspath(lake)}")
    return root


def files_in_range(lake: LakePath, start_ms: int | None, end_ms: int | None) -> list[str]:
    """Listed event files whose hour partition overlaps ``[start_ms, end_ms)``."""
    return [
        f.path
        for f in listed_records(lake, KIND_EVENTS)
        if _overlaps(parse_rel_path(f.path), start_ms, end_ms)
    ]


def _in_range(batch: pa.RecordBatch, start_ms: int | None, end_ms: int | None) -> pa.BooleanArray:
    """Rows of ``batch`` with event time in ``[start_ms, end_ms)``."""
    ts = batch.column("ts").cast(pa.int64())
    keep = pc.is_valid(ts)
    if start_ms is not None:
        keep = pc.and_(keep, pc.greater_equal(ts, start_ms))
    if end_ms is not None:
        keep = pc.and_(keep, pc.less(ts, end_ms))
    return keep


def _priced(
    paths: Sequence[Path], catalog: Catalog, start_ms: int | None, end_ms: int | None
) -> Iterator[pa.RecordBatch]:
    columns = [*EVENTS.names, "cost_usd", "price_version"]
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS, columns=columns):
            if start_ms is not None or end_ms is not None:
                batch = batch.filter(_in_range(batch, start_ms, end_ms))
                if batch.num_rows == 0:
                    continue
            events = pa.RecordBatch.from_arrays([batch.column(n) for n in EVENTS.names], schema=EVENTS)
            new = catalog.price(events)
            yield pa.RecordBatch.from_arrays(
                [
                    batch.column("ts").cast(TS_TYPE),
                    *(batch.column(n) for n in ("org", "team", "user", "model", "provider", "client")),
                    batch.column("price_version"),
                    new.column("price_version"),
                    batch.column("cost_usd"),
                    new.column("cost_usd"),
                ],
                schema=_STREAM,
            )


def reprice(
    lake: LakePath,
    catalog: Catalog,
    *,
    start_ms: int | None = None,
    end_ms: int | None = None,
    by: Sequence[str] = ("team", "model"),
    threads: int | None = None,
) -> RepriceResult:
    """Price the listed events with event time in ``[start_ms, end_ms)`` under
    ``catalog`` and compare with their stored cost, per ``by`` group."""
    _check_by(by)
    root = _lake_root(lake, start_ms, end_ms)
    rels = files_in_range(root, start_ms, end_ms)
    paths = [abs_path(root, r) for r in rels]
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET TimeZone = 'UTC'")
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        reader = pa.RecordBatchReader.from_batches(_STREAM, _priced(paths, catalog, start_ms, end_ms))
        con.register("stream", reader)
        table = con.sql(reprice_sql(by, "stream")).to_arrow_table()
        sums = _totals(table)  # the stream is read once: the total sums the groups
    finally:
        con.close()
    return RepriceResult(table, sums, len(paths))


def _totals(table: pa.Table) -> pa.Table:
    con = duckdb.connect(":memory:")
    try:
        con.register("per_group", table)
        zero = "0::DECIMAL(38, 12)"
        measures = (
            "coalesce(sum(events), 0)::BIGINT AS events, "
            f"coalesce(sum(stored_cost_usd), {zero}) AS stored_cost_usd, "
            f"coalesce(sum(new_cost_usd), {zero}) AS new_cost_usd, "
            f"coalesce(sum(difference_usd), {zero}) AS difference_usd, "
            "coalesce(sum(stored_unpriced), 0)::BIGINT AS stored_unpriced, "
            "coalesce(sum(new_unpriced), 0)::BIGINT AS new_unpriced, "
            "coalesce(sum(changed_events), 0)::BIGINT AS changed_events"
        )
        return con.sql(f"SELECT {measures} FROM per_group").to_arrow_table()
    finally:
        con.close()


# --- restating: --apply ----------------------------------------------------------------------

#: Restated files committed together in one record.
FILES_PER_RECORD: Final = 64
#: Plans of one partition a compaction elsewhere may invalidate before the run gives up.
ATTEMPTS: Final = 3


class RestateError(CompactError):
    """A restatement that could not be committed (lost every race for the record's seq)."""


def load_catalog_file(path: str | os.PathLike[str]) -> tuple[Catalog, CatalogRef]:
    """The catalog at ``path`` and its identity (name, sha256 of the bytes read, once)."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CatalogError(f"{os.fspath(path)}: not UTF-8: {e}") from e
    return Catalog.loads(text, os.fspath(path)), CatalogRef(os.fspath(path), hashlib.sha256(data).hexdigest())


def _distinct(a: pa.Array, b: pa.Array) -> pa.BooleanArray:
    """SQL's ``a IS DISTINCT FROM b``: a null and a value differ, two nulls do not."""
    one_null = pc.xor(pc.is_null(a), pc.is_null(b))
    return pc.or_(one_null, pc.fill_null(pc.not_equal(a, b), False))


def _restate_batch(
    batch: pa.RecordBatch, catalog: Catalog, start_ms: int | None, end_ms: int | None
) -> tuple[pa.RecordBatch, int]:
    """``batch`` (lake events) with the rows in ``[start_ms, end_ms)`` priced again by
    ``catalog``; the other rows keep their stored cost. Also: how many costs changed."""
    events = pa.RecordBatch.from_arrays([batch.column(n) for n in EVENTS.names], schema=EVENTS)
    new = catalog.price(events)
    keep = _in_range(batch, start_ms, end_ms)
    schema = batch.schema
    cost = pc.if_else(keep, new.column("cost_usd"), batch.column("cost_usd")).cast(
        schema.field("cost_usd").type
    )
    version = pc.if_else(keep, new.column("price_version"), batch.column("price_version")).cast(
        schema.field("price_version").type
    )
    columns = [
        cost if name == "cost_usd" else version if name == "price_version" else batch.column(name)
        for name in schema.names
    ]
    changed = pc.sum(_distinct(batch.column("cost_usd"), cost).cast(pa.int64())).as_py() or 0
    return pa.RecordBatch.from_arrays(columns, schema=schema), changed


def _changes(path: Path, catalog: Catalog, start_ms: int | None, end_ms: int | None) -> int:
    return sum(
        _restate_batch(b, catalog, start_ms, end_ms)[1]
        for b in pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS)
    )


@dataclass
class RestateReport:
    """What one `restate` did: totals over the files it restated."""

    partitions: int = 0
    files: int = 0  # files restated (replaced by a new version)
    events: int = 0  # rows of those files
    changed_events: int = 0  # rows whose cost changed
    old_cost_usd: Decimal = Decimal(0)  # of the restated files, before
    new_cost_usd: Decimal = Decimal(0)  # and after
    old_unpriced: int = 0
    new_unpriced: int = 0
    records: int = 0  # restatement records written
    conflicts: int = 0  # plans dropped because another rewrite took their seq
    orphans_removed: int = 0  # files a crashed rewrite left, removed
    retired_deleted: int = 0  # replaced files deleted after their grace
    rollups: str = "not run"  # "rebuilt", "none built yet", "busy: ..."
    restated: list[str] = field(default_factory=list)  # paths of the new versions

    @property
    def difference_usd(self) -> Decimal:
        return EXACT.subtract(self.new_cost_usd, self.old_cost_usd)

    def add(self, r: Restatement) -> None:
        self.files += 1
        self.events += r.file.rows
        self.changed_events += r.changed
        self.old_cost_usd = EXACT.add(self.old_cost_usd, Decimal(r.old_cost_usd))
        self.new_cost_usd = EXACT.add(self.new_cost_usd, Decimal(r.new_cost_usd))
        self.old_unpriced += r.old_unpriced
        self.new_unpriced += r.new_unpriced
        self.restated.append(r.file.path)

    def to_json(self) -> dict[str, object]:
        money = {"old_cost_usd", "new_cost_usd"}
        doc: dict[str, object] = {
            name: format(getattr(self, name), "f") if name in money else getattr(self, name)
            for name in (
                "partitions", "files", "events", "changed_events", "old_cost_usd", "new_cost_usd",
                "old_unpriced", "new_unpriced", "records", "conflicts", "orphans_removed",
                "retired_deleted", "rollups", "restated",
            )
        }  # fmt: skip
        doc["difference_usd"] = format(self.difference_usd, "f")
        return doc


@dataclass(frozen=True)
class _Job:
    lake: Path
    catalog: Catalog
    ref: CatalogRef
    start_ms: int | None
    end_ms: int | None
    writer: str
    clock: Callable[[], int]
    checkpoint: Callable[[str], None]


def _restate_file(job: _Job, old: FileRecord, rel: str) -> Restatement:
    """Write the new version ``rel`` of ``old`` (`meter.compact.write_rows`) and describe it."""
    source = pq.ParquetFile(abs_path(job.lake, old.path))
    if source.metadata.num_rows != old.rows:
        raise CompactError(f"{old.path} holds {source.metadata.num_rows} rows, its record says {old.rows}")
    before, after = Totals(), Totals()
    changed = 0

    def tables() -> Iterator[pa.Table]:
        nonlocal changed
        for batch in source.iter_batches(batch_size=_BATCH_ROWS):
            new, n = _restate_batch(batch, job.catalog, job.start_ms, job.end_ms)
            before.add_batch(batch)
            after.add_batch(new)
            changed += n
            yield pa.Table.from_batches([new])

    out = write_rows(job.lake, rel, source.schema_arrow, tables(), old.rows, job.checkpoint, "writing")
    return Restatement(
        replaces=old,
        file=FileRecord(rel, old.kind, old.rows, out.bytes, out.sha256),
        old_cost_usd=format_cost(before.cost_usd),
        new_cost_usd=format_cost(after.cost_usd),
        old_unpriced=before.unpriced,
        new_unpriced=after.unpriced,
        changed=changed,
    )


def _attempt(job: _Job, topic: str, partition: int, report: RestateReport) -> None:
    """Plan on a fresh listing and commit records of up to `FILES_PER_RECORD` files each;
    `RewriteConflict` if another rewrite took a record's seq (nothing of it is listed)."""
    pf = load_files(job.lake, topic, partition)
    report.orphans_removed += recover(job.lake, pf, job.checkpoint)
    planned = [
        f
        for f in pf.live
        if f.kind == KIND_EVENTS
        and _overlaps(parse_rel_path(f.path), job.start_ms, job.end_ms)
        and _changes(abs_path(job.lake, f.path), job.catalog, job.start_ms, job.end_ms)
    ]
    job.checkpoint("planned")
    seq = len(pf.rewrites)
    for i in range(0, len(planned), FILES_PER_RECORD):
        batch = planned[i : i + FILES_PER_RECORD]
        outputs = [next_version_path(f.path) for f in batch]
        write_intent(job.lake, topic, partition, outputs)
        job.checkpoint("intent")
        done = []
        for f, rel in zip(batch, outputs, strict=True):
            done.append(_restate_file(job, f, rel))
            job.checkpoint("output")
        seq += 1
        record = RestatementRecord(
            topic=topic,
            partition=partition,
            seq=seq,
            files=tuple(done),
            catalog=job.ref,
            start_ms=job.start_ms,
            end_ms=job.end_ms,
            writer=job.writer,
            written_at_ms=job.clock(),
        )
        append_rewrite(job.lake, record)
        job.checkpoint("record")
        report.records += 1
        for r in done:
            report.add(r)
        clear_intent(job.lake, topic, partition)
        job.checkpoint("committed")


def restate(
    lake: LakePath,
    catalog: Catalog,
    ref: CatalogRef,
    *,
    start_ms: int | None = None,
    end_ms: int | None = None,
    now_ms: int | None = None,
    writer: str | None = None,
    delete_grace_s: float = DEFAULT_POLICY.delete_grace_s,
    rollups: bool = True,
    checkpoint: Callable[[str], None] = no_checkpoint,
) -> RestateReport:
    """Restate the listed events in ``[start_ms, end_ms)`` at ``catalog``'s prices (see the
    module doc); return what was restated.

    Holds the lake's rewrite lock (`meter.compact.CompactBusy` if a compaction or another
    restatement runs). Replaced files stay ``delete_grace_s`` for queries that listed
    them, those of earlier compactions too (`meter.compact.delete_retired`). ``rollups``:
    afterwards, bring the rollups up to date if the lake has any.
    ``checkpoint`` is called after each durable step ("recovered", "planned", "intent",
    "writing", "output", "record", "committed", "deleting", "deleted"): tests crash there.
    """
    if not 0 <= delete_grace_s < float("inf"):
        raise ValueError(f"delete_grace_s must be a finite number >= 0, got {delete_grace_s!r}")
    root = _lake_root(lake, start_ms, end_ms)
    clock = clock_from(time.time_ns() // 1_000_000 if now_ms is None else now_ms)
    job = _Job(root, catalog, ref, start_ms, end_ms, writer or default_writer(), clock, checkpoint)
    report = RestateReport()
    with lake_lock(root):
        for topic, partition in list_partitions(root):
            report.partitions += 1
            for _ in range(ATTEMPTS):
                try:
                    _attempt(job, topic, partition, report)
                    break
                except RewriteConflict:
                    report.conflicts += 1  # its new files are named by the intent: recovered next
            else:
                raise RestateError(
                    f"{topic}[{partition}]: another rewrite took the record's seq {ATTEMPTS} times; "
                    "run one compaction or restatement per lake, then apply again"
                )
            pf = load_files(root, topic, partition)
            report.retired_deleted += delete_retired(
                root, pf, clock(), int(delete_grace_s * 1000), checkpoint
            )
    if rollups:
        report.rollups = _rebuild_rollups(root)
    return report


def _rebuild_rollups(root: Path) -> str:
    from meter.rollup import RollupBusy, build_rollups, read_records

    if not read_records(root)[0]:
        return "none built yet"
    try:
        build_rollups(root)
    except RollupBusy as busy:
        return f"busy: {busy}; the next meter rollup rebuilds the restated hours"
    return "rebuilt"
