"""Restart-to-first-flush of `meter run` on the Tansu broker, after SIGKILL and after SIGTERM.

A producer thread sends steady traffic to a 4-partition topic; one daemon consumes it. Each
round stops the daemon (SIGKILL: a crash; SIGTERM: a graceful stop, waited for), starts a
new one at once and measures, from the new process's start:

* ``assigned``: until it logs its partition assignment (joined the group, resumed from the
  manifest);
* ``first flush``: until the lake's manifest shows a new flush (a partition's position moved).

Medians of ``--rounds`` restarts of each kind are printed. The settings are the recommended
ones (docs/runbook.md): ``session_timeout_ms`` 6000 and ``batch_max_age_s`` 1, plus a static
``instance_id``. Tansu's coordinator waits about half the session timeout before assigning,
and, unlike Apache Kafka 2.3+, treats a restarted static member like a new one, so these
figures are an upper bound of what static membership gives on a real cluster.

    .venv/bin/python benchmarks/bench_restart.py                 # 5 rounds of each kind
    .venv/bin/python benchmarks/bench_restart.py --rounds 3 --json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

RECOMMENDED_SESSION_TIMEOUT_MS = 6000
RECOMMENDED_BATCH_MAX_AGE_S = 1.0
PARTITIONS = 4


@dataclass
class Round:
    kind: str  # kill | term
    stop_s: float  # SIGTERM: until the old process exited (its final flush); SIGKILL: ~0
    assigned_s: float
    first_flush_s: float


@dataclass
class Result:
    session_timeout_ms: int
    batch_max_age_s: float
    static_membership: bool
    rounds: list[Round] = field(default_factory=list)

    def median(self, kind: str, what: str) -> float:
        return statistics.median(getattr(r, what) for r in self.rounds if r.kind == kind)

    def summary(self) -> dict[str, float]:
        out = {}
        for kind in ("kill", "term"):
            if any(r.kind == kind for r in self.rounds):
                for what in ("assigned_s", "first_flush_s", "stop_s"):
                    out[f"{kind}_{what}_median"] = round(self.median(kind, what), 3)
                out[f"{kind}_first_flush_s_max"] = round(
                    max(r.first_flush_s for r in self.rounds if r.kind == kind), 3
                )
        return out


def lake_positions(lake: Path) -> int:
    """Sum of every partition's manifest position: grows with each flush."""
    from meter.manifest import list_partitions, load_partition

    total = 0
    for topic, partition in list_partitions(lake):
        position = load_partition(lake, topic, partition).position
        total += position or 0
    return total


class Daemon:
    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log = log
        self.started = time.monotonic()
        with open(log, "ab") as out:
            self.offset = out.tell()
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def assigned(self) -> bool:
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            return b'"msg":"partitions assigned"' in f.read()

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"meter run exited with {self.proc.returncode}; see {self.log}")


def _wait(what: str, done: object, daemon: Daemon, timeout: float) -> float:
    deadline = daemon.started + timeout
    while not done():  # type: ignore[operator]
        daemon.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout:.0f}s of the restart; see {daemon.log}")
        time.sleep(0.02)
    return time.monotonic() - daemon.started


def measure(
    rounds: int = 5,
    kinds: tuple[str, ...] = ("kill", "term"),
    session_timeout_ms: int = RECOMMENDED_SESSION_TIMEOUT_MS,
    batch_max_age_s: float = RECOMMENDED_BATCH_MAX_AGE_S,
    static_membership: bool = True,
    rate: float = 5000,
    workdir: Path | None = None,
    timeout: float = 60.0,
) -> Result:
    from meter.brokers import TansuBroker, free_port, meter_run_command
    from meter.gen import generate

    work = Path(workdir or tempfile.mkdtemp(prefix="meter-restart-"))
    work.mkdir(parents=True, exist_ok=True)
    lake = work / "lake"
    log = work / "meter.log"
    result = Result(session_timeout_ms, batch_max_age_s, static_membership)
    with TansuBroker(log_path=work / "tansu.log") as broker:
        topic = f"restart-{uuid.uuid4().hex[:8]}"
        broker.create_topic(topic, PARTITIONS)
        stop = threading.Event()
        producer = threading.Thread(
            target=generate,
            args=(broker.bootstrap_servers, topic),
            kwargs={"events": 10**9, "rate": rate, "per_message": 5, "stop": stop},
            daemon=True,
        )
        producer.start()
        cmd = meter_run_command(
            broker.bootstrap_servers,
            topic,
            lake,
            f"restart-{uuid.uuid4().hex[:8]}",
            session_timeout_ms=session_timeout_ms,
            batch_max_age_s=batch_max_age_s,
            metrics_addr=f"127.0.0.1:{free_port()}",
        )
        if static_membership:
            cmd += ["--instance-id", "meter-0"]
        daemon = Daemon(cmd, log)
        try:
            _wait("first assignment", daemon.assigned, daemon, timeout)
            before = lake_positions(lake)
            _wait("first flush", lambda: lake_positions(lake) > before, daemon, timeout)
            for kind in [k for k in kinds for _ in range(rounds)]:
                t_stop = time.monotonic()
                if kind == "kill":
                    daemon.proc.kill()
                else:
                    daemon.proc.send_signal(signal.SIGTERM)
                code = daemon.proc.wait(timeout)
                stop_s = time.monotonic() - t_stop
                if kind == "term" and code != 0:
                    raise RuntimeError(f"SIGTERM: meter run exited with {code}; see {log}")
                before = lake_positions(lake)
                daemon = Daemon(cmd, log)
                assigned_s = _wait("assignment", daemon.assigned, daemon, timeout)
                flush_s = _wait("first flush", lambda b=before: lake_positions(lake) > b, daemon, timeout)
                result.rounds.append(Round(kind, round(stop_s, 3), round(assigned_s, 3), round(flush_s, 3)))
        finally:
            if daemon.proc.poll() is None:
                daemon.proc.send_signal(signal.SIGTERM)
                try:
                    daemon.proc.wait(30)
                except subprocess.TimeoutExpired:
                    daemon.proc.kill()
                    daemon.proc.wait()
            stop.set()
            producer.join(30)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="restarts of each kind (default 5)")
    parser.add_argument("--session-timeout-ms", type=int, default=RECOMMENDED_SESSION_TIMEOUT_MS)
    parser.add_argument("--batch-max-age-s", type=float, default=RECOMMENDED_BATCH_MAX_AGE_S)
    parser.add_argument("--dynamic", action="store_true", help="no group.instance.id")
    parser.add_argument("--rate", type=float, default=5000, help="events per second produced")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    result = measure(
        args.rounds,
        session_timeout_ms=args.session_timeout_ms,
        batch_max_age_s=args.batch_max_age_s,
        static_membership=not args.dynamic,
        rate=args.rate,
    )
    if args.json:
        print(json.dumps({**asdict(result), "summary": result.summary()}, indent=2))
        return 0
    print(
        f"session.timeout.ms={result.session_timeout_ms} batch_max_age_s={result.batch_max_age_s} "
        f"static={'yes' if result.static_membership else 'no'}"
    )
    print(f"{'kind':<6}{'stop s':>9}{'assigned s':>12}{'first flush s':>15}")
    for r in result.rounds:
        print(f"{r.kind:<6}{r.stop_s:>9.2f}{r.assigned_s:>12.2f}{r.first_flush_s:>15.2f}")
    for key, value in result.summary().items():
        print(f"{key:<28}{value:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
