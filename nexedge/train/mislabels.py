"""``nexedge mislabels``: rank images whose given label the model disputes.

Suspicion is the probability of the other side of the good/defect split: for a
good-labelled image its defect score, for a defect-labelled image p(good). Where
a SAT loss updated an image's soft label (``sat_state.npz`` of the run, train
split), the soft label gives it instead (1 - t_good or t_good): SAT's running
average over epochs is steadier than one checkpoint's score. A soft label that is
still the one-hot given label (SAT had not started, or the image was never drawn)
says nothing, so those images keep the model's probabilities. The SAT sample
weight w_i = max_j t_ij (low for doubtful labels) is written beside it. With a manifest that
has ``true_label`` the ranking's precision and recall against the real noise are
printed (binary flips good <-> defect, which this ranking targets, and all
label noise).
"""

import csv
import io
import os
from typing import Any, Dict, Optional

import numpy as np

from nexedge.card import atomic_write_bytes


def load_sat_state(run_dir: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(run_dir, "sat_state.npz")
    if not os.path.exists(path):
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def precision_recall(flagged: np.ndarray, truth: np.ndarray) -> Dict[str, float]:
    """Precision and recall of boolean ``flagged`` against boolean ``truth``."""
    tp = int((flagged & truth).sum())
    nf, nt = int(flagged.sum()), int(truth.sum())
    return {"tp": tp, "flagged": nf, "noisy": nt,
            "precision": tp / nf if nf else float("nan"), "recall": tp / nt if nt else float("nan")}


def rank_mislabels(
    run: str, data: str, split: str = "train", by: str = "auto", top: Optional[int] = None,
    crop_mode: Optional[str] = None, batch_size: int = 64, progress: bool = True,
) -> Dict[str, Any]:
    """Rows sorted by suspicion (highest first) and, with a manifest, precision/recall."""
    from nexedge.card import load_card
    from nexedge.runs import resolve_artifact
    from nexedge.train.data import read_dataset_manifest
    from nexedge.train.evaluate import score_checkpoint

    if by not in ("auto", "model", "sat"):
        raise ValueError(f"--by {by!r}: expected auto, model or sat")
    ckpt = resolve_artifact(run)
    mode = crop_mode or load_card(ckpt, verify=False).input["crop_mode"]
    s = score_checkpoint(ckpt, data, split, [mode], batch_size, progress)
    classes, g = s["classes"], s["good_index"]
    labels, paths, score = s["labels"], [os.path.normpath(p) for p in s["paths"]], s[mode]
    probs = (s.get("probs") or {}).get(mode)
    is_good = labels == g
    susp = np.where(is_good, score, 1.0 - score)
    source = np.array(["model"] * len(labels), dtype=object)
    sat_w = np.full(len(labels), np.nan)
    run_dir = run if os.path.isdir(run) else os.path.dirname(run)
    sat = load_sat_state(run_dir) if by != "model" else None
    if by == "sat" and sat is None:
        raise FileNotFoundError(f"--by sat: no sat_state.npz in {run_dir} (train with --loss sat, sat_good or sat_boost)")
    if sat is not None:
        sat_index = {os.path.normpath(str(p)): i for i, p in enumerate(sat["paths"])}
        g_sat = [str(c) for c in sat["classes"]].index(classes[g])
        only_good = str(sat["loss"]) != "sat"
        for i, p in enumerate(paths):
            j = sat_index.get(p)
            if j is None or (only_good and not is_good[i]):
                continue
            if float(np.max(sat["soft"][j])) >= 1.0:  # never updated: one-hot, would rank it 0
                continue
            t_good = float(sat["soft"][j, g_sat])
            sat_w[i] = float(sat["weights"][j])
            susp[i] = 1.0 - t_good if is_good[i] else t_good
            source[i] = "sat"
    order = np.argsort(-susp, kind="stable")
    n_top = top if top is not None else max(10, int(round(0.02 * len(labels))))
    manifest = read_dataset_manifest(data)
    true = [manifest.get(p, {}).get("true_label") for p in paths]
    rows = []
    for rank, i in enumerate(order, 1):
        rows.append({
            "rank": rank, "path": paths[i], "given_label": classes[labels[i]],
            "direction": "good->defect" if is_good[i] else "defect->good",
            "suspicion": round(float(susp[i]), 6), "source": source[i], "defect_score": round(float(score[i]), 6),
            "sat_weight": "" if np.isnan(sat_w[i]) else round(float(sat_w[i]), 6),
            "flagged": int(rank <= n_top), "true_label": true[i] if true[i] is not None else "",
            # class probabilities: `nexedge pull --mislabels ... --format cleanlab` needs them
            **({f"p_{c}": round(float(probs[i, k]), 6) for k, c in enumerate(classes)} if probs is not None else {}),
        })
    result: Dict[str, Any] = {"checkpoint": ckpt, "crop_mode": mode, "rows": rows, "n": len(rows), "top": n_top,
                              "sat": sat is not None}
    if any(t is not None for t in true):
        flagged = np.zeros(len(labels), bool)
        flagged[order[:n_top]] = True
        given = np.asarray([classes[y] for y in labels], dtype=object)
        tl = np.asarray([t if t is not None else gv for t, gv in zip(true, given)], dtype=object)
        good_name = classes[g]
        flip = (given == good_name) != (tl == good_name)
        anynoise = given != tl
        n_flip = int(flip.sum())
        at_n = np.zeros(len(labels), bool)
        at_n[order[:n_flip]] = True
        result["noise"] = {
            "binary_flips": precision_recall(flagged, flip),
            "all_noise": precision_recall(flagged, anynoise),
            "binary_flips_at_n_noisy": precision_recall(at_n, flip),
        }
    return result


def run_mislabels(
    run: str, data: str, split: str = "train", by: str = "auto", top: Optional[int] = None,
    crop_mode: Optional[str] = None, out: Optional[str] = None, batch_size: int = 64, progress: bool = True,
) -> Dict[str, Any]:
    """Rank, write the CSV, print the head of the ranking and the noise scores."""
    res = rank_mislabels(run, data, split, by, top, crop_mode, batch_size, progress)
    run_dir = run if os.path.isdir(run) else os.path.dirname(run)
    out = out or os.path.join(run_dir, f"mislabels_{split}.csv")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(res["rows"][0]))
    w.writeheader()
    w.writerows(res["rows"])
    atomic_write_bytes(out, buf.getvalue().encode())
    res["out"] = out
    print(f"ranked {res['n']} {split} images with {os.path.basename(res['checkpoint'])} ({res['crop_mode']} crop"
          f"{', SAT soft labels' if res['sat'] else ''}); top {res['top']} flagged")
    print(f"{'rank':>4}  {'suspicion':>9}  {'src':5}  {'given':>14}  {'true':>14}  path")
    for r in res["rows"][: min(15, res["top"])]:
        print(f"{r['rank']:>4}  {r['suspicion']:9.4f}  {r['source']:5}  {r['given_label']:>14}  "
              f"{r['true_label'] or '?':>14}  {r['path']}")
    if "noise" in res:
        for name, pr in res["noise"].items():
            print(f"{name:24s}: precision {pr['precision']:.3f} recall {pr['recall']:.3f} "
                  f"({pr['tp']} of {pr['flagged']} flagged, {pr['noisy']} noisy)")
    print(f"wrote {out}")
    return res
