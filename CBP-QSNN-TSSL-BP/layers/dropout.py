"""Dropout on (N, C, H, W, T) PSP traces with the mask layout of the reference's torch 1.10.

One Bernoulli(1 - p) mask entry per (sample, channel, row), shared across W and all time
steps, and inverted scaling 1/(1 - p).  For linear outputs (N, C, 1, 1, T) this is one mask
entry per (sample, neuron).  Written out explicitly so the layout does not depend on the
installed torch version (``dropout3d`` on the reference's 6-D view drops whole samples on
torch >= 1.11).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn


class DropoutLayer(nn.Module):
    def __init__(self, config: Mapping, name: str) -> None:
        super().__init__()
        self.name = name
        self.type = config["type"]
        self.layer_config = config
        self.p = float(config.get("p", 0.5))
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"{name}: dropout p must lie in [0, 1], got {self.p}")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return torch.zeros_like(x)
        mask = torch.empty(x.shape[:3] + (1, 1), dtype=x.dtype, device=x.device)
        mask.bernoulli_(1.0 - self.p).div_(1.0 - self.p)
        return x * mask

    def forward_pass(self, x: Tensor, epoch: int | None = None) -> Tensor:
        return self.forward(x)

    def weight_clipper(self) -> None:
        pass
