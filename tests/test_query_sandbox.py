"""The `meter query` sandbox: escape attempts, limits, the extra views, parquet output.

Every escape attempt runs through the analyst entry points (`query`, `run`,
`export_parquet`, the CLI) and must fail with a clear error while leaving the lake (hashed
whole, file contents, modes and link targets) and a directory outside it unchanged.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_query import EXPECTED_COST, TOPIC, build_lake, run_cli

from meter import lake
from meter.manifest import listed_files
from meter.pricing import load_catalog
from meter.query import (
    DEFAULT_LIMITS,
    PRICES_COLUMNS,
    Limits,
    QueryError,
    QueryOutOfMemory,
    QueryRefused,
    QueryTimeout,
    check_sql,
    export_parquet,
    lake_file,
    lockdown_sql,
    parse_size,
    prices_sql,
    query,
    run,
)


def tree_hash(root: Path) -> str:
    """Every entry under ``root``: path, kind, mode, and content or link target."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            st = path.lstat()
            h.update(f"{path.relative_to(root)}\0{st.st_mode:o}\0".encode())
            if path.is_symlink():
                h.update(os.readlink(path).encode())
            elif path.is_file():
                h.update(path.read_bytes())
    return h.hexdigest()


@dataclass
class Env:
    root: Path  # the lake
    outside: Path  # a directory beside it, with files the sandbox must not read
    listed: Path  # a file the manifest lists
    stray: Path  # a well-named parquet file in the lake that no entry lists
    lake_hash: str = ""
    outside_hash: str = ""

    def rebase(self) -> None:
        """Take the current lake and outside directory as the state the test must keep
        (after a test set something up in them)."""
        self.lake_hash, self.outside_hash = tree_hash(self.root), tree_hash(self.outside)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lake(tmp_path_factory.mktemp("sandbox") / "lake")


