"""`meter reprice`: what the stored usage would cost under another catalog.

Every listed event row in the time range is priced again with the other catalog, at
its own event time exactly as the daemon prices (`meter.pricing.Catalog.price`), and
summed per group beside its stored cost. Nothing in the lake changes.

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

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from meter.lake import KIND_EVENTS, LakePath, abs_path, parse_rel_path
from meter.manifest import listed_records
from meter.pricing import Catalog
from meter.schema import COST_TYPE, EVENTS, TS_TYPE

__all__ = [
    "GROUP_KEYS",
    "RepriceResult",
    "files_in_range",
    "reprice",
    "reprice_sql",
]

GROUP_KEYS: Final = (
    "org", "team", "user", "model", "provider", "client",
    "date", "month", "price_version", "new_price_version",
)  # fmt: skip
_BATCH_ROWS: Final = 256 * 1024
_HOUR_MS: Final = 3_600_000
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


def files_in_range(lake: LakePath, start_ms: int | None, end_ms: int | None) -> list[str]:
    """Listed event files whose hour partition overlaps ``[start_ms, end_ms)``."""
    import datetime as dt

    out = []
    for f in listed_records(lake, KIND_EVENTS):
        p = parse_rel_path(f.path)
        assert p.hour is not None
        day = dt.datetime.fromisoformat(p.date).replace(tzinfo=dt.UTC)
        lo = int(day.timestamp()) * 1000 + p.hour * _HOUR_MS
        if (start_ms is None or lo + _HOUR_MS > start_ms) and (end_ms is None or lo < end_ms):
            out.append(f.path)
    return out


def _priced(
    paths: Sequence[Path], catalog: Catalog, start_ms: int | None, end_ms: int | None
) -> Iterator[pa.RecordBatch]:
    columns = [*EVENTS.names, "cost_usd", "price_version"]
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS, columns=columns):
            if start_ms is not None or end_ms is not None:
                ts = batch.column("ts").cast(pa.int64())
                keep = pc.and_(
                    pc.greater_equal(ts, start_ms if start_ms is not None else ts),
                    pc.less(ts, end_ms) if end_ms is not None else pc.equal(ts, ts),
                )
                batch = batch.filter(keep)
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
    if start_ms is not None and end_ms is not None and start_ms >= end_ms:
        raise ValueError("the range is empty: --from must be before --to")
    _check_by(by)
    root = Path(os.path.abspath(lake))
    if not root.is_dir():
        raise FileNotFoundError(f"no lake directory at {os.fspath(lake)}")
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
