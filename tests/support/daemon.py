"""Shared helpers for the daemon tests: a real tiny ONNX model with its card, configs, image files."""

import contextlib
import os
import socket
import threading
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

CLASSES = ["good", "particle", "scratch"]


def build_tiny_onnx(folder: str, crop_mode: str = "ten", size: int = 32, crop: int = 28,
                    thresholds: Optional[Dict[float, float]] = None, seed: int = 0, name: str = "tiny") -> str:
    """tiny CNN (random weights, seed 0) -> host-crop ONNX (opset 17, dynamic batch) + card.

    Where torch is missing (the daemon's own environment, e.g. Python 3.8 on a Jetson), set
    NEXEDGE_TEST_TINY_ONNX to a model this function built elsewhere; it is copied with its card.
    """
    prebuilt = os.environ.get("NEXEDGE_TEST_TINY_ONNX")
    if prebuilt and crop_mode == "ten" and size == 32 and crop == 28 and thresholds is None and seed == 0:
        import shutil

        from nexedge.card import card_path_for

        path = os.path.join(folder, name + ".onnx")
        shutil.copy(prebuilt, path)
        shutil.copy(card_path_for(prebuilt), card_path_for(path))
        return path
    import torch

    from nexedge.card import ModelCard
    from nexedge.models import create_model

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    model = create_model("tiny", num_classes=len(CLASSES), width=8).eval()
    path = os.path.join(folder, name + ".onnx")
    x = torch.zeros(2, 3, crop, crop)
    torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    card = ModelCard.new(CLASSES, resize=(size, size), crop=(crop, crop), crop_mode=crop_mode, color="gray",
                         kind="onnx")
    card.data["graph"].update({"crops": "host", "input_name": "input", "output_names": ["logits"], "max_batch": 32})
    ops = thresholds or {1.0: 0.5, 0.995: 0.6}
    card.data["operating_points"] = [
        {"target_tpr": t, "threshold": thr, "tpr": t, "fpr": 0.1, "tpr_lower95": t - 0.02, "n_defects": 150,
         "n_good": 300} for t, thr in ops.items()
    ]
    # Hand-written numbers (random weights): the record says so; the daemon checks only the crop mode.
    card.data["operating_points_source"] = {"status": "measured", "split": "hand-written test card", "n_good": 300,
                                            "n_defects": 150, "crop_mode": crop_mode, "backend": "none"}
    card.save_for(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_images(folder: str, n: int = 6, size: int = 48, seed: int = 0) -> List[str]:
    """A few PNG/JPEG/BMP images (gray and colour) to stream."""
    import cv2

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        shape = (size, size + 8 * (i % 3)) + ((3,) if i % 2 else ())
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        ext = (".png", ".jpg", ".bmp")[i % 3]
        p = os.path.join(folder, f"img{i:02d}{ext}")
        cv2.imwrite(p, img)
        paths.append(p)
    return paths


def base_config(model: str, **sections: Any) -> Dict[str, Any]:
    raw: Dict[str, Any] = {
        "model": {"path": model, "warmup": 1, "options": {"intra_threads": 1}},
        "sockets": {"frames": "tcp://127.0.0.1:*", "verdicts": "tcp://127.0.0.1:*", "decode_workers": 1},
        "batching": {"max_batch": 4, "max_delay_ms": 5, "max_queue": 32, "deadline_ms": 5000},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "logging": {"level": "WARNING", "format": "json"},
        "shutdown": {"timeout_s": 10},
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(raw.get(k), dict):
            raw[k] = dict(raw[k], **v)
        else:
            raw[k] = v
    return raw


def png_header(width: int, height: int, depth: int = 8, color: int = 0, idat: bytes = b"") -> bytes:
    """A PNG signature + a valid IHDR chunk (right CRC) claiming ``width`` x ``height``, then ``idat``
    as one IDAT chunk and IEND: what an attacker sends to make a small file decode to a huge image."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@contextlib.contextmanager
def running(model: str, backend: Any = None, **sections: Any) -> Iterator[Any]:
    """A real Daemon (base_config + ``sections``) serving on a thread until the block ends."""
    with running_config(base_config(model, **sections), backend) as d:
        yield d


@contextlib.contextmanager
def running_config(cfg: Dict[str, Any], backend: Any = None) -> Iterator[Any]:
    """A real Daemon built from the config dict ``cfg``, serving on a thread until the block ends."""
    from nexedge.serve import config as serve_config
    from nexedge.serve.daemon import Daemon

    d = Daemon(serve_config.from_dict(cfg), backend=backend)
    d.setup()
    t = threading.Thread(target=d.serve, name="daemon-io")
    t.start()
    try:
        yield d
    finally:
        d.request_stop()
        t.join(20)
        assert not t.is_alive(), "daemon did not stop"
