"""A gateway's retries are counted once, end to end: `meter gen --duplicate-ratio 0.05` re-sends
5% of its messages byte for byte (same key, so the same partition), `meter run` (a real
process, on Tansu) is SIGKILLed once mid-stream and restarted, and the lake holds exactly the
unique events sent, with one `duplicate_event` DLQ row per re-sent event (so every Kafka
message still gives one row per line). A re-sent bad event is rejected again for its own
reason; only valid events carry an id to deduplicate.

CI size: 20k event slots. Long run: METER_DEDUP_EVENTS=1000000.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from faultkit import Expect, Runner, check_lake, check_query, env_int, lake_messages, read_back, wait_landed

from meter.manifest import totals
from meter.reasons import DUPLICATE_EVENT

pytestmark = pytest.mark.integration

EVENTS = env_int("METER_DEDUP_EVENTS", 20_000)
RATE = max(2_000, EVENTS // 60)
PARTITIONS = 4
SESSION_TIMEOUT_MS = 2000
KAFKA = {"heartbeat.interval.ms": 400}


def test_resent_messages_are_not_double_counted(
    runner: Runner, tansu: Any, topic: Callable[..., str]
) -> None:
    name = topic(tansu, PARTITIONS)
    lake = runner.tmp / "lake"
    group = f"meter-dedup-{uuid.uuid4().hex[:8]}"
    options: dict[str, Any] = {
        "session_timeout_ms": SESSION_TIMEOUT_MS,
        "batch_max_age_s": 0.3,
        "kafka": KAFKA,
    }
    first = runner.start(name, lake, group, runner.log("meter-run-dedup"), **options)
    first.wait_assigned()
    gen = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meter",
            "gen",
            "--brokers",
            runner.brokers,
            "--topic",
            name,
            "--events",
            str(EVENTS),
            "--per-message",
            "4",
            "--bad-ratio",
            "0.02",
            "--duplicate-ratio",
            "0.05",
            "--rate",
            str(RATE),
            "--seed",
            "5",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # kill once the lake holds some of the stream: ids seen before the crash must be
        # rebuilt from the lake by the next run, retries in flight re-read and caught again
        deadline = time.monotonic() + 60
        while lake_messages(lake) < EVENTS // 40:
            assert gen.poll() is None, "meter gen finished before the kill"
            assert time.monotonic() < deadline, "the daemon flushed nothing"
            time.sleep(0.1)
        first.kill()
        second = runner.start(name, lake, group, runner.log("meter-run-dedup"), **options)
        out, err = gen.communicate(timeout=EVENTS / RATE + 120)
    finally:
        if gen.poll() is None:
            gen.kill()
    assert gen.returncode == 0, err.decode()
    summary = json.loads(out)
    assert summary["resent_messages"] > 0 and summary["resent_events"] > 0
    sent = read_back(runner.brokers, name, PARTITIONS, summary["messages"])
    wait_landed(lake, summary["messages"], [second])
    assert second.stop() == 0

    t = totals(lake)
    assert t.accepted == summary["events"], "a re-sent event was counted twice (or an event was lost)"
    assert t.rejects_by_reason.get(DUPLICATE_EVENT, 0) == summary["resent_events"]
    expect = Expect.of(summary)
    check_lake(lake, name, PARTITIONS, expect, sent)
    check_query(lake, expect)
    print(
        f"{summary['messages']} messages ({summary['resent_messages']} re-sent), {summary['events']} unique "
        f"events, {summary['resent_events']} duplicate_event rows"
    )


def test_dedup_memory_stays_under_its_cap_within_one_generation(tmp_path: Path) -> None:
    """`dedup_max_ids` bounds the ids held even when more than that many arrive within one
    generation (window / 4: 150 s by default, so from about 27k events/s at the default cap of
    4M): the cap may shorten the window, never let memory grow with the rate. The newest
    generation cannot be dropped today, so it grows past the cap (the soak run shows RSS
    climbing with it)."""
    from meter.dedup import Dedup
    from meter.gen import plan
    from meter.pricing import load_catalog
    from meter.schema import DEFAULT_LATENESS_MS
    from meter.stages import Chunk, ParseAndPrice, Rows, Terminal

    class Sink(Terminal[Rows]):
        def submit(self, item: Rows) -> None:
            return None

    now = [1_000.0]
    dedup = Dedup(Sink(), str(tmp_path), window_s=600.0, max_ids=1_000, clock=lambda: now[0])
    parse = ParseAndPrice(dedup, load_catalog(None), DEFAULT_LATENESS_MS)
    payloads: list[bytes | None] = [m.value for m in plan(events=5_000, seed=3)]
    for start in range(0, len(payloads), 500):  # ten batches within one second
        part = payloads[start : start + 500]
        parse.submit([Chunk("t", 0, part, list(range(start, start + len(part))), 0)])
        now[0] += 0.1
        dedup.poll()
    assert dedup.held_ids <= 1_000, f"{dedup.held_ids} ids held, cap 1000"
