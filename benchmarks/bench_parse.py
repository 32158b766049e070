"""Parse throughput on one core: meter's parser against the usual ways to get JSON into Arrow.

Every implementation turns the same events into a batch of meter.schema.EVENTS columns, in the
same process and run, pinned to one CPU with every library told to use one thread. Only meter's
parsers validate the contract; the baselines check types at most, so they are the speed a
validating parser has to get near, not a like-for-like contest. See benchmarks/README.md.

    .venv/bin/python benchmarks/bench_parse.py [--events N] [--runs N] [--mix KIND,...] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import duckdb
import msgspec
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as paj

try:
    from meter.parser import COMPILED, parse_batch, py_parse_batch
except ImportError as error:
    raise SystemExit(str(error)) from None
from meter.mix import KINDS, Mix
from meter.schema import EVENTS, STRING_FIELDS, TOKEN_COLUMNS, TS_TYPE

START_MS = 1_764_380_000_000  # 2025-11-29T01:33:20Z: fixed so every run sees the same bytes
SPAN_MS = 3_600_000
NOW_MS = START_MS + SPAN_MS
ORJSON = "orjson + pa.array"
IMPLS = ("meter", "meter-pure", "orjson", "msgspec", "pyarrow.json", "duckdb")

_NULLABLE = pa.schema([field.with_nullable(True) for field in EVENTS])
_STRINGS = tuple(STRING_FIELDS)


@dataclass
class Data:
    """One mix in every shape a contender reads: messages, an NDJSON blob, an NDJSON file."""

    kind: str
    payloads: list[bytes]
    sample: list[bytes]
    blob: bytes
    path: str


@dataclass
class Result:
    mix: str
    impl: str
    events: int
    bytes: int
    seconds: float
    events_per_s: float
    mb_per_s: float
    ratio: float | None = None


def _to_batch(columns: dict[str, Any]) -> pa.RecordBatch:
    """Lists of Python values per column -> Arrow, as hand-written pipelines do it."""
    arrays = []
    for field in EVENTS:
        if field.name == "ts":
            arrays.append(pa.array(columns["ts"], pa.string()).cast(TS_TYPE))
        else:
            arrays.append(pa.array(columns[field.name], field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=EVENTS)


def orjson_arrow(payloads: Sequence[bytes]) -> int:
    """(c) orjson.loads per message, a Python list per column, pa.array per column."""
    rows = [orjson.loads(p) for p in payloads]
    columns: dict[str, Any] = {name: [r.get(name) for r in rows] for name in _STRINGS}
    columns["ts"] = [r["ts"] for r in rows]
    columns.update({name: [r.get(name, 0) for r in rows] for name in TOKEN_COLUMNS})
    return _to_batch(columns).num_rows


class Event(msgspec.Struct):
    """(d) The event as a typed msgspec struct: msgspec checks JSON types while decoding."""

    event_id: str
    ts: str
    user: str
    model: str
    input_tokens: int
    output_tokens: int
    team: str | None = None
    org: str | None = None
    provider: str | None = None
    client: str | None = None
    request_id: str | None = None
    prompt_hash: str | None = None
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0


_MSGSPEC = msgspec.json.Decoder(Event)


def msgspec_arrow(payloads: Sequence[bytes]) -> int:
    decode = _MSGSPEC.decode
    events = [decode(p) for p in payloads]
    columns = {name: [getattr(e, name) for e in events] for name in EVENTS.names}
    return _to_batch(columns).num_rows


def _fill_tokens(table: pa.Table) -> pa.Table:
    """Absent optional token counts are 0 in meter's schema, null in the readers' output."""
    for name in TOKEN_COLUMNS:
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, pc.fill_null(table.column(name), 0))
    return table.cast(EVENTS)


def pyarrow_json(blob: bytes) -> int:
    """(e) pyarrow.json.read_json over the NDJSON blob with the schema given up front."""
    table = paj.read_json(
        pa.BufferReader(blob),
        read_options=paj.ReadOptions(use_threads=False),
        parse_options=paj.ParseOptions(explicit_schema=_NULLABLE, unexpected_field_behavior="ignore"),
    )
    return _fill_tokens(table).num_rows


_DUCKDB_TYPES = {pa.string(): "VARCHAR", pa.int64(): "BIGINT", TS_TYPE: "TIMESTAMPTZ"}
_DUCKDB_COLUMNS = ", ".join(f"'{f.name}': '{_DUCKDB_TYPES[f.type]}'" for f in EVENTS)


def duckdb_ndjson(connection: duckdb.DuckDBPyConnection, path: str) -> int:
    """(f) DuckDB read_ndjson over a file in the page cache, fetched as Arrow."""
    quoted = path.replace("'", "''")
    relation = connection.sql(f"SELECT * FROM read_ndjson('{quoted}', columns={{{_DUCKDB_COLUMNS}}})")
    return _fill_tokens(relation.to_arrow_table()).num_rows


def meter_parse(parse: Callable[..., Any], payloads: Sequence[bytes]) -> int:
    result = parse(payloads, now_ms=NOW_MS)
    if result.rejects:
        raise SystemExit(f"meter rejected benchmark events, first: {result.rejects[0]}")
    return int(result.batch.num_rows)


def pin_one_core(cpu: int | None) -> int | None:
    """Pin this process to one CPU (like `taskset -c`) and tell the libraries to use one thread."""
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    if not hasattr(os, "sched_setaffinity"):
        return None
    chosen = min(os.sched_getaffinity(0)) if cpu is None else cpu
    os.sched_setaffinity(0, {chosen})
    return chosen


def make_data(kind: str, n: int, n_pure: int, seed: int, directory: str) -> Data:
    generated = list(Mix(seed, kind, start_ms=START_MS, span_ms=SPAN_MS).messages(n))
    # Copy into payloads allocated back to back, as a consumer's message.value() objects of
    # one consume() call are; the generator's garbage would otherwise scatter them across
    # the heap and every contender would mostly measure cache and TLB misses.
    payloads = [bytes(bytearray(p)) for p in generated]
    del generated
    blob = b"\n".join(payloads) + b"\n"
    path = os.path.join(directory, f"{kind}.ndjson")
    with open(path, "wb") as file:
        file.write(blob)
    return Data(kind, payloads, payloads[:n_pure], blob, path)


def measure(run: Callable[[], int], expected: int, runs: int) -> float:
    """Median seconds of `runs` timed calls after one untimed warm-up."""
    if run() != expected:
        raise SystemExit("an implementation returned the wrong number of rows")
    times = []
    for _ in range(runs):
        gc.collect()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(data: Data, impls: Sequence[str], runs: int) -> list[Result]:
    connection = duckdb.connect()
    connection.execute("SET threads = 1")
    full, sample = data.payloads, data.sample
    contenders: dict[str, tuple[str, Sequence[bytes], Callable[[], int]]] = {
        "meter": (
            f"meter.parse_batch [{'compiled' if COMPILED else 'pure Python'}]",
            full if COMPILED else sample,
            lambda: meter_parse(parse_batch, full if COMPILED else sample),
        ),
        "meter-pure": ("meter._pyparser", sample, lambda: meter_parse(py_parse_batch, sample)),
        "orjson": (ORJSON, full, lambda: orjson_arrow(full)),
        "msgspec": ("msgspec Struct + pa.array", full, lambda: msgspec_arrow(full)),
        "pyarrow.json": ("pyarrow.json.read_json", full, lambda: pyarrow_json(data.blob)),
        "duckdb": ("duckdb read_ndjson", full, lambda: duckdb_ndjson(connection, data.path)),
    }
    results = []
    for impl in impls:
        label, payloads, run = contenders[impl]
        size = sum(map(len, payloads))
        seconds = measure(run, len(payloads), runs)
        results.append(
            Result(
                data.kind,
                label,
                len(payloads),
                size,
                seconds,
                len(payloads) / seconds,
                size / seconds / 1e6,
            )
        )
    connection.close()
    base = next((r.events_per_s for r in results if r.impl == ORJSON), None)
    for result in results:
        result.ratio = result.events_per_s / base if base else None
    return results


def _csv(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = sorted(set(items) - set(choices))
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(choices)}")
        return items

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="events per mix (default 200000)")
    parser.add_argument(
        "--pure-events",
        type=int,
        default=5_000,
        help="events for the pure-Python parser (default 5000)",
    )
    parser.add_argument("--runs", type=int, default=5, help="timed runs; the median is reported (default 5)")
    parser.add_argument("--mix", type=_csv(KINDS), default=list(KINDS), help="comma-separated mixes")
    parser.add_argument(
        "--impl", type=_csv(IMPLS), default=list(IMPLS), help="comma-separated implementations"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: the first allowed)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.events < 1 or args.runs < 1 or args.pure_events < 1:
        parser.error("--events, --pure-events and --runs must be positive")

    cpu = pin_one_core(args.cpu)
    meta = {
        "meter_parser": "compiled" if COMPILED else "pure Python",
        "cpu": cpu,
        "runs": args.runs,
        "seed": args.seed,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "pyarrow": pa.__version__,
        "duckdb": duckdb.__version__,
        "orjson": orjson.__version__,
        "msgspec": msgspec.__version__,
    }
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="meter-bench-") as directory:
        for kind in args.mix:
            data = make_data(kind, args.events, min(args.pure_events, args.events), args.seed, directory)
            results += bench(data, args.impl, args.runs)
    if args.json:
        print(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2))
        return 0
    row = "{:<10} {:<34} {:>8} {:>12} {:>8} {:>9}"
    print("# " + ", ".join(f"{key}={value}" for key, value in meta.items()))
    print(row.format("mix", "implementation", "events", "events/s", "MB/s", "vs orjson"))
    for r in results:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        print(row.format(r.mix, r.impl, r.events, f"{r.events_per_s:,.0f}", f"{r.mb_per_s:.1f}", ratio))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
