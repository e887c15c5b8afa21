"""Memory bounds for ROUTER sockets that libzmq cannot give by itself.

libzmq assembles a whole multipart message before the daemon can read its first
part, and ``ZMQ_MAXMSGSIZE`` bounds each part, not the message: one message of
60 parts of 16 MiB took the daemon from 121 to 1,081 MB, and a peer that never
sends the last part holds its parts forever. Tiny parts are worse: libzmq keeps a
64-byte message structure per part, so 1-byte parts cost about 23 times their
bytes on the wire (measured: 8 MB sent, 184 MB held).

A :class:`SocketGuard` watches one ROUTER socket from the thread that reads it:

* the socket monitor reports each TCP connection's file descriptor when it is
  accepted (and when it goes); the kernel counts the bytes received on it
  (``TCP_INFO.tcpi_bytes_received``);
* every message the thread reads is credited to its connection (``ZMQ_SRCFD``)
  with its bytes plus a per-part allowance for framing;
* so *pending* bytes = received - credited - still in the kernel's receive queue:
  the unfinished message (and any complete messages not read yet) libzmq holds
  for that peer.

Those limits are judged when the daemon has read everything readable from the
socket (a backlog of complete messages the daemon has not got to yet, e.g.
while the machine is loaded, is the daemon's delay, not the peer's): a peer is
disconnected (its socket shut down; libzmq then drops what it held) when its
pending bytes pass ``max_peer_pending`` and none of its messages completed in
the last ``STALL_S``; when they stay above a small slack for
``unfinished_timeout_s`` without a message completing; when the pending bytes
of all guarded sockets together pass ``max_pending`` (the largest stalled peer
first). Whatever the backlog: at ``HARD_FACTOR`` x ``max_peer_pending``; when
the process RSS passes ``rss_limit`` (the peer holding the most data, stalled
for ``RSS_MIN_AGE_S``, first); and a connection past ``max_peers`` is closed at
once.
TCP keepalive and ZMTP heartbeats drop dead peers. Byte accounting needs TCP
(``ipc://`` peers are local processes; only ``max_peers`` applies to them).

:class:`GuardRegistry` holds the guards of one process, applies the
process-wide limits and exports the figures as Prometheus metrics.
Linux only for the byte accounting (elsewhere the guard only counts peers).
Python 3.8, no torch.
"""

import logging
import os
import socket
import struct
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

import zmq

try:  # POSIX; elsewhere the guard only counts peers
    import fcntl
    import termios
except ImportError:  # pragma: no cover
    fcntl = termios = None  # type: ignore[assignment]

log = logging.getLogger("nexedge.serve")

#: Framing credited per part read (ZMTP header up to 9 bytes; a CURVE MESSAGE command adds about 33).
PART_OVERHEAD = 64
#: Credited once per connection for the greeting and handshake (NULL, or CURVE with metadata).
HANDSHAKE_BYTES = 2048
#: Pending bytes below this never count as an unfinished message (a few heartbeats, framing slack).
SLACK = 4096
#: Credited per second per connection for heartbeats (the peer's PONGs to our pings, its own PINGs).
HEARTBEAT_CREDIT_PER_S = 8.0
#: How often the per-connection byte counters are read.
CHECK_INTERVAL_S = 0.02
#: A peer is "stalled" when none of its messages completed for this long (byte limits apply then).
STALL_S = 0.05
#: Past this multiple of max_peer_pending a peer is disconnected even while the daemon is behind.
HARD_FACTOR = 4
#: The RSS rule only picks a peer whose data has been unfinished this long (an honest 32 MiB frame
#: takes about 0.27 s on gigabit Ethernet); 1-byte parts grew RSS by about 450 MB/s on loopback here.
RSS_MIN_AGE_S = 0.2
_TCP_INFO_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received (u64) in Linux struct tcp_info (>= 4.1)
REASONS = ("peer_pending", "unfinished", "total_pending", "rss", "max_peers")


