"""The command line: `meter validate`, `meter prices`, `meter --version`, `meter demo`."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from meter import reasons as R
from meter.cli import main
from meter.mix import Mix, bad_event

NOW_MS = 1_795_000_000_000
NOW = "2026-11-18T11:06:40Z"  # NOW_MS


def sample(tmp_path: Path, good: int = 200, bad: tuple[str, ...] = (R.WRONG_TYPE, R.INVALID_JSON)) -> Path:
    import random

    mix = Mix(seed=5, start_ms=NOW_MS - 3_600_000)
    lines = list(mix.messages(good))
    rng = random.Random(3)
    for reason in bad:
        lines.insert(len(lines) // 2, bad_event(reason, rng, now_ms=NOW_MS))
    path = tmp_path / "events.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n\n")  # a trailing blank line is skipped
    return path


def test_validate_counts_by_reason_and_writes_rejects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sample(tmp_path)
    out = tmp_path / "rejects.jsonl"
    code = main(["validate", str(path), "--json", "--now", NOW, "--rejects", str(out)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["events"] == 200
    assert summary["rejects"] == {R.INVALID_JSON: 1, R.WRONG_TYPE: 1}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["reason"] for r in rows) == [R.INVALID_JSON, R.WRONG_TYPE]
    lines = path.read_bytes().split(b"\n")
    for row in rows:  # line numbers point at the raw text, counted from 1
        assert lines[row["line"] - 1].decode() == row["raw"]
        assert row["detail"]


def test_validate_strict_exits_1_only_when_something_was_rejected(tmp_path: Path) -> None:
    assert main(["validate", str(sample(tmp_path)), "--strict", "--now", NOW]) == 1
    clean = sample(tmp_path, bad=())
    assert main(["validate", str(clean), "--strict", "--now", NOW]) == 0


def test_validate_prices_with_the_catalog(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from meter.parser import parse_batch
    from meter.pricing import load_catalog

    path = sample(tmp_path, bad=())
    assert main(["validate", str(path), "--json", "--now", NOW, "--catalog"]) == 0
    summary = json.loads(capsys.readouterr().out)
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    priced = load_catalog().price(parse_batch(lines, now_ms=NOW_MS).batch)
    expected = sum(Decimal(c) for c in priced.column("cost_usd").to_pylist() if c is not None)
    assert Decimal(summary["cost_usd"]) == expected
    assert summary["unpriced"] == priced.column("cost_usd").null_count


def test_validate_reads_stdin(tmp_path: Path) -> None:
    path = sample(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "meter", "validate", "-", "--json", "--now", NOW],
        input=path.read_bytes(),
        capture_output=True,
        check=True,
    )
    assert json.loads(result.stdout)["rejected"] == 2


def test_validate_usage_errors_exit_2(tmp_path: Path) -> None:
    assert main(["validate", str(tmp_path / "missing.ndjson")]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["validate"])
    assert exit_info.value.code == 2


def _validate_peak_rss(path: Path) -> tuple[int, int]:
    code = (
        "import resource, sys; from meter.cli import main; "
        f"rc = main(['validate', {str(path)!r}, '--json', '--now', {NOW!r}]); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr); sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    return json.loads(result.stdout)["events"], int(result.stderr.decode().strip().splitlines()[-1])


def test_validate_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    """Peak RSS on a 4x larger file stays within a few MB of the smaller one's: the file is
    parsed in fixed-size chunks, so memory is bounded whatever the file size (10 GB too)."""
    chunk = b"\n".join(Mix(seed=9, start_ms=NOW_MS - 3_600_000).messages(20_000)) + b"\n"
    small, large = tmp_path / "small.ndjson", tmp_path / "large.ndjson"
    small.write_bytes(chunk * 8)
    large.write_bytes(chunk * 32)
    events_small, peak_small = _validate_peak_rss(small)
    events_large, peak_large = _validate_peak_rss(large)
    assert (events_small, events_large) == (160_000, 640_000)
    growth = peak_large - peak_small
    assert growth < 40e6, f"peak RSS grew {growth / 1e6:.0f} MB for {len(chunk) * 24 / 1e6:.0f} MB more input"


def test_prices_at_a_date_shows_the_entry_in_force(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prices", "--at", "2025-06-01"]) == 0
    before = capsys.readouterr().out
    assert main(["prices", "--at", "2025-07-01"]) == 0
    after = capsys.readouterr().out
    o3_before = next(line for line in before.splitlines() if line.startswith("o3 "))
    o3_after = next(line for line in after.splitlines() if line.startswith("o3 "))
    assert o3_before != o3_after  # the default catalog's o3 price change of 2025-06-10


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from meter import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"meter {__version__}"


@pytest.mark.integration
def test_demo_runs_end_to_end_and_leaves_a_queryable_lake(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    result = subprocess.run(
        [sys.executable, "-m", "meter", "demo", "--seconds", "8", "--lake", str(lake), "--metrics-addr", ""],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "meter query --lake" in result.stdout
    from meter.manifest import totals
    from meter.query import query

    lake_totals = totals(lake)
    assert lake_totals.accepted > 1000 and lake_totals.rejected > 0
    counted = query(lake, "SELECT count(*) AS n, sum(cost_usd) AS cost FROM events").to_pylist()[0]
    assert counted["n"] == lake_totals.accepted
    assert counted["cost"] == Decimal(lake_totals.cost_usd)
    # A second run starts from a fresh lake (the first one was made by the demo).
    again = subprocess.run(
        [sys.executable, "-m", "meter", "demo", "--seconds", "3", "--lake", str(lake), "--metrics-addr", ""],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
