"""Wire protocol of the line daemon: message parsing and verdict encoding.

One ROUTER socket serves two kinds of peers (see docs/protocol.md):

* native clients (DEALER): ``[b"", header, payload]`` (or ``[header, payload]``)
  with a JSON header carrying ``"v": 1``, ``camera``, ``frame_id``, ``encoding``
  (raw | jpeg | png | bmp | tiff | auto), ``dtype`` and ``shape`` for raw arrays, ``ts``,
  ``deadline_ms``, ``bit_depth``;
* unmodified imagezmq ``ImageSender`` clients (REQ): header ``{"msg", "dtype",
  "shape"}`` (raw arrays) or ``{"msg"}`` (JPEG bytes). ``msg`` is the camera
  name, optionally ``"camera|frame_id"``.

The ROUTER sees ``[identity, b"", header, payload]`` for REQ peers and for
DEALER peers that send the empty delimiter; the reply goes back with the same
envelope and is exactly one frame, the JSON verdict.

Python 3.8, no torch.
"""

import collections
import json
import math
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union
from typing import OrderedDict as OrderedDictT

PROTOCOL_VERSION = 1
ENCODINGS = ("raw", "jpeg", "png", "bmp", "tiff", "auto")  # auto: the daemon sniffs JPEG/PNG/BMP/TIFF
RAW_DTYPES = ("uint8", "uint16")
DECISIONS = ("PASS", "REJECT", "RECHECK")
MAX_ID_CHARS = 128
#: Integer frame ids must fit a signed 64-bit integer (every client language can hold them).
MAX_INT_ID = (1 << 63) - 1
#: Default bounds on the JSON header (sockets.max_header_bytes; depth is fixed: v1 headers are flat).
MAX_HEADER_BYTES = 16 << 10
MAX_HEADER_DEPTH = 4

# RECHECK reasons: stable strings (metrics labels, documented in docs/protocol.md).
GARBAGE_HEADER = "garbage_header"
UNSUPPORTED_VERSION = "unsupported_version"
WRONG_FRAME_COUNT = "wrong_frame_count"
OVERSIZE = "oversize"
UNKNOWN_ENCODING = "unknown_encoding"
BAD_DTYPE = "bad_dtype"
BAD_SHAPE = "bad_shape"
EMPTY_IMAGE = "empty_image"
UNDECODABLE = "undecodable"
TOO_MANY_PIXELS = "too_many_pixels"
TOO_MANY_SCANS = "too_many_scans"
QUEUE_FULL = "queue_full"
DEADLINE_PASSED = "deadline_passed"
BACKEND_ERROR = "backend_error"
SHUTTING_DOWN = "shutting_down"
REASONS = (
    GARBAGE_HEADER, UNSUPPORTED_VERSION, WRONG_FRAME_COUNT, OVERSIZE, UNKNOWN_ENCODING, BAD_DTYPE,
    BAD_SHAPE, EMPTY_IMAGE, UNDECODABLE, TOO_MANY_PIXELS, TOO_MANY_SCANS, QUEUE_FULL, DEADLINE_PASSED, BACKEND_ERROR,
    SHUTTING_DOWN,
)
#: Reasons whose frame carries a decodable image (worth saving for relabeling).
DECODABLE_REASONS = (QUEUE_FULL, DEADLINE_PASSED, BACKEND_ERROR, SHUTTING_DOWN)

FrameId = Union[int, str, None]
Buffer = Union[bytes, memoryview]


