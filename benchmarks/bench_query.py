"""Rollups and example queries over a large lake: build rate, incremental re-rollup, latency.

Builds a lake of ``--events`` events (default 50 million) straight to Parquet through
meter's own flush (`meter.stages.write_flush`: intent, files per event-time hour,
manifest entry), from a few hundred thousand `meter.mix` events tiled and perturbed with
Arrow, priced by the packaged catalog at their new event times. Then measures:

1. a full rollup build (`meter.rollup.build_rollups`): source rows/s;
2. an incremental re-rollup after 1% late events that land within the last two days
   (a gateway's backlog), then after another 1% spread over the whole history (the
   worst case: every hour partition is touched);
3. the example questions of docs/analytics.md, each asked of the raw ``events`` view
   and of a rollup view in `meter query`'s sandbox (`meter.query.open_lake`): median
   latency of ``--runs`` runs, the two answers checked equal.

    .venv/bin/python benchmarks/bench_query.py                       # 50M events
    .venv/bin/python benchmarks/bench_query.py --events 2000000 --runs 3   # a quick check

See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from meter.audit import audit
from meter.manifest import totals
from meter.mix import Mix
from meter.pricing import load_catalog
from meter.query import Limits, open_lake
from meter.rollup import build_rollups
from meter.schema import DLQ, EVENTS, LAKE_EVENTS, TOKEN_COLUMNS, TS_TYPE
from meter.stages import Flush, write_flush

TOPIC = "usage.v1"
DAY_MS = 86_400_000
#: The lake's event time ends here (exclusive): fixed so every run builds the same lake.
END_MS = int(dt.datetime(2026, 11, 1, tzinfo=dt.UTC).timestamp()) * 1000
CATALOG = load_catalog()
_EMPTY_DLQ = DLQ.empty_table()


# --- the lake ------------------------------------------------------------------------------


def base_sample(n: int, seed: int) -> pa.Table:
    """``n`` `meter.mix` events as EVENTS columns (their timestamps are replaced later)."""
    mix = Mix(seed, start_ms=END_MS - 3_600_000, span_ms=3_600_000)
    cols: dict[str, list[Any]] = {name: [] for name in EVENTS.names}
    for e in mix.events(n):
        for name in EVENTS.names:
            cols[name].append(e.get(name, 0 if name in TOKEN_COLUMNS else None))
    cols["ts"] = [0] * n
    return pa.table(cols, schema=EVENTS)


@dataclass
class Tiler:
    """Events drawn from the base sample with new ids, times and perturbed token counts."""

    base: pa.Table
    seed: int

    def table(self, partition: int, start: int, lo_ms: int, hi_ms: int, n: int) -> pa.Table:
        seed = hash((self.seed, partition, start)) & 0x7FFF_FFFF

        def uniform(k: int, scale: int) -> pa.Array:  # n draws of 0..scale-1
            return pc.floor(pc.multiply(pc.random(n, initializer=seed + k), scale)).cast(pa.int64())

        take = self.base.take(uniform(0, self.base.num_rows))
        ts = pc.add(uniform(1, hi_ms - lo_ms), lo_ms)
        ts = ts.take(pc.sort_indices(ts))
        offsets = pa.array(range(start, start + n), pa.int64())
        ids = pc.binary_join_element_wise(f"p{partition}-", offsets.cast(pa.string()), "")
        cols = {name: take.column(name) for name in EVENTS.names}
        cols["event_id"] = ids
        cols["ts"] = ts.cast(TS_TYPE)
        cols["input_tokens"] = pc.add(take.column("input_tokens"), uniform(2, 64))
        arrays = [_array(cols[name]) for name in EVENTS.names]
        priced = CATALOG.price(pa.RecordBatch.from_arrays(arrays, schema=EVENTS))
        return pa.Table.from_batches(
            [
                pa.RecordBatch.from_arrays(
                    [
                        *priced.columns,
                        pa.array([TOPIC] * n, pa.string()),
                        pa.array([partition] * n, pa.int32()),
                        offsets,
                    ],
                    schema=LAKE_EVENTS,
                )
            ]
        )


def _array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


class Writer:
    """Appends flushes to each Kafka partition's chain, one thread per partition."""

    def __init__(self, root: Path, partitions: int, tiler: Tiler) -> None:
        self.root = root
        self.tiler = tiler
        self.positions: dict[int, int | None] = dict.fromkeys(range(partitions))

    def flush(self, partition: int, lo_ms: int, hi_ms: int, n: int) -> int:
        after = self.positions[partition]
        start = 0 if after is None else after
        events = self.tiler.table(partition, start, lo_ms, hi_ms, n)
        entry = write_flush(
            os.fspath(self.root),
            Flush(TOPIC, partition, start, after, start + n, 0, n, events, _EMPTY_DLQ),
            "bench/1",
        )
        self.positions[partition] = entry.end
        return sum(f.bytes for f in entry.files)

    def run(self, plan: Plan, threads: int) -> int:
        def one(partition: int) -> int:
            return sum(self.flush(partition, lo, hi, n) for lo, hi, n in plan[partition])

        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(one, sorted(plan)))


