"""``nexedge thresholds``: measure an artifact's operating points on the artifact itself.

Any artifact (checkpoint, ONNX host or in-graph crops, INT8 Q/DQ ONNX, TensorRT
engine where TensorRT runs) goes through the runtime backend that will run it on
the line (:func:`nexedge.runtime.open_backend`), on a labelled split
``ROOT/<split>/<class>/<image>``. The card gets the artifact's own operating
points, validation score histogram and image-statistics reference, and
``operating_points_source`` records where they came from (split, counts, artifact
sha256, crop mode, backend). ``export``, ``calibrate`` and ``build-engine`` call
:func:`measure_artifact` on what they produce; a stage that cannot run its
artifact here marks them as its parent's (:meth:`ModelCard.mark_ops_from_parent`).
"""

import datetime as _dt
import logging
import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from nexedge import metrics
from nexedge import preprocess as pp
from nexedge.card import OPS_MEASURED, ModelCard, load_card

log = logging.getLogger(__name__)


class Measurement(NamedTuple):
    card: ModelCard
    card_path: str
    labels: np.ndarray  # class index per image
    scores: np.ndarray  # defect score per image (float64)
    weak: List[Dict[str, Any]]  # metrics.weak_points of the new operating points


def split_images(root: str, split: str, classes: Sequence[str]) -> Tuple[List[str], np.ndarray]:
    """(absolute image paths, class indices) of ``root/<split>/<class>/``; a folder whose
    class the card does not know is an error (its images would be mis-scored)."""
    from nexedge.export.calibrate import class_folders

    per_class = class_folders(root, split)
    unknown = sorted(set(per_class) - set(classes))
    if unknown:
        raise ValueError(f"{os.path.join(root, split)}: class folders {unknown} are not classes of the model "
                         f"({list(classes)})")
    paths: List[str] = []
    labels: List[int] = []
    for cls in sorted(per_class):
        paths += [os.path.join(root, p) for p in per_class[cls]]
        labels += [list(classes).index(cls)] * len(per_class[cls])
    return paths, np.asarray(labels, dtype=int)


