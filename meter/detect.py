"""Usage-gaming detectors: anomalies with evidence for a person to review, never verdicts.

When token usage is a KPI, some people inflate it. Each detector here measures one
*shape* of a user's day that gaming produces and honest work rarely does, and compares
the user with their own team on the same day using robust statistics: the team's
median and MAD (median absolute deviation) of the signal, and the modified z-score
``0.6745 * (x - median) / MAD`` (Iglewicz and Hoaglin), flagged above `Config.z`
(3.5). Two extra guards keep honest work quiet:

* an absolute floor per detector (a repeat share of 50%, a context ratio of 1,500...),
  so a tight team does not turn a small difference into a flag;
* a MAD floor per detector, so a team whose members all score 0 does not divide by 0.

A team with fewer than `Config.min_team_users` users carrying the signal that day is
compared with everyone carrying it that day instead. Volume alone is never a signal:
every detector is a ratio or a shape, the same for a user at 10 or 10,000 requests a
day. A daily firing is a *hit*; a flag *counts* once the same detector hit the same user
on at least `Config.min_days` days (2) within the window considered.

Detectors (each documented in `DETECTORS` and docs/integrity.md): ``repeat_prompt``,
``template``, ``context_ratio``, ``fixed_cache``, ``cadence``, ``active_hours``,
``unattended_agent``, ``deadline_burst`` (daily), and ``trend`` (over a long window,
reported apart because it overlaps honest ramp-ups).

Everything runs in DuckDB SQL over the manifest-listed Parquet files of the days needed
(a day, the two hours either side of it, and for the burst and trend detectors the daily
totals of earlier days). Each day's hits are written to
``LAKE/flags/date=YYYY-MM-DD/day-<digest>.parquet`` (window hits to ``window-<digest>``),
the digest naming what the file was computed from (the input files and the policy);
the file is written to a temp name and renamed, then listed in
``LAKE/_meter/flags/date=YYYY-MM-DD/<kind>.json``, which readers go by (never a glob).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import os
import threading
import time
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Final, Literal, TextIO

import duckdb
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from meter.lake import (
    KIND_EVENTS,
    META_DIR,
    LakePath,
    abs_path,
    fsync_dir,
    parse_rel_path,
    write_bytes_atomic,
    write_parquet_atomic,
)
from meter.manifest import listed_files
from meter.query import EVENTS_PARTITIONS, allowed_paths, lockdown_sql, sql_string, view_sql
from meter.schema import LAKE_EVENTS

__all__ = [
    "DAILY_DETECTORS",
    "DETECTORS",
    "FLAGS",
    "FLAGS_DIR",
    "POLICY_SECTIONS",
    "WINDOW_DETECTORS",
    "Config",
    "DailyDetector",
    "Deadline",
    "DetectResult",
    "Detector",
    "FlagsCollector",
    "PolicyError",
    "counting_flags",
    "detect",
    "detect_day",
    "flag_files",
    "load_config",
    "next_run",
    "parse_policy",
    "rank_users",
    "read_flags",
    "render_ranking",
    "trend_window",
]

FLAGS_DIR: Final = "flags"
#: Top-level tables a policy file may hold: detector settings, review deadlines, budgets.
POLICY_SECTIONS: Final = ("detect", "deadline", "budget")
Kind = Literal["day", "window"]
_KINDS: Final = ("day", "window")
_Z_CAP: Final = 99.0
_MAD_SCALE: Final = 0.6745
_DAY_MS: Final = 86_400_000
_HOUR_MS: Final = 3_600_000

#: One row per hit: a detector firing for a user on a day (or over a window).
FLAGS = pa.schema(
    [
        pa.field("day", pa.date32(), nullable=False),
        pa.field("user", pa.string(), nullable=False),
        pa.field("team", pa.string(), nullable=False),
        pa.field("org", pa.string(), nullable=False),
        pa.field("detector", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),  # modified z against the group
        pa.field("value", pa.float64(), nullable=False),  # the signal, in its own unit
        pa.field("evidence", pa.string(), nullable=False),  # JSON object
        pa.field("window_start", pa.date32(), nullable=False),
        pa.field("window_end", pa.date32(), nullable=False),
        pa.field("policy", pa.string(), nullable=False),  # digest of the settings used
    ]
)


class PolicyError(ValueError):
    """A policy file or setting that cannot be used; the message names it."""


@dataclass(frozen=True)
class Detector:
    """What a detector measures and why honest work does not trip it (docs/integrity.md)."""

    name: str
    signal: str
    unit: str
    threshold: str
    mad_floor: float
    honest: str


DETECTORS: Final[tuple[Detector, ...]] = (
    Detector(
        "repeat_prompt",
        "share of the user-day's requests whose prompt_hash the user already sent that day",
        "share",
        "share >= repeat_min_share (0.5) and z > 3.5",
        0.05,
        "people retry and regenerate (5-15% repeats), but a person does not send the same "
        "prompt hundreds of times; declared automation (evals re-running a prompt set) is excluded",
    ),
    Detector(
        "template",
        "share of the user-day's requests whose uncached input size falls in its template_bands (6) "
        "most common 2%-wide size bands",
        "share",
        "share >= template_min_share (0.5) and z > 3.5",
        0.05,
        "people type prompts of every length (sizes spread over orders of magnitude), and "
        "agent turns carry tool output of every size; a script rotating a few prompts with a "
        "nonce changes every hash but hardly any size",
    ),
    Detector(
        "context_ratio",
        "median over requests of (input + cache reads) per output token, log10",
        "tokens per output token",
        "median ratio >= context_min_ratio (1500) and z > 3.5",
        0.1,
        "agents read large contexts for short tool calls (ratios of 50-600), but to stay "
        "above 1,500 for half of a day's requests a context must be re-sent for a few "
        "tokens of output, which is stuffing",
    ),
    Detector(
        "fixed_cache",
        "share of requests reading the user-day's most common cache_read_tokens value of at "
        "least fixed_cache_min_tokens (32k)",
        "share",
        "count >= fixed_cache_min_count (20), share >= fixed_cache_min_share (0.25) and z > 3.5",
        0.05,
        "a real conversation's or agent's cached context grows every turn, so its cache reads "
        "differ; only the tool's small fixed system prompt repeats exactly (below 32k). "
        "A team that re-reads a shared corpus all day moves its own median",
    ),
    Detector(
        "cadence",
        "quartile dispersion (q3-q1)/(q3+q1) of the gaps between a user's requests on one "
        "client (gaps up to 30 min, at least 50), the most regular client of the day",
        "dispersion (low = machine-regular)",
        "dispersion <= cadence_max_spread (0.2) and z > 3.5 (the z of the negated dispersion)",
        0.05,
        "human think time and model latency make gaps vary several-fold (dispersion 0.4-0.7); "
        "a sleep loop with jitter stays within a few tens of percent. Declared automation "
        "(client batch-job) is excluded",
    ),
    Detector(
        "active_hours",
        "distinct UTC hours of the day with a request (declared automation excluded)",
        "hours",
        "hours >= active_hours_min (20) and z > 3.5",
        1.0,
        "a person works 8-12 hours; even a night owl with an evening session stays well below 20",
    ),
    Detector(
        "unattended_agent",
        "hours of the day with agent requests and no interactive request of the same user in "
        "the same or the unattended_near_hours (2) hours either side",
        "hours",
        "unattended hours >= unattended_min_hours (4), unattended requests >= "
        "unattended_min_requests (50), their share of the day's agent requests >= "
        "unattended_min_share (0.5), and z > 3.5",
        1.0,
        "people launch agents from the IDE or CLI while working and watch them; a long run "
        "left going at the end of the day stays within reach of the last interactive hour "
        "for its first hours, while a farm runs all night with nobody at the keyboard",
    ),
    Detector(
        "deadline_burst",
        "on the burst_days (3) days before a configured deadline: ln of the user's mean "
        "interactive requests per day so far in that window over their median active day of "
        "the same kind (weekday or weekend) in the burst_baseline_days (14) before, both plus "
        "burst_pseudo_requests (5) so a handful of requests is not a burst",
        "ln ratio",
        "ratio >= burst_min_ratio (3) and z > 3.5 against the team's ratios the same day",
        0.1,
        "a whole team crunching before a review raises the team's median ratio with it; agent "
        "runs (a thousand requests from one prompt) are left out, being bursty by nature; users "
        "without burst_baseline_min_days (8) active baseline days (new joiners, people back "
        "from leave) are skipped",
    ),
    Detector(
        "trend",
        "over trend_days (28): slope of ln(interactive requests + 1) per day over weekdays "
        "with activity outside burst windows, and again over the window's second half",
        "ln requests per day",
        "slope >= trend_min_slope (0.03, about 2.3x over 28 days), second-half slope >= half "
        "of it, and z > 3.5 against the team's slopes",
        0.01,
        "reported apart: honest ramp-ups (new joiners, new projects) also grow; the second-half "
        "test drops ramps that have levelled off, not those still under way",
    ),
)
_BY_NAME: Final = {d.name: d for d in DETECTORS}
WINDOW_DETECTORS: Final = ("trend",)
DAILY_DETECTORS: Final = tuple(d.name for d in DETECTORS if d.name not in WINDOW_DETECTORS)


@dataclass(frozen=True)
class Deadline:
    """A review date: the `Config.burst_days` days before ``date`` are a burst window for
    ``teams`` (every team when empty)."""

    name: str
    date: dt.date
    teams: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    """Detector settings; defaults were fixed on the tuning seeds of the evaluation
    harness (benchmarks/bench_detect.py) before the held-out run."""

    z: float = 3.5
    min_days: int = 2
    lookback_days: int = 7
    min_requests: int = 30
    min_team_users: int = 5
    automation_clients: tuple[str, ...] = ("batch-job",)
    agent_clients: tuple[str, ...] = ("agent",)
    interactive_clients: tuple[str, ...] = ("ide", "web", "cli")
    repeat_min_share: float = 0.5
    template_min_share: float = 0.5
    template_bands: int = 6
    template_band: float = 0.02
    context_min_ratio: float = 1500.0
    fixed_cache_min_tokens: int = 32_768
    fixed_cache_min_share: float = 0.25
    fixed_cache_min_count: int = 20
    cadence_min_gaps: int = 50
    cadence_max_spread: float = 0.2
    cadence_max_gap_s: float = 1800.0
    active_hours_min: int = 20
    unattended_near_hours: int = 2
    unattended_min_share: float = 0.5
    unattended_min_requests: int = 50
    unattended_min_hours: int = 4
    burst_days: int = 3
    burst_baseline_days: int = 14
    burst_baseline_min_days: int = 8
    burst_min_ratio: float = 3.0
    burst_pseudo_requests: float = 5.0
    trend_days: int = 28
    trend_min_slope: float = 0.03
    deadlines: tuple[Deadline, ...] = ()

    def __post_init__(self) -> None:
        if not self.z > 0:
            raise PolicyError("detect.z: must be positive")
        for name in (
            "min_days",
            "lookback_days",
            "min_requests",
            "min_team_users",
            "cadence_min_gaps",
            "burst_days",
            "burst_baseline_days",
            "burst_baseline_min_days",
            "unattended_min_requests",
            "unattended_min_hours",
            "fixed_cache_min_count",
            "template_bands",
        ):
            if getattr(self, name) < 1:
                raise PolicyError(f"detect.{name}: must be >= 1")
        if self.min_days > self.lookback_days:
            raise PolicyError("detect.min_days: must not exceed lookback_days")
        if self.trend_days < 14:
            raise PolicyError("detect.trend_days: must be >= 14 (two weeks, for the weekly cycle)")
        if self.unattended_near_hours < 0 or self.unattended_near_hours > 12:
            raise PolicyError("detect.unattended_near_hours: must be 0..12")
        for name in (
            "repeat_min_share",
            "template_min_share",
            "fixed_cache_min_share",
            "unattended_min_share",
        ):
            if not 0 < getattr(self, name) <= 1:
                raise PolicyError(f"detect.{name}: must be in (0, 1]")
        if not 0 < self.template_band < 1:
            raise PolicyError("detect.template_band: must be in (0, 1)")
        if not 0 < self.cadence_max_spread < 1:
            raise PolicyError("detect.cadence_max_spread: must be in (0, 1)")
        if set(self.agent_clients) & set(self.interactive_clients):
            raise PolicyError("detect: a client cannot be both agent and interactive")

    def digest(self) -> str:
        """What a flags file was computed with: changes whenever a setting does."""
        doc = asdict(self)
        doc["deadlines"] = [[d.name, d.date.isoformat(), list(d.teams)] for d in self.deadlines]
        return hashlib.sha256(
            b"meter-detect-v1\n" + orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
        ).hexdigest()

    def burst_deadlines(self, day: dt.date) -> list[Deadline]:
        """Deadlines whose burst window holds ``day``."""
        return [d for d in self.deadlines if d.date - dt.timedelta(days=self.burst_days) <= day < d.date]


# --- policy files ------------------------------------------------------------------------------


def parse_policy(text: str, name: str = "policy") -> dict[str, Any]:
    """A policy TOML document, its top-level keys checked (`POLICY_SECTIONS`)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise PolicyError(f"{name}: not valid TOML: {error}") from None
    unknown = sorted(set(doc) - set(POLICY_SECTIONS))
    if unknown:
        raise PolicyError(f"{name}: unknown section(s) {unknown}; expected {list(POLICY_SECTIONS)}")
    return doc


