"""`meter keys new|list|check` and `meter sign`: the keyring and signing from a shell.

Nothing here prints a secret except `keys new`, which writes the new secret (or Ed25519
private key) to a file of mode 600 that it creates and never overwrites.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

import orjson

from meter.keyring import (
    ED25519,
    HMAC_SHA256,
    KID,
    Key,
    Keyring,
    KeyringError,
    format_ms,
    key_toml,
    load_keyring,
    loads_keyring,
    new_secret,
)
from meter.signing import Ed25519Signer, HmacSigner, Signer

EXIT_OK, EXIT_FAILED = 0, 1
EXPIRY_WARNING_MS = 7 * 86_400_000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _at(text: str | None) -> int:
    from meter.pricing import parse_instant_ms

    return parse_instant_ms(text) if text else _now_ms()


def _write_private(path: str, text: str) -> None:
    """Create `path` with mode 600; refuse to replace an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text + "\n")


def keys_new(args: argparse.Namespace) -> int:
    """Create a key: the secret (or private key) into a new file, the [[key]] table on stdout."""
    if not KID.fullmatch(args.kid):
        raise ValueError("kid must be 1-64 characters of A-Z a-z 0-9 . _ -")
    path = args.secret_file or f"{args.kid}.{'secret' if args.alg == HMAC_SHA256 else 'ed25519'}"
    window: dict[str, Any] = {}
    if args.not_before:
        window["not_before_ms"] = _at(args.not_before)
    if args.not_after:
        window["not_after_ms"] = _at(args.not_after)
    topics = frozenset(args.topic) if args.topic else None
    if args.alg == HMAC_SHA256:
        _write_private(path, new_secret())
        ref = args.secret_ref or f"file:{os.path.abspath(path)}"
        key = Key(args.kid, HMAC_SHA256, secret_ref=ref, gateway=args.gateway, topics=topics, **window)
        where = "the shared secret (give the same file to the gateway)"
    else:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        private = Ed25519PrivateKey.generate()
        seed = private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        _write_private(path, base64.b64encode(seed).decode())
        key = Key(args.kid, ED25519, public_key=public, gateway=args.gateway, topics=topics, **window)
        where = "the gateway's private key (meter needs only the public key below)"
    sys.stdout.write(key_toml(key))
    print(
        f"meter keys new: wrote {where} to {path} (mode 600); append the table to the keyring",
        file=sys.stderr,
    )
    return EXIT_OK


def _rows(keyring: Keyring, at_ms: int, fingerprints: bool) -> list[dict[str, Any]]:
    rows = []
    for key in keyring.keys:
        row = {
            "kid": key.kid,
            "alg": key.alg,
            "status": key.status(at_ms),
            "gateway": key.gateway or "",
            "topics": ",".join(sorted(key.topics)) if key.topics else "*",
            "not_before": format_ms(key.not_before_ms) if key.not_before_ms is not None else "",
            "not_after": format_ms(key.not_after_ms) if key.not_after_ms is not None else "",
            "revoked_at": format_ms(key.revoked_at_ms) if key.revoked_at_ms is not None else "",
            "secret_ref": key.secret_ref or "",
        }
        if fingerprints:
            row["fingerprint"] = key.fingerprint()
        rows.append(row)
    return rows


def _print_rows(rows: list[dict[str, Any]], as_json: bool, out: IO[str]) -> None:
    if as_json:
        out.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if not rows:
        out.write("(no keys)\n")
        return
    names = list(rows[0])
    widths = {n: max(len(n), *(len(str(r[n])) for r in rows)) for n in names}
    out.write("  ".join(n.ljust(widths[n]) for n in names).rstrip() + "\n")
    for row in rows:
        out.write("  ".join(str(row[n]).ljust(widths[n]) for n in names).rstrip() + "\n")


