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
        x = self._current(input)
        if self.enable_shift and self.threshold is not None:
            x = x + self.threshold * 0.5 / self.sim_length
        self.mem_pot = self.mem_pot + x
        spike = spikeAct(self.mem_pot, self.threshold, 2)
        self.mem_pot = self.mem_pot - spike
        return spike

    def init_membrane_potential(self) -> None:
        init = self.mem_pot_init
        self.mem_pot = init if isinstance(init, (int, float)) else init.clone()
        self.cur_t = 0


class SpikeModule_nq(_SpikeBase):  # noqa: N801 - reference name
    """Spiking layer over an unquantized conv (first layer, pooling)."""


class SpikeModule_q(_SpikeBase):  # noqa: N801 - reference name
    """Spiking layer over a quantized conv (``cbp.QConv2d``)."""


SPIKE_TYPES = (SpikeModule_nq, SpikeModule_q)


class SpikeModel_q(nn.Module):  # noqa: N801 - reference name
    """Spiking VGG_q; output = sum over T steps of the analog classifier's logits."""

    def __init__(self, model: nn.Module, sim_length: int, specials: dict | None = None) -> None:
        super().__init__()
        if sim_length <= 0:
            raise ValueError("SNN simulation length must be positive")
        self.model = model
        self.specials = dict(specials or {})
        self.spike_module_refactor(self.model, sim_length)
        self.use_spike = False
        self.T = sim_length

    def spike_module_refactor(self, module: nn.Module, sim_length: int,
                              prev_module: nn.Module | None = None) -> nn.Module | None:
        for name, child in module.named_children():
            if type(child) in self.specials:
                setattr(module, name, self.specials[type(child)](child, sim_length=sim_length))
            elif isinstance(child, nn.Conv2d) and not isinstance(child, AvgPoolConv_q):
                cls = SpikeModule_q if hasattr(child, "factor") else SpikeModule_nq
                setattr(module, name, cls(sim_length=sim_length, conv=child))
                prev_module = getattr(module, name)
            elif isinstance(child, (nn.ReLU, nn.ReLU6)):
                if prev_module is not None:
                    prev_module.add_module("relu", child)
                    setattr(module, name, StraightThrough())
            elif isinstance(child, AvgPoolConv_q):
                relu = child.relu
                setattr(module, name, SpikeModule_nq(sim_length=sim_length, conv=child))
                getattr(module, name).add_module("relu", relu)
            else:
                prev_module = self.spike_module_refactor(child, sim_length, prev_module)
        return prev_module

    def spike_modules(self) -> list[tuple[str, _SpikeBase]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, SPIKE_TYPES)]

    def set_spike_state(self, use_spike: bool = True) -> None:
        self.use_spike = use_spike
        for m in self.model.modules():
            if isinstance(m, SPIKE_TYPES):
                m.use_spike = use_spike

    def init_membrane_potential(self) -> None:
        for m in self.model.modules():
            if isinstance(m, SPIKE_TYPES):
                m.init_membrane_potential()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.use_spike:
            return self.model(input)
        self.init_membrane_potential()
        out = 0
        for _ in range(self.T):
            out = out + self.model(input)
        return out
