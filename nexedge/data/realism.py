"""How far ``nexedge synth`` images are from real line images (``nexedge synth --realism DIR``).

Both sides go through the same view before any figure is computed: grayscale, resized
(area) to the references' median size, and, by default, min-max stretched to 0..255
(the public Nexperia references are matplotlib ``imshow`` renders, which stretch each
image that way; stretching the synthetic images too keeps the comparison fair, and it
is harmless for raw line images). The figures:

- per-region intensity statistics (mean, std, 5/50/95th percentiles) in four fixed
  regions of the frame: the outer ring (pocket walls), the upper band (two leads),
  the middle band (the body and its marking) and the lower band (one lead);
- noise spectra: radially averaged power spectrum of the fine residual (image minus
  its 3x3 median), in log-spaced frequency bins, normalised to unit total power, and
  its row/column anisotropy (structured row or column noise vs white noise);
- kernel inception distance (KID; unbiased MMD^2 with the cubic polynomial kernel) on
  the pooled features of the ImageNet-pretrained EfficientNet-Lite0;
- a leave-one-out domain classifier (standardised logistic regression on the same
  features) telling real from synthetic, on as many synthetic images as there are
  references; 50 % means it cannot tell them apart.

Torch and scikit-learn are imported only when the feature figures are computed.
"""

import csv
import glob
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from nexedge.data.spec import STYLES, batch_classes, default_weights
from nexedge.images import READ_EXTS

# (name, x0, y0, x1, y1) as fractions of the frame; "ring" is the frame minus its inner 84 %.
REGIONS = (("ring", 0.0, 0.0, 1.0, 1.0), ("upper", 0.08, 0.08, 0.92, 0.38),
           ("middle", 0.08, 0.38, 0.92, 0.66), ("lower", 0.08, 0.66, 0.92, 0.92))
STATS = ("mean", "std", "p5", "p50", "p95")
N_BINS = 12
FEATURE_ARCH = "efficientnet_lite0"
FEATURE_SIZE = 224


