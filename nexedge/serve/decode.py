"""Payload decoding: raw arrays, JPEG, PNG, BMP -> uint8/uint16 image, with limits.

Compressed images are sized from their header before decoding (JPEG marker
segments walked to the frame header, PNG IHDR, BMP info header) so a small
message cannot expand into a huge allocation (``max_pixels``,
``max_decoded_bytes``).
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
DEFAULT_MAX_DECODED_BYTES = 128 << 20


def sniff(buf: P.Buffer) -> Optional[str]:
    """Image format from the first bytes, or None."""
    head = bytes(buf[:8])
    for magic, name in MAGIC:
        if head.startswith(magic):
            return name
    return None


class ImageInfo:
    """What a compressed image's header says it decodes to (before decoding)."""

    __slots__ = ("height", "width", "channels", "sample_bytes")

    def __init__(self, height: int, width: int, channels: int, sample_bytes: int) -> None:
        self.height, self.width, self.channels, self.sample_bytes = height, width, channels, sample_bytes

    @property
    def pixels(self) -> int:
        return self.height * self.width

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded array (OpenCV IMREAD_UNCHANGED), an upper bound."""
        return self.pixels * self.channels * self.sample_bytes


# JPEG markers without a length field: TEM, RST0-7, SOI, EOI.
_JPEG_STANDALONE = {0x01, 0xD8, 0xD9} | set(range(0xD0, 0xD8))
# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic); not DHT/JPG/DAC.
_JPEG_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_info(b: P.Buffer) -> Optional[ImageInfo]:
    """Walk the marker segments from SOI to the first SOF (no fixed window); None if absent or broken."""
    n = len(b)
    i = 2
    while i < n:
        if b[i] != 0xFF:
            return None  # segments must follow each other exactly; garbage means a broken file
        while i < n and b[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            return None
        marker = b[i]
        i += 1
        if marker in _JPEG_STANDALONE:
            if marker == 0xD9:
                return None
            continue
        if i + 2 > n:
            return None
        seg = struct.unpack_from(">H", b, i)[0]
        if seg < 2:
            return None
        if marker in _JPEG_SOF:
            if seg < 8 or i + 8 > n:
                return None
            precision, h, w, comps = struct.unpack_from(">BHHB", b, i + 2)
            return ImageInfo(h, w, max(comps, 1), 2 if precision > 8 else 1)
        if marker == 0xDA:  # scan data before any frame header
            return None
        i += seg
    return None


def _png_info(b: P.Buffer) -> Optional[ImageInfo]:
    if len(b) < 33 or bytes(b[12:16]) != b"IHDR":
        return None
    if zlib.crc32(bytes(b[12:29])) != struct.unpack_from(">I", b, 29)[0]:
        return None  # a corrupt header: its size cannot be trusted
    w, h, depth, color = struct.unpack_from(">IIBB", b, 16)
    # IMREAD_UNCHANGED: gray -> 1 channel; palette and gray+alpha come out as BGR(A); 16-bit stays 16-bit.
    channels = {0: 1, 2: 3, 3: 4, 4: 4, 6: 4}.get(color)
    if channels is None or depth not in (1, 2, 4, 8, 16):
        return None
    return ImageInfo(h, w, channels, 2 if depth == 16 else 1)


def _bmp_info(b: P.Buffer) -> Optional[ImageInfo]:
    if len(b) < 30:
        return None
    w, h = struct.unpack_from("<ii", b, 18)
    bpp = struct.unpack_from("<H", b, 28)[0]
    if bpp not in (1, 2, 4, 8, 16, 24, 32) or w == -(1 << 31) or h == -(1 << 31):
        return None
    return ImageInfo(abs(h), abs(w), 4 if bpp == 32 else 3, 1)


def image_info(buf: P.Buffer, fmt: str) -> Optional[ImageInfo]:
    """Decoded size of a PNG/BMP/JPEG from its header alone; None when the header is missing or broken."""
    try:
        mv = memoryview(buf).cast("B") if not isinstance(buf, bytes) else buf
        return {"jpeg": _jpeg_info, "png": _png_info, "bmp": _bmp_info}[fmt](mv)
    except (struct.error, KeyError, TypeError, ValueError):
        return None


def image_dims(buf: P.Buffer, fmt: str) -> Optional[Tuple[int, int]]:
    """(height, width) read from a PNG/BMP/JPEG header without decoding; None if not found."""
    info = image_info(buf, fmt)
    return None if info is None else (info.height, info.width)


def decode(req: Request, max_pixels: int, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> np.ndarray:
    """Decode ``req.payload`` to an image array; raise :class:`ProtocolError` with a RECHECK reason.

    Compressed images are sized from their header first: over ``max_pixels`` or
    ``max_decoded_bytes`` (height x width x channels x bytes per sample) they are
    refused without decoding; a header that cannot be read is ``undecodable``.
    """
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
    info = image_info(buf, fmt)
    if info is None:
        raise ProtocolError(P.UNDECODABLE, f"{fmt} payload of {len(buf)} bytes has no readable image header "
                            "(size unknown; refused before decoding)", req.camera, req.frame_id)
    if info.pixels == 0:
        raise ProtocolError(P.EMPTY_IMAGE, f"{fmt} header says {info.height}x{info.width} pixels",
                            req.camera, req.frame_id)
    if info.pixels > max_pixels:
        raise ProtocolError(P.TOO_MANY_PIXELS, f"{fmt} of {info.height}x{info.width} exceeds max_pixels {max_pixels}",
                            req.camera, req.frame_id)
    if info.nbytes > max_decoded_bytes:
        raise ProtocolError(P.TOO_MANY_PIXELS, f"{fmt} of {info.height}x{info.width}x{info.channels} at "
                            f"{8 * info.sample_bytes} bits decodes to {info.nbytes} bytes, over max_decoded_bytes "
                            f"{max_decoded_bytes}", req.camera, req.frame_id)
    img = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ProtocolError(P.UNDECODABLE, f"{fmt} payload of {len(buf)} bytes could not be decoded",
                            req.camera, req.frame_id)
    if img.shape[0] * img.shape[1] > max_pixels or img.nbytes > max_decoded_bytes:
        raise ProtocolError(P.TOO_MANY_PIXELS, f"image of {img.shape} exceeds max_pixels {max_pixels} or "
                            f"max_decoded_bytes {max_decoded_bytes}", req.camera, req.frame_id)
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
