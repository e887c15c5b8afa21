#!/usr/bin/env python3
"""Crop modes and crop aggregation side by side, on the tail the line depends on.

For each checkpoint, one TenCrop pass per split gives every crop's logits; CenterCrop (crop 4),
FiveCrop (crops 0-4) and TenCrop (all ten, five of them mirrored) are then scored with both
aggregations of ``nexedge.metrics.aggregate_crops``: ``mean`` (average the logits, then
softmax: the report's way) and ``max`` (the crop with the highest defect score). Printed per
split: AUC, FPR at TPR >= 99.1 % and at 100 %, and at the operating point set on the first split
(TPR 100 % there, as the daemon decides by default) the escapes and overkill on each later split.

    python benchmarks/bench_crops.py runs/tiles/best.pt --data /work/data/tiles \\
        --markdown benchmarks/results/crops.md

The card says whether the model was trained with horizontal mirrors (``--flip h``/``hv``); a
TenCrop row of a model trained without them scores mirrored images it never saw.
"""

import argparse
import datetime as _dt
import os
import shlex
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from benchmarks import _common as common  # noqa: E402
from nexedge import metrics  # noqa: E402
from nexedge.bench import env as benv  # noqa: E402

#: What this benchmark measures with (``--set KEY=VALUE`` changes one value for a run).
RECIPE = common.recipe(
    splits=("val,test", "splits scored; the first one sets the operating point"),
)

MODES = {"center": [4], "five": [0, 1, 2, 3, 4], "ten": list(range(10))}


def crop_logits_of(ckpt: str, data: str, split: str, threads: int) -> Dict[str, Any]:
    """Per-crop logits N x 10 x C (TenCrop order) and labels of every image of ``split``."""
    import torch

    from nexedge.models.checkpoint import model_from_checkpoint
    from nexedge.train.data import ImageFolderSet, collate_skip_unreadable
    from nexedge.train.loop import crop_logits
    from nexedge.train.transforms import EvalTransform

    torch.set_num_threads(threads)
    model, card = model_from_checkpoint(ckpt)
    ds = ImageFolderSet(data, split, card.classes, card.input, EvalTransform(card.input, "ten"))
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=False, collate_fn=collate_skip_unreadable)
    _, logits, labels = crop_logits(model, loader, torch.device("cpu"), f"{os.path.basename(ckpt)} {split}",
                                    progress=False)
    return {"logits": logits, "labels": labels, "card": card}


def rows_for(ck: str, per_split: Dict[str, Dict[str, Any]], splits: Sequence[str]) -> List[List[str]]:
    card = per_split[splits[0]]["card"]
    g = card.good_index
    out = []
    for mode, sel in MODES.items():
        for agg in metrics.AGGREGATES:
            if mode == "center" and agg == "max":
                continue  # one crop: both aggregations are the same
            row = [ck, mode, agg]
            threshold = None
            for k, split in enumerate(splits):
                d = per_split[split]
                _, s = metrics.aggregate_crops(d["logits"][:, sel], g, agg)
                y = (d["labels"] != g).astype(int)
                fpr = metrics.fpr_at_tprs(y, s, (0.991, 1.0))
                row += [f"{100 * metrics.roc_auc(y, s):.2f}", f"{100 * fpr['99.1']:.1f}", f"{100 * fpr['100']:.1f}"]
                if k == 0:
                    threshold = metrics.operating_point(y, s, 1.0)["threshold"]
                else:
                    rej = s >= threshold
                    row.append(f"{int((~rej & (y == 1)).sum())}/{int(y.sum())} esc, "
                               f"{int((rej & (y == 0)).sum())}/{int((y == 0).sum())} ovk")
            out.append(row)
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = common.parser(__doc__, RECIPE, threads=2)
    p.add_argument("checkpoints", nargs="+")
    common.add_data(p, "data root with the splits", required=True)
    p.add_argument("--label", action="append", default=[], help="name shown for each checkpoint (repeatable)")
    return common.parse(p, RECIPE, argv)


def main(argv: Sequence[str] = ()) -> int:
    args = parse_args(list(argv) or None)
    splits = [s for s in args.splits.split(",") if s]
    head = ["model", "crops", "aggregate"]
    for k, s in enumerate(splits):
        head += [f"{s} AUC %", f"{s} FPR@99.1 %", f"{s} FPR@100 %"] + ([f"{s} at {splits[0]} TPR-100 point"] if k else [])
    rows: List[List[str]] = []
    flips = []
    t0 = time.time()
    for i, ck in enumerate(args.checkpoints):
        label = args.label[i] if i < len(args.label) else os.path.basename(os.path.dirname(os.path.abspath(ck)))
        per = {s: crop_logits_of(ck, args.data, s, args.threads) for s in splits}
        prov = per[splits[0]]["card"].data.get("provenance") or {}
        flips.append(f"{label}: trained with flip {prov.get('flip', 'not recorded (none before this record)')}")
        rows += rows_for(label, per, splits)
    from nexedge.bench.report import table

    text = table(head, rows)
    print(text)
    print("\n".join(flips))
    print(f"({time.time() - t0:.0f} s)")
    if args.markdown:
        md = ["## Crop modes and crop aggregation on the tail", "",
              f"Machine: {benv.one_line(benv.capture(args.threads))}. Date: "
              f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.", "",
              "Command: `python benchmarks/bench_crops.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
              + "`", "",
              "AUC and FPR in % per split; the last column applies the threshold set at TPR 100 % on the first "
              "split (as the daemon decides by default) to the later split: escapes (defects PASSed) and overkill "
              "(good REJECTed). `mean` averages the crops' logits, `max` takes the crop with the highest defect "
              "score.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        md += ["| " + " | ".join(r) + " |" for r in rows]
        md += [""] + [f"- {f}" for f in flips] + [""]
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
