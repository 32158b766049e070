"""The `meter` command line: one subcommand per job, each a thin shell over a module."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

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
    from meter.signing import install_reload_signal
    from meter.systemd import notifier

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
        notifier().stopping("flushing")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    pipeline = Pipeline(settings)
    install_reload_signal(pipeline.verify)  # SIGHUP reloads the keyring
    if settings.policy or settings.detect_daily:  # budget gauges, flagged users, daily detection
        from meter.budget import start_daemon_jobs

        registry = metrics.DEFAULT.registry
        start_daemon_jobs(settings.lake, settings.policy, settings.detect_daily, registry, stop)
    server = metrics.serve(settings.metrics_addr, pipeline.readiness) if settings.metrics_addr else None
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
        help="run read-only SQL over the lake, sandboxed (views events, dlq, rollups, prices)",
        description="Run SELECT statements on an in-memory DuckDB over the files the "
        "lake's manifest lists: views events (with date, hour), dlq (with date), "
        "rollup_minute, rollup_hour, rollup_day and prices. No other file can be read, "
        "nothing can be written, and the query runs under a time and a memory limit.",
    )
    p.add_argument("sql", help="the SQL to run (the last statement's result is printed)")
    p.add_argument("--lake", required=True, metavar="PATH", help="the lake directory")
    p.add_argument(
        "--format",
        choices=("table", "csv", "json", "parquet"),
        help="output format (default: table on a terminal, csv otherwise; parquet needs --out)",
    )
    p.add_argument(
        "--out", metavar="FILE", help="write the result to FILE (outside the lake) instead of stdout"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="stop the query after this long, 0 for no limit (default 120)",
    )
    p.add_argument(
        "--memory-limit",
        default="2GiB",
        metavar="SIZE",
        help="memory the query may use, e.g. 512MB, 4GiB; nothing spills to disk (default 2GiB)",
    )
    p.add_argument(
        "--catalog", metavar="FILE", help="price catalog for the prices view (default: the packaged one)"
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
    from typing import TextIO

    import duckdb

    from meter.manifest import ManifestError
    from meter.pricing import load_catalog
    from meter.query import Limits, export_parquet, output_file, parse_size, run

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
    if args.timeout < 0:
        raise ValueError(f"--timeout must be >= 0, got {args.timeout}")
    limits = Limits(timeout_s=args.timeout or None, memory_limit=parse_size(args.memory_limit))
    catalog = load_catalog(args.catalog) if args.catalog else None
    fmt = args.format or ("table" if sys.stdout.isatty() and not args.out else "csv")
    if fmt == "parquet" and not args.out:
        raise ValueError("--format parquet writes a file: give it with --out FILE")

    def write(out: TextIO) -> None:
        max_rows = args.max_rows or None
        run(
            args.lake,
            args.sql,
            out,
            fmt=fmt,
            params=params,
            max_rows=max_rows,
            limits=limits,
            catalog=catalog,
        )

    try:
        if fmt == "parquet":
            export_parquet(args.lake, args.sql, args.out, params=params, limits=limits, catalog=catalog)
        elif args.out:
            with output_file(args.lake, args.out) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
                write(f)
        else:
            write(sys.stdout)
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


def _non_negative(text: str) -> float:
    """Argparse type of the duration options: a negative grace would delete replaced files at once."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _add_compact(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compact",
        help="merge the small files of closed partitions, atomically with the manifest",
        description="Merge runs of small listed files of closed partitions (event-time "
        "hours, DLQ dates) into large ones, per Kafka partition, and swap them into the "
        "manifest in one atomic step; safe against a running daemon and running queries.",
    )
    p.add_argument("--lake", required=True, metavar="PATH", help="the lake directory")
    p.add_argument(
        "--target-mb", type=float, default=128.0, metavar="MB", help="merged file size in MiB (default 128)"
    )
    p.add_argument(
        "--grace-hours",
        type=_non_negative,
        default=2.0,
        metavar="H",
        help="a partition is closed this long after its end (default 2)",
    )
    p.add_argument(
        "--delete-after-minutes",
        type=_non_negative,
        default=15.0,
        metavar="M",
        help="keep replaced files this long for queries still reading them (default 15)",
    )
    p.add_argument("--dry-run", action="store_true", help="only report what would be merged")
    p.add_argument("--json", action="store_true", help="print a machine-readable report")
    p.set_defaults(func=_compact)


