"""The spiking network trained by CBP: IF layers over (quantized) convs with a surrogate
gradient, thresholds normalised to 1.

``SpikeModel_q(VGG_q(...), sim_length=T)`` wraps each conv as the child ``.conv`` of a
``SpikeModule_q`` (quantized ``cbp.QConv2d``) or ``SpikeModule_nq`` (first conv and pooling),
so state-dict keys are ``model.features.<i>.conv.weight|bias|scale``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from CIFAR.models.q_utils import AvgPoolConv_q, StraightThrough
from CIFAR.models.spiking_layer import SpikeModel, integrate_and_fire, reset_potential


class SpikeAct(torch.autograd.Function):
    """Heaviside spike 1[u - theta >= 0]; backward (alpha/2) / (1 + (pi/2 alpha (u-theta))^2)."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, threshold, alpha: float) -> torch.Tensor:
        x = input - threshold
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(input.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (x,) = ctx.saved_tensors
        a = ctx.alpha
        grad = a / 2 / (1 + (math.pi / 2 * a * x).pow(2)) * grad_output
        return grad, None, None


spikeAct = SpikeAct.apply  # noqa: N816 - reference name


class _SpikeBase(nn.Module):
    """IF neuron (reset by subtracting the 0/1 spike, theta/(2T) shift) around ``self.conv``.

    ``extra_bias`` (not in the state dict) holds the per-channel bias that light calibration
    gives the pooling layers; ``mem_pot_init`` the potential correction of ``advanced``."""

    def __init__(self, sim_length: int, conv: nn.Module, enable_shift: bool = True) -> None:
        super().__init__()
        self.conv = conv
        self.threshold: float | None = None
        self.mem_pot: torch.Tensor | float = 0
        self.mem_pot_init: torch.Tensor | int = 0
        self.register_buffer("extra_bias", None, persistent=False)
        self.use_spike = False
        self.enable_shift = enable_shift
        self.sim_length = sim_length
        self.cur_t = 0
        self.relu: nn.Module = StraightThrough()

    def _current(self, input: torch.Tensor) -> torch.Tensor:
        x = self.conv(input)
        if self.extra_bias is not None:
            x = x + self.extra_bias.view(1, -1, *([1] * (x.dim() - 2)))
        return x

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.use_spike:  # analog mode (the reference returned None here)
            return self.relu(self._current(input))
        self.cur_t += 1
        return integrate_and_fire(self, self._current(input), lambda u, th: spikeAct(u, th, 2))

    def init_membrane_potential(self) -> None:
        reset_potential(self)


class SpikeModule_nq(_SpikeBase):  # noqa: N801 - reference name
    """Spiking layer over an unquantized conv (first layer, pooling)."""


class SpikeModule_q(_SpikeBase):  # noqa: N801 - reference name
    """Spiking layer over a quantized conv (``cbp.QConv2d``)."""


SPIKE_TYPES = (SpikeModule_nq, SpikeModule_q)


class SpikeModel_q(SpikeModel):  # noqa: N801 - reference name
    """Spiking VGG_q; output = sum over T steps of the analog classifier's logits."""

    spike_types = SPIKE_TYPES
    pool_type = AvgPoolConv_q

    def wrap_conv(self, conv: nn.Module, sim_length: int) -> nn.Module:
        cls = SpikeModule_q if hasattr(conv, "factor") else SpikeModule_nq
        return cls(sim_length=sim_length, conv=conv)

    def wrap_pool(self, pool: nn.Module, sim_length: int) -> nn.Module:
        return SpikeModule_nq(sim_length=sim_length, conv=pool)
