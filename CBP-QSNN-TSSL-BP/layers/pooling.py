"""Fixed-weight sum pooling on (N, C, H, W, T): ``theta`` x the sum over each window, no neuron."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layers.common import out_shape, spatial3


class PoolLayer(nn.Module):
    """Each channel is convolved with a constant (k, k, 1) kernel of value ``theta`` (default
    1.1), so the output is 1.1 x the window sum of the incoming PSPs.  Channels are pooled
    separately, so any H, W and padding work."""

    def __init__(self, network_config: Mapping, config: Mapping, name: str, in_shape) -> None:
        super().__init__()
        self.name = name
        self.layer_config = config
        self.network_config = network_config
        self.type = config["type"]
        self.kernel = spatial3(config["kernel_size"], "kernel_size", 1)
        self.stride = spatial3(config.get("stride", config["kernel_size"]), "stride", 1)
        self.padding = spatial3(config.get("padding", 0), "padding", 0)
        self.dilation = spatial3(config.get("dilation", 1), "dilation", 1)
        self.theta = float(config.get("theta", 1.1))
        self.in_shape = list(in_shape)
        self.out_shape = out_shape(name, in_shape[0], in_shape, self.kernel, self.stride,
                                   self.padding, self.dilation)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w, T = x.shape
        weight = torch.full((1, 1, *self.kernel), self.theta, dtype=x.dtype, device=x.device)
        y = F.conv3d(x.reshape(n * c, 1, h, w, T), weight, None, self.stride, self.padding,
                     self.dilation)
        return y.reshape(n, c, *y.shape[2:])

    def forward_pass(self, x: Tensor, epoch: int | None = None) -> Tensor:
        return self(x)

    def get_parameters(self) -> None:
        return None

    def weight_clipper(self) -> None:
        pass
