"""``nexedge export --crops auto``: choose the crop mode (and crop aggregate) by measurement.

Every candidate (center; five and ten crops, each with the ``mean`` of the logits and, where
asked, the ``max`` defect score) is scored on the validation split through ONNX Runtime, the
runtime the line uses (a host-crop export of the checkpoint, one view per candidate, the
``thresholds`` machinery). The one with the best tail wins: the lowest FPR at the target TPR,
then the highest AUC, then the fewest crops (the cheapest), then ``mean``. TenCrop is a
candidate only for a model trained with horizontal mirrors (its second five crops are mirror
images). The winner is exported with in-graph crops, its operating points measured on itself,
and the side-by-side comparison goes into its card (``crop_selection``).
"""

import logging
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from nexedge import metrics

log = logging.getLogger(__name__)

CANDIDATE_MODES = ("center", "five", "ten")
RULE = "lowest FPR at the target TPR, then highest AUC, then fewest crops, then mean before max"


class Candidate(NamedTuple):
    crops: str
    aggregate: str


def candidates(card: Any, aggregates: Sequence[str], allow_unseen_mirrors: bool = False
               ) -> Tuple[List[Candidate], List[Dict[str, str]]]:
    """(candidates to measure, skipped ones with the reason) for a checkpoint's card."""
    todo: List[Candidate] = []
    skipped: List[Dict[str, str]] = []
    for mode in CANDIDATE_MODES:
        problem = card.mirror_problem(mode)
        aggs = ["mean"] if mode == "center" else list(aggregates)
        if problem is not None and problem["kind"] == "unseen" and not allow_unseen_mirrors:
            skipped += [{"crops": mode, "aggregate": a, "reason": f"model trained with --flip {card.train_flip}: "
                         "mirrored crops it never saw"} for a in aggs]
            continue
        todo += [Candidate(mode, a) for a in aggs]
    return todo, skipped