def tcp_bytes_received(fd: int) -> Optional[int]:
    """Bytes libzmq has read from TCP socket ``fd``: what the kernel received, less what still waits in
    its receive queue (kernel memory, bounded by the socket buffer). None: not TCP, or not Linux >= 4.1."""
    if fcntl is None:
        return None
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        info = s.getsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_INFO", 11), 192)
        queued = struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return None
    finally:
        s.close()
    if len(info) < _TCP_INFO_BYTES_RECEIVED + 8:
        return None
    return int(struct.unpack_from("=Q", info, _TCP_INFO_BYTES_RECEIVED)[0]) - max(int(queued), 0)


class Limits:
    """The limits one guard applies (see the module docstring)."""

    def __init__(self, max_peer_pending: int, unfinished_timeout_s: float, max_peers: int,
                 slack: int = SLACK) -> None:
        self.max_peer_pending = int(max_peer_pending)
        self.unfinished_timeout_s = float(unfinished_timeout_s)
        self.max_peers = int(max_peers)
        self.slack = int(slack)


class Peer:
    __slots__ = ("fd", "ino", "address", "t_accept", "mark", "credit", "pending", "t_clear", "t_credit",
                 "t_progress", "closing", "tcp")

    def __init__(self, fd: int, now: float) -> None:
        self.fd = fd
        try:
            self.ino = os.fstat(fd).st_ino
        except OSError:
            self.ino = -1
        try:
            with socket.socket(fileno=os.dup(fd)) as s:
                name = s.getpeername()
                self.address = f"{name[0]}:{name[1]}" if isinstance(name, tuple) else "local"
        except (OSError, TypeError, ValueError):
            self.address = "?"
        self.t_accept = now
        self.mark = HANDSHAKE_BYTES  # bytes received that are accounted for
        self.credit = 0  # bytes read since the last check
        self.pending = 0
        self.t_clear = now  # last time pending was within the slack
        self.t_credit = now
        self.t_progress = now  # last time one of its messages was read
        self.closing = False
        self.tcp = True


