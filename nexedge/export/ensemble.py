"""``nexedge export CV_RUN``: the fold ensemble of ``nexedge train --cv K`` as one ONNX model.

The decision. Fold model f scores an image (in-graph crops, the chosen crop mode and aggregate);
its log-odds of a defect minus ``offset_f`` is u_f, where ``offset_f`` is the log-odds of fold f's
own TPR-100 % threshold on its out-of-fold (OOF) scores, minus the folds' mean
(nexedge.train.cv.fold_offsets): at the normalised TPR-100 % threshold every fold model sits at
its own. The ensemble's score is ``expit(rule_f(u_f))`` (nexedge.export.graph.EnsembleInGraph), and
the card's threshold T applies to it like any other. ``--ensemble-rule``:

- ``median`` (default): REJECT when at least half of the fold models reach their thresholds (for
  odd K, the majority);
- ``mean``: the mean of the aligned log-odds;
- ``max``: REJECT when any fold model reaches its threshold.

The operating points come from the pooled OOF scores on the same scale, ``logit(s_i) -
offset_f(i)`` for every labelled image i of train+val, scored by the fold model that did not
train on it: the threshold and its Clopper-Pearson bound rest on every labelled defect.

What holds (the card says it per operating point; the test split measures it):

- Per fold, split-conformal: fold f's model never saw fold f, so a new defect is exchangeable
  with fold f's defects under it and scores below the fold's effective threshold (below all but
  m_f of fold f's defects) with probability p_f <= (m_f + 1) / (n_f + 1) over draws. At TPR 100 %
  every m_f is 0 and this is exact; at lower targets the m_f are themselves drawn, so it is close,
  not exact.
- The rule turns the p_f into the ensemble's escape rate by counting. PASS needs at least r fold
  models below their thresholds: r = K for max, ceil(K/2) for the median (median < T means the
  lower middle value is), 1 for the mean (mean < T means the smallest is). With N the number of
  fold models that miss a new defect, P(escape) <= P(N >= r) <= E[N] / r = sum_f p_f / r (Markov;
  for max, <= min_f p_f). ``guaranteed_escape_rate`` is that with the conformal p_f: rigorous at
  TPR 100 % (for the median of K = 5 it is 5/3 of a single fold's rate, the same kind of price
  as the factor 2 of jackknife+/CV+, Barber, Candes, Ramdas and Tibshirani, Ann. Statist. 2021).
  It is a worst case: it holds however the folds' misses are correlated.
- The pooled OOF count estimates the fold models' average escape rate; Clopper-Pearson on all n
  OOF defects bounds it (95 %). ``escape_factor`` = n / (r * min_f n_f) (1 for max) carries that
  average to the ensemble by the same counting, so the card's expected escape rate and its 95 %
  bound (``metrics.expected_escape_rate``, ``metrics.escape_bound``, which eval checks) are
  ``escape_factor`` times the pooled ones; ``tpr_lower95`` stays the pooled OOF bound of the
  operating point. Like any threshold set on the images it is measured on, it is chosen, not
  pre-set. An ensemble of the folds usually misses fewer defects than its average member; the
  factor does not assume it.
- Overkill is not estimated out of fold for the ensemble (each good image trained K-1 of the K
  models): ``fpr`` is the pooled OOF FPR (the folds' average), ``fpr_bound`` = sum_f fpr_f / q
  with q the fold models that must reach their thresholds to REJECT (1 for max and mean,
  ceil(K/2) for the median), a Markov bound on the ensemble's expected FPR. Measure it on test.
"""

import logging
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from nexedge import metrics
from nexedge.card import ModelCard, load_card
from nexedge.train.cv import CROP_INDEX, fold_checkpoints, load_oof, normalized_scores

log = logging.getLogger(__name__)

DECISIONS = {
    "median": "REJECT when the median over the fold models of their aligned log-odds reaches the threshold "
              "(at least half of them at their own thresholds)",
    "mean": "REJECT when the mean over the fold models of their aligned log-odds reaches the threshold",
    "max": "REJECT when any fold model's score reaches its own fold's threshold",
}
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


