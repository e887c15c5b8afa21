"""``nexedge eval``: the deployed model's escapes and overkill at its card's operating point,
and the report's Table 3 over the top-k checkpoints of one or more runs and several crop
styles, plus ROC plots, a contact sheet of the misses, ``eval.json`` and ``eval.csv``.

One TenCrop pass per checkpoint serves every crop style: CenterCrop is crop 4 of
the TenCrop order and FiveCrop crops 0-4 (see nexedge.preprocess.crop_offsets); the
crops of an image are combined as the card's ``input.aggregate`` says. An exported
artifact (ONNX, engine) is scored through the runtime backend that runs it on the line.
"""

import csv
import io
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from nexedge import metrics, preprocess
from nexedge.card import atomic_write_bytes

CROP_LABEL = {"center": "CenterCrop", "five": "FiveCrop", "ten": "TenCrop"}
CROP_SLICE = {"center": [4], "five": [0, 1, 2, 3, 4], "ten": list(range(10))}


def resolve_checkpoints(path: str, top: Optional[int] = None) -> Tuple[str, List[str]]:
    """(label, checkpoint files best first) for a checkpoint file or a run folder (its top-k)."""
    from nexedge.runs import resolve_artifact, topk_files

    if os.path.isfile(path):
        name = os.path.basename(path)
        return name[: -len(".pt")] if name.endswith(".pt") else name, [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a checkpoint file or run folder")
    label = os.path.basename(os.path.normpath(path))
    files = topk_files(path) or [resolve_artifact(path)]
    return label, files[:top] if top else files


def score_checkpoint(
    ckpt: str, data: str, split: str, crops: Sequence[str], batch_size: int = 64, progress: bool = True,
    _cache: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Defect scores of every image of ``split`` for each crop style: {"labels", "paths", crop: scores}.
    A checkpoint is scored with torch (one TenCrop pass serves every style); any other artifact through
    its runtime backend (:func:`score_artifact`)."""
    if not ckpt.endswith((".pt", ".pth")):
        return score_artifact(ckpt, data, split, crops, batch_size, progress)
    import torch

    from nexedge.models.checkpoint import model_from_checkpoint
    from nexedge.train.data import ImageFolderSet
    from nexedge.train.loop import crop_logits
    from nexedge.train.transforms import EvalTransform

    model, card = model_from_checkpoint(ckpt)
    widest = "ten" if "ten" in crops else ("five" if "five" in crops else "center")
    key = json.dumps([card.classes, card.input, widest, split])
    cache = _cache if _cache is not None else {}
    ds = cache.get(key)
    if ds is None:
        ds = ImageFolderSet(data, split, card.classes, card.input, EvalTransform(card.input, widest))
        cache.clear()
        cache[key] = ds
    from nexedge.train.data import collate_skip_unreadable

    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_skip_unreadable)
    idx, logits, labels = crop_logits(model, loader, torch.device("cpu"), f"{os.path.basename(ckpt)} {split}",
                                      progress)
    paths = [ds.paths[int(i)] for i in idx]  # unreadable images were skipped
    out: Dict[str, Any] = {"labels": labels, "paths": paths, "good_index": card.good_index, "classes": card.classes,
                           "probs": {}, "card": card}
    for c in crops:
        sel = [0] if widest == "center" else CROP_SLICE[c]
        out["probs"][c], out[c] = metrics.aggregate_crops(logits[:, sel], card.good_index, card.aggregate)
    return out


def score_artifact(path: str, data: str, split: str, crops: Sequence[str], batch_size: int = 64,
                   progress: bool = True) -> Dict[str, Any]:
    """:func:`score_checkpoint` for an exported artifact, through the backend that runs it (its own crops
    and aggregate; a host-crop model also in the other ``crops``)."""
    from nexedge.card import load_card
    from nexedge.export.parity import read_image
    from nexedge.export.thresholds import split_images
    from nexedge.progress import progress as _progress
    from nexedge.runtime import open_backend

    card = load_card(path)
    paths, labels = split_images(data, split, card.classes)
    own = card.runtime_crop_mode
    if card.graph.get("crops", "host") != "host" and any(c != own for c in crops):
        raise ValueError(f"{path} does its crops in the graph ({own}); it cannot be evaluated with --crops "
                         f"{','.join(crops)} (export another graph, or evaluate the checkpoint)")
    out: Dict[str, Any] = {"labels": labels, "paths": [os.path.relpath(p, data) for p in paths],
                           "good_index": card.good_index, "classes": card.classes, "probs": {}, "card": card}
    be = open_backend(path)
    try:
        n = max(1, min(batch_size, be.max_batch))
        for c in crops:
            view = be if c == be.crop_mode else be.crop_view(c)
            bar = _progress(desc=f"{os.path.basename(path)} {split} {c}", total=len(paths), unit="images",
                            enabled=progress)
            probs, scores = [], []
            for i in range(0, len(paths), n):
                r = view.infer(np.stack([preprocess.prepare(read_image(p), card.input) for p in paths[i : i + n]]))
                probs.append(r.probs)
                scores.append(np.asarray(r.defect_score, np.float64))
                bar.update(len(r.probs))
            bar.close()
            out["probs"][c], out[c] = np.concatenate(probs), np.concatenate(scores)
    finally:
        be.close()
    return out


def default_crops(first: str) -> List[str]:
    """The crop style the deployed model runs: the card's (an artifact's own crops)."""
    from nexedge.card import load_card

    path = first
    if os.path.isdir(first):
        from nexedge.runs import resolve_artifact

        path = resolve_artifact(first)
    return [load_card(path, verify=False).runtime_crop_mode]


def next_hint(run: str, data: str) -> str:
    """What ``nexedge train`` prints last: a warning when the thresholds rest on the split that picked the
    checkpoint, then the command that evaluates the checkpoint it deploys (not every kept one)."""
    from nexedge.card import card_path_for, read_card

    best = os.path.join(run, "best.pt")
    lines = []
    if os.path.exists(card_path_for(best)):
        warn = read_card(card_path_for(best)).selection_warning()
        if warn:
            lines.append("WARNING: " + warn)
    lines.append(f"next: nexedge eval {best} --data {data} --split test")
    lines.append(f"  (escapes and overkill of the deployed checkpoint at its operating point; "
                 f"`nexedge eval {run} --data {data} --crops center,five,ten` compares the kept checkpoints and "
                 "crop styles)")
    return "\n".join(lines)


def run_evaluation(
    runs: Sequence[str], data: str, split: str, crops: Optional[Sequence[str]] = None, out: Optional[str] = None,
    top: Optional[int] = None, batch_size: int = 64, progress: bool = True, tprs: Sequence[float] = metrics.DEFAULT_TPRS,
    print_table: bool = True, tpr_floor: float = metrics.DEFAULT_TPR_FLOOR,
) -> Dict[str, Any]:
    """Evaluate every checkpoint of every run; print and write the table, the deployed (first) model's
    escapes and overkill and their contact sheet; return the results. ``crops`` None: the crop style
    the first model's card runs."""
    from nexedge.train.plots import plot_roc

    resolved = [resolve_checkpoints(r, top) for r in runs]
    crops = list(crops) if crops else default_crops(resolved[0][1][0])
    labels_seen = [lab for lab, _ in resolved]
    if len(set(labels_seen)) != len(labels_seen):
        resolved = [(f"{i + 1}:{lab}", files) for i, (lab, files) in enumerate(resolved)]
    out = out or default_out(runs, [lab for lab, _ in resolved], split)
    os.makedirs(out, exist_ok=True)
    results: Dict[str, Any] = {"split": split, "data": os.path.abspath(data), "crops": list(crops), "runs": {}}
    rows: List[Dict[str, Any]] = []
    roc: Dict[str, Dict[str, list]] = {c: {} for c in crops}
    cache: Dict[str, Any] = {}
    for label, files in resolved:
        per_crop: Dict[str, List[Dict[str, Any]]] = {c: [] for c in crops}
        best_scores = None
        for f in files:
            s = score_checkpoint(f, data, split, crops, batch_size, progress, cache)
            best_scores = best_scores or s  # files are best first
            y = (s["labels"] != s["good_index"]).astype(int)
            for c in crops:
                rec = {"checkpoint": os.path.basename(f), "auc": metrics.roc_auc(y, s[c]),
                       "fpr_at_tpr": metrics.fpr_at_tprs(y, s[c], tprs),
                       "class_auc": metrics.class_aucs(s["labels"], s[c], s["classes"], s["good_index"])}
                per_crop[c].append(rec)
                rows.append({"run": label, "crop": c, "checkpoint": rec["checkpoint"], "auc": rec["auc"],
                             **{f"fpr@{k}": v for k, v in rec["fpr_at_tpr"].items()}})
                if y.min() != y.max():
                    curve = metrics.roc_curve(y, s[c])
                    roc[c].setdefault(label, []).append((np.r_[0.0, curve["fpr"]], np.r_[0.0, curve["tpr"]]))
            n_def, n_good = int(y.sum()), int((y == 0).sum())
        results["runs"][label] = {
            "checkpoints": [os.path.basename(f) for f in files], "n_defects": n_def, "n_good": n_good,
            "crops": {c: _aggregate(per_crop[c], tprs) for c in crops},
            "best": best_detail(best_scores, files[0], crops),
        }
        problem = best_scores["card"].mirror_problem("ten") if "ten" in crops else None
        results["runs"][label]["mirror_warning"] = problem["message"] if problem else None
        if results["runs"][label]["best"].get("operating_point"):
            name = "misses.png" if len(resolved) == 1 else f"misses_{_safe(label)}.png"
            sheet = write_misses_sheet(results["runs"][label]["best"], data, os.path.join(out, name))
            results["runs"][label]["best"]["operating_point"]["contact_sheet"] = sheet
    for c in crops:
        if roc[c]:
            plot_roc(roc[c], os.path.join(out, f"roc_{c}.png"), f"ROC on {split} ({CROP_LABEL[c]})",
                     n_defects=min(r["n_defects"] for r in results["runs"].values()))
    atomic_write_bytes(os.path.join(out, "eval.json"), (json.dumps(_jsonable(results), indent=2) + "\n").encode())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(os.path.join(out, "eval.csv"), buf.getvalue().encode())
    results["out"] = out
    results["weak"] = weak_split_warnings(results, tprs, tpr_floor)
    if print_table:
        print(format_table(results))
        for line in results["weak"]:
            print("WARNING: " + line)
        for line in mirror_warnings(results):
            print("WARNING: " + line)
        for label, r in results["runs"].items():
            print()
            print(format_best(label if len(results["runs"]) > 1 else "", r["best"], results["split"]))
        print(f"\nwrote {out}/eval.json, eval.csv and roc_<crop>.png")
    return results


def _safe(label: str) -> str:
    from nexedge.relabel.formats import safe_name

    return safe_name(label)


def mirror_warnings(results: Dict[str, Any]) -> List[str]:
    """One line per run whose TenCrop column scores mirrored crops its model was not trained on."""
    return [f"{label}: TenCrop column: {r['mirror_warning']}" for label, r in results["runs"].items()
            if r.get("mirror_warning")]


def default_out(runs: Sequence[str], labels: Sequence[str], split: str) -> str:
    """``<run>/eval_<split>`` for one run or its ``best.pt``, ``<run>/eval_<split>_<stem>`` for another
    file of it (an exported model: evaluating it never overwrites the checkpoint's evaluation); for a
    comparison a folder of its own beside the first run, so comparing never overwrites a run's own."""
    first = runs[0] if os.path.isdir(runs[0]) else os.path.dirname(runs[0]) or "."
    if len(runs) == 1:
        stem = "" if os.path.isdir(runs[0]) else labels[0]
        return os.path.join(first, f"eval_{split}" + ("" if stem in ("", "best") else "_" + _safe(stem)))
    from nexedge.relabel.formats import safe_name

    name = "_vs_".join(safe_name(lab) for lab in labels)[:120]
    return os.path.join(os.path.dirname(os.path.abspath(first)), f"compare_{split}_{name}")


def best_detail(s: Dict[str, Any], ckpt: str, crops: Sequence[str], target_tpr: float = 1.0) -> Dict[str, Any]:
    """The best checkpoint on its own: confusion matrix (argmax class) and, at the card's operating
    point for ``target_tpr`` (the daemon's default decision), PASS/REJECT per true class with
    escapes (defects PASSed) and overkill (good REJECTed)."""
    from nexedge.card import CardError

    card = s["card"]
    crop = card.runtime_crop_mode if card.runtime_crop_mode in crops else crops[0]
    classes, g, labels = list(s["classes"]), int(s["good_index"]), np.asarray(s["labels"])
    k = len(classes)
    pred = s["probs"][crop].argmax(axis=1)
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (labels, pred), 1)
    out: Dict[str, Any] = {
        "checkpoint": os.path.basename(ckpt), "crop": crop, "classes": classes, "good_class": classes[g],
        "confusion": cm.tolist(),
        "recall": {c: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None) for i, c in enumerate(classes)},
        "metrics": {c: {"auc": metrics.roc_auc((labels != g).astype(int), s[c]),
                        "fpr_at_tpr": metrics.fpr_at_tprs((labels != g).astype(int), s[c])} for c in crops},
    }
    try:
        op = card.operating_point(target_tpr)
    except CardError:
        out["operating_point"] = None
        return out
    reject = s[crop] >= float(op["threshold"])
    per_class = {}
    for i, c in enumerate(classes):
        m = labels == i
        per_class[c] = {"n": int(m.sum()), "PASS": int((m & ~reject).sum()), "REJECT": int((m & reject).sum())}
    defects = labels != g
    probs, score = s["probs"][crop], s[crop]

    def image(i: int) -> Dict[str, Any]:
        return {"path": s["paths"][i], "class": classes[int(labels[i])], "score": float(score[i]),
                "probs": {c: float(probs[i, j]) for j, c in enumerate(classes)}}

    esc_idx = np.flatnonzero(defects & ~reject)
    ovk_idx = np.flatnonzero(~defects & reject)
    out["operating_point"] = {
        "target_tpr": float(op["target_tpr"]), "threshold": float(op["threshold"]),
        "val_tpr_lower95": op.get("tpr_lower95"), "val_n_defects": op.get("n_defects"),
        "source_split": card.ops_source.get("split", "val"),
        "expected_escape_rate": metrics.expected_escape_rate(op), "escape_bound95": metrics.escape_bound(op),
        "selection_warning": card.selection_warning(),
        "promise": metrics.promise_check(int(esc_idx.size), int(defects.sum()), op),
        "per_class": per_class,
        "escapes": int(esc_idx.size), "n_defects": int(defects.sum()),
        "overkill": int(ovk_idx.size), "n_good": int((~defects).sum()),
        "escaped_images": [image(int(i)) for i in esc_idx[np.argsort(score[esc_idx], kind="stable")]],
        "overkill_images": [image(int(i)) for i in ovk_idx[np.argsort(-score[ovk_idx], kind="stable")]],
    }
    return out


