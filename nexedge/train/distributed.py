"""DistributedDataParallel plumbing for ``torchrun`` (NCCL on GPUs, gloo on CPU).

``torchrun --nproc_per_node N -m nexedge.cli train ...`` sets RANK / WORLD_SIZE /
LOCAL_RANK; without them training runs in one process. Rank 0 writes every file.
"""

import os
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group when launched by torchrun; pick the device."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} requested but CUDA is not available on this machine")
    if world > 1:
        if device == "cuda":
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
        else:
            dev = torch.device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        return DistContext(rank, world, local, dev)
    return DistContext(0, 1, 0, torch.device(device))


def cleanup(ctx: DistContext) -> None:
    import torch.distributed as dist

    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    import torch.distributed as dist

    if ctx.enabled:
        dist.barrier()


def gather_rows(ctx: DistContext, index: np.ndarray, *arrays: np.ndarray) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Gather per-sample rows from all ranks, de-duplicate by dataset index (the
    DistributedSampler pads with repeats) and sort by index."""
    if ctx.enabled:
        import torch.distributed as dist

        parts: list = [None] * ctx.world_size
        dist.all_gather_object(parts, (index, arrays))
        index = np.concatenate([p[0] for p in parts])
        arrays = tuple(np.concatenate([p[1][k] for p in parts]) for k in range(len(arrays)))
    _, first = np.unique(index, return_index=True)
    return index[first], [a[first] for a in arrays]


def broadcast_object(ctx: DistContext, obj):
    """Rank 0's ``obj`` on every rank."""
    if not ctx.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
