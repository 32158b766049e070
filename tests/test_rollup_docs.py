"""docs/analytics.md: every example question runs in `meter query`'s sandbox, and the
rollup answers equal the same question asked of the raw events."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_rollup import SynthLake, build

from meter import rollup as R
from meter.query import query

DOC = Path(__file__).resolve().parent.parent / "docs" / "analytics.md"
PARAMS = {"model": "gpt-5", "org": "org-1"}


def questions() -> list[str]:
    text = DOC.read_text()
    section = text[text.index("## Twelve questions in SQL") : text.index("## Rollups: `meter rollup`")]
    return re.findall(r"```sql\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> SynthLake:
    lake = build(tmp_path_factory.mktemp("docs") / "lake", scale=3)
    R.build_rollups(lake.root)
    return lake


def test_twelve_questions_are_documented() -> None:
    assert len(questions()) == 12


@pytest.mark.parametrize("n", range(12))
def test_each_question_runs_in_the_sandbox(lake: SynthLake, n: int) -> None:
    sql = questions()[n]
    params = {k: v for k, v in PARAMS.items() if f"${k}" in sql}
    table = query(lake.root, sql, params or None)
    assert table.num_columns >= 2
    if not re.search(r"current_date|now\(\)", sql):  # the lake's events are not from today
        assert table.num_rows > 0, sql


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_rollup_answers_equal_raw_answers(lake: SynthLake, n: int) -> None:
    """The same question over `events` (``sum(events)`` -> ``count(*)``) gives the same rows."""
    sql = questions()[n]
    raw = re.sub(r"\brollup_day\b", "events", sql).replace("sum(events)", "count(*)")
    raw = raw.replace("sum(unpriced)", "count(*) FILTER (WHERE cost_usd IS NULL)")
    raw = raw.replace("WHERE unpriced > 0", "WHERE cost_usd IS NULL")
    assert query(lake.root, sql).to_pylist() == query(lake.root, raw).to_pylist()
