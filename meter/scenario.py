"""A seeded population of LLM users, honest and gaming, with ground truth: the evaluation
harness of the usage-gaming detectors (`meter.detect`).

A detector is only worth as much as the honest behaviour it leaves alone, so most of this
module is honest users with the habits that look like gaming to a naive rule:

* heavy-tailed volumes (the busiest users send 20x the median), weekly and daily cycles
  in each user's own time zone, night owls and weekend workers;
* conversations whose cached context grows each turn, starting from the tool's fixed
  system prompt (so identical *small* cache reads are normal);
* agent users: headless ``agent`` runs of tens to hundreds of turns with large, growing
  contexts and short outputs, launched while the user is at work; some leave a long run
  going when they go home;
* declared automation: nightly ``batch-job`` runs on a timer, some of them evals that
  send each prompt several times;
* new joiners ramping up, whole teams crunching before a deadline, and teams whose work
  re-reads one large shared document (a RAG corpus) all day.

Planted gamers work like an honest user and game on top of it, one archetype each:

==================  ======================================================================
``loop``            a script re-sending one to three fixed prompts for hours, on a timer
``loop_nonce``      the same with a nonce in the prompt (every hash unique, sizes within a
                    few tokens); half on a jittered timer, half with random gaps
``stuffer``         a huge fixed document (80-190k tokens) re-sent from the cache with a
                    question, for a handful of output tokens, during work hours
``farm``            several agent workers running back to back through the user's night,
                    with growing contexts like a real agent and nobody at the keyboard
``sprinter``        5-12x their own volume, in the usual shape, on the days before the
                    review deadline
``slow_inflator``   volume growing 4-8% a day, compounded, over the whole window
==================  ======================================================================

The generator writes straight to a lake (`write_lake`): LAKE_EVENTS rows priced with the
catalog, one manifest entry per UTC day on the topic ``scenario``, so everything that
reads the lake (``meter query``, ``meter detect``, ``meter report``) sees them as it
would see the daemon's output. `Truth` says who is who and which confounders each honest
user carries.
"""

from __future__ import annotations

import array
import datetime as dt
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from meter.lake import LakePath
from meter.pricing import Catalog, load_catalog
from meter.schema import DLQ, EVENTS, LAKE_EVENTS, TS_TYPE

__all__ = [
    "ARCHETYPES",
    "CLIENTS",
    "CONFOUNDERS",
    "DEFAULT_START",
    "TOPIC",
    "Scenario",
    "Truth",
    "UserTruth",
    "evaluate",
    "events_table",
    "write_events",
    "write_lake",
]

ARCHETYPES: Final = ("loop", "loop_nonce", "stuffer", "farm", "sprinter", "slow_inflator")
#: Honest-user groups the evaluation reports flag shares for (a user may be in several).
CONFOUNDERS: Final = (
    "heavy",
    "agent",
    "overnight_agent",
    "batch",
    "evals",
    "ramp_up",
    "crunch",
    "doc_team",
    "night_owl",
    "weekend_worker",
    "far_timezone",
)
#: Client names the scenario uses: interactive tools, a headless agent, declared automation.
CLIENTS: Final = ("ide", "web", "cli", "agent", "batch-job")
_IDE, _WEB, _CLI, _AGENT, _BATCH = range(5)
#: Fixed system prompts of the interactive tools (tokens): what a first turn reads from cache.
_SYSTEM_PROMPT: Final = {_IDE: 9_500, _WEB: 2_100, _CLI: 14_000, _AGENT: 18_000, _BATCH: 0}
TOPIC: Final = "scenario"
DEFAULT_START: Final = dt.date(2026, 1, 5)  # a Monday

_MODELS: Final = (
    ("claude-sonnet-4-5", "anthropic"),
    ("claude-haiku-4-5", "anthropic"),
    ("claude-opus-4-1", "anthropic"),
    ("gpt-5", "openai"),
    ("gpt-5-mini", "openai"),
    ("gemini-2.5-flash", "google"),
    ("gemini-2.5-pro", "google"),
)
_MODEL_WEIGHTS: Final = (30, 12, 5, 20, 15, 10, 8)
_CHEAP_MODELS: Final = (1, 4, 5)
_ORGS: Final = ("acme", "globex", "initech", "umbrella", "hooli", "stark")
_DEPTS: Final = ("platform", "search", "ml", "infra", "mobile", "web", "data", "security", "growth", "ads")
#: UTC offsets (hours) of team home time zones, with weights.
_ZONES: Final = ((-8.0, 3), (-5.0, 4), (0.0, 2), (1.0, 3), (5.5, 2), (9.0, 1))
_DAY_MS: Final = 86_400_000
_HOUR_MS: Final = 3_600_000