def score_images(backend: Any, paths: Sequence[str], inp: Dict[str, Any], batch: int = 16,
                 progress: Optional[Callable[[int, int], None]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(defect scores, image-stat rows) of ``paths`` through ``backend`` (eval preprocessing)."""
    from nexedge.export.parity import read_image

    n = max(1, min(batch, backend.max_batch))
    scores, stats = [], []
    for i in range(0, len(paths), n):
        imgs = [pp.prepare(read_image(p), inp) for p in paths[i : i + n]]
        stats += [pp.image_stats(im) for im in imgs]
        scores.append(np.asarray(backend.infer(np.stack(imgs)).defect_score, dtype=np.float64))
        if progress is not None:
            progress(min(i + n, len(paths)), len(paths))
    return np.concatenate(scores) if scores else np.zeros(0), np.asarray(stats, dtype=float)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def measure_artifact(
    artifact: str,
    data_root: str,
    split: str = "val",
    floor: float = metrics.DEFAULT_TPR_FLOOR,
    tprs: Sequence[float] = metrics.DEFAULT_TPRS,
    batch: int = 16,
    backend: Any = None,
    backend_options: Optional[Dict[str, Any]] = None,
    progress: bool = False,
    cascade: Optional[bool] = None,
    margin: Optional[float] = None,
    stage1: Optional[str] = None,
) -> Measurement:
    """Run ``artifact`` (card verified) on ``data_root/<split>`` through its own backend (or the
    given open ``backend``) and rewrite its card's operating points, ``val_scores``,
    ``image_stats`` and ``operating_points_source``.

    ``cascade`` True: also measure the cascade band (stage 1 = center crops, ``stage1`` names an
    in-graph model's stage-1 artifact when the card does not); None: re-measure it when the card
    already has a cascade section; ``margin``: its widening in log-odds (default: the card's, else
    :data:`nexedge.runtime.cascade.DEFAULT_MARGIN`)."""
    from nexedge.runtime import open_backend

    card = load_card(artifact)
    cv = card.data.get("cv")
    if cv and split in (cv.get("pooled_splits") or ()):
        raise ValueError(f"{artifact} is a fold ensemble whose models trained on {split!r}: its operating points "
                         "are the out-of-fold ones in its card; measuring on a split the models saw would replace "
                         "them with optimistic ones")
    mirrors = card.mirror_problem(getattr(backend, "crop_mode", None))
    if mirrors is not None:
        log.warning("%s", mirrors["message"])
    paths, labels = split_images(data_root, split, card.classes)
    y_def = (labels != card.good_index).astype(int)
    if not y_def.sum() or y_def.all():
        raise ValueError(f"{os.path.join(data_root, split)}: need good and defect images for operating points "
                         f"(good {int((y_def == 0).sum())}, defect {int(y_def.sum())})")
    own = backend is None
    be = backend if backend is not None else open_backend(artifact, **(backend_options or {}))

    from nexedge.progress import progress as _progress

    line = _progress(desc=f"thresholds {os.path.basename(artifact)} {split}", total=len(paths), unit="images",
                     enabled=progress)

    def bar(done: int, total: int) -> None:
        line.update(done - line.n)
        if done == total:
            line.close()

    want_cascade = bool(card.cascade) if cascade is None else cascade
    s1_scores, s1_info, cascade_problem = None, None, None
    try:
        scores, stats = score_images(be, paths, card.input, batch, bar if progress else None)
        backend_name = getattr(be, "name", type(be).__name__)
        crop_mode = getattr(be, "crop_mode", card.runtime_crop_mode)
        if want_cascade:
            try:
                s1_scores, s1_info = _stage1_scores(artifact, card, be, paths, batch, stage1, backend_options)
            except Exception as e:
                if cascade:
                    raise
                cascade_problem = f"{type(e).__name__}: {e}"
    finally:
        if own:
            be.close()
    ops = metrics.operating_points(y_def, scores, tprs)
    with card.edit():
        card.set_operating_points(ops, {
            "status": OPS_MEASURED,
            "split": split,
            "data_root": os.path.abspath(data_root),
            "n_good": int((y_def == 0).sum()),
            "n_defects": int(y_def.sum()),
            "per_class": {c: int((labels == i).sum()) for i, c in enumerate(card.classes) if (labels == i).any()},
            "artifact_sha256": card.sha256,
            "kind": card.data["artifact"]["kind"],
            "precision": card.precision,
            "crop_mode": crop_mode,
            "aggregate": getattr(be, "aggregate", card.aggregate),
            "resize_mode": card.input.get("resize_mode", "stretch"),
            "backend": backend_name,
            "measured_at": _now(),
        })
        card.set_score_reference(metrics.score_histogram(y_def, scores), pp.reference_image_stats(stats))
    if s1_scores is not None:
        from nexedge.runtime.cascade import DEFAULT_MARGIN, measure_section

        m = margin if margin is not None else (card.cascade or {}).get("margin_logit", DEFAULT_MARGIN)
        card.set_cascade(measure_section(card, s1_scores, scores, y_def, s1_info or {}, split, float(m)))
    elif cascade_problem is not None:
        card.mark_cascade_from_parent(cascade_problem)
        log.warning("%s: cascade band NOT re-measured (%s); the daemon runs full %s until it is", artifact,
                    cascade_problem, card.runtime_crop_mode)
    card_path = card.save_for(artifact)
    weak = metrics.weak_points(ops, floor)
    log.info("measured operating points of %s on %s/%s (%d images)", artifact, data_root, split, len(paths))
    return Measurement(card, card_path, labels, scores, weak)


def _stage1_scores(artifact: str, card: ModelCard, be: Any, paths: Sequence[str], batch: int,
                   stage1: Optional[str], backend_options: Optional[Dict[str, Any]]
                   ) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Center-crop (stage-1) scores of ``paths`` for the cascade band, and the card's stage-1 record."""
    from nexedge.card import load_card as _load
    from nexedge.runtime.cascade import STAGE1_CROPS, CascadeError, open_stage1, stage1_path

    if card.runtime_crop_mode == STAGE1_CROPS:
        raise CascadeError(f"{artifact} runs {STAGE1_CROPS!r} crops already; a cascade needs a multi-crop model")
    path = stage1_path(artifact, card, stage1)
    s1 = open_stage1(be, artifact, stage1, **(backend_options or {}))
    try:
        s1_scores, _ = score_images(s1, paths, card.input, batch)
    finally:
        if path is not None:
            s1.close()
    if path is None:
        info: Dict[str, Any] = {"crops": STAGE1_CROPS, "file": None, "same_artifact": True}
    else:
        s1_card = _load(path)
        info = {"crops": STAGE1_CROPS, "file": os.path.relpath(os.path.abspath(path),
                                                               os.path.dirname(os.path.abspath(artifact))),
                "sha256": s1_card.sha256, "precision": s1_card.precision}
    return s1_scores, info


def data_root_of(card: ModelCard) -> Optional[str]:
    """The labelled data set the card's operating points (or its training) came from, if still there."""
    for root in (card.ops_source.get("data_root"), (card.data.get("provenance") or {}).get("data_root")):
        if isinstance(root, str) and os.path.isdir(root):
            return root
    return None


def format_points(card: ModelCard, floor: float = metrics.DEFAULT_TPR_FLOOR) -> str:
    """Console table of the card's operating points with the TPR lower bound beside each, then
    one WARNING line per weak point."""
    lines = [card.ops_status_line(),
             f"{'target TPR':>10}  {'threshold':>12}  {'TPR':>6}  {'FPR':>6}  {'TPR 95% low':>11}  defects  "
             "new defect escapes: expected / 95% bound"]
    for op in card.operating_points:
        lb = op.get("tpr_lower95")
        esc, bound = metrics.expected_escape_rate(op), metrics.escape_bound(op)
        lines.append(f"{metrics.tpr_key(op['target_tpr']) + ' %':>10}  {op['threshold']:>12.4g}  "
                     f"{op.get('tpr', float('nan')):>6.3f}  {op.get('fpr', float('nan')):>6.3f}  "
                     f"{float('nan') if lb is None else lb:>11.3f}  {op.get('n_defects')!s:>7}  "
                     + ("-" if esc is None else f"{100 * esc:.1f} %") + " / "
                     + ("-" if bound is None else f"{100 * bound:.1f} %"))
    lines.append("(new defect escapes: expected = (missed + 1) / (defects + 1), the mean over validation draws, "
                 "not a promise for this one threshold; 95% bound = 1 - TPR 95% low, what this threshold "
                 "guarantees with 95 % confidence)")
    lines += ["WARNING: " + w["message"] for w in metrics.weak_points(card.operating_points, floor)]
    sel = card.selection_warning()
    if sel:
        lines.append("WARNING: " + sel)
    return "\n".join(lines)


def remeasure_or_mark(artifact: str, parent: ModelCard, open_fn: Optional[Callable[[str], Any]] = None,
                      data: Optional[str] = None, split: Optional[str] = None) -> ModelCard:
    """After a stage wrote ``artifact`` (card saved, derived from ``parent``): measure its operating
    points when it can run here (``open_fn(artifact)`` opens its backend; default
    :func:`nexedge.runtime.open_backend`) on ``data`` (default: where the parent's were measured),
    otherwise mark the card "operating points from parent (not re-measured)" with the reason."""
    from nexedge.runtime import open_backend

    root = data or data_root_of(parent)
    split = split or parent.ops_source.get("split") or "val"
    reason = None if root else "no labelled data: the parent's data root is gone and none was given"
    be = None
    if reason is None:
        try:
            be = (open_fn or open_backend)(artifact)
        except Exception as e:  # no TensorRT / CUDA here, or the engine does not load on this machine
            reason = f"cannot run {os.path.basename(artifact)} on this machine ({type(e).__name__}: {e})"
    if reason is None and root is not None and be is not None:
        try:
            return measure_artifact(artifact, root, split, backend=be).card
        except Exception as e:  # the artifact is written: leave its card saying why, never half-measured
            reason = f"measuring on {os.path.join(root, split)} failed ({type(e).__name__}: {e})"
        finally:
            be.close()
    card = load_card(artifact)
    card.mark_ops_from_parent(reason or "not measured")
    card.save_for(artifact)
    log.warning("%s: operating points from parent (not re-measured): %s", artifact, reason)
    return card
