"""`meter audit`: prove the lake's totals, or say exactly where they break.

Checks, each reported as findings (an error fails the audit, a warning does not):

1. **chain**: every Kafka partition's manifest entries are contiguous, without gap or
   overlap, and its rewrite records (compactions, restatements) apply
   (`meter.manifest.load_files`).
2. **file**: every listed file exists, has the bytes, rows and sha256 its record says
   (the sha256 hashed as the file was written, so an edit is caught on the first audit)
   and the schema of its kind. A file whose record predates checksums (no sha256) has
   the sha256 the audit recorded the first time it saw it instead (the ledger
   ``_meter/audit/sha256.json``: such an edit is caught from the second audit on;
   ``record=False`` keeps the lake unchanged).
3. **rows**: read back, the rows of each entry's offset range (found by offset, so
   compacted files count too) have the entry's accepted and rejected counts, token sums,
   exact cost, unpriced count and reject reasons; every consumed message has a row;
   no row lies outside every entry; each row sits in its event-time (or arrival-date)
   partition. Restated costs (`meter.reprice`): a listed restated file holds the cost
   and unpriced count its record says, and the entries whose offsets were restated hold,
   together, their entries' cost plus every restatement's difference (new - old).
4. **unlisted**: every file under LAKE (but ``_meter``) is listed, a retired file
   (replaced by a compaction or restatement), or a rollup or flags file its record
   lists. Files of a flush, compaction or restatement in flight (named by an intent)
   or of a rollup run in progress, hidden temp files and unlisted flags files are
   warnings; anything else, and any symlink, is an error: a
   stray file is never counted, but it should not be there.
5. **rollup**: every rollup record's files are whole (rows, bytes, sha256), and every
   partition whose record is up to date equals a fresh aggregation of the raw events
   (SQL written apart from `meter.rollup`; a date's raw rows are read once into a
   fresh minute grain that the fresh hour and day grains sum), at each grain to the
   last digit. A record behind the manifest (late events since the last run) is a warning.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any, Final, Literal

import duckdb
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from meter.lake import (
    KIND_DLQ,
    KIND_EVENTS,
    META_DIR,
    LakePath,
    abs_path,
    parse_rel_path,
    read_intent,
    write_bytes_atomic,
)
from meter.manifest import (
    FileRecord,
    ManifestEntry,
    ManifestError,
    PartitionFiles,
    Restatement,
    RestatementRecord,
    list_partitions,
    load_files,
)
from meter.rollup import (
    DIMENSIONS,
    ROLLUP,
    ROLLUPS_DIR,
    RollupFile,
    RollupRecord,
    current_sources,
    day_digest,
    file_sha256,
    hour_digest,
    read_records,
    rollup_running,
    sql_list,
)
from meter.schema import DLQ, LAKE_EVENTS, TOKEN_COLUMNS
from meter.totals import EXACT

__all__ = [
    "LEDGER",
    "AuditReport",
    "Finding",
    "audit",
]

Severity = Literal["error", "warning"]
#: Where the audit keeps the sha256 of each listed file whose record has none, relative to LAKE.
LEDGER: Final = f"{META_DIR}/audit/sha256.json"
_HASH_THREADS: Final = 4


@dataclass(frozen=True, slots=True)
class Finding:
    severity: Severity
    check: str  # chain, file, rows, unlisted, rollup
    where: str
    detail: str

    def line(self) -> str:
        return f"{self.severity.upper():7} {self.check:8} {self.where}: {self.detail}"


#: What an audit counts, in report order.
COUNTS: Final = (
    "partitions", "entries", "compactions", "restatements", "messages", "files", "bytes", "hashed",
    "hashes_new", "event_rows", "dlq_rows", "rollup_partitions", "rollup_rows", "rollup_stale", "walked",
)  # fmt: skip


@dataclass
class AuditReport:
    lake: str
    findings: list[Finding] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, severity: Severity, check: str, where: str, detail: str) -> None:
        self.findings.append(Finding(severity, check, where, detail))

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def render(self) -> str:
        c = self.counts.get
        lines = [
            f"meter audit of {self.lake}",
            f"  manifest  {c('partitions', 0)} partitions, {c('entries', 0)} entries, "
            f"{c('compactions', 0)} compaction and {c('restatements', 0)} restatement records",
            f"  files     {c('files', 0)} listed, {c('bytes', 0):,} bytes, "
            f"{c('hashed', 0)} hashed ({c('hashes_new', 0)} first seen)",
            f"  rows      {c('event_rows', 0):,} events, {c('dlq_rows', 0):,} DLQ rows, "
            f"{c('messages', 0):,} messages",
            f"  rollups   {c('rollup_partitions', 0)} partitions compared, "
            f"{c('rollup_rows', 0):,} rollup rows, {c('rollup_stale', 0)} stale",
            f"  unlisted  {c('walked', 0)} files walked",
            *(f.line() for f in sorted(self.findings, key=lambda f: (f.severity, f.check, f.where))),
            ("OK" if self.ok else "FAILED") + f": {len(self.errors)} errors, {len(self.warnings)} warnings",
        ]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "lake": self.lake,
            "ok": self.ok,
            "counts": dict(self.counts),
            "findings": [
                {"severity": f.severity, "check": f.check, "where": f.where, "detail": f.detail}
                for f in self.findings
            ],
        }


def _connect() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    return con


# --- 1 and 2: chains and files ----------------------------------------------------------


class _Audit:
    def __init__(self, lake: LakePath, record: bool) -> None:
        self.root = Path(os.path.abspath(lake))
        self.record = record
        self.report = AuditReport(os.fspath(lake))
        self.con = _connect()
        self.partitions: list[PartitionFiles] = []
        self.corrupt: set[tuple[str, int]] = set()
        self.good_files: dict[str, FileRecord] = {}  # listed files that passed the file checks

    def path(self, rel: str) -> Path:
        return abs_path(self.root, rel)

    def chains(self) -> None:
        for topic, partition in list_partitions(self.root):
            where = f"{topic}[{partition}]"
            try:
                pf = load_files(self.root, topic, partition)
            except (ManifestError, ValueError) as e:
                self.report.add("error", "chain", where, str(e).removeprefix(f"{where}: "))
                self.corrupt.add((topic, partition))
                continue
            self.partitions.append(pf)
            self.report.count("partitions")
            self.report.count("entries", len(pf.state.entries))
            restated = sum(isinstance(r, RestatementRecord) for r in pf.rewrites)
            self.report.count("compactions", len(pf.rewrites) - restated)
            self.report.count("restatements", restated)
            self.report.count("messages", sum(e.messages for e in pf.state.entries))

    def files(self) -> None:
        listed = [f for pf in self.partitions for f in pf.live]
        checked: list[FileRecord] = []
        for f in listed:
            self.report.count("files")
            path = self.path(f.path)
            try:
                size = path.lstat().st_size
                if path.is_symlink():
                    self.report.add("error", "file", f.path, "is a symlink")
                    continue
            except FileNotFoundError:
                self.report.add("error", "file", f.path, "missing")
                continue
            self.report.count("bytes", size)
            if size != f.bytes:
                self.report.add("error", "file", f.path, f"{size} bytes, the manifest says {f.bytes}")
                continue
            try:
                with pq.ParquetFile(path) as pf:
                    meta, schema = pf.metadata, pf.schema_arrow
            except (OSError, pa.ArrowException) as e:
                self.report.add("error", "file", f.path, f"unreadable Parquet: {e}")
                continue
            expected = LAKE_EVENTS if f.kind == KIND_EVENTS else DLQ
            if not schema.remove_metadata().equals(expected):
                self.report.add("error", "file", f.path, f"not the {f.kind} schema: {schema}")
                continue
            if meta.num_rows != f.rows:
                self.report.add("error", "file", f.path, f"{meta.num_rows} rows, the manifest says {f.rows}")
                continue
            checked.append(f)
        self.checksums(checked)

    def checksums(self, files: Sequence[FileRecord]) -> None:
        """Hash each file once and compare it with its record's sha256, or, for a record
        without one, with the ledger's (recording it there the first time)."""
        ledger_path = self.root / LEDGER
        try:
            ledger: dict[str, str] = orjson.loads(ledger_path.read_bytes())
        except FileNotFoundError:
            ledger = {}
        except orjson.JSONDecodeError as e:
            self.report.add("error", "file", LEDGER, f"unreadable checksum ledger: {e}")
            ledger = {}
        with ThreadPoolExecutor(_HASH_THREADS) as pool:
            digests = list(pool.map(lambda f: file_sha256(self.path(f.path)), files))
        updated: dict[str, str] = {}
        for f, digest in zip(files, digests, strict=True):
            self.report.count("hashed")
            if f.sha256 is not None:
                if digest != f.sha256:
                    self.report.add(
                        "error", "file", f.path, f"sha256 {digest}, its record says {f.sha256}: "
                        "the file changed after it was written"
                    )  # fmt: skip
                else:
                    self.good_files[f.path] = f
                continue
            known = ledger.get(f.path)
            if known is None:
                self.report.count("hashes_new")
            elif known != digest:
                self.report.add(
                    "error", "file", f.path, f"sha256 {digest[:16]}... differs from the one recorded "
                    f"({known[:16]}...): the file changed after it was listed"
                )  # fmt: skip
                updated[f.path] = known  # keep the first-seen value: the edit stays visible
                continue
            updated[f.path] = digest
            self.good_files[f.path] = f
        # Files that failed another check keep their recorded hash for when they come back.
        listed = {f.path for pf in self.partitions for f in pf.live if f.sha256 is None}
        for path, digest in ledger.items():
            if path in listed and path not in updated:
                updated[path] = digest
        if self.record and updated != ledger:
            try:
                write_bytes_atomic(orjson.dumps(dict(sorted(updated.items()))), ledger_path)
            except OSError as e:
                self.report.add("warning", "file", LEDGER, f"checksums not recorded: {e}")

    # --- 3: rows against entries ---------------------------------------------------------

    def _good_files(self, kind: str) -> tuple[list[str], dict[str, str]]:
        """Absolute paths of the kind's good files, and their relative paths by absolute."""
        rels = [r for r, f in self.good_files.items() if f.kind == kind]
        paths = [os.fspath(self.path(r)) for r in rels]
        return paths, dict(zip(paths, rels, strict=True))

    def _query_files(self, sql_of: Callable[[list[str]], str], paths: list[str]) -> list[tuple[Any, ...]]:
        """Run ``sql_of(paths)``; if a damaged file makes it fail, find and drop that file."""
        try:
            return self.con.sql(sql_of(paths)).fetchall() if paths else []
        except duckdb.Error:
            pass
        ok: list[str] = []
        for p in paths:
            try:
                self.con.sql(f"SELECT count(*) FROM read_parquet({sql_list([p])})").fetchall()
                self.con.sql(sql_of([p])).fetchall()
            except duckdb.Error as e:
                rel = Path(p).relative_to(self.root).as_posix()
                self.report.add("error", "file", rel, f"unreadable rows: {e}")
                self.good_files.pop(rel, None)
                continue
            ok.append(p)
        return self.con.sql(sql_of(ok)).fetchall() if ok else []

    def rows(self) -> None:
        """Read every good file once per kind: each row is matched to the entry whose
        offset range holds it (an ASOF join on the chain's starts), and summed per
        (file, entry); a second, narrow scan counts each entry's distinct offsets."""
        entries = [e for pf in self.partitions for e in pf.state.entries]
        if not entries:
            return
        table = pa.table(
            {
                "topic": [e.topic for e in entries],
                "part": pa.array([e.partition for e in entries], pa.int32()),
                "start": pa.array([e.start for e in entries], pa.int64()),
                "end": pa.array([e.end for e in entries], pa.int64()),
            }
        )
        self.con.register("entries", table)
        tokens = ", ".join(f"sum({t})::BIGINT" for t in TOKEN_COLUMNS)
        asof = (
            "ASOF LEFT JOIN entries e ON r.kafka_topic = e.topic AND r.kafka_partition = e.part "
            "AND r.kafka_offset >= e.start"
        )
        inside = "(e.start IS NOT NULL AND r.kafka_offset < e.end)"

        def events_sql(files: list[str]) -> str:
            return (
                f"SELECT filename, {inside}, e.topic, e.part, e.start, count(*), {tokens}, sum(cost_usd), "
                "count(*) - count(cost_usd), min(ts), max(ts) "
                f"FROM read_parquet({sql_list(files)}, filename = true) r {asof} GROUP BY ALL"
            )

        def dlq_sql(files: list[str]) -> str:
            return (
                f"SELECT filename, {inside}, e.topic, e.part, e.start, reason, count(*), "
                f"min(arrival_ts), max(arrival_ts) FROM read_parquet({sql_list(files)}, filename = true) r "
                f"{asof} GROUP BY ALL"
            )

        ev_paths, ev_rel = self._good_files(KIND_EVENTS)
        dlq_paths, dlq_rel = self._good_files(KIND_DLQ)
        got_events: dict[tuple[str, int, int], list[Any]] = {}
        got_dlq: dict[tuple[str, int, int], dict[str, int]] = {}
        placed: dict[str, list[Any]] = {}  # filename -> [rows, min, max]
        outside: dict[str, int] = {}
        file_costs: dict[str, list[Any]] = {}  # filename -> [cost, unpriced]
        n_sums = 1 + len(TOKEN_COLUMNS) + 2
        for filename, ok, t, p, s, *row in self._query_files(events_sql, ev_paths):
            lo, hi = row[n_sums:]
            _place(placed, filename, row[0], lo, hi)
            fc = file_costs.setdefault(filename, [None, 0])
            fc[0], fc[1] = _add(fc[0], row[n_sums - 2]), fc[1] + row[n_sums - 1]
            if not ok:
                outside[filename] = outside.get(filename, 0) + row[0]
                continue
            # count, tokens..., cost (None until a priced row), unpriced
            acc = got_events.setdefault((t, p, s), [0] * (n_sums - 2) + [None, 0])
            for i, v in enumerate(row[:n_sums]):
                acc[i] = _add(acc[i], v)
        for filename, ok, t, p, s, reason, n, lo, hi in self._query_files(dlq_sql, dlq_paths):
            _place(placed, filename, n, lo, hi)
            if not ok:
                outside[filename] = outside.get(filename, 0) + n
                continue
            reasons = got_dlq.setdefault((t, p, s), {})
            reasons[reason] = reasons.get(reason, 0) + n
        ev_paths = [p for p in ev_paths if ev_rel[p] in self.good_files]
        dlq_paths = [p for p in dlq_paths if dlq_rel[p] in self.good_files]
        rel = {**ev_rel, **dlq_rel}
        self._check_placement(placed, rel)
        for filename, n in sorted(outside.items()):
            self.report.add("error", "rows", rel[filename], f"{n} rows outside every entry's offsets")
        offsets: dict[tuple[str, int, int], int] = {}
        if ev_paths or dlq_paths:
            union = " UNION ALL ".join(
                f"SELECT kafka_topic, kafka_partition, kafka_offset FROM read_parquet({sql_list(p)})"
                for p in (ev_paths, dlq_paths)
                if p
            )
            offsets_sql = (
                f"SELECT e.topic, e.part, e.start, count(DISTINCT r.kafka_offset) FROM ({union}) r {asof} "
                f"WHERE {inside} GROUP BY ALL"
            )
            offsets = {(t, p, s): n for t, p, s, n in self.con.sql(offsets_sql).fetchall()}
        damaged = {(parse_rel_path(r).topic, parse_rel_path(r).partition) for r in self._bad_listed()}
        restated = {e_key(e) for pf in self.partitions for e in _restated_entries(pf)}
        for e in entries:
            if (e.topic, e.partition) in damaged:
                continue  # its file errors say it already; sums over what is left would only echo them
            self._check_entry(
                e,
                got_events.get(e_key(e)),
                got_dlq.get(e_key(e), {}),
                offsets.get(e_key(e), 0),
                costs=e_key(e) not in restated,
            )
        by_rel = {rel[f]: fc for f, fc in file_costs.items()}
        for pf in self.partitions:
            if (pf.state.topic, pf.state.partition) not in damaged:
                self._check_restated(pf, got_events, by_rel)
        self.con.unregister("entries")

    def _check_restated(
        self,
        pf: PartitionFiles,
        got: Mapping[tuple[str, int, int], list[Any]],
        by_rel: Mapping[str, list[Any]],
    ) -> None:
        """A listed restated file holds its record's new cost; the restated entries hold,
        together, their entries' cost plus every restatement's difference."""
        records = [r for r in pf.rewrites if isinstance(r, RestatementRecord)]
        if not records:
            return
        live = {f.path for f in pf.live}
        latest: dict[str, Restatement] = {f.file.path: f for r in records for f in r.files}
        for path, r in sorted(latest.items()):
            if path not in live or path not in self.good_files:
                continue
            cost, unpriced = by_rel.get(path, [None, 0])
            if (cost or Decimal(0)) != Decimal(r.new_cost_usd) or unpriced != r.new_unpriced:
                self.report.add(
                    "error", "rows", path, f"cost_usd sum {cost} with {unpriced} unpriced rows, its "
                    f"restatement record says {r.new_cost_usd} with {r.new_unpriced}"
                )  # fmt: skip
        entries = _restated_entries(pf)
        n_cost = 1 + len(TOKEN_COLUMNS)
        held = sum((got[e_key(e)][n_cost] or Decimal(0) for e in entries if e_key(e) in got), Decimal(0))
        held_unpriced = sum(got[e_key(e)][n_cost + 1] for e in entries if e_key(e) in got)
        want = sum((e.cost for e in entries), Decimal(0)) + sum((r.cost_change for r in records), Decimal(0))
        want_unpriced = sum(e.unpriced for e in entries) + sum(r.unpriced_change for r in records)
        if held != want or held_unpriced != want_unpriced:
            s = pf.state
            self.report.add(
                "error", "rows", f"{s.topic}[{s.partition}] restated entries",
                f"cost_usd sum {held} with {held_unpriced} unpriced rows; entries plus restatements "
                f"say {want} with {want_unpriced}",
            )  # fmt: skip

    def _bad_listed(self) -> list[str]:
        return [f.path for pf in self.partitions for f in pf.live if f.path not in self.good_files]

    def _check_placement(self, placed: Mapping[str, list[Any]], rel: Mapping[str, str]) -> None:
        for filename, (n, lo, hi) in sorted(placed.items()):
            path = rel[filename]
            p = parse_rel_path(path)
            if p.kind == KIND_EVENTS:
                self.report.count("event_rows", n)
                want = f"{p.date} {p.hour:02d}"
                got = {f"{t.date().isoformat()} {t.hour:02d}" for t in (_utc(lo), _utc(hi))}
            else:
                self.report.count("dlq_rows", n)
                want = p.date
                got = {_utc(t).date().isoformat() for t in (lo, hi)}
            if got != {want}:
                self.report.add("error", "rows", path, f"rows from {lo} to {hi} are outside its partition")

    def _check_entry(
        self, e: ManifestEntry, ev: list[Any] | None, reasons: dict[str, int], offsets: int, *, costs: bool
    ) -> None:
        """An entry's rows against its totals; ``costs=False`` for a restated entry, whose
        cost `_check_restated` checks with its partition's restatements."""
        where = f"{e.topic}[{e.partition}] {e.start}..{e.end}"
        accepted = ev[0] if ev else 0
        tokens = dict(zip(TOKEN_COLUMNS, ev[1 : 1 + len(TOKEN_COLUMNS)], strict=True)) if ev else {}
        cost = ev[1 + len(TOKEN_COLUMNS)] if ev else None
        unpriced = ev[2 + len(TOKEN_COLUMNS)] if ev else 0
        problems = []
        if accepted != e.accepted:
            problems.append(f"{accepted} event rows, entry says {e.accepted}")
        by_reason = dict(sorted(reasons.items()))
        if sum(reasons.values()) != e.rejected or by_reason != dict(e.rejects_by_reason):
            problems.append(f"DLQ rows by reason {by_reason}, entry says {dict(e.rejects_by_reason)}")
        for t in TOKEN_COLUMNS:
            if tokens.get(t, 0) != e.tokens[t]:
                problems.append(f"{t} sum {tokens.get(t, 0)}, entry says {e.tokens[t]}")
        if costs and (cost if cost is not None else Decimal(0)) != Decimal(e.cost_usd):
            problems.append(f"cost_usd sum {cost}, entry says {e.cost_usd}")
        if costs and unpriced != e.unpriced:
            problems.append(f"{unpriced} unpriced rows, entry says {e.unpriced}")
        if offsets != e.messages:
            problems.append(f"rows hold {offsets} distinct offsets, entry consumed {e.messages} messages")
        for p in problems:
            self.report.add("error", "rows", where, p)

    # --- 4: unlisted files ----------------------------------------------------------------

    def unlisted(self, rollup_known: set[str]) -> None:
        known = {f.path for pf in self.partitions for f in pf.live}
        known |= {f.path for pf in self.partitions for f, _ in pf.retired}
        known |= rollup_known
        pending: set[str] = set()
        for pf in self.partitions:
            s = pf.state
            try:
                intent = read_intent(self.root, s.topic, s.partition)
            except ValueError as e:
                self.report.add("warning", "unlisted", f"{s.topic}[{s.partition}]", f"unreadable intent: {e}")
                intent = None
            if intent is not None:
                pending.update(intent.files)
            pending.update(_compaction_intent(self.root, s.topic, s.partition))
        damaged = 0
        rolling = rollup_running(self.root)
        flags = _flag_files(self.root)
        for dirpath, dirnames, filenames in os.walk(self.root):
            here = Path(dirpath)
            if here == self.root:
                dirnames[:] = [d for d in dirnames if d != META_DIR]
            for name in [*filenames, *(d for d in dirnames if (here / d).is_symlink())]:
                path = here / name
                rel = path.relative_to(self.root).as_posix()
                self.report.count("walked")
                if path.is_symlink():
                    self.report.add("error", "unlisted", rel, "a symlink in the lake")
                elif rel in known:
                    continue
                elif _partition_of(rel) in self.corrupt:
                    damaged += 1
                elif rel in pending:
                    self.report.add("warning", "unlisted", rel, "named by an intent: a write in flight, "
                                    "or a crashed one that the next owner removes")  # fmt: skip
                elif name.startswith(".") and name.endswith(".tmp"):
                    self.report.add("warning", "unlisted", rel, "a temporary file")
                elif rel in flags:
                    continue
                elif rel.startswith("flags/"):
                    self.report.add("warning", "unlisted", rel, "a flags file no flags record lists "
                                    "(a detector run in flight, or one that lost a race)")  # fmt: skip
                elif rel.startswith(f"{ROLLUPS_DIR}/") and rolling:
                    self.report.add("warning", "unlisted", rel, "written by the rollup run in progress")
                else:
                    self.report.add("error", "unlisted", rel, "no manifest or rollup record lists it")
        if damaged:
            self.report.add(
                "warning",
                "unlisted",
                "lake",
                f"{damaged} files of partitions with a damaged manifest not checked",
            )

    # --- 5: rollups ----------------------------------------------------------------------

    def rollups(self) -> set[str]:
        records, problems = read_records(self.root)
        for p in problems:
            self.report.add("error", "rollup", p.split(":")[0], p)
        known: set[str] = set()
        whole: dict[tuple[str, int | None], RollupRecord] = {}
        for key, r in records.items():
            known.update(f.path for f in r.files.values())
            known.update(p for p, _ in r.retired)
            intact = True
            for grain, f in r.files.items():
                path = self.root / f.path
                try:
                    size = path.stat().st_size
                    digest = file_sha256(path) if size == f.bytes else ""
                    rows = pq.ParquetFile(path).metadata.num_rows if digest == f.sha256 else -1
                except FileNotFoundError:
                    self.report.add("error", "rollup", f.path, f"missing ({grain} rollup of {_where(key)})")
                    intact = False
                    continue
                except (OSError, pa.ArrowException) as e:
                    self.report.add("error", "rollup", f.path, f"unreadable: {e}")
                    intact = False
                    continue
                if size != f.bytes or digest != f.sha256 or rows != f.rows:
                    self.report.add(
                        "error", "rollup", f.path, "differs from its record (bytes, sha256 or rows)"
                    )
                    intact = False
            if intact:
                whole[key] = r
        if self.corrupt:
            if records:
                self.report.add("warning", "rollup", "rollups", "not compared: the manifest is damaged")
            return known
        if not records:
            if self.partitions:
                self.report.add("warning", "rollup", "rollups", "none built yet: run meter rollup")
            return known
        sources = current_sources(self.root)
        fresh_hours: dict[tuple[str, int], RollupRecord] = {}
        for key, srcs in sources.items():
            rec = records.get(key)
            if rec is None or rec.digest != hour_digest(srcs):
                self.report.count("rollup_stale")
                self.report.add("warning", "rollup", _where(key), "behind the lake: run meter rollup")
            elif key in whole:
                fresh_hours[key] = rec
        for key, r in records.items():
            if r.hour is not None and key not in sources:
                self.report.count("rollup_stale")
                self.report.add("warning", "rollup", _where(key), "the lake has no events here any more")
        dates = sorted({d for d, _ in sources})
        for date in dates:
            hours = {h: hour_digest(s) for (d, h), s in sources.items() if d == date}
            day = records.get((date, None))
            day_fresh = day is not None and day.digest == day_digest(hours) and (date, None) in whole
            if day is not None and not day_fresh and (date, None) in whole:
                self.report.count("rollup_stale")
                self.report.add(
                    "warning", "rollup", _where((date, None)), "behind the lake: run meter rollup"
                )
            hour_keys = sorted(k for k in fresh_hours if k[0] == date)
            self._compare(date, hour_keys, sources, fresh_hours, day if day_fresh else None)
        return known

    def _compare(
        self,
        date: str,
        hour_keys: list[tuple[str, int]],
        sources: Mapping[tuple[str, int], Sequence[Any]],
        records: Mapping[tuple[str, int], RollupRecord],
        day: RollupRecord | None,
    ) -> None:
        """Stored rollups of one date's up-to-date partitions against a fresh
        aggregation: the date's raw rows are read once into a fresh minute grain, which
        the fresh hour and day grains sum (with SQL written apart from meter.rollup)."""
        keys = [k for k in sources if k[0] == date] if day is not None else hour_keys
        if not keys:
            return
        raw = [os.fspath(self.root / s.path) for k in keys for s in sources[k]]
        hours = ", ".join(str(h) for _, h in hour_keys) or "NULL"
        plans: list[tuple[str, str, list[RollupFile], str]] = []
        if hour_keys:
            what = ", ".join(f"{h:02d}" for _, h in hour_keys)
            for grain in ("minute", "hour"):
                stored = [records[k].files[grain] for k in hour_keys]
                plans.append((grain, f"WHERE hour(ts) IN ({hours})", stored, what))
        if day is not None:
            plans.append(("day", "", [day.files["day"]], "day"))
        try:
            self.con.execute(f"CREATE OR REPLACE TEMP TABLE fresh_minute AS {_fresh_sql(raw)}")
        except duckdb.Error as e:
            self.report.add("error", "rollup", f"date={date}", f"cannot aggregate the raw rows: {e}")
            return
        columns = ", ".join(_q(f.name) for f in ROLLUP)
        for grain, where, stored, what in plans:
            self.report.count("rollup_partitions", len(stored))
            self.report.count("rollup_rows", sum(f.rows for f in stored))
            fresh = _coarser_sql(grain, f"(SELECT * FROM fresh_minute {where})")
            files = sql_list([os.fspath(self.root / f.path) for f in stored])
            kept = f"SELECT {columns} FROM read_parquet({files})"
            diff = (
                f"SELECT {columns}, sum(side) AS n FROM (SELECT *, 1 AS side FROM ({fresh}) "
                f"UNION ALL SELECT *, -1 AS side FROM ({kept})) GROUP BY {columns} HAVING sum(side) <> 0"
            )
            try:
                missing, extra, first = self.con.sql(
                    "SELECT count(*) FILTER (WHERE n > 0), count(*) FILTER (WHERE n < 0), min(ts) "
                    f"FROM ({diff})"
                ).fetchall()[0]
            except duckdb.Error as e:
                self.report.add("error", "rollup", f"rollup_{grain} {date} ({what})", f"cannot compare: {e}")
                continue
            if missing or extra:
                self.report.add(
                    "error", "rollup", f"rollup_{grain} {date} ({what})",
                    f"{missing} fresh groups absent or different, {extra} stored groups not in a "
                    f"fresh aggregation (first at {first})",
                )  # fmt: skip
        self.con.execute("DROP TABLE fresh_minute")