@dataclass(frozen=True)
class Scenario:
    """What to synthesise. ``deadline_day`` is the index of the review date (days from
    ``start``); the ``burst_days`` days before it are when teams crunch and sprinters sprint."""

    seed: int = 1
    start: dt.date = DEFAULT_START
    days: int = 28
    honest_users: int = 2000
    gamers_per_archetype: int = 20
    teams: int = 60
    deadline_day: int = 25
    burst_days: int = 3
    crunch_share: float = 0.25
    doc_team_share: float = 0.05
    #: Multiplies every honest and gaming rate: 1.0 gives about 100 requests a user-day.
    volume: float = 1.0

    def __post_init__(self) -> None:
        if self.days < 1 or self.honest_users < 0 or self.gamers_per_archetype < 0 or self.teams < 1:
            raise ValueError("days and teams must be >= 1, user counts >= 0")
        if not self.burst_days <= self.deadline_day < self.days:
            raise ValueError("deadline_day must leave burst_days before it and lie in the window")
        if self.volume <= 0:
            raise ValueError("volume must be positive")

    @property
    def deadline(self) -> dt.date:
        return self.start + dt.timedelta(days=self.deadline_day)

    @property
    def end(self) -> dt.date:
        """The last day (inclusive)."""
        return self.start + dt.timedelta(days=self.days - 1)


@dataclass(frozen=True)
class UserTruth:
    user: str
    team: str
    org: str
    role: str  # "honest" or an archetype
    tz_hours: float
    confounders: tuple[str, ...] = ()


@dataclass(frozen=True)
class Truth:
    """Who is who in a generated scenario."""

    scenario: Scenario
    users: tuple[UserTruth, ...]
    events: int = 0
    events_per_day: dict[str, int] = field(default_factory=dict)

    def by_user(self) -> dict[str, UserTruth]:
        return {u.user: u for u in self.users}

    def deadline_policy(self) -> str:
        """The policy TOML (`meter.detect.Policy`) that tells detectors the review date."""
        return f'[[deadline]]\nname = "review"\ndate = "{self.scenario.deadline.isoformat()}"\n'

    def to_json(self) -> bytes:
        doc = asdict(self)
        doc["scenario"]["start"] = self.scenario.start.isoformat()
        doc["deadline"] = self.scenario.deadline.isoformat()
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2)

    @classmethod
    def from_json(cls, data: bytes) -> Truth:
        doc = orjson.loads(data)
        sc = dict(doc["scenario"])
        sc["start"] = dt.date.fromisoformat(sc["start"])
        users = tuple(UserTruth(**{**u, "confounders": tuple(u["confounders"])}) for u in doc["users"])
        return cls(Scenario(**sc), users, doc["events"], doc["events_per_day"])


# --- the population -----------------------------------------------------------------------


@dataclass
class _Team:
    name: str
    org: str
    tz: float
    crunch: float  # volume multiplier in the burst window (1.0 = no crunch)
    doc_tokens: int  # a shared large document the team re-reads, 0 = none


@dataclass
class _User:
    index: int
    name: str
    team: int
    tz: float
    role: str
    persona: str  # chat | coder | agent
    rate: float  # interactive requests on a full weekday
    weekend: float
    start_h: float
    length_h: float
    model: int
    day_sd: float = 0.3
    batch: bool = False
    evals: bool = False
    ramp: tuple[int, int] | None = None  # (first day, days to full volume)
    overnight: bool = False
    night_owl: bool = False
    weekend_worker: bool = False
    confounders: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)


def _pick(rng: random.Random, weighted: tuple[tuple[float, int], ...]) -> float:
    total = sum(w for _, w in weighted)
    x = rng.random() * total
    for value, w in weighted:
        x -= w
        if x < 0:
            return value
    return weighted[-1][0]


