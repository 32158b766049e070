"""Exact pricing: hand-computed costs to 10^-12 USD, prices in force at each event's ts,
aliases, unknown models, and every way a catalog must be refused."""

from __future__ import annotations

import random
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from meter.pricing import (
    PRICE_KEYS,
    Catalog,
    CatalogError,
    format_price,
    format_price_table,
    load_catalog,
    parse_instant_ms,
    parse_price,
)
from meter.schema import EVENTS, PRICED, TOKEN_COLUMNS

CATALOG = """
source = "test prices"
as_of = "2026-01-01"

[[model]]
id = "m1"
provider = "acme"
aliases = ["m1-2026-01-01", "acme/m1"]
effective_from = "2026-01-01"
effective_to = "2026-02-01T12:00:00Z"
input = "1.234567"
output = "10"
cache_read = "0.000001"
cache_write = "3.75"
cache_write_1h = "999999.999999"

[[model]]
id = "m1"
provider = "acme"
aliases = ["m1-2026-01-01", "acme/m1"]
effective_from = "2026-02-01T12:00:00Z"
input = "0.5"
output = "2.000001"
cache_read = "0.05"
cache_write = "0.625"
cache_write_1h = "1"

[[model]]
id = "m2"
provider = "other"
effective_from = "2026-01-15T00:00:00+02:00"
effective_to = "2026-03-01"
input = "0"
output = "0.000003"
cache_read = "0"
cache_write = "0"
cache_write_1h = "0"
"""
# Written prices of each version, in BUCKETS order, for Decimal reference computations.
WRITTEN = {
    "m1@2026-01-01": ("1.234567", "10", "0.000001", "3.75", "999999.999999"),
    "m1@2026-02-01T12:00:00Z": ("0.5", "2.000001", "0.05", "0.625", "1"),
    "m2@2026-01-15T00:00:00+02:00": ("0", "0.000003", "0", "0", "0"),
}
CHANGE_MS = parse_instant_ms("2026-02-01T12:00:00Z")
JAN_10 = parse_instant_ms("2026-01-10")
TOKENS = (1_000_001, 7, 3, 11, 13)  # input, output, cache_read, cache_write, cache_write_1h


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.loads(CATALOG, "test.toml")


def events(*rows: tuple[str, int, tuple[int, ...]]) -> pa.RecordBatch:
    """(model, ts_ms, five token counts) rows; reasoning_tokens is 5 everywhere."""
    data: dict[str, list[object]] = {name: [None] * len(rows) for name in EVENTS.names}
    data["event_id"] = [f"e{i}" for i in range(len(rows))]
    data["user"] = ["u"] * len(rows)
    data["model"] = [model for model, _, _ in rows]
    data["ts"] = [ts for _, ts, _ in rows]
    for k, column in enumerate(TOKEN_COLUMNS[:5]):
        data[column] = [tokens[k] for _, _, tokens in rows]
    data["reasoning_tokens"] = [5] * len(rows)
    return pa.RecordBatch.from_pydict(data, schema=EVENTS)


def costs(priced: pa.RecordBatch) -> list[Decimal | None]:
    return priced.column("cost_usd").to_pylist()


def test_cost_is_exact_to_a_picodollar(catalog: Catalog) -> None:
    priced = catalog.price(events(("m1", JAN_10, TOKENS)))
    assert priced.schema == PRICED
    # 1000001*1.234567 + 7*10 + 3*0.000001 + 11*3.75 + 13*999999.999999, per million tokens
    assert costs(priced) == [Decimal("14.234679484557")]
    assert priced.column("price_version").to_pylist() == ["m1@2026-01-01"]


def test_reasoning_tokens_are_not_priced_again(catalog: Catalog) -> None:
    batch = events(("m1", JAN_10, TOKENS))
    more = batch.set_column(
        EVENTS.get_field_index("reasoning_tokens"),
        "reasoning_tokens",
        pa.array([7], pa.int64()),
    )
    assert costs(catalog.price(batch)) == costs(catalog.price(more))


