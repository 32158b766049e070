"""ctypes bindings for librdkafka's experimental mock-cluster API (``rd_kafka_mock_*``).

confluent-kafka's bundled librdkafka exports the mock API that librdkafka's own test
suite drives: an in-process Kafka cluster on real loopback ports whose brokers can be
taken down and brought back, slowed down, or told to fail the next N requests of a
given kind. This module loads *the same* librdkafka image that ``confluent_kafka.cimpl``
already loaded (so pointers are interchangeable) and wraps the few calls fault tests need.

Two ways in:

* :class:`OwnedMockCluster` creates its own ``rd_kafka_t`` with ``rd_kafka_new`` and a
  cluster on it with ``rd_kafka_mock_cluster_new``. This uses only the C ABI and is the
  robust path; :class:`meter.brokers.MockCluster` is built on it.
* :func:`attach` finds the cluster of an existing confluent-kafka client that was created
  with ``test.mock.num.brokers``. It reads the ``rd_kafka_t *`` that confluent-kafka keeps
  right after ``PyObject_HEAD`` in its ``Handle`` struct, and checks what it read before
  using it.

The API is experimental in librdkafka (no ABI promise): every symbol is looked up when
this module binds the library, and a missing one raises :class:`MockFaultUnavailable`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import glob
import os
import re
import threading
import weakref
from collections.abc import Iterable
from typing import Any

__all__ = [
    "ApiKey",
    "MockFaultUnavailable",
    "MockFaults",
    "OwnedMockCluster",
    "attach",
    "librdkafka",
    "librdkafka_path",
]

_VP = ctypes.c_void_p
_I16 = ctypes.c_int16
_I32 = ctypes.c_int32
_INT = ctypes.c_int
_SZ = ctypes.c_size_t
_STR = ctypes.c_char_p

_RD_KAFKA_PRODUCER = 0
_RD_KAFKA_CONF_OK = 0


class MockFaultUnavailable(RuntimeError):
    """librdkafka's mock API cannot be reached from this process."""


class ApiKey(enum.IntEnum):
    """Kafka protocol request types (the ``ApiKey`` of a request header)."""

    PRODUCE = 0
    FETCH = 1
    LIST_OFFSETS = 2
    METADATA = 3
    OFFSET_COMMIT = 8
    OFFSET_FETCH = 9
    FIND_COORDINATOR = 10
    JOIN_GROUP = 11
    HEARTBEAT = 12
    LEAVE_GROUP = 13
    SYNC_GROUP = 14
    API_VERSIONS = 18
    INIT_PRODUCER_ID = 22
    OFFSET_FOR_LEADER_EPOCH = 23


# name -> (restype, argtypes); None argtypes means variadic (set per call).
_SIGNATURES: dict[str, tuple[Any, list[Any] | None]] = {
    "rd_kafka_conf_new": (_VP, []),
    "rd_kafka_conf_set": (_INT, [_VP, _STR, _STR, _STR, _SZ]),
    "rd_kafka_conf_destroy": (None, [_VP]),
    "rd_kafka_new": (_VP, [_INT, _VP, _STR, _SZ]),
    "rd_kafka_destroy": (None, [_VP]),
    "rd_kafka_name": (_STR, [_VP]),
    "rd_kafka_err2name": (_STR, [_INT]),
    "rd_kafka_mock_cluster_new": (_VP, [_VP, _INT]),
    "rd_kafka_mock_cluster_destroy": (None, [_VP]),
    "rd_kafka_mock_cluster_handle": (_VP, [_VP]),
    "rd_kafka_handle_mock_cluster": (_VP, [_VP]),
    "rd_kafka_mock_cluster_bootstraps": (_STR, [_VP]),
    "rd_kafka_mock_clear_request_errors": (None, [_VP, _I16]),
    "rd_kafka_mock_push_request_errors_array": (None, [_VP, _I16, _SZ, ctypes.POINTER(_INT)]),
    "rd_kafka_mock_broker_push_request_error_rtts": (_INT, None),
    "rd_kafka_mock_topic_set_error": (None, [_VP, _STR, _INT]),
    "rd_kafka_mock_topic_create": (_INT, [_VP, _STR, _INT, _INT]),
    "rd_kafka_mock_partition_set_leader": (_INT, [_VP, _STR, _I32, _I32]),
    "rd_kafka_mock_broker_set_down": (_INT, [_VP, _I32]),
    "rd_kafka_mock_broker_set_up": (_INT, [_VP, _I32]),
    "rd_kafka_mock_broker_set_rtt": (_INT, [_VP, _I32, _INT]),
    "rd_kafka_mock_coordinator_set": (_INT, [_VP, _STR, _STR, _I32]),
    "rd_kafka_mock_group_initial_rebalance_delay_ms": (None, [_VP, _I32]),
}

