"""Seeded generator of malformed and hostile daemon messages (issue 13), shared by the CI fuzz
test (tests/test_daemon_fuzz.py) and the soak benchmark (benchmarks/bench_soak.py).

:func:`hostile` returns ``(parts, frame_id)``: the multipart body to send after the empty
delimiter, and the frame id a reply must carry when the message has a readable identity (None
when it has none: the reply then carries ``frame_id: null``). Every message gets exactly one reply.
"""

import json
import random
import struct
import zlib
from typing import Any, Callable, Dict, List, Optional, Tuple

FrameId = Any
Msg = Tuple[List[bytes], FrameId]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int, depth: int = 8, color: int = 0, idat: bytes = b"x") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int, fillers: int = 2) -> bytes:
    """SOI, ``fillers`` maximal APP1 segments, then an SOF0 claiming width x height (no scan data)."""
    app = b"\xff\xe1" + (65533).to_bytes(2, "big") + bytes(65531)
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app * fillers + sof + b"\xff\xd9"


def jpeg_scan_bomb(side: int, scans: int, channels: int = 3) -> bytes:
    """A valid progressive JPEG of a flat ``side`` x ``side`` image whose last scan is repeated until it
    has ``scans`` scans: a few KB that cost one decoding pass over the whole image per scan (issue 30:
    2,000 scans, 44 KB, 92 s to decode)."""
    import re

    import cv2
    import numpy as np

    img = np.full((side, side, channels) if channels > 1 else (side, side), 128, np.uint8)
    enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    starts = [m.start() for m in re.finditer(rb"\xff\xda", enc)]
    last = enc[starts[-1]:-2]  # the last scan, up to EOI
    return enc[:-2] + last * max(scans - len(starts), 0) + b"\xff\xd9"


def bmp_claiming(width: int, height: int, bpp: int = 32) -> bytes:
    return b"BM" + bytes(16) + struct.pack("<iiHH", width, height, 1, bpp) + bytes(24)


