"""The keyring: which gateways may sign usage events, with what key, for which topics and when.

A TOML file of ``[[key]]`` tables (docs/signing.md)::

    [[key]]
    kid = "gw-eu-2026-01"                       # [A-Za-z0-9._-]{1,64}, sent as meter-kid
    alg = "hmac-sha256"                         # default; or "ed25519"
    secret_ref = "env:METER_KEY_GW_EU"          # hmac: env:NAME or file:PATH, never the secret
    # public_key = "base64 of 32 bytes"         # ed25519 instead of secret_ref
    gateway = "gw-eu"                           # optional: events must say client = gw-eu[/...]
    topics = ["usage"]                          # optional: default any topic
    not_before = "2026-01-01T00:00:00Z"         # optional, inclusive
    not_after = "2026-04-01T00:00:00Z"          # optional, exclusive
    # revoked_at = "2026-02-15T12:00:00Z"       # optional: nothing at or after it verifies

Secrets are resolved when the keyring is loaded (again on every reload), held as
:class:`SecretBytes` (which print as ``***``), compiled into HMAC states, and appear in
no error, log line or metric: errors name the key id and the reference only.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meter.pricing import CatalogError, parse_instant_ms

HMAC_SHA256 = "hmac-sha256"
ED25519 = "ed25519"
ALGORITHMS = (HMAC_SHA256, ED25519)
#: The shortest HMAC secret accepted: 256 bits, the output size of SHA-256.
MIN_SECRET_BYTES = 32
KID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEYS = (
    "kid",
    "alg",
    "secret_ref",
    "public_key",
    "gateway",
    "topics",
    "not_before",
    "not_after",
    "revoked_at",
)
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


class KeyringError(ValueError):
    """A keyring that must not be used; the message names the file and the key, never a secret."""


class SecretBytes(bytes):
    """Key material: prints as ``***`` wherever it is formatted; the bytes are the secret."""

    def __repr__(self) -> str:
        return "b'***'"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"


@dataclass(frozen=True)
class Key:
    """One keyring entry, its secret (or public key) resolved."""

    kid: str
    alg: str = HMAC_SHA256
    secret_ref: str | None = None
    public_key: bytes | None = None
    gateway: str | None = None
    topics: frozenset[str] | None = None
    not_before_ms: int | None = None
    not_after_ms: int | None = None
    revoked_at_ms: int | None = None
    secret: SecretBytes | None = field(default=None, repr=False, compare=False)

    @property
    def window(self) -> tuple[int, int, int]:
        """(not_before, not_after, revoked_at) in epoch ms, open ends as int64 limits."""
        return (
            _INT64_MIN if self.not_before_ms is None else self.not_before_ms,
            _INT64_MAX if self.not_after_ms is None else self.not_after_ms,
            _INT64_MAX if self.revoked_at_ms is None else self.revoked_at_ms,
        )

    def status(self, at_ms: int) -> str:
        """active, revoked, not yet valid or expired at `at_ms` (the order the verifier checks)."""
        not_before, not_after, revoked_at = self.window
        if at_ms >= revoked_at:
            return "revoked"
        if at_ms < not_before:
            return "not yet valid"
        if at_ms >= not_after:
            return "expired"
        return "active"

    def fingerprint(self) -> str:
        """A short, one-way tag of the key material, to tell keys apart without showing them."""
        material = self.secret if self.alg == HMAC_SHA256 else self.public_key
        if not material:
            return "-"
        return hashlib.sha256(b"meter-key-fingerprint\n" + bytes(material)).hexdigest()[:12]


@dataclass(frozen=True)
class Keyring:
    keys: tuple[Key, ...]
    name: str = "keyring"
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for key in self.keys:
            if key.kid in seen:
                raise KeyringError(f"{self.name}: key {key.kid!r} occurs twice")
            seen.add(key.kid)

    def get(self, kid: str) -> Key | None:
        return next((k for k in self.keys if k.kid == kid), None)

    @property
    def has_ed25519(self) -> bool:
        return any(k.alg == ED25519 for k in self.keys)

    @property
    def has_gateways(self) -> bool:
        return any(k.gateway is not None for k in self.keys)


def load_keyring(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Keyring:
    """Read, validate and resolve a keyring file (secrets from `env` or files beside it)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise KeyringError(f"keyring: cannot read {path}: {error}") from None
    return loads_keyring(text, name=str(path), base_dir=path.parent, env=env)