class SocketGuard:
    """Peer accounting and limits for one ROUTER socket; every method runs on the socket's own thread
    except the registry's reads of the figures."""

    def __init__(self, sock: zmq.Socket, name: str, limits: Limits, registry: "GuardRegistry",
                 on_handshake_failed: Optional[Callable[[str, str], None]] = None) -> None:
        self.name = name
        self.sock = sock
        self.limits = limits
        self.drained = True  # at the last check, the socket had no complete message left to read
        self.registry = registry
        self.on_handshake_failed = on_handshake_failed
        self.peers: Dict[int, Peer] = {}
        self.disconnects: Dict[str, int] = {r: 0 for r in REASONS}
        self.last_disconnect = 0.0
        self._last_check = 0.0
        events = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
        # Failed CURVE handshakes (no CURVE, wrong server key); unknown keys are counted by the ZAP handler.
        self._fail = {getattr(zmq, n): n for n in ("EVENT_HANDSHAKE_FAILED_NO_DETAIL",
                                                   "EVENT_HANDSHAKE_FAILED_PROTOCOL") if hasattr(zmq, n)}
        for ev in self._fail:
            events |= ev
        self.monitor = sock.get_monitor_socket(events)
        registry.add(self)

    @staticmethod
    def configure(sock: zmq.Socket, heartbeat_s: float) -> None:
        """Socket options that drop dead peers: TCP keepalive, ZMTP heartbeats, a handshake deadline
        (set before bind)."""
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 60)
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 10)
        sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)
        sock.setsockopt(zmq.HANDSHAKE_IVL, 10000)
        if heartbeat_s > 0:
            sock.setsockopt(zmq.HEARTBEAT_IVL, int(heartbeat_s * 1000))
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(3 * heartbeat_s * 1000))

    # -- accounting (the socket's thread) -------------------------------------------------------
    def consumed(self, fd: int, parts: int, nbytes: int) -> None:
        """Credit a message read from connection ``fd``: its body parts and bytes."""
        p = self.peers.get(fd)
        if p is not None:
            p.credit += nbytes + (parts + 1) * PART_OVERHEAD
            p.t_progress = time.monotonic()

    def consumed_frames(self, frames: List[Any]) -> None:
        """Credit a message received with ``copy=False`` (identity frame first)."""
        try:
            fd = frames[0].get(zmq.SRCFD)
        except (zmq.ZMQError, AttributeError, IndexError):
            return
        self.consumed(fd, len(frames) - 1, sum(len(f) for f in frames[1:]))

    def tick(self, now: Optional[float] = None) -> None:
        """Read monitor events; every CHECK_INTERVAL_S, update pending bytes and apply the limits."""
        now = time.monotonic() if now is None else now
        self._events(now)
        if now - self._last_check < CHECK_INTERVAL_S:
            return
        self._last_check = now
        lim = self.limits
        try:
            self.drained = not self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN
        except zmq.ZMQError:
            self.drained = True
        for p in list(self.peers.values()):
            if p.closing or not p.tcp:
                continue
            got = tcp_bytes_received(p.fd)
            if got is None:
                p.tcp = False
                continue
            p.credit += int((now - p.t_credit) * HEARTBEAT_CREDIT_PER_S)
            p.t_credit = now
            p.mark = max(p.mark, min(got, p.mark + p.credit))
            p.credit = 0
            p.pending = max(got - p.mark, 0)
            stalled = now - max(p.t_clear, p.t_progress)  # nothing read from it, something pending
            if p.pending <= lim.slack:
                p.t_clear = now
            elif p.pending > HARD_FACTOR * lim.max_peer_pending:
                self.disconnect(p, "peer_pending", f"{p.pending} bytes unread, over {HARD_FACTOR} x "
                                f"{lim.max_peer_pending}")
            elif not self.drained:
                continue  # complete messages wait for the daemon: it is behind, not this peer
            elif p.pending > lim.max_peer_pending and stalled >= STALL_S:
                self.disconnect(p, "peer_pending", f"{p.pending} bytes unread, over {lim.max_peer_pending}")
            elif stalled > lim.unfinished_timeout_s:
                self.disconnect(p, "unfinished", f"{p.pending} bytes of an unfinished message, no message for "
                                f"{stalled:.1f} s")
        self.registry.check(now)

    def _events(self, now: float) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                ev = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:  # monitor closed
                return
            kind, value = int(ev["event"]), int(ev["value"])
            if kind == zmq.EVENT_ACCEPTED:
                p = self.peers[value] = Peer(value, now)
                if len(self.peers) > self.limits.max_peers:
                    self.disconnect(p, "max_peers", f"{len(self.peers) - 1} connections open already")
            elif kind in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                self.peers.pop(value, None)
            elif kind in self._fail and self.on_handshake_failed is not None:
                self.on_handshake_failed("handshake", ev.get("endpoint", b"").decode("ascii", "replace"))

    def disconnect(self, p: Peer, reason: str, detail: str) -> bool:
        """Shut the peer's TCP connection down (libzmq sees it close and drops what it held)."""
        if p.closing:
            return False
        p.closing = True
        try:
            dup = os.dup(p.fd)
        except OSError:
            return False
        try:
            if os.fstat(dup).st_ino != p.ino:  # the descriptor was reused: not our connection any more
                os.close(dup)
                return False
            s = socket.socket(fileno=dup)
            try:
                self.disconnects[reason] += 1
                self.last_disconnect = time.monotonic()
                s.shutdown(socket.SHUT_RDWR)
            finally:
                s.close()
        except OSError:
            return False
        log.warning("%s socket: disconnected peer %s (%s): %s", self.name, p.address, reason, detail,
                    extra={"fields": {"socket": self.name, "peer": p.address, "reason": reason}})
        return True

    def pending_bytes(self) -> int:
        return sum(p.pending for p in list(self.peers.values()) if not p.closing)

    def close(self) -> None:
        self.registry.remove(self)
        try:
            self.monitor.close(linger=0)
        except zmq.ZMQError:
            pass


