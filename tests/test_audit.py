"""meter.audit: a healthy lake passes; each seeded corruption is caught and named."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_compact import flush_tables
from test_rollup import T0, TOPIC, SynthLake, assert_exact, build

from meter import rollup as R
from meter.audit import LEDGER, audit
from meter.cli import main
from meter.compact import CompactPolicy, compact
from meter.lake import write_intent, write_parquet_atomic
from meter.manifest import ManifestEntry, entry_path, listed_files, listed_records, load_partition
from meter.stages import Flush, write_flush


@pytest.fixture
def healthy(tmp_path: Path) -> SynthLake:
    lake = build(tmp_path / "lake", scale=3)
    R.build_rollups(lake.root, grace_s=0)
    return lake


def errors(lake: SynthLake, **kw: bool) -> list[tuple[str, str, str]]:
    return [(f.check, f.where, f.detail) for f in audit(lake.root, **kw).errors]


def a_file(lake: SynthLake, kind: str = "events") -> Path:
    return lake.root / listed_files(lake.root, kind)[0]  # type: ignore[arg-type]


def test_a_healthy_lake_passes_without_warnings(healthy: SynthLake) -> None:
    report = audit(healthy.root)
    assert report.ok and not report.findings, report.render()
    c = report.counts
    assert c["event_rows"] == 225 and c["dlq_rows"] == 3 and c["messages"] == 228
    assert c["hashed"] == c["files"] > 0 and c["rollup_partitions"] > 0
    # every record has the sha256 its file was written with: the ledger has nothing to keep
    assert c["hashes_new"] == 0 and not (healthy.root / LEDGER).exists()


def test_deleted_file(healthy: SynthLake) -> None:
    path = a_file(healthy)
    path.unlink()
    found = errors(healthy)
    assert ("file", path.relative_to(healthy.root).as_posix(), "missing") in found


def test_truncated_file(healthy: SynthLake) -> None:
    path = a_file(healthy, "dlq")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    found = errors(healthy)
    assert any(c == "file" and w.endswith(path.name) and "bytes" in d for c, w, d in found), found


def test_truncated_file_that_keeps_its_size(healthy: SynthLake) -> None:
    """Zeroed pages, same length: the footer is gone, so the file is unreadable."""
    path = a_file(healthy)
    data = path.read_bytes()
    path.write_bytes(bytes(len(data)))
    found = errors(healthy)
    assert any(c == "file" and "unreadable" in d for c, _, d in found), found


def test_edited_row_changes_the_sums(healthy: SynthLake) -> None:
    path = a_file(healthy)
    table = pq.read_table(path)
    tokens = table.column("input_tokens").to_pylist()
    tokens[0] += 1
    table = table.set_column(table.schema.get_field_index("input_tokens"), "input_tokens", pa.array(tokens))
    size = path.stat().st_size
    write_parquet_atomic(table, path)
    found = errors(healthy)
    if path.stat().st_size == size:  # same size: the ledger's checksum and the sums catch it
        assert any(c == "rows" and "input_tokens sum" in d for c, _, d in found), found
    assert any(c == "file" and ("sha256" in d or "bytes" in d) for c, _, d in found), found


def test_edited_string_caught_by_the_recorded_checksum(healthy: SynthLake) -> None:
    path = a_file(healthy)
    table = pq.read_table(path)
    users = table.column("user").to_pylist()
    users[0] = "u999" if users[0] != "u999" else "u998"
    table = table.set_column(table.schema.get_field_index("user"), "user", pa.array(users))
    write_parquet_atomic(table, path)
    found = errors(healthy)
    assert any(c == "file" and ("sha256" in d or "bytes" in d) for c, _, d in found), found


def test_edited_string_same_size(healthy: SynthLake) -> None:
    """An edit that keeps the byte count: only the recorded sha256 can see it."""
    path = a_file(healthy)
    data = bytearray(path.read_bytes())
    data[64] ^= 0x01  # inside the first column's pages, far from the footer
    path.write_bytes(bytes(data))
    found = errors(healthy)
    assert any(c == "file" and "sha256" in d for c, _, d in found), found


def flip_created_by(path: Path) -> tuple[str, str]:
    """Change one letter of the footer's writer name: same size, rows, schema and sums.
    Returns the sha256 before and after."""
    data = path.read_bytes()
    i = data.rindex(b"parquet-cpp-arrow")
    edited = data[:i] + b"P" + data[i + 1 :]
    path.write_bytes(edited)
    return hashlib.sha256(data).hexdigest(), hashlib.sha256(edited).hexdigest()


def test_edit_keeping_rows_and_sums_is_caught_on_the_first_audit(healthy: SynthLake) -> None:
    """The record's sha256 was hashed as the file was written: no earlier audit is needed."""
    path = a_file(healthy)
    rel = path.relative_to(healthy.root).as_posix()
    record = next(f for f in listed_records(healthy.root) if f.path == rel)
    before, after = flip_created_by(path)
    assert record.sha256 == before and pq.read_table(path).num_rows == record.rows
    found = errors(healthy)
    assert found == [
        ("file", rel, f"sha256 {after}, its record says {before}: the file changed after it was written")
    ]
    assert not (healthy.root / LEDGER).exists()