def write_misses_sheet(best: Dict[str, Any], data: str, path: str, height: int = 128, columns: int = 6,
                       max_tiles: int = 240) -> Optional[str]:
    """A PNG of every escaped and every overkilled image at the operating point (escapes first, lowest
    score first), each labelled with its true class, score and most likely class; None when there
    is nothing to show."""
    import cv2

    op = best["operating_point"]
    items = [("ESCAPE", r) for r in op["escaped_images"]] + [("OVERKILL", r) for r in op["overkill_images"]]
    if not items:
        return None
    shown = items[:max_tiles]
    width, label_h = 2 * height, 34
    tiles = []
    for number, (kind, r) in enumerate(shown, 1):
        img = cv2.imread(os.path.join(data, r["path"]), cv2.IMREAD_COLOR)
        tile = np.full((height + label_h, width, 3), 255, np.uint8)
        if img is not None:
            f = min(height / img.shape[0], width / img.shape[1])
            small = cv2.resize(img, (max(1, int(img.shape[1] * f)), max(1, int(img.shape[0] * f))),
                               interpolation=cv2.INTER_AREA)
            x0 = (width - small.shape[1]) // 2
            tile[: small.shape[0], x0 : x0 + small.shape[1]] = small
        top = max(r["probs"], key=r["probs"].get)
        color = (0, 0, 200) if kind == "ESCAPE" else (200, 90, 0)
        cv2.putText(tile, f"#{number} {kind} {r['class']}", (3, height + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.42, color, 1,
                    cv2.LINE_AA)
        cv2.putText(tile, f"score {r['score']:.3g}, top {top} {r['probs'][top]:.2f}", (3, height + 28),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.36, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.rectangle(tile, (0, 0), (width - 1, height + label_h - 1), color, 1)
        tiles.append(tile)
    cols = min(columns, len(tiles))
    blank = np.full_like(tiles[0], 255)
    tiles += [blank] * (-len(tiles) % cols)
    rows = [np.hstack(tiles[i : i + cols]) for i in range(0, len(tiles), cols)]
    if rows[0].shape[1] < 640:  # room for the title line
        rows = [np.hstack([r, np.full((r.shape[0], 640 - r.shape[1], 3), 255, np.uint8)]) for r in rows]
    head = np.full((24, rows[0].shape[1], 3), 255, np.uint8)
    cv2.putText(head, f"{best['checkpoint']}: {op['escapes']} escapes, {op['overkill']} overkill at threshold "
                f"{op['threshold']:.4g} ({best['crop']} crops)"
                + (f"; first {len(shown)} shown, all in eval.json" if len(shown) < len(items) else ""), (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                (0, 0, 0), 1, cv2.LINE_AA)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not cv2.imwrite(path, np.vstack([head] + rows)):
        raise RuntimeError(f"could not write the contact sheet {path}")
    return path


def format_best(label: str, b: Dict[str, Any], split: str) -> str:
    """The best checkpoint's own row, its confusion matrix and its result at the card's operating point."""
    classes = b["classes"]
    w = max([len(c) for c in classes] + [12])
    head = f"deployed model{' of ' + label if label else ''}: {b['checkpoint']} on {split}"
    lines = [head]
    for c, m in b["metrics"].items():
        lines.append(f"  {CROP_LABEL[c]:<10} AUC {_pct(m['auc'])}  FPR at TPR >= "
                     + ", ".join(f"{k}: {_pct(v)}" for k, v in m["fpr_at_tpr"].items()))
    lines.append(f"  confusion matrix ({CROP_LABEL[b['crop']]}, predicted class = highest probability; rows: true class)")
    lines.append("  " + " " * w + "  " + "  ".join(f"{c[:10]:>10}" for c in classes) + "      recall")
    for i, c in enumerate(classes):
        r = b["recall"][c]
        lines.append(f"  {c:<{w}}  " + "  ".join(f"{n:>10}" for n in b["confusion"][i])
                     + f"  {'-' if r is None else f'{100 * r:9.1f}%'}")
    op = b.get("operating_point")
    if op is None:
        lines.append("  (the card has no operating point for TPR 100 %: too few validation defects)")
        return "\n".join(lines)
    lb = op.get("val_tpr_lower95")
    src = op.get("source_split", "val")
    lines.append(f"  at the card's operating point (target TPR 100 % on {src}, threshold {op['threshold']:.4g}"
                 + (f", 95 % lower bound on TPR {100 * lb:.1f} % from {op['val_n_defects']} {src} defects"
                    if lb is not None else "")
                 + "), as the daemon decides by default:")
    lines.append("  " + f"{'class':<{w}}  {'n':>5}  {'PASS':>6}  {'REJECT':>6}")
    for c in classes:
        pc = op["per_class"][c]
        note = "  <- overkill" if c == b["good_class"] and pc["REJECT"] else (
            "  <- escapes" if c != b["good_class"] and pc["PASS"] else "")
        lines.append(f"  {c:<{w}}  {pc['n']:>5}  {pc['PASS']:>6}  {pc['REJECT']:>6}{note}")
    lines.append(f"  escapes (defects PASSed): {op['escapes']} of {op['n_defects']}   "
                 f"overkill ({b['good_class']} REJECTed): {op['overkill']} of {op['n_good']}")
    if op.get("expected_escape_rate") is not None:
        lines.append(f"  the card promises: expected escape rate {100 * op['expected_escape_rate']:.2f} %"
                     + (f", at most {100 * op['escape_bound95']:.2f} % with 95 % confidence"
                        if op.get("escape_bound95") is not None else "")
                     + f"; measured here {op['escapes']} of {op['n_defects']}"
                     + ("" if not op.get("promise") else ", {} (P = {:.2g} of that many or more at the promised "
                        "rate)".format("within it" if op["promise"]["within"] else "NOT within it",
                                       op["promise"]["p_value"])))
    number = 0
    for key, title in (("escaped_images", "escapes (lowest score first)"),
                       ("overkill_images", "overkill (highest score first)")):
        rows = op.get(key) or []
        if rows:
            lines.append(f"  {title}: #, path, true class, score, class probabilities")
            for r in rows:
                number += 1
                lines.append(f"    {number:>3}  {r['path']}  {r['class']}  score {r['score']:.4g}  "
                             + " ".join(f"{c} {p:.3f}" for c, p in r["probs"].items()))
    if op.get("contact_sheet"):
        lines.append(f"  contact sheet of the escapes and overkill: {op['contact_sheet']}")
    if op.get("selection_warning"):
        lines.append("  WARNING: " + op["selection_warning"])
    return "\n".join(lines)


def _pct(x: Any) -> str:
    return "-" if x is None or x != x else f"{100 * x:.2f}"


def weak_split_warnings(results: Dict[str, Any], tprs: Sequence[float], floor: float) -> List[str]:
    """One line per TPR target that the split's defect count cannot support: even with every defect
    detected, the 95 % lower bound on TPR stays below ``floor``."""
    first = next(iter(results["runs"].values()), None)
    n = int(first["n_defects"]) if first else 0
    if not n:
        return []
    best = metrics.clopper_pearson_lower(n, n)
    if best >= floor:
        return []
    need = metrics.defects_needed(max(tprs), floor)
    return [f"{results['split']} has {n} defect images: even with all detected the 95 % lower bound on TPR is "
            f"{best:.3f} < floor {floor}; FPR at TPR >= {', '.join(metrics.tpr_key(t) for t in tprs)} % is not "
            f"supported by this split (about {need} defects would be)"]


def _aggregate(recs: List[Dict[str, Any]], tprs: Sequence[float]) -> Dict[str, Any]:
    return {
        "per_checkpoint": recs,
        "auc": metrics.mean_std([r["auc"] for r in recs]),
        "class_auc": {k: dict(metrics.mean_std([r["class_auc"][k]["auc"] for r in recs]),
                              n_images=recs[0]["class_auc"][k]["n"]) for k in recs[0]["class_auc"]},
        "fpr_at_tpr": {
            metrics.tpr_key(t): metrics.mean_std([r["fpr_at_tpr"][metrics.tpr_key(t)] for r in recs]) for t in tprs
        },
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _cell(ms: Dict[str, float]) -> str:
    if ms["n"] == 0:
        return "-"
    return f"{100 * ms['mean']:.2f} ({100 * ms['std']:.2f})"


def format_table(results: Dict[str, Any], markdown: bool = False) -> str:
    """Report Table 3 layout: rows AUC and FPR at each TPR, columns run x crop style; mean (std) in %."""
    cols: List[Tuple[str, str]] = [(r, c) for r in results["runs"] for c in results["crops"]]
    first = next(iter(results["runs"].values()))
    keys = list(first["crops"][results["crops"][0]]["fpr_at_tpr"])
    head = ["mean (std) %"] + [f"{r} {CROP_LABEL[c]}" if len(results["runs"]) > 1 else CROP_LABEL[c] for r, c in cols]
    body = [["AUC"] + [_cell(results["runs"][r]["crops"][c]["auc"]) for r, c in cols]]
    for k in keys:
        body.append([f"FPR at TPR >= {k}"] + [_cell(results["runs"][r]["crops"][c]["fpr_at_tpr"][k]) for r, c in cols])
    for k in first["crops"][results["crops"][0]].get("class_auc", {}):
        n_img = first["crops"][results["crops"][0]]["class_auc"][k]["n_images"]
        body.append([f"AUC good vs {k} ({n_img})"]
                    + [_cell(results["runs"][r]["crops"][c].get("class_auc", {}).get(k, {"n": 0})) for r, c in cols])
    n = [len(v["checkpoints"]) for v in results["runs"].values()]
    note = (f"{results['split']} split: {first['n_good']} good, {first['n_defects']} defect images; "
            f"mean (std) over {', '.join(map(str, n))} checkpoint(s)")
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines) + f"\n\n{note}\n"
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    fmt = "  ".join("{:<" + str(w) + "}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in body]
                     + [note])
