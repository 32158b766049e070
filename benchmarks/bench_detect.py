"""Usage-gaming detectors: quality on the evaluation harness, and throughput.

Quality: `meter.scenario` writes a population of honest users (with the confounders that
look like gaming to a naive rule) and planted gamers into a lake; `meter.detect` runs over
every day and the trend over the window; the ground truth scores the result:

* recall per archetype (never pooled); the slow inflator's is the trend's, with its window;
* the share of honest users flagged, overall and per confounder group (daily detectors), and
  the trend's honest share apart;
* precision at k of the ranking of users.

The defaults were tuned on seeds 1, 2 and 3; the held-out seed (the default here) was run
once after they were frozen. Pass --seed to run others (several: --seed 1,2,3).

Throughput: one large day (--throughput-users users, about 110 events each) detected end to
end (read the day's Parquet files, every daily detector, scores), median of --runs runs,
reported as events per second of wall time and per CPU-second of the process.

    .venv/bin/python benchmarks/bench_detect.py                    # held-out seed + throughput
    .venv/bin/python benchmarks/bench_detect.py --seed 1,2,3 --no-throughput
    .venv/bin/python benchmarks/bench_detect.py --json > result.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from meter import detect, scenario

HELD_OUT_SEED = 20261129
TUNING_SEEDS = (1, 2, 3)


def evaluate_seed(work: Path, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    sc = scenario.Scenario(
        seed=seed,
        honest_users=args.honest,
        gamers_per_archetype=args.gamers,
        teams=args.teams,
        days=args.days,
        deadline_day=args.days - 3,
    )
    lake = work / f"eval-{seed}-{args.honest}-{args.gamers}-{args.days}"
    truth_path = lake / "truth.json"
    started = time.perf_counter()
    if truth_path.exists():
        truth = scenario.Truth.from_json(truth_path.read_bytes())
    else:
        truth = scenario.write_lake(lake, sc)
        truth_path.write_bytes(truth.to_json())
    generated = time.perf_counter() - started
    cfg = detect.load_config(text=truth.deadline_policy())
    result = detect.detect(lake, sc.start, sc.end, cfg, trend=True, threads=args.threads)
    flags = detect.counting_flags(pa.concat_tables([result.hits, result.window_hits]), cfg.min_days)
    ranked = detect.rank_users(flags)
    ev = scenario.evaluate(truth, flags, ranked, ks=(10, 25, 50, 100))
    w0, w1 = detect.trend_window(cfg, sc.end)
    ev.update(
        seed=seed,
        held_out=seed == HELD_OUT_SEED,
        events=truth.events,
        users=len(truth.users),
        days=sc.days,
        trend_window=f"{w0}..{w1} ({cfg.trend_days} days)",
        generate_s=round(generated, 1),
        detect_s=round(result.seconds, 1),
    )
    return ev


def throughput(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    sc = scenario.Scenario(
        seed=5,
        honest_users=args.throughput_users,
        gamers_per_archetype=args.throughput_users // 200,
        teams=max(10, round(args.throughput_users * 0.015)),
        days=3,
        deadline_day=2,
        burst_days=1,
    )
    lake = work / f"throughput-{args.throughput_users}"
    if not (lake / "truth.json").exists():
        truth = scenario.write_lake(lake, sc)
        (lake / "truth.json").write_bytes(truth.to_json())
    day = sc.start + dt.timedelta(days=1)
    cfg = detect.Config()  # no deadline near: the burst baseline is not read
    detect.detect_day(lake, day, cfg, threads=args.threads)  # warm the page cache
    runs = []
    for _ in range(args.runs):
        wall, cpu = time.perf_counter(), time.process_time()
        _, _, events = detect.detect_day(lake, day, cfg, threads=args.threads)
        runs.append((time.perf_counter() - wall, time.process_time() - cpu, events))
    wall_s = statistics.median(r[0] for r in runs)
    cpu_s = statistics.median(r[1] for r in runs)
    events = runs[0][2]
    return {
        "day": day.isoformat(),
        "events": events,
        "wall_s": round(wall_s, 3),
        "cpu_s": round(cpu_s, 3),
        "events_per_s": round(events / wall_s),
        "events_per_cpu_s": round(events / cpu_s),
        "threads": args.threads or os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "runs": args.runs,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_eval(ev: dict[str, Any]) -> None:
    label = "held-out" if ev["held_out"] else "not held out"
    size = f"{ev['users']:,} users, {ev['events']:,} events over {ev['days']} days"
    print(f"\n## seed {ev['seed']} ({label}): {size}")
    print(f"generated in {ev['generate_s']}s (or reused), detected in {ev['detect_s']}s\n")
    print("| archetype | planted | flagged | recall | by |")
    print("|---|---:|---:|---:|---|")
    for name, r in ev["recall"].items():
        by = r["by"] + (f", window {ev['trend_window']}" if name == "slow_inflator" else "")
        print(f"| {name} | {r['users']} | {r['flagged']} | {_pct(r['recall'])} | {by} |")
    print("\n| honest group | users | flagged (daily) | share | trend flagged | trend share |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, g in ev["honest"].items():
        print(
            f"| {name} | {g['users']} | {g['flagged']} | {_pct(g['share'])} | "
            f"{g['trend_flagged']} | {_pct(g['trend_share'])} |"
        )
    print("\n| k | gamers in top k | precision@k |")
    print("|---:|---:|---:|")
    for p in ev["precision"].values():
        print(f"| {p['k']} | {p['gamers']}/{p['ranked']} | {_pct(p['precision'])} |")
    print("\n| detector | counting flags on honest users | on gamers |")
    print("|---|---:|---:|")
    for name, d in sorted(ev["flags_by_detector"].items()):
        print(f"| {name} | {d['honest']} | {d['gamers']} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--seed", default=str(HELD_OUT_SEED), help=f"seed(s), comma-separated (default {HELD_OUT_SEED})"
    )
    p.add_argument("--honest", type=int, default=2000)
    p.add_argument("--gamers", type=int, default=20, help="gamers per archetype")
    p.add_argument("--teams", type=int, default=60)
    p.add_argument("--days", type=int, default=28)
    p.add_argument("--threads", type=int, help="DuckDB threads (default: all cores)")
    p.add_argument("--throughput-users", type=int, default=20_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-throughput", action="store_true")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--work", metavar="DIR", help="keep lakes here and reuse them (default: a temp dir)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    seeds = [int(s) for s in args.seed.split(",") if s]
    with tempfile.TemporaryDirectory(prefix="meter-bench-detect-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        meta = {
            "python": platform.python_version(),
            "duckdb": duckdb.__version__,
            "pyarrow": pa.__version__,
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "held_out_seed": HELD_OUT_SEED,
            "tuning_seeds": list(TUNING_SEEDS),
        }
        evals = [] if args.no_eval else [evaluate_seed(work, s, args) for s in seeds]
        tp = None if args.no_throughput else throughput(work, args)
    if args.json:
        json.dump({"meta": meta, "evaluations": evals, "throughput": tp}, sys.stdout, indent=1, default=str)
        print()
        return 0
    print(f"# bench_detect: {json.dumps(meta)}")
    for ev in evals:
        print_eval(ev)
    if tp:
        print(
            f"\n## throughput: {tp['events']:,} events of {tp['day']} in {tp['wall_s']}s wall "
            f"({tp['events_per_s']:,}/s), {tp['cpu_s']}s CPU ({tp['events_per_cpu_s']:,} per CPU-second); "
            f"{tp['threads']} threads, median of {tp['runs']}, load average {tp['load_average']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