@pytest.fixture
def env(template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    root = Path(shutil.copytree(template, tmp_path / "lake", symlinks=True))
    outside = tmp_path / "outside"
    outside.mkdir()
    pq.write_table(pa.table({"secret": ["s3cr3t"]}), outside / "secret.parquet")
    (outside / "secret.json").write_text('{"secret": "s3cr3t"}')
    (outside / "secret.csv").write_text("secret\ns3cr3t\n")
    listed = lake.abs_path(root, listed_files(root, "events")[0])
    stray = lake.events_dir(root, "2026-01-01", 0) / lake.data_file_name(TOPIC, 0, 1000, 1010)
    assert stray.exists()
    work = tmp_path / "cwd"  # where DuckDB would put spill files (.tmp) by default
    work.mkdir()
    monkeypatch.chdir(work)
    e = Env(root, outside, listed, stray)
    e.rebase()
    yield e
    assert tree_hash(root) == e.lake_hash, "the lake changed"
    assert tree_hash(outside) == e.outside_hash, "a file outside the lake changed"
    assert list(work.iterdir()) == [], "something was written in the working directory"


# --- escape attempts: each must fail with its clear error, everything unchanged ----------------

PERMISSION = (duckdb.PermissionException, "file system operations are disabled|Permission Error")
REFUSED = (QueryRefused, "only SELECT statements run here")

ESCAPES: dict[str, tuple[str, tuple[type[Exception], str]]] = {
    # file reads outside the lake
    "read_csv": ("SELECT * FROM read_csv('/etc/passwd')", PERMISSION),
    "read_text": ("SELECT * FROM read_text('/etc/hostname')", PERMISSION),
    "read_blob": ("SELECT * FROM read_blob('/etc/passwd')", PERMISSION),
    "read_json": ("SELECT * FROM read_json('{outside}/secret.json')", PERMISSION),
    "read_parquet": ("SELECT * FROM read_parquet('{outside}/secret.parquet')", PERMISSION),
    "path_as_table": ("SELECT * FROM '{outside}/secret.csv'", PERMISSION),
    "parquet_metadata": ("SELECT * FROM parquet_metadata('{outside}/secret.parquet')", PERMISSION),
    "sniff_csv": ("SELECT * FROM sniff_csv('{outside}/secret.csv')", PERMISSION),
    "glob": ("SELECT * FROM glob('/*')", PERMISSION),
    "dotdot_from_listed_dir": (
        "SELECT * FROM read_parquet('{listed_dir}/../../../../outside/secret.parquet')",
        PERMISSION,
    ),
    "file_url": ("SELECT * FROM read_parquet('file://{outside}/secret.parquet')", PERMISSION),
    "listed_plus_outside": (
        "SELECT * FROM read_parquet(['{listed}', '{outside}/secret.parquet'], union_by_name = true)",
        PERMISSION,
    ),
    "https": (
        "SELECT * FROM read_parquet('https://example.invalid/x.parquet')",
        (duckdb.Error, "disabled|not loaded|Permission|autoload"),
    ),
    "s3": (
        "SELECT * FROM read_parquet('s3://bucket/x.parquet')",
        (duckdb.Error, "disabled|not loaded|Permission|autoload"),
    ),
    # files in the lake that no manifest entry lists
    "unlisted_file": ("SELECT * FROM read_parquet('{stray}')", PERMISSION),
    "lake_glob": ("SELECT count(*) FROM read_parquet('{lake}/events/*/*/*.parquet')", PERMISSION),
    "manifest_json": ("SELECT * FROM read_json_auto('{lake}/_meter/manifest/**/*.json')", PERMISSION),
    # writes
    "copy_out": ("COPY (SELECT 1 AS x) TO '{outside}/x.csv'", REFUSED),
    "copy_over_listed_file": (
        "COPY (SELECT 42 AS x) TO '{listed}' (FORMAT parquet, USE_TMP_FILE false)",
        REFUSED,
    ),
    "copy_view": ("COPY events TO '{outside}/events.parquet' (FORMAT parquet)", REFUSED),
    "export_database": ("EXPORT DATABASE '{outside}/export'", REFUSED),
    "copy_after_select": ("SELECT 1; COPY (SELECT 1) TO '{outside}/y.csv'", REFUSED),
    "explain_analyze_copy": (
        "EXPLAIN ANALYZE COPY (SELECT 1) TO '{outside}/z.csv'",
        (QueryRefused, "EXPLAIN"),
    ),
    "query_function_copy": (
        "SELECT * FROM query('COPY (SELECT 1) TO ''{listed}'' (USE_TMP_FILE false)')",
        (duckdb.ParserException, "SELECT"),
    ),
    "create_table": ("CREATE TABLE t AS SELECT * FROM events", (QueryRefused, "CREATE")),
    # databases
    "attach_file": ("ATTACH '{outside}/x.duckdb' AS x", (QueryRefused, "ATTACH")),
    "attach_memory": ("ATTACH ':memory:' AS m", (QueryRefused, "ATTACH")),
    "detach": ("DETACH memory", (QueryRefused, "DETACH")),
    # extensions
    "install": ("INSTALL httpfs", (QueryRefused, "LOAD")),
    "force_install": ("FORCE INSTALL httpfs FROM 'http://example.invalid'", (QueryRefused, "LOAD")),
    "load": ("LOAD httpfs", (QueryRefused, "LOAD")),
    "load_path": ("LOAD '{outside}/evil.duckdb_extension'", (QueryRefused, "LOAD")),
    # environment
    "getenv": ("SELECT getenv('HOME')", (duckdb.CatalogException, "getenv")),
    # settings
    "set_external_access": ("SET enable_external_access = true", (QueryRefused, "SET")),
    "reset_lock": ("RESET lock_configuration", (QueryRefused, "SET")),
    "set_memory": ("SET memory_limit = '100GB'", (QueryRefused, "SET")),
    "set_temp_directory": ("SET temp_directory = '{outside}/spill'", (QueryRefused, "SET")),
    "pragma": ("PRAGMA threads = 64", (QueryRefused, "PRAGMA")),
    "call": ("CALL pragma_version()", (QueryRefused, "CALL")),
    "create_secret": ("CREATE SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')", (QueryRefused, "CREATE")),
    "pivot_without_in": ("PIVOT events ON model USING count(*)", (QueryRefused, "MULTI.*IN list")),
    # Python objects in the caller's frames
    "replacement_scan": ("SELECT * FROM secret_table", (duckdb.CatalogException, "secret_table")),
}


def fill(sql: str, e: Env) -> str:
    return sql.format(
        outside=e.outside, lake=e.root, listed=e.listed, listed_dir=e.listed.parent, stray=e.stray
    )


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_escape_attempt_fails(env: Env, name: str) -> None:
    sql, (error, message) = ESCAPES[name]
    secret_table = pa.table({"secret": [1]})  # noqa: F841  (what a replacement scan would find)
    with pytest.raises(error, match=message):
        query(env.root, fill(sql, env))


def test_there_are_at_least_30_escape_attempts() -> None:
    assert len(ESCAPES) + len(OTHER_ESCAPE_TESTS) >= 30


@pytest.mark.parametrize(
    "name", ["copy_over_listed_file", "read_csv", "attach_memory", "set_external_access"]
)
def test_escape_attempts_fail_in_the_cli_too(env: Env, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "--lake", str(env.root), fill(ESCAPES[name][0], env))
    assert code == 2 and out == ""
    assert err.startswith("meter query: ")


def test_lockdown_alone_lets_copy_overwrite_a_listed_file(tmp_path: Path) -> None:
    """Why layer 1 exists: with only the lockdown, DuckDB writes to an allowed path."""
    target = tmp_path / "listed.parquet"
    pq.write_table(pa.table({"x": [1]}), target)
    con = duckdb.connect()
    for statement in lockdown_sql([str(target)]):
        con.execute(statement)
    con.execute(f"COPY (SELECT 42 AS x) TO '{target}' (FORMAT csv, USE_TMP_FILE false)")
    assert target.read_bytes() == b"x\n42\n"  # overwritten: check_sql must refuse COPY


def test_the_views_still_read_after_each_refusal(env: Env) -> None:
    for name in ("copy_over_listed_file", "unlisted_file", "set_external_access"):
        with pytest.raises((QueryError, duckdb.Error)):
            query(env.root, fill(ESCAPES[name][0], env))
    t = query(env.root, "SELECT count(*) AS n, sum(cost_usd) AS c FROM events")
    assert t.to_pylist() == [{"n": 7, "c": EXPECTED_COST}]


# --- symlinks in the lake --------------------------------------------------------------------


def test_listed_file_replaced_by_a_symlink_out(env: Env) -> None:
    env.listed.unlink()
    env.listed.symlink_to(env.outside / "secret.parquet")
    env.rebase()
    with pytest.raises(QueryRefused, match="is a symbolic link"):
        query(env.root, "SELECT count(*) FROM dlq")  # any query: the lake is refused at open


def test_partition_directory_replaced_by_a_symlink_out(env: Env) -> None:
    hour = env.listed.parent
    fake = env.outside / "hour"
    shutil.copytree(hour, fake)
    moved = env.outside / "moved-hour"
    hour.rename(moved)
    hour.symlink_to(fake, target_is_directory=True)
    env.rebase()
    with pytest.raises(QueryRefused, match="in the lake is a symbolic link"):
        query(env.root, "SELECT count(*) FROM events")


def test_unlisted_symlink_in_the_lake_is_not_readable(env: Env) -> None:
    link = env.stray.with_name("link.parquet")
    link.symlink_to(env.outside / "secret.parquet")
    env.rebase()
    with pytest.raises(duckdb.PermissionException):
        query(env.root, f"SELECT * FROM read_parquet('{link}')")


def test_missing_listed_file_is_refused_clearly(env: Env) -> None:
    env.listed.unlink()
    env.rebase()
    with pytest.raises(QueryRefused, match="is missing"):
        query(env.root, "SELECT 1")


def test_lake_file_checks_paths(tmp_path: Path) -> None:
    for rel in ("/etc/passwd", "events/../../x.parquet", "events//x.parquet", "_meter/x.json", "x.parquet"):
        with pytest.raises(QueryRefused, match="not a path in the lake"):
            lake_file(tmp_path, rel)
    (tmp_path / "events").mkdir()
    os.mkfifo(tmp_path / "events" / "fifo.parquet")
    with pytest.raises(QueryRefused, match="not a regular file"):
        lake_file(tmp_path, "events/fifo.parquet")


# --- limits ----------------------------------------------------------------------------------

SLOW = "SELECT sum(a.range * b.range) FROM range(1000000) a, range(1000000) b"
HUNGRY = [
    "SELECT count(*) FROM (SELECT i FROM range(40000000) t(i) ORDER BY random())",
    "SELECT count(*) FROM (SELECT i, count(*) FROM range(40000000) t(i) GROUP BY i)",
    "SELECT length(list(i)) FROM range(100000000) t(i)",
]


def test_long_query_hits_the_time_limit(env: Env) -> None:
    with pytest.raises(QueryTimeout, match=r"time limit of 0\.5 s"):
        query(env.root, SLOW, limits=Limits(timeout_s=0.5))


def test_time_limit_covers_streamed_output(env: Env) -> None:
    out = io.StringIO()
    with pytest.raises(QueryTimeout):
        run(env.root, "SELECT * FROM range(1000000000000)", out, fmt="csv", limits=Limits(timeout_s=0.5))
    assert out.getvalue().startswith("range\n0\n1\n")  # it streamed until stopped


@pytest.mark.parametrize("sql", HUNGRY)
def test_memory_hungry_query_hits_the_memory_limit(env: Env, sql: str) -> None:
    # The fixture checks that nothing spilled into the working directory (.tmp).
    with pytest.raises(QueryOutOfMemory, match=r"limit of 64 MiB.*--memory-limit"):
        query(env.root, sql, limits=Limits(memory_limit=64 << 20))


def test_limits_in_the_cli(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "--lake", str(env.root), "--timeout", "0.3", SLOW)
    assert code == 2 and "time limit of 0.3 s" in err
    code, _, err = run_cli(capsys, "--lake", str(env.root), "--memory-limit", "64MiB", HUNGRY[0])
    assert code == 2 and "--memory-limit" in err
    code, _, err = run_cli(capsys, "--lake", str(env.root), "--memory-limit", "lots", "SELECT 1")
    assert code == 2 and "not a size" in err


def test_settings_are_in_force(env: Env) -> None:
    t = query(
        env.root,
        "SELECT current_setting('memory_limit') AS m, current_setting('temp_directory') AS t, "
        "current_setting('max_temp_directory_size') AS s, current_setting('enable_external_access') AS x, "
        "current_setting('lock_configuration') AS l, current_setting('threads') AS th",
        limits=Limits(memory_limit=256 << 20, threads=2),
    )
    assert t.to_pylist() == [{"m": "256.0 MiB", "t": "", "s": "0 bytes", "x": False, "l": True, "th": 2}]


def test_parse_size_and_limits() -> None:
    assert parse_size("1048576") == 1 << 20
    assert parse_size("64MiB") == 64 << 20
    assert parse_size("2 GB") == 2_000_000_000
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("512kb") == 512_000
    for bad in ("", "lots", "-1MB", "1PB", "0", "0.1B"):
        with pytest.raises(ValueError):
            parse_size(bad)
    for over in ({"timeout_s": 0}, {"timeout_s": float("nan")}, {"memory_limit": 1000}, {"threads": 0}):
        with pytest.raises(ValueError):
            Limits(**over)  # type: ignore[arg-type]
    assert DEFAULT_LIMITS.timeout_s == 120 and DEFAULT_LIMITS.memory_limit == 2 << 30


def test_lockdown_sql_limits() -> None:
    stmts = lockdown_sql([], Limits(memory_limit=1 << 20, threads=3))
    assert "SET memory_limit = '1048576B'" in stmts
    assert "SET temp_directory = ''" in stmts and "SET max_temp_directory_size = '0B'" in stmts
    assert "SET threads = 3" in stmts
    assert stmts.index("SET memory_limit = '1048576B'") < stmts.index("SET lock_configuration = true")
    assert stmts[-1] == "SET lock_configuration = true"


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "WITH a AS (SELECT 1) SELECT * FROM a",
        "VALUES (1)",
        "FROM events",
        "DESCRIBE events",
        "SHOW TABLES",
        "SUMMARIZE events",
        "SELECT 1; SELECT 2",
        "PIVOT events ON model IN ('gpt-5') USING count(*)",
    ],
)
def test_check_sql_lets_selects_through(sql: str) -> None:
    check_sql(sql)