def _date(value: Any, where: str) -> dt.date:
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise PolicyError(f"{where}: expected a date YYYY-MM-DD, got {value!r}") from None


def _config(doc: Mapping[str, Any], name: str) -> Config:
    settings = doc.get("detect", {})
    if not isinstance(settings, dict):
        raise PolicyError(f"{name}: [detect] must be a table")
    known = {f.name: f for f in fields(Config) if f.name != "deadlines"}
    values: dict[str, Any] = {}
    for key, value in settings.items():
        if key not in known:
            raise PolicyError(f"{name}: detect.{key}: unknown setting")
        default = getattr(Config, key)
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise PolicyError(f"{name}: detect.{key}: expected a list of strings")
            values[key] = tuple(value)
        elif isinstance(default, bool) or not isinstance(value, int | float) or isinstance(value, bool):
            raise PolicyError(f"{name}: detect.{key}: expected a number, got {value!r}")
        elif isinstance(default, int) and not isinstance(value, int):
            raise PolicyError(f"{name}: detect.{key}: expected an integer, got {value!r}")
        else:
            values[key] = type(default)(value)
    deadlines = []
    raw = doc.get("deadline", [])
    if not isinstance(raw, list):
        raise PolicyError(f"{name}: deadline must be an array of tables ([[deadline]])")
    for i, item in enumerate(raw, 1):
        where = f"{name}: deadline #{i}"
        if not isinstance(item, dict) or set(item) - {"name", "date", "teams"} or "date" not in item:
            raise PolicyError(f"{where}: expected keys date (required), name, teams")
        teams = item.get("teams", [])
        if not isinstance(teams, list) or not all(isinstance(t, str) for t in teams):
            raise PolicyError(f"{where}: teams must be a list of strings")
        deadlines.append(
            Deadline(str(item.get("name", f"deadline-{i}")), _date(item["date"], where), tuple(teams))
        )
    try:
        return Config(**values, deadlines=tuple(deadlines))
    except PolicyError as error:
        raise PolicyError(f"{name}: {error}") from None


