"""meter.systemd: the sd_notify protocol against a real datagram socket, as systemd listens."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meter.systemd import Notifier


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    try:
        yield path, sock
    finally:
        sock.close()


def received(sock: socket.socket) -> list[str]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(2)


def test_outside_systemd_everything_is_a_no_op() -> None:
    notifier = Notifier(env={})
    assert not notifier.enabled
    assert notifier.notify("READY=1") is False
    notifier.ready()
    notifier.watchdog()
    notifier.stopping()


def test_ready_is_sent_once_with_status(notify_socket: tuple[str, socket.socket]) -> None:
    path, sock = notify_socket
    notifier = Notifier(env={"NOTIFY_SOCKET": path})
    notifier.ready("consuming")
    notifier.ready("consuming")
    assert received(sock) == ["READY=1\nSTATUS=consuming"]


def test_stopping(notify_socket: tuple[str, socket.socket]) -> None:
    path, sock = notify_socket
    Notifier(env={"NOTIFY_SOCKET": path}).stopping("flushing")
    assert received(sock) == ["STOPPING=1\nSTATUS=flushing"]


def test_watchdog_pings_at_half_the_interval(notify_socket: tuple[str, socket.socket]) -> None:
    path, sock = notify_socket
    now = [100.0]
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier(env=env, clock=lambda: now[0])
    assert notifier.watchdog_interval == 5.0
    notifier.watchdog()  # first call pings
    now[0] += 4.9
    notifier.watchdog()  # too early
    now[0] += 0.2
    notifier.watchdog()
    assert received(sock) == ["WATCHDOG=1", "WATCHDOG=1"]


@pytest.mark.parametrize(
    "env",
    [
        {"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"},  # meant for another process
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "soon"},
        {},
    ],
)
def test_watchdog_off(notify_socket: tuple[str, socket.socket], env: dict[str, str]) -> None:
    path, sock = notify_socket
    notifier = Notifier(env={"NOTIFY_SOCKET": path, **env})
    assert notifier.watchdog_interval is None
    notifier.watchdog()
    assert received(sock) == []


def test_abstract_socket_address() -> None:
    name = f"meter-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    try:
        assert Notifier(env={"NOTIFY_SOCKET": "@" + name}).notify("READY=1")
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()


def test_a_missing_socket_never_raises(tmp_path: Path) -> None:
    notifier = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled
    assert notifier.notify("READY=1") is False
    notifier.ready()
    notifier.stopping()


def test_relative_socket_paths_are_ignored() -> None:
    assert not Notifier(env={"NOTIFY_SOCKET": "relative/notify"}).enabled


@pytest.mark.integration
def test_daemon_notifies_ready_watchdog_and_stopping(
    tansu: Any, topic: Callable[..., str], tmp_path: Path, notify_socket: tuple[str, socket.socket]
) -> None:
    """`meter run` under a fake systemd: READY=1 after its assignment, WATCHDOG=1 while it
    consumes, STOPPING=1 on SIGTERM, then a clean exit."""
    from meter.brokers import free_port

    path, sock = notify_socket
    name = topic(tansu, 2)
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}
    env.pop("WATCHDOG_PID", None)
    cmd = [sys.executable, "-m", "meter", "run", "--brokers", tansu.bootstrap_servers, "--topic", name]
    cmd += [
        "--lake",
        str(tmp_path / "lake"),
        "--group",
        f"notify-{os.getpid()}",
        "--session-timeout-ms",
        "6000",
    ]
    cmd += ["--metrics-addr", f"127.0.0.1:{free_port()}", "--log-format", "json"]
    log = tmp_path / "meter.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        messages: list[str] = []
        deadline = time.monotonic() + 30
        while not any(m.startswith("READY=1") for m in messages):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no READY=1 within 30 s: {messages}"
            with contextlib.suppress(TimeoutError):
                messages.append(sock.recv(4096).decode())
        deadline = time.monotonic() + 5  # READY=1 is sent just before the assignment is logged
        while b'"msg":"partitions assigned"' not in log.read_bytes():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        time.sleep(1.5)  # the loop pings every 0.5 s (half of WATCHDOG_USEC)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        messages += received(sock)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert messages.count("READY=1\nSTATUS=consuming") == 1, messages
    assert messages.count("WATCHDOG=1") >= 2, messages
    assert "STOPPING=1\nSTATUS=flushing" in messages, messages
    assert messages.index("STOPPING=1\nSTATUS=flushing") > messages.index("READY=1\nSTATUS=consuming")
