"""Small building blocks shared by the float and quantized VGG models."""

from __future__ import annotations

import torch
from torch import nn


class StraightThrough(nn.Module):
    """Identity module; takes the slot of a folded BN or of a ReLU moved into a spiking layer."""

    def __init__(self, channel_num: int = 1) -> None:
        super().__init__()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input


class AvgPoolConv(nn.Conv2d):
    """Average pooling written as a depthwise k x k convolution (weight 1/k^2, no bias) followed
    by a ReLU, so the ANN->SNN refactor can turn the pooling into a spiking layer."""

    def __init__(
        self,
        kernel_size: int = 2,
        stride: int = 2,
        input_channel: int = 64,
        padding: int = 0,
        freeze_avg: bool = True,
    ) -> None:
        super().__init__(input_channel, input_channel, kernel_size, stride=stride,
                         padding=padding, groups=input_channel, bias=False)
        self.set_weight_to_avg()
        self.freeze = freeze_avg
        self.relu = nn.ReLU(inplace=True)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # The kernel is a parameter (the ANN optimizer may move it) but every forward resets it.
        self.set_weight_to_avg()
        return self.relu(super().forward(input))

    @torch.no_grad()
    def set_weight_to_avg(self) -> None:
        k = self.kernel_size[0] * self.kernel_size[1]
        if self.weight.device.type != "meta":
            self.weight.fill_(1.0 / k)


class AverageMeter:
    """Running average of a scalar."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.val, self.sum, self.count, self.avg = 0.0, 0.0, 0, 0.0

    def update(self, val: float, num: int = 1) -> None:
        self.val = val
        self.sum += val * num
        self.count += num
        self.avg = self.sum / max(self.count, 1)
