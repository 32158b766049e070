"""The `meter` command line: one subcommand per job, each a thin shell over a module."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import orjson

from meter._version import __version__

EXIT_OK, EXIT_REJECTED, EXIT_USAGE = 0, 1, 2


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="validate an NDJSON file (one message per line)")
    p.add_argument("file", help="path, or - for standard input")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    p.add_argument("--rejects", metavar="OUT", help="write each reject as a JSON line to OUT")
    p.add_argument(
        "--catalog",
        metavar="FILE",
        nargs="?",
        const="default",
        help="price accepted events (the default catalog when FILE is omitted)",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 if anything was rejected")
    p.add_argument("--now", metavar="TIMESTAMP", help="clock for the timestamp window (RFC 3339)")
    p.add_argument(
        "--lateness-days", type=float, default=35.0, help="oldest accepted event age in days (default 35)"
    )
    p.set_defaults(func=_validate)


def _validate(args: argparse.Namespace) -> int:
    from meter.pricing import load_catalog, parse_instant_ms
    from meter.validate import render, validate_stream

    catalog = None
    if args.catalog is not None:
        catalog = load_catalog(None if args.catalog == "default" else args.catalog)
    now_ms = parse_instant_ms(args.now) if args.now else None
    lateness_ms = int(args.lateness_days * 86_400_000)
    rejects_out = open(args.rejects, "wb") if args.rejects else None  # noqa: SIM115
    try:
        if args.file == "-":
            totals = validate_stream(
                sys.stdin.buffer,
                catalog=catalog,
                rejects_out=rejects_out,
                now_ms=now_ms,
                lateness_ms=lateness_ms,
            )
        else:
            with open(args.file, "rb") as stream:
                totals = validate_stream(
                    stream,
                    catalog=catalog,
                    rejects_out=rejects_out,
                    now_ms=now_ms,
                    lateness_ms=lateness_ms,
                    total_bytes=os.fstat(stream.fileno()).st_size,
                )
    finally:
        if rejects_out is not None:
            rejects_out.close()
    if args.json:
        sys.stdout.write(orjson.dumps(totals.to_json(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(render(totals, priced=catalog is not None))
    return EXIT_REJECTED if args.strict and totals.rejected else EXIT_OK


def _add_prices(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prices", help="print the price table in force")
    p.add_argument("--catalog", metavar="FILE", help="a catalog file (default: the packaged one)")
    p.add_argument("--at", metavar="TIMESTAMP", help="date or RFC 3339 instant (default: now)")
    p.set_defaults(func=_prices)


def _prices(args: argparse.Namespace) -> int:
    import time

    from meter.pricing import format_price_table, load_catalog, parse_instant_ms

    catalog = load_catalog(args.catalog)
    at_ms = parse_instant_ms(args.at) if args.at else time.time_ns() // 1_000_000
    print(format_price_table(catalog, at_ms))
    return EXIT_OK


def _add_run(sub: argparse._SubParsersAction) -> None:
    from meter import config

    p = sub.add_parser("run", help="the daemon: Kafka -> validated, priced Parquet lake")
    config.add_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from meter import config, log, metrics
    from meter.pipeline import Pipeline

    try:
        settings = config.load(args)
    except config.ConfigError as error:
        print(f"meter run: {error}", file=sys.stderr)
        return EXIT_USAGE
    log.setup(settings.log_format, settings.log_level)
    logger = logging.getLogger("meter")
    logger.info("starting", extra={"version": __version__, "config": settings.redacted()})
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("stopping: flush, commit, close", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    pipeline = Pipeline(settings)
    server = metrics.serve(settings.metrics_addr, pipeline.ready) if settings.metrics_addr else None
    try:
        pipeline.run(stop)
    finally:
        if server is not None:
            server.shutdown()
    logger.info("stopped")
    return EXIT_OK


def _add_query(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "query",
        help="run read-only SQL over the lake (views events, dlq)",
        description="Run SQL on an in-memory DuckDB over the files the lake's "
        "manifest lists: views events (with date, hour) and dlq (with date). "
        "No other file can be read or written.",
    )
    p.add_argument("sql", help="the SQL to run (the last statement's result is printed)")
    p.add_argument("--lake", required=True, metavar="PATH", help="the lake directory")
    p.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        help="output format (default: table on a terminal, csv otherwise)",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="bind $NAME in the SQL to the string VALUE (repeatable; DuckDB casts "
        "it where the SQL needs another type, or write $NAME::TYPE)",
    )
    p.add_argument(
        "--max-rows",
        type=int,
        default=1000,
        metavar="N",
        help="table format: print at most N rows, 0 for all (default 1000)",
    )
    p.set_defaults(func=_query)


def _query(args: argparse.Namespace) -> int:
    import re

    import duckdb

    from meter.manifest import ManifestError
    from meter.query import run

    params: dict[str, str] = {}
    for item in args.param:
        name, eq, value = item.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"--param must be NAME=VALUE with NAME an identifier, got {item!r}")
        if name in params:
            raise ValueError(f"--param {name} given twice")
        params[name] = value
    if args.max_rows < 0:
        raise ValueError(f"--max-rows must be >= 0, got {args.max_rows}")
    fmt = args.format or ("table" if sys.stdout.isatty() else "csv")
    try:
        run(args.lake, args.sql, sys.stdout, fmt=fmt, params=params, max_rows=args.max_rows or None)
    except (duckdb.Error, ManifestError) as error:
        sys.stdout.flush()
        print(f"meter query: {error}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="embedded broker + generated traffic + daemon + lake, end to end")
    p.add_argument("--lake", default="meter-demo/lake", help="lake directory (default: ./meter-demo/lake)")
    p.add_argument("--seconds", type=float, help="stop after this many seconds (default: Ctrl-C)")
    p.add_argument("--rate", type=float, default=20_000, help="generated events per second")
    p.add_argument("--per-message", type=int, default=5, help="events per Kafka message")
    p.add_argument("--bad-ratio", type=float, default=0.01, help="share of invalid events")
    p.add_argument("--metrics-addr", default="127.0.0.1:9464", help="HOST:PORT for /metrics ('' = off)")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from meter import log
    from meter.demo import DemoOptions, run_demo

    log.setup("text", "WARNING")
    return run_demo(
        DemoOptions(
            lake=args.lake,
            seconds=args.seconds,
            rate=args.rate,
            per_message=args.per_message,
            bad_ratio=args.bad_ratio,
            metrics_addr=args.metrics_addr or None,
        )
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meter", description=__doc__)
    parser.add_argument("--version", action="version", version=f"meter {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run, _add_demo, _add_gen, _add_query, _add_validate, _add_prices):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `meter prices | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (OSError, ValueError) as error:
        print(f"meter {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _add_gen(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gen", help="produce realistic usage events to a Kafka topic")
    p.add_argument("--brokers", required=True, metavar="HOST:PORT[,...]", help="bootstrap servers")
    p.add_argument("--topic", required=True, metavar="NAME")
    p.add_argument(
        "--events",
        type=int,
        default=100_000,
        metavar="N",
        help="event slots to send, bad ones included (default 100000)",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=0.0,
        metavar="R",
        help="events per second, steady (default 0: as fast as possible)",
    )
    p.add_argument("--seed", type=int, default=1, metavar="S", help="traffic seed (default 1)")
    p.add_argument(
        "--per-message", type=int, default=1, metavar="K", help="events per message, as NDJSON (default 1)"
    )
    p.add_argument(
        "--bad-ratio",
        type=float,
        default=0.0,
        metavar="F",
        help="fraction of events replaced by invalid ones, over every reason code",
    )
    p.add_argument(
        "--duplicate-ratio",
        type=float,
        default=0.0,
        metavar="F",
        help="fraction of messages re-sent verbatim, as a gateway retry would",
    )
    p.add_argument(
        "--start", metavar="TIMESTAMP", help="first event time, date or RFC 3339 (default: --span before now)"
    )
    p.add_argument(
        "--span",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="event-time range in seconds (default 3600)",
    )
    p.add_argument(
        "--now", metavar="TIMESTAMP", help="the daemon's clock the events are built around (default: now)"
    )
    p.add_argument(
        "--partitions", type=int, metavar="P", help="create the topic with P partitions if it is missing"
    )
    p.add_argument(
        "--catalog",
        metavar="FILE",
        help="price the sent events for the summary (default: the packaged catalog)",
    )
    p.add_argument(
        "--kafka",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="librdkafka producer setting (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    p.set_defaults(func=_gen)


def _gen(args: argparse.Namespace) -> int:
    import signal
    import threading

    from meter.gen import GenError, GenProgress, generate
    from meter.pricing import parse_instant_ms

    kafka = {}
    for item in args.kafka:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--kafka {item!r}: expected KEY=VALUE")
        kafka[key.strip()] = value
    span_ms = int(args.span * 1000)
    now_ms = parse_instant_ms(args.now) if args.now else None
    start_ms = parse_instant_ms(args.start) if args.start else None
    stop = threading.Event()
    tty = sys.stderr.isatty()

    def show(p: GenProgress) -> None:
        if tty:
            rate = p.lines / max(p.elapsed_s, 1e-9)
            sys.stderr.write(
                f"\r{p.messages:,} messages  {p.lines:,} events  {rate:,.0f}/s  {p.failed:,} failed "
            )
            sys.stderr.flush()

    def on_signal(signum: int, frame: object) -> None:
        if stop.is_set():  # a second signal: stop waiting for the flush too
            raise KeyboardInterrupt
        stop.set()  # the first one: stop sending, flush and report

    signals = (signal.SIGINT, signal.SIGTERM)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, on_signal) for s in signals} if main_thread else {}
    try:
        summary = generate(
            args.brokers,
            args.topic,
            events=args.events,
            rate=args.rate,
            seed=args.seed,
            per_message=args.per_message,
            bad_ratio=args.bad_ratio,
            duplicate_ratio=args.duplicate_ratio,
            start_ms=start_ms,
            span_ms=span_ms,
            partitions=args.partitions,
            catalog=args.catalog,
            kafka=kafka,
            now_ms=now_ms,
            stop=stop,
            on_progress=show,
        )
    except GenError as error:
        print(f"meter gen: {error}", file=sys.stderr)
        return EXIT_REJECTED
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if tty:
            sys.stderr.write("\r\033[K")
    if args.json:
        text = orjson.dumps(summary.to_json(), option=orjson.OPT_INDENT_2).decode()
        sys.stdout.write(text + "\n")
    else:
        doc = summary.to_json()
        rows = [
            (name, doc[name])
            for name in ("topic", "messages", "unique_messages", "events", "resent_messages", "resent_events")
        ]
        rows += [(f"bad {reason}", n) for reason, n in doc["bad_events"].items()]
        rows += list(doc["tokens"].items())
        rows += [
            ("cost_usd", doc["cost_usd"]),
            ("unpriced", doc["unpriced"]),
            ("first ts", doc["event_time"]["first"]),
            ("last ts", doc["event_time"]["last"]),
            ("events/s", doc["events_per_s"]),
            ("delivered", doc["delivered"]),
            ("failed", doc["failed"]),
        ]
        width = max(len(name) for name, _ in rows)
        print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    if summary.failed:
        errors = ", ".join(f"{name} {n}" for name, n in sorted(summary.errors.items()))
        print(
            f"meter gen: {summary.failed} of {summary.messages} messages not delivered ({errors})",
            file=sys.stderr,
        )
        return EXIT_REJECTED
    return EXIT_OK