class GuardRegistry:
    """The guards of one process: limits across sockets (total pending bytes, RSS) and metrics."""

    def __init__(self, max_pending: int, rss_limit: Optional[int] = None) -> None:
        self.max_pending = int(max_pending)
        self.rss_limit = rss_limit
        self.guards: List[SocketGuard] = []
        self._lock = threading.Lock()
        self._last = 0.0
        self.rss = 0

    def add(self, g: SocketGuard) -> None:
        with self._lock:
            self.guards.append(g)

    def remove(self, g: SocketGuard) -> None:
        with self._lock:
            if g in self.guards:
                self.guards.remove(g)

    def _candidates(self, now: float, min_age: float = STALL_S, drained_only: bool = True) -> List[Any]:
        """(pending, guard, peer) of peers holding data with no message read for ``min_age``, largest first
        (with ``drained_only``: only on sockets the daemon has caught up with)."""
        out = []
        for g in list(self.guards):
            if drained_only and not g.drained:
                continue
            for p in list(g.peers.values()):
                if not p.closing and p.pending > g.limits.slack and now - max(p.t_clear, p.t_progress) >= min_age:
                    out.append((p.pending, g, p))
        out.sort(key=lambda t: -t[0])
        return out

    def check(self, now: float) -> None:
        """Apply the process-wide limits (any guard's thread calls this; one at a time, every 50 ms)."""
        from nexedge.serve.memory import rss_bytes

        if not self._lock.acquire(blocking=False):
            return
        try:
            if now - self._last < 0.05:
                return
            self._last = now
            total = sum(g.pending_bytes() for g in list(self.guards))
            for pending, g, p in self._candidates(now):
                if total <= self.max_pending:
                    break
                if g.disconnect(p, "total_pending", f"{total} bytes pending on all sockets, over {self.max_pending}"):
                    total -= pending
            self.rss = rss_bytes()
            if self.rss_limit and self.rss > self.rss_limit:
                cands = self._candidates(now, RSS_MIN_AGE_S, drained_only=False)
                if cands:
                    pending, g, p = cands[0]
                    g.disconnect(p, "rss", f"process RSS {self.rss >> 20} MiB over sockets.guard.rss_limit "
                                 f"{self.rss_limit >> 20} MiB; this peer holds {pending} unfinished bytes")
        finally:
            self._lock.release()

    def last_disconnect(self) -> float:
        """Monotonic time of the latest disconnect by any guard (0.0 when none)."""
        return max((g.last_disconnect for g in list(self.guards)), default=0.0)

    def collect(self) -> Iterable[Any]:
        """Prometheus families (registered by the daemon)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from nexedge.serve.memory import rss_bytes

        peers = GaugeMetricFamily("nexedge_socket_peers", "Connections open, per socket", labels=["socket"])
        pend = GaugeMetricFamily("nexedge_socket_pending_bytes", "Bytes peers have sent that the daemon has not "
                                 "read as whole messages (unfinished messages, backlog), per socket",
                                 labels=["socket"])
        big = GaugeMetricFamily("nexedge_socket_pending_max_bytes", "Largest pending bytes of one peer, per socket",
                                labels=["socket"])
        disc = CounterMetricFamily("nexedge_socket_disconnects", "Peers disconnected by the memory guard, by "
                                   "socket and reason", labels=["socket", "reason"])
        for g in list(self.guards):
            ps = [p for p in list(g.peers.values()) if not p.closing]
            peers.add_metric([g.name], float(len(ps)))
            pend.add_metric([g.name], float(sum(p.pending for p in ps)))
            big.add_metric([g.name], float(max((p.pending for p in ps), default=0)))
            for r, n in g.disconnects.items():
                disc.add_metric([g.name, r], float(n))
        rss = GaugeMetricFamily("nexedge_process_rss_bytes", "Resident set size of the daemon process")
        rss.add_metric([], float(rss_bytes()))
        fams = [peers, pend, big, disc, rss]
        if self.rss_limit:
            lim = GaugeMetricFamily("nexedge_rss_limit_bytes", "sockets.guard.rss_limit in effect")
            lim.add_metric([], float(self.rss_limit))
            fams.append(lim)
        return fams
