"""Checkpoint -> ONNX (opset 17, TorchScript exporter, dynamic batch), card, parity check.

Two flavours from the same weights:

* ``crops="host"``: float32 (N*K) x 3 x h x w in, ``logits`` out; the host crops.
* ``crops="center"|"five"|"ten"``: uint8 N x H x W x C in, ``probs`` [N, C],
  ``defect_score`` [N] and ``logits`` [N, C] (mean over the crops; what the runtimes score
  from) out; preprocessing, crops, averaging and softmax in the graph (see nexedge.export.graph).

The ONNX file is written under a temporary name, checked with onnx.checker and
against PyTorch, and only then renamed into place with its card. Then the
operating points are re-measured on the ONNX model itself, through ONNX Runtime
(``nexedge thresholds``): a ten-crop graph's scores differ from the trainer's
center-crop ones, so the checkpoint's thresholds do not carry over.
"""

import logging
import os
from typing import Any, Dict, NamedTuple, Optional

from nexedge.card import GRAPH_CROPS, ModelCard

log = logging.getLogger(__name__)

OPSET = 17
HOST_OUTPUTS = ["logits"]
#: In-graph outputs; the runtimes score from ``logits`` (float64 on the host), see nexedge.export.graph.
GRAPH_OUTPUTS = ["probs", "defect_score", "logits"]


class ExportResult(NamedTuple):
    path: str
    card_path: str
    card: ModelCard
    parity: Dict[str, Any]
    measured: bool = False  # operating points re-measured on this artifact


def default_output(checkpoint: str, crops: str) -> str:
    """``runs/x/best.pt`` + ``ten`` -> ``runs/x/best.ten.onnx``."""
    return os.path.splitext(checkpoint)[0] + f".{crops}.onnx"


def check_crops(crops: str) -> str:
    if crops not in GRAPH_CROPS:
        raise ValueError(f"unknown --crops {crops!r}; expected one of {', '.join(GRAPH_CROPS)}")
    return crops


def build_export_module(model: Any, card: ModelCard, crops: str) -> Any:
    """The torch module to export: the backbone itself (host) or the in-graph wrapper."""
    if crops == "host":
        return model
    from nexedge.export.graph import InGraphModel

    return InGraphModel(model, card.input, crops, card.good_index, card.aggregate).eval()


def check_mirrors(card: ModelCard, mode: str, allow: bool = False) -> None:
    """Refuse a crop mode that scores mirrored crops the model was not trained on (``allow``: warn
    instead); warn when the card does not say what the model was trained with."""
    problem = card.mirror_problem(mode)
    if problem is None:
        return
    if problem["kind"] == "unseen" and not allow:
        raise ValueError(problem["message"] + "; --auto-kw allow_unseen_mirrors=true exports it anyway")
    log.warning("%s", problem["message"])