def votes(rule: str, k: int) -> Dict[str, int]:
    """How many of the k fold models must miss a defect for the ensemble to PASS it (``pass``) and
    must reach their thresholds for it to REJECT (``reject``), at least, under ``rule``."""
    half = (k + 1) // 2
    return {"max": {"pass": k, "reject": 1}, "mean": {"pass": 1, "reject": 1},
            "median": {"pass": half, "reject": half}}[rule]


def fold_guarantees(s: np.ndarray, y: np.ndarray, folds: np.ndarray, offsets: np.ndarray,
                    ops: Sequence[Dict[str, Any]], rule: str = "median") -> None:
    """Add to each operating point the per-fold numbers and what the ``rule``'s ensemble guarantees
    (module docstring), in place."""
    k = len(offsets)
    v = votes(rule, k)
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
        conformal = [(p["missed"] + 1) / (p["n_defects"] + 1) for p in per]
        n, n_min = sum(p["n_defects"] for p in per), min(p["n_defects"] for p in per)
        if rule == "max":
            op["guaranteed_escape_rate"], op["escape_factor"] = min(conformal), 1.0
        else:
            op["guaranteed_escape_rate"] = min(1.0, sum(conformal) / v["pass"])
            op["escape_factor"] = n / (v["pass"] * n_min)
        op["fpr_bound"] = min(1.0, float(sum(p["fpr"] for p in per)) / v["reject"])
        op["ensemble_rule"] = rule
        op["per_fold"] = per


def export_cv(run: str, out: Optional[str] = None, crops: str = "auto", aggregates: Sequence[str] = ("mean",),
              target_tpr: float = 1.0, max_batch: int = 64, parity_data: Optional[str] = None,
              parity_images: int = 16, tolerance: float = 1e-4, threads: Optional[int] = None,
              allow_unseen_mirrors: bool = False, rule: str = "median") -> EnsembleExport:
    """Export the fold ensemble of the CV run folder ``run`` (in-graph ``crops``; ``auto`` chooses by
    :data:`RULE` on the OOF scores), combining the folds by ``rule`` (median, mean or max). Its card's
    operating points are the pooled OOF ones, with what the rule guarantees."""
    import torch

    from nexedge.export import parity as par
    from nexedge.export.graph import ENSEMBLE_RULES, EnsembleInGraph
    from nexedge.export.onnx_export import GRAPH_OUTPUTS, OPSET, tensorrt_check, torch_export
    from nexedge.models.checkpoint import load_checkpoint, model_from_checkpoint
    from nexedge.runtime.backends.onnxruntime import OnnxRuntimeBackend

    if rule not in ENSEMBLE_RULES:
        raise ValueError(f"--ensemble-rule {rule!r}: expected one of {', '.join(ENSEMBLE_RULES)}")
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
    ops = metrics.operating_points(y, norm)
    fold_guarantees(s, y, oof["folds"], offsets, ops, rule)
    with card.edit():
        card.set_aggregate(agg)
        card.set_graph(mode, "images", GRAPH_OUTPUTS, int(max_batch))
        card.set_operating_points(ops, {
            "status": "measured", "split": f"out-of-fold (train+val, {oof['k']} folds)", "data_root": summary["data"],
            "n_good": int((y == 0).sum()), "n_defects": int(y.sum()),
            "per_class": summary.get("per_class"), "artifact_sha256": None, "kind": "onnx", "precision": "fp32",
            "crop_mode": mode, "aggregate": agg, "resize_mode": first.input.get("resize_mode", "stretch"),
            "backend": "torch (each image by the fold model that did not train on it)",
        })
        card.set_score_reference(metrics.score_histogram(y, norm))
    card.set_cv({
        "k": int(oof["k"]), "seed": summary.get("seed"), "run": os.path.abspath(run),
        "pooled_splits": ["train", "val"],
        "folds": [{"fold": i + 1, "checkpoint": os.path.relpath(c, run), "sha256": cards[i].sha256,
                   "offset_logit": float(offsets[i])} for i, c in enumerate(ckpts)],
        "rule": rule, "votes": votes(rule, int(oof["k"])), "decision": DECISIONS[rule],
        "guarantee": "escape rate <= guaranteed_escape_rate: per fold split-conformal (m_f + 1) / (n_f + 1), "
                     "combined by the rule (" + ("the minimum over folds" if rule == "max" else
                                                 "their sum / the fold models that must miss to PASS, Markov")
                     + "); expected escape rate and 95 % bound: escape_factor x the pooled OOF ones "
                     "(tpr_lower95: Clopper-Pearson on all OOF defects)",
        "spread": next((c["spread"] for c in summary["candidates"] if (c["crops"], c["aggregate"]) == (mode, agg)),
                       None),
    })
    card.set_crop_selection({
        "rule": RULE, "target_tpr": float(target_tpr), "split": "out-of-fold",
        "candidates": [{k: v for k, v in r.items() if k not in ("scores", "normalized")} for r in rows],
        "chosen": {"crops": mode, "aggregate": agg},
    })
    provenance = dict(card.provenance, cv_run=os.path.abspath(run),
                      export={"arch": load_checkpoint(ckpts[0])["arch"], "opset": OPSET,
                              "exporter": "torch.onnx (TorchScript, dynamo=False)",
                              "torch": torch.__version__, "ensemble_of": len(ckpts)})
    provenance.pop("best_of_run", None)
    card.set_provenance(provenance)
    card.set_metrics({"cv": {"pooled_auc": best["auc"]}})

    out = out or os.path.join(run, f"ensemble.{mode}.onnx")
    module = EnsembleInGraph(list(models), card.input, mode, g, card.num_classes, agg, offsets, rule).eval()
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

    card.update_provenance(export=dict(card.provenance["export"], parity=parity, tensorrt_check=trt))
    card.update_ops_source(artifact_sha256=sha256_file(out))
    card_path = card.save_for(out)
    selection = dict(card.data["crop_selection"], n_good=int((y == 0).sum()), n_defects=int(y.sum()),
                     backend="the fold models, out of fold", skipped=[
                         {"crops": m, "aggregate": "-", "reason": "mirrored crops the fold models never saw"}
                         for m in have if m not in modes and crops == "auto"])
    return EnsembleExport(out, card_path, load_card(out), parity, selection)