def forget_checksums(root: Path) -> None:
    """Rewrite every manifest entry as it was written before files had a sha256."""
    for path in (root / "_meter" / "manifest").rglob("*.json"):
        if path.name.startswith("compaction-"):
            continue
        entry = ManifestEntry.from_json(path.read_bytes())
        files = tuple(dataclasses.replace(f, sha256=None) for f in entry.files)
        path.write_bytes(dataclasses.replace(entry, files=files).to_json())


def test_entries_without_checksums_use_the_ledger(healthy: SynthLake) -> None:
    """Files listed before records had a sha256: the first audit records theirs (unless
    ``record=False``), and an edit is caught from the next audit on."""
    forget_checksums(healthy.root)
    assert all(f.sha256 is None for f in listed_records(healthy.root))
    report = audit(healthy.root, record=False)
    assert report.ok and not (healthy.root / LEDGER).exists(), report.render()
    report = audit(healthy.root)
    assert report.ok and not report.findings, report.render()
    assert report.counts["hashed"] == report.counts["files"] == report.counts["hashes_new"] > 0
    assert audit(healthy.root).counts["hashes_new"] == 0
    path = a_file(healthy)
    before, after = flip_created_by(path)
    found = errors(healthy)
    assert [(c, w) for c, w, _ in found] == [("file", path.relative_to(healthy.root).as_posix())]
    assert f"sha256 {after[:16]}... differs from the one recorded ({before[:16]}...)" in found[0][2]


def test_extra_file(healthy: SynthLake) -> None:
    src = a_file(healthy)
    stray = src.with_name(f"{TOPIC}.0.00000000000000099000-00000000000000099010.parquet")
    shutil.copy(src, stray)
    (healthy.root / "rollups" / "day" / "forged.parquet").write_bytes(b"x")
    (healthy.root / "notes.txt").write_text("hi")
    found = errors(healthy)
    unlisted = sorted(w for c, w, _ in found if c == "unlisted")
    assert unlisted == sorted(
        [stray.relative_to(healthy.root).as_posix(), "rollups/day/forged.parquet", "notes.txt"]
    ), found
    assert all(c == "unlisted" for c, _, _ in found)