def torch_export(module: Any, card: ModelCard, crops: str, path: str, opset: int = OPSET) -> None:
    """torch.onnx.export with the TorchScript exporter, dynamic batch axis, then onnx.checker."""
    import onnx
    import torch

    H, W = card.input["resize"]
    h, w = card.input["crop"]
    if crops == "host":
        dummy = torch.zeros(2, 3, h, w, dtype=torch.float32)
        outputs = HOST_OUTPUTS
    else:
        c = 1 if card.input["color"] == "gray" else 3
        dummy = torch.zeros(2, H, W, c, dtype=torch.uint8)
        outputs = GRAPH_OUTPUTS
    name = "input" if crops == "host" else "images"
    axes = {name: {0: "batch"}}
    axes.update({o: {0: "batch"} for o in outputs})
    with torch.no_grad():
        torch.onnx.export(
            module,
            (dummy,),
            path,
            dynamo=False,
            opset_version=opset,
            input_names=[name],
            output_names=outputs,
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    proto = onnx.load(path)
    from nexedge.export.fold import fold_pads_into_conv

    if fold_pads_into_conv(proto):  # TF "same" Pads: into Conv pads, so INT8 keeps them int8 (fold.py)
        onnx.save(proto, path)
    onnx.checker.check_model(proto, full_check=True)
    got = proto.opset_import[0].version if proto.opset_import else None
    if got != opset:
        raise RuntimeError(f"exporter wrote opset {got}, expected {opset}")


def tensorrt_check(path: str, shown_as: str) -> Dict[str, Any]:
    """`nexedge check-onnx` for every TensorRT target: warn (the model may be for ONNX Runtime only)."""
    from nexedge.export import onnx_check as oc

    res = oc.summary(path)
    for target, verdict in res.items():
        if verdict != "ok":
            log.warning("%s will not parse in TensorRT %s: %s", shown_as, target[3:], "; ".join(verdict))
    return res


def export_onnx(
    checkpoint: str,
    out: Optional[str] = None,
    crops: str = "host",
    max_batch: int = 64,
    parity_data: Optional[str] = None,
    parity_images: int = 16,
    tolerance: float = 1e-4,
    opset: int = OPSET,
    threads: Optional[int] = None,
    data: Optional[str] = None,
    split: str = "val",
    cascade: bool = False,
    cascade_margin: Optional[float] = None,
    aggregate: Optional[str] = None,
    allow_unseen_mirrors: bool = False,
) -> ExportResult:
    """Export ``checkpoint`` (with card) to ONNX; parity vs torch must hold or nothing is written.
    The operating points are then measured on the ONNX model on ``data/<split>`` (default: the
    trainer's data root when still there); without labelled data the card says they are the
    checkpoint's, not re-measured.

    ``cascade``: also measure the cascade band on the same data (needs it); an in-graph multi-crop
    model first gets its stage-1 graph (center crops, same weights) exported beside it."""
    import torch

    from nexedge.export import parity as par
    from nexedge.models.checkpoint import load_checkpoint, model_from_checkpoint
    from nexedge.runtime.backends.onnxruntime import OnnxRuntimeBackend

    check_crops(crops)
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"--max-batch must be a positive integer, got {max_batch!r}")
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if aggregate is not None and aggregate not in ("mean", "max"):
        raise ValueError(f"unknown crop aggregate {aggregate!r}; expected mean or max")
    out = out or default_output(checkpoint, crops)
    from nexedge.card import load_card

    ck = load_card(checkpoint)
    check_mirrors(ck, ck.input["crop_mode"] if crops == "host" else crops, allow_unseen_mirrors)
    stage1 = None
    if cascade:
        from nexedge.export.thresholds import data_root_of
        from nexedge.runtime.cascade import STAGE1_CROPS

        if crops == STAGE1_CROPS or (crops == "host" and ck.input["crop_mode"] == STAGE1_CROPS):
            raise ValueError(f"--cascade needs a multi-crop model (five or ten crops); {out} runs {STAGE1_CROPS!r}")
        if data is None and data_root_of(ck) is None:
            raise ValueError("--cascade measures the band on labelled data: give --data ROOT (the trainer's data "
                             "root is gone)")
        if crops != "host":
            base, ext = os.path.splitext(out)
            stage1 = (base[: -len("." + crops)] if base.endswith("." + crops) else base) + f".{STAGE1_CROPS}{ext}"
            export_onnx(checkpoint, out=stage1, crops=STAGE1_CROPS, max_batch=max_batch, parity_data=parity_data,
                        parity_images=parity_images, tolerance=tolerance, opset=opset, threads=threads, data=data,
                        split=split)
    model, ck_card = model_from_checkpoint(checkpoint)
    arch = load_checkpoint(checkpoint)["arch"]
    card = ck_card.derive("onnx", precision="fp32")
    if aggregate is not None:
        card.set_aggregate(aggregate)
    card.set_graph(crops, "input" if crops == "host" else "images",
                   HOST_OUTPUTS if crops == "host" else GRAPH_OUTPUTS, int(max_batch))

    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, ".tmp-" + os.path.basename(out))
    try:
        torch_export(build_export_module(model, card, crops), card, crops, tmp, opset)
        trt_check = tensorrt_check(tmp, out)
        if parity_data is None:  # the trainer records its data root: use its real images when still there
            root = ck_card.provenance.get("data_root")
            if isinstance(root, str) and os.path.isdir(root):
                parity_data = root
        images, source = par.parity_images(parity_data, card.input, parity_images)
        mode = card.input["crop_mode"] if crops == "host" else crops
        with OnnxRuntimeBackend(tmp, card=card, intra_threads=threads) as be:
            parity = par.check_parity(model, be, images, card.input, mode, tolerance)
        parity["source"] = source
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    card.update_provenance(export={
        "arch": arch,
        "opset": opset,
        "exporter": "torch.onnx (TorchScript, dynamo=False)",
        "torch": torch.__version__,
        "parity": parity,
        "tensorrt_check": trt_check,
    })
    from nexedge.export.thresholds import data_root_of, measure_artifact

    root = data or data_root_of(ck_card)
    if root is None:
        card.mark_ops_from_parent("no labelled data (--data) to measure on and the trainer's data root is gone")
    card_path = card.save_for(out, parent=checkpoint)
    log.info("exported %s (crops=%s, parity max diff %.2g)", out, crops, parity["max_abs_diff"])
    if root is None:
        log.warning("%s: operating points copied from the checkpoint, NOT re-measured on this artifact; run "
                    "`nexedge thresholds %s --data ROOT`", out, out)
        return ExportResult(out, card_path, card, parity, False)
    m = measure_artifact(out, root, split, backend_options={"intra_threads": threads}, cascade=cascade or None,
                         margin=cascade_margin, stage1=stage1)
    return ExportResult(out, m.card_path, m.card, parity, True)

