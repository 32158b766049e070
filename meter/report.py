"""`meter report`: a KPI report people can trust, by user or team, over a period.

Each row has the tokens of every bucket, the exact priced cost, declared automation, and
the usage-gaming flags that count in the period with their evidence beside it. Cache
reads are a column of their own and ``tokens_excl_cache_read`` stands next to the total:
they are the cheapest tokens to inflate (a tenth of the input price, and a stuffed
document re-read is all cache reads), so a ranking by raw total tokens rewards exactly
the behaviour the detectors look for (docs/integrity.md).

Formats: ``table`` (a terminal), ``csv`` and ``json`` (both read back exactly with
`Report.from_csv` / `Report.from_json`), and ``html``: one self-contained file with
inline SVG charts (spend over time by team, token mix by bucket, flagged users by
detector), no script or style from anywhere else, so it opens offline.

Usage comes from the rollups where they are up to date with the manifest and from the
manifest-listed event files elsewhere (`meter.budget.usage_sources`); flags from the
stored daily flags (`meter.detect.read_flags`), counted with the policy's ``min_days``.
"""

from __future__ import annotations

import csv
import datetime as dt
import html
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, TextIO

import duckdb

from meter.budget import usage_sources
from meter.detect import Config, counting_flags, evidence_summary, read_flags
from meter.lake import LakePath, abs_path
from meter.query import allowed_paths, glob_escape, lockdown_sql, sql_string

__all__ = ["BY", "COLUMNS", "FORMATS", "Report", "build_report", "parse_period", "render"]

FORMATS: Final = ("table", "csv", "json", "html")
BY: Final = ("user", "team")
_BUCKETS: Final = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "reasoning_tokens",
)
#: Report columns and their types: int, str, decimal (exact string), float, json (flags).
COLUMNS: Final[tuple[tuple[str, str], ...]] = (
    ("key", "str"),
    ("team", "str"),
    ("org", "str"),
    ("users", "int"),
    ("active_days", "int"),
    ("requests", "int"),
    *((b, "int") for b in _BUCKETS),
    ("total_tokens", "int"),
    ("tokens_excl_cache_read", "int"),
    ("cache_read_share", "float"),
    ("cost_usd", "decimal"),
    ("unpriced_requests", "int"),
    ("automation_requests", "int"),
    ("flagged_users", "int"),
    ("flags", "json"),
)
_PALETTE: Final = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip
_TOP_TEAMS: Final = 8


# --- periods ------------------------------------------------------------------------------------


def parse_period(text: str, today: dt.date | None = None) -> tuple[dt.date, dt.date]:
    """A period as inclusive UTC dates. Accepts ``YYYY-MM-DD``, ``YYYY-MM``, ``YYYY``,
    ``YYYY-Www`` (ISO week), ``A..B`` (dates), and ``today``, ``yesterday``,
    ``this-week``, ``last-week``, ``this-month``, ``last-month``, ``last-N-days``."""
    today = today or dt.datetime.now(dt.UTC).date()
    t = text.strip()
    if ".." in t:
        a, b = (dt.date.fromisoformat(x) for x in t.split("..", 1))
        if b < a:
            raise ValueError(f"period {text!r} ends before it starts")
        return a, b
    if t == "today":
        return today, today
    if t == "yesterday":
        return today - dt.timedelta(days=1), today - dt.timedelta(days=1)
    if t in ("this-week", "last-week"):
        monday = today - dt.timedelta(days=today.weekday()) - dt.timedelta(days=7 if t == "last-week" else 0)
        return monday, monday + dt.timedelta(days=6)
    if t in ("this-month", "last-month"):
        first = today.replace(day=1)
        if t == "last-month":
            first = (first - dt.timedelta(days=1)).replace(day=1)
        return first, _month_end(first)
    if m := re.fullmatch(r"last-(\d{1,3})-days", t):
        n = int(m.group(1))
        if n < 1:
            raise ValueError("last-N-days needs N >= 1")
        return today - dt.timedelta(days=n - 1), today
    if m := re.fullmatch(r"(\d{4})-W(\d{2})", t):
        monday = dt.date.fromisocalendar(int(m.group(1)), int(m.group(2)), 1)
        return monday, monday + dt.timedelta(days=6)
    if re.fullmatch(r"\d{4}-\d{2}", t):
        first = dt.date.fromisoformat(t + "-01")
        return first, _month_end(first)
    if re.fullmatch(r"\d{4}", t):
        return dt.date(int(t), 1, 1), dt.date(int(t), 12, 31)
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", t):
        d = dt.date.fromisoformat(t)
        return d, d
    raise ValueError(
        f"period {text!r}: expected YYYY-MM-DD, YYYY-MM, YYYY, YYYY-Www, A..B, today, yesterday, "
        "this-week, last-week, this-month, last-month or last-N-days"
    )


