"""Small helpers for running under ``torch.distributed`` (all no-ops in a single process)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks in place (returns ``t``)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Make every tensor equal to rank ``src``'s copy."""
    if is_distributed():
        for t in tensors:
            dist.broadcast(t, src=src)


def init_from_env(backend: str | None = None, device: torch.device | str | None = None) -> bool:
    """Initialise the default process group from torchrun / torch.distributed.launch variables.

    Returns True when running distributed.  The backend defaults to NCCL for CUDA devices
    (``device`` if given, else CUDA availability) and gloo otherwise.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if dist.is_initialized():
        return True
    if backend is None:
        on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        backend = "nccl" if on_cuda else "gloo"
    dist.init_process_group(backend=backend)
    return True