def _compact(args: argparse.Namespace) -> int:
    from meter.compact import CompactError, CompactPolicy, compact
    from meter.manifest import ManifestError

    policy = CompactPolicy(
        target_bytes=int(args.target_mb * (1 << 20)),
        grace_s=args.grace_hours * 3600,
        delete_grace_s=args.delete_after_minutes * 60,
    )
    try:
        report = compact(args.lake, policy, dry_run=args.dry_run)
    except (CompactError, ManifestError) as error:
        print(f"meter compact: {error}", file=sys.stderr)
        return EXIT_REJECTED
    doc = report.to_json()
    if args.json:
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        width = max(len(name) for name in doc)
        print("\n".join(f"{name:<{width}}  {value}" for name, value in doc.items() if name != "errors"))
    for skipped in report.errors:
        print(f"meter compact: skipped {skipped}", file=sys.stderr)
    return EXIT_REJECTED if report.errors else EXIT_OK


def _add_rollup(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rollup",
        help="bring the minute, hour and day rollups up to date (incremental)",
        description="Sum the lake's events by minute, hour and day and by org, team, user, "
        "model, provider and client with DuckDB. Only event-time partitions whose listed "
        "files changed since the last run are rebuilt.",
    )
    p.add_argument("--lake", required=True, metavar="PATH", help="the lake directory")
    p.add_argument("--full", action="store_true", help="rebuild every partition")
    p.add_argument(
        "--grace-minutes",
        type=float,
        default=10.0,
        metavar="M",
        help="keep replaced rollup files this long for queries still reading them (default 10)",
    )
    p.add_argument("--threads", type=int, metavar="N", help="DuckDB threads (default: all cores)")
    p.add_argument("--memory-limit", metavar="SIZE", help="DuckDB memory limit, e.g. 4GB")
    p.add_argument("--json", action="store_true", help="print a machine-readable report")
    p.set_defaults(func=_rollup)


def _rollup(args: argparse.Namespace) -> int:
    import duckdb

    from meter.manifest import ManifestError
    from meter.rollup import RollupBusy, build_rollups

    try:
        report = build_rollups(
            args.lake,
            full=args.full,
            grace_s=args.grace_minutes * 60,
            threads=args.threads,
            memory_limit=args.memory_limit,
        )
    except (RollupBusy, ManifestError) as error:
        print(f"meter rollup: {error}", file=sys.stderr)
        return EXIT_REJECTED
    except duckdb.Error as error:
        print(f"meter rollup: {error} (meter audit tells what is wrong with the lake)", file=sys.stderr)
        return EXIT_REJECTED
    doc = report.to_json()
    if args.json:
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        width = max(len(name) for name in doc)
        print("\n".join(f"{name:<{width}}  {value}" for name, value in doc.items()))
    return EXIT_OK


def _add_reprice(sub: argparse._SubParsersAction) -> None:
    from meter.reprice import GROUP_KEYS

    p = sub.add_parser(
        "reprice",
        help="what stored usage would cost under another catalog, per group; --apply restates it",
        description="Price every listed event in the range again with another catalog (at "
        "its event time) and compare with its stored cost, per group. The lake is not changed, "
        "unless --apply: then every listed events file with a changed cost is replaced by a new "
        "version priced with the catalog, atomically with the manifest (old and new cost are "
        "both recorded), and the rollups are rebuilt.",
    )
    p.add_argument("--lake", required=True, metavar="PATH", help="the lake directory")
    p.add_argument("--catalog", required=True, metavar="FILE", help="the catalog to price with")
    p.add_argument("--from", dest="start", metavar="TIMESTAMP", help="first event time (date or RFC 3339)")
    p.add_argument("--to", dest="end", metavar="TIMESTAMP", help="end of the range, exclusive")
    p.add_argument(
        "--by",
        default="team,model",
        metavar="KEY[,KEY...]",
        help=f"group keys, '' for the total only (default team,model; from {', '.join(GROUP_KEYS)})",
    )
    p.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        help="output format (default: table on a terminal, csv otherwise)",
    )
    p.add_argument(
        "--max-rows", type=int, default=1000, metavar="N", help="table format: rows shown, 0 for all"
    )
    p.add_argument(
        "--apply",
        action="store_true",
        help="WRITES: restate the stored costs of the range with FILE's prices (see docs/analytics.md)",
    )
    p.add_argument(
        "--delete-after-minutes",
        type=_non_negative,
        default=15.0,
        metavar="M",
        help="--apply: keep replaced files this long for queries still reading them (default 15)",
    )
    p.set_defaults(func=_reprice)


