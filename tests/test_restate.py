"""meter reprice --apply (meter.reprice.restate): stored costs restated after a price
correction, as new versions of the files through manifest records, exact against a fresh
pricing, the rollups and the audit; under crashes, compaction and a racing compaction."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_reprice import DEFAULT_TOML, GPT5, MYSTERY
from test_rollup import T0, TOPIC, SynthLake, assert_exact, build

from meter import lake as L
from meter import rollup as R
from meter.audit import audit
from meter.cli import main
from meter.compact import CompactBusy, CompactPolicy, compact, compact_partition, lake_lock
from meter.manifest import (
    FileRecord,
    Restatement,
    RestatementRecord,
    RewriteConflict,
    listed_records,
    load_files,
    rewrite_path,
    totals,
)
from meter.pricing import Catalog
from meter.query import query
from meter.reprice import RestateError, RestateReport, load_catalog_file, reprice, restate
from meter.schema import EVENTS

HOUR = 3_600_000
LATER = T0 + 10 * 24 * HOUR  # every hour of the test lakes long closed
BIG = CompactPolicy(target_bytes=64 << 20, grace_s=0, delete_grace_s=0)
OTHER_TOML = DEFAULT_TOML.replace(GPT5, GPT5.replace('input = "1.25"', 'input = "1.1"')) + MYSTERY


@pytest.fixture
def lake(tmp_path: Path) -> SynthLake:
    lake = build(tmp_path / "lake", scale=4)
    R.build_rollups(lake.root, grace_s=0)
    return lake


@pytest.fixture
def other(tmp_path: Path) -> Path:
    path = tmp_path / "corrected.toml"
    path.write_text(OTHER_TOML)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(root: Path) -> dict[str, str]:
    """Every listed file's sha256, by path."""
    return {f.path: sha(L.abs_path(root, f.path)) for f in listed_records(root)}


def listed_events(root: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(L.abs_path(root, f.path)) for f in listed_records(root, "events"))


def fresh(catalog: Catalog, table: pa.Table) -> pa.RecordBatch:
    events = pa.RecordBatch.from_arrays(
        [table.column(n).combine_chunks() for n in EVENTS.names], schema=EVENTS
    )
    return catalog.price(events)


def query_cost(root: Path) -> Decimal:
    return query(root, "SELECT coalesce(sum(cost_usd), 0) AS c FROM events").column("c")[0].as_py()


def dry_difference(root: Path, catalog: Catalog, **kw: Any) -> Decimal:
    diff: Decimal = reprice(root, catalog, by=[], **kw).total.column("difference_usd")[0].as_py()
    return diff


def restatements(root: Path) -> list[RestatementRecord]:
    from meter.manifest import list_partitions

    return [
        r
        for t, p in list_partitions(root)
        for r in load_files(root, t, p).rewrites
        if isinstance(r, RestatementRecord)
    ]


def check_exact(root: Path) -> None:
    """Manifest totals, the events view and the listed files agree; rollups equal raw rows."""
    t = totals(root)
    table = listed_events(root)
    stored = sum((c for c in table.column("cost_usd").to_pylist() if c is not None), Decimal(0))
    assert Decimal(t.cost_usd) == stored == query_cost(root)
    assert t.unpriced == table.column("cost_usd").null_count
    assert t.accepted == table.num_rows


# --- the lake ----------------------------------------------------------------------------------


def test_apply_restates_exactly(lake: SynthLake, other: Path) -> None:
    root = lake.root
    catalog, ref = load_catalog_file(other)
    before_cost = Decimal(totals(root).cost_usd)
    difference = dry_difference(root, catalog)
    assert difference != 0
    report = restate(root, catalog, ref, writer="test", delete_grace_s=900)
    assert report.files > 0 and report.records == 2  # one per Kafka partition
    assert report.rollups == "rebuilt"
    # Every stored cost is the new catalog's, row by row, and the files are new versions.
    table = listed_events(root)
    new = fresh(catalog, table)
    assert table.column("cost_usd").combine_chunks().equals(new.column("cost_usd"))
    assert table.column("price_version").combine_chunks().equals(new.column("price_version"))
    assert all(L.parse_rel_path(p).version == 2 for p in report.restated)
    # The records keep old and new cost: their differences are the dry run's total.
    records = restatements(root)
    assert sum((r.cost_change for r in records), Decimal(0)) == difference == report.difference_usd
    assert all(r.catalog == ref and r.writer == "test" for r in records)
    assert all(f.file.sha256 == sha(L.abs_path(root, f.file.path)) for r in records for f in r.files)
    assert Decimal(totals(root).cost_usd) == before_cost + difference
    check_exact(root)
    assert_exact(root)  # every rollup grain against the raw rows, and totals()
    result = audit(root)
    assert result.ok, result.render()
    assert result.counts["restatements"] == len(records)
    # Old versions stay listed nowhere but on disk for the grace, as retired files.
    assert all(L.abs_path(root, r.replaces.path).exists() for rec in records for r in rec.files)
    # A second apply with the same catalog has nothing to do.
    files = listing(root)
    again = restate(root, catalog, ref, writer="test", delete_grace_s=900)
    assert (again.files, again.records, again.conflicts) == (0, 0, 0)
    assert listing(root) == files


