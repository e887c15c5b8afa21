"""``nexedge export``, ``nexedge calibrate``, ``nexedge build-engine``.

Light at import (argparse only); torch, onnx, onnxruntime and tensorrt are
imported inside the ``run_*`` functions.
"""

import argparse
import json

from nexedge.card import GRAPH_CROPS


def configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="trained checkpoint (.pt) with its .card.json beside it")
    p.add_argument("--crops", default="host", choices=GRAPH_CROPS,
                   help="host: float crops in, logits out (host does the crops); center|five|ten: uint8 "
                        "prepared images in, crops+softmax in the graph, probs/defect_score out (default: host)")
    p.add_argument("-o", "--out", help="output .onnx (default: <checkpoint stem>.<crops>.onnx)")
    p.add_argument("--max-batch", type=int, default=64,
                   help="largest batch in images the runtime may send (card graph.max_batch; default 64)")
    p.add_argument("--parity-data",
                   help="folder of images or data-set root (val/ preferred) for the parity check; "
                        "without it parity runs on generated images and the card says so")
    p.add_argument("--parity-images", type=int, default=16, help="images used for the parity check (default 16)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="max abs probability difference ONNX vs torch (default 1e-4)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads for the parity run")


def run_export(args: argparse.Namespace) -> int:
    from nexedge.export.onnx_export import export_onnx

    res = export_onnx(
        args.checkpoint,
        out=args.out,
        crops=args.crops,
        max_batch=args.max_batch,
        parity_data=args.parity_data,
        parity_images=args.parity_images,
        tolerance=args.tolerance,
        threads=args.threads,
    )
    print(f"wrote {res.path} and {res.card_path}")
    print("parity: " + json.dumps(res.parity))
    return 0
