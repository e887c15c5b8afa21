"""Payload decoding: raw arrays, JPEG, PNG, BMP -> uint8/uint16 image, with limits.

Compressed images are sized from their header before decoding so a small
message cannot expand into a huge allocation (``max_pixels``).
Python 3.8, numpy and OpenCV only.
"""

import struct
import zlib
from typing import Optional, Tuple

import numpy as np

from nexedge.serve import protocol as P
from nexedge.serve.protocol import ProtocolError, Request

MAGIC = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"BM", "bmp"))
EXT = {"jpeg": "jpg", "png": "png", "bmp": "bmp"}


def sniff(buf: P.Buffer) -> Optional[str]:
    """Image format from the first bytes, or None."""
    head = bytes(buf[:8])
    for magic, name in MAGIC:
        if head.startswith(magic):
            return name
    return None


def image_dims(buf: P.Buffer, fmt: str) -> Optional[Tuple[int, int]]:
    """(height, width) read from a PNG/BMP/JPEG header without decoding; None if not found."""
    b = bytes(buf[:65536]) if fmt == "jpeg" else bytes(buf[:32])
    try:
        if fmt == "png" and len(b) >= 24:
            w, h = struct.unpack(">II", b[16:24])
            return int(h), int(w)
        if fmt == "bmp" and len(b) >= 26:
            w, h = struct.unpack("<ii", b[18:26])
            return abs(int(h)), abs(int(w))
        if fmt == "jpeg":
            i = 2
            while i + 9 < len(b):
                if b[i] != 0xFF:
                    i += 1
                    continue
                marker = b[i + 1]
                if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                    i += 1 if marker == 0xFF else 2
                    continue
                seg = struct.unpack(">H", b[i + 2:i + 4])[0]
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                    h, w = struct.unpack(">HH", b[i + 5:i + 9])
                    return int(h), int(w)
                i += 2 + seg
    except struct.error:
        return None
    return None


def png_header_intact(buf: P.Buffer) -> bool:
    """True when a PNG's IHDR chunk (which holds the size) passes its CRC."""
    b = bytes(buf[:33])
    return len(b) == 33 and b[12:16] == b"IHDR" and struct.unpack(">I", b[29:33])[0] == zlib.crc32(b[12:29])


def decode(req: Request, max_pixels: int) -> np.ndarray:
    """Decode ``req.payload`` to an image array; raise :class:`ProtocolError` with a RECHECK reason."""
    buf = req.payload
    if len(buf) == 0:
        raise ProtocolError(P.EMPTY_IMAGE, "payload is empty", req.camera, req.frame_id)
    if req.encoding == "raw":
        return _decode_raw(req, max_pixels)
    import cv2

    fmt = sniff(buf)
    if fmt is None:
        raise ProtocolError(P.UNDECODABLE, f"payload is not a JPEG, PNG or BMP image (starts with {bytes(buf[:8])!r})", req.camera, req.frame_id)
    if req.encoding != "auto" and fmt != req.encoding:
        raise ProtocolError(P.UNDECODABLE, f"header says encoding {req.encoding!r} but the payload is {fmt}",
                            req.camera, req.frame_id)
    dims = image_dims(buf, fmt)
    if dims is not None:
        if dims[0] * dims[1] == 0:
            raise ProtocolError(P.EMPTY_IMAGE, f"{fmt} header says {dims[0]}x{dims[1]} pixels",
                                req.camera, req.frame_id)
        if dims[0] * dims[1] > max_pixels and fmt == "png" and not png_header_intact(buf):
            # A damaged file reads as a huge image; it is undecodable, not too large.
            raise ProtocolError(P.UNDECODABLE, f"png header is corrupt (IHDR checksum mismatch; it claims "
                                f"{dims[0]}x{dims[1]} pixels)", req.camera, req.frame_id)
        if dims[0] * dims[1] > max_pixels:
            raise ProtocolError(P.TOO_MANY_PIXELS, f"{fmt} of {dims[0]}x{dims[1]} exceeds max_pixels {max_pixels}",
                                req.camera, req.frame_id)
    img = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ProtocolError(P.UNDECODABLE, f"{fmt} payload of {len(buf)} bytes could not be decoded",
                            req.camera, req.frame_id)
    if img.shape[0] * img.shape[1] > max_pixels:
        raise ProtocolError(P.TOO_MANY_PIXELS, f"image of {img.shape[0]}x{img.shape[1]} exceeds max_pixels "
                            f"{max_pixels}", req.camera, req.frame_id)
    return img


def _decode_raw(req: Request, max_pixels: int) -> np.ndarray:
    shape = req.shape or ()
    if len(shape) == 3 and shape[2] not in (1, 3, 4):
        raise ProtocolError(P.BAD_SHAPE, f"shape {list(shape)}: channels must be 1, 3 or 4", req.camera, req.frame_id)
    npix = int(shape[0]) * int(shape[1])
    if npix == 0 or (len(shape) == 3 and shape[2] == 0):
        raise ProtocolError(P.EMPTY_IMAGE, f"shape {list(shape)} has no pixels", req.camera, req.frame_id)
    if npix > max_pixels:
        raise ProtocolError(P.TOO_MANY_PIXELS, f"shape {list(shape)} exceeds max_pixels {max_pixels}",
                            req.camera, req.frame_id)
    dtype = np.dtype(req.dtype)
    need = int(np.prod(shape)) * dtype.itemsize
    if len(req.payload) != need:
        raise ProtocolError(P.BAD_SHAPE, f"payload has {len(req.payload)} bytes; shape {list(shape)} {req.dtype} "
                            f"needs {need}", req.camera, req.frame_id)
    return np.frombuffer(req.payload, dtype).reshape(shape)


def encode_png(img: np.ndarray) -> bytes:
    """Lossless PNG of a raw frame, for the sample store."""
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img))
    if not ok:
        raise ValueError(f"could not PNG-encode an image of shape {img.shape} dtype {img.dtype}")
    return buf.tobytes()