def choose(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The best measured row by :data:`RULE`."""
    if not rows:
        raise ValueError("no crop candidate was measured")
    order = {m: i for i, m in enumerate(CANDIDATE_MODES)}

    def key(r: Dict[str, Any]) -> tuple:
        return (r["fpr"], -r["auc"], order[r["crops"]], r["aggregate"] != "mean")

    return min(rows, key=key)


def measure_candidates(checkpoint: str, root: str, split: str, todo: Sequence[Candidate], target_tpr: float,
                       threads: Optional[int] = None, batch: int = 16) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Score ``root/<split>`` with each candidate through ONNX Runtime; rows of AUC, FPR and threshold at
    ``target_tpr``, and what was measured (split, counts, backend)."""
    import tempfile

    from nexedge.export.onnx_export import torch_export
    from nexedge.export.thresholds import score_images, split_images
    from nexedge.models.checkpoint import model_from_checkpoint
    from nexedge.runtime.backends.onnxruntime import OnnxRuntimeBackend

    model, ck_card = model_from_checkpoint(checkpoint)
    card = ck_card.derive("onnx", precision="fp32")
    card.set_graph("host", "input", ["logits"], 160)
    paths, labels = split_images(root, split, card.classes)
    y = (labels != card.good_index).astype(int)
    if not y.sum() or y.all():
        raise ValueError(f"{os.path.join(root, split)}: --crops auto needs good and defect images (good "
                         f"{int((y == 0).sum())}, defect {int(y.sum())})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="nexedge-auto-") as tmp:
        path = os.path.join(tmp, "host.onnx")
        torch_export(model, card, "host", path)
        with OnnxRuntimeBackend(path, card=card, intra_threads=threads, verify=False) as be:
            for c in todo:
                view = be.crop_view(c.crops, c.aggregate)
                s, _ = score_images(view, paths, card.input, batch=max(1, min(batch, 160 // view.k)))
                op = metrics.operating_point(y, s, target_tpr)
                rows.append({"crops": c.crops, "aggregate": c.aggregate, "auc": metrics.roc_auc(y, s),
                             "fpr": op["fpr"], "tpr": op["tpr"], "threshold": op["threshold"],
                             "fpr_at_tpr": metrics.fpr_at_tprs(y, s)})
                log.info("crops %s %s on %s: AUC %.4f, FPR %.4f at TPR >= %s", c.crops, c.aggregate, split,
                         rows[-1]["auc"], op["fpr"], target_tpr)
    info = {"split": split, "data_root": os.path.abspath(root), "n_good": int((y == 0).sum()),
            "n_defects": int(y.sum()), "backend": "onnxruntime (host crops)", "target_tpr": float(target_tpr)}
    return rows, info


def format_selection(sel: Dict[str, Any]) -> str:
    """Console table of the candidates side by side, and the choice."""
    tk = metrics.tpr_key(sel["target_tpr"])
    lines = [f"crops auto: measured on {sel['split']!r} ({sel['n_good']} good, {sel['n_defects']} defect images) "
             f"through {sel['backend']}; chosen by {sel['rule']} at TPR >= {tk} %",
             f"  {'crops':<7} {'aggregate':<9} {'AUC %':>7} {'FPR % at TPR ' + tk:>16} {'FPR % at 99.1':>13}  threshold"]
    for r in sel["candidates"]:
        mark = "  <- chosen" if (r["crops"], r["aggregate"]) == (sel["chosen"]["crops"], sel["chosen"]["aggregate"]) \
            else ""
        lines.append(f"  {r['crops']:<7} {r['aggregate']:<9} {100 * r['auc']:>7.2f} {100 * r['fpr']:>16.2f} "
                     f"{100 * r['fpr_at_tpr']['99.1']:>13.2f}  {r['threshold']:.4g}{mark}")
    for r in sel["skipped"]:
        lines.append(f"  {r['crops']:<7} {r['aggregate']:<9} skipped: {r['reason']}")
    lines.append("  (the crops were chosen on the split the thresholds are measured on: with "
                 f"{len(sel['candidates'])} candidates the chosen one's FPR there is slightly optimistic)")
    return "\n".join(lines)


def auto_export(checkpoint: str, out: Optional[str] = None, target_tpr: float = 1.0,
                aggregates: Sequence[str] = ("mean",), data: Optional[str] = None, split: str = "val",
                threads: Optional[int] = None, allow_unseen_mirrors: bool = False, **export_kw: Any) -> Any:
    """Measure the candidates, export the winner (in-graph crops) to ``out`` (default
    ``<checkpoint stem>.<crops>.onnx``) and record the comparison in its card. Returns
    (:class:`nexedge.export.onnx_export.ExportResult`, selection record)."""
    from nexedge.card import load_card
    from nexedge.export.onnx_export import default_output, export_onnx
    from nexedge.export.thresholds import data_root_of

    bad = [a for a in aggregates if a not in metrics.AGGREGATES]
    if bad or not aggregates:
        raise ValueError(f"--aggregate {','.join(aggregates)}: expected one or more of {', '.join(metrics.AGGREGATES)}")
    if not 0.0 < target_tpr <= 1.0:
        raise ValueError(f"--auto-kw tpr={target_tpr}: expected a fraction in (0, 1]")
    ck = load_card(checkpoint)
    root = data or data_root_of(ck)
    if root is None:
        raise ValueError("--crops auto measures the candidates on labelled data: give --data ROOT (the trainer's "
                         "data root is gone)")
    todo, skipped = candidates(ck, aggregates, allow_unseen_mirrors)
    rows, info = measure_candidates(checkpoint, root, split, todo, target_tpr, threads)
    best = choose(rows)
    selection = dict(info, rule=RULE, candidates=rows, skipped=skipped,
                     chosen={"crops": best["crops"], "aggregate": best["aggregate"]})
    res = export_onnx(checkpoint, out=out or default_output(checkpoint, best["crops"]), crops=best["crops"],
                      aggregate=best["aggregate"], data=root, split=split, threads=threads,
                      allow_unseen_mirrors=allow_unseen_mirrors, **export_kw)
    card = load_card(res.path)
    card.set_crop_selection(metrics_jsonable(selection))
    card_path = card.save_for(res.path)
    return res._replace(card=card, card_path=card_path), selection


def metrics_jsonable(obj: Any) -> Any:
    """JSON-safe copy (NaN -> None, numpy scalars -> Python)."""
    if isinstance(obj, dict):
        return {k: metrics_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [metrics_jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
