"""``nexedge export CV_RUN``: the fold ensemble of ``nexedge train --cv K`` as one ONNX model.

The decision. Fold model f scores an image (in-graph crops, the chosen crop mode and aggregate);
the image is REJECTed when any fold model's score reaches that fold's own threshold. One graph
does it: ``score = expit(max_f(logit(s_f) - offset_f))`` (nexedge.export.graph.EnsembleInGraph)
with ``offset_f`` = the log-odds of the 95th percentile of fold f's good images' out-of-fold
(OOF) scores, minus their mean (nexedge.train.cv.fold_offsets): at one threshold T every fold
model REJECTs about the same share of its good images; the card's threshold T applies to that
score like any other.

The operating points come from the pooled OOF scores on the same scale, ``expit(logit(s_i) -
offset_f(i))`` for every labelled image i of train+val, scored by the fold model that did not
train on it: the threshold and its Clopper-Pearson bound rest on every labelled defect.

What holds (the test split measures it; the card says it):

- Per fold, split-conformal: fold f's model never saw fold f, so a new defect is exchangeable
  with fold f's defects under it, and it scores below the fold's effective threshold (which lies
  below all but m_f of fold f's defects) with probability at most (m_f + 1) / (n_f + 1) over draws.
  The ensemble PASSes a defect only when every fold model does, so its escape rate is at most
  min_f (m_f + 1) / (n_f + 1): ``guaranteed_escape_rate`` per operating point. At TPR 100 % this
  decision is the K-fold CV+ rule of Barber, Candes, Ramdas and Tibshirani, "Predictive inference
  with the jackknife+" (Ann. Statist. 2021) at alpha = 1 / (n + 1), whose Theorem 4 gives
  1 - 2 alpha - min(2 (1 - 1/K) / (n/K + 1), (1 - K/n) / (K + 1)) as well; the per-fold bound is
  the tighter of the two for a few hundred defects.
- The pooled OOF count estimates the fold models' average TPR at their effective thresholds, and
  the ensemble catches every defect any fold model catches, so its TPR is at least that average:
  ``tpr_lower95`` (Clopper-Pearson on all n OOF defects) is a 95 % lower bound for the ensemble
  too. Like any threshold set on the images it is measured on, it is chosen, not pre-set.
- Overkill is not estimated out of fold for the ensemble (each good image trained K-1 of the K
  models): ``fpr`` is the pooled OOF FPR (the folds' average), ``fpr_union_bound`` the sum of the
  folds' OOF FPRs, an upper bound for the ensemble's expected FPR. Measure it on test.
"""

import logging
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from nexedge import metrics
from nexedge.card import ModelCard, load_card
from nexedge.train.cv import CROP_INDEX, fold_checkpoints, load_oof, normalized_scores

log = logging.getLogger(__name__)

RULE = "lowest pooled out-of-fold FPR at the target TPR, then highest pooled AUC, then fewest crops, then mean"


class EnsembleExport(NamedTuple):
    path: str
    card_path: str
    card: ModelCard
    parity: Dict[str, Any]
    selection: Dict[str, Any]


def candidate_rows(oof: Dict[str, Any], good_index: int, modes: Sequence[str], aggregates: Sequence[str],
                   target_tpr: float) -> List[Dict[str, Any]]:
    """Pooled OOF numbers of each crop mode / aggregate on the fold-normalised scale."""
    from nexedge.train.cv import fold_offsets

    y = (oof["labels"] != good_index).astype(int)
    rows = []
    for mode in modes:
        for agg in (["mean"] if mode == "center" else aggregates):
            _, s = metrics.aggregate_crops(oof["logits"][:, CROP_INDEX[mode]], good_index, agg)
            off = fold_offsets(s, y, oof["folds"], oof["k"])
            norm, c = normalized_scores(s, oof["folds"], off)
            op = metrics.operating_point(y, norm, target_tpr)
            rows.append({"crops": mode, "aggregate": agg, "auc": metrics.roc_auc(y, norm), "fpr": op["fpr"],
                         "tpr": op["tpr"], "threshold": op["threshold"], "fpr_at_tpr": metrics.fpr_at_tprs(y, norm),
                         "offsets": (off - c).tolist(), "scores": s, "normalized": norm})
    return rows