def load_config(path: str | os.PathLike[str] | None = None, text: str | None = None) -> Config:
    """Detector settings and deadlines from a policy file (defaults when neither is given)."""
    if text is None and path is None:
        return Config()
    if text is None:
        assert path is not None
        try:
            text = Path(path).read_text("utf-8")
        except OSError as error:
            raise PolicyError(f"policy: cannot read {os.fspath(path)}: {error}") from None
    name = os.fspath(path) if path is not None else "policy"
    return _config(parse_policy(text, name), name)


# --- pure: SQL -------------------------------------------------------------------------------


def _in(column: str, values: Sequence[str]) -> str:
    if not values:
        return "false"
    return f"coalesce({column} IN ({', '.join(sql_string(v) for v in values)}), false)"


def _ms(day: dt.date) -> int:
    return (day - dt.date(1970, 1, 1)).days * _DAY_MS


def day_events_sql(cfg: Config, day: dt.date) -> str:
    """``ev``: the rows of the view (the day's files plus the ``near`` hour partitions either
    side, where ``in_day`` is false), reduced to what the detectors read: prompt hashes
    become 64-bit integers, clients three flags, ``hr`` the hour from the day's start."""
    return f"""
CREATE OR REPLACE TEMP TABLE ev AS
SELECT "user" AS u, epoch_ms(ts) AS t, (date - DATE '{day}') * 24 + hour AS hr,
       input_tokens AS inp, output_tokens AS outp, cache_read_tokens AS cr,
       input_tokens + output_tokens + cache_read_tokens + cache_write_tokens + cache_write_1h_tokens AS tok,
       CASE WHEN prompt_hash IS NULL THEN NULL ELSE hash(prompt_hash) END AS ph,
       hash(client) AS c,
       {_in("client", cfg.automation_clients)} AS auto,
       {_in("client", cfg.agent_clients)} AS agent,
       {_in("client", cfg.interactive_clients)} AS inter,
       date = DATE '{day}' AS in_day
FROM events
"""


def users_sql(day: dt.date) -> list[str]:
    """``uh``: requests per user and hour (the near hours included); ``ud``: one row per user
    active on the day, summed from ``uh``, with their team and org (a user seen in several
    that day gets the greatest name)."""
    return [
        """
CREATE OR REPLACE TEMP TABLE uh AS
SELECT u, hr, count(*) AS requests, sum(tok) AS tokens, count(*) FILTER (WHERE agent) AS a,
       count(*) FILTER (WHERE inter) AS i, count(*) FILTER (WHERE NOT auto) AS na
FROM ev GROUP BY u, hr
""",
        f"""
CREATE OR REPLACE TEMP TABLE ud AS
SELECT v.*, coalesce(tm.team, '') AS team, coalesce(tm.org, '') AS org
FROM (SELECT u, sum(requests) AS requests, sum(tokens) AS tokens, sum(na) AS n,
             sum(requests) - sum(na) AS automation_requests, sum(i) AS interactive
      FROM uh WHERE hr >= 0 AND hr < 24 GROUP BY u) v
LEFT JOIN (SELECT "user" AS u, max(team) AS team, max(org) AS org FROM events
           WHERE date = DATE '{day}' GROUP BY 1) tm ON tm.u = v.u
""",
    ]


