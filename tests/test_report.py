"""meter.report: periods, rows with buckets, exact cost and flags, CSV and JSON that read back
exactly, and an HTML page that works offline and renders its charts in headless Chromium."""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import shutil
import struct
import subprocess
import zlib
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meter import detect, report
from meter.cli import main
from meter.scenario import write_events

UTC = dt.UTC
DAY = dt.date(2026, 3, 10)


@pytest.mark.parametrize(
    ("text", "start", "end"),
    [
        ("2026-03-10", "2026-03-10", "2026-03-10"),
        ("2026-02", "2026-02-01", "2026-02-28"),
        ("2026", "2026-01-01", "2026-12-31"),
        ("2026-W11", "2026-03-09", "2026-03-15"),
        ("2026-03-01..2026-03-05", "2026-03-01", "2026-03-05"),
        ("today", "2026-03-10", "2026-03-10"),
        ("yesterday", "2026-03-09", "2026-03-09"),
        ("this-week", "2026-03-09", "2026-03-15"),
        ("last-week", "2026-03-02", "2026-03-08"),
        ("this-month", "2026-03-01", "2026-03-31"),
        ("last-month", "2026-02-01", "2026-02-28"),
        ("last-7-days", "2026-03-04", "2026-03-10"),
    ],
)
def test_periods(text: str, start: str, end: str) -> None:
    assert report.parse_period(text, today=DAY) == (dt.date.fromisoformat(start), dt.date.fromisoformat(end))


def test_bad_periods() -> None:
    for text in ("2026-13", "soon", "2026-03-05..2026-03-01", "last-0-days"):
        with pytest.raises(ValueError):
            report.parse_period(text, today=DAY)


def events(day: dt.date) -> list[dict[str, Any]]:
    """Two teams; a stuffer in one (flagged by the detectors); a nightly job declared as such."""
    out: list[dict[str, Any]] = []
    for i in range(6):
        for k in range(40):
            out.append(
                {
                    "ts": dt.datetime.combine(day, dt.time(9), UTC) + dt.timedelta(minutes=7 * k + i),
                    "user": f"ml{i}",
                    "team": "acme-ml",
                    "org": "acme",
                    "client": "ide",
                    "prompt_hash": f"{i}-{k}-{day}",
                    "input_tokens": 200 + 37 * k + 11 * i,
                    "output_tokens": 150 + 13 * k,
                    "cache_read_tokens": 9_500 + 400 * k,
                }
            )
    for k in range(80):
        out.append(
            {
                "ts": dt.datetime.combine(day, dt.time(10), UTC) + dt.timedelta(minutes=3 * k),
                "user": "ml-stuffer",
                "team": "acme-ml",
                "org": "acme",
                "client": "ide",
                "prompt_hash": f"s{k}-{day}",
                "input_tokens": 40 + k % 7,
                "output_tokens": 5 + k % 3,
                "cache_read_tokens": 150_000,
            }
        )
    for k in range(30):
        out.append(
            {
                "ts": dt.datetime.combine(day, dt.time(2), UTC) + dt.timedelta(minutes=k),
                "user": "web1",
                "team": "acme-web",
                "org": "acme",
                "client": "batch-job",
                "input_tokens": 1_000,
                "output_tokens": 100,
                "model": "gpt-5-mini",
            }
        )
    out.append({"ts": dt.datetime.combine(day, dt.time(12), UTC), "user": "web1", "team": "acme-web",
                "model": "unknown-model", "input_tokens": 5})  # fmt: skip
    return out


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report") / "lake"
    days = [DAY, DAY + dt.timedelta(days=1)]
    write_events(root, [e for d in days for e in events(d)])
    detect.detect(root, days[0], days[1], trend=False)
    return root


def test_rows_have_buckets_exact_cost_automation_and_flags(lake: Path) -> None:
    rep = report.build_report(lake, DAY, DAY + dt.timedelta(days=1), "user")
    rows = {r["key"]: r for r in rep.rows}
    stuffer = rows["ml-stuffer"]
    assert stuffer["requests"] == 160 and stuffer["cache_read_tokens"] == 160 * 150_000
    assert stuffer["tokens_excl_cache_read"] == stuffer["total_tokens"] - stuffer["cache_read_tokens"]
    assert stuffer["cache_read_share"] > 0.99
    assert {f["detector"] for f in stuffer["flags"]} >= {"context_ratio", "fixed_cache"}
    assert all(f["days"] == 2 and f["summary"] for f in stuffer["flags"])
    assert rows["ml0"]["flags"] == [] and rows["ml0"]["flagged_users"] == 0
    web = rows["web1"]
    assert web["automation_requests"] == 60 and web["unpriced_requests"] == 2
    # gpt-5-mini: 0.25 USD per million input and 2 per million output tokens.
    assert web["cost_usd"] == 60 * (Decimal("0.00025") + Decimal("0.0002"))
    assert rep.rows[0]["key"] == "ml-stuffer"  # sorted by total tokens
    teams = {r["key"]: r for r in report.build_report(lake, DAY, DAY + dt.timedelta(days=1), "team").rows}
    assert teams["acme-ml"]["users"] == 7 and teams["acme-ml"]["flagged_users"] == 1
    assert teams["acme-web"]["cost_usd"] == web["cost_usd"]
    assert sum(d["cost_usd"] for d in rep.daily) == sum(r["cost_usd"] for r in rep.rows)


