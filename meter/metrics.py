"""Every metric meter exports, defined once with its help text, and the HTTP endpoint
serving /metrics, /healthz and /readyz. Values move only after the lake is durable."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Info, generate_latest

from meter._version import __version__
from meter.schema import TOKEN_COLUMNS

if TYPE_CHECKING:
    from meter.stages import Durable

BUILD = Info("meter_build", "meter version")
BUILD.info({"version": __version__})
CONSUMED = Counter("meter_messages_consumed_total", "Kafka messages consumed")
SKIPPED = Counter(
    "meter_messages_skipped_total", "consumed messages already in the lake or of a partition no longer owned"
)
ACCEPTED = Counter("meter_events_accepted_total", "events written to the lake")
REJECTED = Counter("meter_events_rejected_total", "dead-letter rows written to the lake", ["reason"])
FLUSHES = Counter("meter_flushes_total", "manifest entries written")
FILES = Counter("meter_files_written_total", "Parquet files written", ["kind"])
BYTES = Counter("meter_lake_bytes_written_total", "Parquet bytes written")
COMMITS = Counter("meter_commits_total", "Kafka offset commits", ["outcome"])
LAST_FLUSH = Gauge("meter_last_flush_timestamp_seconds", "time of the last durable flush")
ASSIGNED = Gauge("meter_assigned_partitions", "Kafka partitions currently assigned")
REBALANCES = Counter("meter_rebalances_total", "partition assignment changes", ["kind"])
PAUSED = Gauge("meter_consumer_paused", "1 while consumption is paused for backpressure")
OFFSET_ALARM = Gauge(
    "meter_offset_out_of_range",
    "1 when the manifest position is outside the broker's log",
    ["topic", "partition"],
)
TOKENS = Counter("meter_tokens_total", "tokens of events written to the lake", ["bucket"])
COST = Counter("meter_cost_usd_total", "cost in USD of events written to the lake")


def record_flush(durable: Durable) -> None:
    entry = durable.entry
    FLUSHES.inc()
    ACCEPTED.inc(entry.accepted)
    for reason, count in entry.rejects_by_reason.items():
        REJECTED.labels(reason).inc(count)
    for record in entry.files:
        FILES.labels(record.kind).inc()
        BYTES.inc(record.bytes)
    for bucket in TOKEN_COLUMNS:
        TOKENS.labels(bucket.removesuffix("_tokens")).inc(entry.tokens.get(bucket, 0))
    COST.inc(float(entry.cost))
    LAST_FLUSH.set(time.time())


def serve(addr: str, ready: Callable[[], bool]) -> ThreadingHTTPServer:
    """Start the endpoint on a daemon thread; `ready` answers /readyz."""
    host, _, port = addr.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                self._send(200, b"ok\n")
            elif self.path == "/readyz":
                ok = ready()
                self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._send(404, b"not found\n")

        def _send(self, code: int, body: bytes, kind: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer((host.strip("[]") or "127.0.0.1", int(port)), Handler)
    threading.Thread(target=server.serve_forever, name="meter-metrics", daemon=True).start()
    return server