def signals_sql(cfg: Config, day: dt.date, burst_start: dt.date | None = None) -> str:
    """``sig``: (u, detector, x, value, passes, ev) for every user the detector has a signal
    for; ``x`` grows with suspicion, ``passes`` is the absolute floor, ``ev`` evidence."""
    band = 1.0 / math.log1p(cfg.template_band)
    near = cfg.unattended_near_hours
    enough = f"ud.n >= {cfg.min_requests}"
    max_gap = int(cfg.cadence_max_gap_s * 1000)
    parts = [
        f"""
SELECT u, 'repeat_prompt' AS detector, 1 - d / n AS x, 1 - d / n AS value,
       1 - d / n >= {cfg.repeat_min_share} AS passes,
       MAP {{'requests': n, 'distinct_prompts': d, 'top_prompt_requests': top}} AS ev
FROM (SELECT u, sum(c)::DOUBLE AS n, count(*)::DOUBLE AS d, max(c)::DOUBLE AS top
      FROM (SELECT u, ph, count(*) AS c FROM ev WHERE in_day AND NOT auto AND ph IS NOT NULL GROUP BY u, ph)
      GROUP BY u HAVING sum(c) >= {cfg.min_requests})""",
        f"""
SELECT t.u, 'template', top / ud.n, top / ud.n, top / ud.n >= {cfg.template_min_share},
       MAP {{'requests': ud.n::DOUBLE, 'band_requests': top, 'bands': {cfg.template_bands}::DOUBLE,
             'top_band_input_tokens': coalesce(round(exp(band / {band}) - 1), 0)}}
FROM (SELECT ud.u, greatest(1, coalesce(top, 0))::DOUBLE AS top, band FROM ud LEFT JOIN (
        SELECT u, sum(c) AS top, arg_max(b, c) AS band
        FROM (SELECT u, b, c, row_number() OVER (PARTITION BY u ORDER BY c DESC, b) AS k
              FROM (SELECT u, floor(ln(1 + inp) * {band})::INTEGER AS b, count(*) AS c
                    FROM ev WHERE in_day AND NOT auto GROUP BY u, b HAVING count(*) >= 2))
        WHERE k <= {cfg.template_bands}
        GROUP BY u) m ON m.u = ud.u WHERE {enough}) t JOIN ud ON ud.u = t.u""",
        f"""
SELECT u, 'context_ratio', log10(greatest(r, 1e-9)), r, r >= {cfg.context_min_ratio},
       MAP {{'requests': n, 'median_ratio': r, 'mean_cache_read': mcr, 'mean_output': mo}}
FROM (SELECT u, count(*)::DOUBLE AS n, median((inp + cr) / greatest(outp, 1)) AS r,
             avg(cr) AS mcr, avg(outp) AS mo
      FROM ev WHERE in_day AND NOT auto GROUP BY u HAVING count(*) >= {cfg.min_requests})""",
        f"""
SELECT ud.u, 'fixed_cache', coalesce(top, 0) / ud.n, coalesce(top, 0) / ud.n,
       coalesce(top, 0) >= {cfg.fixed_cache_min_count}
         AND coalesce(top, 0) / ud.n >= {cfg.fixed_cache_min_share},
       MAP {{'requests': ud.n::DOUBLE, 'same_cache_read_requests': coalesce(top, 0)::DOUBLE,
             'cache_read_tokens': coalesce(val, 0)::DOUBLE}}
FROM ud LEFT JOIN (
      SELECT u, max(c) AS top, arg_max(cr, c) AS val
      FROM (SELECT u, cr, count(*) AS c FROM ev
            WHERE in_day AND NOT auto AND cr >= {cfg.fixed_cache_min_tokens} GROUP BY u, cr)
      GROUP BY u) f ON f.u = ud.u
WHERE {enough}""",
        f"""
SELECT u, 'cadence', -min(spread), min(spread), min(spread) <= {cfg.cadence_max_spread},
       arg_min(MAP {{'gaps': gaps, 'q1_s': q1 / 1000, 'median_s': q2 / 1000, 'q3_s': q3 / 1000,
                    'skew': (q3 + q1 - 2 * q2) / greatest(q3 - q1, 1)}}, spread)
FROM (SELECT u, len(g)::DOUBLE AS gaps, g[(len(g) + 3) // 4]::DOUBLE AS q1,
             g[(len(g) + 1) // 2]::DOUBLE AS q2, g[(3 * len(g) + 3) // 4]::DOUBLE AS q3,
             (q3 - q1) / greatest(q3 + q1, 1) AS spread
      FROM (SELECT u, list_sort(list_filter(list_transform(list_zip(ts[2:], ts[:-1]), lambda p: p[1] - p[2]),
                                            lambda x: x > 0 AND x <= {max_gap})) AS g
            FROM (SELECT u, list(t ORDER BY t) AS ts FROM ev WHERE in_day AND NOT auto
                  GROUP BY u, c HAVING count(*) > {cfg.cadence_min_gaps}))
      WHERE len(g) >= {cfg.cadence_min_gaps})
GROUP BY u""",
        f"""
SELECT uh.u, 'active_hours', h, h, h >= {cfg.active_hours_min},
       MAP {{'requests': ud.n::DOUBLE, 'active_hours': h}}
FROM (SELECT u, count(*)::DOUBLE AS h FROM uh WHERE na > 0 AND hr >= 0 AND hr < 24 GROUP BY u) uh
JOIN ud ON ud.u = uh.u WHERE {enough}""",
        f"""
SELECT ud.u, 'unattended_agent', coalesce(uh, 0), coalesce(uh, 0),
       coalesce(uh >= {cfg.unattended_min_hours} AND un >= {cfg.unattended_min_requests}
                AND un / a >= {cfg.unattended_min_share}, false),
       MAP {{'agent_requests': coalesce(a, 0), 'unattended_requests': coalesce(un, 0),
             'unattended_hours': coalesce(uh, 0), 'unattended_share': coalesce(un / a, 0)}}
FROM ud LEFT JOIN (
      SELECT u, sum(a)::DOUBLE AS a, coalesce(sum(a) FILTER (WHERE near_i = 0), 0)::DOUBLE AS un,
             (count(*) FILTER (WHERE near_i = 0 AND a > 0))::DOUBLE AS uh
      FROM (SELECT u, hr, a, sum(i) OVER (PARTITION BY u ORDER BY hr
                                           RANGE BETWEEN {near} PRECEDING AND {near} FOLLOWING) AS near_i
            FROM uh)
      WHERE hr >= 0 AND hr < 24
      GROUP BY u HAVING sum(a) > 0) x ON x.u = ud.u
WHERE ud.n >= {cfg.min_requests} OR x.a > 0""",
    ]
    if burst_start is not None:
        weekend = "isodow(d) >= 6" if day.isoweekday() >= 6 else "isodow(d) <= 5"
        days = (day - burst_start).days + 1
        k = cfg.burst_pseudo_requests
        parts.append(
            f"""
SELECT ud.u, 'deadline_burst', ln((m + {k}) / (b.med + {k})), (m + {k}) / (b.med + {k}),
       (m + {k}) / (b.med + {k}) >= {cfg.burst_min_ratio},
       MAP {{'interactive_requests': ud.interactive::DOUBLE, 'burst_days_so_far': {days}::DOUBLE,
             'burst_mean_interactive': m, 'baseline_median_interactive': b.med,
             'baseline_days': b.days::DOUBLE, 'tokens': ud.tokens::DOUBLE}}
FROM (SELECT ud.*, (ud.interactive + coalesce(s.sofar, 0)) / {days}::DOUBLE AS m FROM ud
      LEFT JOIN (SELECT u, sum(requests) AS sofar FROM baseline WHERE d >= DATE '{burst_start}' GROUP BY u) s
      ON s.u = ud.u) ud
JOIN (SELECT u, median(requests)::DOUBLE AS med, count(*) AS days
      FROM baseline WHERE requests > 0 AND d < DATE '{burst_start}' AND {weekend} GROUP BY u) b ON b.u = ud.u
JOIN burst_teams bt ON bt.team = ud.team OR bt.team = '*'
WHERE b.days >= {cfg.burst_baseline_min_days} AND b.med > 0"""
        )
    return "CREATE OR REPLACE TEMP TABLE sig AS\n" + "\nUNION ALL\n".join(parts)


def daily_totals_sql(cfg: Config, table: str, d0: dt.date, d1: dt.date) -> str:
    """``table``: tokens and interactive requests per (user, date) over [d0, d1], from the
    events view."""
    interactive = _in("client", cfg.interactive_clients)
    return f"""
CREATE OR REPLACE TEMP TABLE {table} AS
SELECT "user" AS u, date AS d, mode(coalesce(team, '')) AS team, mode(coalesce(org, '')) AS org,
       sum(input_tokens + output_tokens + cache_read_tokens + cache_write_tokens + cache_write_1h_tokens)
         ::DOUBLE AS tokens,
       count(*) FILTER (WHERE {interactive}) AS requests
FROM events WHERE date BETWEEN DATE '{d0}' AND DATE '{d1}' GROUP BY ALL
"""