def test_report_sums_are_exact() -> None:
    """Past the 28 digits of Python's default decimal context."""
    rel = L.events_rel_path("2026-01-01", 0, L.data_file_name(TOPIC, 0, 0, 1))
    old = FileRecord(rel, "events", 1, 10, None)
    new = FileRecord(L.next_version_path(old.path), "events", 1, 10, "ab" * 32)
    big = "99999999999999999999999999.999999999999"
    report = RestateReport()
    for old_cost, new_cost in ((big, "0.000000000001"), ("0.000000000001", big)):
        report.add(Restatement(old, new, old_cost, new_cost, old_unpriced=0, new_unpriced=0, changed=1))
    assert report.old_cost_usd == report.new_cost_usd == Decimal("100000000000000000000000000.000000000000")
    assert report.difference_usd == 0
    assert report.to_json()["old_cost_usd"] == "100000000000000000000000000.000000000000"


def test_range_leaves_other_files_untouched(lake: SynthLake, other: Path) -> None:
    root = lake.root
    catalog, ref = load_catalog_file(other)
    lo, hi = T0 + HOUR + 600_000, T0 + 2 * HOUR
    before = listing(root)
    old = listed_events(root)
    difference = dry_difference(root, catalog, start_ms=lo, end_ms=hi)
    report = restate(root, catalog, ref, start_ms=lo, end_ms=hi, delete_grace_s=0)
    after = listing(root)
    hour = L.parse_rel_path
    untouched = {p for p in before if hour(p).kind == "dlq" or hour(p).hour != 23}  # T0 + 1 h is 23:00
    assert untouched and all(after.get(p) == before[p] for p in untouched)
    assert report.files and all(hour(p).hour == 23 for p in report.restated)
    assert report.difference_usd == difference
    # Rows outside the range kept their stored cost; rows inside have the new one.
    table = listed_events(root)
    ts = [t.timestamp() * 1000 for t in table.column("ts").to_pylist()]
    new = fresh(catalog, table).column("cost_usd").to_pylist()
    stored = dict(zip(old.column("event_id").to_pylist(), old.column("cost_usd").to_pylist(), strict=True))
    for event_id, t, cost, priced in zip(
        table.column("event_id").to_pylist(), ts, table.column("cost_usd").to_pylist(), new, strict=True
    ):
        assert cost == (priced if lo <= t < hi else stored[event_id])
    check_exact(root)
    assert_exact(root)
    assert audit(root).ok


def test_audit_catches_a_restated_file_edited_afterwards(lake: SynthLake, other: Path) -> None:
    root = lake.root
    catalog, ref = load_catalog_file(other)
    report = restate(root, catalog, ref, delete_grace_s=0)
    assert audit(root).ok
    path = L.abs_path(root, report.restated[0])
    table = pq.read_table(path)
    costs = table.column("cost_usd").to_pylist()
    i = next(i for i, c in enumerate(costs) if c is not None)
    costs[i] += Decimal("0.000000000001")
    field = table.schema.field("cost_usd")
    table = table.set_column(table.schema.get_field_index("cost_usd"), field, pa.array(costs, field.type))
    L.write_parquet_atomic(table, path)
    found = [(f.check, f.where, f.detail) for f in audit(root).errors]
    assert any(c == "file" and w == report.restated[0] for c, w, _ in found), found


def test_audit_checks_costs_against_the_restatement_record(lake: SynthLake, other: Path) -> None:
    """A record whose new cost lies (or a file whose cost is not its record's) is caught by
    the sums, apart from the checksums."""
    root = lake.root
    catalog, ref = load_catalog_file(other)
    restate(root, catalog, ref, delete_grace_s=0)
    record = restatements(root)[0]
    first = record.files[0]
    forged = Decimal(first.new_cost_usd) + 1
    path = rewrite_path(root, record.topic, record.partition, record.seq)
    path.write_bytes(path.read_bytes().replace(f'"{first.new_cost_usd}"'.encode(), f'"{forged}"'.encode()))
    assert Decimal(totals(root).cost_usd) == query_cost(root) + 1  # the manifest now lies by 1 USD
    found = [(f.check, f.where, f.detail) for f in audit(root).errors]
    assert any(c == "rows" and w == first.file.path and "restatement record says" in d for c, w, d in found)
    assert any(c == "rows" and "restated entries" in w for c, w, _ in found), found


