"""The usage-event v1 parser against the corpus in tests/corpus.py, for both implementations.

The compiled parser (meter._parser) and the pure-Python reference (meter._pyparser) run
the same class; a compiled parser that does not import fails its half unless
METER_PURE_PYTHON=1.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pytest
from corpus import (
    BASE_ROW,
    CASES,
    IMPLEMENTATIONS,
    LATENESS,
    NOW,
    Case,
    Rej,
    Row,
    ev,
    load_parse_batch,
    row,
    s,
)

from meter.reasons import PARSER_REASONS, Reject
from meter.schema import DEFAULT_LATENESS_MS, EVENTS, FIELD_ORDER

ParseBatch = Callable[..., Any]


@pytest.fixture(params=IMPLEMENTATIONS)
def parse(request: pytest.FixtureRequest) -> ParseBatch:
    return load_parse_batch(request.param)


def observed_rows(result: Any) -> list[tuple[int, dict[str, Any]]]:
    """(message index, row) per accepted event, ts as UTC epoch milliseconds."""
    batch = result.batch
    assert isinstance(batch, pa.RecordBatch)
    assert batch.schema.equals(EVENTS), batch.schema
    index = result.message_index
    assert isinstance(index, pa.Array) and index.type == pa.int32()
    assert len(index) == batch.num_rows
    assert index.null_count == 0
    columns = {
        name: (column.cast(pa.int64()) if name == "ts" else column).to_pylist()
        for name, column in zip(batch.schema.names, batch.columns, strict=True)
    }
    return [
        (index[i].as_py(), {name: columns[name][i] for name in FIELD_ORDER}) for i in range(batch.num_rows)
    ]


def check(result: Any, rows: list[Row], rejects: list[Rej]) -> None:
    got_rows = observed_rows(result)
    assert got_rows == [(r.msg, r.values) for r in rows]
    assert isinstance(result.rejects, list)
    got = [(r.message_index, r.line, r.reason) for r in result.rejects]
    assert got == [(r.msg, r.line, r.reason) for r in rejects]
    for reject, want in zip(result.rejects, rejects, strict=True):
        assert isinstance(reject, Reject)
        assert isinstance(reject.detail, str) and reject.detail
        if want.detail is not None:
            assert want.detail in reject.detail, (want, reject)


class TestCorpus:
    """Every case of the corpus, each implementation on its own."""

    @pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
    def test_case(self, parse: ParseBatch, case: Case) -> None:
        result = parse(list(case.payloads), now_ms=case.now_ms, lateness_ms=case.lateness_ms)
        check(result, case.rows, case.rejects)

    def test_whole_corpus_as_one_batch(self, parse: ParseBatch) -> None:
        """Cases on the default clock, all in one call: message indexes run across cases."""
        payloads: list[bytes | None] = []
        rows: list[Row] = []
        rejects: list[Rej] = []
        for case in CASES:
            if (case.now_ms, case.lateness_ms) != (NOW, LATENESS):
                continue
            offset = len(payloads)
            payloads += case.payloads
            rows += [Row(r.values, r.msg + offset) for r in case.rows]
            rejects += [Rej(r.line, r.reason, r.detail, r.msg + offset) for r in case.rejects]
        assert len(payloads) > 1000
        check(parse(payloads, now_ms=NOW), rows, rejects)

    def test_payloads_as_tuple(self, parse: ParseBatch) -> None:
        check(parse((ev(), None), now_ms=NOW), [Row(row())], [Rej(0, "invalid_json", msg=1)])

    def test_lateness_default(self, parse: ParseBatch) -> None:
        edge = NOW - DEFAULT_LATENESS_MS
        result = parse([ev(ts=str(edge)), ev(ts=str(edge - 1))], now_ms=NOW)
        check(result, [Row(row(ts=edge))], [Rej(0, "timestamp_out_of_range", "ts", msg=1)])

    def test_now_defaults_to_the_clock(self, parse: ParseBatch) -> None:
        now = time.time_ns() // 1_000_000
        payloads = [
            ev(ts=str(now)),
            ev(ts=str(now + 3_600_000)),
            ev(ts=str(now - DEFAULT_LATENESS_MS - 3_600_000)),
        ]
        result = parse(payloads)
        assert observed_rows(result) == [(0, row(ts=now))]
        assert [(r.message_index, r.reason) for r in result.rejects] == [
            (1, "timestamp_out_of_range"),
            (2, "timestamp_out_of_range"),
        ]

    def test_empty_batch_keeps_the_schema(self, parse: ParseBatch) -> None:
        for payloads in ([], [b"[]"], [None]):
            result = parse(payloads, now_ms=NOW)
            assert result.batch.num_rows == 0
            assert result.batch.schema.equals(EVENTS)
            assert result.message_index.type == pa.int32()

    def test_rows_do_not_share_state(self, parse: ParseBatch) -> None:
        """An optional field set on one event never leaks into the next."""
        full = ev(team=s("t"), cache_read_tokens=b"5", reasoning_tokens=b"3")
        result = parse([full + b"\n" + ev(), ev()], now_ms=NOW)
        with_team = row(team="t", cache_read_tokens=5, reasoning_tokens=3)
        assert observed_rows(result) == [(0, with_team), (0, BASE_ROW), (1, BASE_ROW)]


def test_corpus_covers_every_parser_reason() -> None:
    reasons = {r.reason for c in CASES for r in c.rejects}
    assert reasons == set(PARSER_REASONS)


def test_corpus_names_are_unique() -> None:
    assert len({c.name for c in CASES}) == len(CASES)


def test_compiled_details_match_reference() -> None:
    """Both parsers format rejects from the same templates, so details agree too."""
    reference = load_parse_batch("python")
    compiled = load_parse_batch("compiled")
    groups: dict[tuple[int, int], list[bytes | None]] = {}
    for case in CASES:
        groups.setdefault((case.now_ms, case.lateness_ms), []).extend(case.payloads)
    for (now_ms, lateness_ms), payloads in groups.items():
        want = reference(payloads, now_ms=now_ms, lateness_ms=lateness_ms)
        got = compiled(payloads, now_ms=now_ms, lateness_ms=lateness_ms)
        assert got.batch.equals(want.batch)
        assert got.message_index.equals(want.message_index)
        assert list(got.rejects) == list(want.rejects)