_lib: ctypes.CDLL | None = None
_lib_path: str | None = None
_lib_lock = threading.Lock()


def _candidate_paths() -> list[str]:
    """Where the librdkafka that ``confluent_kafka.cimpl`` uses may live, best first."""
    import confluent_kafka.cimpl as cimpl  # loads librdkafka into this process

    found: list[str] = []
    # 1. The image actually mapped into this process (Linux): exactly what cimpl uses.
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and os.path.basename(fields[5]).startswith("librdkafka"):
                    path = fields[5]
                    if path not in found:
                        found.append(path)
    except OSError:
        pass
    # 2. The wheel's vendored copy (auditwheel/delocate put it next to the package).
    pkg_dir = os.path.dirname(os.path.dirname(os.path.abspath(cimpl.__file__ or "")))
    for pattern in (
        os.path.join(pkg_dir, "confluent_kafka.libs", "librdkafka*"),
        os.path.join(pkg_dir, "confluent_kafka", ".dylibs", "librdkafka*"),
        os.path.join(pkg_dir, "confluent_kafka", "librdkafka*"),
    ):
        for path in sorted(glob.glob(pattern)):
            if path not in found:
                found.append(path)
    # 3. A system librdkafka (confluent-kafka built from source against it).
    system = ctypes.util.find_library("rdkafka")
    if system and system not in found:
        found.append(system)
    return found


def _bind(lib: ctypes.CDLL) -> None:
    for name, (restype, argtypes) in _SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError as exc:
            raise MockFaultUnavailable(
                f"librdkafka at {_lib_path!r} does not export {name}; the mock API is "
                "experimental and may have changed in this librdkafka version"
            ) from exc
        fn.restype = restype
        if argtypes is not None:
            fn.argtypes = argtypes


def librdkafka() -> ctypes.CDLL:
    """The librdkafka shared library used by confluent-kafka, with mock-API signatures bound."""
    global _lib, _lib_path
    with _lib_lock:
        if _lib is not None:
            return _lib
        errors: list[str] = []
        for path in _candidate_paths():
            try:
                lib = ctypes.CDLL(path)
            except OSError as exc:
                errors.append(f"{path}: {exc}")
                continue
            if not hasattr(lib, "rd_kafka_mock_cluster_new"):
                errors.append(f"{path}: no rd_kafka_mock_cluster_new")
                continue
            _lib_path = path
            _bind(lib)
            _lib = lib
            return lib
        raise MockFaultUnavailable(
            "could not load the librdkafka used by confluent_kafka.cimpl with its mock API"
            + (": " + "; ".join(errors) if errors else " (no candidate library found)")
        )


def librdkafka_path() -> str:
    """Filesystem path of the library :func:`librdkafka` loaded."""
    librdkafka()
    assert _lib_path is not None
    return _lib_path


def _check(err: int, what: str) -> None:
    if err != 0:
        name = librdkafka().rd_kafka_err2name(err)
        raise RuntimeError(f"{what} failed: {name.decode() if name else err} ({err})")