def loads_keyring(
    text: str,
    name: str = "keyring",
    base_dir: str | os.PathLike[str] = ".",
    env: Mapping[str, str] | None = None,
    resolve: bool = True,
) -> Keyring:
    """Parse keyring TOML. With `resolve` off, secret references are checked for form only
    (what `meter keys list` needs on a machine without the secrets)."""
    env = os.environ if env is None else env
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise KeyringError(f"{name}: not valid TOML: {error}") from None
    unknown = set(doc) - {"key"}
    if unknown:
        raise KeyringError(
            f"{name}: unknown top-level entry {sorted(unknown)[0]!r} (expected [[key]] tables)"
        )
    tables = doc.get("key", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise KeyringError(f"{name}: 'key' must be an array of tables ([[key]])")
    warnings: list[str] = []
    keys = tuple(
        _key(table, f"{name}: key #{n}", Path(base_dir), env, resolve, warnings)
        for n, table in enumerate(tables, 1)
    )
    return Keyring(keys, name, tuple(warnings))


def _key(
    table: dict[str, Any],
    where: str,
    base_dir: Path,
    env: Mapping[str, str],
    resolve: bool,
    warnings: list[str],
) -> Key:
    unknown = set(table) - set(_KEYS)
    if unknown:
        raise KeyringError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    kid = table.get("kid")
    if not isinstance(kid, str) or not KID.fullmatch(kid):
        raise KeyringError(f"{where}: kid must be 1-64 characters of A-Z a-z 0-9 . _ -")
    where = f"{where} ({kid!r})"
    alg = table.get("alg", HMAC_SHA256)
    if alg not in ALGORITHMS:
        raise KeyringError(f"{where}: alg must be one of {', '.join(ALGORITHMS)}, got {alg!r}")
    gateway = table.get("gateway")
    if gateway is not None and (not isinstance(gateway, str) or not 1 <= len(gateway.encode()) <= 128):
        raise KeyringError(f"{where}: gateway must be a string of 1-128 bytes")
    topics = table.get("topics")
    if topics is not None:
        if not isinstance(topics, list) or not topics or not all(isinstance(t, str) and t for t in topics):
            raise KeyringError(f"{where}: topics must be a non-empty list of topic names")
        topics = frozenset(topics)
    instants = {
        name: _instant(table.get(name), name, where) for name in ("not_before", "not_after", "revoked_at")
    }
    if (
        instants["not_before"] is not None
        and instants["not_after"] is not None
        and instants["not_after"] <= instants["not_before"]
    ):
        raise KeyringError(f"{where}: not_after is not after not_before")
    secret_ref = table.get("secret_ref")
    public_key = table.get("public_key")
    secret: SecretBytes | None = None
    raw_public: bytes | None = None
    if alg == HMAC_SHA256:
        if public_key is not None:
            raise KeyringError(f"{where}: an hmac-sha256 key takes secret_ref, not public_key")
        if not isinstance(secret_ref, str):
            raise KeyringError(f"{where}: secret_ref (env:NAME or file:PATH) is required")
        secret = _resolve(secret_ref, where, base_dir, env, warnings) if resolve else None
    else:
        if secret_ref is not None:
            raise KeyringError(f"{where}: an ed25519 key takes public_key, not secret_ref")
        raw_public = _public_key(public_key, where)
    return Key(
        kid=kid,
        alg=alg,
        secret_ref=secret_ref,
        public_key=raw_public,
        gateway=gateway,
        topics=topics,
        not_before_ms=instants["not_before"],
        not_after_ms=instants["not_after"],
        revoked_at_ms=instants["revoked_at"],
        secret=secret,
    )


def _instant(value: Any, name: str, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise KeyringError(f"{where}: {name} needs a time zone offset (Z or +hh:mm)")
        return int(value.timestamp() * 1000)
    if isinstance(value, dt.date):
        return int(dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC).timestamp() * 1000)
    if isinstance(value, str):
        try:
            return parse_instant_ms(value)
        except (CatalogError, ValueError):
            pass
    raise KeyringError(f"{where}: {name} must be a date or an RFC 3339 instant, got {value!r}")


def _resolve(
    ref: str, where: str, base_dir: Path, env: Mapping[str, str], warnings: list[str]
) -> SecretBytes:
    """The secret a reference points at, surrounding whitespace stripped (never echoed)."""
    scheme, sep, target = ref.partition(":")
    if not sep or not target:
        raise KeyringError(f"{where}: secret_ref must be env:NAME or file:PATH")
    if scheme == "env":
        if not _ENV_NAME.fullmatch(target):
            raise KeyringError(f"{where}: secret_ref env:{target}: not an environment variable name")
        if target not in env:
            raise KeyringError(f"{where}: secret_ref env:{target}: the variable is not set")
        material = env[target].strip().encode()
    elif scheme == "file":
        path = Path(target) if os.path.isabs(target) else base_dir / target
        try:
            info = path.stat()
            material = path.read_bytes().strip()
        except OSError as error:
            raise KeyringError(f"{where}: secret_ref {ref}: {error.strerror or error}") from None
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            warnings.append(f"{where}: secret file {path} is readable by group or others (chmod 600)")
    else:
        raise KeyringError(f"{where}: secret_ref must start with env: or file:, got {scheme + ':'!r}")
    if len(material) < MIN_SECRET_BYTES:
        raise KeyringError(
            f"{where}: the secret behind {ref} is {len(material)} bytes; "
            f"at least {MIN_SECRET_BYTES} are required"
        )
    return SecretBytes(material)


def _public_key(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise KeyringError(f"{where}: public_key (base64 of the 32-byte Ed25519 key) is required")
    try:
        text = value.strip()
        raw = base64.urlsafe_b64decode(text.replace("+", "-").replace("/", "_") + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise KeyringError(f"{where}: public_key is not base64") from None
    if len(raw) != 32:
        raise KeyringError(f"{where}: public_key decodes to {len(raw)} bytes, not 32")
    return raw


def new_secret() -> str:
    """A fresh HMAC secret: 32 random bytes as 43 base64url characters (used as its UTF-8 bytes)."""
    return base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()


def key_toml(key: Key) -> str:
    """A [[key]] table for `key` (no secret: its reference or public key only)."""
    lines = ["[[key]]", f'kid = "{key.kid}"', f'alg = "{key.alg}"']
    if key.secret_ref is not None:
        lines.append(f'secret_ref = "{key.secret_ref}"')
    if key.public_key is not None:
        lines.append(f'public_key = "{base64.b64encode(key.public_key).decode()}"')
    if key.gateway is not None:
        lines.append(f"gateway = {_toml_string(key.gateway)}")
    if key.topics is not None:
        lines.append("topics = [" + ", ".join(_toml_string(t) for t in sorted(key.topics)) + "]")
    for name, value in (("not_before", key.not_before_ms), ("not_after", key.not_after_ms)):
        if value is not None:
            lines.append(f'{name} = "{format_ms(value)}"')
    if key.revoked_at_ms is not None:
        lines.append(f'revoked_at = "{format_ms(key.revoked_at_ms)}"')
    return "\n".join(lines) + "\n"


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_ms(ms: int) -> str:
    """Epoch milliseconds as RFC 3339 UTC (seconds, or milliseconds when it has any)."""
    instant = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    text = instant.strftime("%Y-%m-%dT%H:%M:%S")
    if ms % 1000:
        text += f".{ms % 1000:03d}"
    return text + "Z"