def trend_signal_sql(cfg: Config, d0: dt.date, d1: dt.date) -> str:
    """``sig`` for the trend detector over the daily totals table ``daily``: the slope of
    ln(interactive requests + 1) per day over weekdays outside any burst window."""
    mid = d0 + dt.timedelta(days=(d1 - d0).days // 2)
    skip = [
        f"(d >= DATE '{d.date - dt.timedelta(days=cfg.burst_days)}' AND d < DATE '{d.date}')"
        for d in cfg.deadlines
        if d.date > d0 and d.date - dt.timedelta(days=cfg.burst_days) <= d1
    ]
    keep = f"NOT ({' OR '.join(skip)})" if skip else "true"
    x = f"(d - DATE '{d0}')::DOUBLE"
    return f"""
CREATE OR REPLACE TEMP TABLE sig AS
SELECT u, 'trend' AS detector, slope AS x, slope AS value,
       slope >= {cfg.trend_min_slope} AND late >= {cfg.trend_min_slope / 2} AS passes,
       MAP {{'slope_per_day': slope, 'second_half_slope': late, 'r2': r2, 'days': days,
             'first_week_requests': w1, 'last_week_requests': w4}} AS ev
FROM (SELECT u, regr_slope(ln(requests + 1), {x}) AS slope,
             regr_slope(ln(requests + 1), {x}) FILTER (WHERE d >= DATE '{mid}') AS late,
             coalesce(regr_r2(ln(requests + 1), {x}), 0) AS r2, count(*)::DOUBLE AS days,
             coalesce(sum(requests) FILTER (WHERE d < DATE '{d0 + dt.timedelta(days=7)}'), 0)::DOUBLE AS w1,
             coalesce(sum(requests) FILTER (WHERE d > DATE '{d1 - dt.timedelta(days=7)}'), 0)::DOUBLE AS w4
      FROM daily WHERE requests > 0 AND isodow(d) <= 5 AND {keep} GROUP BY u
      HAVING count(*) >= {(cfg.trend_days * 5 // 7) // 2}
         AND count(*) FILTER (WHERE d >= DATE '{mid}') >= 4)
WHERE slope IS NOT NULL AND late IS NOT NULL
"""


def scores_sql(cfg: Config, users: str, everything: bool = False) -> str:
    """Hits: each signal's modified z against the user's team (or everyone, when the team
    has fewer than min_team_users with the signal), over the floors. ``everything`` keeps
    every signal, hit or not (for diagnostics and tuning)."""
    floors = " ".join(f"WHEN '{d.name}' THEN {d.mad_floor}" for d in DETECTORS)
    where = (
        "true" if everything else f"passes AND {_MAD_SCALE} * (x - med) / greatest(mad, mad_floor) > {cfg.z}"
    )
    return f"""
WITH s AS (SELECT sig.*, us.team, us.org FROM sig JOIN {users} us USING (u)),
     tstats AS (SELECT team, detector, median(x) AS med, mad(x) AS mad, count(*) AS k FROM s GROUP BY ALL),
     everyone AS (SELECT detector, median(x) AS med, mad(x) AS mad, count(*) AS k FROM s GROUP BY ALL),
     scored AS (
       SELECT s.*, tm.k >= {cfg.min_team_users} AS by_team,
              CASE WHEN tm.k >= {cfg.min_team_users} THEN tm.med ELSE e.med END AS med,
              CASE WHEN tm.k >= {cfg.min_team_users} THEN tm.mad ELSE e.mad END AS mad,
              CASE WHEN tm.k >= {cfg.min_team_users} THEN tm.k ELSE e.k END AS k,
              CASE s.detector {floors} END AS mad_floor
       FROM s JOIN tstats tm USING (team, detector) JOIN everyone e USING (detector))
SELECT u AS "user", team, org, detector,
       least({_Z_CAP}, {_MAD_SCALE} * (x - med) / greatest(mad, mad_floor)) AS score,
       value, ev, by_team, med, mad, k::DOUBLE AS k
FROM scored
WHERE {where}
ORDER BY score DESC, "user", detector
"""


# --- I/O: connections and flags files --------------------------------------------------------


def _event_files(
    lake: LakePath, d0: dt.date, d1: dt.date, near_hours: int = 0, listed: Sequence[str] | None = None
) -> list[str]:
    """Manifest-listed event files (``listed``, read from the manifest when None) of dates
    [d0, d1], plus those of the ``near_hours`` hour partitions before d0 and after d1."""
    lo, hi = d0.isoformat(), d1.isoformat()
    before, after = (d0 - dt.timedelta(days=1)).isoformat(), (d1 + dt.timedelta(days=1)).isoformat()
    out = []
    for rel in listed_files(lake, KIND_EVENTS) if listed is None else listed:
        p = parse_rel_path(rel)
        hour = p.hour or 0
        if (
            lo <= p.date <= hi
            or (p.date == before and hour >= 24 - near_hours)
            or (p.date == after and hour < near_hours)
        ):
            out.append(rel)
    return sorted(out)


def _connect(lake: LakePath, rels: Sequence[str], threads: int | None) -> duckdb.DuckDBPyConnection:
    """Locked down like `meter query`, with ``events`` over exactly ``rels``."""
    paths = [os.fspath(abs_path(lake, rel)) for rel in rels]
    con = duckdb.connect(":memory:")
    try:
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        con.execute("SET preserve_insertion_order = false")
        for statement in lockdown_sql(allowed_paths(paths)):
            con.execute(statement)
        con.execute(view_sql("events", LAKE_EVENTS, EVENTS_PARTITIONS, paths))
    except BaseException:
        con.close()
        raise
    return con


def _flags_rel(day: dt.date, kind: Kind, digest: str) -> str:
    return f"{FLAGS_DIR}/date={day.isoformat()}/{kind}-{digest[:20]}.parquet"


def _record_path(lake: LakePath, day: dt.date, kind: Kind) -> Path:
    return Path(lake) / META_DIR / FLAGS_DIR / f"date={day.isoformat()}" / f"{kind}.json"


def _read_record(lake: LakePath, day: dt.date, kind: Kind) -> dict[str, Any] | None:
    try:
        record = orjson.loads(_record_path(lake, day, kind).read_bytes())
    except FileNotFoundError:
        return None
    if not isinstance(record, dict) or record.get("v") != 1 or record.get("date") != day.isoformat():
        raise ValueError(f"flags record of {day} {kind} is not a v1 record for that date")
    return record


def _check_flags_rel(rel: str) -> str:
    parts = rel.split("/")
    if len(parts) != 3 or parts[0] != FLAGS_DIR or not parts[1].startswith("date=") or ".." in parts:
        raise ValueError(f"not a flags file path: {rel!r}")
    return rel


def write_flags(
    lake: LakePath, day: dt.date, kind: Kind, table: pa.Table, inputs: Sequence[str], policy: str
) -> str:
    """Publish a day's hits: file (temp + rename), then its record (atomic replace), then
    drop the file the record listed before. Returns the new file's relative path.

    A reader goes by the record, so it sees the old file or the new one, never a part.
    Two runs racing on one day both write valid files; the record names the last, and
    the other stays unlisted (never read) until the next run of that day replaces it.
    """
    h = hashlib.sha256(f"meter-flags-v1\n{kind}\n{day}\n{policy}\n".encode())
    for rel in sorted(inputs):
        h.update(f"{rel}\n".encode())
    digest = h.hexdigest()
    rel = _flags_rel(day, kind, digest)
    previous = _read_record(lake, day, kind)
    size = write_parquet_atomic(table.cast(FLAGS), Path(lake) / rel).bytes
    record = {
        "v": 1,
        "date": day.isoformat(),
        "kind": kind,
        "file": rel,
        "rows": table.num_rows,
        "bytes": size,
        "digest": digest,
        "policy": policy,
        "inputs": len(inputs),
        "written_at_ms": time.time_ns() // 1_000_000,
    }
    write_bytes_atomic(orjson.dumps(record, option=orjson.OPT_SORT_KEYS), _record_path(lake, day, kind))
    if previous is not None and previous.get("file") != rel:
        old = Path(lake) / _check_flags_rel(str(previous["file"]))
        try:
            old.unlink()
            fsync_dir(old.parent)
        except FileNotFoundError:
            pass
    return rel


def flag_files(lake: LakePath, d0: dt.date, d1: dt.date, kinds: Iterable[Kind] = _KINDS) -> list[str]:
    """Relative paths of the flags files the records list for days in [d0, d1]."""
    root = Path(lake) / META_DIR / FLAGS_DIR
    out: list[str] = []
    if not root.is_dir():
        return out
    for ddir in sorted(root.iterdir()):
        if not ddir.name.startswith("date="):
            continue
        try:
            day = dt.date.fromisoformat(ddir.name.removeprefix("date="))
        except ValueError:
            continue
        if d0 <= day <= d1:
            for kind in kinds:
                record = _read_record(lake, day, kind)
                if record is not None:
                    out.append(_check_flags_rel(str(record["file"])))
    return out


def read_flags(lake: LakePath, d0: dt.date, d1: dt.date, kinds: Iterable[Kind] = _KINDS) -> pa.Table:
    """Every stored hit of days in [d0, d1] (schema `FLAGS`), from the listed files only."""
    tables = [pq.read_table(Path(lake) / rel, schema=FLAGS) for rel in flag_files(lake, d0, d1, kinds)]
    return pa.concat_tables(tables) if tables else FLAGS.empty_table()


# --- running --------------------------------------------------------------------------------


def _hits_table(
    rows: pa.Table, day: dt.date, w0: dt.date, w1: dt.date, kind: Kind, policy: str, cfg: Config
) -> pa.Table:
    evidence = []
    for ev, by_team, med, mad, k, detector in zip(
        rows.column("ev").to_pylist(),
        rows.column("by_team").to_pylist(),
        rows.column("med").to_pylist(),
        rows.column("mad").to_pylist(),
        rows.column("k").to_pylist(),
        rows.column("detector").to_pylist(),
        strict=True,
    ):
        doc = {key: _clean(v) for key, v in (ev or [])} if isinstance(ev, list) else dict(ev or {})
        doc["compared_with"] = "team" if by_team else "everyone"
        doc["group_users"] = int(k)
        doc["group_median"] = _clean(med)
        doc["group_mad"] = _clean(mad)
        doc["mad_floor"] = _BY_NAME[detector].mad_floor
        doc["z_threshold"] = cfg.z
        evidence.append(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS).decode())
    n = rows.num_rows
    return pa.table(
        {
            "day": pa.array([day] * n, pa.date32()),
            "user": rows.column("user"),
            "team": rows.column("team"),
            "org": rows.column("org"),
            "detector": rows.column("detector"),
            "kind": pa.array([kind] * n, pa.string()),
            "score": pc.round(rows.column("score"), 3),
            "value": rows.column("value"),
            "evidence": pa.array(evidence, pa.string()),
            "window_start": pa.array([w0] * n, pa.date32()),
            "window_end": pa.array([w1] * n, pa.date32()),
            "policy": pa.array([policy[:20]] * n, pa.string()),
        },
        schema=FLAGS,
    )


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return round(value, 6)
    return value


