"""Building blocks of the quantized VGG."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from CIFAR.models.utils import StraightThrough

__all__ = ["AvgPoolConv_q", "FoldedBatchNorm2d", "StraightThrough"]


class AvgPoolConv_q(nn.Conv2d):  # noqa: N801 - reference name
    """Depthwise 2x2/2 pooling convolution + ReLU whose kernel comes from the loaded state
    (the calibrated SNN's rescaled kernel), never reset to 1/4."""

    def __init__(self, kernel_size: int = 2, stride: int = 2, input_channel: int = 64,
                 padding: int = 0, freeze_avg: bool = True) -> None:
        super().__init__(input_channel, input_channel, kernel_size, stride=stride,
                         padding=padding, groups=input_channel, bias=False)
        self.freeze = freeze_avg
        self.relu = nn.ReLU(inplace=True)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.relu(super().forward(input))


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BN slot of the quantized SNN.  The ANN's BN was folded into the preceding conv before
    conversion, so this layer starts as the identity (running mean 0, var 1 - eps, affine 1/0),
    always normalises with its running statistics and is never trained.  It keeps the
    reference's state-dict entries."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.set_identity()
        for p in self.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def set_identity(self) -> None:
        if self.weight.device.type == "meta":
            return
        self.weight.fill_(1.0)
        self.bias.zero_()
        self.running_mean.zero_()
        self.running_var.fill_(1.0 - self.eps)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)
