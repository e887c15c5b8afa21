"""Wire protocol of the line daemon: message parsing and verdict encoding.

One ROUTER socket serves two kinds of peers (see docs/protocol.md):

* native clients (DEALER): ``[b"", header, payload]`` (or ``[header, payload]``)
  with a JSON header carrying ``"v": 1``, ``camera``, ``frame_id``, ``encoding``
  (raw | jpeg | png | bmp), ``dtype`` and ``shape`` for raw arrays, ``ts``;
* unmodified imagezmq ``ImageSender`` clients (REQ): header ``{"msg", "dtype",
  "shape"}`` (raw arrays) or ``{"msg"}`` (JPEG bytes). ``msg`` is the camera
  name, optionally ``"camera|frame_id"``.

The ROUTER sees ``[identity, b"", header, payload]`` for REQ peers and for
DEALER peers that send the empty delimiter; the reply goes back with the same
envelope and is exactly one frame, the JSON verdict.

Python 3.8, no torch.
"""

import json
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

PROTOCOL_VERSION = 1
ENCODINGS = ("raw", "jpeg", "png", "bmp", "auto")  # auto: the daemon sniffs JPEG/PNG/BMP
RAW_DTYPES = ("uint8", "uint16")
DECISIONS = ("PASS", "REJECT", "RECHECK")
MAX_ID_CHARS = 128

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
QUEUE_FULL = "queue_full"
DEADLINE_PASSED = "deadline_passed"
BACKEND_ERROR = "backend_error"
SHUTTING_DOWN = "shutting_down"
REASONS = (
    GARBAGE_HEADER, UNSUPPORTED_VERSION, WRONG_FRAME_COUNT, OVERSIZE, UNKNOWN_ENCODING, BAD_DTYPE,
    BAD_SHAPE, EMPTY_IMAGE, UNDECODABLE, TOO_MANY_PIXELS, QUEUE_FULL, DEADLINE_PASSED, BACKEND_ERROR,
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
                 "deadline_ms", "answered")

    def __init__(self, envelope: List[bytes], kind: str, camera: str, frame_id: FrameId, encoding: str,
                 dtype: Optional[str], shape: Optional[Tuple[int, ...]], payload: Buffer,
                 ts: Optional[float] = None, deadline_ms: Optional[float] = None) -> None:
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
        self.answered = False


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


def _clean_id(value: Any, what: str) -> str:
    s = str(value)
    if not s or len(s) > MAX_ID_CHARS or any(ord(ch) < 32 for ch in s):
        raise ProtocolError(GARBAGE_HEADER, f"{what} {s[:40]!r} must be 1..{MAX_ID_CHARS} printable characters")
    return s


def _parse_shape(shape: Any, camera: str, frame_id: FrameId) -> Tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or len(shape) not in (2, 3) or not all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape
    ):
        raise ProtocolError(BAD_SHAPE, f"shape {shape!r}: expected [H, W] or [H, W, C] of non-negative integers",
                            camera, frame_id)
    return tuple(int(x) for x in shape)


def parse_body(envelope: List[bytes], body: List[Any], next_seq: "SeqCounter") -> Request:
    """Parse ``[header, payload]`` into a :class:`Request`; raise :class:`ProtocolError`."""
    if len(body) != 2:
        camera, frame_id = "", None
        if body:
            camera, frame_id = peek_ids(body[0])
        raise ProtocolError(WRONG_FRAME_COUNT, f"expected 2 frames (header, payload), got {len(body)}",
                            camera, frame_id)
    raw_header = _to_bytes(body[0])
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(GARBAGE_HEADER, f"header is not JSON: {raw_header[:60]!r}") from None
    if not isinstance(header, dict):
        raise ProtocolError(GARBAGE_HEADER, f"header must be a JSON object, got {type(header).__name__}")
    payload = _buffer(body[1])
    if "v" in header:
        return _parse_native(envelope, header, payload)
    if "msg" in header:
        return _parse_imagezmq(envelope, header, payload, next_seq)
    raise ProtocolError(GARBAGE_HEADER, "header has neither 'v' (native) nor 'msg' (imagezmq): keys "
                        f"{sorted(header)[:8]}")


def peek_ids(frame: Any) -> Tuple[str, FrameId]:
    """Best-effort camera/frame id from a header, for error replies."""
    try:
        h = json.loads(_to_bytes(frame).decode("utf-8"))
        if isinstance(h, dict):
            fid = h.get("frame_id")
            cam = h.get("camera", h.get("msg", ""))
            return (str(cam)[:MAX_ID_CHARS], fid if isinstance(fid, (int, str)) else None)
    except (UnicodeDecodeError, ValueError):
        pass
    return "", None


