"""Helpers shared by the layer modules: YAML argument parsing and the quantized-weight mixin."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from layers.q_module import check_mode, levels, quantize

from functions.tsslbp import Neuron


def spatial3(value, name: str, last: int) -> tuple[int, int, int]:
    """An int or 2-list (H, W) from the YAML as a Conv3d argument (h, w, ``last``)."""
    if isinstance(value, int):
        return (value, value, last)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (int(value[0]), int(value[1]), last)
    raise ValueError(f"{name} must be an int or a list of 2 ints, got {value!r}")


def out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """Conv output length (dilation included)."""
    return math.floor((size + 2 * p - d * (k - 1) - 1) / s + 1)


def out_shape(name: str, channels: int, in_shape, kernel, stride, padding, dilation) -> list[int]:
    """[channels, H_out, W_out] of a (k, k, 1) conv/pool over ``in_shape`` = [C, H, W]."""
    shape = [int(channels)] + [
        out_size(int(in_shape[i + 1]), kernel[i], stride[i], padding[i], dilation[i])
        for i in range(2)
    ]
    if min(shape[1:]) < 1:
        raise ValueError(f"{name}: output size {shape} for input {list(in_shape)}")
    return shape


class WeightLayer(nn.Module):
    """A conv/linear layer: ``weight`` parameter, TSSL-BP neuron, clamp to +-``clip``."""

    clip = 4.0
    quantized = False

    def __init__(self, network_config: Mapping, config: Mapping, name: str) -> None:
        super().__init__()
        self.name = name
        self.layer_config = config
        self.network_config = network_config
        self.type = config["type"]
        self.neuron = Neuron(network_config, config)  # no parameters

    def effective_weight(self) -> Tensor:
        return self.weight

    def get_parameters(self) -> nn.Parameter:
        return self.weight

    @torch.no_grad()
    def weight_clipper(self) -> None:
        self.weight.clamp_(-self.clip, self.clip)

    def forward_pass(self, x: Tensor, epoch: int | None = None) -> Tensor:
        return self.neuron(self(x))


class QuantizedWeight:
    """Mixin for quantized layers: a frozen 1-element ``scale`` kept outside the state dict,
    the reference's ``factor``/``df``/``b`` lists, and the STE-quantized forward weight."""

    quantized = True
    clip = 1.0

    def _init_quant(self, mode: str) -> None:
        self.mode = check_mode(mode)
        self.factor = levels(mode)
        self.df = [hi - lo for lo, hi in zip(self.factor[:-1], self.factor[1:])]
        self.b = [(hi + lo) / 2 for lo, hi in zip(self.factor[:-1], self.factor[1:])]
        self.scale = self.weight.detach().abs().mean().reshape(1).clone()
        self.qweight: Tensor | None = None

    @torch.no_grad()
    def set_scale(self, value: Tensor | float | None = None) -> None:
        """Scale := ``value``, or mean |W| of the current weight when omitted."""
        v = self.weight.detach().abs().mean() if value is None else torch.as_tensor(value)
        v = v.reshape(1).to(self.weight.device, self.weight.dtype)
        if self.scale.device == v.device and self.scale.dtype == v.dtype:
            self.scale.copy_(v)  # in place: CBP targets keep referring to it
        else:
            self.scale = v.clone()

    def effective_weight(self) -> Tensor:
        self.qweight = quantize(self.weight, self.scale, self.mode)
        return self.qweight