def format_ensemble(card: ModelCard) -> str:
    """The ensemble's guarantee per operating point beside the pooled numbers."""
    cv = card.data.get("cv") or {}
    lines = [f"fold ensemble of {cv.get('k')} models, rule {cv.get('rule', 'max')}: {cv.get('decision')}",
             f"{'target TPR':>10}  {'threshold':>10}  {'OOF FPR':>7}  {'FPR <=':>6}  {'TPR 95% low':>11}  "
             f"{'escapes: expected / 95% bound':>29}  guaranteed <="]
    for op in card.operating_points:
        esc, bound = metrics.expected_escape_rate(op), metrics.escape_bound(op)
        lines.append(f"{metrics.tpr_key(op['target_tpr']) + ' %':>10}  {op['threshold']:>10.4g}  "
                     f"{100 * op['fpr']:>6.1f}%  {100 * op.get('fpr_bound', float('nan')):>5.1f}%  "
                     f"{op['tpr_lower95']:>11.4f}  {100 * esc:>14.2f}% / {100 * bound:>5.2f}%     "
                     f"{100 * op.get('guaranteed_escape_rate', float('nan')):.2f} %")
    sp = cv.get("spread") or {}
    if sp:
        lines.append("fold-to-fold: AUC {:.2f} +- {:.2f} %, FPR at TPR 100 % {:.1f} +- {:.1f} %, threshold {:.3g} to "
                     "{:.3g}".format(100 * sp["auc"]["mean"], 100 * sp["auc"]["std"], 100 * sp["fpr_at_tpr100"]["mean"],
                                     100 * sp["fpr_at_tpr100"]["std"], sp["threshold"]["min"], sp["threshold"]["max"]))
    op0 = card.operating_points[-1] if card.operating_points else {}
    lines.append(f"(OOF FPR: the folds' average out of fold; FPR <=: a bound for the ensemble's; TPR 95% low: pooled "
                 f"OOF, the average fold model; escapes: {op0.get('escape_factor', 1.0):.2f} x the pooled OOF ones, "
                 "carried to the ensemble by its rule; guaranteed: split-conformal per fold, combined by the rule. "
                 "Measure overkill and escapes on test: nexedge eval ARTIFACT --data ROOT --split test)")
    return "\n".join(lines)
