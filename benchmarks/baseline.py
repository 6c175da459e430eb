"""A straightforward per-level masked implementation of the constraint maths.

Written as the baseline for benchmarks and as an independent oracle in tests: it walks the
level intervals one at a time with boolean masks and in-place masked writes, computing the
forward value from the triangle formula and the backward from the half-open interval rule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cbp.levels import LevelSet


def constraint_forward(w: Tensor, s: Tensor, mode: str, ucs: float) -> Tensor:
    ls = LevelSet.of(mode)
    q = ls.levels
    zero = torch.zeros(1, dtype=w.dtype, device=w.device)
    out = torch.maximum((w - q[0] * s) * -2, zero)
    for i in range(len(ls.gaps)):
        lo, hi, mid = q[i] * s, q[i + 1] * s, ls.mids[i] * s
        tri = torch.maximum(torch.minimum((w - lo) / (mid - lo), (w - hi) / (mid - hi)) * (hi - lo), zero)
        tri[tri > (hi - lo) * ucs] = 0
        out += tri
    out += torch.maximum((w - q[-1] * s) * 2, zero)
    return out


def constraint_backward(grad: Tensor, w: Tensor, s: Tensor, mode: str, ucs: float) -> Tensor:
    ls = LevelSet.of(mode)
    q = ls.levels
    g = grad.clone()
    g[w < q[0] * s] *= -2
    g[w >= q[-1] * s] *= 2
    for i in range(len(ls.gaps)):
        lo, hi, mid = q[i] * s, q[i + 1] * s, ls.mids[i] * s
        r_lo = lo + (mid - lo) * ucs
        r_hi = hi + (mid - hi) * ucs
        g[(w >= lo) & (w < r_lo)] *= (hi - lo) / (mid - lo)
        g[(w < hi) & (w >= r_hi)] *= (hi - lo) / (mid - hi)
        g[(w >= r_lo) & (w < r_hi)] = 0
    return g


def lagrangian_forward_backward(w: Tensor, lam: Tensor, s: Tensor, mode: str, ucs: float):
    """(sum(lam * Y), lam * Y') the baseline way."""
    y = constraint_forward(w, s, mode, ucs)
    return (lam * y).sum(), constraint_backward(lam, w, s, mode, ucs)


# ---------------------------------------------------------------------------------------------
# An STBP CBP training step written the way the reference writes it: time-major (every layer
# called once per timestep on the batch), the input convolution recomputed at every step, the
# weights quantized at every call, and the per-level masked constraint above.

class _RefConstraint(torch.autograd.Function):
    """Y(w) forward, the half-open-interval slope rule backward (per-level masks)."""

    @staticmethod
    def forward(ctx, w: Tensor, s: Tensor, mode: str, ucs: float) -> Tensor:
        ctx.save_for_backward(w, s)
        ctx.mode, ctx.ucs = mode, ucs
        return constraint_forward(w, s, mode, ucs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w, s = ctx.saved_tensors
        return constraint_backward(grad, w, s, ctx.mode, ctx.ucs), None, None, None


class _RefSpike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, thresh: float, lens: float) -> Tensor:
        ctx.save_for_backward(u)
        ctx.thresh, ctx.lens = thresh, lens
        return u.gt(thresh).float()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (u,) = ctx.saved_tensors
        window = (u - ctx.thresh).abs() < ctx.lens
        return grad * window.float() / (2 * ctx.lens), None, None


class _RefQuantize(torch.autograd.Function):
    """Sign-formula quantization forward, identity (straight-through) backward."""

    @staticmethod
    def forward(ctx, w: Tensor, s: Tensor, mode: str) -> Tensor:
        ls = LevelSet.of(mode)
        acc = torch.zeros_like(w)
        for mid, gap in zip(ls.mids, ls.gaps):
            acc = acc + gap * (torch.sign(w - mid * s) + 1) / 2
        return s * (acc + ls.levels[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None, None


def _ref_quantize(w: Tensor, s: Tensor, mode: str) -> Tensor:
    """Quantized weight, recomputed at every call."""
    return _RefQuantize.apply(w, s, mode)


def stbp_reference_forward(model, x: Tensor) -> Tensor:
    """The quantized STBP network's output rate, time-major as the reference computes it
    (``model`` is a ``Q_Conv_SNN``: only its parameters and constants are used)."""
    import torch.nn.functional as F

    names = ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "pool3", "fc1", "fc2", "fc3")
    layers = [getattr(model, n) for n in names]
    d, th, ln = model.decay, model.thresh, model.lens

    def call(layer, inp):
        w = layer.weight
        if hasattr(layer, "scale"):
            w = _ref_quantize(w, layer.scale, layer.mode)
        if isinstance(layer, torch.nn.Conv2d):
            return F.conv2d(inp, w, layer.bias, layer.stride, layer.padding)
        return F.linear(inp, w, layer.bias)

    mem = [0.0] * len(layers)
    spk = [0.0] * len(layers)
    total = 0.0
    for _ in range(model.T):
        h = x
        for i, layer in enumerate(layers):
            if i == 7:
                h = h.view(x.shape[0], -1)
            mem[i] = mem[i] * d * (1.0 - spk[i]) + call(layer, h)
            spk[i] = _RefSpike.apply(mem[i], th, ln)
            h = spk[i]
        total = total + h
    return total / model.T


def stbp_reference_step(model, optimizer, lambdas, ucs: float, x: Tensor, labels: Tensor,
                        outs: int) -> Tensor:
    """One CBP step the reference's way; returns the Lagrangian (detached)."""
    import torch.nn.functional as F

    optimizer.zero_grad()
    out = stbp_reference_forward(model, x)
    loss = F.mse_loss(out, F.one_hot(labels, outs).float())
    const = 0.0
    qlayers = [m for m in model.modules() if hasattr(m, "scale")]
    for layer, lam in zip(qlayers, lambdas):
        const = const + (_RefConstraint.apply(layer.weight, layer.scale, layer.mode, ucs)
                         * lam.detach()).sum()
    lag = loss + const
    lag.backward(retain_graph=True)
    torch.nn.utils.clip_grad_value_(model.parameters(), 1)
    optimizer.step()
    with torch.no_grad():
        for layer in qlayers:
            layer.weight.clamp_(-1, 1)
    return lag.detach()
