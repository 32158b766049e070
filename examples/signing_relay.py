"""A minimal HTTP-to-Kafka signing relay, for gateways that can only log over HTTP.

    POST /v1/usage
    Authorization: Bearer <RELAY_TOKEN>
    Content-Type: application/x-ndjson

    {"event_id":"req_1","ts":1764000000000,"user":"u-1","model":"gpt-5","input_tokens":10,"output_tokens":2}
    {"event_id":"req_2",...}

Each line is checked with meter's own parser first (the relay never vouches for an event
meter would reject), then signed and produced as one Kafka message, keyed by its user.
Answers 202 {"queued": n} when every line was queued, 400 with each line's reasons
otherwise (then nothing of that request is sent), 401 without the token, 413 over 1 MiB.

The relay holds the signing secret, so it is a trusted component: run it next to the
gateway, listening on loopback or behind TLS, with its own key in meter's keyring (bound
to the gateway with ``gateway = ...`` when events carry it as ``client``).

    RELAY_TOKEN=... METER_KID=relay-1 METER_SECRET_REF=file:/etc/meter/relay-1.secret \\
    METER_BROKERS=broker:9092 python examples/signing_relay.py --listen 127.0.0.1:8787
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from meter.keyring import loads_keyring
from meter.parser import parse_batch
from meter.producer import UsageProducer
from meter.signing import HmacSigner

MAX_BODY = 1 << 20


def make_server(
    producer: UsageProducer, token: str, host: str = "127.0.0.1", port: int = 8787
) -> ThreadingHTTPServer:
    expected = f"Bearer {token}".encode()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path != "/v1/usage":
                return self._reply(404, {"error": "not found"})
            given = (self.headers.get("Authorization") or "").encode()
            if not token or not hmac.compare_digest(given, expected):
                return self._reply(401, {"error": "missing or wrong bearer token"})
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return self._reply(413, {"error": f"body over {MAX_BODY} bytes"})
            lines = [line.rstrip(b"\r") for line in self.rfile.read(length).split(b"\n") if line.strip()]
            result = parse_batch(lines)
            if result.rejects:
                problems = [
                    {"line": r.message_index, "reason": r.reason, "detail": r.detail} for r in result.rejects
                ]
                return self._reply(400, {"error": "invalid events; nothing was sent", "rejects": problems})
            users = result.batch.column("user").to_pylist()
            for line, user in zip(lines, users, strict=True):
                producer.send_value(line, user)
            return self._reply(202, {"queued": len(lines)})

        def _reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # requests are not logged
            return None

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8787", metavar="HOST:PORT")
    args = parser.parse_args(argv)
    env = os.environ
    kid = env["METER_KID"]
    ring = loads_keyring(f'[[key]]\nkid = "{kid}"\nsecret_ref = "{env["METER_SECRET_REF"]}"\n', env=env)
    secret = ring.keys[0].secret
    assert secret is not None
    producer = UsageProducer(env["METER_BROKERS"], env.get("METER_TOPIC", "usage"), HmacSigner(kid, secret))
    host, _, port = args.listen.rpartition(":")
    server = make_server(producer, env.get("RELAY_TOKEN", ""), host, int(port))
    print(f"signing relay on http://{args.listen}/v1/usage", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        undelivered = producer.close()
    return 1 if undelivered else 0


if __name__ == "__main__":
    sys.exit(main())