# --- with compaction --------------------------------------------------------------------------


def test_restatement_then_compaction(lake: SynthLake, other: Path) -> None:
    root = lake.root
    catalog, ref = load_catalog_file(other)
    lake.flush(40, start_ms=T0, span_ms=2 * HOUR)  # more small files to merge
    restate(root, catalog, ref, delete_grace_s=0)
    cost = totals(root).cost_usd
    report = compact(root, BIG, now_ms=LATER)
    assert report.groups > 0 and report.errors == []
    assert totals(root).cost_usd == cost
    swaps = [
        s
        for r in load_files(root, TOPIC, 0).rewrites
        if not isinstance(r, RestatementRecord)
        for s in r.swaps
    ]
    assert any(L.parse_rel_path(f.path).version == 2 for old, _ in swaps for f in old)  # restated inputs
    assert all(L.parse_rel_path(new.path).version == 1 for _, new in swaps)
    table = listed_events(root)
    assert table.column("cost_usd").combine_chunks().equals(fresh(catalog, table).column("cost_usd"))
    R.build_rollups(root, grace_s=0)
    check_exact(root)
    assert_exact(root)
    result = audit(root)
    assert result.ok and not result.findings, result.render()


def test_compaction_then_restatement(lake: SynthLake, other: Path) -> None:
    root = lake.root
    catalog, ref = load_catalog_file(other)
    compact(root, BIG, now_ms=LATER)
    difference = dry_difference(root, catalog)
    report = restate(root, catalog, ref, delete_grace_s=0)
    assert report.difference_usd == difference
    # The merged files are restated as .v2; late events then merge with them.
    lake.flush(30, start_ms=T0, span_ms=HOUR)
    assert compact(root, BIG, now_ms=LATER).groups > 0
    R.build_rollups(root, grace_s=0)
    check_exact(root)
    assert_exact(root)
    result = audit(root)
    assert result.ok and not result.findings, result.render()


def test_a_compaction_taking_the_seq_is_retried(lake: SynthLake, other: Path) -> None:
    """Another machine's compaction links the record seq this restatement planned on:
    the restatement's record conflicts, its files are dropped, and it plans again."""
    root = lake.root
    lake.flush(40, start_ms=T0, span_ms=2 * HOUR)
    catalog, ref = load_catalog_file(other)
    difference = dry_difference(root, catalog)
    raced = False

    def race(step: str) -> None:
        nonlocal raced
        if step == "planned" and not raced:
            raced = True
            keep = CompactPolicy(grace_s=0, delete_grace_s=900)  # the files the plan read stay
            assert compact_partition(root, TOPIC, 0, keep, now_ms=LATER, writer="elsewhere").records > 0

    report = restate(root, catalog, ref, delete_grace_s=0, checkpoint=race)
    assert raced and report.conflicts == 1
    assert report.difference_usd == difference
    kinds = [type(r).__name__ for r in load_files(root, TOPIC, 0).rewrites]
    assert kinds[0] == "CompactionRecord" and "RestatementRecord" in kinds
    check_exact(root)
    assert_exact(root)
    result = audit(root)
    assert result.ok and not result.findings, result.render()