def _burst_setup(con: duckdb.DuckDBPyConnection, cfg: Config, day: dt.date) -> dt.date | None:
    """The first day of the burst window holding ``day`` (None: no deadline near), with
    tables ``baseline`` (daily totals from the baseline's start to the day before) and
    ``burst_teams`` (the teams the deadlines apply to, '*' for all)."""
    start = _burst_start(cfg, day)
    if start is None:
        return None
    b0 = start - dt.timedelta(days=cfg.burst_baseline_days)
    con.execute(daily_totals_sql(cfg, "baseline", b0, day - dt.timedelta(days=1)))
    teams = sorted({t for d in cfg.burst_deadlines(day) for t in (d.teams or ("*",))})
    con.execute("CREATE OR REPLACE TEMP TABLE burst_teams (team VARCHAR)")
    con.executemany("INSERT INTO burst_teams VALUES (?)", [[t] for t in teams])
    return start


def _burst_start(cfg: Config, day: dt.date) -> dt.date | None:
    deadlines = cfg.burst_deadlines(day)
    if not deadlines:
        return None
    return min(d.date for d in deadlines) - dt.timedelta(days=cfg.burst_days)


@dataclass
class DetectResult:
    """What `detect` found and wrote."""

    d0: dt.date
    d1: dt.date
    hits: pa.Table  # every hit of the days run (FLAGS)
    window_hits: pa.Table  # trend hits (FLAGS), empty when the trend was not run
    written: list[str] = field(default_factory=list)
    events: int = 0
    seconds: float = 0.0
    day_seconds: dict[str, float] = field(default_factory=dict)


def detect_day(
    lake: LakePath,
    day: dt.date,
    cfg: Config,
    *,
    threads: int | None = None,
    listed: Sequence[str] | None = None,
    everything: bool = False,
) -> tuple[pa.Table, list[str], int]:
    """The day's hits (FLAGS), the event files they were computed from, and the day's events.
    ``everything``: every signal of every detector, hit or not (for tuning)."""
    start = _burst_start(cfg, day)
    first = day if start is None else min(day, start - dt.timedelta(days=cfg.burst_baseline_days))
    rels = _event_files(lake, first, day, cfg.unattended_near_hours, listed)
    day_rels = [r for r in rels if parse_rel_path(r).date == day.isoformat()]
    if not day_rels:
        return FLAGS.empty_table(), [], 0
    con = _connect(lake, rels, threads)
    try:
        con.execute(day_events_sql(cfg, day))
        for statement in users_sql(day):
            con.execute(statement)
        (events,) = con.execute("SELECT count(*) FROM ev WHERE in_day").fetchone() or (0,)
        con.execute(signals_sql(cfg, day, _burst_setup(con, cfg, day)))
        rows = con.sql(scores_sql(cfg, "ud", everything)).to_arrow_table()
    finally:
        con.close()
    policy = cfg.digest()
    return _hits_table(rows, day, day, day, "day", policy, cfg), rels, int(events)


