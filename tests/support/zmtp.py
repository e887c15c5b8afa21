"""A hand-written ZMTP 3.0 peer (NULL mechanism) over a plain TCP socket, for attacks libzmq will
not send: a multipart message whose last part never comes (libzmq only puts a message on the
wire once it is complete), or a stream of tiny parts. Shared by tests/test_daemon_limits.py and
benchmarks/bench_memory.py.
"""

import socket
import struct
from typing import Optional


def _greeting() -> bytes:
    return b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + b"\0" + bytes(31)


def _command(name: bytes, body: bytes) -> bytes:
    data = bytes([len(name)]) + name + body
    if len(data) < 256:
        return b"\x04" + bytes([len(data)]) + data
    return b"\x06" + struct.pack(">Q", len(data)) + data


def _prop(key: bytes, value: bytes) -> bytes:
    return bytes([len(key)]) + key + struct.pack(">I", len(value)) + value


def frame(data: bytes, more: bool) -> bytes:
    """One ZMTP message frame (short or long form)."""
    flags = 1 if more else 0
    if len(data) < 256:
        return bytes([flags, len(data)]) + data
    return bytes([flags | 2]) + struct.pack(">Q", len(data)) + data


class RawPeer:
    """A DEALER (or REQ) as seen on the wire, without libzmq."""

    def __init__(self, endpoint: str, socket_type: bytes = b"DEALER", timeout: float = 10.0) -> None:
        host, port = endpoint[len("tcp://"):].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.sock.sendall(_greeting())
        got = b""
        while len(got) < 64:
            chunk = self.sock.recv(64 - len(got))
            if not chunk:
                raise ConnectionError("the server closed the connection during the greeting")
            got += chunk
        self.sock.sendall(_command(b"READY", _prop(b"Socket-Type", socket_type)))

    def send_parts(self, part: bytes, count: int, last: bool = False) -> int:
        """Send ``count`` parts of ``part`` with MORE set (the last one without MORE when ``last``);
        returns the bytes sent before the server closed the connection (all of them if it did not)."""
        one = frame(part, True)
        sent = 0
        try:
            for i in range(count):
                data = frame(part, False) if last and i == count - 1 else one
                self.sock.sendall(data)
                sent += len(data)
        except OSError:
            pass
        return sent

    def send_raw(self, data: bytes) -> int:
        """Send prepared frames; the bytes sent before the server closed the connection."""
        try:
            self.sock.sendall(data)
            return len(data)
        except OSError:
            return 0

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True once the server has closed (or reset) the connection within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk: Optional[bytes] = self.sock.recv(65536)
                if not chunk:
                    return True
        except socket.timeout:
            return False
        except OSError:
            return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
