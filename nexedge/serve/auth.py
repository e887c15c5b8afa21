"""CurveZMQ authentication for daemon sockets: server key pair plus an allow-list
of client public keys (pyzmq's ``zmq.auth``), with a role per key.

Roles: a client key is allowed on the sockets its role needs, nothing else.
``allowed_clients_dir`` holds a folder per role::

    allowed_clients/cameras/*.key    camera: the frames socket (and the verdict stream)
    allowed_clients/pullers/*.key    puller: the pull endpoint (and the verdict stream)
    allowed_clients/operators/*.key  operator: the control endpoint (and the verdict stream)
    allowed_clients/*.key            camera (keys at the top, as before roles existed)

So a camera's key cannot load a model or drain the sample store. One key may be in
several folders. ``nexedge keys --role ROLE --allow DIR`` puts a new public key in the
right folder.

Server side::

    curve = CurveConfig("keys/server.key_secret", "keys/allowed_clients")
    curve.apply_server(sock, domain="frames")  # before bind; starts the ZAP handler for sock's context
    ...
    curve.refused                 # refused connection attempts (unknown key, wrong role, no/bad CURVE)
    curve.stop()

A client whose public key is in no folder is denied by the ZAP handler (counted
as ``unknown_key``); one whose key is there for another role is denied as
``wrong_role`` (logged with the key's file and what the socket needs); a client
that does not speak CURVE, or has the wrong server key, fails the handshake
(``handshake``). Either way it never gets a message through. The allow-list is
re-read when a folder changes, so removing a key file revokes that client for new
connections.

Key pairs come from ``nexedge keys`` (``zmq.auth.create_certificates``).

Python 3.8, no torch.
"""

import logging
import os
import threading
from typing import Any, Dict, List, Optional, Tuple

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)

_FAIL_EVENTS = {
    getattr(zmq, "EVENT_HANDSHAKE_FAILED_NO_DETAIL", 0x0800): "handshake",
    getattr(zmq, "EVENT_HANDSHAKE_FAILED_PROTOCOL", 0x2000): "handshake",
}
_AUTH_EVENT = getattr(zmq, "EVENT_HANDSHAKE_FAILED_AUTH", 0x4000)