class Hostile:
    """Message shapes; ``next(seq)`` draws one with frame id ``f"h{seq}"`` where it has one."""

    def __init__(self, seed: int, good_png: bytes, max_message_bytes: int, big_parts: bool = True) -> None:
        self.rng = random.Random(seed)
        self.png = good_png
        self.max_msg = max_message_bytes
        self.shapes: List[Callable[[str], Msg]] = [
            self._surrogate, self._controls, self._non_string_camera, self._bad_version, self._deep_header,
            self._huge_header, self._many_parts, self._garbage_json, self._png_bomb, self._jpeg_bomb,
            self._bmp_bomb, self._truncated, self._raw_mismatch, self._bad_dtype, self._bad_shape,
            self._wrong_encoding, self._imagezmq_bad, self._too_few_parts, self._new_camera_flood,
            self._weird_deadline, self._empty_payload, self._corrupt_png, self._scan_bomb,
        ]
        self._bomb = jpeg_scan_bomb(600, 100)  # over the 32-scan limit: refused before decoding
        if big_parts:
            self.shapes.append(self._oversize)

    def next(self, seq: int) -> Msg:
        return self.rng.choice(self.shapes)(f"h{seq}")

    # -- shapes -----------------------------------------------------------------------------
    def _h(self, **kw: Any) -> bytes:
        return json.dumps(kw).encode()

    def _surrogate(self, fid: str) -> Msg:
        cam = self.rng.choice(["cam\ud800", "\udfff", "c\ud83d"])
        return [self._h(v=1, camera=cam, frame_id=fid, encoding="png"), self.png], fid

    def _controls(self, fid: str) -> Msg:
        cam = "c" + self.rng.choice(["\x00", "\x1b", "\x7f", "\x85", "\x9f", "\u2028", "\n"])
        return [self._h(v=1, camera=cam, frame_id=fid, encoding="png"), self.png], fid

    def _non_string_camera(self, fid: str) -> Msg:
        cam = self.rng.choice([12, None, ["a"], {"x": 1}, True, 1.5, "", "x" * 500])
        return [self._h(v=1, camera=cam, frame_id=fid, encoding="png"), self.png], fid

    def _bad_version(self, fid: str) -> Msg:
        v = self.rng.choice([True, 1.0, "1", 2, 0, None, [1]])
        return [self._h(v=v, camera="c", frame_id=fid, encoding="png"), self.png], fid

    def _deep_header(self, fid: str) -> Msg:
        n = self.rng.choice([5, 50, 3000, 20000])
        return [b'{"v":1,"camera":"c","frame_id":"%s","x":' % fid.encode() + b"[" * n + b"]" * n + b"}",
                self.png], None  # deeper than the header bound: not parsed, so no readable id

    def _huge_header(self, fid: str) -> Msg:
        return [self._h(v=1, camera="c", frame_id=fid, encoding="png", pad="x" * 40000), self.png], None

    def _many_parts(self, fid: str) -> Msg:
        n = self.rng.choice([3, 10, 200])
        return [self._h(v=1, camera="c", frame_id=fid, encoding="png")] + [b"p"] * n, fid

    def _oversize(self, fid: str) -> Msg:
        part = bytes(self.max_msg // 4 + 1)
        return [self._h(v=1, camera="c", frame_id=fid, encoding="png")] + [part] * 5, fid

    def _garbage_json(self, fid: str) -> Msg:
        raw = self.rng.choice([b"{", b"[]", b"null", b"\xff\xfe", b'{"v":1,"frame_id":1e999}', b"{}",
                               bytes(self.rng.getrandbits(8) for _ in range(40))])
        return [raw, self.png], None

    def _png_bomb(self, fid: str) -> Msg:
        w = self.rng.choice([7000, 20000, 1 << 30])
        return [self._h(v=1, camera="c", frame_id=fid, encoding="png"),
                png_claiming(w, w, depth=16, color=6)], fid

    def _jpeg_bomb(self, fid: str) -> Msg:
        return [self._h(v=1, camera="c", frame_id=fid, encoding="jpeg"),
                jpeg_claiming(8000, 8000, self.rng.choice([0, 2]))], fid

    def _bmp_bomb(self, fid: str) -> Msg:
        return [self._h(v=1, camera="c", frame_id=fid, encoding="bmp"), bmp_claiming(9000, -9000)], fid

    def _truncated(self, fid: str) -> Msg:
        cut = self.rng.randrange(1, max(len(self.png) - 1, 2))
        return [self._h(v=1, camera="c", frame_id=fid, encoding="png"), self.png[:cut]], fid

    def _raw_mismatch(self, fid: str) -> Msg:
        return [self._h(v=1, camera="c", frame_id=fid, encoding="raw", dtype="uint8", shape=[10, 10]),
                bytes(self.rng.choice([0, 99, 101, 300]))], fid

    def _bad_dtype(self, fid: str) -> Msg:
        dt = self.rng.choice(["float64", "int8", None, 3, ["uint8"]])
        return [self._h(v=1, camera="c", frame_id=fid, encoding="raw", dtype=dt, shape=[2, 2]), bytes(4)], fid

    def _bad_shape(self, fid: str) -> Msg:
        sh = self.rng.choice([[-1, 5], [1 << 40, 1 << 40], [True, 2], [2, 2, 9], "10x10", [1, 2, 3, 4], [2.0, 2]])
        return [self._h(v=1, camera="c", frame_id=fid, encoding="raw", dtype="uint8", shape=sh), bytes(4)], fid

    def _wrong_encoding(self, fid: str) -> Msg:
        enc = self.rng.choice(["jpeg", "bmp", "tiff", None, 7])
        return [self._h(v=1, camera="c", frame_id=fid, encoding=enc), self.png], fid

    def _imagezmq_bad(self, fid: str) -> Msg:
        msg = self.rng.choice([f"c\x00|{fid}", f"|{fid}", 5, None, f"c\ud800|{fid}"])
        readable = fid if isinstance(msg, str) and "|" in msg else None
        return [self._h(msg=msg), self.png], readable

    def _too_few_parts(self, fid: str) -> Msg:
        return [self._h(v=1, camera="c", frame_id=fid, encoding="png")], fid

    def _new_camera_flood(self, fid: str) -> Msg:
        """A valid frame from a never-seen camera id: inspected, but must not grow state unboundedly."""
        return [self._h(v=1, camera=f"rogue-{self.rng.getrandbits(40):x}", frame_id=fid, encoding="png"),
                self.png], fid

    def _weird_deadline(self, fid: str) -> Msg:
        dl = self.rng.choice([0, -5, 1e308, "soon", True, 0.001])
        return [self._h(v=1, camera="c", frame_id=fid, encoding="png", deadline_ms=dl), self.png], fid

    def _empty_payload(self, fid: str) -> Msg:
        return [self._h(v=1, camera="c", frame_id=fid, encoding="png"), b""], fid

    def _scan_bomb(self, fid: str) -> Msg:
        return [self._h(v=1, camera="c", frame_id=fid, encoding="jpeg"), self._bomb], fid

    def _corrupt_png(self, fid: str) -> Msg:
        data = bytearray(self.png)
        for _ in range(8):
            data[self.rng.randrange(len(data))] = self.rng.getrandbits(8)
        return [self._h(v=1, camera="c", frame_id=fid, encoding="png"), bytes(data)], fid


def tally(replies: List[Dict[str, Any]]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for v in replies:
        k = v.get("decision", "?") + ":" + str(v.get("reason") or "")
        out[k] = out.get(k, 0) + 1
    return out


def expected_id(msg: Msg) -> Optional[FrameId]:
    return msg[1]