def test_each_event_is_priced_at_its_own_ts(catalog: Catalog) -> None:
    priced = catalog.price(
        events(("m1", CHANGE_MS - 1, TOKENS), ("m1", CHANGE_MS, TOKENS), ("m1", JAN_10, TOKENS))
    )
    assert costs(priced) == [
        Decimal("14.234679484557"),
        Decimal("0.500034525007"),
        Decimal("14.234679484557"),
    ]
    assert priced.column("price_version").to_pylist() == [
        "m1@2026-01-01",
        "m1@2026-02-01T12:00:00Z",
        "m1@2026-01-01",
    ]


def test_aliases_resolve_exactly_and_case_sensitively(catalog: Catalog) -> None:
    assert catalog.resolve("m1") == "m1"
    assert catalog.resolve("acme/m1") == "m1"
    assert catalog.resolve("m1-2026-01-01") == "m1"
    assert catalog.resolve("M1") is None
    assert catalog.resolve("m1 ") is None
    priced = catalog.price(
        events(
            ("acme/m1", JAN_10, TOKENS),
            ("m1-2026-01-01", CHANGE_MS, TOKENS),
            ("M1", JAN_10, TOKENS),
        )
    )
    assert costs(priced) == [Decimal("14.234679484557"), Decimal("0.500034525007"), None]
    assert priced.column("price_version").to_pylist() == [
        "m1@2026-01-01",
        "m1@2026-02-01T12:00:00Z",
        None,
    ]


def test_unpriced_rows_are_null_and_counted(catalog: Catalog) -> None:
    m2_start = parse_instant_ms("2026-01-14T22:00:00Z")
    batch = events(
        ("nope", JAN_10, TOKENS),  # not in the catalog
        ("m1", JAN_10 - 20 * 86_400_000, TOKENS),  # before m1's first entry
        ("m2", m2_start - 1, TOKENS),  # 1 ms before m2 starts
        ("m2", m2_start, TOKENS),
        ("m2", parse_instant_ms("2026-03-01"), TOKENS),  # m2 has ended
    )
    priced = catalog.price(batch)
    assert costs(priced) == [None, None, None, Decimal("0.000000000021"), None]
    assert priced.column("price_version").null_count == 4
    mask = catalog.unknown_mask(batch)
    assert mask.to_pylist() == [True, True, True, False, True]
    assert pc.sum(mask).as_py() == 4


def test_huge_counts_and_prices_do_not_wrap() -> None:
    big = Catalog.loads(CATALOG.replace('"999999.999999"', '"100000"'))
    billion = 1_000_000_000
    batch = events(("m1", JAN_10, (billion,) * 5), ("m1", JAN_10, TOKENS))
    # 1e9 * (1.234567 + 10 + 0.000001 + 3.75 + 100000) USD per million tokens
    assert costs(big.price(batch)) == [
        Decimal("100014984.568"),
        Decimal("2.534679484570"),  # the first test's row with cache_write_1h at 100000
    ]


def test_extreme_counts_stay_exact_and_overflow_raises() -> None:
    top = (1 << 63) - 1  # beyond the contract's 1e9, still an int64
    dear = Catalog.loads(CATALOG.replace('"999999.999999"', '"9000000000000"'))
    # top * (1.234567 + 10 + 0.000001 + 3.75 + 9000000000000) USD per million tokens
    assert costs(dear.price(events(("m1", JAN_10, (top,) * 5)))) == [
        Decimal("83010348331831190508475548.894204746376")
    ]
    all_dear = Catalog.loads(catalog_text(dict.fromkeys(PRICE_KEYS, '"9000000000000"')))
    with pytest.raises(pa.ArrowInvalid):  # 4.15e26 USD does not fit decimal128(38, 12)
        all_dear.price(events(("m2", JAN_10, (top,) * 5)))