def trend_window(cfg: Config, end: dt.date) -> tuple[dt.date, dt.date]:
    return end - dt.timedelta(days=cfg.trend_days - 1), end


def detect_trend(
    lake: LakePath,
    end: dt.date,
    cfg: Config,
    *,
    threads: int | None = None,
    listed: Sequence[str] | None = None,
    everything: bool = False,
) -> tuple[pa.Table, list[str]]:
    """Trend hits over the `trend_window` ending ``end`` (FLAGS, kind window)."""
    w0, w1 = trend_window(cfg, end)
    rels = _event_files(lake, w0, w1, 0, listed)
    if not rels:
        return FLAGS.empty_table(), []
    con = _connect(lake, rels, threads)
    try:
        con.execute(daily_totals_sql(cfg, "daily", w0, w1))
        con.execute(
            "CREATE OR REPLACE TEMP TABLE wu AS "
            "SELECT u, mode(team) AS team, mode(org) AS org FROM daily GROUP BY u"
        )
        con.execute(trend_signal_sql(cfg, w0, w1))
        rows = con.sql(scores_sql(cfg, "wu", everything)).to_arrow_table()
    finally:
        con.close()
    return _hits_table(rows, w1, w0, w1, "window", cfg.digest(), cfg), rels


def _days(d0: dt.date, d1: dt.date) -> Iterator[dt.date]:
    for i in range((d1 - d0).days + 1):
        yield d0 + dt.timedelta(days=i)


def detect(
    lake: LakePath,
    d0: dt.date,
    d1: dt.date,
    cfg: Config | None = None,
    *,
    trend: bool = True,
    write: bool = True,
    threads: int | None = None,
) -> DetectResult:
    """Run the daily detectors on each day of [d0, d1] (and the trend over the window that
    ends at d1 when ``trend``), writing each day's hits to the lake when ``write``."""
    if d1 < d0:
        raise ValueError(f"--to {d1} is before --from {d0}")
    cfg = cfg or Config()
    if not Path(lake).is_dir():
        raise FileNotFoundError(f"no lake directory at {os.fspath(lake)}")
    started = time.perf_counter()
    result = DetectResult(d0, d1, FLAGS.empty_table(), FLAGS.empty_table())
    tables = []
    listed = listed_files(lake, KIND_EVENTS)
    for day in _days(d0, d1):
        t = time.perf_counter()
        hits, rels, events = detect_day(lake, day, cfg, threads=threads, listed=listed)
        result.day_seconds[day.isoformat()] = time.perf_counter() - t
        result.events += events
        tables.append(hits)
        if write and rels:
            result.written.append(write_flags(lake, day, "day", hits, rels, cfg.digest()))
    result.hits = pa.concat_tables(tables) if tables else FLAGS.empty_table()
    if trend:
        window_hits, rels = detect_trend(lake, d1, cfg, threads=threads, listed=listed)
        result.window_hits = window_hits
        if write and rels:
            result.written.append(write_flags(lake, d1, "window", window_hits, rels, cfg.digest()))
    result.seconds = time.perf_counter() - started
    return result


# --- counting and ranking ---------------------------------------------------------------------


def counting_flags(hits: pa.Table, min_days: int) -> list[dict[str, Any]]:
    """(user, detector) pairs with hits on at least ``min_days`` distinct days, each with
    its days, its sustained score (the min_days-th highest daily score) and the evidence of
    its highest-scoring day. Window hits count on their own (their window is the test)."""
    by_pair: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in hits.to_pylist():
        by_pair.setdefault((row["user"], row["detector"]), []).append(row)
    out = []
    for (user, detector), rows in by_pair.items():
        rows.sort(key=lambda r: -r["score"])
        window = rows[0]["kind"] == "window"
        days = sorted({r["day"] for r in rows})
        if not window and len(days) < min_days:
            continue
        sustained = rows[0]["score"] if window else rows[min_days - 1]["score"]
        out.append(
            {
                "user": user,
                "team": rows[0]["team"],
                "org": rows[0]["org"],
                "detector": detector,
                "kind": rows[0]["kind"],
                "days": len(days),
                "first_day": days[0],
                "last_day": days[-1],
                "score": sustained,
                "max_score": rows[0]["score"],
                "value": rows[0]["value"],
                "evidence": orjson.loads(rows[0]["evidence"]),
                "window_start": rows[0]["window_start"],
                "window_end": rows[0]["window_end"],
            }
        )
    out.sort(key=lambda f: (-f["score"], f["user"], f["detector"]))
    return out


