"""Exact running totals of priced events: the numbers `validate`, `gen --json`, the manifest
and the tests compare, so they are computed one way only."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from decimal import Context, Decimal, Inexact
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from meter.schema import TOKEN_COLUMNS

#: One unit of cost_usd's decimal128(38, 12).
COST_QUANTUM = Decimal("0.000000000001")
#: Arithmetic on sums of costs: exact far beyond decimal128(38, 12) (the default context
#: keeps 28 digits and rounds silently); an inexact result raises.
EXACT = Context(prec=200, traps=[Inexact])


@dataclass
class Totals:
    events: int = 0
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOKEN_COLUMNS, 0))
    cost_usd: Decimal = field(default_factory=lambda: Decimal(0).quantize(COST_QUANTUM))
    unpriced: int = 0
    rejects: Counter[str] = field(default_factory=Counter)

    def add_batch(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Add accepted rows; `cost_usd` is summed only where the batch carries it."""
        self.events += batch.num_rows
        if batch.num_rows == 0:
            return
        for name in TOKEN_COLUMNS:
            self.tokens[name] += pc.sum(batch.column(name)).as_py() or 0
        if "cost_usd" in batch.schema.names:
            cost = batch.column("cost_usd")
            self.unpriced += cost.null_count
            total = pc.sum(cost.cast(pa.decimal256(76, 12))).as_py()  # no overflow at 38 digits
            if total is not None:
                self.cost_usd = EXACT.add(self.cost_usd, total)

    def add_rejects(self, reasons: Counter[str] | list[str]) -> None:
        self.rejects.update(reasons)

    @property
    def rejected(self) -> int:
        return sum(self.rejects.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "rejected": self.rejected,
            "rejects": dict(sorted(self.rejects.items())),
            "tokens": dict(self.tokens),
            "cost_usd": format(self.cost_usd, "f"),
            "unpriced": self.unpriced,
        }