def _restated_entries(pf: PartitionFiles) -> list[ManifestEntry]:
    """Entries of ``pf`` whose offsets a restatement rewrote (a file's name gives its range)."""
    ranges = [
        (p.start, p.end)
        for r in pf.rewrites
        if isinstance(r, RestatementRecord)
        for p in (parse_rel_path(f.file.path) for f in r.files)
    ]
    return [e for e in pf.state.entries if any(lo < e.end and e.start < hi for lo, hi in ranges)]


def _partition_of(rel: str) -> tuple[str, int] | None:
    try:
        p = parse_rel_path(rel)
    except ValueError:
        return None
    return (p.topic, p.partition)


def _add(a: Any, b: Any) -> Any:
    """Sum that treats None (SQL's sum of no cost) as nothing."""
    if a is None:
        return b
    return a if b is None else a + b


def _place(placed: dict[str, list[Any]], filename: str, n: int, lo: Any, hi: Any) -> None:
    got = placed.get(filename)
    if got is None:
        placed[filename] = [n, lo, hi]
    else:
        got[0] += n
        got[1], got[2] = min(got[1], lo), max(got[2], hi)


def e_key(e: ManifestEntry) -> tuple[str, int, int]:
    return (e.topic, e.partition, e.start)


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _utc(t: Any) -> Any:
    import datetime as dt

    return t.astimezone(dt.UTC)


