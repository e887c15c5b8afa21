"""Training choices shared by the CLI and the trainer, torch-free so that ``nexedge train --help``
does not import torch (``nexedge.train.transforms`` uses them)."""

from typing import Dict

#: Loss functions ``--loss`` accepts: declared with the losses themselves (torch-free at import).
from nexedge.train.losses import LOSSES  # noqa: F401

#: Random mirror augmentations: none, horizontal (the mirror TenCrop scores at test time), vertical, or both.
FLIPS = ("none", "h", "v", "hv")
#: Photometric recipes: the report's (brightness/contrast jitter), or ``shift``: also a random gamma
#: (log-uniform within +-gamma), a Gaussian blur (sigma up to ``blur`` px, half the images) and
#: sensor noise (std up to ``noise`` gray levels), for production batches whose optics, exposure
#: and noise differ from the training set's.
PHOTOMETRIC: Dict[str, Dict[str, float]] = {"report": {"gamma": 0.0, "blur": 0.0, "noise": 0.0},
                                            "shift": {"gamma": 0.35, "blur": 1.0, "noise": 6.0}}
