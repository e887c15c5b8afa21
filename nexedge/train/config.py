"""Training choices shared by the CLI and the trainer, torch-free so that ``nexedge train --help``
does not import torch (``nexedge.train.losses`` and ``nexedge.train.transforms`` use them)."""

from typing import Dict

#: Loss functions ``--loss`` accepts (built by :func:`nexedge.train.losses.build_loss`).
LOSSES = ("ce", "wbce", "sat", "sat_good", "sat_boost")
#: Random mirror augmentations: none, horizontal (the mirror TenCrop scores at test time), vertical, or both.
FLIPS = ("none", "h", "v", "hv")
#: Photometric recipes: the report's (brightness/contrast jitter), or ``shift``: also a random gamma
#: (log-uniform within +-gamma), a Gaussian blur (sigma up to ``blur`` px, half the images) and
#: sensor noise (std up to ``noise`` gray levels), for production batches whose optics, exposure
#: and noise differ from the training set's.
PHOTOMETRIC: Dict[str, Dict[str, float]] = {"report": {"gamma": 0.0, "blur": 0.0, "noise": 0.0},
                                            "shift": {"gamma": 0.35, "blur": 1.0, "noise": 6.0}}
