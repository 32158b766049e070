"""Effectively once across SIGKILL: `meter run` is killed again and again while traffic flows
(Tansu broker, a real process), restarted each time, and the lake ends up holding every Kafka
message exactly once (DESIGN 5).

Two kinds of kill:

* the test's own SIGKILL at a seeded random moment, once the run holds its partitions and
  has flushed since it started (so it lands mid-stream, often inside a flush);
* every third kill is injected by the daemon itself (`meter.crashpoint`, METER_CRASH_AT) at
  a named step of a flush: after a data file's rename and before the manifest entry, after
  the entry and before the Kafka commit, after the intent and before any file. The test
  checks the evidence each left (an orphan file `meter query` must not see, a manifest
  ahead of Kafka's committed offset, an intent no entry covers).

CI size: 10 kills, ~30k events. Long run: METER_CRASH_EVENTS=2000000 METER_CRASH_KILLS=30
(METER_CRASH_SEED picks another sequence of moments).

The daemon runs with a 2 s session timeout: after a SIGKILL the new member's assignment waits
for the dead member's session to expire on Tansu (about 4 s at 2 s, 11 s at 6 s, measured).
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from faultkit import (
    Daemon,
    Expect,
    Runner,
    check_chains,
    check_lake,
    check_query,
    committed_offsets,
    env_int,
    lake_messages,
    query_totals,
    read_back,
    torn_flushes,
    unlisted_files,
    wait_landed,
)

from meter.crashpoint import MARKER
from meter.lake import parse_data_file_name, parse_rel_path
from meter.manifest import load_partition, totals

pytestmark = pytest.mark.integration

EVENTS = env_int("METER_CRASH_EVENTS", 30_000)
KILLS = env_int("METER_CRASH_KILLS", 10)
SEED = env_int("METER_CRASH_SEED", 20251130)
PARTITIONS = 4
PER_MESSAGE = 2
SESSION_TIMEOUT_MS = 2000
KAFKA = {"heartbeat.interval.ms": 400}
#: Seconds one kill cycle takes (restart and assignment ~4.3 s, then the run); the producer's
#: rate is set so that it is still sending when the last kill lands.
CYCLE_S = 6.5
#: Injected crash steps, in turn, for every third kill; the probability is per step passed.
HOOKS = ("after_file", "after_manifest", "after_intent")
HOOK_PROBABILITY = 0.25


def wait_until(what: str, done: Callable[[], bool], daemon: Daemon, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert daemon.running(), f"meter run exited with {daemon.proc.returncode} while waiting: {what}"
        assert time.monotonic() < deadline, f"not within {timeout:.0f}s: {what}"
        time.sleep(0.05)


def injected(daemon: Daemon, timeout: float = 60.0) -> tuple[str, str]:
    """Wait for the daemon to kill itself at its injected step; return (step, what)."""
    try:
        daemon.proc.wait(timeout)
    except Exception:
        daemon.kill()
        raise AssertionError(f"the injected crash did not happen within {timeout:.0f}s") from None
    assert daemon.proc.returncode == -9, f"meter run exited with {daemon.proc.returncode}, not SIGKILL"
    out = daemon.output()
    assert MARKER in out, "meter run died of SIGKILL without the crash marker"
    line = out[out.index(MARKER) + len(MARKER) :].split(b"\n", 1)[0].decode()
    step, _, what = line.partition(" ")
    return step, what


def test_sigkill_mid_stream(runner: Runner, tansu: Any, topic: Callable[..., str]) -> None:
    from meter.gen import generate

    rng = random.Random(SEED)
    name = topic(tansu, PARTITIONS)
    lake = runner.tmp / "lake"
    group = f"meter-crash-{uuid.uuid4().hex[:8]}"
    log = runner.log("meter-run-crash")
    produced: dict[str, Any] = {}
    rate = EVENTS / (KILLS * CYCLE_S)

    def produce() -> None:
        try:
            produced["summary"] = generate(
                runner.brokers,
                name,
                events=EVENTS,
                rate=rate,
                seed=7,
                per_message=PER_MESSAGE,
                bad_ratio=0.02,
            )
        except BaseException as error:  # re-raised in the test's thread
            produced["error"] = error

    producer = threading.Thread(target=produce, name="generate", daemon=True)
    producer.start()

    kills: list[dict[str, Any]] = []
    evidence: Counter[str] = Counter()
    started = time.monotonic()
    for k in range(KILLS):
        hook = HOOKS[(k // 3) % len(HOOKS)] if k % 3 == 2 else None
        env = {"METER_CRASH_AT": f"{hook}:{HOOK_PROBABILITY}"} if hook else {}
        before = lake_messages(lake)
        daemon = runner.start(
            name,
            lake,
            group,
            log,
            session_timeout_ms=SESSION_TIMEOUT_MS,
            batch_max_age_s=0.3,
            kafka=KAFKA,
            env=env,
        )
        daemon.wait_assigned()
        if hook is None:
            # holds its partitions and writes: its first flush of this run is durable
            wait_until("a flush in this run", lambda: lake_messages(lake) > before, daemon, 40)  # noqa: B023
            time.sleep(rng.uniform(0.0, 1.2))
            daemon.kill()
            step, what = "random", ""
        else:
            step, what = injected(daemon)
            assert step == hook
        assert producer.is_alive(), f"kill {k}: the generator had already finished (not mid-stream)"
        at_kill = lake_messages(lake)
        positions = check_chains(lake, name, PARTITIONS)  # no gap, no overlap after any crash
        torn = torn_flushes(lake, name, PARTITIONS)
        if step == "after_file":
            # renamed into place, listed by no entry: an orphan on disk that no reader counts
            data = parse_rel_path(what)
            assert (lake / what).is_file() and what in unlisted_files(lake)
            assert data.partition in torn
            t = totals(lake)
            row = query_totals(lake)
            assert (row["accepted"], row["rejected"]) == (t.accepted, t.rejected), "meter query saw an orphan"
            evidence["orphan invisible to meter query"] += 1
        elif step == "after_manifest":
            # the entry is durable, Kafka's committed offset is behind it
            _, p, start, end = parse_data_file_name(what)
            assert positions[p] == end
            committed = committed_offsets(runner.brokers, group, name, PARTITIONS)
            assert committed[p] < end, f"offset {end} of partition {p} was committed before the crash"
            evidence["manifest ahead of the commit"] += 1
        elif step == "after_intent":
            _, p, start, _ = parse_data_file_name(what)
            assert p in torn and positions[p] in (start, None)
            evidence["intent without entry"] += 1
        kills.append({"kill": k, "step": step, "before": before, "at_kill": at_kill, "torn": torn})

    kill_seconds = time.monotonic() - started
    daemon = runner.start(
        name, lake, group, log, session_timeout_ms=SESSION_TIMEOUT_MS, batch_max_age_s=0.3, kafka=KAFKA
    )
    producer.join(timeout=EVENTS / rate + 120)
    assert not producer.is_alive(), "the generator did not finish"
    if "error" in produced:
        raise produced["error"]
    summary = produced["summary"]
    assert summary.failed == 0 and summary.delivered == summary.messages, summary.errors
    sent = read_back(runner.brokers, name, PARTITIONS, summary.messages)
    wait_landed(lake, summary.messages, [daemon], timeout=120 + summary.messages / 20_000)
    assert daemon.stop() == 0

    expect = Expect.of(summary)
    check_lake(lake, name, PARTITIONS, expect, sent)
    check_query(lake, expect)
    assert committed_offsets(runner.brokers, group, name, PARTITIONS) == check_chains(lake, name, PARTITIONS)

    # every kill landed mid-stream: the lake had grown since the kill before, not yet complete
    random_kills = [r for r in kills if r["step"] == "random"]
    assert all(r["before"] < r["at_kill"] < summary.messages for r in random_kills), kills
    assert all(r["at_kill"] < summary.messages for r in kills), kills
    if KILLS >= 9:  # each injected step came round at least once
        assert len(evidence) == len(HOOKS), evidence
    entries = sum(len(load_partition(lake, name, p).entries) for p in range(PARTITIONS))
    print(
        f"{len(kills)} kills in {kill_seconds:.0f}s ({dict(Counter(r['step'] for r in kills))}); "
        f"random kills that tore a flush: {sum(bool(r['torn']) for r in random_kills)}; "
        f"evidence {dict(evidence)}; {summary.messages} messages, {summary.events} events, "
        f"{entries} manifest entries"
    )