def keys_list(args: argparse.Namespace) -> int:
    """The keys and their status; secrets are not resolved (works without them)."""
    with open(args.keyring, encoding="utf-8") as handle:
        keyring = loads_keyring(handle.read(), name=args.keyring, resolve=False)
    _print_rows(_rows(keyring, _at(args.at), fingerprints=False), args.json, sys.stdout)
    return EXIT_OK


def keys_check(args: argparse.Namespace) -> int:
    """Load the keyring as the daemon would (secrets resolved) and report problems."""
    at_ms = _at(args.at)
    try:
        keyring = load_keyring(args.keyring)
        if keyring.has_ed25519:
            from meter.signing import Policy, Verifier

            Verifier(keyring, Policy())
    except KeyringError as error:
        print(f"meter keys check: {error}", file=sys.stderr)
        return EXIT_FAILED
    _print_rows(_rows(keyring, at_ms, fingerprints=True), args.json, sys.stdout)
    problems = list(keyring.warnings)
    for key in keyring.keys:
        status = key.status(at_ms)
        if (
            status == "active"
            and key.not_after_ms is not None
            and key.not_after_ms - at_ms < EXPIRY_WARNING_MS
        ):
            problems.append(f"key {key.kid!r} expires {format_ms(key.not_after_ms)}: add its successor now")
    if not any(k.status(at_ms) == "active" for k in keyring.keys):
        problems.append("no key is active: every signed message will be rejected")
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    return EXIT_FAILED if args.strict and problems else EXIT_OK


def _signer(args: argparse.Namespace) -> Signer:
    if args.ed25519_key:
        with open(args.ed25519_key, encoding="ascii") as handle:
            seed = base64.b64decode(handle.read().strip())
        return Ed25519Signer(args.kid, seed)
    if args.secret_ref:
        ring = loads_keyring(
            f'[[key]]\nkid = "{args.kid}"\nsecret_ref = "{args.secret_ref}"\n', name="--secret-ref"
        )
    elif args.keyring:
        ring = load_keyring(args.keyring)
    else:
        raise ValueError("give --keyring, --secret-ref or --ed25519-key")
    key = ring.get(args.kid)
    if key is None:
        raise ValueError(f"key {args.kid!r} is not in {ring.name}")
    if key.alg != HMAC_SHA256 or key.secret is None:
        raise ValueError(f"key {args.kid!r} is {key.alg}: sign with its private key (--ed25519-key)")
    return HmacSigner(args.kid, key.secret)


def _messages(stream: IO[bytes]) -> Iterator[bytes]:
    for line in stream:
        line = line.rstrip(b"\r\n")
        if line.strip():
            yield line


def sign(args: argparse.Namespace) -> int:
    """Sign each input line as one message: print its headers (JSON), or produce it."""
    signer = _signer(args)
    stream = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
    producer = None
    if args.brokers:
        from meter.producer import UsageProducer

        kafka = dict(item.split("=", 1) for item in args.kafka)
        producer = UsageProducer(args.brokers, args.topic, signer, kafka=kafka)
    count = 0
    try:
        for value in _messages(stream):
            ts_ms = args.ts
            if producer is not None:
                producer.send_value(value, _user_key(value), ts_ms)
            else:
                headers = signer.sign(args.topic, value, ts_ms)
                shown = {
                    name: (val if name != "meter-sig" else base64.b64encode(val)).decode()
                    for name, val in headers
                }
                doc = {"value": value.decode("utf-8", "replace"), "headers": shown}
                sys.stdout.write(orjson.dumps(doc).decode() + "\n")
            count += 1
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    if producer is not None:
        undelivered = producer.close()
        print(
            f"meter sign: {count - undelivered} of {count} messages delivered to {args.topic}",
            file=sys.stderr,
        )
        return EXIT_FAILED if undelivered else EXIT_OK
    return EXIT_OK


def _user_key(value: bytes) -> bytes | None:
    try:
        doc = orjson.loads(value.split(b"\n", 1)[0])
    except orjson.JSONDecodeError:
        return None
    user = doc.get("user") if isinstance(doc, dict) else None
    return user.encode() if isinstance(user, str) else None
