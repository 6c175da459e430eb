"""Fully connected layer on (N, C, H, W, T): flattens C, H, W (C-major) and maps each step."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layers.common import QuantizedWeight, WeightLayer


class LinearLayer(WeightLayer):
    """fp32 linear layer + TSSL-BP neuron; output (N, n_outputs, 1, 1, T)."""

    def __init__(self, network_config: Mapping, config: Mapping, name: str, in_shape) -> None:
        super().__init__(network_config, config, name)
        n_in, n_out = int(config["n_inputs"]), int(config["n_outputs"])
        flat = 1
        for v in in_shape:
            flat *= int(v)
        if flat != n_in:
            raise ValueError(f"{name}: n_inputs {n_in} but the input {list(in_shape)} has {flat}")
        w = torch.empty(n_out, n_in)
        nn.init.kaiming_normal_(w)  # fan_in, gain sqrt(2)
        self.weight = nn.Parameter(w * float(config.get("weight_scale", 1)))
        self.in_shape = list(in_shape)
        self.out_shape = [n_out, 1, 1]

    def forward(self, x: Tensor) -> Tensor:
        n, T = x.shape[0], x.shape[-1]
        y = F.linear(x.reshape(n, -1, T).transpose(1, 2), self.effective_weight())
        return y.transpose(1, 2).reshape(n, -1, 1, 1, T)


class QLinearLayer(QuantizedWeight, LinearLayer):
    """Linear layer whose forward uses the quantized weight; latent weights clamped to [-1, 1]."""

    def __init__(self, network_config: Mapping, config: Mapping, name: str, in_shape) -> None:
        super().__init__(network_config, config, name, in_shape)
        self._init_quant(network_config["mode"])