def _population(sc: Scenario, rng: random.Random) -> tuple[list[_Team], list[_User]]:
    teams = []
    for i in range(sc.teams):
        org = _ORGS[min(int(rng.paretovariate(1.2)) - 1, len(_ORGS) - 1)]
        crunch = rng.uniform(1.5, 2.5) if rng.random() < sc.crunch_share else 1.0
        doc = rng.randrange(36_000, 60_000) if rng.random() < sc.doc_team_share else 0
        teams.append(_Team(f"{org}-{_DEPTS[i % len(_DEPTS)]}-{i:03d}", org, _pick(rng, _ZONES), crunch, doc))
    # Heavy-tailed team sizes: each user joins a team with Zipf-like weights.
    weights = [1.0 / (k + 1) ** 0.8 for k in range(sc.teams)]
    rng.shuffle(weights)
    roles = ["honest"] * sc.honest_users + [a for a in ARCHETYPES for _ in range(sc.gamers_per_archetype)]
    names = [f"u{k:05d}" for k in range(len(roles))]
    rng.shuffle(names)
    users = []
    for index, role in enumerate(roles):
        team = rng.choices(range(sc.teams), weights)[0]
        home = teams[team].tz
        tz = home if rng.random() < 0.85 else _pick(rng, _ZONES)
        persona = "coder" if role != "honest" else rng.choices(("chat", "coder", "agent"), (30, 45, 25))[0]
        user = _User(
            index=index,
            name=names[index],
            team=team,
            tz=tz,
            role=role,
            persona=persona,
            rate=min(600.0, rng.lognormvariate(math.log(30), 0.9)) * sc.volume,
            weekend=rng.uniform(0.0, 0.25),
            start_h=rng.gauss(9.0, 0.8),
            length_h=rng.uniform(7.5, 10.0),
            model=rng.choices(range(len(_MODELS)), _MODEL_WEIGHTS)[0],
            day_sd=rng.uniform(0.2, 0.4),
        )
        if role == "honest":
            if rng.random() < 0.08:
                user.night_owl = True
                user.start_h = rng.gauss(14.0, 1.0)
            if rng.random() < 0.08:
                user.weekend_worker = True
                user.weekend = rng.uniform(0.5, 1.0)
            user.batch = rng.random() < 0.08
            user.evals = user.batch and rng.random() < 0.5
            if rng.random() < 0.08:
                user.ramp = (rng.randrange(0, max(1, sc.days - 10)), rng.randrange(5, 13))
            user.overnight = persona == "agent" and rng.random() < 0.2
        else:
            _plant(user, sc, rng)
        users.append(user)
    cut = sorted(u.rate for u in users if u.role == "honest")
    heavy_rate = cut[int(len(cut) * 0.95)] if cut else math.inf
    for u in users:
        if u.role != "honest":
            continue
        tags = []
        if u.rate >= heavy_rate:
            tags.append("heavy")
        if u.persona == "agent":
            tags.append("agent")
        for flag, tag in (
            (u.overnight, "overnight_agent"),
            (u.batch, "batch"),
            (u.evals, "evals"),
            (u.ramp is not None, "ramp_up"),
            (teams[u.team].crunch > 1.0, "crunch"),
            (teams[u.team].doc_tokens > 0, "doc_team"),
            (u.night_owl, "night_owl"),
            (u.weekend_worker, "weekend_worker"),
            (u.tz != teams[u.team].tz, "far_timezone"),
        ):
            if flag:
                tags.append(tag)
        u.confounders = tuple(tags)
    return teams, users


def _plant(user: _User, sc: Scenario, rng: random.Random) -> None:
    p = user.params
    if user.role in ("loop", "loop_nonce"):
        p["prompts"] = [(rng.getrandbits(63), int(rng.lognormvariate(math.log(1500), 0.8)) + 50)]
        p["prompts"] += [(rng.getrandbits(63), rng.randrange(200, 6000)) for _ in range(rng.randrange(0, 3))]
        p["cached"] = rng.randrange(2_000, 60_000) if rng.random() < 0.5 else 0
        p["client"] = rng.choice((_IDE, _CLI))
        p["model"] = rng.choice(_CHEAP_MODELS)
        p["first_day"] = rng.randrange(0, min(7, sc.days))
        p["random_gaps"] = user.role == "loop_nonce" and rng.random() < 0.5
    elif user.role == "stuffer":
        p["docs"] = [rng.randrange(80_000, 190_000) for _ in range(rng.randrange(1, 3))]
        p["per_day"] = rng.uniform(60, 250) * sc.volume
        p["first_day"] = rng.randrange(0, min(7, sc.days))
    elif user.role == "farm":
        p["workers"] = rng.randrange(1, 4)
        p["first_day"] = rng.randrange(0, min(7, sc.days))
    elif user.role == "sprinter":
        p["multiplier"] = rng.uniform(5.0, 12.0)
    elif user.role == "slow_inflator":
        p["growth"] = rng.uniform(0.04, 0.08)


# --- events ---------------------------------------------------------------------------------


