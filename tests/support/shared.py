"""Artifacts built once per test run and shared by every test file and every pytest-xdist worker.

A session-scoped fixture is per worker under xdist; these are per run. :func:`once` builds an
artifact under an exclusive file lock in a folder every worker of the run sees (the workers'
base temporary folders' parent) and records what the build returned (JSON), so the first caller
builds it and every later one, in any worker, reads the record. Tests must not change what they
get: a test that modifies a model copies it to its own ``tmp_path`` first.

The fixtures in tests/conftest.py (``shared``, ``untrained_export``) are the way in.
"""

import fcntl
import json
import os
import re
from typing import Any, Callable, Dict

#: Crop and resize of the untrained export matrix: the smallest input every registered architecture
#: takes (VGG19's five max-pools, the STN's localisation net), so the exports cost what their weights cost.
UNTRAINED_SIZE, UNTRAINED_CROP = 36, 32


def run_folder(tmp_path_factory: Any) -> str:
    """A folder shared by every xdist worker of this run (their base temp folders' parent), or this
    process's base temp folder when not under xdist."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path = os.path.join(str(base), "shared")
    os.makedirs(path, exist_ok=True)
    return path


def once(root: str, key: str, build: Callable[[str], Any]) -> Any:
    """``build(folder)`` once per run for ``key`` (its result must be JSON); later calls, in any
    worker, wait for the first to finish and get its result."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
    folder = os.path.join(root, name)
    record = folder + ".json"
    with open(folder + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.exists(record):
                with open(record, encoding="utf-8") as f:
                    return json.load(f)
            os.makedirs(folder, exist_ok=True)
            value = build(folder)
            with open(record + ".tmp", "w", encoding="utf-8") as f:
                json.dump(value, f)
            os.replace(record + ".tmp", record)
            return value
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def untrained_checkpoint(path: str, arch: str, size: int = UNTRAINED_SIZE, crop: int = UNTRAINED_CROP,
                         color: str = "gray") -> str:
    """``arch`` with random weights (3 toy classes, seeded by torch's global state) saved as a
    checkpoint with its card (``crop_mode`` ten)."""
    from nexedge.card import ModelCard
    from nexedge.export.toy import CLASSES
    from nexedge.models import accepts, create_model
    from nexedge.models.checkpoint import save_checkpoint

    kwargs: Dict[str, Any] = accepts(arch, {"input_size": [crop, crop]})  # the STN needs the crop size
    model = create_model(arch, 3, **kwargs)
    card = ModelCard.new(CLASSES, resize=(size, size), crop=(crop, crop), crop_mode="ten", color=color)
    return save_checkpoint(path, model.eval(), arch, CLASSES, "good", arch_kwargs=kwargs, card=card)


def export_untrained(checkpoint: str, out: str, flavour: str) -> str:
    """``checkpoint`` exported to ``out`` in ``flavour`` with the parity check (3 generated images)."""
    import torch

    from nexedge.export.onnx_export import export_onnx

    torch.set_num_threads(1)
    return export_onnx(checkpoint, out=out, crops=flavour, parity_images=3, max_batch=4, threads=1).path


def quantize_for_tensorrt(fp32: str) -> str:
    """TensorRT Q/DQ INT8 of ``fp32`` beside it (``.int8-trt.onnx``), calibrated on 4 toy images."""
    from nexedge.card import load_card
    from nexedge.export import calibrate as cal
    from nexedge.export import quantize as qz
    from nexedge.export.toy import toy_images

    card = load_card(fp32)
    imgs = toy_images(4, card.input, seed=1)[0]
    q = fp32.replace(".onnx", ".int8-trt.onnx")
    qz.quantize_model(fp32, q, card, cal.OrtCalibrationReader(imgs, card, batch_images=4), "tensorrt")
    return q
