"""Signature verification cost: per message on one core, beside parsing, and end to end.

Part 1 (always): 300-byte usage events (reference mix, padded with an ignored field to
exactly 300 bytes), each signed with HMAC-SHA256 (and, for the Ed25519 row, Ed25519),
headers shaped as confluent-kafka returns them. Pinned to one CPU, in one process:

* `hmac.new().digest()` per message in Python: the baseline;
* meter's batch check, compiled (SHA extensions when the CPU has them, and forced to the
  portable C SHA-256), the full check (headers, key, time, MAC) per message;
* `Verifier.check` on a Chunk (what the daemon's Verify step runs, policy included);
* the pure-Python twin; Ed25519 through `Verifier.check`;
* `meter.parse_batch` on the same messages, so verify and parse costs sit side by side.

Part 2 (`--e2e`): the daemon (`meter run`, a real process) against a Tansu broker, over the
same messages produced twice, once unsigned and once signed; three cases, alternated
`--e2e-runs` times: unsigned traffic with `--signatures off` (the baseline), signed traffic
with `--signatures off`, signed traffic with `--signatures require --allow-create-time`.
Each reports messages per wall-clock second (assignment to the manifest covering them all,
best run), per CPU second of the daemon process and per CPU second of its main thread (the
consumer loop, where verification runs; medians). On a shared machine the CPU rates are
the stable ones: other processes stretch the wall clock, not the CPU a run needs.

    .venv/bin/python benchmarks/bench_verify.py [--messages N] [--runs N] [--json]
    .venv/bin/python benchmarks/bench_verify.py --e2e [--e2e-messages N] [--per-message K]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from meter import _pyverify
from meter.keyring import KeyringError, loads_keyring
from meter.mix import Mix
from meter.parser import COMPILED, parse_batch
from meter.signing import COMPILED as VERIFY_COMPILED
from meter.signing import Ed25519Signer, HmacSigner, Policy, Verifier
from meter.signing import _impl as verify_impl
from meter.stages import Chunk

TOPIC = "usage"
SECRET = b"bench-secret-" + b"s" * 32
SIZE = 300
DAY = 86_400_000


@dataclass
class Result:
    name: str
    messages: int
    seconds: float
    per_s: float
    us_per_message: float
    ratio: float | None = None


def pin_one_core(cpu: int | None) -> int | None:
    if not hasattr(os, "sched_setaffinity"):
        return None
    chosen = min(os.sched_getaffinity(0)) if cpu is None else cpu
    os.sched_setaffinity(0, {chosen})
    return chosen


def messages(n: int, per_message: int = 1, now_ms: int | None = None, size: int = SIZE) -> list[bytes]:
    """n messages of `per_message` reference-mix events, each exactly `size` bytes: optional
    fields dropped while too long, then padded with a field the parser ignores."""
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    mix = Mix(7, "reference", start_ms=now - 3_600_000, span_ms=3_000_000)
    pad_overhead = len(b',"pad":""')
    out = []
    lines: list[bytes] = []
    for event in mix.events(n * per_message):
        raw = mix.encode(event)
        for optional in ("prompt_hash", "request_id", "client", "org", "team"):
            if len(raw) <= size - pad_overhead:
                break
            event.pop(optional, None)
            raw = mix.encode(event)
        lines.append(raw[:-1] + b',"pad":"' + b"x" * (size - pad_overhead - len(raw)) + b'"}')
        if len(lines) == per_message:
            out.append(bytes(bytearray(b"\n".join(lines))))
            lines = []
    return out


def headers_for(values: list[bytes], signer: Any, ts_ms: int) -> list[list[tuple[str, bytes]]]:
    # New objects per message and header, as confluent-kafka's message.headers() makes them.
    return [[(k, bytes(bytearray(v))) for k, v in signer.sign(TOPIC, value, ts_ms)] for value in values]


def timed(fn: Callable[[], Any], runs: int) -> float:
    fn()
    return statistics.median(_once(fn) for _ in range(runs))


def _once(fn: Callable[[], Any]) -> float:
    """CPU seconds of this (pinned, single-threaded) process: per-core cost, and unlike the
    wall clock not stretched by other processes taking turns on the same core."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def micro(n: int, runs: int, n_slow: int) -> list[Result]:
    now = time.time_ns() // 1_000_000
    values = messages(n, now_ms=now)
    assert all(len(v) == SIZE for v in values), {len(v) for v in values}
    signer = HmacSigner("gw-1", SECRET)
    heads = headers_for(values, signer, now - 1000)
    stamps = [(1, now)] * n
    ring = loads_keyring('[[key]]\nkid = "gw-1"\nsecret_ref = "env:S"\n', env={"S": SECRET.decode()})
    policy = Policy("require", allow_create_time=True)
    verifier = Verifier(ring, policy)
    table = verifier.table
    chunk = Chunk(TOPIC, 0, values, list(range(n)), now, heads, stamps)
    results: list[Result] = []

    def add(name: str, count: int, seconds: float) -> None:
        results.append(Result(name, count, seconds, count / seconds, seconds / count * 1e6))

    def stdlib() -> None:
        for value, h in zip(values, heads, strict=True):
            base = b"meter-sig-v1\ngw-1\n" + h[1][1] + b"\nusage\n" + value
            hmac.compare_digest(hmac.new(SECRET, base, hashlib.sha256).digest(), h[2][1])

    add("hmac.new().digest() per message", n, timed(stdlib, runs))

    def batch() -> None:
        verdicts = table.check(values, heads, stamps, TOPIC, now, True, DAY, 300_000)
        assert verdicts.codes.count(0) == n

    if VERIFY_COMPILED:
        verify_impl.select_backend(True)
        label = "SHA-NI" if verify_impl.SHANI else "portable C"
        add(f"meter batch check, compiled [{label}]", n, timed(batch, runs))
        verify_impl.select_backend(False)
        add("meter batch check, compiled [portable C]", n, timed(batch, runs))
        verify_impl.select_backend(True)

    def full() -> None:
        rejects, _ = verifier.check(chunk)
        assert not rejects

    add("Verifier.check (the daemon's Verify step)", n, timed(full, runs))

    slow_values, slow_heads = values[:n_slow], heads[:n_slow]
    py_table = _pyverify.Table([b"gw-1"], [0], [ring.keys[0].window], [ring.keys[0].secret], [None])
    add(
        "meter._pyverify (pure Python)",
        n_slow,
        timed(
            lambda: py_table.check(slow_values, slow_heads, stamps[:n_slow], TOPIC, now, True, DAY, 300_000),
            runs,
        ),
    )
    try:
        ed = Ed25519Signer("gw-ed", bytes(range(32)))
    except KeyringError:  # the optional cryptography package is missing: no Ed25519 row
        ed = None
    if ed is not None:
        import base64

        public = base64.b64encode(ed.public_key()).decode()
        ed_ring = loads_keyring(f'[[key]]\nkid = "gw-ed"\nalg = "ed25519"\npublic_key = "{public}"\n')
        ed_verifier = Verifier(ed_ring, policy)
        ed_chunk = Chunk(
            TOPIC,
            0,
            slow_values,
            list(range(n_slow)),
            now,
            headers_for(slow_values, ed, now - 1000),
            stamps[:n_slow],
        )

        def ed_check() -> None:
            rejects, _ = ed_verifier.check(ed_chunk)
            assert not rejects

        add("Ed25519 via Verifier.check", n_slow, timed(ed_check, runs))

    def parse() -> None:
        result = parse_batch(values, now_ms=now)
        assert not result.rejects, result.rejects[:1]

    add(f"meter.parse_batch [{'compiled' if COMPILED else 'pure'}] (same messages)", n, timed(parse, runs))
    base = results[0].per_s
    for r in results:
        r.ratio = r.per_s / base
    return results


