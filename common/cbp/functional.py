"""Quantizer (straight-through) and the CBP constraint function Y(w).

The constraint is piecewise linear in ``w``: slope -2 below the lowest level, +2 at and above
the highest one, and inside each interval [q_i, q_{i+1}) slope +2 on [q_i, r_lo), 0 on the
unconstrained window [r_lo, r_hi) and -2 on [r_hi, q_{i+1}), with
r_lo = q_i + ucs (m_i - q_i) and r_hi = q_{i+1} + ucs (m_i - q_{i+1}).  The backward pass uses
exactly these half-open intervals (a right derivative), and the edges are computed in the
weight's floating-point type the same way the reference does, so gradients match it bit for bit.

All kernels are single vectorized passes: on CPU the weight is streamed in cache-sized chunks,
on CUDA each op runs over the whole tensor.  In training (the Lagrangian's value and weight
gradient), large weights (``FUSED_MIN_NUMEL`` elements or more) go through one fused kernel
built by ``torch.compile`` from the same operations in the same order, which gives the same
values bit for bit in one pass over memory; ``CBP_FUSED=0`` turns it off, ``CBP_FUSED=1`` uses
it at every size.  If the kernel cannot be built (no compiler), the chunked operations run.
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings

import torch
from torch import Tensor

from .levels import LevelSet

_CHUNK = 1 << 18


def _scalar(x: Tensor | float) -> float:
    return float(x.detach().reshape(-1)[0]) if isinstance(x, Tensor) else float(x)


@functools.lru_cache(maxsize=4096)
def _plan(mode: str, scale: float, ucs: float, dtype: torch.dtype) -> tuple:
    """Constants of the piecewise-linear constraint, computed in ``dtype`` like the reference:
    (slope edges, slope lookup or None, (q_0, q_n, triangles))."""
    if not 0.0 <= ucs <= 1.0:
        raise ValueError(f"ucs must lie in [0, 1], got {ucs}")
    ls = LevelSet.of(mode)
    s = torch.tensor([scale], dtype=dtype)
    q = [(lv * s) for lv in ls.levels]
    slope_edges = [(float(v), 4.0) for v in q]  # slope jumps -2 -> +2 at every level
    # Slope of each region between consecutive sorted edges, as the reference evaluates it:
    # (hi - lo) / (mid - lo) and (hi - lo) / (mid - hi) in ``dtype`` (exactly +-2 unless a
    # shift-mode midpoint times the scale rounds).
    table = [-2.0]
    order = [float(q[0])]  # sorted edges: q0, (r_lo0, r_hi0, q1), (r_lo1, r_hi1, q2), ...
    # The forward value as the reference computes it: per interval max(0, min((w - lo) /
    # (mid - lo), (w - hi) / (mid - hi)) * (hi - lo)), set to 0 above (hi - lo) * ucs; every
    # constant is exactly a ``dtype`` value.
    triangles = []
    for i in range(len(ls.gaps)):
        lo, hi = q[i], q[i + 1]
        mid = ls.mids[i] * s
        r_lo = lo + (mid - lo) * ucs
        r_hi = hi + (mid - hi) * ucs
        slope_edges += [(float(r_lo), -2.0), (float(r_hi), -2.0)]
        table += [float((hi - lo) / (mid - lo)), 0.0, float((hi - lo) / (mid - hi))]
        order += [float(r_lo), float(r_hi), float(hi)]
        triangles.append((float(lo), float(hi), float(mid - lo), float(mid - hi), float(hi - lo),
                          float((hi - lo) * ucs)))
    table.append(2.0)
    exact = all(abs(v) in (0.0, 2.0) for v in table)
    lookup = None if exact else (tuple(order), tuple(table))
    return tuple(slope_edges), lookup, (float(q[0]), float(q[-1]), tuple(triangles))


def _chunk_size(n: int, device: torch.device) -> int:
    """Stream CPU tensors in cache-sized chunks; run accelerator tensors in one piece."""
    return max(1, n if device.type != "cpu" or n <= _CHUNK else _CHUNK)


def _piece(w: Tensor, plan: tuple, y: Tensor | None, slope: Tensor | None, mask: Tensor,
           tmp: tuple[Tensor, Tensor] | None = None) -> None:
    """Fill, where given, ``slope`` (right derivative) and ``y`` = Y(w) for one flat chunk
    (``tmp``: two scratch buffers like ``w``, needed with ``y``)."""
    slope_edges, lookup, ratio = plan
    if slope is not None:
        slope.fill_(-2.0)
        for v, jump in slope_edges:
            torch.ge(w, v, out=mask)
            slope.add_(mask, alpha=jump)
    if y is not None:
        # Y in the reference's operations and order: range term below q_0, each interval's
        # triangle (zeroed above its window edge), range term above q_n
        q0, qn, triangles = ratio
        t1, t2 = tmp
        torch.sub(w, q0, out=y).mul_(-2.0).clamp_(min=0.0)
        for lo, hi, d_lo, d_hi, gap, edge in triangles:
            torch.sub(w, lo, out=t1).div_(d_lo)
            torch.sub(w, hi, out=t2).div_(d_hi)
            torch.minimum(t1, t2, out=t1).mul_(gap).clamp_(min=0.0)
            torch.le(t1, edge, out=mask)  # the unconstrained window: values above d * ucs -> 0
            y.add_(t1.mul_(mask))
        torch.sub(w, qn, out=t1).mul_(2.0).clamp_(min=0.0)
        y.add_(t1)
    if slope is not None and lookup is not None:  # rounded reference slopes, by region
        edges, table = lookup
        region = torch.zeros(w.shape, dtype=torch.long, device=w.device)
        for v in edges:
            region += torch.ge(w, v).long()
        slope.copy_(torch.tensor(table, dtype=slope.dtype, device=slope.device)[region])


FUSED_MIN_NUMEL = 1 << 19
_fused_state: dict = {"fn": None, "failed": False}


@functools.lru_cache(maxsize=4)
def _have_compiler(cxx: str, path: str) -> bool:
    """Whether a C++ compiler for the CPU kernel is on ``path`` (looked up once per pair)."""
    return shutil.which(cxx, path=path) is not None or shutil.which("c++", path=path) is not None


def _fused_wanted(n: int, device: torch.device, lookup, fused: bool | None = None) -> bool:
    """Whether a weight of ``n`` elements goes through the compiled kernel (``fused``: the
    caller's choice, None for the size rule; ``CBP_FUSED`` overrides both)."""
    flag = os.environ.get("CBP_FUSED", "auto").strip().lower()
    if flag in ("0", "off", "false", "no") or lookup is not None or _fused_state["failed"]:
        return False
    if flag not in ("1", "on", "true", "yes") and (
            fused is False or (fused is None and n < FUSED_MIN_NUMEL)):
        return False
    if device.type == "cpu":
        return _have_compiler(os.environ.get("CXX", "g++"), os.environ.get("PATH", os.defpath))
    return device.type == "cuda"


def _fused_body(w: Tensor, lam: Tensor | None, c: Tensor, edges: Tensor, jumps: tuple,
                n_tri: int, want_y: bool, want_grad: bool, times_lam: bool):
    """The ``_piece`` operations on a whole flat tensor (constants as tensors, so one compiled
    kernel serves every scale and ucs): (Y or lam * Y or None, slope * lam-or-1 or None)."""
    y = g = None
    if want_y:
        y = torch.clamp_min((w - c[0]) * -2.0, 0.0)
        for k in range(n_tri):
            lo, hi, d_lo, d_hi, gap, edge = (c[2 + 6 * k + j] for j in range(6))
            t1 = torch.clamp_min(torch.minimum((w - lo) / d_lo, (w - hi) / d_hi) * gap, 0.0)
            y = y + t1 * (t1 <= edge).to(w.dtype)
        y = y + torch.clamp_min((w - c[1]) * 2.0, 0.0)
        if times_lam:
            y = y * lam
    if want_grad:
        g = torch.full_like(w, -2.0)
        for k, jump in enumerate(jumps):
            g = g + (w >= edges[k]).to(w.dtype) * jump
        if lam is not None:
            g = g * lam
    return y, g


def _fused_fn():
    if _fused_state["fn"] is None:
        _fused_state["fn"] = torch.compile(_fused_body, dynamic=True)
    return _fused_state["fn"]


@functools.lru_cache(maxsize=256)
def _fused_constants(plan: tuple, dtype: torch.dtype, device: torch.device
                     ) -> tuple[Tensor, Tensor]:
    """The kernel's constants of a plan as tensors on ``device`` (built once per plan, not per
    batch): the range ends and triangle constants, and the slope edges."""
    slope_edges, _, (q0, qn, triangles) = plan
    consts = [q0, qn] + [v for tri in triangles for v in tri]
    return (torch.tensor(consts, dtype=dtype, device=device),
            torch.tensor([v for v, _ in slope_edges], dtype=dtype, device=device))


def _evaluate_fused(wf: Tensor, lf: Tensor | None, plan: tuple, want_y: bool, want_grad: bool,
                    want_sum: bool):
    """(Y, grad, sum) as ``_evaluate`` computes them, through the compiled kernel; None when
    the kernel cannot be built."""
    slope_edges, _, (_, _, triangles) = plan
    c, edges = _fused_constants(plan, wf.dtype, wf.device)
    jumps = tuple(j for _, j in slope_edges)
    need_y = want_y or want_sum
    times_lam = want_sum and lf is not None and not want_y
    try:
        y, g = _fused_fn()(wf, lf, c, edges, jumps, len(triangles), need_y, want_grad,
                           times_lam)
    except Exception as exc:  # no compiler / backend: fall back to the chunked operations
        _fused_state["failed"] = True
        warnings.warn(f"cbp: fused constraint kernel unavailable ({type(exc).__name__}); "
                      "using the chunked operations", RuntimeWarning, stacklevel=3)
        return None
    total = None
    if want_sum:
        total = y.sum() if lf is None or not want_y else (lf * y).sum()
    return y if want_y else None, g, total


def _evaluate(
    w: Tensor,
    lam: Tensor | None,
    mode: str,
    scale: float,
    ucs: float,
    want_y: bool,
    want_grad: bool,
    want_sum: bool,
    fused: bool | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Return (Y, dY/dw * lam-or-1, sum(lam * Y)) for a weight tensor; each only if wanted.

    The sum is ``(lam * Y).sum()`` (or ``Y.sum()``) over the whole tensor in the weight's
    dtype, the reference's reduction on the same device."""
    plan = _plan(mode, scale, ucs, w.dtype)
    wf = w.detach().reshape(-1)
    lf = lam.detach().reshape(-1) if lam is not None else None
    n = wf.numel()
    if want_grad and want_sum and _fused_wanted(n, w.device, plan[1], fused):
        fused = _evaluate_fused(wf, lf, plan, want_y, want_grad, want_sum)
        if fused is not None:
            y, g, total = fused
            return (y.view(w.shape) if y is not None else None,
                    g.view(w.shape) if g is not None else None, total)
    need_y = want_y or want_sum
    y_out = torch.empty_like(wf) if need_y else None
    g_out = torch.empty_like(wf) if want_grad else None
    step = _chunk_size(n, w.device)
    size = min(step, n)
    slope = torch.empty(size, dtype=w.dtype, device=w.device) if want_grad else None
    # comparisons write 0/1 into a float buffer: far faster on CPU than bool masks + promotion
    mask = torch.empty(size, dtype=w.dtype, device=w.device)
    tmp = (torch.empty(size, dtype=w.dtype, device=w.device),
           torch.empty(size, dtype=w.dtype, device=w.device)) if need_y else None
    for i in range(0, n, step):
        wc = wf[i : i + step]
        k = wc.numel()
        sc = slope[:k] if want_grad else None
        _piece(wc, plan, y_out[i : i + k] if need_y else None, sc, mask[:k],
               (tmp[0][:k], tmp[1][:k]) if need_y else None)
        if want_grad:
            if lf is not None:
                torch.mul(sc, lf[i : i + k], out=g_out[i : i + k])
            else:
                g_out[i : i + k].copy_(sc)
        if want_sum and lf is not None and not want_y:
            y_out[i : i + k].mul_(lf[i : i + k])  # lam * Y in place, while the chunk is cached
    total = None
    if want_sum:
        # one reduction over the whole tensor: the same order as the reference's (lam*Y).sum()
        if lf is None or not want_y:
            total = y_out.sum()
        else:
            total = (lf * y_out).sum()
    shape = w.shape
    return (
        y_out.view(shape) if want_y else None,
        g_out.view(shape) if g_out is not None else None,
        total,
    )


def constraint_values(weight: Tensor, scale: float, mode: str, ucs: float) -> Tensor:
    """Y(W; ucs) elementwise, without autograd (what a multiplier update ascends on)."""
    return _evaluate(weight, None, mode, scale, ucs, want_y=True, want_grad=False,
                     want_sum=False)[0]


class _Constraint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, mode: str, scale: float, ucs: float) -> Tensor:
        y, slope, _ = _evaluate(
            weight, None, mode, scale, ucs, True, ctx.needs_input_grad[0], False
        )
        ctx.save_for_backward(slope)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        (slope,) = ctx.saved_tensors
        return grad * slope, None, None, None


class _Lagrangian(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, lam: Tensor, mode: str, scale: float, ucs: float,
                fused: bool | None) -> Tensor:
        need_w, need_l = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        y, g, total = _evaluate(weight, lam, mode, scale, ucs, need_l, need_w, True, fused)
        ctx.save_for_backward(g, y)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        g, y = ctx.saved_tensors
        gw = g * grad if ctx.needs_input_grad[0] else None
        gl = y * grad if ctx.needs_input_grad[1] else None
        return gw, gl, None, None, None, None


def constraint(weight: Tensor, scale: Tensor | float, mode: str, ucs: float) -> Tensor:
    """Elementwise constraint Y(w; ucs) for levels ``levels(mode) * scale``.

    Differentiable in ``weight`` with the reference's piecewise gradient; no gradient to
    ``scale``.  ``ucs`` in [0, 1] sets the unconstrained window (0: only the range is enforced).
    """
    return _Constraint.apply(weight, mode, _scalar(scale), float(ucs))


def lagrangian(
    weight: Tensor, lam: Tensor, scale: Tensor | float, mode: str, ucs: float,
    fused: bool | None = None,
) -> Tensor:
    """Scalar sum(lam * Y(weight; ucs)) computed in one fused pass.

    Gradient to ``weight`` is lam * Y'(w) and to ``lam`` is Y(w) (each only when required).
    ``fused``: take the compiled kernel (True), never (False), or from
    ``FUSED_MIN_NUMEL`` elements on (None); the values are the same.
    """
    return _Lagrangian.apply(weight, lam, mode, _scalar(scale), float(ucs), fused)


def constraint_sum(weight: Tensor, scale: Tensor | float, mode: str, ucs: float = 1.0) -> Tensor:
    """sum(Y(weight; ucs)) as a 0-dim tensor in the weight's dtype (used for CFS); no
    autograd."""
    with torch.no_grad():
        _, _, total = _evaluate(weight, None, mode, _scalar(scale), float(ucs), False, False, True)
    return total


class _Quantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, scale: Tensor, mode: str) -> Tensor:
        ls = LevelSet.of(mode)
        w = weight.detach()
        s = scale.detach().to(w.dtype)
        if mode == "bin":
            return torch.sign(w).mul_(s)
        out = torch.full_like(w, ls.levels[0])
        for mid, gap in zip(ls.mids, ls.gaps):
            out.add_(torch.sub(w, mid * s).sign_().add_(1.0), alpha=gap / 2)
        return out.mul_(s)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None, None


def quantize(weight: Tensor, scale: Tensor | float, mode: str) -> Tensor:
    """Quantize to the nearest level of ``levels(mode) * scale`` (sign rule: a weight exactly
    on a midpoint maps to that midpoint).  Straight-through backward: the gradient reaches
    ``weight`` unchanged; ``scale`` gets none."""
    LevelSet.of(mode)
    if not isinstance(scale, Tensor):
        scale = torch.tensor([float(scale)], dtype=weight.dtype, device=weight.device)
    return _Quantize.apply(weight, scale, mode)


def quantize_codes(weight: Tensor, scale: Tensor | float, mode: str) -> Tensor:
    """Index (uint8) of the level each weight quantizes to (midpoints round up)."""
    ls = LevelSet.of(mode)
    s = _scalar(scale)
    w = weight.detach()
    codes = torch.zeros(w.shape, dtype=torch.uint8, device=w.device)
    sv = torch.tensor([s], dtype=w.dtype)
    for mid in ls.mids:
        codes += (w >= float(mid * sv)).to(torch.uint8)
    return codes