class _Columns:
    """One UTC day's events as typed arrays (8 bytes a value, not a Python object)."""

    __slots__ = ("cache_read", "cache_write", "client", "hash", "input", "model", "output", "ts", "user")

    def __init__(self) -> None:
        self.ts = array.array("q")
        self.user = array.array("i")
        self.client = array.array("b")
        self.model = array.array("b")
        self.input = array.array("q")
        self.output = array.array("q")
        self.cache_read = array.array("q")
        self.cache_write = array.array("q")
        self.hash = array.array("q")


class _Generator:
    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.rng = random.Random(f"meter-scenario-{sc.seed}")
        self.teams, self.users = _population(sc, self.rng)
        self.t0 = int(dt.datetime.combine(sc.start, dt.time(), dt.UTC).timestamp() * 1000)
        self.t_end = self.t0 + sc.days * _DAY_MS
        self.days: dict[int, _Columns] = {}
        self.burst = range(sc.deadline_day - sc.burst_days, sc.deadline_day)

    # -- emitting -----------------------------------------------------------------------

    def emit(
        self, t: int, u: _User, client: int, model: int, inp: int, out: int, cr: int, cw: int, h: int
    ) -> None:
        if not self.t0 <= t < self.t_end:
            return
        day = (t - self.t0) // _DAY_MS
        cols = self.days.get(day)
        if cols is None:
            cols = self.days[day] = _Columns()
        cols.ts.append(t)
        cols.user.append(u.index)
        cols.client.append(client)
        cols.model.append(model)
        cols.input.append(inp)
        cols.output.append(out)
        cols.cache_read.append(cr)
        cols.cache_write.append(cw)
        cols.hash.append(h)

    # -- behaviours ---------------------------------------------------------------------

    def _model(self, u: _User) -> int:
        rng = self.rng
        return u.model if rng.random() < 0.8 else rng.choices(range(len(_MODELS)), _MODEL_WEIGHTS)[0]

    def conversation(self, u: _User, t: float, turns: int, client: int) -> float:
        """A chat in an interactive tool: the cached context grows by each turn."""
        rng = self.rng
        lognorm = rng.lognormvariate
        model = self._model(u)
        cached = rng.random() < 0.85
        ctx = _SYSTEM_PROMPT[client]
        last_hash, last_in = 0, 0
        for i in range(turns):
            if i:
                t += min(1_200_000.0, 3_000.0 + lognorm(10.6, 1.1))  # think time, median ~40 s
            if i and rng.random() < 0.06:  # a retry or regenerate: the same prompt again
                h, msg = last_hash, last_in
            else:
                h = rng.getrandbits(63)
                msg = int(lognorm(5.7, 1.0)) + 5
                if rng.random() < 0.1:
                    msg += int(lognorm(8.3, 0.9))  # a pasted file
            out = min(8_000, int(lognorm(5.85, 0.9)) + 5)
            if cached:
                self.emit(int(t), u, client, model, msg, out, ctx, msg if i else 0, h)
            else:
                self.emit(int(t), u, client, model, ctx + msg, out, 0, 0, h)
            ctx = min(180_000, ctx + msg + out)
            last_hash, last_in = h, msg
        return t

    def doc_questions(self, u: _User, t: float, n: int, doc: int) -> None:
        """Single questions over the team's shared document: the same large cache read each time."""
        rng = self.rng
        model = self._model(u)
        for _ in range(n):
            t += min(1_200_000.0, 3_000.0 + rng.lognormvariate(10.6, 1.1))
            out = min(8_000, int(rng.lognormvariate(5.85, 0.9)) + 5)
            self.emit(
                int(t),
                u,
                _WEB,
                model,
                int(rng.lognormvariate(5.0, 0.8)) + 5,
                out,
                doc,
                0,
                rng.getrandbits(63),
            )

    def agent_run(self, u: _User, t: float, turns: int, gap_median_s: float = 10.0) -> float:
        """A headless agent: short outputs (tool calls) over a large context that grows."""
        rng = self.rng
        lognorm = rng.lognormvariate
        model = self._model(u)
        ctx = rng.randrange(14_000, 26_000)
        mu = math.log(gap_median_s * 1000)
        for _ in range(turns):
            t += min(300_000.0, 800.0 + lognorm(mu, 0.7))
            tool = min(40_000, int(lognorm(6.55, 1.1)) + 20)
            out = min(8_000, int(lognorm(5.4, 1.0)) + 5)
            self.emit(int(t), u, _AGENT, model, tool, out, ctx, tool, rng.getrandbits(63))
            ctx += tool + out
            if ctx > 170_000:
                ctx = rng.randrange(20_000, 40_000)  # compaction
        return t

    def workday(self, u: _User, day0: float, requests: int) -> None:
        """``requests`` interactive requests in conversations over the user's working hours."""
        rng = self.rng
        clients = {"chat": (_WEB, _WEB, _IDE), "coder": (_IDE, _IDE, _CLI, _WEB), "agent": (_IDE, _CLI)}
        options = clients[u.persona]
        start = day0 + u.start_h * _HOUR_MS
        while requests > 0:
            turns = min(requests, 1 + int(rng.expovariate(1 / 7)))
            requests -= turns
            hour = rng.uniform(0, u.length_h)
            if 3.0 < hour < 4.0 and rng.random() < 0.5:
                hour += 1.0  # lunch
            if rng.random() < 0.1:
                hour = u.length_h + rng.uniform(1.0, 5.0)  # an evening session
            at = start + hour * _HOUR_MS
            doc = self.teams[u.team].doc_tokens
            if doc and rng.random() < 0.35:
                self.doc_questions(u, at, turns, doc)
            else:
                self.conversation(u, at, turns, rng.choice(options))

    def day(self, u: _User, d: int) -> None:
        sc, rng = self.sc, self.rng
        day0 = self.t0 + d * _DAY_MS - u.tz * _HOUR_MS  # local midnight, in UTC ms
        weekday = (sc.start + dt.timedelta(days=d)).weekday()
        weekend = weekday >= 5
        mult = rng.lognormvariate(0.0, u.day_sd)
        if weekend:
            mult *= u.weekend if rng.random() < 0.5 + u.weekend / 2 else 0.0
        if u.ramp is not None:
            first, length = u.ramp
            mult *= 0.0 if d < first else min(1.0, 0.15 + 0.85 * (d - first) / length)
        if d in self.burst:
            mult *= self.teams[u.team].crunch
            if u.role == "sprinter":
                mult *= u.params["multiplier"]
        if u.role == "slow_inflator":
            mult *= 0.5 * math.exp(u.params["growth"] * d)
        requests = _poisson(rng, u.rate * mult)
        self.workday(u, day0, requests)
        if u.persona == "agent" and mult > 0:
            # Each run is launched by a prompt typed in the IDE or CLI.
            for _ in range(_poisson(rng, u.rate * mult / 40)):
                at = day0 + (u.start_h + rng.uniform(0, u.length_h - 0.5)) * _HOUR_MS
                at = self.conversation(u, at, rng.randrange(1, 3), rng.choice((_IDE, _CLI)))
                self.agent_run(u, at, min(400, int(rng.lognormvariate(math.log(40), 0.8)) + 3))
            if u.overnight and not weekend and rng.random() < 0.25:
                at = day0 + (u.start_h + u.length_h) * _HOUR_MS
                at = self.conversation(u, at, 1, _CLI)
                hours = rng.uniform(1.0, 4.0)
                self.agent_run(u, at, int(hours * 3600 / 11), gap_median_s=10.0)
        if u.batch:
            self.batch(u, day0 + rng.uniform(1.0, 3.0) * _HOUR_MS)
        if u.role != "honest" and d >= u.params.get("first_day", 0):
            self.game(u, d, day0, weekend)

    def batch(self, u: _User, t: float) -> None:
        """A declared nightly job on a timer; evals send each prompt three times."""
        rng = self.rng
        items = rng.randrange(50, 300)
        period = rng.uniform(2_000, 8_000)
        model = rng.choice(_CHEAP_MODELS)
        hashes = [rng.getrandbits(63) for _ in range(items // 3 + 1)]
        for i in range(items):
            t += period * rng.uniform(0.9, 1.1)
            h = hashes[i // 3] if u.evals else rng.getrandbits(63)
            inp = 600 + int(rng.lognormvariate(7.3, 0.8))
            self.emit(int(t), u, _BATCH, model, inp, int(rng.lognormvariate(4.8, 0.5)) + 1, 0, 0, h)

    def game(self, u: _User, d: int, day0: float, weekend: bool) -> None:
        rng, p = self.rng, u.params
        if u.role in ("loop", "loop_nonce"):
            if rng.random() > (0.3 if weekend else 0.9):
                return
            for _ in range(rng.randrange(1, 4)):
                at = day0 + rng.uniform(7.0, 21.0) * _HOUR_MS
                self.loop(u, at, rng.uniform(1.0, 4.0) * _HOUR_MS)
        elif u.role == "stuffer":
            if weekend or rng.random() > 0.9:
                return
            n = _poisson(rng, p["per_day"])
            start = day0 + u.start_h * _HOUR_MS
            t = start
            for _ in range(n):
                if rng.random() < 0.1:
                    t = start + rng.uniform(0, u.length_h) * _HOUR_MS
                t += 2_000 + rng.lognormvariate(10.3, 0.9)
                inp = rng.randrange(15, 150)
                out = max(1, min(80, int(rng.lognormvariate(2.5, 0.6))))
                self.emit(int(t), u, _IDE, u.model, inp, out, rng.choice(p["docs"]), 0, rng.getrandbits(63))
        elif u.role == "farm":
            if rng.random() > (0.6 if weekend else 0.9):
                return
            begin = day0 + rng.uniform(20.5, 22.5) * _HOUR_MS
            end = day0 + (24 + rng.uniform(5.5, 7.0)) * _HOUR_MS
            for _ in range(p["workers"]):
                t = begin + rng.uniform(0, 1_800_000)
                while t < end:
                    t = self.agent_run(u, t, rng.randrange(20, 120), gap_median_s=30.0)
                    t += rng.uniform(10_000, 300_000)

    def loop(self, u: _User, t: float, duration: float) -> None:
        rng, p = self.rng, u.params
        period = rng.uniform(8_000, 45_000)
        jitter = rng.uniform(0.05, 0.3)
        end = t + duration
        nonce = u.role == "loop_nonce"
        prompts = p["prompts"]
        while t < end:
            if p["random_gaps"]:
                t += rng.expovariate(1 / period)
            else:
                t += period * (1 + rng.uniform(-jitter, jitter))
            h, size = rng.choice(prompts)
            if nonce:
                h, size = rng.getrandbits(63), size + rng.randrange(0, 5)
            out = min(4_000, int(rng.lognormvariate(5.5, 0.7)) + 5)
            self.emit(int(t), u, p["client"], p["model"], size, out, p["cached"], 0, h)

    # -- driving ------------------------------------------------------------------------

    def run(self) -> Iterator[tuple[int, _Columns]]:
        """UTC days in order, each as soon as no later local day can add to it."""
        for d in range(-1, self.sc.days + 1):
            for u in self.users:
                self.day(u, d)
            # Local day d reaches at most into UTC day d + 1 (farms and evenings run past
            # local midnight); UTC day d - 1 is complete.
            done = d - 1
            if done >= 0 and done in self.days:
                yield done, self.days.pop(done)
        for done in sorted(self.days):
            yield done, self.days.pop(done)


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 40:
        return max(0, int(rng.gauss(lam, math.sqrt(lam)) + 0.5))
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        p *= rng.random()
        k += 1
    return k


def _int64(values: array.array) -> pa.Array:
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])


def _events_table(
    cols: _Columns, users: list[_User], teams: list[_Team], catalog: Catalog, first_offset: int, seed: int
) -> pa.Table:
    n = len(cols.ts)
    ts = _int64(cols.ts)
    order = pc.sort_indices(ts)
    user_idx = pa.array(cols.user, pa.int32()).take(order)
    team_of = pa.array([u.team for u in users], pa.int32())
    team_idx = team_of.take(user_idx)
    model_idx = pa.array(cols.model, pa.int8()).take(order)

    def strings(values: list[str], index: pa.Array) -> pa.Array:
        return pa.array(values, pa.string()).take(index)

    offsets = pa.array(range(first_offset, first_offset + n), pa.int64())
    zeros = pa.nulls(n, pa.int64()).fill_null(0)
    batch = pa.RecordBatch.from_arrays(
        [
            pc.binary_join_element_wise(f"s{seed}", offsets.cast(pa.string()), ":"),
            ts.take(order).cast(TS_TYPE),
            strings([u.name for u in users], user_idx),
            strings([t.name for t in teams], team_idx),
            strings([t.org for t in teams], team_idx),
            strings([m for m, _ in _MODELS], model_idx),
            strings([p for _, p in _MODELS], model_idx),
            strings(list(CLIENTS), pa.array(cols.client, pa.int8()).take(order)),
            pa.nulls(n, pa.string()),
            _int64(cols.hash).take(order).cast(pa.string()),
            _int64(cols.input).take(order),
            _int64(cols.output).take(order),
            _int64(cols.cache_read).take(order),
            _int64(cols.cache_write).take(order),
            zeros,
            zeros,
        ],
        schema=EVENTS,
    )
    priced = catalog.price(batch)
    return (
        pa.Table.from_batches([priced])
        .append_column("kafka_topic", pa.array([TOPIC] * n, pa.string()))
        .append_column("kafka_partition", pa.nulls(n, pa.int32()).fill_null(0))
        .append_column("kafka_offset", offsets)
        .cast(LAKE_EVENTS)
    )


def events_table(
    events: Sequence[Mapping[str, Any]], catalog: Catalog | None = None, topic: str = "handmade"
) -> pa.Table:
    """LAKE_EVENTS rows from plain dicts: ``ts`` (epoch ms or a datetime), ``user``, and
    optionally ``team``, ``org``, ``client``, ``model`` (default claude-sonnet-4-5),
    ``prompt_hash``, ``event_id`` and token counts (default 0; input and output 1).
    Priced with the catalog (the packaged one by default); offsets count from 0."""
    n = len(events)
    cols: dict[str, list[Any]] = {f.name: [] for f in EVENTS}
    for i, e in enumerate(events):
        ts = e["ts"]
        cols["event_id"].append(str(e.get("event_id", f"{topic}:{i}")))
        cols["ts"].append(int(ts.timestamp() * 1000) if isinstance(ts, dt.datetime) else int(ts))
        for name in ("user", "team", "org", "provider", "client", "request_id", "prompt_hash"):
            cols[name].append(e.get(name))
        cols["model"].append(e.get("model", "claude-sonnet-4-5"))
        for name in EVENTS.names[-6:]:
            cols[name].append(int(e.get(name, 1 if name in ("input_tokens", "output_tokens") else 0)))
    arrays = [
        pa.array(cols["ts"], pa.int64()).cast(TS_TYPE) if f.name == "ts" else pa.array(cols[f.name], f.type)
        for f in EVENTS
    ]
    priced = (catalog or load_catalog()).price(pa.RecordBatch.from_arrays(arrays, schema=EVENTS))
    return (
        pa.Table.from_batches([priced])
        .append_column("kafka_topic", pa.array([topic] * n, pa.string()))
        .append_column("kafka_partition", pa.array([0] * n, pa.int32()))
        .append_column("kafka_offset", pa.array(range(n), pa.int64()))
        .cast(LAKE_EVENTS)
    )


def write_events(
    lake: LakePath,
    events: Sequence[Mapping[str, Any]],
    catalog: Catalog | None = None,
    topic: str = "handmade",
) -> int:
    """Write hand-made events (see `events_table`) into a lake as one flush of a fresh topic
    partition, manifest and all; returns the rows written. For tests and examples."""
    from meter.stages import Flush, write_flush

    Path(lake).mkdir(parents=True, exist_ok=True)
    table = events_table(events, catalog, topic)
    if table.num_rows:
        flush = Flush(topic, 0, 0, None, table.num_rows, 0, table.num_rows, table, DLQ.empty_table())
        write_flush(str(lake), flush, writer="handmade")
    return table.num_rows


def _truth(gen: _Generator, events: int, per_day: dict[str, int]) -> Truth:
    users = tuple(
        UserTruth(u.name, gen.teams[u.team].name, gen.teams[u.team].org, u.role, u.tz, u.confounders)
        for u in sorted(gen.users, key=lambda u: u.name)
    )
    return Truth(gen.sc, users, events, per_day)


def write_lake(lake: LakePath, sc: Scenario, catalog: Catalog | None = None) -> Truth:
    """Generate ``sc`` into ``lake`` (one flush per UTC day, manifest and all); return the truth.

    The lake must not already hold the topic ``scenario``: its manifest chain starts at 0.
    """
    from meter.stages import Flush, write_flush

    Path(lake).mkdir(parents=True, exist_ok=True)
    gen = _Generator(sc)
    catalog = catalog or load_catalog()
    offset = 0
    per_day: dict[str, int] = {}
    after: int | None = None
    empty_dlq = DLQ.empty_table()
    for day, cols in gen.run():
        table = _events_table(cols, gen.users, gen.teams, catalog, offset, sc.seed)
        n = table.num_rows
        if n == 0:
            continue
        flush = Flush(TOPIC, 0, offset, after, offset + n, 0, n, table, empty_dlq)
        write_flush(str(lake), flush, writer=f"scenario-{sc.seed}")
        after = offset = offset + n
        per_day[(sc.start + dt.timedelta(days=day)).isoformat()] = n
    return _truth(gen, offset, per_day)


# --- evaluation ------------------------------------------------------------------------------


def evaluate(
    truth: Truth, flags: list[dict[str, Any]], ranked: list[dict[str, Any]], ks: tuple[int, ...] = (50,)
) -> dict[str, Any]:
    """Recall per archetype, honest flag shares (overall, per confounder group, per
    detector) and precision at k, from counting flags (`meter.detect.counting_flags`) and
    the ranking of users (`meter.detect.rank_users`).

    Daily flags and the trend are scored apart: the slow inflator's recall is the trend's,
    and the honest share of trend flags is reported beside it, not pooled.
    """
    roles = {u.user: u.role for u in truth.users}
    daily = {f["user"] for f in flags if f["kind"] != "window"}
    window = {f["user"] for f in flags if f["kind"] == "window"}
    honest = [u for u in truth.users if u.role == "honest"]
    recall = {}
    for archetype in ARCHETYPES:
        members = [u.user for u in truth.users if u.role == archetype]
        found = window if archetype == "slow_inflator" else daily
        recall[archetype] = {
            "users": len(members),
            "flagged": sum(1 for m in members if m in found),
            "recall": _share(sum(1 for m in members if m in found), len(members)),
            "by": "trend" if archetype == "slow_inflator" else "daily detectors",
        }
    groups: dict[str, dict[str, Any]] = {}
    for group in ("all", *CONFOUNDERS):
        members = [u.user for u in honest if group == "all" or group in u.confounders]
        n_daily = sum(1 for m in members if m in daily)
        n_window = sum(1 for m in members if m in window)
        groups[group] = {
            "users": len(members),
            "flagged": n_daily,
            "share": _share(n_daily, len(members)),
            "trend_flagged": n_window,
            "trend_share": _share(n_window, len(members)),
        }
    by_detector: dict[str, dict[str, int]] = {}
    for f in flags:
        d = by_detector.setdefault(f["detector"], {"honest": 0, "gamers": 0})
        d["honest" if roles.get(f["user"], "honest") == "honest" else "gamers"] += 1
    precision = {}
    for k in ks:
        top = ranked[:k]
        precision[f"p@{k}"] = {
            "k": k,
            "ranked": len(top),
            "gamers": sum(1 for u in top if roles.get(u["user"], "honest") != "honest"),
            "precision": _share(sum(1 for u in top if roles.get(u["user"], "honest") != "honest"), len(top)),
        }
    false_positives = sorted(
        (
            {
                "user": f["user"],
                "detector": f["detector"],
                "days": f["days"],
                "score": f["score"],
                "confounders": list(truth.by_user()[f["user"]].confounders),
            }
            for f in flags
            if roles.get(f["user"], "honest") == "honest"
        ),
        key=lambda f: -f["score"],
    )
    return {
        "recall": recall,
        "honest": groups,
        "precision": precision,
        "flags_by_detector": by_detector,
        "honest_flags": false_positives,
    }


def _share(n: int, d: int) -> float | None:
    return None if d == 0 else n / d


def cli(args: Any, out: Any) -> int:
    """`meter scenario` (see meter/cli.py): a population with planted gamers, straight into
    a lake, with its ground truth and the policy file naming its review deadline."""
    start = dt.date.fromisoformat(args.start) if args.start else DEFAULT_START
    sc = Scenario(
        seed=args.seed,
        start=start,
        days=args.days,
        honest_users=args.honest,
        gamers_per_archetype=args.gamers,
        teams=args.teams,
        deadline_day=min(args.days - 1, max(3, args.days - 3))
        if args.deadline_day is None
        else args.deadline_day,
        volume=args.volume,
    )
    truth = write_lake(args.lake, sc)
    meta = Path(args.lake) / "_meter" / "scenario"
    truth_path = Path(args.truth) if args.truth else meta / f"truth-{sc.seed}.json"
    policy_path = Path(args.policy_out) if args.policy_out else meta / f"policy-{sc.seed}.toml"
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    policy_path.parent.mkdir(parents=True, exist_ok=True)
    truth_path.write_bytes(truth.to_json())
    policy_path.write_text(truth.deadline_policy())
    roles: dict[str, int] = {}
    for u in truth.users:
        roles[u.role] = roles.get(u.role, 0) + 1
    out.write(
        f"wrote {truth.events:,} events over {len(truth.events_per_day)} days "
        f"({sc.start}..{sc.end}) for {len(truth.users):,} users: "
        + ", ".join(f"{n} {r}" for r, n in sorted(roles.items()))
        + f"\ntruth: {truth_path}\npolicy (review deadline {sc.deadline}): {policy_path}\n"
    )
    return 0
