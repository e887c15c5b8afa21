"""``nexedge train --cv K``: operating points that rest on every labelled defect.

A validation split of a real line holds few defects (35 of the magnetic tiles' 372), so a
threshold set on it, and the Clopper-Pearson bound beside it, rest on a handful of images.
Cross-validation scores every image of train+val by a model that did not train on it:

1. train+val are pooled and cut into K folds, stratified by class (``--seed``);
2. fold k's model trains on the other K-1 folds with the run's recipe (``--select last``: the
   held-out fold only scores, it never picks an epoch) and scores fold k: out-of-fold (OOF);
3. every image's per-crop logits (TenCrop for a model trained with horizontal mirrors, else
   FiveCrop; CenterCrop is crop 4 of both) go to ``oof.npz``, the per-fold and pooled numbers to
   ``cv.json``.

``nexedge export RUN`` then builds the fold ensemble (nexedge.export.ensemble): its decision and
what it guarantees are described there. The test split is never touched.
"""

import copy
import json
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from nexedge import metrics
from nexedge.card import atomic_write_bytes
from nexedge.train.cardbuild import json_safe

CV_FILES = ("cv.json", "oof.npz")
#: Crop indices of each crop mode inside the stored per-crop logits (TenCrop order).
CROP_INDEX = {"center": [4], "five": [0, 1, 2, 3, 4], "ten": list(range(10))}


def is_cv_run(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "cv.json"))


def fold_assignment(labels: Sequence[int], k: int, seed: int = 0) -> np.ndarray:
    """Fold index (0..k-1) per image: each class shuffled (``seed``) and dealt round-robin, from a
    per-class random start so that small classes do not all land in the first folds."""
    y = np.asarray(labels, dtype=int)
    folds = np.empty(y.size, dtype=int)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng = np.random.default_rng([int(seed), 7451, int(c)])
        idx = idx[rng.permutation(idx.size)]
        folds[idx] = (np.arange(idx.size) + int(rng.integers(k))) % k
    return folds


def check_folds(labels: np.ndarray, good_index: int, k: int) -> None:
    """Every fold needs good and defect images (else it has no threshold of its own)."""
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"--cv {k!r}: expected an integer >= 2 folds")
    n_def, n_good = int((labels != good_index).sum()), int((labels == good_index).sum())
    if k > min(n_def, n_good):
        raise ValueError(f"--cv {k}: train+val hold {n_def} defect and {n_good} good images; every fold needs "
                         f"both, so at most {min(n_def, n_good)} folds")


def _pool(data: str, classes: Sequence[str]) -> Tuple[List[str], np.ndarray]:
    from nexedge.train.data import scan_split

    items = scan_split(data, "train", classes) + scan_split(data, "val", classes)
    return [p for p, _ in items], np.asarray([y for _, y in items], dtype=int)


def link_name(rel: str) -> str:
    """File name of a pooled image in a fold root: ``train/good/x.png`` -> ``train__x.png`` (an image of
    train and one of val with the same name never collide)."""
    return rel.split(os.sep)[0] + "__" + os.path.basename(rel)


def make_fold_roots(data: str, out: str, paths: Sequence[str], labels: np.ndarray, folds: np.ndarray,
                    classes: Sequence[str], k: int) -> List[str]:
    """``out/folds/fN/{train,val}/<class>/`` of symbolic links to the pooled images (val = fold N)."""
    roots = []
    for f in range(k):
        root = os.path.join(out, "folds", f"f{f + 1}")
        if os.path.isdir(root):
            shutil.rmtree(root)
        for i, (rel, y) in enumerate(zip(paths, labels)):
            split = "val" if folds[i] == f else "train"
            d = os.path.join(root, split, classes[int(y)])
            os.makedirs(d, exist_ok=True)
            os.symlink(os.path.abspath(os.path.join(data, rel)), os.path.join(d, link_name(rel)))
        roots.append(root)
    return roots