def _where(key: tuple[str, int | None]) -> str:
    date, hour = key
    return f"date={date}" + ("" if hour is None else f" hour={hour:02d}")


def _fresh_sql(raw: Sequence[str]) -> str:
    """The minute grain straight from raw rows, written apart from meter.rollup
    (``time_bucket`` rather than ``date_trunc``, ``array_agg`` with a filter)."""
    dims = ", ".join(_q(d) for d in DIMENSIONS)
    tokens = ", ".join(f"CAST(sum({t}) AS BIGINT) AS {t}" for t in TOKEN_COLUMNS)
    return (
        "SELECT time_bucket(INTERVAL '1 minute', ts, TIMESTAMPTZ '1970-01-01 00:00:00+00') AS ts, "
        f"{dims}, CAST(count(*) AS BIGINT) AS events, {tokens}, sum(cost_usd) AS cost_usd, "
        "CAST(count(*) FILTER (WHERE cost_usd IS NULL) AS BIGINT) AS unpriced, "
        "coalesce(array_agg(DISTINCT price_version ORDER BY price_version) "
        "FILTER (WHERE price_version IS NOT NULL), []::VARCHAR[]) AS price_versions "
        f"FROM read_parquet({sql_list(raw)}) GROUP BY ALL"
    )


def _coarser_sql(grain: str, relation: str) -> str:
    """``relation`` (a fresh minute grain) summed to ``grain``."""
    if grain == "minute":
        return f"SELECT * FROM {relation}"
    width = {"hour": "1 hour", "day": "1 day"}[grain]
    dims = ", ".join(_q(d) for d in DIMENSIONS)
    measures = ", ".join(f"CAST(sum({m}) AS BIGINT) AS {m}" for m in ("events", *TOKEN_COLUMNS))
    return (
        f"SELECT time_bucket(INTERVAL '{width}', ts, TIMESTAMPTZ '1970-01-01 00:00:00+00') AS ts, {dims}, "
        f"{measures}, sum(cost_usd) AS cost_usd, CAST(sum(unpriced) AS BIGINT) AS unpriced, "
        f"list_sort(list_distinct(flatten(array_agg(price_versions)))) AS price_versions FROM {relation} "
        "GROUP BY ALL"
    )