class ProtocolError(ValueError):
    """A message the daemon cannot inspect; answered with RECHECK ``reason``."""

    def __init__(self, reason: str, detail: str, camera: str = "", frame_id: FrameId = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.camera = camera
        self.frame_id = frame_id


class Request:
    """One parsed frame request (payload not yet decoded)."""

    __slots__ = ("envelope", "kind", "camera", "frame_id", "encoding", "dtype", "shape", "payload", "ts",
                 "deadline_ms", "bit_depth", "answered", "t_recv", "t_wall", "deadline")

    def __init__(self, envelope: List[bytes], kind: str, camera: str, frame_id: FrameId, encoding: str,
                 dtype: Optional[str], shape: Optional[Tuple[int, ...]], payload: Buffer,
                 ts: Optional[float] = None, deadline_ms: Optional[float] = None,
                 bit_depth: Optional[int] = None) -> None:
        self.envelope = envelope
        self.kind = kind
        self.camera = camera
        self.frame_id = frame_id
        self.encoding = encoding
        self.dtype = dtype
        self.shape = shape
        self.payload = payload
        self.ts = ts
        self.deadline_ms = deadline_ms
        self.bit_depth = bit_depth  # significant bits of 16-bit samples (None: sockets.uint16_bit_depth)
        self.answered = False
        # Set when the daemon admits the frame (see nexedge.serve.ledger): monotonic receive time,
        # wall-clock receive time, monotonic deadline.
        self.t_recv = 0.0
        self.t_wall = 0.0
        self.deadline = math.inf


def split_envelope(frames: Sequence[Any]) -> Tuple[List[bytes], List[Any]]:
    """ROUTER frames -> (envelope to echo in the reply, body frames).

    ``[identity, b"", ...]`` (REQ, or DEALER with delimiter) keeps the empty frame
    in the envelope; ``[identity, ...]`` (DEALER without delimiter) does not.
    """
    identity = _to_bytes(frames[0])
    if len(frames) > 1 and len(frames[1]) == 0:
        return [identity, b""], list(frames[2:])
    return [identity], list(frames[1:])


def _to_bytes(f: Any) -> bytes:
    return f if isinstance(f, bytes) else bytes(getattr(f, "bytes", f))


def _buffer(f: Any) -> Buffer:
    """Zero-copy view of a zmq.Frame (or the bytes themselves)."""
    if isinstance(f, (bytes, memoryview)):
        return f
    return f.buffer


def id_problem(value: Any) -> Optional[str]:
    """Why ``value`` is not a valid camera/frame id string (None when it is one).

    Valid: a ``str`` of 1..MAX_ID_CHARS printable characters that encodes as strict
    UTF-8 (no lone surrogates, no C0/DEL/C1 controls, no line/paragraph separators).
    """
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not value or len(value) > MAX_ID_CHARS:
        return f"must be 1..{MAX_ID_CHARS} characters, got {len(value)}"
    if not value.isprintable():
        return "holds a control, separator or surrogate character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # pragma: no cover - isprintable() already refuses surrogates
        return "is not valid UTF-8"
    return None


def _show(value: Any, n: int = 40) -> str:
    """Short ASCII-safe repr for error messages (never raises, never recurses deeply)."""
    try:
        text = ascii(value) if isinstance(value, (str, bytes, int, float, bool, type(None))) else type(value).__name__
    except Exception:  # pragma: no cover - ascii() of these types does not fail
        text = "?"
    return text if len(text) <= n else text[:n] + "..."


def readable_frame_id(value: Any) -> FrameId:
    """``value`` if a client could match a reply by it (int in int64 range, or a valid id string), else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if -MAX_INT_ID <= value <= MAX_INT_ID else None
    if isinstance(value, str) and id_problem(value) is None:
        return value
    return None


def readable_camera(value: Any) -> str:
    return value if isinstance(value, str) and id_problem(value) is None else ""


def _clean_id(value: Any, what: str, camera: str = "", frame_id: FrameId = None) -> str:
    why = id_problem(value)
    if why is not None:
        raise ProtocolError(GARBAGE_HEADER, f"{what} {_show(value)} {why}", camera, frame_id)
    return value


def _parse_shape(shape: Any, camera: str, frame_id: FrameId) -> Tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or len(shape) not in (2, 3) or not all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape
    ):
        raise ProtocolError(BAD_SHAPE, f"shape {_show(shape)}: expected [H, W] or [H, W, C] of non-negative integers",
                            camera, frame_id)
    return tuple(int(x) for x in shape)


def parse_body(envelope: List[bytes], body: List[Any], next_seq: "SeqCounter",
               max_header_bytes: int = MAX_HEADER_BYTES) -> Request:
    """Parse ``[header, payload]`` into a :class:`Request`; raise :class:`ProtocolError` (only)."""
    if len(body) != 2:
        camera, frame_id = "", None
        if body:
            camera, frame_id = peek_ids(body[0], max_header_bytes)
        raise ProtocolError(WRONG_FRAME_COUNT, f"expected 2 frames (header, payload), got {len(body)}",
                            camera, frame_id)
    header = load_header(body[0], max_header_bytes)
    payload = _buffer(body[1])
    if "v" in header:
        return _parse_native(envelope, header, payload)
    if "msg" in header:
        return _parse_imagezmq(envelope, header, payload, next_seq)
    raise ProtocolError(GARBAGE_HEADER, "header has neither 'v' (native) nor 'msg' (imagezmq): keys "
                        f"{[_show(k, 20) for k in sorted(header)[:8]]}")


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def header_depth(raw: bytes) -> int:
    """Deepest ``[``/``{`` nesting of a JSON text (strings skipped), without parsing it."""
    import numpy as np

    b = np.frombuffer(_JSON_STRING.sub(b'""', raw), np.uint8)
    if b.size == 0:
        return 0
    step = ((b == 0x5B) | (b == 0x7B)).astype(np.int32) - ((b == 0x5D) | (b == 0x7D)).astype(np.int32)
    return int(np.cumsum(step).max(initial=0))


def load_header(frame: Any, max_header_bytes: int = MAX_HEADER_BYTES) -> Dict[str, Any]:
    """The header frame as a JSON object, within size and depth bounds; else :class:`ProtocolError`."""
    n = len(frame)
    if n > max_header_bytes:
        raise ProtocolError(GARBAGE_HEADER, f"header of {n} bytes exceeds max_header_bytes {max_header_bytes}")
    raw_header = _to_bytes(frame)
    depth = header_depth(raw_header)
    if depth > MAX_HEADER_DEPTH:
        raise ProtocolError(GARBAGE_HEADER, f"header nests {depth} levels deep; at most {MAX_HEADER_DEPTH} allowed")
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError(GARBAGE_HEADER, f"header is not UTF-8 JSON: {_show(raw_header[:60], 80)}") from None
    if not isinstance(header, dict):
        raise ProtocolError(GARBAGE_HEADER, f"header must be a JSON object, got {type(header).__name__}")
    return header


def peek_ids(frame: Any, max_header_bytes: int = MAX_HEADER_BYTES) -> Tuple[str, FrameId]:
    """Best-effort readable camera/frame id from a header, for error replies; never raises."""
    try:
        h = load_header(frame, max_header_bytes)
    except Exception:
        return "", None
    fid = h.get("frame_id")
    if "msg" in h and "v" not in h and isinstance(h.get("msg"), str):
        cam, sep, fid_s = h["msg"].partition("|")
        return readable_camera(cam), (readable_frame_id(fid_s) if sep else None)
    return readable_camera(h.get("camera")), readable_frame_id(fid)


def _parse_native(envelope: List[bytes], h: Dict[str, Any], payload: Buffer) -> Request:
    fid = h.get("frame_id")
    frame_id = readable_frame_id(fid)
    camera = readable_camera(h.get("camera"))
    v = h.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:  # exactly the integer 1: not true, not 1.0
        raise ProtocolError(UNSUPPORTED_VERSION,
                            f"protocol version {_show(v)} not supported; this daemon speaks the integer "
                            f"{PROTOCOL_VERSION}", camera, frame_id)
    if frame_id is None:
        raise ProtocolError(GARBAGE_HEADER, f"frame_id {_show(fid)}: expected an integer (64-bit) or a string of "
                            f"1..{MAX_ID_CHARS} printable characters", camera)
    camera = _clean_id(h.get("camera"), "camera", "", frame_id)
    enc = h.get("encoding")
    if not isinstance(enc, str) or enc not in ENCODINGS:
        raise ProtocolError(UNKNOWN_ENCODING, f"encoding {_show(enc)}: expected one of {list(ENCODINGS)}",
                            camera, frame_id)
    dtype, shape = None, None
    if enc == "raw":
        dtype = h.get("dtype")
        if not isinstance(dtype, str) or dtype not in RAW_DTYPES:
            raise ProtocolError(BAD_DTYPE, f"dtype {_show(dtype)}: expected one of {list(RAW_DTYPES)}",
                                camera, frame_id)
        shape = _parse_shape(h.get("shape"), camera, frame_id)
    ts = h.get("ts")
    ts = float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) and math.isfinite(ts) else None
    dl = h.get("deadline_ms")
    deadline_ms = float(dl) if isinstance(dl, (int, float)) and not isinstance(dl, bool) and 0 < dl < 1e9 else None
    bits = h.get("bit_depth")
    if bits is not None and (type(bits) is not int or not 1 <= bits <= 16):
        raise ProtocolError(BAD_DTYPE, f"bit_depth {_show(bits)}: expected an integer 1..16 (significant bits of "
                            "16-bit samples, e.g. 12)", camera, frame_id)
    return Request(envelope, "native", camera, frame_id, enc, dtype, shape, payload, ts, deadline_ms, bits)


def _numeric_id(fid: FrameId) -> FrameId:
    """"cam|12" answers frame_id 12, like an auto-numbered frame (ASCII digits, int64 range)."""
    if isinstance(fid, str) and fid.isascii() and fid.isdigit() and len(fid) < 19:
        return int(fid)
    return fid


def _parse_imagezmq(envelope: List[bytes], h: Dict[str, Any], payload: Buffer, next_seq: "SeqCounter") -> Request:
    msg = h.get("msg")
    if not isinstance(msg, str):
        raise ProtocolError(GARBAGE_HEADER, f"imagezmq msg {_show(msg)} must be a string (the camera name)")
    camera_s, sep, fid_s = msg.partition("|")
    fid_read = _numeric_id(readable_frame_id(fid_s)) if sep else None
    camera = _clean_id(camera_s, "imagezmq msg (camera)", "", fid_read)
    frame_id: FrameId = _numeric_id(_clean_id(fid_s, "imagezmq msg frame id", camera)) if sep else next_seq(camera)
    if "dtype" in h or "shape" in h:
        dtype = h.get("dtype")
        if not isinstance(dtype, str) or dtype not in RAW_DTYPES:
            raise ProtocolError(BAD_DTYPE, f"dtype {dtype!r}: expected one of {list(RAW_DTYPES)}", camera, frame_id)
        shape = _parse_shape(h.get("shape"), camera, frame_id)
        return Request(envelope, "imagezmq", camera, frame_id, "raw", dtype, shape, payload)
    # imagezmq's jpg mode: any compressed image bytes; the decoder sniffs the format.
    return Request(envelope, "imagezmq", camera, frame_id, "auto", None, None, payload)


class SeqCounter:
    """Per-camera sequence numbers for peers that send no frame id (imagezmq).

    At most ``max_cameras`` counters are kept; past that the camera idle longest loses its
    counter (the others keep counting). A camera whose counter was dropped, and every camera
    first seen after a drop, continues above the highest number ever handed out, so no camera
    is given a frame id twice.
    """

    def __init__(self, max_cameras: int = 4096) -> None:
        self._n: OrderedDictT[str, int] = collections.OrderedDict()
        self._max = max_cameras
        self._floor = 0  # highest number held by a dropped counter

    def __call__(self, camera: str) -> int:
        n = self._n.pop(camera, None)
        if n is None:
            n = self._floor
            while len(self._n) >= self._max:
                self._floor = max(self._floor, self._n.popitem(last=False)[1])
                n = self._floor
        self._n[camera] = n + 1  # most recently used last
        return n + 1


def verdict(camera: str, frame_id: FrameId, decision: str, score: Optional[float], threshold: Optional[float],
            uncertain: bool, reason: str, model_id: str, latency_ms: float,
            probs: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    """The verdict dict sent to the camera and published on the PUB socket."""
    v: Dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "frame_id": frame_id,
        "camera": camera,
        "decision": decision,
        # Full precision: a score rounded to a few decimals could read 0.0, or below the threshold, on a REJECT.
        "score": None if score is None else float(score),
        "threshold": None if threshold is None else float(threshold),
        "uncertain": bool(uncertain),
        "reason": reason,
        "model_id": model_id,
        "latency_ms": round(float(latency_ms), 3),
    }
    if probs is not None:
        v["probs"] = {k: round(float(p), 6) for k, p in probs.items()}
    return v


def encode_verdict(v: Dict[str, Any]) -> bytes:
    """JSON bytes of a verdict; ASCII-escaped, so any string in it encodes."""
    return json.dumps(v, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def native_header(camera: str, frame_id: FrameId, encoding: str, dtype: Optional[str] = None,
                  shape: Optional[Sequence[int]] = None, ts: Optional[float] = None,
                  deadline_ms: Optional[float] = None, bit_depth: Optional[int] = None) -> bytes:
    """Header of a native v1 request (used by :mod:`nexedge.serve.client`)."""
    h: Dict[str, Any] = {"v": PROTOCOL_VERSION, "camera": camera, "frame_id": frame_id, "encoding": encoding}
    if encoding == "raw":
        h["dtype"] = dtype
        h["shape"] = list(shape or ())
    if ts is not None:
        h["ts"] = ts
    if deadline_ms is not None:
        h["deadline_ms"] = deadline_ms
    if bit_depth is not None:
        h["bit_depth"] = bit_depth
    return json.dumps(h, separators=(",", ":")).encode("utf-8")
