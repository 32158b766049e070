"""`meter validate`: check an NDJSON file (one message per line) in bounded memory."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import IO, Any

import orjson

from meter.parser import parse_batch
from meter.pricing import Catalog
from meter.schema import DEFAULT_LATENESS_MS
from meter.totals import Totals

#: Messages per parse call: large enough to amortise the call, small enough to bound memory.
CHUNK_MESSAGES = 65_536


def _numbers(stream: IO[bytes]) -> Iterator[tuple[list[int], list[bytes]]]:
    """Non-blank lines in chunks, with their line numbers (from 1)."""
    numbers: list[int] = []
    lines: list[bytes] = []
    for number, raw in enumerate(stream, start=1):
        line = raw.rstrip(b"\r\n")
        if not line.strip():
            continue
        numbers.append(number)
        lines.append(line)
        if len(lines) == CHUNK_MESSAGES:
            yield numbers, lines
            numbers, lines = [], []
    if lines:
        yield numbers, lines


class _Progress:
    """A one-line progress display on a terminal; silent otherwise."""

    def __init__(self, out: IO[str], total_bytes: int | None):
        self.out = out
        self.enabled = out.isatty()
        self.total = total_bytes
        self.start = time.monotonic()
        self.last = 0.0

    def update(self, done_bytes: int, events: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < 0.25:
            return
        self.last = now
        rate = events / max(now - self.start, 1e-9)
        share = f" {100 * done_bytes / self.total:5.1f}%" if self.total else ""
        self.out.write(f"\r{done_bytes / 1e6:,.0f} MB{share}  {events:,} events  {rate:,.0f}/s ")
        self.out.flush()

    def close(self) -> None:
        if self.enabled:
            self.out.write("\r\033[K")
            self.out.flush()


def validate_stream(
    stream: IO[bytes],
    *,
    catalog: Catalog | None = None,
    rejects_out: IO[bytes] | None = None,
    now_ms: int | None = None,
    lateness_ms: int = DEFAULT_LATENESS_MS,
    total_bytes: int | None = None,
    progress: IO[str] | None = None,
) -> Totals:
    """Parse every line as one message; count accepted events by bucket and rejects by reason."""
    totals = Totals()
    bar = _Progress(sys.stderr if progress is None else progress, total_bytes)
    done = 0
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    for numbers, lines in _numbers(stream):
        result = parse_batch(lines, now_ms=now, lateness_ms=lateness_ms)
        batch = catalog.price(result.batch) if catalog is not None else result.batch
        totals.add_batch(batch)
        totals.add_rejects(Counter(r.reason for r in result.rejects))
        if rejects_out is not None:
            for r in result.rejects:
                record = {
                    "line": numbers[r.message_index],
                    "reason": r.reason,
                    "detail": r.detail,
                    "raw": lines[r.message_index].decode("utf-8", "backslashreplace"),
                }
                rejects_out.write(orjson.dumps(record) + b"\n")
        done += sum(len(line) + 1 for line in lines)
        bar.update(done, totals.events)
    bar.close()
    return totals


def render(totals: Totals, priced: bool) -> str:
    """The human summary printed by `meter validate`."""
    rows: list[tuple[str, Any]] = [("accepted", totals.events), ("rejected", totals.rejected)]
    rows += [(f"  {reason}", n) for reason, n in sorted(totals.rejects.items())]
    rows += [(name, value) for name, value in totals.tokens.items()]
    if priced:
        rows += [("cost_usd", totals.cost_usd), ("unpriced events", totals.unpriced)]
    width = max(len(name) for name, _ in rows)
    return "\n".join(
        f"{name:<{width}}  {value:>24,}" if isinstance(value, int) else f"{name:<{width}}  {value!s:>24}"
        for name, value in rows
    )