def _flag_files(root: Path) -> set[str]:
    """Usage-gaming flags files their records list (see meter.detect)."""
    import datetime as dt

    from meter.detect import flag_files

    return set(flag_files(root, dt.date.min, dt.date.max))


def _compaction_intent(root: Path, topic: str, partition: int) -> list[str]:
    """Merged files a compaction of this partition announced (see meter.compact)."""
    from meter.compact import state_dir

    try:
        doc = orjson.loads((state_dir(root, topic, partition) / "intent.json").read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return []
    files = doc.get("files") if isinstance(doc, dict) else None
    return [f for f in files if isinstance(f, str)] if isinstance(files, list) else []


def audit(lake: LakePath, *, record: bool = True) -> AuditReport:
    """Run every check on ``lake``; see the module docstring. ``record=False``: the
    checksum ledger is read but not written, so the audit changes nothing."""
    root = Path(lake)
    if not root.is_dir():
        raise FileNotFoundError(f"no lake directory at {os.fspath(lake)}")
    a = _Audit(root, record)
    try:
        with localcontext(EXACT):  # cost sums of up to 38 digits: the default context rounds at 28
            a.chains()
            a.files()
            a.rows()
            known = a.rollups()
            a.unlisted(known)
    finally:
        a.con.close()
    if not a.report.counts.get("partitions") and not a.corrupt:
        a.report.add("warning", "chain", "manifest", "the lake has no manifest entry yet")
    return a.report