def prepare_cv_folder(out: str, overwrite: bool) -> None:
    """``out`` must be new or empty, or ``overwrite`` given (then only what a CV run writes is removed)."""
    if not os.path.exists(out):
        return
    names = [n for n in os.listdir(out) if n != ".DS_Store"]
    if not names:
        return
    if not overwrite:
        raise ValueError(f"--out {out!r} already holds files ({', '.join(sorted(names)[:4])}); use a new --out or "
                         "--overwrite")
    owned = [n for n in names if n in CV_FILES or n == "folds" or (n.startswith("fold") and n[4:].isdigit())
             or n.startswith(("eval_", ".tmp-"))]
    foreign = sorted(set(names) - set(owned))
    if foreign:
        raise ValueError(f"--overwrite: {out!r} holds files a CV run does not write ({', '.join(foreign[:5])}); "
                         "refusing to delete them, choose another --out")
    for n in owned:
        p = os.path.join(out, n)
        shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)


def fold_offsets(scores: np.ndarray, y_defect: np.ndarray, folds: np.ndarray, k: int) -> np.ndarray:
    """Per fold, the log-odds of its own TPR-100 % threshold on its out-of-fold scores.

    Shifted by these offsets, every fold model's own TPR-100 % threshold (just below the weakest
    defect of its fold) lands on one value, so at that normalised threshold each fold model sits
    exactly where its split-conformal guarantee holds: a new defect scores below it with
    probability at most 1 / (defects in the fold + 1). A fold whose weakest defect is an outlier
    (on the magnetic tiles one fray scored 3e-5 out of fold) gets a low threshold and REJECTs most
    good images; the ensemble's default rule (the median over folds) takes it as one vote of K
    instead of letting it decide (nexedge.export.ensemble)."""
    out = np.empty(k)
    y = np.asarray(y_defect)
    for f in range(k):
        m = folds == f
        out[f] = metrics.logit(float(metrics.operating_point(y[m], scores[m], 1.0)["threshold"]))
    return out


def normalized_scores(scores: np.ndarray, folds: np.ndarray, offsets: np.ndarray) -> Tuple[np.ndarray, float]:
    """OOF scores on one scale: each fold's log-odds shifted by its offset, then by the mean offset
    (so the numbers read like scores): expit(logit(s) - offset[fold] + mean(offset)). Returns the scores
    and the mean offset."""
    c = float(np.mean(offsets))
    return metrics.expit(metrics.logit(scores) - offsets[folds] + c), c


def fold_table(scores: np.ndarray, y_defect: np.ndarray, folds: np.ndarray, k: int) -> List[Dict[str, Any]]:
    """Per fold: images, defects, AUC, and its own TPR-100 % point (threshold, FPR, weakest defect)."""
    rows = []
    for f in range(k):
        m = folds == f
        op = metrics.operating_point(y_defect[m], scores[m], 1.0)
        rows.append({"fold": f + 1, "n": int(m.sum()), "n_defects": int(y_defect[m].sum()),
                     "auc": metrics.roc_auc(y_defect[m], scores[m]), "threshold": op["threshold"],
                     "fpr_at_tpr100": op["fpr"], "weakest_defect": op["weakest_caught"]})
    return rows


def spread(rows: Sequence[Dict[str, Any]], key: str) -> Dict[str, float]:
    v = np.asarray([r[key] for r in rows], dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


def oof_logits(ckpt: str, root: str, widest: str, batch_size: int = 32) -> Tuple[List[str], np.ndarray]:
    """(image paths relative to the fold root, per-crop logits N x K x C) of a fold model on its fold."""
    import torch

    from nexedge.models.checkpoint import model_from_checkpoint
    from nexedge.train.data import ImageFolderSet, collate_skip_unreadable
    from nexedge.train.loop import crop_logits
    from nexedge.train.transforms import EvalTransform

    model, card = model_from_checkpoint(ckpt)
    ds = ImageFolderSet(root, "val", card.classes, card.input, EvalTransform(card.input, widest))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False,
                                         collate_fn=collate_skip_unreadable)
    idx, logits, _ = crop_logits(model, loader, torch.device("cpu"), f"OOF {os.path.basename(root)}", False)
    return [ds.paths[int(i)] for i in idx], logits