def test_csv_and_json_round_trip(lake: Path) -> None:
    rep = report.build_report(lake, DAY, DAY + dt.timedelta(days=1), "user")
    again = report.Report.from_json(rep.to_json())
    assert again == rep
    assert report.Report.rows_from_csv(rep.to_csv()) == rep.rows
    out = io.StringIO()
    report.render(rep, "table", out)
    assert "ml-stuffer" in out.getvalue() and "context_ratio" in out.getvalue()


def test_html_is_self_contained(lake: Path) -> None:
    page = report.render_html(report.build_report(lake, DAY, DAY + dt.timedelta(days=1), "team"))
    assert page.count('<svg class="chart"') == 3
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert "<script src" not in page


def test_cli_report_writes_every_format(lake: Path, tmp_path: Path) -> None:
    for fmt in report.FORMATS:
        out = tmp_path / f"r.{fmt}"
        args = ["report", "--lake", str(lake), "--period", f"{DAY}..{DAY + dt.timedelta(days=1)}"]
        assert main([*args, "--by", "team", "--format", fmt, "--out", str(out)]) == 0
        assert out.stat().st_size > 100
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["by"] == "team" and doc["columns"][0] == "key"


# --- headless Chromium ------------------------------------------------------------------------


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium missing: install Debian's chromium package (make system-deps)")


def chromium_args(profile: Path) -> list[str]:
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--hide-scrollbars",
        "--window-size=1100,900",
    ]


def read_png(data: bytes) -> tuple[int, int, int, bytes]:
    """(width, height, channels, raw pixel rows) of an 8-bit non-interlaced RGB/RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    width = height = channels = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
    raw = zlib.decompress(idat)
    stride = width * channels
    out = bytearray()
    prev = bytearray(stride)
    for y in range(height):
        filt = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        if filt == 1:
            for i in range(channels, stride):
                line[i] = (line[i] + line[i - channels]) & 0xFF
        elif filt == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
        elif filt == 3:
            for i in range(stride):
                left = line[i - channels] if i >= channels else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif filt == 4:
            for i in range(stride):
                a = line[i - channels] if i >= channels else 0
                b, c = prev[i], prev[i - channels] if i >= channels else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        out += line
        prev = line
    return width, height, channels, bytes(out)


def ink_share(png: tuple[int, int, int, bytes], box: tuple[int, int, int, int]) -> float:
    """Share of pixels in ``box`` (x, y, w, h) that are not white background."""
    width, height, channels, pixels = png
    x0, y0, w, h = box
    inked = total = 0
    for y in range(max(0, y0), min(height, y0 + h), 2):
        row = pixels[y * width * channels : (y + 1) * width * channels]
        for x in range(max(0, x0), min(width, x0 + w), 2):
            r, g, b = row[x * channels : x * channels + 3]
            total += 1
            inked += r < 235 or g < 235 or b < 235
    return inked / max(1, total)


def test_html_report_renders_its_charts_in_headless_chromium(lake: Path, tmp_path: Path) -> None:
    browser = chromium()
    page = tmp_path / "report.html"
    page.write_text(report.render_html(report.build_report(lake, DAY, DAY + dt.timedelta(days=1), "user")))
    url = page.as_uri()
    dom = subprocess.run(
        [browser, *chromium_args(tmp_path / "profile-dom"), "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    boxes = [tuple(int(v) for v in m.split(",")) for m in re.findall(r'data-box="([\d,]+)"', dom.stdout)]
    assert len(boxes) == 3, "the page script did not run or a chart is missing"
    assert dom.stdout.count("<path") >= 3 + 2 + 2  # lines, stacked bars and flag bars drawn
    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [browser, *chromium_args(tmp_path / "profile-shot"), f"--screenshot={shot}", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    png = read_png(shot.read_bytes())
    assert png[:2] == (1100, 900)
    for box in boxes:
        assert box[2] > 200 and box[3] > 200, box
        share = ink_share(png, box)  # type: ignore[arg-type]
        assert 0.01 < share < 0.9, (box, share)
    # The page's background, away from charts and table, is background.
    assert ink_share(png, (1060, 880, 30, 15)) < 0.05
