"""Scrape time of /metrics with every usage family at its series budget, and what the usage
families cost a flush.

Fills a private `meter.metrics.Metrics` (with the process, platform and GC collectors a
daemon's default registry has) from flushes of hostile traffic: `--teams` distinct teams
(100,000 by default, far past the budget) and half as many distinct unpriced models, so every
usage family sits at its budget with the rest folded into `__other__`. Then it serves the
endpoint on loopback and times whole HTTP scrapes, plain and gzip, next to the baseline:
prometheus-client's own `generate_latest` over the same families (`Usage.collect`).
Finally it times `Usage.add` on a flush of the reference mix (what the KPI feeds cost the
pipeline's main thread per flush). See benchmarks/README.md.

    .venv/bin/python benchmarks/bench_scrape.py [--teams N] [--budget N] [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
import urllib.request
from collections.abc import Callable, Sequence
from decimal import Decimal
from importlib import metadata
from typing import Any

import pyarrow as pa
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)

from meter.metrics import BUCKETS, Metrics, Usage, serve
from meter.schema import LAKE_EVENTS, TOKEN_COLUMNS

START_MS = 1_764_380_000_000


def hostile_flush(first: int, n: int, unpriced_every: int = 2) -> pa.Table:
    """n events, each of its own team (`team-<i>`, with quotes and backslashes), and every
    `unpriced_every`-th of them of its own unknown model (null cost)."""
    teams = [f'team "{i}" \\ ünïcödé' for i in range(first, first + n)]
    models = [
        f"model-{i}" if i % unpriced_every == 0 else "claude-sonnet-4-5" for i in range(first, first + n)
    ]
    costs = [None if i % unpriced_every == 0 else Decimal("0.000123456789") for i in range(first, first + n)]
    columns: dict[str, Any] = {
        "event_id": [f"e{i}" for i in range(first, first + n)],
        "ts": [START_MS] * n,
        "user": ["u"] * n,
        "team": teams,
        "org": ["acme"] * n,
        "model": models,
        "provider": ["anthropic"] * n,
        "client": [None] * n,
        "request_id": [None] * n,
        "prompt_hash": [None] * n,
        **{c: [1] * n for c in TOKEN_COLUMNS},
        "cost_usd": costs,
        "price_version": [None] * n,
        "kafka_topic": ["usage"] * n,
        "kafka_partition": [0] * n,
        "kafka_offset": list(range(first, first + n)),
    }
    return pa.table({f.name: pa.array(columns[f.name], f.type) for f in LAKE_EVENTS}, schema=LAKE_EVENTS)


def mix_flush(events: int) -> pa.Table:
    """A flush of the reference mix, parsed and priced as the pipeline does."""
    from meter.mix import Mix
    from meter.parser import parse_batch
    from meter.pricing import load_catalog

    payloads = list(Mix(1, start_ms=START_MS).messages(events, 5))
    result = parse_batch(payloads, now_ms=START_MS + 3_600_000)
    priced = load_catalog().price(result.batch)
    n = priced.num_rows
    extra = [pa.array(["usage"] * n), pa.array([0] * n, pa.int32()), pa.array(range(n), pa.int64())]
    return pa.Table.from_batches([pa.RecordBatch.from_arrays([*priced.columns, *extra], schema=LAKE_EVENTS)])


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(runs):
        gc.collect()
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def scrape(url: str, gzipped: bool) -> Callable[[], bytes]:
    headers = {"Accept-Encoding": "gzip"} if gzipped else {}

    def get() -> bytes:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
            return bytes(response.read())

    return get


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teams", type=int, default=100_000, help="distinct teams (and unknown models / 2)")
    parser.add_argument("--budget", type=int, default=5000, help="series budget per usage family")
    parser.add_argument("--flush-events", type=int, default=20_000, help="events per hostile flush")
    parser.add_argument("--mix-events", type=int, default=200_000, help="events of the reference-mix flush")
    parser.add_argument("--runs", type=int, default=20, help="timed scrapes (after one warm-up)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    usage = Usage(budget=args.budget)
    metrics = Metrics(registry, usage=usage)
    fill_start = time.perf_counter()
    for first in range(0, args.teams, args.flush_events):
        usage.add(hostile_flush(first, min(args.flush_events, args.teams - first)))
    fill_ms = (time.perf_counter() - fill_start) * 1000
    text = metrics.exposition()
    series = {
        name: sum(1 for line in text.splitlines() if line.startswith(name.encode() + b"{"))
        for name in (
            "meter_usage_events_total",
            "meter_usage_tokens_total",
            "meter_usage_cost_usd_total",
            "meter_usage_unpriced_events_total",
        )
    }
    over = {name: n for name, n in series.items() if n > args.budget}
    if over:
        raise SystemExit(f"families over the budget of {args.budget}: {over}")

    server = serve("127.0.0.1:0", lambda: True, metrics)
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    baseline_registry = CollectorRegistry()
    baseline_registry.register(usage)
    rows: list[dict[str, Any]] = []
    try:
        for name, fn in (
            ("HTTP GET /metrics", scrape(url, False)),
            ("HTTP GET /metrics, gzip", scrape(url, True)),
            ("Metrics.exposition()", metrics.exposition),
            ("Usage.render()", usage.render),
            ("baseline: generate_latest(Usage.collect)", lambda: generate_latest(baseline_registry)),
        ):
            runs = timed(fn, args.runs)
            rows.append(
                {
                    "what": name,
                    "median_ms": statistics.median(runs),
                    "max_ms": max(runs),
                    "bytes": len(fn()),  # type: ignore[arg-type]
                }
            )
    finally:
        server.shutdown()

    flush = mix_flush(args.mix_events)
    first_runs = timed(lambda: Usage(budget=args.budget).add(flush), max(3, args.runs // 4))
    warm = Usage(budget=args.budget)
    warm.add(flush)
    add_runs = timed(lambda: warm.add(flush), max(3, args.runs // 4))
    meta = {
        "python": platform.python_version(),
        "prometheus_client": metadata.version("prometheus-client"),
        "pyarrow": pa.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "teams": args.teams,
        "budget": args.budget,
        "series": series,
        "samples": text.count(b"\n") - text.count(b"\n#"),
        "fill_ms": round(fill_ms, 1),
        "mix_flush_events": flush.num_rows,
        "usage_add_ms_median": round(statistics.median(add_runs), 2),
        "usage_add_first_ms_median": round(statistics.median(first_runs), 2),
    }
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return 0
    print(
        f"python {meta['python']}, prometheus_client {meta['prometheus_client']}, pyarrow {meta['pyarrow']}, "
        f"{meta['cpus']} CPUs; budget {args.budget} series/family, {args.teams:,} teams sent, "
        f"{len(BUCKETS)} token buckets"
    )
    print("series per family: " + ", ".join(f"{k} {v}" for k, v in series.items()))
    print(f"samples per scrape: {meta['samples']:,}; filling took {fill_ms:,.0f} ms")
    base = next(r["median_ms"] for r in rows if r["what"].startswith("baseline"))
    print(f"\n{'what':<44}{'median ms':>11}{'max ms':>10}{'bytes':>11}{'vs baseline':>13}")
    for r in rows:
        ratio = base / r["median_ms"] if r["median_ms"] else float("inf")
        print(f"{r['what']:<44}{r['median_ms']:>11.2f}{r['max_ms']:>10.2f}{r['bytes']:>11,}{ratio:>12.1f}x")
    print(
        f"\nUsage.add on a reference-mix flush of {flush.num_rows:,} events: "
        f"{meta['usage_add_ms_median']} ms (median; {meta['usage_add_first_ms_median']} ms for the first, "
        "which admits its label sets)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