def fold_guarantees(s: np.ndarray, y: np.ndarray, folds: np.ndarray, offsets: np.ndarray,
                    ops: Sequence[Dict[str, Any]]) -> None:
    """Add to each operating point the per-fold escape guarantee and the FPR union bound (in place)."""
    k = len(offsets)
    for op in ops:
        t = float(op["threshold"])
        per = []
        for f in range(k):
            m = folds == f
            eff = metrics.expit(metrics.logit(t) + offsets[f])  # fold f's own threshold on its raw score
            d, g = m & (y == 1), m & (y == 0)
            missed = int((s[d] < eff).sum())
            per.append({"fold": f + 1, "threshold": float(eff), "n_defects": int(d.sum()), "missed": missed,
                        "fpr": float((s[g] >= eff).mean()) if g.any() else float("nan")})
        op["guaranteed_escape_rate"] = min((p["missed"] + 1) / (p["n_defects"] + 1) for p in per)
        op["fpr_union_bound"] = min(1.0, float(sum(p["fpr"] for p in per)))
        op["per_fold"] = per


def export_cv(run: str, out: Optional[str] = None, crops: str = "auto", aggregates: Sequence[str] = ("mean",),
              target_tpr: float = 1.0, max_batch: int = 64, parity_data: Optional[str] = None,
              parity_images: int = 16, tolerance: float = 1e-4, threads: Optional[int] = None,
              allow_unseen_mirrors: bool = False) -> EnsembleExport:
    """Export the fold ensemble of the CV run folder ``run`` (in-graph ``crops``; ``auto`` chooses by
    :data:`RULE` on the OOF scores). Its card's operating points are the pooled OOF ones."""
    import torch

    from nexedge.export import parity as par
    from nexedge.export.graph import EnsembleInGraph
    from nexedge.export.onnx_export import GRAPH_OUTPUTS, OPSET, tensorrt_check, torch_export
    from nexedge.models.checkpoint import load_checkpoint, model_from_checkpoint
    from nexedge.runtime.onnxrt import OnnxRuntimeBackend

    summary, oof = load_oof(run)
    ckpts = fold_checkpoints(run, summary)
    models, cards = zip(*[model_from_checkpoint(c) for c in ckpts])
    first = cards[0]
    g = first.good_index
    have = ["center", "five"] + (["ten"] if str(oof["crops"]) == "ten" else [])
    if crops == "auto":
        modes = [m for m in have if not (first.mirror_problem(m) or {}).get("kind") == "unseen"
                 or allow_unseen_mirrors]
    else:
        if crops not in have:
            raise ValueError(f"--crops {crops!r}: the out-of-fold scores of {run} hold {', '.join(have)} crops "
                             "(ten only for models trained with --flip h)")
        from nexedge.export.onnx_export import check_mirrors

        check_mirrors(first, crops, allow_unseen_mirrors)
        modes = [crops]
    rows = candidate_rows(oof, g, modes, aggregates, target_tpr)
    order = {m: i for i, m in enumerate(("center", "five", "ten"))}
    best = min(rows, key=lambda r: (r["fpr"], -r["auc"], order[r["crops"]], r["aggregate"] != "mean"))
    mode, agg = best["crops"], best["aggregate"]
    y = (oof["labels"] != g).astype(int)
    norm, s = best["normalized"], best["scores"]
    offsets = np.asarray(best["offsets"])

    card = first.derive("onnx", precision="fp32")
    card.data["input"]["aggregate"] = agg
    card.data["graph"] = {"crops": mode, "input_name": "images", "output_names": list(GRAPH_OUTPUTS),
                          "max_batch": int(max_batch)}
    ops = metrics.operating_points(y, norm)
    fold_guarantees(s, y, oof["folds"], offsets, ops)
    card.data["operating_points"] = ops
    card.data["val_scores"] = metrics.score_histogram(y, norm)
    card.data["operating_points_source"] = {
        "status": "measured", "split": f"out-of-fold (train+val, {oof['k']} folds)", "data_root": summary["data"],
        "n_good": int((y == 0).sum()), "n_defects": int(y.sum()),
        "per_class": summary.get("per_class"), "artifact_sha256": None, "kind": "onnx", "precision": "fp32",
        "crop_mode": mode, "aggregate": agg, "resize_mode": first.input.get("resize_mode", "stretch"),
        "backend": "torch (each image by the fold model that did not train on it)",
    }
    card.data["cv"] = {
        "k": int(oof["k"]), "seed": summary.get("seed"), "run": os.path.abspath(run),
        "pooled_splits": ["train", "val"],
        "folds": [{"fold": i + 1, "checkpoint": os.path.relpath(c, run), "sha256": cards[i].sha256,
                   "offset_logit": float(offsets[i])} for i, c in enumerate(ckpts)],
        "decision": "REJECT when any fold model's score reaches its own fold's threshold",
        "guarantee": "escape rate <= min over folds of (missed_f + 1) / (defects_f + 1) (split-conformal per fold; "
                     "K-fold CV+ at TPR 100 %, Barber et al. 2021); tpr_lower95: Clopper-Pearson on all OOF defects",
        "spread": next((c["spread"] for c in summary["candidates"] if (c["crops"], c["aggregate"]) == (mode, agg)),
                       None),
    }
    card.data["crop_selection"] = {
        "rule": RULE, "target_tpr": float(target_tpr), "split": "out-of-fold",
        "candidates": [{k: v for k, v in r.items() if k not in ("scores", "normalized")} for r in rows],
        "chosen": {"crops": mode, "aggregate": agg},
    }
    card.data["provenance"] = dict(card.data.get("provenance") or {}, cv_run=os.path.abspath(run),
                                   export={"arch": load_checkpoint(ckpts[0])["arch"], "opset": OPSET,
                                           "exporter": "torch.onnx (TorchScript, dynamo=False)",
                                           "torch": torch.__version__, "ensemble_of": len(ckpts)})
    card.data["provenance"].pop("best_of_run", None)
    card.data["metrics"] = {"cv": {"pooled_auc": best["auc"]}}
    card.validate()

    out = out or os.path.join(run, f"ensemble.{mode}.onnx")
    module = EnsembleInGraph(list(models), card.input, mode, g, card.num_classes, agg, offsets).eval()
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, ".tmp-" + os.path.basename(out))
    try:
        torch_export(module, card, mode, tmp)
        trt = tensorrt_check(tmp, out)
        images, source = par.parity_images(parity_data or summary["data"], card.input, parity_images)
        with torch.inference_mode():
            ref = module(torch.from_numpy(images))[0].numpy()
        with OnnxRuntimeBackend(tmp, card=card, intra_threads=threads) as be:
            got = np.concatenate([be.infer(images[i : i + be.max_batch]).probs
                                  for i in range(0, len(images), be.max_batch)])
        diff = float(np.abs(got - ref).max())
        parity = {"max_abs_diff": diff, "tolerance": tolerance, "n_images": int(len(images)), "crop_mode": mode,
                  "source": source, "reference": "torch ensemble module"}
        if not diff <= tolerance:
            raise RuntimeError(f"parity check failed: max |p_onnx - p_torch| = {diff:.3g} exceeds {tolerance:g}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    from nexedge.card import sha256_file

    card.data["provenance"]["export"].update(parity=parity, tensorrt_check=trt)
    card.data["operating_points_source"]["artifact_sha256"] = sha256_file(out)
    card_path = card.save_for(out)
    selection = dict(card.data["crop_selection"], n_good=int((y == 0).sum()), n_defects=int(y.sum()),
                     backend="the fold models, out of fold", skipped=[
                         {"crops": m, "aggregate": "-", "reason": "mirrored crops the fold models never saw"}
                         for m in have if m not in modes and crops == "auto"])
    return EnsembleExport(out, card_path, load_card(out), parity, selection)


def format_ensemble(card: ModelCard) -> str:
    """The ensemble's guarantee per operating point beside the pooled numbers."""
    cv = card.data.get("cv") or {}
    lines = [f"fold ensemble of {cv.get('k')} models: {cv.get('decision')}",
             f"{'target TPR':>10}  {'threshold':>10}  {'OOF FPR':>7}  {'FPR <=':>6}  {'TPR 95% low':>11}  "
             "escape rate guaranteed <="]
    for op in card.operating_points:
        lines.append(f"{metrics.tpr_key(op['target_tpr']) + ' %':>10}  {op['threshold']:>10.4g}  "
                     f"{100 * op['fpr']:>6.1f}%  {100 * op.get('fpr_union_bound', float('nan')):>5.1f}%  "
                     f"{op['tpr_lower95']:>11.4f}  {100 * op.get('guaranteed_escape_rate', float('nan')):.2f} %")
    sp = cv.get("spread") or {}
    if sp:
        lines.append("fold-to-fold: AUC {:.2f} +- {:.2f} %, FPR at TPR 100 % {:.1f} +- {:.1f} %, threshold {:.3g} to "
                     "{:.3g}".format(100 * sp["auc"]["mean"], 100 * sp["auc"]["std"], 100 * sp["fpr_at_tpr100"]["mean"],
                                     100 * sp["fpr_at_tpr100"]["std"], sp["threshold"]["min"], sp["threshold"]["max"]))
    lines.append("(OOF FPR: the folds' average out of fold; FPR <=: their sum, a bound for the ensemble; measure "
                 "the ensemble's overkill and escapes on test: nexedge eval ARTIFACT --data ROOT --split test)")
    return "\n".join(lines)