def rank_users(flags: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Users by their highest sustained score over daily detectors (ties: more detectors,
    then name); window (trend) flags are left out here and reported apart."""
    users: dict[str, dict[str, Any]] = {}
    for f in flags:
        if f["kind"] == "window":
            continue
        u = users.setdefault(
            f["user"], {"user": f["user"], "team": f["team"], "org": f["org"], "score": 0.0, "flags": []}
        )
        u["flags"].append(f)
        u["score"] = max(u["score"], f["score"])
    ranked = sorted(users.values(), key=lambda u: (-u["score"], -len(u["flags"]), u["user"]))
    for i, u in enumerate(ranked, 1):
        u["rank"] = i
        u["detectors"] = sorted({f["detector"] for f in u["flags"]})
    return ranked


_SUMMARY_KEYS: Final = {
    "repeat_prompt": ("top_prompt_requests", "requests"),
    "template": ("band_requests", "requests"),
    "context_ratio": ("median_ratio", "mean_output"),
    "fixed_cache": ("same_cache_read_requests", "cache_read_tokens"),
    "cadence": ("median_s", "gaps"),
    "active_hours": ("active_hours",),
    "unattended_agent": ("unattended_requests", "agent_requests"),
    "deadline_burst": ("burst_mean_interactive", "baseline_median_interactive"),
    "trend": ("slope_per_day", "second_half_slope"),
}


def evidence_summary(detector: str, evidence: Mapping[str, Any]) -> str:
    """A short human line of a hit's evidence."""
    parts = []
    for key in _SUMMARY_KEYS.get(detector, ()):
        v = evidence.get(key)
        if isinstance(v, float):
            v = f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        parts.append(f"{key}={v}")
    med = evidence.get("group_median")
    if isinstance(med, float):
        parts.append(f"{evidence.get('compared_with', 'group')} median={med:.3g}")
    return " ".join(parts)


def render_ranking(
    ranked: Sequence[Mapping[str, Any]],
    window: Sequence[Mapping[str, Any]],
    out: TextIO,
    limit: int | None = 50,
) -> None:
    """The ranked table `meter detect` prints, then the trend flags apart."""
    header = ("rank", "user", "team", "score", "detectors", "days", "evidence (top detector)")
    rows = []
    for u in ranked[: limit or None]:
        top = max(u["flags"], key=lambda f: f["score"])
        rows.append(
            (
                str(u["rank"]),
                u["user"],
                u["team"],
                f"{u['score']:.1f}",
                ",".join(u["detectors"]),
                str(max(f["days"] for f in u["flags"])),
                f"{top['detector']}: {evidence_summary(top['detector'], top['evidence'])}",
            )
        )
    _table(header, rows, out)
    more = len(ranked) - len(rows)
    out.write(
        f"({len(ranked)} flagged user{'s' if len(ranked) != 1 else ''}"
        + (f", {more} not shown)\n" if more > 0 else ")\n")
    )
    if window:
        out.write("\nLong-window trend (overlaps honest ramp-ups: review apart)\n")
        trows = [
            (
                f["user"],
                f["team"],
                f"{f['score']:.1f}",
                f"{f['window_start']}..{f['window_end']}",
                evidence_summary(f["detector"], f["evidence"]),
            )
            for f in window
        ]
        _table(("user", "team", "score", "window", "evidence"), trows, out)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    out.write("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip() + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


# --- Prometheus ------------------------------------------------------------------------------


class FlagsCollector:
    """``meter_flagged_users{detector,team}``: users whose flag counts (hits on min_days
    days within the lookback window ending at the latest flagged day), read from the
    stored flags at scrape time. Never a user label: who is flagged is for a reviewer,
    not for a dashboard."""

    def __init__(self, lake: LakePath, cfg: Config | None = None, today: Any = None) -> None:
        self.lake = lake
        self.cfg = cfg or Config()
        self.today = today or (lambda: dt.datetime.now(dt.UTC).date())

    def counts(self) -> dict[tuple[str, str], int]:
        end = self.today()
        start = end - dt.timedelta(days=self.cfg.lookback_days - 1)
        flags = counting_flags(read_flags(self.lake, start, end), self.cfg.min_days)
        counts: dict[tuple[str, str], int] = {}
        for f in flags:
            key = (f["detector"], f["team"])
            counts[key] = counts.get(key, 0) + 1
        return counts

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from meter.metrics import BY_NAME

        definition = BY_NAME["meter_flagged_users"]
        family = GaugeMetricFamily(definition.name, definition.help, labels=list(definition.labels))
        for (detector, team), n in sorted(self.counts().items()):
            family.add_metric([detector, team], n)
        yield family


# --- the daemon's daily run -------------------------------------------------------------------


def next_run(now: dt.datetime, at_s: float) -> dt.datetime:
    """The next time of day ``at_s`` seconds after midnight UTC, strictly after ``now``."""
    now = now.astimezone(dt.UTC)
    today = dt.datetime(now.year, now.month, now.day, tzinfo=dt.UTC) + dt.timedelta(seconds=at_s)
    return today if today > now else today + dt.timedelta(days=1)


class DailyDetector(threading.Thread):
    """Runs the detectors on the previous UTC day once a day, ``at_s`` after midnight UTC
    (late events have had time to land), the trend too on Mondays (its window then ends on
    a Sunday), writing flags as `meter detect --day` does. Errors are logged, never raised:
    the daemon's ingest goes on."""

    def __init__(
        self,
        lake: LakePath,
        cfg: Config,
        stop: threading.Event,
        *,
        at_s: float = 900.0,
        threads: int | None = None,
        clock: Any = None,
    ) -> None:
        super().__init__(name="meter-detect", daemon=True)
        self.lake = lake
        self.cfg = cfg
        self.stop = stop
        self.at_s = at_s
        self.threads = threads
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self.last: DetectResult | None = None

    def run_once(self, today: dt.date) -> DetectResult:
        day = today - dt.timedelta(days=1)
        self.last = detect(self.lake, day, day, self.cfg, trend=today.isoweekday() == 1, threads=self.threads)
        return self.last

    def run(self) -> None:
        log = logging.getLogger("meter.detect")
        while True:
            now = self.clock()
            if self.stop.wait(max(0.0, (next_run(now, self.at_s) - now).total_seconds())):
                return
            try:
                result = self.run_once(self.clock().date())
                log.info(
                    "daily detection done",
                    extra={"day": str(result.d0), "events": result.events, "hits": result.hits.num_rows},
                )
            except Exception:
                log.exception("daily detection failed")


# --- the command line ------------------------------------------------------------------------


def cli(args: Any, out: TextIO) -> int:
    """`meter detect`: run, write flags, print the ranked users (see meter/cli.py)."""
    cfg = load_config(args.policy) if args.policy else Config()
    if args.day and (args.date_from or args.date_to):
        raise ValueError("give --day or --from/--to, not both")
    if args.day or not (args.date_from or args.date_to):
        day = (
            dt.date.fromisoformat(args.day)
            if args.day
            else dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
        )
        d0 = d1 = day
        window = (day - dt.timedelta(days=cfg.lookback_days - 1), day)
        trend = bool(args.trend)
    else:
        if not (args.date_from and args.date_to):
            raise ValueError("--from and --to go together")
        d0, d1 = dt.date.fromisoformat(args.date_from), dt.date.fromisoformat(args.date_to)
        window = (d0, d1)
        trend = args.trend is not False
    result = detect(args.lake, d0, d1, cfg, trend=trend, write=not args.no_write, threads=args.threads)
    hits = result.hits
    if not args.no_write:
        # Earlier days of the window count too: their stored hits (this run's are stored now).
        hits = read_flags(args.lake, window[0], window[1], kinds=("day",))
    flags = counting_flags(pa.concat_tables([hits, result.window_hits]), cfg.min_days)
    ranked = rank_users(flags)
    window_flags = [f for f in flags if f["kind"] == "window"]
    if args.format == "json":
        doc = {
            "window": {"start": window[0].isoformat(), "end": window[1].isoformat()},
            "min_days": cfg.min_days,
            "events": result.events,
            "seconds": round(result.seconds, 3),
            "written": result.written,
            "ranked": [_jsonable(u) for u in ranked],
            "trend": [_jsonable(f) for f in window_flags],
        }
        out.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif args.format == "csv":
        import csv

        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(
            [
                "rank",
                "user",
                "team",
                "org",
                "detector",
                "kind",
                "days",
                "score",
                "first_day",
                "last_day",
                "evidence",
            ]
        )
        rank = {u["user"]: u["rank"] for u in ranked}
        for f in sorted(flags, key=lambda f: (rank.get(f["user"], 10**9), -f["score"])):
            writer.writerow(
                [
                    rank.get(f["user"], ""),
                    f["user"],
                    f["team"],
                    f["org"],
                    f["detector"],
                    f["kind"],
                    f["days"],
                    f["score"],
                    f["first_day"],
                    f["last_day"],
                    orjson.dumps(f["evidence"], option=orjson.OPT_SORT_KEYS).decode(),
                ]
            )
    else:
        rate = result.events / result.seconds if result.seconds else 0.0
        out.write(
            f"meter detect {d0}..{d1}: {result.events:,} events in {result.seconds:.2f}s ({rate:,.0f}/s); "
            f"flags count at {cfg.min_days}+ days in {window[0]}..{window[1]}\n"
        )
        render_ranking(ranked, window_flags, out, limit=args.limit)
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dt.date):
        return value.isoformat()
    return value