def _reprice(args: argparse.Namespace) -> int:
    import duckdb

    from meter.compact import CompactError
    from meter.manifest import ManifestError
    from meter.pricing import CatalogError, parse_instant_ms
    from meter.query import write_result
    from meter.reprice import load_catalog_file, reprice, restate

    by = [k.strip() for k in args.by.split(",") if k.strip()]
    try:
        catalog, ref = load_catalog_file(args.catalog)
    except (CatalogError, OSError) as error:
        print(f"meter reprice: {error}", file=sys.stderr)
        return EXIT_USAGE
    start = parse_instant_ms(args.start) if args.start else None
    end = parse_instant_ms(args.end) if args.end else None
    try:
        result = reprice(args.lake, catalog, start_ms=start, end_ms=end, by=by)
        # restate prices again: it plans on its own listing, under the lock and after each lost race
        applied = (
            restate(
                args.lake,
                catalog,
                ref,
                start_ms=start,
                end_ms=end,
                delete_grace_s=args.delete_after_minutes * 60,
            )
            if args.apply
            else None
        )
    except (ManifestError, CompactError, duckdb.Error) as error:
        print(f"meter reprice: {error}", file=sys.stderr)
        return EXIT_REJECTED
    fmt = args.format or ("table" if sys.stdout.isatty() else "csv")
    write_result(result.table if by else result.total, sys.stdout, fmt, max_rows=args.max_rows or None)
    if fmt == "table" and by:
        total = result.total.to_pylist()[0]
        print(
            f"total over {result.files} files: {total['events']} events, stored {total['stored_cost_usd']} "
            f"USD, new {total['new_cost_usd']} USD, difference {total['difference_usd']} USD "
            f"({catalog.source}, as of {catalog.as_of})"
        )
    if applied is not None:
        print(
            f"restated {applied.files} files ({applied.records} records): {applied.changed_events} of "
            f"{applied.events} events changed, old {applied.old_cost_usd} USD, new {applied.new_cost_usd} "
            f"USD, difference {applied.difference_usd} USD; rollups {applied.rollups}",
            file=sys.stdout if fmt == "table" else sys.stderr,
        )
    return EXIT_OK


def _add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="verify the lake: chains, files, rows, unlisted files, rollups; exit 1 on any error",
        description="Check that every partition's offsets are covered without gap or overlap, "
        "that files match their manifest records (rows, bytes, token and cost sums, sha256), "
        "that rollups equal a fresh aggregation, and that no unlisted file sits in the lake.",
    )
    p.add_argument("--lake", required=True, metavar="PATH", help="the lake directory")
    p.add_argument("--json", action="store_true", help="print a machine-readable report")
    p.add_argument(
        "--no-record",
        action="store_true",
        help="do not record checksums of newly seen files (the audit then writes nothing)",
    )
    p.set_defaults(func=_audit)