def _month_end(first: dt.date) -> dt.date:
    nxt = (
        first.replace(year=first.year + 1, month=1)
        if first.month == 12
        else first.replace(month=first.month + 1)
    )
    return nxt - dt.timedelta(days=1)


# --- the model ----------------------------------------------------------------------------------


@dataclass
class Report:
    """Rows (dicts keyed by `COLUMNS`), daily spend per team, and the period."""

    start: dt.date
    end: dt.date
    by: str
    rows: list[dict[str, Any]]
    daily: list[dict[str, Any]] = field(default_factory=list)  # {"date", "team", "cost_usd"}
    min_days: int = 2

    def to_json(self) -> str:
        doc = {
            "period": {"start": self.start.isoformat(), "end": self.end.isoformat()},
            "by": self.by,
            "min_days": self.min_days,
            "columns": [name for name, _ in COLUMNS],
            "rows": [{name: _to_json_value(row[name], kind) for name, kind in COLUMNS} for row in self.rows],
            "daily": [
                {"date": d["date"].isoformat(), "team": d["team"], "cost_usd": format(d["cost_usd"], "f")}
                for d in self.daily
            ],
        }
        return json.dumps(doc, ensure_ascii=False, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Report:
        doc = json.loads(text)
        if doc.get("columns") != [name for name, _ in COLUMNS]:
            raise ValueError("not a meter report: unexpected columns")
        rows = [{name: _from_json_value(r[name], kind) for name, kind in COLUMNS} for r in doc["rows"]]
        daily = [
            {"date": dt.date.fromisoformat(d["date"]), "team": d["team"], "cost_usd": Decimal(d["cost_usd"])}
            for d in doc["daily"]
        ]
        period = doc["period"]
        return cls(
            dt.date.fromisoformat(period["start"]),
            dt.date.fromisoformat(period["end"]),
            doc["by"],
            rows,
            daily,
            int(doc["min_days"]),
        )

    def to_csv(self) -> str:
        """The rows only (a spreadsheet's view); the period is in the file name you give it."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([name for name, _ in COLUMNS])
        for row in self.rows:
            writer.writerow([_to_text(row[name], kind) for name, kind in COLUMNS])
        return out.getvalue()

    @staticmethod
    def rows_from_csv(text: str) -> list[dict[str, Any]]:
        reader = csv.reader(io.StringIO(text))
        header = next(reader)
        if header != [name for name, _ in COLUMNS]:
            raise ValueError("not a meter report CSV: unexpected header")
        return [
            {name: _from_text(cell, kind) for (name, kind), cell in zip(COLUMNS, r, strict=True)}
            for r in reader
        ]


def _to_json_value(value: Any, kind: str) -> Any:
    if kind == "decimal":
        return format(value, "f")
    return value


def _from_json_value(value: Any, kind: str) -> Any:
    if kind == "decimal":
        return Decimal(value)
    if kind == "float":
        return float(value)
    return value


def _to_text(value: Any, kind: str) -> str:
    if kind == "decimal":
        return format(value, "f")
    if kind == "float":
        return repr(float(value))
    if kind == "json":
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return str(value)


def _from_text(text: str, kind: str) -> Any:
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    if kind == "decimal":
        return Decimal(text)
    if kind == "json":
        return json.loads(text)
    return text


# --- building -----------------------------------------------------------------------------------


def _usage_sql(rollup_paths: Sequence[str], event_paths: Sequence[str]) -> str:
    tokens = ", ".join(_BUCKETS)
    parts = []
    if rollup_paths:
        files = ", ".join(sql_string(glob_escape(p)) for p in rollup_paths)
        parts.append(
            f'SELECT ts, "user", team, org, client, events, {tokens}, cost_usd, unpriced '
            f"FROM read_parquet([{files}])"
        )
    if event_paths:
        files = ", ".join(sql_string(glob_escape(p)) for p in event_paths)
        parts.append(
            f'SELECT ts, "user", team, org, client, 1::BIGINT AS events, {tokens}, cost_usd, '
            f"(cost_usd IS NULL)::BIGINT AS unpriced FROM read_parquet([{files}])"
        )
    return " UNION ALL ".join(parts)


def build_report(
    lake: LakePath,
    start: dt.date,
    end: dt.date,
    by: str = "user",
    cfg: Config | None = None,
    *,
    source: str = "auto",
) -> Report:
    """The report of [start, end] (UTC dates), rows sorted by total tokens (largest first)."""
    if by not in BY:
        raise ValueError(f"--by must be one of {BY}, got {by!r}")
    if end < start:
        raise ValueError("the period ends before it starts")
    if not Path(lake).is_dir():
        raise FileNotFoundError(f"no lake directory at {os.fspath(lake)}")
    cfg = cfg or Config()
    if source == "auto":
        rollup_rels, event_rels = usage_sources(lake, start, end)
    else:
        rollup_rels, event_rels = [], usage_sources_events(lake, start, end)
    root = Path(os.path.abspath(lake))
    rollup_paths = [os.fspath(root.joinpath(*rel.split("/"))) for rel in rollup_rels]
    event_paths = [os.fspath(abs_path(root, rel)) for rel in event_rels]
    flags = counting_flags(read_flags(lake, start, end, kinds=("day",)), cfg.min_days)
    rows: list[dict[str, Any]] = []
    daily: list[dict[str, Any]] = []
    if rollup_paths or event_paths:
        auto = ", ".join(sql_string(c) for c in cfg.automation_clients) or "NULL"
        key = '"user"' if by == "user" else "coalesce(team, '')"
        con = duckdb.connect(":memory:")
        try:
            for statement in lockdown_sql(allowed_paths([*rollup_paths, *event_paths])):
                con.execute(statement)
            after = end + dt.timedelta(days=1)
            con.execute(
                f"CREATE TEMP TABLE usage AS SELECT * FROM ({_usage_sql(rollup_paths, event_paths)}) "
                f"WHERE ts >= TIMESTAMPTZ '{start} 00:00:00+00' AND ts < TIMESTAMPTZ '{after} 00:00:00+00'"
            )
            sums = ", ".join(f"sum({b})::BIGINT AS {b}" for b in _BUCKETS)
            result = con.execute(
                f"""
                SELECT {key} AS key, coalesce(max(team), '') AS team, coalesce(max(org), '') AS org,
                       count(DISTINCT "user") AS users, count(DISTINCT ts::DATE) AS active_days,
                       sum(events)::BIGINT AS requests, {sums},
                       coalesce(sum(cost_usd), 0) AS cost_usd, sum(unpriced)::BIGINT AS unpriced_requests,
                       coalesce(sum(events) FILTER (WHERE client IN ({auto})), 0)::BIGINT
                         AS automation_requests
                FROM usage GROUP BY 1
                """
            )
            names = [d[0] for d in result.description]
            for values in result.fetchall():
                rows.append(dict(zip(names, values, strict=True)))
            for team, d, cost in con.execute(
                "SELECT coalesce(team, ''), ts::DATE, coalesce(sum(cost_usd), 0) "
                "FROM usage GROUP BY ALL ORDER BY 2, 1"
            ).fetchall():
                daily.append({"date": d, "team": team, "cost_usd": Decimal(cost)})
        finally:
            con.close()
    by_user: dict[str, list[dict[str, Any]]] = {}
    for f in flags:
        by_user.setdefault(f["user"], []).append(f)
    for row in rows:
        row["cost_usd"] = Decimal(row["cost_usd"])
        row["total_tokens"] = sum(int(row[b]) for b in _BUCKETS if b != "reasoning_tokens")
        row["tokens_excl_cache_read"] = row["total_tokens"] - int(row["cache_read_tokens"])
        row["cache_read_share"] = (
            round(row["cache_read_tokens"] / row["total_tokens"], 6) if row["total_tokens"] else 0.0
        )
        if by == "user":
            mine = by_user.get(row["key"], [])
            row["flagged_users"] = 1 if mine else 0
        else:
            mine = [f for f in flags if f["team"] == row["key"]]
            row["flagged_users"] = len({f["user"] for f in mine})
        row["flags"] = [
            {
                "user": f["user"],
                "detector": f["detector"],
                "days": f["days"],
                "score": f["score"],
                "summary": evidence_summary(f["detector"], f["evidence"]),
            }
            for f in sorted(mine, key=lambda f: (-f["score"], f["user"], f["detector"]))
        ]
    rows.sort(key=lambda r: (-r["total_tokens"], r["key"]))
    return Report(start, end, by, rows, daily, cfg.min_days)


def usage_sources_events(lake: LakePath, start: dt.date, end: dt.date) -> list[str]:
    from meter.lake import KIND_EVENTS, parse_rel_path
    from meter.manifest import listed_files

    lo, hi = start.isoformat(), end.isoformat()
    return sorted(r for r in listed_files(lake, KIND_EVENTS) if lo <= parse_rel_path(r).date <= hi)


# --- rendering ---------------------------------------------------------------------------------


def render(report: Report, fmt: str, out: TextIO, *, limit: int | None = None) -> None:
    if fmt == "json":
        out.write(report.to_json())
    elif fmt == "csv":
        out.write(report.to_csv())
    elif fmt == "table":
        _render_table(report, out, limit)
    elif fmt == "html":
        out.write(render_html(report, limit=limit))
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def _flags_text(flags: Sequence[Mapping[str, Any]], by: str) -> str:
    if not flags:
        return ""
    if by == "user":
        return "; ".join(f"{f['detector']} ({f['days']}d, z={f['score']:.1f}): {f['summary']}" for f in flags)
    counts: dict[str, int] = {}
    for f in flags:
        counts[f["detector"]] = counts.get(f["detector"], 0) + 1
    return ", ".join(f"{d}: {n} user{'s' if n > 1 else ''}" for d, n in sorted(counts.items()))


def _render_table(report: Report, out: TextIO, limit: int | None) -> None:
    header = ["rank", report.by, *(["team"] if report.by == "user" else ["users"]), "requests", "total",
              "excl. cache read", "cache read", "output", "cost USD", "automation", "flags"]  # fmt: skip
    body = []
    for i, r in enumerate(report.rows[: limit or None], 1):
        body.append(
            [
                str(i),
                r["key"],
                r["team"] if report.by == "user" else str(r["users"]),
                f"{r['requests']:,}",
                _si(r["total_tokens"]),
                _si(r["tokens_excl_cache_read"]),
                f"{_si(r['cache_read_tokens'])} ({r['cache_read_share']:.0%})",
                _si(r["output_tokens"]),
                f"{r['cost_usd']:,.2f}",
                f"{r['automation_requests']:,}",
                _flags_text(r["flags"], report.by),
            ]
        )
    out.write(
        f"meter report {report.start}..{report.end} by {report.by} (flags count at {report.min_days}+ days)\n"
    )
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    out.write("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip() + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for b in body:
        out.write("  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)).rstrip() + "\n")
    more = len(report.rows) - len(body)
    out.write(f"({len(report.rows)} rows" + (f", {more} not shown)\n" if more > 0 else ")\n"))


# --- HTML and inline SVG -------------------------------------------------------------------------


def svg_lines(
    series: Mapping[str, Sequence[float]], labels: Sequence[str], width: int = 1040, height: int = 260
) -> str:
    """A line chart: one polyline path per series over the x labels, with axes and legend."""
    left, right, top, bottom = 70, 170, 16, 34
    w, h = width - left - right, height - top - bottom
    top_value = max((v for values in series.values() for v in values), default=0.0) or 1.0
    n = max(1, len(labels) - 1)
    parts = [_svg_open(width, height, "spend over time by team")]
    parts += _axes(left, top, w, h, top_value, "USD")
    for i, label in enumerate(labels):
        if len(labels) <= 16 or i % max(1, len(labels) // 8) == 0:
            x = left + w * i / n
            parts.append(_text(x, top + h + 16, label[5:], anchor="middle"))
    for k, (name, values) in enumerate(series.items()):
        color = _PALETTE[k % len(_PALETTE)]
        points = [f"{left + w * i / n:.1f},{top + h - h * v / top_value:.1f}" for i, v in enumerate(values)]
        if len(points) == 1:
            points.append(points[0])
        d = "M" + " L".join(points)
        title = f"<title>{html.escape(name)}</title>"
        parts.append(f'<path d="{d}" fill="none" stroke="{color}" stroke-width="2">{title}</path>')
        parts.append(f'<rect x="{left + w + 12}" y="{top + 14 * k}" width="10" height="10" fill="{color}"/>')
        parts.append(_text(left + w + 26, top + 14 * k + 9, _clip(name, 22)))
    parts.append("</svg>")
    return "".join(parts)


def svg_stacked_bars(
    rows: Sequence[tuple[str, Mapping[str, float]]], keys: Sequence[str], width: int = 510, height: int = 260
) -> str:
    """Horizontal 100% stacked bars: the share of each key per row (the token bucket mix)."""
    left, right, top, bottom = 110, 10, 10, 40
    w = width - left - right
    bar = (height - top - bottom) / max(1, len(rows))
    parts = [_svg_open(width, height, "token mix by bucket")]
    for i, (label, values) in enumerate(rows):
        total = sum(values.values()) or 1.0
        x = float(left)
        y = top + i * bar
        parts.append(_text(left - 6, y + bar * 0.65, _clip(label, 16), anchor="end"))
        for k, key in enumerate(keys):
            share = values.get(key, 0.0) / total
            if share <= 0:
                continue
            bw = w * share
            color = _PALETTE[k % len(_PALETTE)]
            parts.append(
                f'<path d="M{x:.1f},{y + 2:.1f} h{bw:.1f} v{bar - 4:.1f} h{-bw:.1f} Z" fill="{color}">'
                f"<title>{html.escape(label)} {html.escape(key)} {share:.1%}</title></path>"
            )
            x += bw
    for k, key in enumerate(keys):
        x = left + (w / len(keys)) * k
        parts.append(
            f'<rect x="{x:.1f}" y="{height - 26}" width="9" height="9" fill="{_PALETTE[k % len(_PALETTE)]}"/>'
        )
        parts.append(_text(x + 12, height - 18, key.removesuffix("_tokens"), size=9))
    parts.append("</svg>")
    return "".join(parts)


def svg_bars(
    values: Mapping[str, float], width: int = 510, height: int = 260, empty: str = "no flags"
) -> str:
    """Vertical bars, one per key (flagged users per detector)."""
    left, right, top, bottom = 40, 10, 14, 70
    w, h = width - left - right, height - top - bottom
    parts = [_svg_open(width, height, "flagged users by detector")]
    top_value = max(values.values(), default=0.0) or 1.0
    parts += _axes(left, top, w, h, top_value, "")
    if not values:
        parts.append(_text(left + w / 2, top + h / 2, empty, size=12, anchor="middle"))
    step = w / max(1, len(values))
    for i, (key, v) in enumerate(values.items()):
        bh = h * v / top_value
        x = left + i * step + step * 0.15
        color = _PALETTE[i % len(_PALETTE)]
        parts.append(
            f'<path d="M{x:.1f},{top + h:.1f} v{-bh:.1f} h{step * 0.7:.1f} v{bh:.1f} Z" fill="{color}">'
            f"<title>{html.escape(key)}: {v:g}</title></path>"
        )
        cx = x + step * 0.35
        parts.append(
            f'<text x="{cx:.1f}" y="{top + h + 12}" font-size="9" text-anchor="end" '
            f'transform="rotate(-35 {cx:.1f} {top + h + 12})">{html.escape(key)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _box(ident: str, title: str, svg: str) -> str:
    return f'<div class="chart-box" id="{ident}"><h2>{html.escape(title)}</h2>{svg}</div>'


def _text(x: float, y: float, text: str, *, size: int = 10, anchor: str | None = None) -> str:
    where = f' text-anchor="{anchor}"' if anchor else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}"{where}>{html.escape(text)}</text>'


def _svg_open(width: int, height: int, label: str) -> str:
    return (
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(label)}">'
    )


def _axes(left: float, top: float, w: float, h: float, top_value: float, unit: str) -> list[str]:
    out = [
        f'<path d="M{left},{top} V{top + h} H{left + w}" fill="none" stroke="#444" stroke-width="1"/>',
    ]
    for frac in (0.0, 0.5, 1.0):
        y = top + h - h * frac
        out.append(_text(left - 6, y + 3, _si(top_value * frac), anchor="end"))
        if frac:
            out.append(f'<path d="M{left},{y:.1f} H{left + w}" stroke="#ddd" stroke-width="1"/>')
    if unit:
        out.append(f'<text x="4" y="{top + 10}" font-size="10">{unit}</text>')
    return out


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


_CSS: Final = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px}p.note{margin:0 0 12px;color:#555;font-size:12px}
.charts{display:flex;flex-wrap:wrap;gap:10px;margin-bottom:16px}
.chart-box{border:1px solid #ddd;padding:6px}.chart-box h2{font-size:13px;margin:0 0 4px}
table{border-collapse:collapse;font-size:12px}th,td{border:1px solid #ddd;padding:3px 6px;text-align:right}
th{background:#f4f4f4}td.t{text-align:left}td.flags{text-align:left;max-width:420px;color:#8a1c1c}
"""


def render_html(report: Report, *, limit: int | None = None) -> str:
    """The report as one offline HTML page: charts as inline SVG, no external resources."""
    days = [report.start + dt.timedelta(days=i) for i in range((report.end - report.start).days + 1)]
    labels = [d.isoformat() for d in days]
    spend: dict[str, dict[dt.date, float]] = {}
    for d in report.daily:
        spend.setdefault(d["team"] or "(none)", {})[d["date"]] = float(d["cost_usd"])
    totals = sorted(spend, key=lambda t: -sum(spend[t].values()))
    series: dict[str, list[float]] = {t: [spend[t].get(d, 0.0) for d in days] for t in totals[:_TOP_TEAMS]}
    if len(totals) > _TOP_TEAMS:
        series["other teams"] = [sum(spend[t].get(d, 0.0) for t in totals[_TOP_TEAMS:]) for d in days]
    top_rows = report.rows[:10]
    mix = [(r["key"], {b: float(r[b]) for b in _BUCKETS if b != "reasoning_tokens"}) for r in top_rows]
    flagged: dict[str, float] = {}
    seen: set[tuple[str, str]] = set()
    for r in report.rows:
        for f in r["flags"]:
            if (f["user"], f["detector"]) not in seen:
                seen.add((f["user"], f["detector"]))
                flagged[f["detector"]] = flagged.get(f["detector"], 0.0) + 1
    keys = [b for b in _BUCKETS if b != "reasoning_tokens"]
    head = ["#", report.by, "team" if report.by == "user" else "users", "requests", "input", "output",
            "cache read", "cache write", "total", "excl. cache read", "cost USD", "automation",
            "flags and evidence"]  # fmt: skip
    rows_html = []
    for i, r in enumerate(report.rows[: limit or None], 1):
        cells = [
            str(i),
            f'<td class="t">{html.escape(r["key"])}</td>',
            f'<td class="t">{html.escape(r["team"])}</td>'
            if report.by == "user"
            else f"<td>{r['users']:,}</td>",
            f"{r['requests']:,}",
            f"{r['input_tokens']:,}",
            f"{r['output_tokens']:,}",
            f"{r['cache_read_tokens']:,} ({r['cache_read_share']:.0%})",
            f"{r['cache_write_tokens'] + r['cache_write_1h_tokens']:,}",
            f"{r['total_tokens']:,}",
            f"{r['tokens_excl_cache_read']:,}",
            f"{r['cost_usd']:,.2f}",
            f"{r['automation_requests']:,}",
            f'<td class="flags">{html.escape(_flags_text(r["flags"], report.by))}</td>',
        ]
        rows_html.append(
            "<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in cells) + "</tr>"
        )
    title = f"meter KPI report {report.start} .. {report.end} by {report.by}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        '<p class="note">Cache reads are shown apart: they are the cheapest tokens to inflate. '
        f"Flags count when a detector fired on {report.min_days} or more days; each is an anomaly "
        "with evidence for a person to review, not a verdict.</p>"
        '<div class="charts">'
        + _box("chart-spend", "Spend over time by team (USD per day)", svg_lines(series, labels))
        + _box("chart-mix", "Token mix by bucket (top rows)", svg_stacked_bars(mix, keys))
        + _box("chart-flags", "Flagged users by detector", svg_bars(flagged))
        + "</div><table><thead><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join(rows_html)
        + "</tbody></table>"
        # Where each chart lies on the page, for checks of the rendered page (no effect on it).
        "<script>for(const s of document.querySelectorAll('svg.chart')){const r=s.getBoundingClientRect();"
        "s.setAttribute('data-box',[r.left,r.top,r.width,r.height].map(Math.round).join(','));}</script>"
        "</body></html>\n"
    )


def cli(args: Any, out: TextIO) -> int:
    """`meter report` (see meter/cli.py)."""
    from meter.detect import load_config

    cfg = load_config(args.policy) if args.policy else Config()
    start, end = parse_period(args.period)
    report = build_report(args.lake, start, end, args.by, cfg)
    if args.out:
        with open(args.out, "w", encoding="utf-8", newline="") as f:
            render(report, args.format, f, limit=args.limit)
    else:
        render(report, args.format, out, limit=args.limit)
    return 0