Plan = dict[int, list[tuple[int, int, int]]]  # partition -> flushes of (lo_ms, hi_ms, events)


def in_order_plan(events: int, days: float, partitions: int, flush_events: int) -> Plan:
    """Each partition's flushes in time order over ``days`` before END_MS."""
    per = events // partitions
    start = END_MS - int(days * DAY_MS)
    plan: Plan = {}
    for p in range(partitions):
        n_p = per + (1 if p < events % partitions else 0)
        k = max(1, -(-n_p // flush_events))
        width = (END_MS - start) / k
        plan[p] = [
            (start + int(i * width), start + int((i + 1) * width), n_p // k + (1 if i < n_p % k else 0))
            for i in range(k)
        ]
    return plan


def late_plan(events: int, lo_ms: int, hi_ms: int, partitions: int, flush_events: int) -> Plan:
    """Late flushes: ``events`` with event times spread over ``[lo_ms, hi_ms)``."""
    plan: Plan = {}
    per = max(1, events // partitions)
    for p in range(partitions):
        k = max(1, -(-per // flush_events))
        plan[p] = [(lo_ms, hi_ms, per // k) for _ in range(k) if per // k]
    return plan


# --- the questions -------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    name: str
    raw: str  # over events
    rollup: str  # over a rollup view
    view: str


def _q(name: str, sql: str, view: str) -> Question:
    """One question asked of ``events`` and of ``view``: in ``sql``, ``{rel}`` is the
    relation and ``{n}`` the event count (``count(*)`` of events, ``sum(events)`` of a rollup)."""
    return Question(
        name,
        sql.format(rel="events", n="count(*)"),
        sql.format(rel=view, n="sum(events)"),
        view,
    )


QUESTIONS: tuple[Question, ...] = (
    _q(
        "spend by team, this month",
        "SELECT team, sum(cost_usd) AS cost_usd FROM {rel} "
        "WHERE ts >= $month_start AND ts < $now GROUP BY team ORDER BY cost_usd DESC NULLS LAST, team",
        "rollup_day",
    ),
    _q(
        "top 10 users of a model, last 7 days",
        'SELECT "user", sum(cost_usd) AS cost_usd, {n} AS events FROM {rel} '
        "WHERE model = 'claude-sonnet-4-5' AND ts >= $week_start AND ts < $now "
        'GROUP BY "user" ORDER BY cost_usd DESC, "user" LIMIT 10',
        "rollup_day",
    ),
    _q(
        "cache-read share by team",
        "SELECT team, sum(cache_read_tokens) / sum(input_tokens + cache_read_tokens + cache_write_tokens "
        "+ cache_write_1h_tokens) AS cache_read_share FROM {rel} GROUP BY team ORDER BY team",
        "rollup_day",
    ),
    _q(
        "cost per model per day",
        "SELECT ts::DATE AS day, model, sum(cost_usd) AS cost_usd, {n} AS events FROM {rel} "
        "GROUP BY ALL ORDER BY day, model",
        "rollup_day",
    ),
    _q(
        "distinct users per team and day",
        'SELECT ts::DATE AS day, team, count(DISTINCT "user") AS users FROM {rel} '
        "GROUP BY ALL ORDER BY day, team",
        "rollup_day",
    ),
    _q(
        "spend per org per hour, last 24 hours",
        "SELECT date_trunc('hour', ts) AS hour, org, sum(cost_usd) AS cost_usd FROM {rel} "
        "WHERE ts >= $day_start AND ts < $now GROUP BY ALL ORDER BY hour, org",
        "rollup_hour",
    ),
    _q(
        "busiest minutes, last 24 hours",
        "SELECT date_trunc('minute', ts) AS minute, {n} AS events, sum(output_tokens) AS output_tokens "
        "FROM {rel} WHERE ts >= $day_start AND ts < $now GROUP BY ALL ORDER BY events DESC, minute LIMIT 10",
        "rollup_minute",
    ),
    _q(
        "totals",
        "SELECT {n} AS events, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, "
        "sum(cost_usd) AS cost_usd FROM {rel}",
        "rollup_day",
    ),
)


def params(end_ms: int) -> dict[str, object]:
    now = dt.datetime.fromtimestamp(end_ms / 1000, dt.UTC)
    month = (now - dt.timedelta(milliseconds=1)).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return {
        "now": now,
        "month_start": month,
        "week_start": now - dt.timedelta(days=7),
        "day_start": now - dt.timedelta(days=1),
    }


def _timed(fn: Callable[[], Any], runs: int) -> tuple[float, Any]:
    fn()  # warm: footers and the page cache
    times, result = [], None
    for _ in range(runs):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def ask(lake: Path, runs: int, threads: int | None, memory: int) -> list[dict[str, Any]]:
    """Each question on raw events and on its rollup, in `meter query`'s sandbox."""
    t = time.perf_counter()
    con = open_lake(lake, limits=Limits(timeout_s=None, memory_limit=memory, threads=threads))
    opened = time.perf_counter() - t
    p = params(END_MS)
    rows = []
    try:
        for q in QUESTIONS:
            needed = {k: v for k, v in p.items() if f"${k}" in q.raw}
            raw_s, raw = _timed(functools.partial(_fetch, con, q.raw, needed), runs)
            roll_s, rolled = _timed(functools.partial(_fetch, con, q.rollup, needed), runs)
            if _normal(raw) != _normal(rolled):
                raise SystemExit(f"{q.name}: raw and rollup answers differ:\n{raw[:5]}\n{rolled[:5]}")
            rows.append(
                {"question": q.name, "view": q.view, "raw_ms": raw_s * 1e3, "rollup_ms": roll_s * 1e3,
                 "speedup": raw_s / roll_s if roll_s else float("inf"), "rows": len(raw)}
            )  # fmt: skip
    finally:
        con.close()
    rows.append({"question": "(open_lake: list files, create views)", "raw_ms": opened * 1e3})
    return rows


def _fetch(con: duckdb.DuckDBPyConnection, sql: str, kw: dict[str, object]) -> list[tuple[Any, ...]]:
    return con.sql(sql, params=kw or None).fetchall()


def _normal(rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Floats rounded to 12 significant digits (a ratio of equal sums summed in another
    order may differ in the last bit); everything else exact."""
    return [tuple(float(f"{v:.12g}") if isinstance(v, float) else v for v in r) for r in rows]


# --- main -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=50_000_000, help="events in the lake (default 50M)")
    ap.add_argument("--days", type=float, default=30.0, help="event-time span in days (default 30)")
    ap.add_argument("--partitions", type=int, default=8, help="Kafka partitions (default 8)")
    ap.add_argument("--flush-events", type=int, default=500_000, help="events per flush (default 500k)")
    ap.add_argument("--base", type=int, default=200_000, help="meter.mix events tiled (default 200k)")
    ap.add_argument("--late", type=float, default=0.01, help="share of late events per round (default 0.01)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per query; median reported")
    ap.add_argument("--threads", type=int, help="DuckDB threads (default: all cores)")
    ap.add_argument("--memory-gb", type=float, default=8.0, help="query memory limit in GB (default 8)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--lake", help="lake directory (default: a temporary one, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the lake")
    ap.add_argument("--audit", action="store_true", help="also time `meter audit` at the end")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args(argv)

    root = Path(args.lake) if args.lake else Path(tempfile.mkdtemp(prefix="meter-bench-"))
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root} is not empty")
    root.mkdir(parents=True, exist_ok=True)
    threads = args.threads or os.cpu_count() or 1
    out: dict[str, Any] = {
        "meta": {
            "events": args.events, "days": args.days, "partitions": args.partitions,
            "flush_events": args.flush_events, "cpus": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), "pyarrow": pa.__version__, "duckdb": duckdb.__version__,
            "machine": platform.machine(),
        }
    }  # fmt: skip
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    try:
        t = time.perf_counter()
        tiler = Tiler(base_sample(args.base, args.seed), args.seed)
        base_s = time.perf_counter() - t
        writer = Writer(root, args.partitions, tiler)
        t = time.perf_counter()
        size = writer.run(in_order_plan(args.events, args.days, args.partitions, args.flush_events), threads)
        gen_s = time.perf_counter() - t
        tot = totals(root)
        out["lake"] = {"events": tot.accepted, "files": tot.files, "bytes": size, "base_s": base_s,
                       "write_s": gen_s, "events_per_s": tot.accepted / gen_s}  # fmt: skip
        log(f"lake: {tot.accepted:,} events, {tot.files} files, {size / 1e9:.2f} GB in {gen_s:.1f} s")

        rounds = []
        report = build_rollups(root, grace_s=0, threads=args.threads)
        rounds.append(("full build", report))
        log(f"full rollup: {report.seconds:.1f} s")
        late = int(args.events * args.late)
        pct = f"{args.late:.0%}"
        history = END_MS - int(args.days * DAY_MS)
        for name, lo in (
            (f"{pct} late, last 2 days", END_MS - 2 * DAY_MS),
            (f"{pct} late, all history", history),
        ):
            writer.run(late_plan(late, lo, END_MS, args.partitions, args.flush_events), threads)
            report = build_rollups(root, grace_s=0, threads=args.threads)
            rounds.append((name, report))
            log(f"{name}: {report.seconds:.1f} s")
        out["rollup"] = [
            {"run": name, "seconds": r.seconds, "source_rows": r.source_rows,
             "rows_per_s": r.source_rows / r.seconds if r.seconds else 0.0,
             "hours_rebuilt": r.hours_rebuilt, "hours_merged": r.hours_merged,
             "hours_unchanged": r.hours_unchanged, "days_rebuilt": r.days_rebuilt,
             "rows_written": r.rows_written}
            for name, r in rounds
        ]  # fmt: skip
        out["queries"] = ask(root, args.runs, args.threads, int(args.memory_gb * (1 << 30)))
        if args.audit:
            t = time.perf_counter()
            result = audit(root)
            out["audit"] = {"seconds": time.perf_counter() - t, "ok": result.ok, "errors": len(result.errors)}
    finally:
        if not args.keep and not args.lake:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        print(render(out))
    return 0


def render(out: dict[str, Any]) -> str:
    m, lake = out["meta"], out["lake"]
    lines = [
        "# " + ", ".join(f"{k}={v}" for k, v in m.items()),
        f"lake: {lake['events']:,} events in {lake['files']} files, {lake['bytes'] / 1e9:.2f} GB, "
        f"written in {lake['write_s']:.1f} s ({lake['events_per_s']:,.0f} events/s; base sample "
        f"{lake['base_s']:.1f} s)",
        "",
        f"{'rollup run':28} {'seconds':>8} {'source rows':>12} {'rows/s':>12} {'hours':>16} {'days':>5}",
    ]
    for r in out["rollup"]:
        seen = r["hours_rebuilt"] + r["hours_merged"] + r["hours_unchanged"]
        hours = f"{r['hours_rebuilt']}+{r['hours_merged']}m/{seen}"
        lines.append(
            f"{r['run']:28} {r['seconds']:8.1f} {r['source_rows']:12,} {r['rows_per_s']:12,.0f} {hours:>16} "
            f"{r['days_rebuilt']:5}"
        )
    lines += ["", f"{'question':40} {'view':14} {'raw ms':>9} {'rollup ms':>9} {'speedup':>8} {'rows':>6}"]
    for q in out["queries"]:
        if "view" not in q:
            lines.append(f"{q['question']:40} {'':14} {q['raw_ms']:9.1f}")
            continue
        lines.append(
            f"{q['question']:40} {q['view']:14} {q['raw_ms']:9.1f} {q['rollup_ms']:9.1f} "
            f"{q['speedup']:7.1f}x {q['rows']:6}"
        )
    if "audit" in out:
        lines.append(f"\naudit: {out['audit']['seconds']:.1f} s, ok={out['audit']['ok']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