def _load_cert(path: str, what: str, hint: str = "") -> Tuple[bytes, Optional[bytes]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CURVE {what} key file {path} not found{hint}")
    try:
        return zmq.auth.load_certificate(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not a CURVE key file: {e}") from None


class InsecureKeyFile(ValueError):
    """A secret key file others can read or write."""


def check_secret_mode(path: str) -> None:
    """Refuse a secret key file that other users can read or write (mode & 0o007); warn when its
    group can (0o070: fine for a dedicated service group, as in the shipped systemd unit)."""
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o007:
        raise InsecureKeyFile(f"secret key file {path} has mode {mode:04o}: other users can read it; "
                              f"run `chmod 600 {path}` (or 640 for a service group) and rotate the key if it leaked")
    if mode & 0o070:
        log.warning("secret key file %s has mode %04o: its group can read it; 600 is safer unless a service "
                    "group needs it", path, mode)


def load_secret(path: str) -> Tuple[bytes, bytes]:
    """(public, secret) z85 keys from a ``*.key_secret`` file; clear errors when it is not one,
    or when other users can read it (see :func:`check_secret_mode`)."""
    public, secret = _load_cert(path, "secret", " (make one with `nexedge keys`)")
    if not secret:
        raise ValueError(f"{path} holds only a public key; expected the *.key_secret file")
    check_secret_mode(path)
    return public, secret


def load_public(path: str) -> bytes:
    """z85 public key from a ``*.key`` (or ``*.key_secret``) file."""
    return _load_cert(path, "public")[0]


ROLES = ("camera", "puller", "operator")
#: The folder of each role inside allowed_clients_dir (keys at the top of it are cameras).
ROLE_DIRS = {"camera": "cameras", "puller": "pullers", "operator": "operators"}
#: The roles each socket (its ZAP domain) lets in; "*" is any allowed key (e.g. a pull server run alone).
DOMAIN_ROLES: Dict[str, Tuple[str, ...]] = {
    "frames": ("camera",),
    "verdicts": ROLES,
    "pull": ("puller",),
    "control": ("operator",),
    "*": ROLES,
}


class _AllowList:
    """ZAP credentials provider: allows the public keys found in the role folders, for the sockets of
    their roles; counts denials."""

    def __init__(self, folder: str, on_deny: Any) -> None:
        self.folder = folder
        self.on_deny = on_deny
        self._stamp: Optional[Tuple[Any, ...]] = None
        self._keys: Dict[bytes, Dict[str, str]] = {}  # z85 key -> {role: file name}
        self._lock = threading.Lock()
        self.reload()

    def _folders(self) -> List[Tuple[str, str]]:
        """(folder, role) pairs: the top (camera) and each role folder that exists."""
        out = [(self.folder, "camera")]
        for role, sub in ROLE_DIRS.items():
            path = os.path.join(self.folder, sub)
            if os.path.isdir(path):
                out.append((path, role))
        return out

    def _current_stamp(self) -> Tuple[Any, ...]:
        stamp = []
        for path, _ in [(self.folder, "")] + [(os.path.join(self.folder, d), "") for d in ROLE_DIRS.values()]:
            try:
                st = os.stat(path)
                stamp.append((st.st_mtime_ns, st.st_ino))
            except OSError:
                stamp.append(None)
        return tuple(stamp)

    def reload(self) -> int:
        keys: Dict[bytes, Dict[str, str]] = {}
        for path, role in self._folders():
            for name in sorted(os.listdir(path)):
                full = os.path.join(path, name)
                if not name.endswith(".key") or not os.path.isfile(full):
                    continue
                try:
                    public = load_public(full)
                except (ValueError, OSError) as e:
                    log.warning("CURVE allow-list: skipping %s: %s", full, e)
                    continue
                keys.setdefault(public, {})[role] = name[: -len(".key")]
        with self._lock:
            self._keys = keys
            self._stamp = self._current_stamp()
        return len(keys)

    def roles(self, key: bytes) -> Dict[str, str]:
        """{role: key file name} of a z85 public key (empty when it is not allowed at all)."""
        if self._current_stamp() != self._stamp:
            n = self.reload()
            log.info("CURVE allow-list %s reloaded: %d client keys", self.folder, n)
        with self._lock:
            return dict(self._keys.get(key, {}))

    def callback(self, domain: str, key: bytes) -> bool:
        roles = self.roles(key)
        needed = DOMAIN_ROLES.get(domain or "*", ())
        if any(r in roles for r in needed):
            return True
        text = key.decode("ascii", "replace")
        if not roles:
            self.on_deny("unknown_key", text)
        else:
            have = ", ".join(f"{r} ({n}.key)" for r, n in sorted(roles.items()))
            where = " or ".join(ROLE_DIRS[r] + "/" for r in needed)
            self.on_deny("wrong_role", f"{text}: a {have} key may not use the {domain} socket; it needs a "
                         f"{' or '.join(needed)} key (put its public key in {where} of the allow-list)")
        return False


class CurveConfig:
    """Server key pair + allow-list; one ZAP handler per ZeroMQ context it serves."""

    def __init__(self, server_secret_file: str, allowed_clients_dir: str) -> None:
        self.server_public, self.server_secret = load_secret(server_secret_file)
        if not os.path.isdir(allowed_clients_dir):
            raise FileNotFoundError(
                f"allowed-clients folder {allowed_clients_dir} not found (put the clients' *.key files there)"
            )
        self.allowed_clients_dir = allowed_clients_dir
        self.refused = 0
        self.refused_by_reason: Dict[str, int] = {"unknown_key": 0, "wrong_role": 0, "handshake": 0}
        self._count_lock = threading.Lock()
        self._allow = _AllowList(allowed_clients_dir, self._deny)
        if not self._allow._keys:
            log.warning("CURVE allow-list %s is empty: every client will be refused", allowed_clients_dir)
        elif not any(os.path.isdir(os.path.join(allowed_clients_dir, d)) for d in ROLE_DIRS.values()):
            log.warning("CURVE allow-list %s has no role folders (%s): its keys are camera keys only, refused on "
                        "the pull and control endpoints", allowed_clients_dir, ", ".join(ROLE_DIRS.values()))
        self._auths: Dict[int, ThreadAuthenticator] = {}
        self._monitors: List[Tuple[int, threading.Thread, threading.Event]] = []

    def _deny(self, reason: str, detail: str) -> None:
        with self._count_lock:
            self.refused += 1
            self.refused_by_reason[reason] = self.refused_by_reason.get(reason, 0) + 1
        log.warning("refused connection: %s %s", reason, detail)

    def handshake_failed(self, reason: str, endpoint: str) -> None:
        """Count a failed CURVE handshake seen by another socket monitor (the memory guard's)."""
        self._deny(reason, f"(no CURVE or wrong server key) on {endpoint}")

    def start(self, context: Optional[zmq.Context] = None) -> None:
        """Start the ZAP handler for ``context`` (default: the global instance); idempotent."""
        ctx = context or zmq.Context.instance()
        if id(ctx) in self._auths:
            return
        auth = ThreadAuthenticator(ctx, log=logging.getLogger(__name__ + ".zap"))
        auth.start()
        for domain in DOMAIN_ROLES:  # the provider sees the domain and applies its roles
            auth.configure_curve_callback(domain, credentials_provider=self._allow)
        self._auths[id(ctx)] = auth

    def apply_server(self, socket: zmq.Socket, monitor: bool = True, domain: str = "*") -> None:
        """Make ``socket`` a CURVE server (call before bind) letting in the roles of ``domain`` (a key of
        :data:`DOMAIN_ROLES`); count failed handshakes (``monitor``: with its own socket monitor)."""
        if domain not in DOMAIN_ROLES:
            raise ValueError(f"unknown ZAP domain {domain!r}; expected one of {sorted(DOMAIN_ROLES)}")
        self.start(socket.context)
        socket.curve_secretkey = self.server_secret
        socket.curve_publickey = self.server_public
        socket.curve_server = True
        socket.zap_domain = domain.encode("ascii")
        if monitor:
            events = _AUTH_EVENT | sum(_FAIL_EVENTS)
            mon = socket.get_monitor_socket(events)
            stop = threading.Event()
            t = threading.Thread(target=self._watch, args=(mon, stop), name="curve-monitor", daemon=True)
            t.start()
            self._monitors.append((id(socket.context), t, stop))

    def _watch(self, mon: zmq.Socket, stop: threading.Event) -> None:
        from zmq.utils.monitor import recv_monitor_message

        try:
            while not stop.is_set():
                if not mon.poll(200):
                    continue
                ev = recv_monitor_message(mon)
                kind = int(ev["event"])
                if kind == zmq.EVENT_MONITOR_STOPPED:
                    break
                reason = _FAIL_EVENTS.get(kind)
                if reason is not None:  # unknown keys were already counted by the ZAP handler
                    addr = ev.get("endpoint", b"")
                    self._deny(reason, f"(no CURVE or wrong server key) on {addr.decode('ascii', 'replace')}")
        except zmq.ZMQError:
            pass
        finally:
            mon.close(linger=0)

    def stop(self, context: Optional[zmq.Context] = None) -> None:
        """Stop monitors and ZAP handlers (after the served sockets are closed); only
        those of ``context`` when given."""
        keep = []
        for cid, t, stop in self._monitors:
            if context is None or cid == id(context):
                stop.set()
                t.join(timeout=2)
            else:
                keep.append((cid, t, stop))
        self._monitors = keep
        for cid in list(self._auths):
            if context is None or cid == id(context):
                self._auths.pop(cid).stop()

    def key_name(self, z85: str) -> str:
        """The allow-list file name (``alice`` for ``operators/alice.key``) of a client's public key, for logs."""
        roles = self._allow.roles(z85.encode("ascii") if isinstance(z85, str) else z85)
        return ", ".join(sorted(roles.values())) if roles else "key " + str(z85)[:12]

    def counts(self) -> Dict[str, int]:
        with self._count_lock:
            out = dict(self.refused_by_reason)
            out["total"] = self.refused
        return out


class CurveClient:
    """Client side: own key pair plus the server's public key."""

    def __init__(self, client_secret_file: str, server_public_file: str) -> None:
        self.public, self.secret = load_secret(client_secret_file)
        self.server_public = load_public(server_public_file)

    def apply_client(self, socket: zmq.Socket) -> None:
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_serverkey = self.server_public


def _write_new(path: str, text: str, mode: int) -> None:
    """Create ``path`` with ``mode`` from its first byte (O_EXCL: never overwrite, never briefly
    readable by others), via a private temp file linked into place once complete."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits; never adds any beyond ``mode``
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # fails if path appeared meanwhile: no overwrite
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _cert_text(kind: str, public: bytes, secret: Optional[bytes] = None) -> str:
    """The ZPL certificate format ``zmq.auth.load_certificate`` reads."""
    lines = ["#   ****  Generated by nexedge keys  ****", f"#   ZeroMQ CURVE {kind} Certificate"]
    if secret is not None:
        lines.append("#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.")
    lines += ["", "metadata", "curve", f'    public-key = "{public.decode("ascii")}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    return "\n".join(lines) + "\n"


def make_keypair(out_dir: str, name: str) -> Tuple[str, str]:
    """Write ``<name>.key`` (public, 0644) and ``<name>.key_secret`` (0600 from creation) into
    ``out_dir``; refuse to overwrite."""
    safe = "".join(c for c in name if c.isalnum() or c in "-_.").strip(".")
    if not safe or safe != name:
        raise ValueError(f"key name {name!r} must be letters, digits, '-', '_' or '.' (not starting with '.')")
    os.makedirs(out_dir, exist_ok=True)
    public_path, secret_path = (os.path.join(out_dir, name + ext) for ext in (".key", ".key_secret"))
    for path in (public_path, secret_path):
        if os.path.exists(path):
            raise ValueError(f"{path} exists; refusing to overwrite a key (remove it first)")
    public, secret = zmq.curve_keypair()
    _write_new(secret_path, _cert_text("**Secret**", public, secret), 0o600)
    _write_new(public_path, _cert_text("Public", public), 0o644)
    return public_path, secret_path
