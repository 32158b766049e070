"""Exact, time-aware pricing of usage events (DESIGN.md section 3).

A catalog (TOML) lists price entries per model with an effective range. An
event is priced with the entry in force at its own `ts`, never today's, so
re-pricing history is reproducible and a batch straddling a price change gets
both prices. Prices have at most 6 decimals in USD per million tokens and are
held as integers of micro-USD per million tokens, which is also the price of
one token in 10^-12 USD: cost = sum(tokens x price) is then an exact integer,
stored as the unscaled value of a decimal128(38, 12). No float ever touches
money.
"""

from __future__ import annotations

import itertools
import os
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from meter.schema import COST_TYPE, EVENTS, PRICED

#: Price keys of a catalog entry and the token column each one prices. reasoning_tokens is
#: not here: it is part of output_tokens, and pricing it again would bill it twice.
BUCKETS: tuple[tuple[str, str], ...] = (
    ("input", "input_tokens"),
    ("output", "output_tokens"),
    ("cache_read", "cache_read_tokens"),
    ("cache_write", "cache_write_tokens"),
    ("cache_write_1h", "cache_write_1h_tokens"),
)
PRICE_KEYS: tuple[str, ...] = tuple(key for key, _ in BUCKETS)
MICRO = 10**6

_TOP_KEYS = ("source", "as_of", "model")
_MODEL_REQUIRED = ("id", "provider", "effective_from", *PRICE_KEYS)
_MODEL_OPTIONAL = ("aliases", "effective_to")
_PRICE = re.compile(r"(-?)(\d+)(?:\.(\d+))?", re.ASCII)
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
_INSTANT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]\d{2}:\d{2})", re.ASCII)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_INT64_MAX = (1 << 63) - 1
_INT64_MIN = -(1 << 63)
_WIDE = pa.decimal256(19, 0)  # holds any int64; products and sums of it cannot overflow
_UNSCALED = pa.decimal128(38, 0)


class CatalogError(ValueError):
    """A catalog that must not be used: the message names the file and the entry."""


@dataclass(frozen=True)
class PriceEntry:
    """One model's prices over [effective_from, effective_to).

    Prices are integers of micro-USD per million tokens (= 10^-12 USD per token).
    `effective_from` is kept as written because it is part of the version id that
    the lake stores beside each cost.
    """

    id: str
    provider: str
    aliases: tuple[str, ...]
    effective_from: str
    effective_from_ms: int
    effective_to_ms: int | None
    input: int
    output: int
    cache_read: int
    cache_write: int
    cache_write_1h: int

    @property
    def version(self) -> str:
        return f"{self.id}@{self.effective_from}"

    @property
    def prices(self) -> tuple[int, ...]:
        """The five prices in BUCKETS order."""
        return tuple(getattr(self, key) for key in PRICE_KEYS)

    def in_force(self, ts_ms: int) -> bool:
        return self.effective_from_ms <= ts_ms and (
            self.effective_to_ms is None or ts_ms < self.effective_to_ms
        )