def test_losing_every_race_fails_cleanly(
    lake: SynthLake, other: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = lake.root
    catalog, ref = load_catalog_file(other)
    files, cost = listing(root), totals(root).cost_usd

    def taken(lake_path: Any, record: Any) -> Any:
        raise RewriteConflict(record.topic, record.partition, record.seq)

    monkeypatch.setattr("meter.reprice.append_rewrite", taken)
    with pytest.raises(RestateError, match="3 times"):
        restate(root, catalog, ref)
    assert listing(root) == files and totals(root).cost_usd == cost
    monkeypatch.undo()
    report = restate(root, catalog, ref, delete_grace_s=0)
    assert report.orphans_removed > 0 and report.files > 0
    check_exact(root)
    assert audit(root).ok


def test_one_rewriter_at_a_time(lake: SynthLake, other: Path) -> None:
    catalog, ref = load_catalog_file(other)
    with lake_lock(lake.root), pytest.raises(CompactBusy, match="compaction or restatement"):
        restate(lake.root, catalog, ref)


def test_bad_arguments_change_nothing(lake: SynthLake, other: Path, tmp_path: Path) -> None:
    catalog, ref = load_catalog_file(other)
    before = listing(lake.root)
    with pytest.raises(ValueError, match="empty"):
        restate(lake.root, catalog, ref, start_ms=T0, end_ms=T0)
    with pytest.raises(FileNotFoundError, match="no lake directory"):
        restate(tmp_path / "nope", catalog, ref)
    with pytest.raises(ValueError, match="delete_grace_s"):
        restate(lake.root, catalog, ref, delete_grace_s=-1)
    assert listing(lake.root) == before and not restatements(lake.root)


# --- crashes ----------------------------------------------------------------------------------

KILL_SCRIPT = """
import os, signal, sys
from meter.reprice import load_catalog_file, restate
root, catalog_path, step, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
seen = 0
def checkpoint(name):
    global seen
    if name == step:
        seen += 1
        if seen == nth:
            os.kill(os.getpid(), signal.SIGKILL)
catalog, ref = load_catalog_file(catalog_path)
restate(root, catalog, ref, delete_grace_s=0, checkpoint=checkpoint)
"""

STEPS = ("recovered", "planned", "intent", "writing", "output", "record", "committed", "deleting", "deleted")


@pytest.fixture(scope="module")
def crash_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("crash") / "lake"
    lake = build(root, scale=2)
    R.build_rollups(lake.root, grace_s=0)
    return root


@pytest.mark.parametrize(
    ("step", "nth"),
    [("planned", 1), ("intent", 1), ("writing", 2), ("output", 1), ("output", 3), ("record", 1),
     ("committed", 1), ("planned", 2), ("deleting", 1), ("deleted", 1)],
)  # fmt: skip
def test_sigkill_at_each_step(crash_template: Path, tmp_path: Path, other: Path, step: str, nth: int) -> None:
    """kill -9 at a step: every listed file is wholly old or wholly new, totals agree with
    the files (never doubled), and a re-run completes to the uninterrupted result."""
    root = Path(shutil.copytree(crash_template, tmp_path / "lake"))
    catalog, ref = load_catalog_file(other)
    old = {
        r["event_id"]: r["cost_usd"] for r in listed_events(root).select(["event_id", "cost_usd"]).to_pylist()
    }
    old_total, difference = Decimal(totals(root).cost_usd), dry_difference(root, catalog)
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, os.fspath(root), os.fspath(other), step, str(nth)],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    check_exact(root)
    for f in listed_records(root, "events"):
        table = pq.read_table(L.abs_path(root, f.path))
        costs = table.column("cost_usd").to_pylist()
        if L.parse_rel_path(f.path).version == 1:
            assert costs == [old[e] for e in table.column("event_id").to_pylist()], f.path
        else:
            assert costs == fresh(catalog, table).column("cost_usd").to_pylist(), f.path
    restate(root, catalog, ref, delete_grace_s=0)
    assert Decimal(totals(root).cost_usd) == old_total + difference
    table = listed_events(root)
    assert table.column("cost_usd").combine_chunks().equals(fresh(catalog, table).column("cost_usd"))
    check_exact(root)
    assert_exact(root)
    result = audit(root)
    assert result.ok and not result.findings, result.render()
    on_disk = {p.relative_to(root).as_posix() for p in (root / "events").rglob("*") if p.is_file()}
    assert on_disk == {f.path for f in listed_records(root, "events")}
    assert not list((root / "_meter" / "compact").rglob("intent.json"))


# --- the command line ---------------------------------------------------------------------------


def test_cli_apply(lake: SynthLake, other: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["reprice", "--lake", os.fspath(lake.root), "--catalog", os.fspath(other), "--by", "model"]
    difference = dry_difference(lake.root, Catalog.loads(OTHER_TOML))
    assert main([*argv, "--format", "table", "--apply"]) == 0
    out = capsys.readouterr().out
    assert "gpt-5" in out and "total over" in out
    assert f"difference {difference} USD; rollups rebuilt" in out and "restated " in out
    assert main([*argv, "--format", "csv", "--apply"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("model,") and "restated 0 files" in captured.err
    assert audit(lake.root).ok


def test_cli_rejects_a_negative_deletion_grace(
    lake: SynthLake, other: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A negative grace would delete the replaced files under running queries at once."""
    before = listing(lake.root)
    argv = ["reprice", "--lake", os.fspath(lake.root), "--catalog", os.fspath(other), "--apply"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--delete-after-minutes", "-1"])
    assert exit_info.value.code == 2
    assert "--delete-after-minutes: must be a finite number >= 0" in capsys.readouterr().err
    assert listing(lake.root) == before and not restatements(lake.root)
