"""Shared fixtures. Brokers start lazily: only tests that request them pay for them.

* ``tansu``: one Tansu broker process for the whole session (stopped at the end).
* ``mock_cluster``: a fresh librdkafka mock cluster per test (milliseconds to start), with
  the group coordinator's initial rebalance delay set to 0 and fault injection on
  ``mock_cluster.faults``.
* ``topic``: ``topic(broker, partitions=1)`` creates a uniquely named topic on ``broker``
  (anything with ``create_topic(name, partitions)``) and returns its name.
* ``consumer_conf``: ``consumer_conf(bootstrap, {key: value})`` gives the consumer settings
  of DESIGN section 6 with a unique group id and ``session.timeout.ms`` 6000.

Tests that use a broker carry ``@pytest.mark.integration``.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest

if TYPE_CHECKING:  # imported inside the fixtures: unit tests never load confluent-kafka
    from faultkit import Runner

    from meter.brokers import MockCluster, TansuBroker


class _HasCreateTopic(Protocol):
    def create_topic(self, name: str, partitions: int = ...) -> None: ...


@pytest.fixture(scope="session")
def tansu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    """A Tansu broker (separate process, memory storage) shared by the session."""
    from meter.brokers import TansuBroker

    log_path = tmp_path_factory.mktemp("tansu") / "tansu.log"
    broker = TansuBroker(log_path=log_path)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def mock_cluster() -> Iterator[MockCluster]:
    """A 3-broker librdkafka mock cluster for one test."""
    from meter.brokers import MockCluster

    cluster = MockCluster(3, initial_rebalance_delay_ms=0)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def runner(tansu: TansuBroker, tmp_path: Path) -> Iterator[Runner]:
    """Starts `meter run` processes on Tansu for one test (tests/faultkit.py); kills what
    still runs at the end and prints the ends of their logs."""
    from faultkit import Runner

    r = Runner(tansu.bootstrap_servers, tmp_path)
    try:
        yield r
    finally:
        r.close()


def _slug(nodeid: str) -> str:
    name = nodeid.rsplit("::", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:80] or "t"


@pytest.fixture
def topic(request: pytest.FixtureRequest) -> Callable[..., str]:
    """Factory: ``topic(broker, partitions=1, prefix=None)`` -> a new, uniquely named topic."""
    base = _slug(request.node.nodeid)

    def make(broker: _HasCreateTopic, partitions: int = 1, prefix: str | None = None) -> str:
        name = f"{prefix or base}-{uuid.uuid4().hex[:10]}"
        broker.create_topic(name, partitions)
        return name

    return make


@pytest.fixture
def consumer_conf(request: pytest.FixtureRequest) -> Callable[..., dict[str, Any]]:
    """Factory: consumer settings for tests (explicit commits, fast fetch, 6 s session)."""
    base = _slug(request.node.nodeid)

    def make(bootstrap_servers: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap_servers,
            "group.id": f"{base}-{uuid.uuid4().hex[:10]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "fetch.queue.backoff.ms": 10,
            "session.timeout.ms": 6000,
        }
        conf.update(overrides or {})
        return conf

    return make


def pytest_sessionstart(session: pytest.Session) -> None:
    """`make test-asan` sets METER_EXPECT_DEBUG_BUILD: fail fast unless the sanitizer build loaded."""
    if os.environ.get("METER_EXPECT_DEBUG_BUILD"):
        import meter._parser

        if not meter._parser.DEBUG:
            raise pytest.UsageError(f"expected the debug build of the parser, got {meter._parser.__file__}")
