"""All-reduce helpers on top of ``cbp.distributed`` (identity without a process group)."""

from __future__ import annotations

import torch

from cbp import distributed as D


def allreduce(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks in place."""
    return D.all_reduce_sum(t)


def allaverage(t: torch.Tensor) -> torch.Tensor:
    """Average ``t`` over all ranks in place."""
    if D.is_distributed():
        t.div_(D.world_size())
        D.all_reduce_sum(t)
    return t