def test_check_sql_errors() -> None:
    with pytest.raises(ValueError, match="no SQL statement"):
        check_sql(" ; ")
    with pytest.raises(duckdb.ParserException):
        check_sql("SELEC 1")
    with pytest.raises(QueryRefused, match=r"refused COPY: COPY \(SELECT 1\) TO '/tmp/x.csv'$"):
        check_sql("COPY (SELECT 1) TO '/tmp/x.csv'")


OTHER_ESCAPE_TESTS = (
    test_escape_attempts_fail_in_the_cli_too,
    test_listed_file_replaced_by_a_symlink_out,
    test_partition_directory_replaced_by_a_symlink_out,
    test_unlisted_symlink_in_the_lake_is_not_readable,
    test_long_query_hits_the_time_limit,
    test_time_limit_covers_streamed_output,
    test_memory_hungry_query_hits_the_memory_limit,
)


# --- output files ------------------------------------------------------------------------------


def test_export_parquet(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "result.parquet"
    sql = "SELECT model, sum(cost_usd) AS cost, min(ts) AS first FROM events GROUP BY model ORDER BY model"
    assert export_parquet(env.root, sql, out) == 3
    t = pq.read_table(out)
    assert t.schema.field("cost").type == pa.decimal128(38, 12)
    assert t.column("model").to_pylist() == ["claude-sonnet-4-5", "gpt-5", "mystery-model"]
    assert sum(v for v in t.column("cost").to_pylist() if v is not None) == EXPECTED_COST
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


@pytest.mark.parametrize("where", ["inside", "through_link", "lake_itself"])
def test_output_inside_the_lake_is_refused(env: Env, tmp_path: Path, where: str) -> None:
    link = tmp_path / "to-lake"
    link.symlink_to(env.root, target_is_directory=True)
    target = {
        "inside": env.root / "events" / "result.parquet",
        "through_link": link / "result.parquet",
        "lake_itself": env.root,
    }[where]
    with pytest.raises(QueryRefused, match="inside the lake"):
        export_parquet(env.root, "SELECT 1 AS x", target)
    link.unlink()


def test_export_failure_leaves_no_file(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "r.parquet"
    with pytest.raises(QueryError, match="cannot be written as Parquet"):
        export_parquet(env.root, "SELECT INTERVAL 1 DAY AS i", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "lake", "outside"]


def test_cli_parquet_and_out(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.parquet"
    code, stdout, err = run_cli(capsys, "--lake", str(env.root), "--format", "parquet", "--out", str(out),
                                "SELECT count(*) AS n FROM events")  # fmt: skip
    assert (code, stdout, err) == (0, "", "")
    assert pq.read_table(out).to_pylist() == [{"n": 7}]
    code, _, err = run_cli(capsys, "--lake", str(env.root), "--format", "parquet", "SELECT 1")
    assert code == 2 and "--out" in err
    text = tmp_path / "r.csv"
    code, stdout, _ = run_cli(capsys, "--lake", str(env.root), "--out", str(text), "SELECT 1 AS a")
    assert (code, stdout) == (0, "")
    assert list(csv.reader(io.StringIO(text.read_text()))) == [["a"], ["1"]]
    code, _, err = run_cli(capsys, "--lake", str(env.root), "--out", str(env.root / "x.csv"), "SELECT 1")
    assert code == 2 and "inside the lake" in err


# --- the prices and rollup views ---------------------------------------------------------------


def test_prices_view(env: Env) -> None:
    catalog = load_catalog()
    t = query(env.root, "SELECT * FROM prices")
    assert t.num_rows == len(catalog.entries)
    assert t.schema.names == [c for c, _ in PRICES_COLUMNS]
    entry = catalog.entries[0]
    row = query(env.root, "SELECT * FROM prices WHERE version = $v", {"v": entry.version}).to_pylist()[0]
    assert row["id"] == entry.id and row["provider"] == entry.provider
    assert row["aliases"] == list(entry.aliases)
    assert int(row["effective_from"].timestamp() * 1000) == entry.effective_from_ms
    assert row["input"] == Decimal(entry.input) / 10**6
    assert row["cache_write_1h"] == Decimal(entry.cache_write_1h) / 10**6
    assert t.schema.field("input").type == pa.decimal128(18, 6)


def test_prices_from_another_catalog(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cat = tmp_path / "c.toml"
    cat.write_text(
        'source = "test"\nas_of = "2026-01-01"\n[[model]]\nid = "m"\nprovider = "p"\n'
        'effective_from = "2026-01-01"\neffective_to = "2026-02-01T12:00:00Z"\ninput = "1.5"\n'
        'output = "2"\ncache_read = "0.000001"\ncache_write = "3"\ncache_write_1h = "4"\n'
    )
    code, out, _ = run_cli(capsys, "--lake", str(env.root), "--catalog", str(cat), "--format", "json",
                           "SELECT version, effective_to, cache_read FROM prices")  # fmt: skip
    assert code == 0
    assert out.strip() == (
        '[\n{"version": "m@2026-01-01", "effective_to": "2026-02-01T12:00:00Z", "cache_read": "0.000001"}\n]'
    )


def test_prices_sql_empty_catalog() -> None:
    catalog = load_catalog()
    empty = type(catalog)("s", "2026-01-01", [])
    con = duckdb.connect()
    con.execute(prices_sql(empty))
    assert con.execute("SELECT count(*) FROM prices").fetchall() == [(0,)]
    con.execute(prices_sql(catalog).replace("VIEW prices", "VIEW full_prices"))
    assert con.execute("DESCRIBE prices").fetchall() == con.execute("DESCRIBE full_prices").fetchall()


def test_rollup_views_exist_and_match_events(env: Env) -> None:
    from meter.rollup import build_rollups

    for grain in ("minute", "hour", "day"):
        assert query(env.root, f"SELECT count(*) AS n FROM rollup_{grain}").to_pylist() == [{"n": 0}]
    build_rollups(env.root)
    env.rebase()  # the rollups are the lake's now: queries must leave them as they are
    for grain in ("minute", "hour", "day"):
        t = query(env.root, f"SELECT sum(events) AS n, sum(cost_usd) AS c FROM rollup_{grain}")
        assert t.to_pylist() == [{"n": 7, "c": EXPECTED_COST}]
    t = query(env.root, "SELECT price_versions FROM rollup_day LIMIT 1")
    assert t.schema.field(0).type == pa.list_(pa.string())
    rollup_file = next((env.root / "rollups").rglob("*.parquet"))
    for sql in (f"COPY (SELECT 1) TO '{rollup_file}' (USE_TMP_FILE false)",
                f"SELECT * FROM read_parquet('{rollup_file.parent}/*.parquet')"):  # fmt: skip
        with pytest.raises((QueryError, duckdb.Error)):
            query(env.root, sql)
