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
