"""Checkpoint files: a plain dict of tensors and primitives, loadable with
``torch.load(weights_only=True)``, written to a temp file and ``os.replace``d.

Format ``nexedge.ckpt/1``::

    {"format", "arch", "arch_kwargs", "classes", "good_class", "state_dict",
     "epoch", "optimizer" (or None), "scheduler" (or None), "extra" (dict)}

The ModelCard is the sidecar ``<name>.card.json`` (see nexedge.card).
"""

import os
import tempfile
from typing import Any, Dict, Optional, Tuple

import torch

from nexedge.card import ModelCard, chmod_like_open, load_card
from nexedge.models import create_model

FORMAT = "nexedge.ckpt/1"


def save_checkpoint(
    path: str,
    model: torch.nn.Module,
    arch: str,
    classes: list,
    good_class: str,
    arch_kwargs: Optional[Dict[str, Any]] = None,
    epoch: int = 0,
    optimizer: Optional[Dict[str, Any]] = None,
    scheduler: Optional[Dict[str, Any]] = None,
    extra: Optional[Dict[str, Any]] = None,
    card: Optional[ModelCard] = None,
) -> str:
    """Write a checkpoint atomically; with ``card``, also stamp and write its sidecar."""
    state = model.module.state_dict() if hasattr(model, "module") else model.state_dict()
    payload = {
        "format": FORMAT,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs or {}),
        "classes": list(classes),
        "good_class": good_class,
        "state_dict": {k: v.detach().cpu() for k, v in state.items()},
        "epoch": int(epoch),
        "optimizer": optimizer,
        "scheduler": scheduler,
        "extra": dict(extra or {}),
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    os.close(fd)
    try:
        chmod_like_open(tmp)
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if card is not None:
        card.save_for(path)
    return path


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Load a checkpoint dict (``weights_only=True``); errors name the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a nexedge checkpoint (expected format {FORMAT!r})")
    return ckpt


def model_from_checkpoint(path: str, verify_card: bool = True) -> Tuple[torch.nn.Module, ModelCard]:
    """Rebuild the model in eval mode and return it with its (verified) card."""
    card = load_card(path, verify=verify_card)
    ckpt = load_checkpoint(path)
    model = create_model(ckpt["arch"], num_classes=len(ckpt["classes"]), **ckpt["arch_kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, card