class MockFaults:
    """Fault injection on one librdkafka mock cluster (an ``rd_kafka_mock_cluster_t *``).

    Broker ids run from 1 to the broker count; ``-1`` means every broker where allowed.
    Error codes are Kafka protocol codes (``confluent_kafka.KafkaError.NOT_COORDINATOR``,
    ``KafkaError.REQUEST_TIMED_OUT``...) or librdkafka's local ``KafkaError._TRANSPORT``,
    which makes the mock broker drop the connection on that request.

    Holds a reference to ``keepalive`` (the object owning the cluster) so the cluster
    cannot be destroyed while this object is in use.
    """

    def __init__(self, mcluster: int, keepalive: object = None) -> None:
        if not mcluster:
            raise ValueError("null rd_kafka_mock_cluster_t pointer")
        self._lib = librdkafka()
        self._mcluster: int | None = mcluster
        self._keepalive = keepalive

    @property
    def pointer(self) -> int:
        """The raw ``rd_kafka_mock_cluster_t *``."""
        if self._mcluster is None:
            raise RuntimeError("mock cluster is closed")
        return self._mcluster

    @property
    def bootstrap_servers(self) -> str:
        """``host:port,...`` of the mock brokers (``rd_kafka_mock_cluster_bootstraps``)."""
        raw = self._lib.rd_kafka_mock_cluster_bootstraps(self.pointer)
        return raw.decode() if raw else ""

    # -- brokers -------------------------------------------------------------------------
    def broker_down(self, broker_id: int = -1) -> None:
        """Disconnect the broker(s) and refuse new connections (no leader change)."""
        _check(self._lib.rd_kafka_mock_broker_set_down(self.pointer, broker_id), "broker_down")

    def broker_up(self, broker_id: int = -1) -> None:
        """Accept connections again."""
        _check(self._lib.rd_kafka_mock_broker_set_up(self.pointer, broker_id), "broker_up")

    def set_rtt(self, rtt_ms: int, broker_id: int = -1) -> None:
        """Delay every response of the broker(s) by ``rtt_ms`` (0 to clear)."""
        _check(self._lib.rd_kafka_mock_broker_set_rtt(self.pointer, broker_id, rtt_ms), "set_rtt")

    # -- injected request errors -------------------------------------------------------------
    def push_request_errors(self, api_key: int, *errors: int) -> None:
        """Fail the next ``len(errors)`` requests of ``api_key`` cluster-wide, in order."""
        if not errors:
            return
        arr = (_INT * len(errors))(*[int(e) for e in errors])
        self._lib.rd_kafka_mock_push_request_errors_array(self.pointer, int(api_key), len(errors), arr)

    def push_broker_request_errors(
        self, broker_id: int, api_key: int, errors_rtts: Iterable[tuple[int, int]]
    ) -> None:
        """Queue ``(error, rtt_ms)`` responses for the next ``api_key`` requests to one broker.

        An error of 0 with an rtt only delays that response. Broker errors take precedence
        over cluster-wide ones. (The C function is variadic; entries are pushed one per call,
        which keeps their order.)
        """
        fn = self._lib.rd_kafka_mock_broker_push_request_error_rtts
        for err, rtt_ms in errors_rtts:
            _check(
                fn(
                    _VP(self.pointer),
                    _I32(broker_id),
                    _I16(int(api_key)),
                    _SZ(1),
                    _INT(int(err)),
                    _INT(int(rtt_ms)),
                ),
                "push_broker_request_errors",
            )

    def clear_request_errors(self, api_key: int) -> None:
        """Drop the cluster-wide errors still queued for ``api_key``."""
        self._lib.rd_kafka_mock_clear_request_errors(self.pointer, int(api_key))

    # -- topics and groups -------------------------------------------------------------------
    def create_topic(self, name: str, partitions: int, replication_factor: int = 1) -> None:
        """Create a topic directly in the mock (it does not implement CreateTopics)."""
        _check(
            self._lib.rd_kafka_mock_topic_create(self.pointer, name.encode(), partitions, replication_factor),
            f"create_topic({name!r})",
        )

    def set_topic_error(self, topic: str, err: int) -> None:
        """Error returned for ``topic`` in Metadata responses (0 to clear)."""
        self._lib.rd_kafka_mock_topic_set_error(self.pointer, topic.encode(), err)

    def set_partition_leader(self, topic: str, partition: int, broker_id: int) -> None:
        """Move a partition's leader (``-1``: leaderless). Creates the topic if missing."""
        _check(
            self._lib.rd_kafka_mock_partition_set_leader(self.pointer, topic.encode(), partition, broker_id),
            "set_partition_leader",
        )

    def set_coordinator(self, key_type: str, key: str, broker_id: int) -> None:
        """Pin the ``"group"`` or ``"transaction"`` coordinator for ``key`` to a broker."""
        _check(
            self._lib.rd_kafka_mock_coordinator_set(self.pointer, key_type.encode(), key.encode(), broker_id),
            "set_coordinator",
        )

    def set_initial_rebalance_delay_ms(self, delay_ms: int) -> None:
        """Group coordinator's wait before the first assignment (librdkafka default 3000)."""
        self._lib.rd_kafka_mock_group_initial_rebalance_delay_ms(self.pointer, delay_ms)