class Catalog:
    """Validated price entries plus the Arrow lookup arrays that price a batch in a few
    vectorised passes (no Python work per row)."""

    def __init__(self, source: str, as_of: str, entries: Iterable[PriceEntry], name: str = "catalog"):
        self.source = source
        self.as_of = as_of
        self.name = name
        self.entries = tuple(entries)
        self._owner: dict[str, str] = {}
        self._by_id: dict[str, list[PriceEntry]] = {}
        for number, entry in enumerate(self.entries, 1):
            where = f"{name}: model #{number} ({entry.id!r})"
            if entry.effective_to_ms is not None and entry.effective_to_ms <= entry.effective_from_ms:
                raise CatalogError(f"{where}: effective_to is not after effective_from")
            for alias in (entry.id, *entry.aliases):
                owner = self._owner.setdefault(alias, entry.id)
                if owner != entry.id:
                    raise CatalogError(f"{where}: name {alias!r} already belongs to {owner!r}")
            self._by_id.setdefault(entry.id, []).append(entry)
        for history in self._by_id.values():
            history.sort(key=lambda e: e.effective_from_ms)
            for before, after in itertools.pairwise(history):
                if before.effective_to_ms is None or before.effective_to_ms > after.effective_from_ms:
                    # Name the entry that comes later in the file: it is the likely edit.
                    (_, first), (number, last) = sorted(
                        (n, e) for n, e in enumerate(self.entries, 1) if e is before or e is after
                    )
                    raise CatalogError(
                        f"{name}: model #{number} ({last.id!r}): effective range overlaps {first.version}"
                    )
        self._build_arrays()

    def _build_arrays(self) -> None:
        """Entries sorted by (id, effective_from), then a sentinel that is never in force
        and stands for unknown models, so that no lookup array or index holds a null
        (Arrow's take is several times slower with nulls). A row starts at its model's
        first entry and steps to the next one (a last entry points at itself) while that
        one has started by the row's ts."""
        ordered = [e for history in self._by_id.values() for e in history]
        first: dict[str, int] = {}
        following: list[int] = []
        for i, entry in enumerate(ordered):
            first.setdefault(entry.id, i)
            last = i + 1 == len(ordered) or ordered[i + 1].id != entry.id
            following.append(i if last else i + 1)
        self._sentinel = len(ordered)
        self._first = {alias: first[owner] for alias, owner in self._owner.items()}
        self._steps = max((len(h) for h in self._by_id.values()), default=1) - 1
        self._next = pa.array([*following, self._sentinel], pa.int32())
        self._from = pa.array([*(e.effective_from_ms for e in ordered), _INT64_MAX], pa.int64())
        ends = (_INT64_MAX if e.effective_to_ms is None else e.effective_to_ms for e in ordered)
        self._to = pa.array([*ends, _INT64_MIN], pa.int64())
        self._versions = pa.array([*(e.version for e in ordered), ""], pa.string())
        self._prices = [pa.array([*(e.prices[k] for e in ordered), 0], pa.int64()) for k in range(5)]
        self._max_prices = [max((e.prices[k] for e in ordered), default=0) for k in range(5)]

    @classmethod
    def loads(cls, text: str, name: str = "catalog") -> Catalog:
        """Parse and validate catalog TOML; `name` (e.g. the file name) prefixes errors."""
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise CatalogError(f"{name}: not valid TOML: {error}") from None
        _check_keys(doc, _TOP_KEYS, (), name)
        source = _string(doc, "source", name)
        as_of = _string(doc, "as_of", name)
        _instant(as_of, "as_of", name)
        models = doc["model"]
        if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
            raise CatalogError(f"{name}: 'model' must be an array of tables ([[model]])")
        entries = [_entry(table, f"{name}: model #{n}") for n, table in enumerate(models, 1)]
        return cls(source, as_of, entries, name)

    def resolve(self, model: str) -> str | None:
        """The catalog id that `model` names (an id or an alias, exact and case-sensitive)."""
        return self._owner.get(model)

    def entry_at(self, model: str, ts_ms: int) -> PriceEntry | None:
        owner = self.resolve(model)
        history = self._by_id.get(owner, []) if owner is not None else []
        return next((e for e in history if e.in_force(ts_ms)), None)

    def in_force(self, ts_ms: int) -> list[PriceEntry]:
        """Every model's entry in force at ts_ms, by id."""
        found = (self.entry_at(model, ts_ms) for model in sorted(self._by_id))
        return [e for e in found if e is not None]

    def price(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """EVENTS batch -> PRICED batch: `cost_usd` and `price_version` of the entry in force
        at each row's ts, both null where no entry applies (see unknown_mask)."""
        index, in_force = self._entry_index(batch)
        cost = self._cost(batch, index)
        version = pc.take(self._versions, index)
        return pa.RecordBatch.from_arrays(
            [
                *(batch.column(n) for n in EVENTS.names),
                pc.if_else(in_force, cost, pa.scalar(None, COST_TYPE)),
                pc.if_else(in_force, version, pa.scalar(None, pa.string())),
            ],
            schema=PRICED,
        )

    def unknown_mask(self, batch: pa.RecordBatch) -> pa.BooleanArray:
        """True for rows that price() leaves unpriced: a model the catalog does not know,
        or a known one with no entry in force at the row's ts."""
        return pc.invert(self._entry_index(batch)[1])

    def _entry_index(self, batch: pa.RecordBatch) -> tuple[pa.Array, pa.BooleanArray]:
        """Per row, the position of its entry in the lookup arrays and whether that entry
        is in force at the row's ts."""
        models = pc.dictionary_encode(batch.column("model"), null_encoding="encode")
        starts = [self._first.get(m, self._sentinel) for m in models.dictionary.to_pylist()]
        index = pc.take(pa.array(starts, pa.int32()), models.indices)
        ts = batch.column("ts").cast(pa.int64())
        for _ in range(self._steps):
            following = pc.take(self._next, index)
            index = pc.if_else(pc.greater_equal(ts, pc.take(self._from, following)), following, index)
        in_force = pc.and_(
            pc.greater_equal(ts, pc.take(self._from, index)), pc.less(ts, pc.take(self._to, index))
        )
        return index, in_force

    def _cost(self, batch: pa.RecordBatch, index: pa.Array) -> pa.Array:
        """Sum of tokens x price in int64 when the batch's largest counts times the
        catalog's largest prices provably fit (the usual case, and fast); otherwise in
        decimal256, which cannot overflow. The final cast to decimal128 is checked, so an
        out-of-range total raises instead of wrapping."""
        tokens = [batch.column(column) for _, column in BUCKETS]
        bound = sum(_abs_max(t) * top for t, top in zip(tokens, self._max_prices, strict=True))
        total = None
        for count, prices in zip(tokens, self._prices, strict=True):
            price = pc.take(prices, index)
            if bound <= _INT64_MAX:
                term = pc.multiply(count, price)
            else:
                term = pc.multiply(count.cast(_WIDE), price.cast(_WIDE))
            total = term if total is None else pc.add(total, term)
        assert total is not None
        return total.cast(_UNSCALED).view(COST_TYPE)


def load_catalog(path: str | os.PathLike[str] | None = None) -> Catalog:
    """Load a catalog file, or the default catalog shipped with the package when None."""
    if path is None:
        text = resources.files("meter").joinpath("catalog", "default.toml").read_text("utf-8")
        return Catalog.loads(text, "default catalog")
    with open(path, encoding="utf-8") as handle:
        return Catalog.loads(handle.read(), os.fspath(path))


def parse_instant_ms(text: str) -> int:
    """UTC epoch milliseconds of a "YYYY-MM-DD" date (its midnight UTC) or an RFC 3339
    instant with seconds and an offset; digits below the millisecond are truncated, as
    for event timestamps."""
    if not (_DATE.fullmatch(text) or _INSTANT.fullmatch(text)):
        raise ValueError(f"{text!r} is not a YYYY-MM-DD date or an RFC 3339 instant")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a real calendar date or time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def parse_price(text: str) -> int:
    """Micro-USD per million tokens of a decimal string such as "3.75" (at most 6 decimals)."""
    match = _PRICE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a decimal number")
    sign, whole, fraction = match.groups()
    if sign:
        raise ValueError(f"{text!r} is negative")
    if fraction and len(fraction) > 6:
        raise ValueError(f"{text!r} has more than 6 decimals")
    micro = int(whole) * MICRO + int((fraction or "").ljust(6, "0"))
    if micro > _INT64_MAX:
        raise ValueError(f"{text!r} is too large")
    return micro


def format_price(micro: int) -> str:
    """A price in USD per million tokens with at least 2 decimals: 3750000 -> "3.75"."""
    whole, fraction = divmod(micro, MICRO)
    return f"{whole}.{f'{fraction:06d}'.rstrip('0').ljust(2, '0')}"


def format_price_table(catalog: Catalog, at_ms: int) -> str:
    """The entries in force at `at_ms` as an aligned text table, for `meter prices`."""
    moment = (_EPOCH + timedelta(milliseconds=at_ms)).isoformat(timespec="milliseconds")
    header = ("model", "provider", "version", *PRICE_KEYS, "aliases")
    rows = [header] + [
        (e.id, e.provider, e.version, *map(format_price, e.prices), ", ".join(e.aliases))
        for e in sorted(catalog.in_force(at_ms), key=lambda e: (e.provider, e.id))
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    numeric = range(3, 3 + len(PRICE_KEYS))
    lines = [
        "  ".join(
            cell.rjust(w) if i in numeric else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    caption = (
        f"{catalog.source} (as of {catalog.as_of}); USD per million tokens "
        f"in force at {moment.replace('+00:00', 'Z')}"
    )
    return "\n".join([caption, *lines]) + "\n"


def _abs_max(column: pa.Array) -> int:
    extremes = pc.min_max(column)
    return max(abs(extremes["min"].as_py() or 0), abs(extremes["max"].as_py() or 0))


def _check_keys(table: dict[str, Any], required: Sequence[str], optional: Sequence[str], where: str) -> None:
    unknown = sorted(set(table) - set(required) - set(optional))
    if unknown:
        raise CatalogError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}")
    missing = [key for key in required if key not in table]
    if missing:
        raise CatalogError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")


def _string(table: dict[str, Any], key: str, where: str) -> str:
    value = table[key]
    if not isinstance(value, str) or not value:
        raise CatalogError(f"{where}: {key!r} must be a non-empty string")
    return value


def _instant(text: str, key: str, where: str) -> int:
    try:
        return parse_instant_ms(text)
    except ValueError as error:
        raise CatalogError(f"{where}: {key}: {error}") from None


def _entry(table: dict[str, Any], where: str) -> PriceEntry:
    """One [[model]] table, checked field by field; relations between entries are the
    Catalog's to check."""
    if isinstance(table.get("id"), str) and table["id"]:
        where = f"{where} ({table['id']!r})"
    _check_keys(table, _MODEL_REQUIRED, _MODEL_OPTIONAL, where)
    aliases = table.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise CatalogError(f"{where}: 'aliases' must be a list of non-empty strings")
    prices: dict[str, int] = {}
    for key in PRICE_KEYS:
        if not isinstance(table[key], str):
            # A TOML float is already rounded to binary; only the written digits are exact.
            raise CatalogError(f'{where}: {key!r} must be a quoted decimal string like "3.00"')
        try:
            prices[key] = parse_price(table[key])
        except ValueError as error:
            raise CatalogError(f"{where}: {key}: {error}") from None
    effective_from = _string(table, "effective_from", where)
    to = _string(table, "effective_to", where) if "effective_to" in table else None
    return PriceEntry(
        id=_string(table, "id", where),
        provider=_string(table, "provider", where),
        aliases=tuple(aliases),
        effective_from=effective_from,
        effective_from_ms=_instant(effective_from, "effective_from", where),
        effective_to_ms=None if to is None else _instant(to, "effective_to", where),
        **prices,
    )
