"""Daemon configuration: every setting defined once, loaded from flags > env > TOML file,
validated at start into a frozen Config. Secrets are typed so they never print."""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from meter.schema import DEFAULT_LATENESS_MS

ENV_PREFIX = "METER_"
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_HOSTPORT = re.compile(r"\[?[A-Za-z0-9._:-]+\]?:\d{1,5}")
#: librdkafka settings whose values are secrets (never logged).
_SECRET_KEY = re.compile(r"password|secret|token|jaas|\.key($|\.)|private", re.IGNORECASE)
#: Consumer settings meter owns: overriding them would break the commit order or the resume.
MANAGED_KAFKA_KEYS = frozenset(
    {
        "bootstrap.servers",
        "group.id",
        "enable.auto.commit",
        "enable.auto.offset.store",
        "auto.offset.reset",
        "on_commit",
        "error_cb",
        "group.instance.id",
        "session.timeout.ms",
    }
)


class ConfigError(ValueError):
    """A setting is invalid; the message names it."""


class Secret(str):
    """A string that prints as *** (repr, str formatting in logs); `.reveal()` gives the value."""

    def __repr__(self) -> str:
        return "'***'"

    def __str__(self) -> str:
        return "***"

    def reveal(self) -> str:
        return str.__str__(self)


def _positive_int(value: Any) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be a positive integer")
    return number


def _positive_float(value: Any) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be a positive number")
    return number


def _non_negative_float(value: Any) -> float:
    number = float(value)
    if not number >= 0:
        raise ValueError("must be zero or a positive number")
    return number


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _brokers(value: Any) -> str:
    items = [b.strip() for b in str(value).split(",") if b.strip()]
    if not items or not all(_HOSTPORT.fullmatch(b) for b in items):
        raise ValueError(f"expected HOST:PORT[,HOST:PORT...], got {value!r}")
    return ",".join(items)


