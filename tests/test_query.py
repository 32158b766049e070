"""meter.query: manifest-only views, the lockdown, output formats, `meter query`."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meter import lake
from meter.cli import main
from meter.manifest import (
    FileRecord,
    ManifestEntry,
    append_entry,
    event_totals,
    listed_files,
    reject_counts,
)
from meter.query import (
    DLQ_PARTITIONS,
    EVENTS_PARTITIONS,
    _civil_from_days,
    _format_blob,
    allowed_paths,
    duckdb_type,
    glob_escape,
    lockdown_sql,
    open_lake,
    query,
    sql_identifier,
    sql_string,
    view_sql,
    write_result,
)
from meter.schema import DLQ, LAKE_EVENTS, TOKEN_COLUMNS

TOPIC = "usage.v1"


def ms(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, milli: int = 0) -> int:
    return int(dt.datetime(y, mo, d, h, mi, s, tzinfo=dt.UTC).timestamp()) * 1000 + milli


def events_table(start: int, rows: Sequence[tuple[int, str, str | None, int]]) -> pa.Table:
    """LAKE_EVENTS rows (ts_ms, model, cost or None, input_tokens) at offsets from ``start``."""
    n = len(rows)
    cols: dict[str, list[Any]] = {f.name: [None] * n for f in LAKE_EVENTS}
    cols.update(
        event_id=[f"e{start + i}" for i in range(n)],
        ts=[r[0] for r in rows],
        user=["alice" if i % 2 else "bob" for i in range(n)],
        model=[r[1] for r in rows],
        cost_usd=[None if r[2] is None else Decimal(r[2]) for r in rows],
        price_version=[None if r[2] is None else f"{r[1]}@2025-01-01" for r in rows],
        kafka_topic=[TOPIC] * n,
        kafka_partition=[0] * n,
        kafka_offset=[start + i for i in range(n)],
    )
    cols.update({k: [0] * n for k in TOKEN_COLUMNS})
    cols["input_tokens"] = [r[3] for r in rows]
    return pa.table(cols, schema=LAKE_EVENTS)


def dlq_table(start: int, arrivals: list[int]) -> pa.Table:
    n = len(arrivals)
    return pa.table(
        {
            "raw": [b'{"bad\xff' for _ in range(n)],
            "kafka_topic": [TOPIC] * n,
            "kafka_partition": [0] * n,
            "kafka_offset": [start + i for i in range(n)],
            "line": [0] * n,
            "reason": ["invalid_utf8"] * n,
            "detail": ["invalid UTF-8 at byte 7"] * n,
            "arrival_ts": arrivals,
        },
        schema=DLQ,
    )


def flush(root: Path, start: int, events: pa.Table, dlq: pa.Table, after: int | None) -> int:
    """Write one flush's files and its manifest entry as the daemon does; return its end."""
    end = start + events.num_rows + dlq.num_rows
    name = lake.data_file_name(TOPIC, 0, start, end)
    files = []
    for (date, hour), part in lake.split_by_hour(events):
        rel = lake.events_rel_path(date, hour, name)
        written = lake.write_parquet_atomic(part, lake.abs_path(root, rel))
        files.append(FileRecord(rel, "events", part.num_rows, *written))
    for date, part in lake.split_dlq_by_date(dlq):
        rel = lake.dlq_rel_path(date, name)
        written = lake.write_parquet_atomic(part, lake.abs_path(root, rel))
        files.append(FileRecord(rel, "dlq", part.num_rows, *written))
    tokens, cost, unpriced = event_totals(events)
    entry = ManifestEntry(
        topic=TOPIC, partition=0, start=start, end=end, messages=end - start,
        accepted=events.num_rows, rejected=dlq.num_rows, rejects_by_reason=reject_counts(dlq),
        tokens=tokens, cost_usd=cost, unpriced=unpriced, files=tuple(files),
        writer="test/1", written_at_ms=ms(2026, 1, 2),
    )  # fmt: skip
    append_entry(root, entry, after=after)
    return end


