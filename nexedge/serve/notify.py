"""systemd notification (``Type=notify``) and watchdog pings over ``NOTIFY_SOCKET``.

Plain datagrams on a Unix socket, as sd_notify(3) documents; no systemd library.
Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op. Python 3.8, no torch.
"""

import os
import socket
from typing import Optional


def _address() -> Optional[str]:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):  # abstract namespace
        return "\0" + addr[1:]
    return addr


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``); True if a notify socket took it."""
    addr = _address()
    if addr is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(addr)
            sock.sendall(state.encode("utf-8"))
        except OSError:
            return False
    return True


def watchdog_interval() -> Optional[float]:
    """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None when no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        return max(int(usec) / 2e6, 0.05)
    except ValueError:
        return None


class Watchdog:
    """Pings ``WATCHDOG=1`` at most every interval, only while ``healthy``."""

    def __init__(self) -> None:
        self.interval = watchdog_interval()
        self._last = 0.0

    def tick(self, now: float, healthy: bool) -> None:
        if self.interval is None or not healthy or now - self._last < self.interval:
            return
        if notify("WATCHDOG=1"):
            self._last = now