def test_wide_and_fast_arithmetic_agree(catalog: Catalog) -> None:
    """A row with huge counts forces the decimal path; the small rows must come out the same."""
    rows = [("m1", JAN_10, TOKENS), ("m2", JAN_10 + 5 * 86_400_000, (9, 8, 7, 6, 5))]
    fast = costs(catalog.price(events(*rows)))
    wide = costs(catalog.price(events(*rows, ("m1", JAN_10, (10**12,) * 5))))
    assert wide[:2] == fast


def test_sum_over_a_batch_matches_decimal_reference(catalog: Catalog) -> None:
    rng = random.Random(20260101)
    start, end = parse_instant_ms("2025-12-25"), parse_instant_ms("2026-03-05")
    rows = [
        (
            rng.choice(["m1", "acme/m1", "m1-2026-01-01", "m2", "unknown"]),
            rng.randrange(start, end),
            tuple(rng.choice([0, 1, rng.randrange(10**9 + 1)]) for _ in range(5)),
        )
        for _ in range(3000)
    ]
    priced = catalog.price(events(*rows))
    expected: list[Decimal | None] = []
    for model, ts, tokens in rows:
        entry = catalog.entry_at(model, ts)
        if entry is None:
            expected.append(None)
            continue
        prices = WRITTEN[entry.version]
        total = sum(Decimal(p) * n for p, n in zip(prices, tokens, strict=True)) / 10**6
        expected.append(total.quantize(Decimal("1e-12")))
    assert costs(priced) == expected
    assert pc.sum(priced.column("cost_usd")).as_py() == sum(e for e in expected if e is not None)
    assert catalog.unknown_mask(events(*rows)).to_pylist() == [e is None for e in expected]


def test_empty_batch(catalog: Catalog) -> None:
    priced = catalog.price(events())
    assert priced.num_rows == 0 and priced.schema == PRICED


def test_lookup_helpers(catalog: Catalog) -> None:
    before = catalog.entry_at("acme/m1", CHANGE_MS - 1)
    after = catalog.entry_at("m1", CHANGE_MS)
    assert before is not None and before.version == "m1@2026-01-01"
    assert after is not None and after.version == "m1@2026-02-01T12:00:00Z"
    assert after.prices == (500_000, 2_000_001, 50_000, 625_000, 1_000_000)
    assert catalog.entry_at("m1", JAN_10 - 30 * 86_400_000) is None
    assert [e.version for e in catalog.in_force(CHANGE_MS)] == [
        "m1@2026-02-01T12:00:00Z",
        "m2@2026-01-15T00:00:00+02:00",
    ]


def test_parse_helpers() -> None:
    assert parse_instant_ms("1970-01-02") == 86_400_000
    assert parse_instant_ms("1970-01-01T01:00:00.1239Z") == 3_600_123
    assert parse_instant_ms("1970-01-01T01:00:00+01:00") == 0
    assert parse_price("0.000001") == 1
    assert parse_price("15") == 15_000_000
    assert format_price(75_000) == "0.075"
    assert format_price(15_000_000) == "15.00"


def test_price_table(catalog: Catalog) -> None:
    table = format_price_table(catalog, CHANGE_MS - 1)
    lines = table.splitlines()
    assert lines[0].startswith("test prices (as of 2026-01-01)")
    assert lines[0].endswith("2026-02-01T11:59:59.999Z")
    assert lines[1].split() == [
        "model",
        "provider",
        "version",
        "input",
        "output",
        "cache_read",
        "cache_write",
        "cache_write_1h",
        "aliases",
    ]
    assert lines[2].split() == [
        "m1",
        "acme",
        "m1@2026-01-01",
        "1.234567",
        "10.00",
        "0.000001",
        "3.75",
        "999999.999999",
        "m1-2026-01-01,",
        "acme/m1",
    ]
    assert lines[3].split()[:4] == ["m2", "other", "m2@2026-01-15T00:00:00+02:00", "0.00"]
    # price columns are right-aligned under their headers
    assert lines[1].index("cache_write_1h") + 14 == lines[2].index("999999.999999") + 13