# Two flushes: 7 events over three hours (one unpriced), 3 DLQ rows over two days.
FLUSH_1 = [
    (ms(2026, 1, 1, 0, 5, 0, 1), "claude-sonnet-4-5", "0.003000000001", 1000),
    (ms(2026, 1, 1, 0, 59, 59, 999), "claude-sonnet-4-5", "0.000000000001", 1),
    (ms(2026, 1, 1, 1, 0), "gpt-5", "1.234567890123", 250_000),
    (ms(2026, 1, 1, 1, 30), "mystery-model", None, 7),
]
FLUSH_2 = [
    (ms(2026, 1, 1, 23, 0), "gpt-5", "0.100000000000", 20),
    (ms(2026, 1, 1, 23, 1), "claude-sonnet-4-5", "99999.999999999999", 3),
    (ms(2026, 1, 1, 23, 2), "gpt-5", "0.000000000009", 5),
]
EXPECTED_COST = sum((Decimal(r[2]) for r in FLUSH_1 + FLUSH_2 if r[2] is not None), Decimal(0))


def build_lake(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    end = flush(root, 0, events_table(0, FLUSH_1), dlq_table(4, [ms(2026, 1, 1, 3)]), None)
    flush(root, end, events_table(end, FLUSH_2),
          dlq_table(end + 3, [ms(2026, 1, 1, 23, 59), ms(2026, 1, 2, 0, 1)]), end)  # fmt: skip
    # A stray: a well-named file in a listed directory that no manifest entry lists.
    stray = events_table(1000, [(ms(2026, 1, 1, 0, 30), "gpt-5", "5.000000000000", 999)] * 10)
    stray_name = lake.data_file_name(TOPIC, 0, 1000, 1010)
    lake.write_parquet_atomic(stray, lake.events_dir(root, "2026-01-01", 0) / stray_name)
    return root


@pytest.fixture
def lake_root(tmp_path: Path) -> Path:
    return build_lake(tmp_path / "lake")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["query", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- pure: SQL text ----------------------------------------------------------------------


def test_sql_quoting() -> None:
    assert sql_string("plain") == "'plain'"
    assert sql_string("it's") == "'it''s'"
    assert sql_string("''") == "''''''"
    assert sql_identifier('a"b') == '"a""b"'
    with pytest.raises(ValueError, match="NUL"):
        sql_string("a\x00b")


def test_glob_escape_and_allowed_paths() -> None:
    assert glob_escape("/l/a.parquet") == "/l/a.parquet"
    assert glob_escape("/l[1]/*x?.parquet") == "/l[[]1]/[*]x[?].parquet"
    assert allowed_paths(["/a/x.parquet", "/b*/y.parquet", "/a/x.parquet"]) == [
        "/a/x.parquet",
        "/b*/y.parquet",
        "/b[*]/y.parquet",
    ]


def test_duckdb_types() -> None:
    assert duckdb_type(pa.timestamp("ms", tz="UTC")) == "TIMESTAMP WITH TIME ZONE"
    assert duckdb_type(pa.timestamp("us")) == "TIMESTAMP"
    assert duckdb_type(pa.decimal128(38, 12)) == "DECIMAL(38, 12)"
    assert duckdb_type(pa.string()) == "VARCHAR"
    assert duckdb_type(pa.binary()) == "BLOB"
    assert duckdb_type(pa.int32()) == "INTEGER"
    assert duckdb_type(pa.int64()) == "BIGINT"
    assert duckdb_type(pa.list_(pa.string())) == "VARCHAR[]"  # rollups' price_versions
    with pytest.raises(TypeError):
        duckdb_type(pa.list_(pa.float16()))
    with pytest.raises(TypeError):
        duckdb_type(pa.map_(pa.string(), pa.string()))


def test_view_sql_over_files() -> None:
    schema = pa.schema([pa.field("a", pa.int64()), pa.field('q"x', pa.string())])
    sql = view_sql("v", schema, EVENTS_PARTITIONS, ["/l/it's/f.parquet", "/l[2]/g*.parquet"])
    assert sql == (
        'CREATE VIEW "v" AS SELECT "a", "q""x", "date", "hour" FROM read_parquet('
        "['/l/it''s/f.parquet', '/l[[]2]/g[*].parquet'], hive_partitioning = true, "
        "hive_types = {'date': DATE, 'hour': INTEGER})"
    )


def test_view_sql_empty() -> None:
    schema = pa.schema([pa.field("a", pa.decimal128(38, 12)), pa.field("t", pa.timestamp("ms", "UTC"))])
    assert view_sql("dlq", schema, DLQ_PARTITIONS, []) == (
        'CREATE VIEW "dlq" AS SELECT CAST(NULL AS DECIMAL(38, 12)) AS "a", '
        'CAST(NULL AS TIMESTAMP WITH TIME ZONE) AS "t", CAST(NULL AS DATE) AS "date" WHERE false'
    )


def test_lockdown_sql_order() -> None:
    stmts = lockdown_sql(["/l/it's.parquet"])
    assert stmts[1] == "SET allowed_paths = ['/l/it''s.parquet']"
    assert lockdown_sql([])[1] == "SET allowed_paths = []"
    # allowed_paths is only settable before external access goes off; the lock goes last.
    assert stmts.index("SET enable_external_access = false") > 1
    assert stmts[-1] == "SET lock_configuration = true"
    for s in ("SET autoload_known_extensions = false", "SET autoinstall_known_extensions = false",
              "SET TimeZone = 'UTC'"):  # fmt: skip
        assert s in stmts


# --- pure: values as text ----------------------------------------------------------------


def test_civil_from_days_matches_datetime() -> None:
    epoch = dt.date(1970, 1, 1)
    for days in [*range(-719_162, 2_932_897, 997), -719_162, 2_932_896, 0, -1, 59, 60, 11_016]:
        d = epoch + dt.timedelta(days=days)
        assert _civil_from_days(days) == (d.year, d.month, d.day)


def test_blob_text_matches_duckdb() -> None:
    data = bytes(range(256))
    con = duckdb.connect()
    (expected,) = con.execute("SELECT ?::BLOB::VARCHAR", [data]).fetchone()  # type: ignore[misc]
    assert _format_blob(data) == expected


def render(table: pa.Table, fmt: str, **kw: Any) -> str:
    out = io.StringIO()
    write_result(table, out, fmt, **kw)
    return out.getvalue()


def test_formats_of_values() -> None:
    table = pa.table(
        {
            "n": pa.array([1, None, -30], pa.int64()),
            "cost": pa.array([Decimal("0.000000000001"), None, Decimal("12.5")],
                             pa.decimal128(38, 12)),
            "ts": pa.array([ms(2026, 1, 1, 0, 5, 0, 120), None, ms(1969, 12, 31, 23, 59, 59)],
                           pa.timestamp("ms", tz="UTC")),
            "naive": pa.array([1_500_000, None, 0], pa.timestamp("us")),
            "s": ["a,b", None, 'q"\nz'],
        }
    )  # fmt: skip
    rows = json.loads(render(table, "json"))
    assert rows == [
        {"n": 1, "cost": "0.000000000001", "ts": "2026-01-01T00:05:00.120Z",
         "naive": "1970-01-01T00:00:01.500", "s": "a,b"},
        {"n": None, "cost": None, "ts": None, "naive": None, "s": None},
        {"n": -30, "cost": "12.500000000000", "ts": "1969-12-31T23:59:59Z",
         "naive": "1970-01-01T00:00:00", "s": 'q"\nz'},
    ]  # fmt: skip
    assert list(csv.reader(io.StringIO(render(table, "csv")))) == [
        ["n", "cost", "ts", "naive", "s"],
        ["1", "0.000000000001", "2026-01-01T00:05:00.120Z", "1970-01-01T00:00:01.500", "a,b"],
        ["", "", "", "", ""],
        ["-30", "12.500000000000", "1969-12-31T23:59:59Z", "1970-01-01T00:00:00", 'q"\nz'],
    ]
    assert render(table, "table").splitlines() == [
        "   n             cost  ts                        naive                    s",
        "----  ---------------  ------------------------  -----------------------  -----",
        "   1   0.000000000001  2026-01-01T00:05:00.120Z  1970-01-01T00:00:01.500  a,b",
        "NULL             NULL  NULL                      NULL                     NULL",
        ' -30  12.500000000000  1969-12-31T23:59:59Z      1970-01-01T00:00:00      q"\\nz',
        "(3 rows)",
    ]


def test_table_max_rows_and_empty() -> None:
    table = pa.table({"x": list(range(5))})
    lines = render(table, "table", max_rows=2).splitlines()
    assert lines[2:] == ["0", "1", "(2 rows shown, more not shown: raise --max-rows)"]
    assert render(table, "table", max_rows=None).splitlines()[-1] == "(5 rows)"
    empty = table.slice(0, 0)
    assert render(empty, "table").splitlines() == ["x", "-", "(0 rows)"]
    assert render(empty, "json") == "[]\n"
    assert render(empty, "csv") == "x\n"
    with pytest.raises(ValueError, match="format"):
        render(table, "xml")


def test_json_nested_and_duplicate_names() -> None:
    con = duckdb.connect()
    table = con.sql(
        "SELECT 1 AS a, 2 AS a, [1.5::DECIMAL(4, 2), NULL] AS l, {'k': 'v'} AS s, "
        "MAP {'x': 1} AS m, 'nan'::DOUBLE AS f, INTERVAL '1 month 2 days 3.5 seconds' AS i, "
        "'-0044-03-15'::DATE AS bc, '294247-01-10 04:00:54.775806'::TIMESTAMP AS far, "
        "'-infinity'::TIMESTAMPTZ AS ninf, TIME '01:02:03.5' AS t"
    ).to_arrow_table()
    assert json.loads(render(table, "json")) == [
        {"a": 1, "a_2": 2, "l": ["1.50", None], "s": {"k": "v"}, "m": {"x": 1}, "f": "NaN",
         "i": "P1M2DT3.5S", "bc": "-0044-03-15", "far": "+294247-01-10T04:00:54.775806",
         "ninf": "-infinity", "t": "01:02:03.500"}
    ]  # fmt: skip


# --- the lake ---------------------------------------------------------------------------


def test_views_read_only_listed_files(lake_root: Path) -> None:
    stray_dir = lake.events_dir(lake_root, "2026-01-01", 0)
    on_disk = pq.read_table(stray_dir).num_rows  # what a bare directory glob would count
    assert on_disk == 2 + 10
    assert len(listed_files(lake_root, "events")) == 3  # hours 00, 01, 23
    t = query(lake_root, "SELECT count(*) AS n, sum(input_tokens) AS tokens FROM events")
    assert t.to_pylist() == [{"n": 7, "tokens": Decimal(1000 + 1 + 250_000 + 7 + 20 + 3 + 5)}]
    assert query(lake_root, "SELECT count(*) AS n FROM dlq").to_pylist() == [{"n": 3}]


def test_decimal_sum_is_exact(lake_root: Path) -> None:
    t = query(lake_root, "SELECT sum(cost_usd) AS c, count(cost_usd) AS priced FROM events")
    assert t.schema.field("c").type == pa.decimal128(38, 12)
    assert t.to_pylist() == [{"c": EXPECTED_COST, "priced": 6}]
    assert str(EXPECTED_COST) == "100001.337567890133"  # float could not hold this


def test_partition_columns(lake_root: Path) -> None:
    t = query(
        lake_root,
        "SELECT date, hour, count(*) AS n, bool_and(hour(ts) = hour AND ts::DATE = date) AS ok "
        "FROM events GROUP BY ALL ORDER BY ALL",
    )
    assert t.to_pylist() == [
        {"date": dt.date(2026, 1, 1), "hour": 0, "n": 2, "ok": True},
        {"date": dt.date(2026, 1, 1), "hour": 1, "n": 2, "ok": True},
        {"date": dt.date(2026, 1, 1), "hour": 23, "n": 3, "ok": True},
    ]
    d = query(lake_root, "SELECT date, count(*) AS n FROM dlq GROUP BY date ORDER BY date")
    assert d.to_pylist() == [{"date": dt.date(2026, 1, 1), "n": 2},
                             {"date": dt.date(2026, 1, 2), "n": 1}]  # fmt: skip


def describe(root: Path, view: str) -> list[tuple[str, str]]:
    with open_lake(root) as con:
        return [(r[0], r[1]) for r in con.execute(f"DESCRIBE {view}").fetchall()]


def test_empty_lake(tmp_path: Path, lake_root: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert query(empty, "SELECT count(*) AS n FROM events").to_pylist() == [{"n": 0}]
    assert query(empty, "SELECT count(*) AS n FROM dlq").to_pylist() == [{"n": 0}]
    t = query(empty, "SELECT sum(cost_usd) AS c FROM events")
    assert t.schema.field("c").type == pa.decimal128(38, 12)
    # The empty views have the very columns and types of the views over files.
    for view, schema, parts in (("events", LAKE_EVENTS, EVENTS_PARTITIONS),
                                ("dlq", DLQ, DLQ_PARTITIONS)):  # fmt: skip
        cols = describe(empty, view)
        assert [c for c, _ in cols] == [*schema.names, *(p for p, _ in parts)]
        assert cols == describe(lake_root, view)


def test_missing_lake_and_partition_like_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_lake(tmp_path / "nope")
    bad = tmp_path / "date=2026-01-01" / "lake"
    bad.mkdir(parents=True)
    with pytest.raises(ValueError, match="partition-like"):
        open_lake(bad)


def test_quotes_and_glob_characters_in_lake_path(tmp_path: Path) -> None:
    root = build_lake(tmp_path / "it's [a] lake*")
    # What an unescaped pattern would also match: a decoy lake beside it.
    build_lake(tmp_path / "it's a lake2")
    assert query(root, "SELECT count(*) AS n FROM events").to_pylist() == [{"n": 7}]
    assert query(root, "SELECT sum(cost_usd) AS c FROM events").column(0)[0].as_py() == (EXPECTED_COST)


def test_params(lake_root: Path) -> None:
    sql = "SELECT count(*) AS n FROM events WHERE model = $model AND input_tokens >= $min"
    assert query(lake_root, sql, {"model": "gpt-5", "min": 20}).to_pylist() == [{"n": 2}]
    # Strings (what the CLI binds) are cast where the SQL needs another type.
    assert query(lake_root, sql, {"model": "gpt-5", "min": "6"}).to_pylist() == [{"n": 2}]
    with pytest.raises(duckdb.Error):
        query(lake_root, sql, {"model": "gpt-5"})


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM glob('/*')",
        "COPY (SELECT 1) TO '{tmp}/x.csv'",
        "EXPORT DATABASE '{tmp}/export'",
        "ATTACH '{tmp}/x.duckdb'",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SELECT * FROM read_parquet('https://example.invalid/x.parquet')",
        "SELECT * FROM read_parquet('{stray}')",
        "SELECT * FROM read_parquet('{lake}/events/*/*/*.parquet')",
        "SELECT * FROM '{stray}'",
        "SET enable_external_access = true",
        "SET lock_configuration = false",
        "RESET lock_configuration",
        "SET allowed_paths = ['/etc/passwd']",
        "SET allowed_directories = ['/']",
        "SET autoload_known_extensions = true",
        "SET threads = 1",
        "SET TimeZone = 'America/New_York'",
        "PRAGMA threads = 1",
        "CREATE SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')",
    ],
)
def test_escape_attempts_fail(lake_root: Path, tmp_path: Path, sql: str) -> None:
    stray = lake.events_dir(lake_root, "2026-01-01", 0) / lake.data_file_name(TOPIC, 0, 1000, 1010)
    assert stray.exists()
    sql = sql.format(tmp=tmp_path, lake=lake_root, stray=stray)
    before = sorted(tmp_path.rglob("*"))
    with open_lake(lake_root) as con:
        with pytest.raises(duckdb.Error):
            con.execute(sql).fetchall()
        # The views still work, and the connection is as locked as before.
        assert con.execute("SELECT count(*) FROM events").fetchall() == [(7,)]
        assert con.execute("SELECT current_setting('enable_external_access')").fetchall() == [(False,)]
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_python_objects_are_not_scanned(lake_root: Path) -> None:
    secret = pa.table({"x": [1]})  # noqa: F841  (what a replacement scan would find)
    with open_lake(lake_root) as con, pytest.raises(duckdb.Error):
        con.execute("SELECT * FROM secret").fetchall()


def test_views_see_manifest_at_open(lake_root: Path) -> None:
    with open_lake(lake_root) as con:
        names = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
        assert {"events", "dlq"} <= names


# --- the command line ---------------------------------------------------------------------


def test_cli_json(lake_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(
        capsys, "--lake", str(lake_root), "--format", "json",
        "SELECT model, count(*) AS n, sum(cost_usd) AS cost, min(ts) AS first "
        "FROM events GROUP BY model ORDER BY model",
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert json.loads(out) == [
        {"model": "claude-sonnet-4-5", "n": 3, "cost": "100000.003000000001",
         "first": "2026-01-01T00:05:00.001Z"},
        {"model": "gpt-5", "n": 3, "cost": "1.334567890132", "first": "2026-01-01T01:00:00Z"},
        {"model": "mystery-model", "n": 1, "cost": None, "first": "2026-01-01T01:30:00Z"},
    ]  # fmt: skip


def test_cli_csv_is_default_off_a_terminal(lake_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(
        capsys, "--lake", str(lake_root),
        "SELECT reason, detail, raw FROM dlq ORDER BY kafka_offset LIMIT 1",
    )  # fmt: skip
    assert code == 0
    assert list(csv.reader(io.StringIO(out))) == [
        ["reason", "detail", "raw"],
        ["invalid_utf8", "invalid UTF-8 at byte 7", "{\\x22bad\\xFF"],
    ]


def test_cli_table(lake_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(
        capsys, "--lake", str(lake_root), "--format", "table", "--max-rows", "2",
        "SELECT model, sum(cost_usd) AS cost FROM events GROUP BY model ORDER BY model",
    )  # fmt: skip
    assert code == 0
    assert out.splitlines() == [
        "model                             cost",
        "-----------------  -------------------",
        "claude-sonnet-4-5  100000.003000000001",
        "gpt-5                   1.334567890132",
        "(2 rows shown, more not shown: raise --max-rows)",
    ]


def test_cli_params(lake_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(
        capsys, "--lake", str(lake_root), "--format", "csv",
        "--param", "model=gpt-5", "--param", "since=2026-01-01T12:00:00Z",
        "SELECT count(*) AS n FROM events WHERE model = $model AND ts >= $since",
    )  # fmt: skip
    assert (code, out) == (0, "n\n2\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["SELECT * FROM nope"], "Table with name nope does not exist"),
        (["SELECT * FROM read_csv('/etc/passwd')"], "Permission Error"),
        (["SELECT $x"], "x"),
        (["--param", "1x=2", "SELECT 1"], "NAME=VALUE"),
        (["--param", "novalue", "SELECT 1"], "NAME=VALUE"),
        (["--param", "a=1", "--param", "a=2", "SELECT $a"], "twice"),
        (["--max-rows", "-1", "SELECT 1"], "max-rows"),
        (["   "], "no SQL statement"),
    ],
)
def test_cli_errors_exit_2(
    lake_root: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, _, err = run_cli(capsys, "--lake", str(lake_root), *args)
    assert code == 2
    assert err.startswith("meter query: ")
    assert message in err


def test_cli_missing_lake(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "--lake", str(tmp_path / "nope"), "SELECT 1")
    assert code == 2
    assert "no lake directory" in err