def _parse_native(envelope: List[bytes], h: Dict[str, Any], payload: Buffer) -> Request:
    fid = h.get("frame_id")
    frame_id: FrameId = fid if isinstance(fid, (int, str)) and not isinstance(fid, bool) else None
    camera = str(h.get("camera", ""))[:MAX_ID_CHARS]
    if h.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(UNSUPPORTED_VERSION,
                            f"protocol version {h.get('v')!r} not supported; this daemon speaks {PROTOCOL_VERSION}",
                            camera, frame_id)
    if frame_id is None:
        raise ProtocolError(GARBAGE_HEADER, f"frame_id {fid!r}: expected an integer or string", camera)
    camera = _clean_id(h.get("camera", ""), "camera")
    if isinstance(frame_id, str):
        _clean_id(frame_id, "frame_id")
    enc = h.get("encoding")
    if enc not in ENCODINGS:
        raise ProtocolError(UNKNOWN_ENCODING, f"encoding {enc!r}: expected one of {list(ENCODINGS)}", camera, frame_id)
    dtype, shape = None, None
    if enc == "raw":
        dtype = h.get("dtype")
        if dtype not in RAW_DTYPES:
            raise ProtocolError(BAD_DTYPE, f"dtype {dtype!r}: expected one of {list(RAW_DTYPES)}", camera, frame_id)
        shape = _parse_shape(h.get("shape"), camera, frame_id)
    ts = h.get("ts")
    ts = float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) and math.isfinite(ts) else None
    dl = h.get("deadline_ms")
    deadline_ms = float(dl) if isinstance(dl, (int, float)) and not isinstance(dl, bool) and 0 < dl < 1e9 else None
    return Request(envelope, "native", camera, frame_id, enc, dtype, shape, payload, ts, deadline_ms)


def _parse_imagezmq(envelope: List[bytes], h: Dict[str, Any], payload: Buffer, next_seq: "SeqCounter") -> Request:
    msg = str(h.get("msg", ""))
    camera_s, sep, fid_s = msg.partition("|")
    camera = _clean_id(camera_s, "imagezmq msg (camera)")
    frame_id: FrameId = _clean_id(fid_s, "imagezmq msg frame id") if sep else next_seq(camera)
    if isinstance(frame_id, str) and frame_id.isdigit() and len(frame_id) < 19:
        frame_id = int(frame_id)  # "cam|12" answers frame_id 12, like an auto-numbered frame
    if "dtype" in h or "shape" in h:
        dtype = h.get("dtype")
        if dtype not in RAW_DTYPES:
            raise ProtocolError(BAD_DTYPE, f"dtype {dtype!r}: expected one of {list(RAW_DTYPES)}", camera, frame_id)
        shape = _parse_shape(h.get("shape"), camera, frame_id)
        return Request(envelope, "imagezmq", camera, frame_id, "raw", dtype, shape, payload)
    # imagezmq's jpg mode: any compressed image bytes; the decoder sniffs the format.
    return Request(envelope, "imagezmq", camera, frame_id, "auto", None, None, payload)


class SeqCounter:
    """Per-camera sequence numbers for peers that send no frame id (imagezmq)."""

    def __init__(self, max_cameras: int = 4096) -> None:
        self._n: Dict[str, int] = {}
        self._max = max_cameras

    def __call__(self, camera: str) -> int:
        if camera not in self._n and len(self._n) >= self._max:
            self._n.clear()
        self._n[camera] = self._n.get(camera, 0) + 1
        return self._n[camera]


def verdict(camera: str, frame_id: FrameId, decision: str, score: Optional[float], threshold: Optional[float],
            uncertain: bool, reason: str, model_id: str, latency_ms: float,
            probs: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    """The verdict dict sent to the camera and published on the PUB socket."""
    v: Dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "frame_id": frame_id,
        "camera": camera,
        "decision": decision,
        "score": None if score is None else round(float(score), 6),
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
    return json.dumps(v, separators=(",", ":")).encode("utf-8")


def native_header(camera: str, frame_id: FrameId, encoding: str, dtype: Optional[str] = None,
                  shape: Optional[Sequence[int]] = None, ts: Optional[float] = None,
                  deadline_ms: Optional[float] = None) -> bytes:
    """Header of a native v1 request (used by :mod:`nexedge.serve.client`)."""
    h: Dict[str, Any] = {"v": PROTOCOL_VERSION, "camera": camera, "frame_id": frame_id, "encoding": encoding}
    if encoding == "raw":
        h["dtype"] = dtype
        h["shape"] = list(shape or ())
    if ts is not None:
        h["ts"] = ts
    if deadline_ms is not None:
        h["deadline_ms"] = deadline_ms
    return json.dumps(h, separators=(",", ":")).encode("utf-8")