def _topics(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    topics = tuple(dict.fromkeys(str(t).strip() for t in items if str(t).strip()))
    if not topics:
        raise ValueError("at least one topic is required")
    for topic in topics:
        if not _TOPIC.fullmatch(topic) or topic in (".", ".."):
            raise ValueError(f"invalid Kafka topic name {topic!r}")
    return topics


def _nonempty(value: Any) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError("must not be empty")
    return text


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse_optional(value: Any) -> Any:
        return None if value in (None, "") else parse(value)

    return parse_optional


def _addr(value: Any) -> str:
    text = str(value).strip()
    if not _HOSTPORT.fullmatch(text):
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return text


#: Event columns the usage metrics may be labelled by (`user` through metrics_user_label).
METRIC_LABELS = ("org", "team", "model", "provider", "client")
METRIC_LABELS_DEFAULT = ("org", "team", "model", "provider")


def _metric_labels(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list | tuple) else [value]
    names = tuple(dict.fromkeys(n.strip() for item in items for n in str(item).split(",") if n.strip()))
    for name in names:
        if name not in METRIC_LABELS:
            raise ValueError(f"expected labels from {', '.join(METRIC_LABELS)}, got {name!r}")
    return names


def _series_budget(value: Any) -> int:
    number = int(value)
    if number < 6:
        raise ValueError("must be at least 6 (the token buckets of one label set)")
    return number


def _choice(*options: str) -> Callable[[Any], str]:
    def parse_choice(value: Any) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return str(value)

    return parse_choice


@dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    flag_type: str = "value"  # value | list | bool

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("brokers", _brokers, None, "Kafka bootstrap servers, HOST:PORT[,...]"),
    Setting("topic", _topics, None, "topic to meter (repeatable; env/file: comma list or array)", "list"),
    Setting("group", _nonempty, "meter", "Kafka consumer group id"),
    Setting("lake", _nonempty, None, "lake root directory"),
    Setting(
        "metrics_addr",
        _optional(_addr),
        "127.0.0.1:9464",
        "HOST:PORT of /metrics, /healthz, /readyz ('' = off)",
    ),
    Setting("catalog", _optional(_nonempty), None, "price catalog file (default: the packaged catalog)"),
    Setting(
        "reject_unknown_models",
        _bool,
        False,
        "reject events whose model the catalog lacks (unknown_model)",
        "bool",
    ),
    Setting("batch_max_events", _positive_int, 200_000, "flush when this many events are buffered"),
    Setting("batch_max_bytes", _positive_int, 64 << 20, "flush when this many payload bytes are buffered"),
    Setting("batch_max_age_s", _positive_float, 5.0, "flush when the oldest buffered message is this old"),
    Setting("lateness_days", _positive_float, DEFAULT_LATENESS_MS / 86_400_000, "oldest accepted event age"),
    Setting("commit_interval_s", _positive_float, 5.0, "re-commit durable offsets this often"),
    Setting("consume_batch", _positive_int, 10_000, "most messages per consume() call"),
    Setting(
        "consume_max_bytes",
        _positive_int,
        8 << 20,
        "payload bytes per consume() call: fewer messages per call when they are large",
    ),
    Setting(
        "writer_threads",
        _positive_int,
        2,
        "partition flushes written to the lake at once (one partition's always in order)",
    ),
    Setting("dedup_window_s", _non_negative_float, 600.0, "event-id dedup window in seconds (0 = off)"),
    Setting("dedup_max_ids", _positive_int, 4_000_000, "event ids held for dedup (32-64 MB per million)"),
    Setting("session_timeout_ms", _positive_int, 10_000, "consumer group session timeout"),
    Setting("instance_id", _optional(_nonempty), None, "static group membership id (group.instance.id)"),
    Setting("dlq_topic", _optional(_nonempty), None, "also produce dead-letter rows to this Kafka topic"),
    Setting(
        "log_format", _choice("auto", "json", "text"), "auto", "log format; auto = JSON unless on a terminal"
    ),
    Setting("log_level", _choice("DEBUG", "INFO", "WARNING", "ERROR"), "INFO", "log level"),
    Setting(
        "signatures",
        _choice("off", "verify", "require"),
        "off",
        "signed events: off, verify (unsigned pass, signed must verify) or require",
    ),
    Setting(
        "keyring", _optional(_nonempty), None, "keyring TOML file of signature keys (reloaded on SIGHUP)"
    ),
    Setting(
        "allow_create_time",
        _bool,
        False,
        "check signatures against the arrival clock on topics without LogAppendTime",
        "bool",
    ),
    Setting("signature_max_delay_s", _positive_float, 86_400.0, "oldest accepted signature, vs record time"),
    Setting(
        "metrics_labels",
        _metric_labels,
        METRIC_LABELS_DEFAULT,
        f"labels of the usage metrics, from {', '.join(METRIC_LABELS)} (env/file: comma list or array)",
        "list",
    ),
    Setting("metrics_user_label", _bool, False, "add a `user` label to the usage metrics", "bool"),
    Setting("metrics_series_budget", _series_budget, 5000, "most series of one usage metric family"),
    Setting("metrics_series_ttl_s", _positive_float, 86_400.0, "drop usage series idle for this long"),
    Setting("ready_flush_age_s", _positive_float, 120.0, "/readyz fails when data waits this long unflushed"),
    Setting(
        "rollup_interval_s",
        _optional(_positive_float),
        None,
        "run `meter rollup` on the lake this often, in the background (unset = never)",
    ),
    Setting(
        "policy",
        _optional(_nonempty),
        None,
        "integrity policy file: budgets (published as meter_budget_*), review deadlines, detector settings",
    ),
    Setting(
        "detect_daily",
        _bool,
        False,
        "run the usage-gaming detectors on the previous UTC day at 00:15 UTC (writes LAKE/flags/)",
        "bool",
    ),
)
_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    brokers: str
    topic: tuple[str, ...]
    lake: str
    group: str = "meter"
    metrics_addr: str | None = "127.0.0.1:9464"
    catalog: str | None = None
    reject_unknown_models: bool = False
    batch_max_events: int = 200_000
    batch_max_bytes: int = 64 << 20
    batch_max_age_s: float = 5.0
    lateness_days: float = DEFAULT_LATENESS_MS / 86_400_000
    commit_interval_s: float = 5.0
    consume_batch: int = 10_000
    consume_max_bytes: int = 8 << 20
    writer_threads: int = 2
    dedup_window_s: float = 600.0
    dedup_max_ids: int = 4_000_000
    session_timeout_ms: int = 10_000
    instance_id: str | None = None
    dlq_topic: str | None = None
    log_format: str = "auto"
    log_level: str = "INFO"
    signatures: str = "off"
    keyring: str | None = None
    allow_create_time: bool = False
    signature_max_delay_s: float = 86_400.0
    metrics_labels: tuple[str, ...] = ("org", "team", "model", "provider")
    metrics_user_label: bool = False
    metrics_series_budget: int = 5000
    metrics_series_ttl_s: float = 86_400.0
    ready_flush_age_s: float = 120.0
    rollup_interval_s: float | None = None
    policy: str | None = None
    detect_daily: bool = False
    kafka: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            if value is None and setting.default is None and setting.name in ("brokers", "topic", "lake"):
                raise ConfigError(f"{setting.name}: required (flag {setting.flag} or env {setting.env})")
            try:
                object.__setattr__(self, setting.name, setting.parse(value))
            except (TypeError, ValueError) as error:
                raise ConfigError(f"{setting.name}: {error}") from None
        if self.signatures != "off" and not self.keyring:
            raise ConfigError(f"keyring: required when signatures is {self.signatures}")
        object.__setattr__(self, "kafka", _kafka_settings(self.kafka))

    @property
    def lateness_ms(self) -> int:
        return int(self.lateness_days * 86_400_000)

    def consumer_settings(self) -> dict[str, Any]:
        """librdkafka consumer settings (DESIGN 6): meter commits by hand after the manifest."""
        settings: dict[str, Any] = {key: _reveal(value) for key, value in self.kafka.items()}
        settings.update(
            {
                "bootstrap.servers": self.brokers,
                "group.id": self.group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                # A position the manifest gives is never silently reset: an out-of-range
                # offset surfaces as an error that raises an alarm. Partitions the lake has
                # never seen are assigned at OFFSET_BEGINNING explicitly.
                "auto.offset.reset": "error",
                "fetch.queue.backoff.ms": settings.get("fetch.queue.backoff.ms", 10),
                "session.timeout.ms": self.session_timeout_ms,
            }
        )
        if self.instance_id:
            settings["group.instance.id"] = self.instance_id
        return settings

    def producer_settings(self) -> dict[str, Any]:
        """Settings for meter's own producers (the DLQ topic): the brokers and the
        connection's security settings, none of the consumer's."""
        settings = {
            key: _reveal(value)
            for key, value in self.kafka.items()
            if key.startswith(("security.", "sasl.", "ssl.", "client."))
        }
        settings["bootstrap.servers"] = self.brokers
        return settings

    def redacted(self) -> dict[str, Any]:
        """Every setting with secrets masked: what the daemon logs at start."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "kafka"}
        out["topic"] = list(self.topic)
        out["kafka"] = {k: repr(v) if isinstance(v, Secret) else v for k, v in self.kafka.items()}
        return out


def _reveal(value: str) -> str:
    return value.reveal() if isinstance(value, Secret) else value


def _kafka_settings(raw: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in raw.items():
        if key in MANAGED_KAFKA_KEYS:
            raise ConfigError(f"kafka.{key}: set by meter itself; use meter's own setting instead")
        if not re.fullmatch(r"[a-z0-9_.]+", key):
            raise ConfigError(f"kafka.{key}: not a librdkafka setting name")
        text = (
            value
            if isinstance(value, Secret)
            else str(value).lower()
            if isinstance(value, bool)
            else str(value)
        )
        out[key] = Secret(text) if _SECRET_KEY.search(key) and not isinstance(text, Secret) else text
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; flags default to None so env and file can fill what is unset."""
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file with settings ([kafka] table for librdkafka)"
    )
    for s in SETTINGS:
        if s.flag_type == "list":
            parser.add_argument(s.flag, dest=s.name, action="append", help=s.help)
        elif s.flag_type == "bool":
            parser.add_argument(
                s.flag, dest=s.name, action=argparse.BooleanOptionalAction, default=None, help=s.help
            )
        else:
            parser.add_argument(s.flag, dest=s.name, help=f"{s.help} (default: {s.default})")
    parser.add_argument(
        "--kafka",
        dest="kafka",
        action="append",
        metavar="KEY=VALUE",
        help="librdkafka setting, e.g. security.protocol=SASL_SSL (repeatable); "
        "env METER_KAFKA_<KEY with _ for .>",
    )


