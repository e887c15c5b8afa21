"""PyTorch backend for ``.pt`` checkpoints (reference results, benchmarks, trainer-side checks).

torch is imported inside the class, never at module import: the daemon imports
``nexedge.runtime`` on machines without torch. Python 3.8.
"""

import time
from typing import Dict, Optional

import numpy as np

from nexedge import preprocess as pp
from nexedge.runtime.base import Backend, BackendError
from nexedge.runtime.registry import CROPS, MAX_BATCH, VERIFY, BackendSpec, Option

SPEC = BackendSpec(
    "torch", (".pt", ".pth"), "TorchBackend", (
        Option("device", (str,), "cpu", "torch device, e.g. cpu or cuda:0"),
        Option("threads", (int,), None, "torch intra-op threads", flag="--threads"),
        MAX_BATCH,
        Option("crop_mode", (str,), None, "host crop mode", CROPS, flag="--crops"),
        VERIFY,
    ), requires=("torch",), packages=("torch",), version="torch:__version__", extra="train", line=False,
    summary="PyTorch checkpoints (reference runs, not for the line)", hint="bench the .pt checkpoint")


class TorchBackend(Backend):
    """Runs a checkpoint with host-side crops (checkpoints always take float crops)."""

    name = "torch"

    def __init__(
        self,
        path: str,
        device: str = "cpu",
        threads: Optional[int] = None,
        max_batch: Optional[int] = None,
        crop_mode: Optional[str] = None,
        verify: bool = True,
    ) -> None:
        import torch

        from nexedge.models.checkpoint import model_from_checkpoint

        self._torch = torch
        self.model = None
        model, card = model_from_checkpoint(path, verify_card=verify)
        super().__init__(card, max_batch)
        if self.crops != "host":
            raise BackendError(f"{path}: a checkpoint card must have graph.crops 'host', got {self.crops!r}")
        if crop_mode:
            self.crop_mode, self.k = crop_mode, pp.n_crops(crop_mode)
        from nexedge.threads import configured

        threads = threads or configured()  # the running command's --threads
        if threads:
            torch.set_num_threads(int(threads))
        self.path = path
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    def _run_host(self, x: np.ndarray, timings: Dict[str, float]) -> np.ndarray:
        if self.model is None:
            raise BackendError(f"{self.path}: backend is closed")
        torch = self._torch
        t0 = time.perf_counter()
        with torch.inference_mode():
            xt = torch.from_numpy(x).to(self.device)
            t1 = time.perf_counter()
            logits = self.model(xt)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t2 = time.perf_counter()
            out = logits.float().cpu().numpy()
        t3 = time.perf_counter()
        timings.update(h2d=t1 - t0, inference=t2 - t1, d2h=t3 - t2)
        return out

    def close(self) -> None:
        self.model = None
