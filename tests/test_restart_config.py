"""Static group membership and the session timeout in the consumer configuration.

Neither broker the tests can start (Tansu, librdkafka's mock cluster) gives static
membership its benefit (a restarted static member waits for its join like a new one), so
what meter controls is held here: the settings it hands librdkafka.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from meter import config
from meter.config import Config, ConfigError

BASE: dict[str, Any] = {"brokers": "b1:9092", "topic": ("usage",), "lake": "/lake"}


def parse_flags(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return parser.parse_args(argv)


def test_instance_id_becomes_group_instance_id() -> None:
    settings = Config(**BASE, instance_id="meter-0").consumer_settings()
    assert settings["group.instance.id"] == "meter-0"
    assert settings["group.id"] == "meter"


def test_no_instance_id_means_dynamic_membership() -> None:
    assert "group.instance.id" not in Config(**BASE).consumer_settings()
    assert "group.instance.id" not in Config(**BASE, instance_id="").consumer_settings()


def test_instance_id_from_the_environment_as_a_pod_name() -> None:
    env = {"METER_BROKERS": "b1:9092", "METER_TOPIC": "usage", "METER_LAKE": "/lake"}
    settings = config.load(None, {**env, "METER_INSTANCE_ID": "meter-2"})
    assert settings.consumer_settings()["group.instance.id"] == "meter-2"


def test_flag_wins_over_environment_and_file(tmp_path: Path) -> None:
    path = tmp_path / "meter.toml"
    path.write_text('brokers = "b1:9092"\ntopic = ["usage"]\nlake = "/lake"\ninstance_id = "from-file"\n')
    env = {"METER_INSTANCE_ID": "from-env"}
    assert config.load(parse_flags(["--config", str(path)]), env).instance_id == "from-env"
    flags = parse_flags(["--config", str(path), "--instance-id", "from-flag"])
    assert config.load(flags, env).instance_id == "from-flag"
    assert config.load(parse_flags(["--config", str(path)]), {}).instance_id == "from-file"


def test_session_timeout_is_passed_through() -> None:
    assert Config(**BASE).consumer_settings()["session.timeout.ms"] == Config.session_timeout_ms
    assert Config(**BASE, session_timeout_ms=6000).consumer_settings()["session.timeout.ms"] == 6000


@pytest.mark.parametrize("value", [0, -1, "soon"])
def test_session_timeout_must_be_positive(value: Any) -> None:
    with pytest.raises(ConfigError, match="session_timeout_ms"):
        Config(**BASE, session_timeout_ms=value)


@pytest.mark.parametrize("key", ["group.instance.id", "session.timeout.ms", "group.id"])
def test_membership_settings_cannot_be_overridden_through_kafka_table(key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        Config(**BASE, kafka={key: "x"})


def test_static_member_keeps_manual_commits() -> None:
    """Static membership changes nothing of the commit contract (DESIGN 6)."""
    settings = Config(**BASE, instance_id="meter-0").consumer_settings()
    assert settings["enable.auto.commit"] is False
    assert settings["enable.auto.offset.store"] is False


def test_librdkafka_accepts_the_static_member_settings() -> None:
    """A real consumer is created with them (no broker needed: it connects lazily)."""
    from confluent_kafka import Consumer

    settings = Config(**BASE, instance_id="meter-0", session_timeout_ms=6000).consumer_settings()
    consumer = Consumer({**settings, "bootstrap.servers": "127.0.0.1:1", "log_level": 0})
    consumer.close()


def test_deploy_artefacts_use_the_recommended_session_timeout() -> None:
    root = Path(__file__).resolve().parent.parent
    recommended = "session_timeout_ms = 6000"
    assert recommended in (root / "deploy" / "k8s" / "configmap.yaml").read_text()
    assert recommended in (root / "deploy" / "systemd" / "meter.toml").read_text()
    assert "session_timeout_ms: 6000" in (root / "deploy" / "helm" / "meter" / "values.yaml").read_text()
    assert recommended in (root / "docs" / "operations.md").read_text()
