"""Payload decoding: raw arrays, JPEG, PNG, BMP, TIFF -> uint8/uint16 image, with limits.

Compressed images are sized from their header before decoding (JPEG marker
segments walked to the frame header, PNG IHDR, BMP info header, the first TIFF
IFD) so a small message cannot expand into a huge allocation (``max_pixels``,
``max_decoded_bytes``). A JPEG's scans are counted before decoding: each scan
of a progressive JPEG is another pass over the whole image, so a 44 KB file
repeating one scan 2,000 times took 92 s to decode; more than ``max_scans``
scans are refused (``too_many_scans``).
Python 3.8, numpy and OpenCV only.
"""

import re
import struct
import zlib
from typing import Iterator, Optional, Tuple

import numpy as np

from nexedge.serve import protocol
from nexedge.serve.protocol import ProtocolError, Request

MAGIC = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"BM", "bmp"), (b"II*\x00", "tiff"),
         (b"MM\x00*", "tiff"), (b"II+\x00", "tiff"), (b"MM\x00+", "tiff"))
EXT = {"jpeg": "jpg", "png": "png", "bmp": "bmp", "tiff": "tif"}
#: File-name suffix -> the format the daemon decodes: what a camera may send as a file's bytes.
SUFFIXES = {".png": "png", ".bmp": "bmp", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff"}
FORMATS = "JPEG, PNG, BMP or TIFF"
DEFAULT_MAX_DECODED_BYTES = 128 << 20
#: libjpeg's (and so OpenCV's and Pillow's) progressive JPEGs have 10 scans (colour) or 6 (gray); a
#: baseline JPEG has 1, or one per component when they are not interleaved.
DEFAULT_MAX_SCANS = 32


def sniff(buf: protocol.Buffer) -> Optional[str]:
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
# A marker inside entropy-coded data: 0xFF followed by anything but a stuffed zero, RSTn or fill.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _jpeg_segments(b: protocol.Buffer) -> Iterator[Tuple[int, int, int]]:
    """(marker, offset of its length field, segment length; 0 for markers without one) of each marker
    segment from SOI on; the entropy-coded data after a start of scan is skipped to the next marker.
    Stops at EOI, at the end of the bytes, or where the segments stop following each other."""
    n = len(b)
    i = 2
    while i < n:
        if b[i] != 0xFF:
            return  # segments must follow each other exactly; garbage means a broken file
        while i < n and b[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            return
        marker = b[i]
        i += 1
        if marker in _JPEG_STANDALONE:
            yield marker, i, 0
            if marker == 0xD9:
                return
            continue
        if i + 2 > n:
            return
        seg = struct.unpack_from(">H", b, i)[0]
        yield marker, i, seg
        i += seg
        if marker == 0xDA:
            m = _JPEG_MARKER.search(b, i)
            if m is None:
                return
            i = m.start()


def _jpeg_info(b: protocol.Buffer) -> Optional[ImageInfo]:
    """Walk the marker segments from SOI to the first SOF (no fixed window); None if absent or broken."""
    n = len(b)
    for marker, i, seg in _jpeg_segments(b):
        if marker == 0xD9:
            return None
        if marker in _JPEG_STANDALONE:
            continue
        if seg < 2:
            return None
        if marker in _JPEG_SOF:
            if seg < 8 or i + 8 > n:
                return None
            precision, h, w, comps = struct.unpack_from(">BHHB", b, i + 2)
            return ImageInfo(h, w, max(comps, 1), 2 if precision > 8 else 1)
        if marker == 0xDA:  # scan data before any frame header
            return None
    return None


def _png_info(b: protocol.Buffer) -> Optional[ImageInfo]:
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


def _bmp_info(b: protocol.Buffer) -> Optional[ImageInfo]:
    if len(b) < 30:
        return None
    w, h = struct.unpack_from("<ii", b, 18)
    bpp = struct.unpack_from("<H", b, 28)[0]
    if bpp not in (1, 2, 4, 8, 16, 24, 32) or w == -(1 << 31) or h == -(1 << 31):
        return None
    return ImageInfo(abs(h), abs(w), 4 if bpp == 32 else 3, 1)


def jpeg_scans(b: protocol.Buffer, stop: int = 1 << 30) -> int:
    """Start-of-scan markers in a JPEG (the marker segments are walked, the entropy-coded data of each
    scan skipped to the next marker); counting stops past ``stop``. Cost: one pass over the bytes."""
    count = 0
    for marker, _, _ in _jpeg_segments(b):
        if marker == 0xDA:
            count += 1
            if count > stop:
                break
    return count


_TIFF_TYPES = {3: ("H", 2), 4: ("I", 4)}  # SHORT, LONG


def _tiff_info(b: protocol.Buffer) -> Optional[ImageInfo]:
    """Size of the first image of a classic TIFF from its first IFD; None when broken or not
    decodable here (BigTIFF, floating-point or JPEG-compressed samples: see :func:`tiff_problem`)."""
    if tiff_problem(b) is not None:
        return None
    tags = _tiff_tags(b)
    w, h = tags.get(256, 0), tags.get(257, 0)
    spp = tags.get(277, 1)
    bits = tags.get(258, 8)
    if not w or not h or bits not in (1, 2, 4, 8, 16) or not 1 <= spp <= 4:
        return None
    return ImageInfo(h, w, spp if spp in (1, 3, 4) else 4, 2 if bits > 8 else 1)


def _tiff_tags(b: protocol.Buffer) -> dict:
    """First-value of the numeric tags of the first IFD (width, height, bits, samples, format, compression)."""
    end = "<" if bytes(b[:2]) == b"II" else ">"
    off = struct.unpack_from(end + "I", b, 4)[0]
    count = struct.unpack_from(end + "H", b, off)[0]
    if count > 4096:
        raise ValueError("implausible TIFF IFD")
    out = {}
    for k in range(count):
        tag, typ, n = struct.unpack_from(end + "HHI", b, off + 2 + 12 * k)
        if tag not in (256, 257, 258, 259, 277, 339) or typ not in _TIFF_TYPES:
            continue
        code, size = _TIFF_TYPES[typ]
        at = off + 2 + 12 * k + 8
        if n * size > 4:  # the values live elsewhere; the first is enough (samples share one format here)
            at = struct.unpack_from(end + "I", b, at)[0]
        out[tag] = struct.unpack_from(end + code, b, at)[0]
    return out


def tiff_problem(b: protocol.Buffer) -> Optional[str]:
    """Why this TIFF is refused before decoding (None when it is not): BigTIFF, floating-point samples,
    JPEG compression (its decode work cannot be bounded from the header), or an unreadable first IFD."""
    if bytes(b[2:4]) in (b"+\x00", b"\x00+"):
        return "BigTIFF is not supported; send a classic TIFF, PNG or raw array"
    try:
        tags = _tiff_tags(b)
    except (struct.error, ValueError, TypeError):
        return "TIFF header (first IFD) cannot be read"
    if tags.get(339, 1) == 3:
        return "floating-point TIFF samples are not supported; send uint8 or uint16"
    if tags.get(259, 1) in (6, 7):
        return "JPEG-compressed TIFF is not supported; use no compression, LZW or Deflate"
    return None


def image_info(buf: protocol.Buffer, fmt: str) -> Optional[ImageInfo]:
    """Decoded size of a PNG/BMP/JPEG/TIFF from its header alone; None when the header is missing or broken."""
    try:
        mv = memoryview(buf).cast("B") if not isinstance(buf, bytes) else buf
        return {"jpeg": _jpeg_info, "png": _png_info, "bmp": _bmp_info, "tiff": _tiff_info}[fmt](mv)
    except (struct.error, KeyError, TypeError, ValueError):
        return None


def image_dims(buf: protocol.Buffer, fmt: str) -> Optional[Tuple[int, int]]:
    """(height, width) read from a PNG/BMP/JPEG/TIFF header without decoding; None if not found."""
    info = image_info(buf, fmt)
    return None if info is None else (info.height, info.width)


def decode(req: Request, max_pixels: int, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
           max_scans: int = DEFAULT_MAX_SCANS) -> np.ndarray:
    """Decode ``req.payload`` to an image array; raise :class:`ProtocolError` with a RECHECK reason.

    Compressed images are sized from their header first: over ``max_pixels`` or
    ``max_decoded_bytes`` (height x width x channels x bytes per sample) they are
    refused without decoding; a header that cannot be read is ``undecodable``; a
    JPEG with more than ``max_scans`` scans is ``too_many_scans``.
    """
    buf = req.payload
    if len(buf) == 0:
        raise ProtocolError(protocol.EMPTY_IMAGE, "payload is empty", req.camera, req.frame_id)
    if req.encoding == "raw":
        return _decode_raw(req, max_pixels)
    import cv2

    fmt = sniff(buf)
    if fmt is None:
        raise ProtocolError(protocol.UNDECODABLE, f"payload is not a {FORMATS} image (starts with {bytes(buf[:8])!r})",
                            req.camera, req.frame_id)
    if req.encoding != "auto" and fmt != req.encoding:
        raise ProtocolError(protocol.UNDECODABLE, f"header says encoding {req.encoding!r} but the payload is {fmt}",
                            req.camera, req.frame_id)
    if fmt == "tiff":
        why = tiff_problem(memoryview(buf).cast("B") if not isinstance(buf, bytes) else buf)
        if why is not None:
            raise ProtocolError(protocol.UNDECODABLE, why, req.camera, req.frame_id)
    info = image_info(buf, fmt)
    if info is None:
        raise ProtocolError(protocol.UNDECODABLE, f"{fmt} payload of {len(buf)} bytes has no readable image header "
                            "(size unknown; refused before decoding)", req.camera, req.frame_id)
    if info.pixels == 0:
        raise ProtocolError(protocol.EMPTY_IMAGE, f"{fmt} header says {info.height}x{info.width} pixels",
                            req.camera, req.frame_id)
    if info.pixels > max_pixels:
        raise ProtocolError(protocol.TOO_MANY_PIXELS, f"{fmt} of {info.height}x{info.width} exceeds max_pixels {max_pixels}",
                            req.camera, req.frame_id)
    if info.nbytes > max_decoded_bytes:
        raise ProtocolError(protocol.TOO_MANY_PIXELS, f"{fmt} of {info.height}x{info.width}x{info.channels} at "
                            f"{8 * info.sample_bytes} bits decodes to {info.nbytes} bytes, over max_decoded_bytes "
                            f"{max_decoded_bytes}", req.camera, req.frame_id)
    if fmt == "jpeg":
        scans = jpeg_scans(memoryview(buf).cast("B") if not isinstance(buf, bytes) else buf, max_scans)
        if scans > max_scans:
            raise ProtocolError(protocol.TOO_MANY_SCANS, f"JPEG of {info.height}x{info.width} has more than {max_scans} "
                                "scans (sockets.decode_limits.max_jpeg_scans; encoders write at most 10): each scan is another "
                                "decoding pass", req.camera, req.frame_id)
    img = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is not None and img.dtype not in (np.uint8, np.uint16):
        raise ProtocolError(protocol.UNDECODABLE, f"{fmt} decodes to {img.dtype} samples; expected 8 or 16-bit integers",
                            req.camera, req.frame_id)
    if img is None or img.size == 0:
        raise ProtocolError(protocol.UNDECODABLE, f"{fmt} payload of {len(buf)} bytes could not be decoded",
                            req.camera, req.frame_id)
    if img.shape[0] * img.shape[1] > max_pixels or img.nbytes > max_decoded_bytes:
        raise ProtocolError(protocol.TOO_MANY_PIXELS, f"image of {img.shape} exceeds max_pixels {max_pixels} or "
                            f"max_decoded_bytes {max_decoded_bytes}", req.camera, req.frame_id)
    return img


def _decode_raw(req: Request, max_pixels: int) -> np.ndarray:
    shape = req.shape or ()
    if len(shape) == 3 and shape[2] not in (1, 3, 4):
        raise ProtocolError(protocol.BAD_SHAPE, f"shape {list(shape)}: channels must be 1, 3 or 4", req.camera, req.frame_id)
    npix = int(shape[0]) * int(shape[1])
    if npix == 0 or (len(shape) == 3 and shape[2] == 0):
        raise ProtocolError(protocol.EMPTY_IMAGE, f"shape {list(shape)} has no pixels", req.camera, req.frame_id)
    if npix > max_pixels:
        raise ProtocolError(protocol.TOO_MANY_PIXELS, f"shape {list(shape)} exceeds max_pixels {max_pixels}",
                            req.camera, req.frame_id)
    dtype = np.dtype(req.dtype)
    need = int(np.prod(shape)) * dtype.itemsize
    if len(req.payload) != need:
        raise ProtocolError(protocol.BAD_SHAPE, f"payload has {len(req.payload)} bytes; shape {list(shape)} {req.dtype} "
                            f"needs {need}", req.camera, req.frame_id)
    return np.frombuffer(req.payload, dtype).reshape(shape)


def encode_png(img: np.ndarray) -> bytes:
    """Lossless PNG of a raw frame, for the sample store."""
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img))
    if not ok:
        raise ValueError(f"could not PNG-encode an image of shape {img.shape} dtype {img.dtype}")
    return buf.tobytes()