def load_references(ref_dir: str) -> List[Tuple[str, str, np.ndarray]]:
    """(file name, label, gray uint8) of every reference image.

    Labels come from ``index.csv`` (columns file, label) when there is one (files it does
    not list, such as a montage, are left out), else from class sub-folders, else from a
    ``label__`` file-name prefix, else "unknown".
    """
    if not os.path.isdir(ref_dir):
        raise FileNotFoundError(f"reference folder {ref_dir!r} does not exist; expected a folder of real images")
    files: List[Tuple[str, str]] = []
    index = os.path.join(ref_dir, "index.csv")
    if os.path.isfile(index):
        with open(index, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row.get("file") and row.get("label"):
                    files.append((os.path.join(ref_dir, row["file"]), row["label"].strip()))
    else:
        for p in sorted(glob.glob(os.path.join(ref_dir, "*", "*"))):
            if p.lower().endswith(READ_EXTS):
                files.append((p, os.path.basename(os.path.dirname(p))))
        if not files:
            for p in sorted(glob.glob(os.path.join(ref_dir, "*"))):
                if p.lower().endswith(READ_EXTS):
                    name = os.path.basename(p)
                    files.append((p, name.split("__")[0] if "__" in name else "unknown"))
    out = []
    for p, label in files:
        img = cv2.imread(p, cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise ValueError(f"reference image {p!r} is missing or unreadable; expected an image file")
        out.append((os.path.basename(p), label, img))
    if len(out) < 2:
        raise ValueError(f"{ref_dir!r} holds {len(out)} readable reference image(s); expected at least 2")
    return out


def view(img: np.ndarray, size: Tuple[int, int], stretch: bool = True) -> np.ndarray:
    """The common view: resize (area) to ``size`` (width, height), min-max stretch to 0..255."""
    out = cv2.resize(img, size, interpolation=cv2.INTER_AREA) if img.shape[::-1] != tuple(size) else img
    if not stretch:
        return out
    a = out.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    return np.clip((a - lo) * (255.0 / max(hi - lo, 1e-6)) + 0.5, 0, 255).astype(np.uint8)


def region_stats(img: np.ndarray) -> Dict[str, Dict[str, float]]:
    """{region: {stat: value}} in gray levels of one viewed image."""
    h, w = img.shape
    out: Dict[str, Dict[str, float]] = {}
    for name, x0, y0, x1, y1 in REGIONS:
        if name == "ring":
            m = np.ones((h, w), bool)
            m[int(0.08 * h):int(0.92 * h), int(0.08 * w):int(0.92 * w)] = False
            v = img[m].astype(np.float32)
        else:
            v = img[int(y0 * h):int(y1 * h), int(x0 * w):int(x1 * w)].astype(np.float32).ravel()
        p5, p50, p95 = np.percentile(v, (5, 50, 95))
        out[name] = {"mean": float(v.mean()), "std": float(v.std()), "p5": float(p5), "p50": float(p50),
                     "p95": float(p95)}
    return out


def noise_spectrum(img: np.ndarray) -> Tuple[np.ndarray, float]:
    """(power in N_BINS log-spaced radial bins summing to 1, row/column anisotropy) of the fine residual.

    Anisotropy: power on the vertical frequency axis (row-wise structure, such as banding)
    over power on the horizontal axis; about 1 for white noise.
    """
    a = img.astype(np.float32)
    r = a - cv2.medianBlur(img, 3).astype(np.float32)
    r -= r.mean()
    h, w = r.shape
    win = np.outer(np.hanning(h), np.hanning(w)).astype(np.float32)
    p = np.abs(np.fft.fftshift(np.fft.fft2(r * win))) ** 2
    fy = np.fft.fftshift(np.fft.fftfreq(h))[:, None]
    fx = np.fft.fftshift(np.fft.fftfreq(w))[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    edges = np.geomspace(1.0 / min(h, w), 0.5 * np.sqrt(2.0), N_BINS + 1)
    idx = np.digitize(f, edges) - 1
    ok = (idx >= 0) & (idx < N_BINS)
    bins = np.bincount(idx[ok], p[ok], N_BINS) / np.maximum(np.bincount(idx[ok], None, N_BINS), 1)
    bins = bins / max(float(bins.sum()), 1e-12)
    cy, cx = h // 2, w // 2
    vert = float(p[:cy - 1, cx].sum() + p[cy + 2:, cx].sum())  # fx = 0: rows differ
    horz = float(p[cy, :cx - 1].sum() + p[cy, cx + 2:].sum())  # fy = 0: columns differ
    return bins, vert / max(horz, 1e-12)


def lite0_features(images: Sequence[np.ndarray], batch: int = 16) -> np.ndarray:
    """Pooled 1280-d features of the ImageNet-pretrained EfficientNet-Lite0 (N x 1280)."""
    import torch
    import torch.nn.functional as F

    from nexedge.models import create_model, input_normalization
    from nexedge.preprocess import normalize

    model = create_model(FEATURE_ARCH, 1000, pretrained="imagenet").eval()
    mean, std = input_normalization(FEATURE_ARCH)
    feats = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = np.stack([cv2.resize(im, (FEATURE_SIZE, FEATURE_SIZE), interpolation=cv2.INTER_AREA)[..., None]
                          for im in images[i:i + batch]])
            t = torch.from_numpy(normalize(x, mean, std))
            feats.append(torch.flatten(F.adaptive_avg_pool2d(model.forward_features(t), 1), 1).numpy())
    return np.concatenate(feats).astype(np.float64)


def kid(real: np.ndarray, fake: np.ndarray) -> float:
    """Kernel inception distance: unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3."""
    d = real.shape[1]
    kxx = (real @ real.T / d + 1) ** 3
    kyy = (fake @ fake.T / d + 1) ** 3
    kxy = (real @ fake.T / d + 1) ** 3
    m, n = len(real), len(fake)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def domain_accuracy(real: np.ndarray, fake: np.ndarray, repeats: int, seed: int = 0) -> Tuple[float, float]:
    """Leave-one-out accuracy (mean, std over ``repeats`` draws) of real-vs-synthetic logistic regression.

    Each draw takes as many synthetic images as there are real ones (chance is 50 %).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import LeaveOneOut, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    m = len(real)
    accs = []
    for _ in range(repeats):
        pick = fake[rng.choice(len(fake), m, replace=False)]
        x = np.concatenate([real, pick])
        y = np.r_[np.ones(m), np.zeros(m)]
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
        accs.append(float(cross_val_score(clf, x, y, cv=LeaveOneOut()).mean()))
    return float(np.mean(accs)), float(np.std(accs))


def synth_set(labels: Sequence[str], n: int, batch: int, look: str, seed: int,
              size: Tuple[int, int]) -> Tuple[List[np.ndarray], List[str]]:
    """``n`` synthetic images whose classes follow the references' labels (the batch mix where unknown)."""
    from nexedge.data.synth import NATIVE_WH, render_image

    known = [c for c in labels if c in batch_classes(batch)]
    if known:
        classes = [known[i % len(known)] for i in range(n)]
    else:
        w = default_weights(batch)
        rng = np.random.default_rng([seed, 17])
        classes = list(rng.choice(sorted(w), n, p=[w[c] for c in sorted(w)]))
    imgs = [render_image(c, (seed, 1717, i), batch=batch, size=NATIVE_WH, look=look)[0] for i, c in enumerate(classes)]
    return imgs, classes


def measure(refs: Sequence[Tuple[str, str, np.ndarray]], looks: Sequence[str], n: int = 90, batch: int = 2,
            seed: int = 0, stretch: bool = True, features: bool = True, repeats: int = 10) -> Dict[str, Any]:
    """All realism figures of each look against the references (one dict, JSON-ready)."""
    if n < 2 * len(refs):
        raise ValueError(f"--realism-kw n={n} is too small for {len(refs)} references; expected at least {2 * len(refs)}")
    if batch not in STYLES:
        raise ValueError(f"unknown batch {batch!r}; expected one of {sorted(STYLES)}")
    sizes = np.array([im.shape for _, _, im in refs])
    size = (int(np.median(sizes[:, 1])), int(np.median(sizes[:, 0])))
    real = [view(im, size, stretch) for _, _, im in refs]
    labels = [lab for _, lab, _ in refs]
    out: Dict[str, Any] = {"references": [{"file": f, "label": lab} for f, lab, _ in refs], "size": list(size),
                           "stretch": stretch, "n_synthetic": n, "batch": batch, "seed": seed, "looks": {}}
    real_stats = [region_stats(im) for im in real]
    real_spec = [noise_spectrum(im) for im in real]
    out["real"] = _summary(real_stats, real_spec)
    real_f = lite0_features(real) if features else None
    for look in looks:
        t0 = time.perf_counter()
        imgs, _ = synth_set(labels, n, batch, look, seed, size)
        render_s = time.perf_counter() - t0
        fake = [view(im, size, stretch) for im in imgs]
        s = _summary([region_stats(im) for im in fake], [noise_spectrum(im) for im in fake])
        s["region_gap"] = _region_gap(out["real"]["regions"], s["regions"])
        s["region_gap_mean"] = float(np.mean([v for r in s["region_gap"].values() for v in r.values()]))
        s["spectrum_gap"] = float(np.mean(np.abs(np.log10(np.maximum(s["spectrum"], 1e-12))
                                                 - np.log10(np.maximum(out["real"]["spectrum"], 1e-12)))))
        s["anisotropy_gap"] = float(abs(np.log10(s["anisotropy"] / out["real"]["anisotropy"])))
        s["render_images_per_s"] = n / render_s
        if real_f is not None:
            fake_f = lite0_features(fake)
            s["kid"] = kid(real_f, fake_f)
            s["kid_std"] = _kid_spread(real_f, fake_f, seed)
            s["domain_accuracy"], s["domain_accuracy_std"] = domain_accuracy(real_f, fake_f, repeats, seed)
        out["looks"][look] = s
    return out


def transfer_probe(refs: Sequence[Tuple[str, str, np.ndarray]], look: str, n_train: int = 240, batch: int = 2,
                   seed: int = 0, stretch: bool = True) -> Dict[str, Any]:
    """Train a good-vs-defect model on synthetic images only, then score the references.

    The model: ImageNet EfficientNet-Lite0 features (frozen) and a standardised logistic
    regression on them, trained on ``n_train`` synthetic images (half good, half the
    batch's defect mix) seen through the same view as the references. Returns per-image
    defect scores of the references, their means by label, and the AUC of good vs defect
    references (0.5 = chance), plus the AUC on held-out synthetic images.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from nexedge import metrics
    from nexedge.data.spec import GOOD
    from nexedge.data.synth import NATIVE_WH, render_image

    sizes = np.array([im.shape for _, _, im in refs])
    size = (int(np.median(sizes[:, 1])), int(np.median(sizes[:, 0])))
    w = {c: v for c, v in default_weights(batch).items() if c != GOOD}
    names = sorted(w)
    rng = np.random.default_rng([seed, 4242])
    n_val = max(8, n_train // 4)
    classes = [GOOD if i % 2 == 0 else str(rng.choice(names, p=[w[c] / sum(w.values()) for c in names]))
               for i in range(n_train + n_val)]
    imgs = [view(render_image(c, (seed, 4242, i), batch=batch, size=NATIVE_WH, look=look)[0], size, stretch)
            for i, c in enumerate(classes)]
    y = np.array([0 if c == GOOD else 1 for c in classes])
    f = lite0_features(imgs)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=3000))
    clf.fit(f[:n_train], y[:n_train])
    synth_auc = metrics.roc_auc(y[n_train:], clf.predict_proba(f[n_train:])[:, 1])
    scores = clf.predict_proba(lite0_features([view(im, size, stretch) for _, _, im in refs]))[:, 1]
    labels = [lab for _, lab, _ in refs]
    yr = np.array([0 if lab == GOOD else 1 for lab in labels])
    good, bad = scores[yr == 0], scores[yr == 1]
    return {"look": look, "n_train": n_train, "synthetic_val_auc": float(synth_auc),
            "rows": [{"file": fn, "label": lab, "score": float(v)} for (fn, lab, _), v in zip(refs, scores)],
            "good_mean": float(good.mean()) if len(good) else None, "defect_mean": float(bad.mean()) if len(bad) else None,
            "good_max": float(good.max()) if len(good) else None, "defect_min": float(bad.min()) if len(bad) else None,
            "auc": float(metrics.roc_auc(yr, scores)) if len(good) and len(bad) else None}


def _summary(stats: List[Dict[str, Dict[str, float]]], spec: List[Tuple[np.ndarray, float]]) -> Dict[str, Any]:
    regions = {r: {k: float(np.mean([s[r][k] for s in stats])) for k in STATS} for r, *_ in REGIONS}
    return {"regions": regions, "spectrum": np.mean([b for b, _ in spec], axis=0).tolist(),
            "anisotropy": float(np.exp(np.mean([np.log(a) for _, a in spec])))}


def _region_gap(real: Dict[str, Dict[str, float]], fake: Dict[str, Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    return {r: {k: abs(fake[r][k] - real[r][k]) for k in STATS} for r in real}


def _kid_spread(real: np.ndarray, fake: np.ndarray, seed: int, k: int = 10) -> float:
    """Std of KID over ``k`` half-size subsets of the synthetic images (how much it moves by chance)."""
    rng = np.random.default_rng(seed)
    return float(np.std([kid(real, fake[rng.choice(len(fake), len(fake) // 2, replace=False)]) for _ in range(k)]))


def format_report(res: Dict[str, Any]) -> str:
    """Plain-text table of :func:`measure` results, looks side by side."""
    looks = list(res["looks"])
    w = 24
    lines = [f"realism vs {len(res['references'])} reference images ({res['size'][0]}x{res['size'][1]}, "
             f"{'min-max stretched' if res['stretch'] else 'not stretched'}); {res['n_synthetic']} synthetic "
             f"images per look, batch {res['batch']}, seed {res['seed']}",
             f"{'figure':<{w}}" + "".join(f"{lk:>14}" for lk in looks) + f"{'references':>12}"]

    def row(name: str, vals: List[str], real: str = "") -> None:
        lines.append(f"{name:<{w}}" + "".join(f"{v:>14}" for v in vals) + f"{real:>12}")

    for r, *_ in REGIONS:
        for k in ("mean", "std", "p95"):
            row(f"{r} {k}", [f"{res['looks'][lk]['regions'][r][k]:.1f}" for lk in looks],
                f"{res['real']['regions'][r][k]:.1f}")
    row("region gap (gray lv)", [f"{res['looks'][lk]['region_gap_mean']:.1f}" for lk in looks], "0")
    row("noise spectrum gap (dex)", [f"{res['looks'][lk]['spectrum_gap']:.3f}" for lk in looks], "0")
    row("row/col anisotropy", [f"{res['looks'][lk]['anisotropy']:.2f}" for lk in looks],
        f"{res['real']['anisotropy']:.2f}")
    if "kid" in res["looks"][looks[0]]:
        row("KID x1000 (Lite0)", [f"{1e3 * res['looks'][lk]['kid']:.1f}+-{1e3 * res['looks'][lk]['kid_std']:.1f}"
                                  for lk in looks], "0")
        row("domain clf LOO acc", [f"{100 * res['looks'][lk]['domain_accuracy']:.0f}%" for lk in looks], "50%")
    return "\n".join(lines)


def side_by_side(refs: Sequence[Tuple[str, str, np.ndarray]], looks: Sequence[str], path: str, batch: int = 2,
                 seed: int = 0, stretch: bool = True, per_row: int = 6) -> str:
    """PNG: the first ``per_row`` references on top, synthetic images of the same classes per look below."""
    refs = list(refs)[:per_row]
    sizes = np.array([im.shape for _, _, im in refs])
    size = (int(np.median(sizes[:, 1])), int(np.median(sizes[:, 0])))
    label_w, pad = 90, 3
    rows = []
    for name, imgs in [("real", [im for _, _, im in refs])] + [
            (lk, synth_set([lab for _, lab, _ in refs], len(refs), batch, lk, seed, size)[0]) for lk in looks]:
        row = np.full((size[1] + pad, label_w + len(refs) * (size[0] + pad)), 255, np.uint8)
        cv2.putText(row, name, (6, size[1] // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 0, 1, cv2.LINE_AA)
        for j, im in enumerate(imgs):
            x = label_w + j * (size[0] + pad)
            row[:size[1], x:x + size[0]] = view(im, size, stretch)
        rows.append(row)
    head = np.full((22, rows[0].shape[1]), 255, np.uint8)
    cv2.putText(head, "top: real references; below: nexedge synth, same classes (" + ", ".join(
        lab for _, lab, _ in refs) + ")", (6, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 0, 1, cv2.LINE_AA)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not cv2.imwrite(path, np.vstack([head] + rows)):
        raise RuntimeError(f"could not write {path!r} (is the extension .png?)")
    return path


def run_realism(ref_dir: str, looks: Sequence[str], n: int, batch: int, seed: int, stretch: bool,
                out_json: Optional[str] = None, figure: Optional[str] = None) -> Dict[str, Any]:
    """Measure, print the table, and optionally write the JSON and a side-by-side figure."""
    import json

    refs = load_references(ref_dir)
    res = measure(refs, looks, n=n, batch=batch, seed=seed, stretch=stretch)
    res["reference_dir"] = ref_dir
    print(format_report(res))
    if figure:
        print(f"wrote {side_by_side(refs, looks, figure, batch, seed, stretch)}")
    if out_json:
        d = os.path.dirname(os.path.abspath(out_json))
        os.makedirs(d, exist_ok=True)
        with open(out_json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    return res