# --- the default catalog ----------------------------------------------------------------


def test_default_catalog_prices_known_models_exactly() -> None:
    default = load_catalog(None)
    oct_1 = parse_instant_ms("2025-10-01")
    batch = events(
        ("claude-sonnet-4-5-20250929", oct_1, (1000, 500, 2000, 100, 10)),
        ("gpt-5", oct_1, (12345, 678, 9000, 0, 0)),
        ("gemini-2.5-pro", oct_1, (200_000, 1, 3, 0, 0)),
        ("deepseek-chat", oct_1, (0, 0, 1, 0, 0)),
        ("o3", parse_instant_ms("2025-06-09T23:59:59.999Z"), (1_000_000, 0, 0, 0, 0)),
        ("o3-2025-04-16", parse_instant_ms("2025-06-10"), (1_000_000, 0, 0, 0, 0)),
        ("claude-haiku-4-5", parse_instant_ms("2025-10-14"), (1, 1, 1, 1, 1)),  # before release
    )
    priced = default.price(batch)
    assert costs(priced) == [
        Decimal("0.011535"),  # 1000*3 + 500*15 + 2000*0.30 + 100*3.75 + 10*6, per million
        Decimal("0.02333625"),  # 12345*1.25 + 678*10 + 9000*0.125
        Decimal("0.250010375"),  # 200000*1.25 + 1*10 + 3*0.125
        Decimal("0.000000028"),
        Decimal("10"),
        Decimal("2"),
        None,
    ]
    assert priced.column("price_version").to_pylist()[4:6] == ["o3@2025-04-16", "o3@2025-06-10"]
    assert default.as_of and default.source


# --- catalogs that must be refused ------------------------------------------------------

M1 = {
    "id": '"m1"',
    "provider": '"acme"',
    "aliases": '["a1"]',
    "effective_from": '"2026-01-01"',
    "input": '"1.00"',
    "output": '"2.00"',
    "cache_read": '"0.10"',
    "cache_write": '"1.25"',
    "cache_write_1h": '"2.00"',
}


def catalog_text(second: dict[str, str | None], top: str = "") -> str:
    """A valid first entry m1, then an entry m2 with `second`'s changes (None deletes)."""
    m2 = {**M1, "id": '"m2"', "aliases": '["a2"]', **second}
    tables = [M1, {k: v for k, v in m2.items() if v is not None}]
    body = "".join(
        "\n[[model]]\n" + "".join(f"{key} = {value}\n" for key, value in table.items()) for table in tables
    )
    return f'source = "s"\nas_of = "2026-01-01"\n{top}{body}'