def summarize(oof: Dict[str, Any], crops: str, aggregate: str, good_index: int) -> Dict[str, Any]:
    """Per-fold and pooled numbers of one crop mode / aggregate on the OOF logits."""
    _, s = metrics.aggregate_crops(oof["logits"][:, CROP_INDEX[crops]], good_index, aggregate)
    y = (oof["labels"] != good_index).astype(int)
    folds, k = oof["folds"], int(oof["k"])
    rows = fold_table(s, y, folds, k)
    offsets = fold_offsets(s, y, folds, k)
    norm, c = normalized_scores(s, folds, offsets)
    return {"crops": crops, "aggregate": aggregate, "folds": rows, "offsets_logit": offsets.tolist(),
            "mean_offset_logit": c, "pooled_auc_raw": metrics.roc_auc(y, s),
            "pooled_auc": metrics.roc_auc(y, norm), "operating_points": metrics.operating_points(y, norm),
            "spread": {key: spread(rows, key) for key in ("auc", "threshold", "fpr_at_tpr100")}}


def run_cv(cfg: Any, k: int) -> Dict[str, Any]:
    """Train the K fold models of ``cfg`` (a TrainConfig) and write the OOF logits and summary."""
    from nexedge.train.data import list_classes
    from nexedge.train.trainer import train

    if cfg.resume:
        raise ValueError("--cv trains K new fold models; --resume continues one run (resume a fold with "
                         "`nexedge train --data RUN/folds/fN --out RUN/foldN --resume RUN/foldN/last.pt`)")
    t0 = time.time()
    classes = list_classes(cfg.data, "train")
    if cfg.good_class not in classes:
        raise ValueError(f"--good-class {cfg.good_class!r} is not one of the classes {classes}")
    g = classes.index(cfg.good_class)
    paths, labels = _pool(cfg.data, classes)
    check_folds(labels, g, k)
    prepare_cv_folder(cfg.out, cfg.overwrite)
    os.makedirs(cfg.out, exist_ok=True)
    folds = fold_assignment(labels, k, cfg.seed)
    roots = make_fold_roots(cfg.data, cfg.out, paths, labels, folds, classes, k)
    widest = "ten" if ("h" in cfg.flip and cfg.augment) or cfg.train_crop == "ten" else "five"
    if cfg.select != "last":
        print(f"--cv: each fold model is its last epoch (--select last); --select {cfg.select} would pick an epoch "
              "on the held-out fold and bias its out-of-fold scores")
    logits = None
    fold_info = []
    for f in range(k):
        print(f"\n=== fold {f + 1}/{k}: train on {int((folds != f).sum())} images, score {int((folds == f).sum())} "
              f"out of fold ===", flush=True)
        tf = time.time()
        fcfg = copy.copy(cfg)
        fcfg.data, fcfg.out = roots[f], os.path.join(cfg.out, f"fold{f + 1}")
        fcfg.select, fcfg.test_curves, fcfg.keep, fcfg.overwrite = "last", False, 1, True
        fcfg.plots, fcfg.next_hint = False, False
        train(fcfg)
        ckpt = os.path.join(fcfg.out, "best.pt")
        rel, lg = oof_logits(ckpt, roots[f], widest)
        if logits is None:
            logits = np.zeros((len(paths),) + lg.shape[1:], np.float32)
        index = {(classes[int(labels[i])], link_name(paths[i])): i for i in np.flatnonzero(folds == f)}
        got = [index[(p.split(os.sep)[1], os.path.basename(p))] for p in rel]
        if len(got) != int((folds == f).sum()):
            raise RuntimeError(f"fold {f + 1}: {int((folds == f).sum()) - len(got)} images could not be read")
        logits[got] = lg
        fold_info.append({"fold": f + 1, "checkpoint": os.path.relpath(ckpt, cfg.out), "wall_s": round(time.time() - tf, 1)})
    oof = {"paths": np.asarray(paths), "labels": labels, "folds": folds, "logits": logits, "k": k}
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **{key: (np.asarray(v) if key != "k" else np.asarray(k)) for key, v in oof.items()},
                        classes=np.asarray(classes), crops=np.asarray(widest))
    atomic_write_bytes(os.path.join(cfg.out, "oof.npz"), buf.getvalue())
    modes = ["center", "five"] + (["ten"] if widest == "ten" else [])
    table = [summarize(oof, m, a, g) for m in modes for a in (("mean",) if m == "center" else metrics.AGGREGATES)]
    wall = time.time() - t0
    summary = {"k": k, "seed": cfg.seed, "data": os.path.abspath(cfg.data), "classes": classes,
               "good_class": cfg.good_class, "n_images": len(paths), "n_defects": int((labels != g).sum()),
               "per_class": {c: int((labels == i).sum()) for i, c in enumerate(classes)},
               "oof_crops": widest, "folds": fold_info, "candidates": table, "wall_s": round(wall, 1),
               "cpu_note": "K trainings of (K-1)/K of train+val each, plus one OOF pass per fold"}
    atomic_write_bytes(os.path.join(cfg.out, "cv.json"),
                       (json.dumps(json_safe(summary), indent=2) + "\n").encode("utf-8"))
    print(format_cv(summary))
    print(f"next: nexedge export {cfg.out} --crops auto   (the fold ensemble, thresholds from the out-of-fold scores)")
    return summary


