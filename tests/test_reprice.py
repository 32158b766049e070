"""meter.reprice: another catalog's cost per group, exact, and the lake left unchanged."""

from __future__ import annotations

import hashlib
import os
from decimal import Decimal
from importlib import resources
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_rollup import T0, SynthLake, build

from meter.cli import main
from meter.manifest import listed_files, totals
from meter.pricing import Catalog
from meter.reprice import reprice, reprice_sql

DEFAULT_TOML = resources.files("meter").joinpath("catalog", "default.toml").read_text("utf-8")
GPT5 = (
    'id = "gpt-5"\nprovider = "openai"\naliases = ["gpt-5-2025-08-07"]\n'
    'effective_from = "2025-08-07"\ninput = "1.25"'
)
MYSTERY = """
[[model]]
id = "mystery-model"
provider = "acme"
effective_from = "2020-01-01"
input = "0.000001"
output = "7.5"
cache_read = "0"
cache_write = "0"
cache_write_1h = "0"
"""


def catalog(text: str) -> Catalog:
    return Catalog.loads(text, "test catalog")


def other_catalog() -> Catalog:
    """gpt-5 input 1.25 -> 1.1, and a price for the model the default lacks."""
    assert GPT5 in DEFAULT_TOML
    return catalog(DEFAULT_TOML.replace(GPT5, GPT5.replace('input = "1.25"', 'input = "1.1"')) + MYSTERY)


def lake_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def lake(tmp_path: Path) -> SynthLake:
    return build(tmp_path / "lake", scale=4)


def rows(root: Path) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for rel in listed_files(root, "events"):
        out += pq.read_table(root / rel).to_pylist()
    return out


def test_the_same_catalog_changes_nothing(lake: SynthLake) -> None:
    before = lake_digest(lake.root)
    result = reprice(lake.root, catalog(DEFAULT_TOML), by=["team", "model"])
    t = result.total.to_pylist()[0]
    assert t["events"] == totals(lake.root).accepted
    assert format(t["stored_cost_usd"], "f") == totals(lake.root).cost_usd
    assert t["new_cost_usd"] == t["stored_cost_usd"] and t["difference_usd"] == 0
    assert (
        t["changed_events"] == 0 and t["stored_unpriced"] == t["new_unpriced"] == totals(lake.root).unpriced
    )
    assert all(r["difference_usd"] == 0 for r in result.table.to_pylist())
    assert lake_digest(lake.root) == before


def test_another_catalog_exactly(lake: SynthLake) -> None:
    before = lake_digest(lake.root)
    result = reprice(lake.root, other_catalog(), by=["model"])
    by_model = {r["model"]: r for r in result.table.to_pylist()}
    raw = rows(lake.root)
    gpt5 = [r for r in raw if r["model"] == "gpt-5"]
    # Only the input price moved: the difference is input tokens x (1.1 - 1.25) per million.
    expected = sum((Decimal(r["input_tokens"]) * Decimal("-0.15") / 10**6 for r in gpt5), Decimal(0))
    assert by_model["gpt-5"]["difference_usd"] == expected
    assert by_model["gpt-5"]["changed_events"] == sum(1 for r in gpt5 if r["input_tokens"])
    mystery = [r for r in raw if r["model"] == "mystery-model"]
    m = by_model["mystery-model"]
    assert m["stored_unpriced"] == len(mystery) and m["new_unpriced"] == 0 and m["stored_cost_usd"] == 0
    assert m["new_cost_usd"] == sum(
        (Decimal(r["input_tokens"]) * Decimal("0.000001") + Decimal(r["output_tokens"]) * Decimal("7.5"))
        / 10**6
        for r in mystery
    )
    others = [r for name, r in by_model.items() if name not in ("gpt-5", "mystery-model")]
    assert others and all(r["difference_usd"] == 0 for r in others)
    t = result.total.to_pylist()[0]
    assert t["difference_usd"] == sum((r["difference_usd"] for r in by_model.values()), Decimal(0))
    assert lake_digest(lake.root) == before


def test_range_and_keys(lake: SynthLake) -> None:
    lo, hi = T0 + 3600_000, T0 + 2 * 3600_000 + 17
    result = reprice(
        lake.root, other_catalog(), start_ms=lo, end_ms=hi, by=["date", "month", "price_version"]
    )
    expected = [r for r in rows(lake.root) if lo <= r["ts"].timestamp() * 1000 < hi]
    assert result.total.to_pylist()[0]["events"] == len(expected)
    keys = {(str(r["date"]), r["month"]) for r in result.table.to_pylist()}
    assert keys <= {("2026-01-05", "2026-01"), ("2026-01-06", "2026-01")}
    assert result.table.column_names[:3] == ["date", "month", "price_version"]
    everything = reprice(lake.root, other_catalog(), by=[])
    assert everything.table.num_rows == 1 and everything.table.equals(everything.total)
    with pytest.raises(ValueError, match="cannot group by"):
        reprice(lake.root, other_catalog(), by=["colour"])
    with pytest.raises(ValueError, match="repeated"):
        reprice_sql(["team", "team"])
    with pytest.raises(ValueError, match="empty"):
        reprice(lake.root, other_catalog(), start_ms=hi, end_ms=lo)


def test_cli(lake: SynthLake, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "other.toml"
    path.write_text(DEFAULT_TOML.replace(GPT5, GPT5.replace('input = "1.25"', 'input = "1.1"')) + MYSTERY)
    before = lake_digest(lake.root)
    argv = ["reprice", "--lake", os.fspath(lake.root), "--catalog", os.fspath(path)]
    assert main([*argv, "--by", "model", "--format", "table"]) == 0
    out = capsys.readouterr().out
    assert "gpt-5" in out and "difference_usd" in out and "total over" in out
    assert main([*argv, "--by", "", "--format", "csv", "--from", "2026-01-05", "--to", "2026-01-07"]) == 0
    header, line = capsys.readouterr().out.strip().splitlines()
    assert header.startswith("events,stored_cost_usd") and line.startswith(str(totals(lake.root).accepted))
    bad = tmp_path / "bad.toml"
    bad.write_text("source = 1")
    assert main(["reprice", "--lake", os.fspath(lake.root), "--catalog", os.fspath(bad)]) == 2
    assert lake_digest(lake.root) == before