def load(args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Flags win over environment, environment over the TOML file, the file over defaults."""
    env = os.environ if env is None else env
    flags = vars(args) if args is not None else {}
    path = flags.get("config") or env.get(ENV_PREFIX + "CONFIG")
    values: dict[str, Any] = {}
    kafka: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as handle:
                document = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"config: cannot read {path}: {error}") from None
        kafka.update(document.pop("kafka", {}) or {})
        for key, value in document.items():
            if key not in _BY_NAME:
                raise ConfigError(f"{key}: unknown setting in {path}")
            values[key] = value
    for s in SETTINGS:
        if s.env in env:
            values[s.name] = env[s.env]
    for key, value in env.items():
        if key.startswith(ENV_PREFIX + "KAFKA_"):
            kafka[key[len(ENV_PREFIX) + 6 :].lower().replace("_", ".")] = value
    for s in SETTINGS:
        if flags.get(s.name) is not None:
            values[s.name] = flags[s.name]
    for item in flags.get("kafka") or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"kafka: expected KEY=VALUE, got {item!r}")
        kafka[key.strip()] = value
    for name in ("brokers", "topic", "lake"):
        if values.get(name) in (None, "", []):
            s = _BY_NAME[name]
            raise ConfigError(
                f"{name}: required (flag {s.flag}, env {s.env}, or '{name}' in the config file)"
            )
    return Config(**values, kafka=kafka)


def settings_table() -> Sequence[tuple[str, str, str, str]]:
    """(flag, env, default, help) of every setting, for docs/operations.md."""
    return [(s.flag, s.env, repr(s.default), s.help) for s in SETTINGS]
