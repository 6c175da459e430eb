"""Quantized layers: ``nn.Conv2d`` / ``nn.Linear`` / ``nn.Conv3d`` whose forward uses
``quantize(weight, scale, mode)``.  ``weight``/``bias`` keep their names and a 1-element
``scale`` parameter is added, so state-dict keys are ``<layer>.weight|bias|scale``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import quantize
from .levels import check_mode, levels


class QuantMixin:
    """Shared behaviour of the quantized layers (frozen scale, cached quantized weight)."""

    weight: nn.Parameter
    scale: nn.Parameter
    mode: str

    def _init_quant(self, mode: str) -> None:
        self.mode = check_mode(mode)
        self.factor = levels(mode)
        with torch.no_grad():
            s = self.weight.detach().abs().mean().reshape(1)
        # Frozen per-layer scale: a parameter (so it is in the state dict) without gradient.
        self.scale = nn.Parameter(s.clone(), requires_grad=False)
        self._qcache: tuple | None = None

    @torch.no_grad()
    def init_scale(self) -> None:
        """Set the scale to mean |W| of the current (pretrained) weight."""
        self.scale.copy_(self.weight.detach().abs().mean().reshape(1).to(self.scale))

    def quantized_weight(self) -> Tensor:
        """The weight the forward pass uses (recomputed only when weight or scale change)."""
        key = (
            self.weight._version,
            self.weight.data_ptr(),
            self.scale._version,
            self.scale.data_ptr(),
            torch.is_grad_enabled(),
        )
        if self._qcache is not None and self._qcache[0] == key:
            return self._qcache[1]
        qw = quantize(self.weight, self.scale, self.mode)
        self._qcache = (key, qw)
        return qw

    def _apply(self, fn, *args, **kwargs):  # drop the cache when moved or cast (.to etc.)
        self._qcache = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state["_qcache"] = None
        return state

    @property
    def qweight(self) -> Tensor:
        return self.quantized_weight()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.mode}"


class QuantConvMixin(QuantMixin):
    """Quantized weight for any convolution whose forward goes through ``_conv_forward``
    (``nn.Conv1d/2d/3d`` and subclasses such as spikingjelly's ``layer.Conv2d``)."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if weight is self.weight:
            weight = self.quantized_weight()
        return super()._conv_forward(input, weight, bias)


class QuantLinearMixin(QuantMixin):
    """Quantized weight for ``nn.Linear`` (and subclasses that keep its forward)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.quantized_weight(), self.bias)


class _QConvInit:
    """The quantized convolutions' constructor: the conv's arguments plus ``mode``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        mode: str = "bin",
        **kwargs,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            **kwargs,
        )
        self._init_quant(mode)


class QConv2d(_QConvInit, QuantConvMixin, nn.Conv2d):
    """Conv2d with quantized weights (``mode`` in bin, ter, 1bit, 2bit)."""


class QConv3d(_QConvInit, QuantConvMixin, nn.Conv3d):
    """Conv3d with quantized weights (TSSL-BP uses (k, k, 1) kernels)."""


class QLinear(QuantLinearMixin, nn.Linear):
    """Linear with quantized weights."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, mode: str = "bin", **kwargs
    ) -> None:
        super().__init__(in_features, out_features, bias, **kwargs)
        self._init_quant(mode)


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every quantized layer, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantMixin)]