def format_cv(summary: Dict[str, Any]) -> str:
    """Fold-to-fold spread and the pooled OOF operating point of each crop candidate."""
    k = summary["k"]
    lines = [f"\ncross-validation: {k} folds over train+val ({summary['n_images']} images, {summary['n_defects']} "
             f"defects), {summary['wall_s'] / 60:.1f} min wall for {k} trainings and their out-of-fold scoring"]
    for cand in summary["candidates"]:
        sp = cand["spread"]
        op = next(o for o in cand["operating_points"] if o["target_tpr"] == 1.0)
        lines.append(f"  {cand['crops']:<6} {cand['aggregate']:<4}  per fold: AUC "
                     f"{100 * sp['auc']['mean']:.2f} +- {100 * sp['auc']['std']:.2f} % "
                     f"(min {100 * sp['auc']['min']:.2f}), FPR at TPR 100 % "
                     f"{100 * sp['fpr_at_tpr100']['mean']:.1f} +- {100 * sp['fpr_at_tpr100']['std']:.1f} %, "
                     f"threshold {sp['threshold']['min']:.3g} to {sp['threshold']['max']:.3g} | pooled OOF: AUC "
                     f"{100 * cand['pooled_auc']:.2f} %, TPR 100 % point: FPR {100 * op['fpr']:.1f} %, TPR 95 % lower "
                     f"bound {100 * op['tpr_lower95']:.2f} % from {op['n_defects']} defects")
    return "\n".join(lines)


def load_oof(run: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(cv.json, oof.npz arrays) of a CV run folder."""
    with open(os.path.join(run, "cv.json"), encoding="utf-8") as f:
        summary = json.load(f)
    z = np.load(os.path.join(run, "oof.npz"))
    oof = {key: z[key] for key in z.files}
    oof["k"] = int(oof["k"])
    return summary, oof


def fold_checkpoints(run: str, summary: Optional[Dict[str, Any]] = None) -> List[str]:
    summary = summary or load_oof(run)[0]
    return [os.path.join(run, f["checkpoint"]) for f in summary["folds"]]
