"""PNG plots like the report's figures (matplotlib, Agg backend).

- ``curves_acc.png`` (fig. 4): per-class accuracy, train and val, plus binary accuracy.
- ``curves_loss.png`` (fig. 5): per-class CE loss and binary loss.
- ``curves_margin.png``: per-class margin (early-learning diagnostics).
- ``fpr_at_tpr100.png`` (fig. 9): FPR at TPR = 100 % over epochs, val solid, test dotted.
- ROC curves for ``nexedge eval``.
"""

import math
import os
from typing import Dict, List, Sequence

from nexedge.train.history import History


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int):
    cols = min(4, n)
    return int(math.ceil(n / cols)), cols


YLABEL = {"acc": "accuracy", "loss": "CE loss", "margin": "margin (logit)", "bin_acc": "binary accuracy",
          "bin_loss": "binary loss"}


def _per_class_figure(hist: History, classes: Sequence[str], key: str, bin_key: str, title: str, path: str) -> None:
    """One panel per class plus an "all (binary)" panel. The binary panel draws ``bin_key`` and the
    all-class ``key``; when they are different quantities (margin vs accuracy) the second gets its own
    y axis on the right, so neither is read on the other's scale."""
    plt = _plt()
    same_scale = key.split("_")[-1] == bin_key.split("_")[-1]
    panels = list(classes) + ["all (binary)"]
    rows, cols = _grid(len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False)
    ep = hist.epochs
    for i, name in enumerate(panels):
        ax = axes[i // cols][i % cols]
        twin = None
        for split, style in (("train", "-"), ("val", "--"), ("test", ":")):
            if name == "all (binary)":
                ys = hist.series(split, bin_key)
                y2 = hist.series(split, key)
                if not all(math.isnan(v) for v in ys):
                    if same_scale:
                        ax.plot(ep, ys, style, label=f"{split} binary")
                        ax.plot(ep, y2, style, alpha=0.5, label=f"{split} {key}")
                    else:
                        ax.plot(ep, y2, style, label=f"{split} {key}")
                        if twin is None:
                            twin = ax.twinx()
                            twin.set_ylabel(YLABEL.get(bin_key, bin_key), fontsize=7, color="gray")
                            twin.tick_params(labelsize=7, colors="gray")
                        twin.plot(ep, ys, style, color="gray", alpha=0.7, label=f"{split} {YLABEL[bin_key]}")
            else:
                ys = hist.series(split, "per_class", name, key)
                if not all(math.isnan(v) for v in ys):
                    ax.plot(ep, ys, style, label=split)
        n = [r.get("train", {}).get("per_class", {}).get(name, {}).get("n") for r in hist.rows[-1:]]
        ax.set_title(f"{name}" + (f" (train {n[0]})" if n and n[0] is not None else ""), fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("epoch", fontsize=7)
        ax.set_ylabel(YLABEL.get(key, key), fontsize=7)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if i == 0 or name == "all (binary)":
            ax.legend(fontsize=6)
    for j in range(len(panels), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_history(hist: History, classes: Sequence[str], good_class: str, out: str) -> List[str]:
    """Write the training-curve figures into ``out``; returns their paths."""
    paths = []
    for key, bin_key, title, name in (
        ("acc", "bin_acc", "accuracy per class (binary: good vs defect)", "curves_acc.png"),
        ("loss", "bin_loss", "CE loss per class (binary: good vs defect)", "curves_loss.png"),
        ("margin", "bin_acc", "margin per class (logit of given class - largest other); binary accuracy on "
                              "the right axis", "curves_margin.png"),
    ):
        p = os.path.join(out, name)
        _per_class_figure(hist, classes, key, bin_key, title, p)
        paths.append(p)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for split, style in (("val", "-"), ("test", ":")):
        ys = hist.series(split, "fpr_at_tpr", "100")
        if not all(math.isnan(v) for v in ys):
            ax.plot(hist.epochs, [100 * v for v in ys], style, label=split)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("FPR % at TPR = 100 %")
    ax.legend()
    fig.tight_layout()
    p = os.path.join(out, "fpr_at_tpr100.png")
    fig.savefig(p, dpi=90)
    plt.close(fig)
    return paths + [p]


#: A high-TPR zoom (TPR 0.95-1) shows something only when one defect is less than 5 % of TPR.
MIN_DEFECTS_FOR_ZOOM = 20


def plot_roc(curves: Dict[str, List[tuple]], path: str, title: str = "ROC", n_defects: int = 0) -> str:
    """``curves``: label -> list of (fpr, tpr) arrays (one per checkpoint). A linear panel, plus a
    zoom on the high-TPR region when there are at least :data:`MIN_DEFECTS_FOR_ZOOM` defects."""
    plt = _plt()
    zoom = n_defects >= MIN_DEFECTS_FOR_ZOOM
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(10 if zoom else 5.5, 4), squeeze=False)
    a1 = axes[0][0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, runs) in enumerate(curves.items()):
        c = colors[i % len(colors)]
        for j, (fpr, tpr) in enumerate(runs):
            for ax in axes[0]:
                ax.plot(fpr, tpr, color=c, alpha=0.8 if j == 0 else 0.3, label=label if j == 0 else None)
    a1.set_xlabel("FPR")
    a1.set_ylabel("TPR")
    a1.set_title(title if zoom else f"{title}; {n_defects} defects, too few for a high-TPR zoom", fontsize=9)
    if zoom:
        a2 = axes[0][1]
        a2.set_xlim(0, 0.5)
        a2.set_ylim(0.95, 1.001)
        a2.set_xlabel("FPR")
        a2.set_ylabel("TPR")
        a2.set_title("high-TPR region")
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