def test_symlink_out_of_the_lake(healthy: SynthLake, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (healthy.root / "events" / "escape").symlink_to(outside, target_is_directory=True)
    found = errors(healthy)
    assert ("unlisted", "events/escape", "a symlink in the lake") in found


def test_manifest_gap(tmp_path: Path) -> None:
    lake = build(tmp_path / "lake", scale=2)
    lake.flush(10, partition=1)
    entries = load_partition(lake.root, TOPIC, 1).entries
    assert len(entries) == 2
    lake.flush(5, partition=1)
    entry_path(lake.root, TOPIC, 1, entries[1].start).unlink()
    found = errors(lake)
    assert any(c == "chain" and w == f"{TOPIC}[1]" and "gap" in d for c, w, d in found), found
    # The other partition is still checked in full.
    assert not any(c == "chain" and w == f"{TOPIC}[0]" for c, w, _ in found)


def test_entry_totals_that_lie(healthy: SynthLake) -> None:
    """An entry edited to claim another cost (its JSON stays valid)."""
    entry = load_partition(healthy.root, TOPIC, 0).entries[0]
    path = entry_path(healthy.root, TOPIC, 0, entry.start)
    doc = json.loads(path.read_bytes())
    doc["cost_usd"] = str(entry.cost + 1)
    path.write_bytes(json.dumps(doc).encode())
    found = errors(healthy)
    assert any(c == "rows" and "cost_usd sum" in d for c, _, d in found), found


def test_cost_sums_beyond_28_digits_are_exact(tmp_path: Path) -> None:
    """One entry's cost in two files (two event hours), summed past the default decimal context."""
    events, dlq = flush_tables(0, 0, 3, hours=2)  # offset 0 unpriced, 1 and 2 in different hours
    costs = [None, Decimal("12345678901234567.123456789012"), Decimal("0.000000000001")]
    events = events.set_column(
        events.schema.get_field_index("cost_usd"),
        "cost_usd",
        pa.array(costs, events.schema.field("cost_usd").type),
    )
    entry = write_flush(os.fspath(tmp_path), Flush(TOPIC, 0, 0, None, 3, 0, 3, events, dlq), "test/1")
    assert entry.cost_usd == "12345678901234567.123456789013" and len(entry.files) == 2
    report = audit(tmp_path)
    assert report.ok, report.render()


def test_rollup_file_and_content_corruption(healthy: SynthLake) -> None:
    view = R.rollup_view(healthy.root, "hour")
    path = healthy.root / view.files[0]
    path.write_bytes(path.read_bytes()[:-10])
    found = errors(healthy)
    assert any(c == "rollup" and w == view.files[0] for c, w, _ in found), found


def test_rollup_that_disagrees_with_the_raw_events(healthy: SynthLake) -> None:
    """A rollup rewritten with one cost changed, its record updated to match: only the
    fresh aggregation can tell."""
    records = R.read_records(healthy.root)[0]
    key = next(k for k in sorted(records, key=str) if k[1] is not None)
    record = records[key]
    rel = record.files["minute"].path
    table = pq.read_table(healthy.root / rel)
    i = table.schema.get_field_index("cost_usd")
    cost = table.column(i).to_pylist()
    j = next(n for n, c in enumerate(cost) if c is not None)
    cost[j] += type(cost[j])("0.000000000001")
    table = table.set_column(i, "cost_usd", pa.array(cost, table.schema.field(i).type))
    f = R.RollupFile(rel, table.num_rows, *write_parquet_atomic(table, healthy.root / rel))
    forged = dataclasses.replace(record, files={**record.files, "minute": f})
    R.record_path(healthy.root, *key).write_bytes(forged.to_json())
    found = errors(healthy)
    assert any(c == "rollup" and w.startswith(f"rollup_minute {key[0]}") for c, w, _ in found), found
    assert all(c == "rollup" for c, _, _ in found)


def test_stale_rollups_and_pending_writes_are_warnings(healthy: SynthLake) -> None:
    healthy.flush(10, start_ms=T0, span_ms=60_000)
    src = a_file(healthy)
    name = f"{TOPIC}.1.00000000000000000200-00000000000000000210.parquet"
    write_intent(
        healthy.root, TOPIC, 1, 200, 210, [src.parent.relative_to(healthy.root).as_posix() + "/" + name]
    )
    shutil.copy(src, src.with_name(name))
    report = audit(healthy.root)
    assert report.ok, report.render()
    checks = {(f.check, f.severity) for f in report.findings}
    assert checks == {("rollup", "warning"), ("unlisted", "warning")}


def test_compaction_then_rollups_and_audit(tmp_path: Path) -> None:
    """Compacted files are audited by offset; rollups rebuilt over them stay exact, also
    after a compaction that crashed half way."""
    lake = SynthLake(tmp_path / "lake", seed=3)
    for _ in range(4):
        lake.flush(40, span_ms=2 * 3600_000)
    R.build_rollups(lake.root, grace_s=0)
    policy = CompactPolicy(grace_s=0, delete_grace_s=0)

    class Crash(Exception):
        pass

    def crash(step: str) -> None:
        if step == "output":
            raise Crash(step)

    with pytest.raises(Crash):
        compact(lake.root, policy, writer="test", checkpoint=crash)
    R.build_rollups(lake.root, grace_s=0)
    assert_exact(lake.root)
    compact(lake.root, policy, writer="test")
    assert len(listed_files(lake.root, "events")) < 4 * 3
    report = R.build_rollups(lake.root, grace_s=0)
    assert report.hours_rebuilt > 0 and report.hours_merged == 0
    assert_exact(lake.root)
    result = audit(lake.root)
    assert result.ok and not result.findings, result.render()


def test_cli_audit(healthy: SynthLake, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "--lake", os.fspath(healthy.root)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("OK: 0 errors, 0 warnings")
    a_file(healthy).unlink()
    assert main(["audit", "--lake", os.fspath(healthy.root), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["findings"][0]["check"] == "file"
    assert main(["audit", "--lake", os.fspath(healthy.root / "nope")]) == 2


def test_audit_during_a_rollup_run(healthy: SynthLake) -> None:
    healthy.flush(10, start_ms=T0, span_ms=60_000)
    seen = []

    def step(name: str) -> None:
        if name.startswith("hour") and not seen:
            seen.append(audit(healthy.root, record=False))

    R.build_rollups(healthy.root, grace_s=0, on_step=step)
    report = seen[0]
    assert report.ok, report.render()
    assert any("rollup run in progress" in f.detail for f in report.warnings)


def test_rollup_of_a_damaged_lake_fails_cleanly(
    healthy: SynthLake, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file(healthy).unlink()
    assert main(["rollup", "--lake", os.fspath(healthy.root), "--full"]) == 1
    assert "meter audit" in capsys.readouterr().err


def test_flags_files_their_records_list_are_known(healthy: SynthLake) -> None:
    import datetime as dt

    from meter.detect import FLAGS, write_flags

    write_flags(healthy.root, dt.date(2026, 1, 5), "day", FLAGS.empty_table(), ["x"], "policy")
    (healthy.root / "flags" / "date=2026-01-05" / "day-stray.parquet").write_bytes(b"x")
    report = audit(healthy.root)
    assert report.ok, report.render()
    assert [f.where for f in report.warnings] == ["flags/date=2026-01-05/day-stray.parquet"]
