"""Convolution on (N, C, H, W, T): a Conv3d with kernel (k, k, 1), i.e. per time step."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layers.common import QuantizedWeight, WeightLayer, out_shape, spatial3


class ConvLayer(WeightLayer):
    """fp32 conv layer followed by the TSSL-BP neuron; weights clamped to [-4, 4]."""

    def __init__(self, network_config: Mapping, config: Mapping, name: str, in_shape) -> None:
        super().__init__(network_config, config, name)
        cin, cout = int(config["in_channels"]), int(config["out_channels"])
        self.kernel = spatial3(config["kernel_size"], "kernel_size", 1)
        self.stride = spatial3(config.get("stride", 1), "stride", 1)
        self.padding = spatial3(config.get("padding", 0), "padding", 0)
        self.dilation = spatial3(config.get("dilation", 1), "dilation", 1)
        if int(in_shape[0]) != cin:
            raise ValueError(f"{name}: in_channels {cin} but the input has {in_shape[0]} channels")
        w = torch.empty(cout, cin, *self.kernel)
        # PyTorch's default conv init (uniform, bound 1/sqrt(fan_in)) times weight_scale
        nn.init.kaiming_uniform_(w, a=5**0.5)
        self.weight = nn.Parameter(w * float(config.get("weight_scale", 1)))
        self.in_shape = list(in_shape)
        self.out_shape = out_shape(name, cout, in_shape, self.kernel, self.stride, self.padding,
                                   self.dilation)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv3d(x, self.effective_weight(), None, self.stride, self.padding, self.dilation)


class QConvLayer(QuantizedWeight, ConvLayer):
    """Conv layer whose forward uses the quantized weight; latent weights clamped to [-1, 1]."""

    def __init__(self, network_config: Mapping, config: Mapping, name: str, in_shape) -> None:
        super().__init__(network_config, config, name, in_shape)
        self._init_quant(network_config["mode"])
