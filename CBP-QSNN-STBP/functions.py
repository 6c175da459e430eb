"""LIF neuron update with a boxcar surrogate gradient (STBP)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ActFun(torch.autograd.Function):
    """Heaviside spike (u > thresh) forward; boxcar 1/(2 lens) on |u - thresh| < lens backward."""

    @staticmethod
    def forward(ctx, input: Tensor, thresh: float, lens: float) -> Tensor:
        ctx.save_for_backward(input)
        ctx.thresh, ctx.lens = thresh, lens
        return input.gt(thresh).to(input.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (input,) = ctx.saved_tensors
        window = (input - ctx.thresh).abs_().lt_(ctx.lens)
        return grad_output * window.to(grad_output.dtype) / (2 * ctx.lens), None, None


act_fun = ActFun.apply


class Spike(nn.Module):
    """The firing step of one layer as a (parameterless) module, so that module hooks, such
    as the spike metrics, see each layer's spikes.  ``Spike()(u, thresh, lens) == act_fun``."""

    def forward(self, mem: Tensor, thresh: float, lens: float) -> Tensor:
        return act_fun(mem, thresh, lens)


def mem_update(decay: float, thresh: float, lens: float, ops, x, mem, spike, fire=act_fun):
    """One LIF step: u = decay * u_prev * (1 - s_prev) + ops(x); s = H(u - thresh).

    ``ops`` is a layer (called on ``x``) or an already computed input current.
    ``mem``/``spike`` may be the float 0.0 at the first step; ``fire`` is ``act_fun`` or a
    ``Spike`` module.
    """
    current = ops(x) if callable(ops) else ops
    mem = mem * decay * (1.0 - spike) + current
    spike = fire(mem, thresh, lens)
    return mem, spike


def lif_steps(decay: float, thresh: float, lens: float, current: Tensor, steps: int,
              fire=act_fun, shared: bool = False) -> Tensor:
    """The LIF recurrence of one layer over ``steps`` timesteps, multi-step layout.

    ``current`` holds the layer's input current of every step, steps stacked along dim 0
    (``steps * batch`` samples, step-major), or, with ``shared``, one ``batch`` of currents
    used at every step.  Returns the spikes in the same step-major ``steps * batch`` layout.
    Each step is ``mem_update``, so every value equals the time-major loop's.
    """
    per_step = (current,) * steps if shared else current.chunk(steps)
    mem, spike = 0.0, 0.0
    out = []
    for cur in per_step:
        mem, spike = mem_update(decay, thresh, lens, cur, None, mem, spike, fire)
        out.append(spike)
    return torch.cat(out) if steps > 1 else out[0]
