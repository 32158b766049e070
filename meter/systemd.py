"""systemd's service notification protocol (sd_notify), without libsystemd.

Under a unit with ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a datagram socket path,
or an abstract one starting with ``@``); the daemon sends newline-separated ``KEY=VALUE``
state there. meter sends:

* ``READY=1`` once, when the consumer has joined its group and resumed every assigned
  partition from the manifest: ``systemctl start`` returns only then, so ordering and
  health checks see a daemon that really consumes;
* ``WATCHDOG=1`` from the consume loop, at half of ``WATCHDOG_USEC`` (``WatchdogSec=``):
  a loop stuck for longer makes systemd kill and restart the daemon;
* ``STOPPING=1`` when a stop begins (the final flush may take a while).

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op. A send that fails is
ignored: notification must never stop the daemon.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping

__all__ = ["Notifier", "notifier"]


def _address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):  # abstract namespace socket (Linux)
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock and other forms are not used for services


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between pings: half of WATCHDOG_USEC, when the watchdog is meant for us."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # set for another process (e.g. a wrapper that started us)
    return int(usec) / 2_000_000


class Notifier:
    """Sends state to systemd; every method is a cheap no-op when not under systemd."""

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        env = os.environ if env is None else env
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(env) if self.address is not None else None
        self.clock = clock
        self.ready_sent = False
        self._last_ping = float("-inf")

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *states: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; True when it was sent."""
        if self.address is None or not states:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall("\n".join(states).encode())
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> None:
        """READY=1, the first time only."""
        if not self.ready_sent:
            self.ready_sent = True
            self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> None:
        """WATCHDOG=1, at most once per half watchdog interval (call it from every loop turn)."""
        if self.watchdog_interval is None:
            return
        now = self.clock()
        if now - self._last_ping >= self.watchdog_interval:
            self._last_ping = now
            self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> None:
        self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))


_notifier: Notifier | None = None


def notifier() -> Notifier:
    """The process's notifier, created from the environment on first use."""
    global _notifier
    if _notifier is None:
        _notifier = Notifier()
    return _notifier