def test_catalog_text_helper_is_valid() -> None:
    assert Catalog.loads(catalog_text({})).resolve("a2") == "m2"


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ({"id": '"m1"', "aliases": "[]"}, "overlaps m1@2026-01-01"),
        (
            {"id": '"m1"', "aliases": "[]", "effective_from": '"2025-12-01"'},
            "overlaps m1@2026-01-01",
        ),
        ({"input": '"-1.00"'}, "input: '-1.00' is negative"),
        ({"output": '"abc"'}, "output: 'abc' is not a decimal number"),
        ({"output": '"1e3"'}, "not a decimal number"),
        ({"output": '".5"'}, "not a decimal number"),
        ({"output": '" 1.5"'}, "not a decimal number"),
        ({"output": '"NaN"'}, "not a decimal number"),
        ({"output": '"\u0663.00"'}, "not a decimal number"),  # ARABIC-INDIC DIGIT THREE
        ({"cache_read": '"0.0000001"'}, "more than 6 decimals"),
        ({"cache_read": "0.1"}, "'cache_read' must be a quoted decimal string"),
        ({"cache_read": "1"}, "'cache_read' must be a quoted decimal string"),
        ({"inputs": '"1.00"'}, "unknown key(s) 'inputs'"),
        ({"aliases": '["a1"]'}, "name 'a1' already belongs to 'm1'"),
        ({"aliases": '["m1"]'}, "name 'm1' already belongs to 'm1'"),
        ({"cache_write_1h": None}, "missing key(s) 'cache_write_1h'"),
        ({"provider": None, "input": None}, "missing key(s) 'provider', 'input'"),
        ({"effective_to": '"2026-01-01"'}, "effective_to is not after effective_from"),
        ({"effective_to": '"2025-06-01"'}, "effective_to is not after effective_from"),
        ({"effective_from": '"2026-02-30"'}, "not a real calendar date"),
        ({"effective_from": '"2026-13-01"'}, "not a real calendar date"),
        ({"effective_from": '"2026/01/01"'}, "not a YYYY-MM-DD date or an RFC 3339 instant"),
        ({"effective_from": '"2026-01-01T00:00:00"'}, "not a YYYY-MM-DD date or an RFC 3339"),
        ({"effective_from": '"2026-01-01 00:00:00Z"'}, "not a YYYY-MM-DD date or an RFC 3339"),
        ({"effective_from": '"2026-01-01T24:00:00Z"'}, "not a real calendar date"),
        ({"effective_to": "2026-03-01"}, "'effective_to' must be a non-empty string"),
        ({"aliases": '"a2"'}, "'aliases' must be a list of non-empty strings"),
        ({"aliases": '[""]'}, "'aliases' must be a list of non-empty strings"),
        ({"provider": '""'}, "'provider' must be a non-empty string"),
    ],
)
def test_bad_entry_is_refused_by_name(second: dict[str, str | None], message: str) -> None:
    with pytest.raises(CatalogError) as caught:
        Catalog.loads(catalog_text(second), "prices.toml")
    text = str(caught.value)
    entry_id = (second.get("id") or '"m2"').strip('"')
    assert text.startswith(f"prices.toml: model #2 ('{entry_id}')"), text
    assert message in text, text


def test_an_entry_without_id_is_named_by_index() -> None:
    with pytest.raises(CatalogError, match=r"^c: model #2: missing key\(s\) 'id'"):
        Catalog.loads(catalog_text({"id": None}), "c")


def test_an_id_that_is_another_models_alias_is_refused() -> None:
    with pytest.raises(CatalogError, match=r"model #2 \('a1'\): name 'a1' already belongs to 'm1'"):
        Catalog.loads(catalog_text({"id": '"a1"'}), "c")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (catalog_text({}, top='owner = "x"\n'), "c: unknown key(s) 'owner'"),
        (catalog_text({}).replace('source = "s"\n', ""), "c: missing key(s) 'source'"),
        (catalog_text({}).replace('"2026-01-01"\n', '"soon"\n', 1), "c: as_of: 'soon' is not"),
        ('source = "s"\nas_of = "2026-01-01"\nmodel = "m"\n', "'model' must be an array"),
        ('source = "s"\nas_of = "2026-01-01"\n', "c: missing key(s) 'model'"),
        ("source = ", "c: not valid TOML"),
    ],
)
def test_bad_catalog_is_refused(text: str, message: str) -> None:
    with pytest.raises(CatalogError) as caught:
        Catalog.loads(text, "c")
    assert message in str(caught.value)


def test_load_catalog_from_a_file_names_it(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(CATALOG, encoding="utf-8")
    assert load_catalog(good).resolve("acme/m1") == "m1"
    bad = tmp_path / "bad.toml"
    bad.write_text(catalog_text({"input": '"-1"'}), encoding="utf-8")
    with pytest.raises(CatalogError, match=r"bad\.toml: model #2"):
        load_catalog(bad)
