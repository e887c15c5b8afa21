"""Training choices shared by the CLI and the trainer, torch-free so that ``nexedge train --help``
does not import torch (``nexedge.train.transforms`` uses them)."""

from typing import Dict

#: The losses ``--loss`` accepts, with the line ``nexedge train --help`` shows for each (the CLI's choices
#: and help come from here); each is built by ``nexedge.train.losses.build_loss``.
LOSSES: Dict[str, str] = {
    "ce": "cross entropy (default)",
    "wbce": "CE + weighted binary CE (good vs defect)",
    "sat": "self-adaptive training: soft labels from the model's own predictions after epoch sat_es (--loss-kw)",
    "sat_good": "sat, with soft labels only for images labelled good",
    "sat_boost": "sat_good with class weights (x5 for lead_defect, marking_defect, pocket_damage, scratch)",
}

#: Random mirror augmentations: none, horizontal (the mirror TenCrop scores at test time), vertical, or both.
FLIPS = ("none", "h", "v", "hv")
#: Photometric recipes: the report's (brightness/contrast jitter), or ``shift``: also a random gamma
#: (log-uniform within +-gamma), a Gaussian blur (sigma up to ``blur`` px, half the images) and
#: sensor noise (std up to ``noise`` gray levels), for production batches whose optics, exposure
#: and noise differ from the training set's.
PHOTOMETRIC: Dict[str, Dict[str, float]] = {"report": {"gamma": 0.0, "blur": 0.0, "noise": 0.0},
                                            "shift": {"gamma": 0.35, "blur": 1.0, "noise": 6.0}}