def _audit(args: argparse.Namespace) -> int:
    from meter.audit import audit

    report = audit(args.lake, record=not args.no_record)
    if args.json:
        sys.stdout.write(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(report.render())
    return EXIT_OK if report.ok else EXIT_REJECTED


def _add_keys(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="create and inspect signature keys (the keyring)")
    keys = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    new = keys.add_parser("new", help="create a key: secret to a new mode-600 file, [[key]] table to stdout")
    new.add_argument("kid", help="key id, 1-64 of A-Z a-z 0-9 . _ -")
    new.add_argument("--alg", choices=("hmac-sha256", "ed25519"), default="hmac-sha256")
    new.add_argument("--secret-file", metavar="PATH", help="the new secret's file (default: ./KID.secret)")
    new.add_argument("--secret-ref", metavar="REF", help="secret_ref to print instead (e.g. env:NAME)")
    new.add_argument("--gateway", help="bind the key to this gateway (events' client)")
    new.add_argument("--topic", action="append", help="topic the key may sign for (repeatable; default any)")
    new.add_argument("--not-before", metavar="TIMESTAMP", help="date or RFC 3339 instant")
    new.add_argument("--not-after", metavar="TIMESTAMP", help="date or RFC 3339 instant")
    actions = (("list", "list keys and their status"), ("check", "load as the daemon would; warn"))
    for name, helptext in actions:
        q = keys.add_parser(name, help=helptext)
        q.add_argument("--keyring", required=True, metavar="FILE")
        q.add_argument("--at", metavar="TIMESTAMP", help="status at this instant (default: now)")
        q.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "check":
            q.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    p.set_defaults(func=_keys)


def _keys(args: argparse.Namespace) -> int:
    from meter import keytool

    action = {"new": keytool.keys_new, "list": keytool.keys_list, "check": keytool.keys_check}
    return action[args.keys_command](args)


def _add_sign(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sign", help="sign messages (one per input line): print headers, or produce them")
    p.add_argument("file", nargs="?", default="-", help="messages, one per line (default: standard input)")
    p.add_argument("--kid", required=True, help="the key id to sign with")
    p.add_argument("--topic", required=True, help="the topic the messages are for (it is signed)")
    p.add_argument("--keyring", metavar="FILE", help="take the HMAC secret of --kid from this keyring")
    p.add_argument("--secret-ref", metavar="REF", help="or from env:NAME / file:PATH")
    p.add_argument("--ed25519-key", metavar="FILE", help="or sign with this Ed25519 private key file")
    p.add_argument("--ts", type=int, metavar="MS", help="signing time in epoch ms (default: now)")
    p.add_argument("--brokers", metavar="HOST:PORT[,...]", help="produce the signed messages to --topic")
    p.add_argument("--kafka", action="append", default=[], metavar="KEY=VALUE", help="producer setting")
    p.set_defaults(func=_sign)


def _sign(args: argparse.Namespace) -> int:
    from meter import keytool

    return keytool.sign(args)


def _module_cli(module: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand that is ``module.cli(args, stdout)``, imported only when it runs."""

    def run(args: argparse.Namespace) -> int:
        result: int = importlib.import_module(module).cli(args, sys.stdout)
        return result

    return run


def _add_detect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "detect",
        help="flag usage-gaming anomalies with evidence (writes LAKE/flags/, prints a ranking)",
        description="Run the usage-gaming detectors (docs/integrity.md) on a day or a range of "
        "days of the lake, write each day's hits to LAKE/flags/ and print the users whose "
        "flags count (a detector fired on min_days days), ranked.",
    )
    p.add_argument("--lake", required=True, metavar="PATH", help="the lake directory")
    p.add_argument("--day", metavar="YYYY-MM-DD", help="one UTC day (default: yesterday)")
    p.add_argument("--from", dest="date_from", metavar="YYYY-MM-DD", help="first day of a range")
    p.add_argument("--to", dest="date_to", metavar="YYYY-MM-DD", help="last day of a range")
    p.add_argument("--policy", metavar="FILE", help="policy TOML: [detect] settings, [[deadline]] dates")
    p.add_argument(
        "--trend",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run the long-window trend detector (default: on for --from/--to, off for --day)",
    )
    p.add_argument("--no-write", action="store_true", help="detect and print only; write no flags")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="table: users shown (0: all)")
    p.add_argument("--threads", type=int, metavar="N", help="DuckDB threads (default: all cores)")
    p.set_defaults(func=_module_cli("meter.detect"))


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="KPI report by user or team: tokens by bucket, cost, flags with evidence",
        description="Tokens by bucket (cache reads apart), exact cost and the usage-gaming "
        "flags that count, by user or team, over a period; html is one offline page with charts.",
    )
    p.add_argument("--lake", required=True, metavar="PATH", help="the lake directory")
    p.add_argument(
        "--period",
        required=True,
        metavar="P",
        help="YYYY-MM-DD, YYYY-MM, YYYY, YYYY-Www, A..B, today, yesterday, this-week, "
        "last-week, this-month, last-month or last-N-days (UTC)",
    )
    p.add_argument("--by", choices=("user", "team"), default="user")
    p.add_argument("--format", choices=("table", "csv", "json", "html"), default="table")
    p.add_argument("--out", metavar="FILE", help="write to FILE instead of standard output")
    p.add_argument("--policy", metavar="FILE", help="policy TOML ([detect] min_days, automation clients)")
    p.add_argument("--limit", type=int, metavar="N", help="table and html: rows shown (default: all)")
    p.set_defaults(func=_module_cli("meter.report"))


def _add_scenario(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scenario",
        help="synthesise honest users and planted gamers, with ground truth, into a lake",
        description="The evaluation harness of meter detect: a seeded population with realistic "
        "confounders and planted gamer archetypes, written straight into a lake (one manifest "
        "entry per day on topic 'scenario'), with its ground truth and review-deadline policy.",
    )
    p.add_argument("--lake", required=True, metavar="PATH", help="the lake directory (created)")
    p.add_argument("--seed", type=int, default=1, metavar="S")
    p.add_argument("--honest", type=int, default=2000, metavar="N", help="honest users (default 2000)")
    p.add_argument("--gamers", type=int, default=20, metavar="N", help="gamers per archetype (default 20)")
    p.add_argument("--teams", type=int, default=60, metavar="N")
    p.add_argument("--days", type=int, default=28, metavar="N")
    p.add_argument("--start", metavar="YYYY-MM-DD", help="first day (default 2026-01-05, a Monday)")
    p.add_argument("--deadline-day", type=int, metavar="N", help="review deadline, days after --start")
    p.add_argument("--volume", type=float, default=1.0, help="multiplies every user's request rate")
    p.add_argument("--truth", metavar="FILE", help="ground truth JSON (default: LAKE/_meter/scenario/)")
    p.add_argument(
        "--policy-out", metavar="FILE", help="policy TOML with the deadline (default: beside the truth)"
    )
    p.set_defaults(func=_module_cli("meter.scenario"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meter", description=__doc__)
    parser.add_argument("--version", action="version", version=f"meter {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_run,
        _add_demo,
        _add_gen,
        _add_query,
        _add_compact,
        _add_rollup,
        _add_reprice,
        _add_audit,
        _add_validate,
        _add_prices,
        _add_keys,
        _add_sign,
        _add_detect,
        _add_report,
        _add_scenario,
    ):
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