class OwnedMockCluster(MockFaults):
    """A mock cluster on an ``rd_kafka_t`` this object creates and destroys itself.

    Lives until :meth:`close` (or garbage collection / interpreter exit). Clients connect
    to :attr:`bootstrap_servers` like to any cluster.
    """

    def __init__(self, num_brokers: int = 3, *, client_id: str = "meter-mock") -> None:
        if num_brokers < 1:
            raise ValueError("num_brokers must be >= 1")
        lib = librdkafka()
        errstr = ctypes.create_string_buffer(512)
        conf = lib.rd_kafka_conf_new()
        if not conf:
            raise MemoryError("rd_kafka_conf_new failed")
        # This handle never connects anywhere; level 4 hides its "No bootstrap.servers" notice.
        for key, value in (("client.id", client_id), ("log_level", "4")):
            if lib.rd_kafka_conf_set(conf, key.encode(), value.encode(), errstr, 512):
                lib.rd_kafka_conf_destroy(conf)
                raise RuntimeError(f"rd_kafka_conf_set({key}): {errstr.value.decode()}")
        rk = lib.rd_kafka_new(_RD_KAFKA_PRODUCER, conf, errstr, 512)  # takes conf on success
        if not rk:
            lib.rd_kafka_conf_destroy(conf)
            raise RuntimeError(f"rd_kafka_new: {errstr.value.decode()}")
        mcluster = lib.rd_kafka_mock_cluster_new(rk, num_brokers)
        if not mcluster:
            lib.rd_kafka_destroy(rk)
            raise RuntimeError("rd_kafka_mock_cluster_new failed")
        super().__init__(mcluster)
        self.num_brokers = num_brokers
        self._finalizer = weakref.finalize(self, _destroy, lib, mcluster, rk)

    def close(self) -> None:
        """Destroy the cluster and its handle; connected clients see their brokers vanish."""
        if self._mcluster is not None:
            self._mcluster = None
            self._finalizer()

    def __enter__(self) -> OwnedMockCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _destroy(lib: ctypes.CDLL, mcluster: int, rk: int) -> None:
    lib.rd_kafka_mock_cluster_destroy(mcluster)
    lib.rd_kafka_destroy(rk)


# confluent-kafka's C types whose instances start with its ``Handle`` struct:
# { PyObject_HEAD; rd_kafka_t *rk; ... }.
_HANDLE_TYPE_NAMES = ("Producer", "Consumer", "_AdminClientImpl")
_RK_NAME = re.compile(r"^(?P<client_id>.*)#(producer|consumer)-\d+$")


def _readable_writable(addr: int, size: int) -> bool | None:
    """Whether [addr, addr+size) lies in one rw mapping; None where that cannot be told."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                span, perms = line.split()[:2]
                lo, hi = (int(x, 16) for x in span.split("-"))
                if lo <= addr and addr + size <= hi:
                    return perms.startswith("rw")
    except OSError:
        return None
    return False


def _rd_kafka_ptr(client: object) -> int:
    import confluent_kafka.cimpl as cimpl

    handle_types = tuple(
        t for t in (getattr(cimpl, n, None) for n in _HANDLE_TYPE_NAMES) if isinstance(t, type)
    )
    if not handle_types or not isinstance(client, handle_types):
        raise TypeError(f"not a confluent-kafka client: {type(client).__name__}")
    head = object.__basicsize__  # sizeof(PyObject) on this build (16 on 64-bit CPython)
    ptr_size = ctypes.sizeof(_VP)
    if type(client).__basicsize__ < head + ptr_size:
        raise MockFaultUnavailable("unexpected confluent-kafka Handle layout")
    rk = _VP.from_address(id(client) + head).value
    if not rk:
        raise MockFaultUnavailable("client has no rd_kafka_t (closed?)")
    if _readable_writable(rk, 64) is False:
        raise MockFaultUnavailable("pointer read from the client is not a live rd_kafka_t")
    return rk


def attach(client: object, *, expect_client_id: str | None = None) -> MockFaults:
    """The mock cluster a confluent-kafka client started via ``test.mock.num.brokers``.

    The cluster lives as long as ``client``; the returned object keeps ``client`` alive.
    Pass ``expect_client_id`` (the ``client.id`` the client was created with) for a strict
    check that the pointer read from the client is its ``rd_kafka_t``.
    """
    lib = librdkafka()
    rk = _rd_kafka_ptr(client)
    raw_name = lib.rd_kafka_name(rk)
    name = raw_name.decode(errors="replace") if raw_name else ""
    match = _RK_NAME.match(name)
    if match is None or (expect_client_id is not None and match.group("client_id") != expect_client_id):
        raise MockFaultUnavailable(f"pointer read from the client does not name it (rd_kafka_name={name!r})")
    mcluster = lib.rd_kafka_handle_mock_cluster(rk)
    if not mcluster:
        raise MockFaultUnavailable(
            "client was not created with test.mock.num.brokers: it has no mock cluster"
        )
    return MockFaults(mcluster, keepalive=client)