# ---------------------------------------------------------------- end to end


def _produce(brokers: str, topic: str, values: list[bytes], signer: HmacSigner | None) -> None:
    from confluent_kafka import Producer

    producer = Producer(
        {
            "bootstrap.servers": brokers,
            "linger.ms": 20,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": 1_000_000,
            "enable.idempotence": True,
            "acks": "all",
        }
    )
    for i, value in enumerate(values):
        headers = signer.sign(topic, value) if signer is not None else None
        while True:
            try:
                producer.produce(topic, value, key=str(i % 1000), headers=headers)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10_000 == 0:
            producer.poll(0)
    assert producer.flush(120) == 0


def _cpu_seconds(pid: int, main_thread: bool = False) -> float:
    """User + system CPU time of a process, all its threads, or of its main thread only
    (the consumer loop: where verification runs, and what bounds throughput) (Linux /proc)."""
    path = f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat"
    with open(path) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _daemon_rate(
    brokers: str, topic: str, count: int, mode: str, keyring: Path, work: Path, env: dict[str, str]
) -> tuple[float, float, float]:
    """Messages per wall-clock second, per CPU second of the daemon process, and per CPU
    second of its main thread."""
    from meter.brokers import free_port
    from meter.manifest import totals

    lake = work / f"lake-{mode}-{uuid.uuid4().hex[:6]}"
    log = work / f"{lake.name}.log"
    # --gc-threshold: the daemon as it is, or with the cyclic GC's first generation raised
    # (every consumed Message and header tuple is a tracked container; see README).
    launcher = (
        ["-m", "meter"]
        if not GC_THRESHOLD
        else [
            "-c",
            f"import gc, sys; gc.set_threshold({GC_THRESHOLD}, 20, 20); from meter.cli import main; "
            "sys.exit(main(sys.argv[1:]))",
        ]
    )
    cmd = [
        sys.executable, *launcher, "run", "--brokers", brokers, "--topic", topic, "--lake", str(lake),
        "--group", f"bench-{lake.name}", "--session-timeout-ms", "6000", "--batch-max-age-s", "1",
        "--metrics-addr", f"127.0.0.1:{free_port()}", "--log-format", "json", "--signatures", mode,
    ]  # fmt: skip
    if mode != "off":
        cmd += ["--keyring", str(keyring), "--allow-create-time"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
    try:
        deadline = time.monotonic() + 60
        while b'"msg":"partitions assigned"' not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"meter run did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.01)
        started = time.monotonic()
        cpu_started = _cpu_seconds(proc.pid)
        main_started = _cpu_seconds(proc.pid, main_thread=True)
        while True:
            got = totals(lake).messages if (lake / "_meter").is_dir() else 0
            if got >= count:
                break
            if proc.poll() is not None or time.monotonic() - started > 600:
                raise SystemExit(f"meter run stopped at {got} of {count}:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        cpu = _cpu_seconds(proc.pid) - cpu_started
        main = _cpu_seconds(proc.pid, main_thread=True) - main_started
        rejects = totals(lake).rejects_by_reason
        assert not rejects, rejects  # every message verified (require) and parsed
        return count / elapsed, count / cpu, count / main
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        shutil.rmtree(lake, ignore_errors=True)


GC_THRESHOLD = 0

#: End-to-end cases: name -> (topic holds signed messages, the daemon's signatures setting).
CASES = {
    "unsigned traffic, signatures=off": (False, "off"),
    "signed traffic, signatures=off": (True, "off"),
    "signed traffic, signatures=require": (True, "require"),
}
BASELINE = "unsigned traffic, signatures=off"
SIGNED = "signed traffic, signatures=require"


def e2e(n: int, per_message: int, runs: int) -> dict[str, Any]:
    from meter.brokers import TansuBroker

    values = messages(n, per_message=per_message)
    signer = HmacSigner("gw-1", SECRET)
    walls: dict[str, list[float]] = {case: [] for case in CASES}
    cpus: dict[str, list[float]] = {case: [] for case in CASES}
    mains: dict[str, list[float]] = {case: [] for case in CASES}
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp, TansuBroker() as broker:
        work = Path(tmp)
        keyring = work / "keyring.toml"
        keyring.write_text('[[key]]\nkid = "gw-1"\nsecret_ref = "env:BENCH_VERIFY_SECRET"\n')
        env = {"BENCH_VERIFY_SECRET": SECRET.decode()}
        topics = {}
        for signed in (False, True):
            topics[signed] = f"bench-verify-{'signed' if signed else 'plain'}-{uuid.uuid4().hex[:8]}"
            broker.create_topic(topics[signed], 1)
            _produce(broker.bootstrap_servers, topics[signed], values, signer if signed else None)
        for _ in range(runs):
            for case, (signed, mode) in CASES.items():
                wall, cpu, main = _daemon_rate(
                    broker.bootstrap_servers, topics[signed], n, mode, keyring, work, env
                )
                walls[case].append(wall)
                cpus[case].append(cpu)
                mains[case].append(main)
                print(
                    f"  {case}: {wall:,.0f} messages/s, {cpu:,.0f} per CPU second, "
                    f"{main:,.0f} per main-thread CPU second",
                    file=sys.stderr,
                )
    return {
        "messages": n,
        "per_message": per_message,
        "message_bytes": statistics.mean(len(v) for v in values),
        "wall": walls,
        "cpu": cpus,
        "main_thread": mains,
        "best_wall": {case: max(r) for case, r in walls.items()},
        "median_cpu": {case: statistics.median(r) for case, r in cpus.items()},
        "median_main": {case: statistics.median(r) for case, r in mains.items()},
    }


def _e2e_table(result: dict[str, Any], runs: int) -> str:
    lines = [
        f"end to end: {result['messages']:,} messages of {result['per_message']} event(s), "
        f"{result['message_bytes']:.0f} bytes each, {runs} run(s) per case",
        f"{'case':<38} {'best msg/s':>11} {'vs base':>8} {'msg/CPU-s':>10} {'vs base':>8} "
        f"{'msg/main-CPU-s':>15} {'vs base':>8}",
    ]
    wall, cpu, main = result["best_wall"], result["median_cpu"], result["median_main"]
    for case in CASES:
        lines.append(
            f"{case:<38} {wall[case]:>11,.0f} {wall[case] / wall[BASELINE]:>8.1%} {cpu[case]:>10,.0f} "
            f"{cpu[case] / cpu[BASELINE]:>8.1%} {main[case]:>15,.0f} {main[case] / main[BASELINE]:>8.1%}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument(
        "--slow-messages", type=int, default=5_000, help="for the pure-Python and Ed25519 rows"
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cpu", type=int)
    parser.add_argument("--e2e", action="store_true", help="also run the daemon end to end (Tansu)")
    parser.add_argument("--e2e-messages", type=int, default=300_000)
    parser.add_argument("--e2e-runs", type=int, default=2)
    parser.add_argument("--per-message", type=int, default=1, help="events per message in the e2e run")
    parser.add_argument(
        "--gc-threshold",
        type=int,
        default=0,
        help="run the daemon with gc.set_threshold(N, 20, 20) (0: as is)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    meta = {
        "verify": "compiled" if VERIFY_COMPILED else "pure",
        "sha_ni": bool(getattr(verify_impl, "SHANI", False)),
        "parser": "compiled" if COMPILED else "pure",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "message_bytes": SIZE,
        "runs": args.runs,
    }
    e2e_result = None
    global GC_THRESHOLD
    GC_THRESHOLD = args.gc_threshold
    meta["daemon_gc_threshold"] = args.gc_threshold or "default"
    if args.e2e:  # before pinning: the daemon gets the machine, the broker its own process
        e2e_result = e2e(args.e2e_messages, args.per_message, args.e2e_runs)
    meta["cpu"] = pin_one_core(args.cpu)
    results = micro(args.messages, args.runs, args.slow_messages)
    if args.json:
        print(json.dumps({"meta": meta, "micro": [asdict(r) for r in results], "e2e": e2e_result}, indent=2))
        return 0
    print("# " + ", ".join(f"{k}={v}" for k, v in meta.items()))
    print(f"{'what':<48} {'messages':>9} {'messages/s':>12} {'us/msg':>8} {'vs hmac':>8}")
    for r in results:
        print(f"{r.name:<48} {r.messages:>9} {r.per_s:>12,.0f} {r.us_per_message:>8.3f} {r.ratio:>7.2f}x")
    if e2e_result is not None:
        print()
        print(_e2e_table(e2e_result, args.e2e_runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
