"""The CBP constraint function Y(w; ucs), its hand-written gradient and the Lagrangian."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pipelines import load_pipeline

import cbp

ROOT = Path(__file__).resolve().parents[1]
(baseline,) = load_pipeline(ROOT / "benchmarks", "baseline")  # the benchmark's masked baseline

MODES = ["bin", "ter", "1bit", "2bit"]
S = 0.5  # dyadic: levels, midpoints and (for ucs in {0, 1/2, 1}) window edges are exact
UCS_HAND = [0.0, 0.5, 2 / 3, 0.9, 1.0]
UCS_ALL = [0.0, 0.5, 2 / 3, 0.9, 0.95, 1.0]


def Y(ws, mode, ucs, scale=S):
    return cbp.constraint(torch.tensor(ws, dtype=torch.float32), scale, mode, ucs)


def grad_at(ws, mode, ucs, scale=S):
    w = torch.tensor(ws, dtype=torch.float32, requires_grad=True)
    cbp.constraint(w, scale, mode, ucs).sum().backward()
    return w.grad


def edges(mode, ucs, scale):
    """(lo, hi, mid, r_lo, r_hi, gap) per interval, in float32 as the reference computes them."""
    ls = cbp.LevelSet.of(mode)
    s = torch.tensor([scale], dtype=torch.float32)
    out = []
    for i in range(len(ls.gaps)):
        lo, hi, mid = ls.levels[i] * s, ls.levels[i + 1] * s, ls.mids[i] * s
        r_lo = lo + (mid - lo) * ucs
        r_hi = hi + (mid - hi) * ucs
        out.append((lo, hi, mid, r_lo, r_hi, hi - lo))
    return out


# ----------------------------------------------------------------------------- hand values

# (w, Y(w)) with scale 0.5, worked out from Y = 2 * distance to the nearest level inside the
# constrained part, 0 in the window (triangle value > gap * ucs), 2 * excess outside [-s, s].
HAND = {
    ("bin", 0.0): [(-1.0, 1.0), (-0.5, 0.0), (-0.375, 0.0), (0.0, 0.0), (0.25, 0.0), (0.5, 0.0), (0.75, 0.5)],
    ("bin", 0.5): [
        (-0.5, 0.0), (-0.375, 0.25), (-0.25, 0.5), (-0.125, 0.0), (0.0, 0.0), (0.125, 0.0),
        (0.25, 0.5), (0.375, 0.25), (0.5, 0.0), (0.625, 0.25),
    ],
    ("bin", 2 / 3): [(-0.25, 0.5), (-0.125, 0.0), (0.0, 0.0), (0.3125, 0.375)],
    ("bin", 0.9): [(-0.0625, 0.875), (-0.03125, 0.0), (0.0, 0.0), (0.0625, 0.875)],
    ("bin", 1.0): [(-0.5, 0.0), (-0.25, 0.5), (0.0, 1.0), (0.125, 0.75), (0.5, 0.0), (-1.0, 1.0)],
    ("ter", 0.0): [(-0.75, 0.5), (-0.5, 0.0), (-0.25, 0.0), (0.0, 0.0), (0.125, 0.0), (1.0, 1.0)],
    ("ter", 0.5): [
        (-0.5, 0.0), (-0.4375, 0.125), (-0.375, 0.25), (-0.3125, 0.0), (-0.25, 0.0),
        (-0.125, 0.25), (-0.0625, 0.125), (0.0, 0.0), (0.0625, 0.125), (0.125, 0.25),
        (0.1875, 0.0), (0.25, 0.0), (0.375, 0.25), (0.4375, 0.125), (0.5, 0.0),
    ],
    ("ter", 2 / 3): [(0.0625, 0.125), (0.125, 0.25), (0.1875, 0.0), (0.25, 0.0), (0.4375, 0.125)],
    ("ter", 0.9): [(0.1875, 0.375), (0.234375, 0.0), (0.25, 0.0), (-0.3125, 0.375)],
    ("ter", 1.0): [(-0.25, 0.5), (0.25, 0.5), (0.125, 0.25), (0.0, 0.0)],
    ("1bit", 0.0): [(0.0625, 0.0), (0.125, 0.0), (0.5, 0.0), (0.625, 0.25), (-0.75, 0.5)],
    ("1bit", 0.5): [
        (0.0, 0.0), (0.03125, 0.0625), (0.0625, 0.125), (0.09375, 0.0), (0.125, 0.0),
        (0.1875, 0.125), (0.21875, 0.0625), (0.25, 0.0), (-0.4375, 0.125), (-0.375, 0.0),
    ],
    ("1bit", 2 / 3): [(0.03125, 0.0625), (0.125, 0.0), (0.46875, 0.0625)],
    ("1bit", 0.9): [(0.09375, 0.1875), (0.1171875, 0.0), (0.125, 0.0)],
    ("1bit", 1.0): [(0.125, 0.25), (0.375, 0.25), (-0.0625, 0.125), (0.25, 0.0)],
    ("2bit", 0.0): [(0.03125, 0.0), (0.375, 0.0), (0.75, 0.5), (-0.625, 0.25)],
    ("2bit", 0.5): [
        (0.3125, 0.125), (0.34375, 0.0), (0.375, 0.0), (0.4375, 0.125), (0.46875, 0.0625),
        (0.015625, 0.03125), (0.03125, 0.0625), (0.046875, 0.0), (0.0625, 0.0),
        (0.09375, 0.0625), (0.125, 0.0),
    ],
    ("2bit", 2 / 3): [(0.015625, 0.03125), (0.0625, 0.0), (0.28125, 0.0625)],
    ("2bit", 0.9): [(0.046875, 0.09375), (0.0625, 0.0), (0.359375, 0.21875), (0.3671875, 0.0)],
    ("2bit", 1.0): [(0.375, 0.25), (0.0625, 0.125), (-0.1875, 0.125), (-0.125, 0.0)],
}


@pytest.mark.parametrize("mode, ucs", sorted(HAND))
def test_constraint_hand_values(mode, ucs):
    ws = [w for w, _ in HAND[(mode, ucs)]]
    expected = torch.tensor([y for _, y in HAND[(mode, ucs)]])
    assert torch.equal(Y(ws, mode, ucs), expected)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ucs", UCS_HAND)
def test_levels_are_zero_and_midpoints_follow_window(mode, ucs):
    ls = cbp.LevelSet.of(mode)
    assert torch.equal(Y([q * S for q in ls.levels], mode, ucs), torch.zeros(len(ls.levels)))
    mids = Y([m * S for m in ls.mids], mode, ucs)
    if ucs < 1:
        assert torch.equal(mids, torch.zeros(len(ls.mids)))  # inside the free window
    else:
        assert torch.equal(mids, torch.tensor([d * S for d in ls.gaps]))  # peak = gap


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ucs", UCS_HAND)
def test_outside_range_is_twice_the_excess(mode, ucs):
    # extreme levels are -0.5 and +0.5 for every mode at scale 0.5
    ws = [0.75, 1.0, 0.5 + 2.0**-10, -0.625, -1.0, -3.0]
    expected = [0.5, 1.0, 2.0**-9, 0.25, 1.0, 5.0]
    assert torch.equal(Y(ws, mode, ucs), torch.tensor(expected))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ucs", UCS_HAND)
def test_window_edges(mode, ucs):
    """A weight exactly on a window edge r_lo or r_hi gets the reference's value, bit for bit:
    gap*ucs, or 0 where the reference's float rounding puts the triangle just above gap*ucs
    (then the weight is free, its multiplier stops growing, as in the reference).  Slightly
    inside the window Y is 0; slightly outside it is 2 * distance."""
    s = torch.tensor([S])
    for _lo, _hi, mid, r_lo, r_hi, gap in edges(mode, ucs, S):
        w = torch.tensor([float(r_lo), float(r_hi)])
        at = cbp.constraint(w, s, mode, ucs)
        assert torch.equal(at, baseline.constraint_forward(w, s, mode, ucs))
        for v in at.tolist():
            assert v == 0.0 or v == pytest.approx(float(gap) * ucs, abs=1e-6)
        if ucs < 1:
            eps = float(gap) * 1e-3
            inside = Y([float(r_lo) + eps, float(r_hi) - eps, float(mid)], mode, ucs)
            assert torch.equal(inside, torch.zeros(3))
        if ucs > 0:  # just outside the window, on the constrained side: 2 * distance
            eps = float(gap) * 1e-3
            outside = Y([float(r_lo) - eps, float(r_hi) + eps], mode, ucs)
            want = [float(gap) * ucs - 2 * eps] * 2
            assert outside.tolist() == pytest.approx(want, abs=1e-6)


def test_a_weight_on_the_right_edge_can_be_zeroed_like_the_reference():
    """ter, s = 0.5, ucs = 2/3: at r_hi of the upper interval the reference's triangle rounds
    above gap*ucs and is zeroed; the multiplier's ascent step (-Y) is then 0 there too."""
    ucs = 2 / 3
    s = torch.tensor([S])
    (_, _, _, _, r_hi0, _), (_, _, _, r_lo1, r_hi1, gap) = edges("ter", ucs, S)
    w = torch.tensor([float(r_lo1), float(r_hi1), float(r_hi0)])
    y = cbp.constraint(w, s, "ter", ucs)
    assert torch.equal(y, baseline.constraint_forward(w, s, "ter", ucs))
    assert (y == 0).any() and (y > 0).any()
    lam = torch.zeros(3, requires_grad=True)
    cbp.lagrangian(w, lam, s, "ter", ucs).backward()
    assert torch.equal(lam.grad, y)


def test_exact_window_edges_with_dyadic_ucs():
    # bin, s = 0.5, ucs = 0.5: r_lo = -0.25, r_hi = 0.25 exactly; both keep 0.5 = gap * ucs
    assert torch.equal(Y([-0.25, 0.25], "bin", 0.5), torch.tensor([0.5, 0.5]))
    # ter, s = 0.5, ucs = 0.5: r_lo = -0.375 / 0.125, r_hi = -0.125 / 0.375; keep 0.25
    assert torch.equal(Y([-0.375, -0.125, 0.125, 0.375], "ter", 0.5), torch.full((4,), 0.25))


def test_stbp_worked_values():
    # s = 0.1, bin
    assert Y([-0.06, 0.05, -0.04], "bin", 0.5, scale=0.1).tolist() == pytest.approx(
        [0.08, 0.1, 0.0], abs=1e-6
    )
    y0 = Y([-0.15, -0.1, -0.05, 0.0, 0.05, 0.0999, 0.1, 0.12], "bin", 0.0, scale=0.1)
    assert y0.tolist() == pytest.approx([0.1, 0, 0, 0, 0, 0, 0, 0.04], abs=1e-6)
    y1 = Y([-0.06, 0.0, 0.03, 0.1], "bin", 1.0, scale=0.1)
    assert y1.tolist() == pytest.approx([0.08, 0.2, 0.14, 0.0], abs=1e-6)


def test_scale_as_tensor_or_float_and_shape_kept():
    w = torch.tensor([[-0.375, 0.75], [0.0, 0.125]])
    a = cbp.constraint(w, torch.tensor([0.5]), "ter", 0.5)
    b = cbp.constraint(w, 0.5, "ter", 0.5)
    assert a.shape == (2, 2) and torch.equal(a, b)
    assert torch.equal(a, torch.tensor([[0.25, 0.5], [0.0, 0.25]]))


@pytest.mark.parametrize("ucs", [-0.1, 1.5])
def test_ucs_out_of_range_raises(ucs):
    with pytest.raises(ValueError):
        cbp.constraint(torch.zeros(3), 0.5, "bin", ucs)


# ----------------------------------------------------------------------------- gradient

# Right derivative by the half-open rule: -2 below q_1, +2 at/above q_n, +2 on [q_i, r_lo),
# 0 on [r_lo, r_hi), -2 on [r_hi, q_{i+1}).
GRAD_HAND = {
    ("bin", 0.0): [(-1.0, -2), (-0.5, 0), (-0.25, 0), (0.0, 0), (0.4375, 0), (0.5, 2), (1.0, 2)],
    ("bin", 0.5): [
        (-1.0, -2), (-0.5, 2), (-0.375, 2), (-0.25, 0), (0.0, 0), (0.125, 0), (0.25, -2),
        (0.375, -2), (0.5, 2), (0.75, 2),
    ],
    ("bin", 1.0): [(-0.5, 2), (-0.25, 2), (0.0, -2), (0.25, -2), (0.5, 2)],
    ("ter", 0.0): [(-0.75, -2), (-0.5, 0), (0.0, 0), (0.25, 0), (0.5, 2)],
    ("ter", 0.5): [
        (-0.75, -2), (-0.5, 2), (-0.4375, 2), (-0.375, 0), (-0.25, 0), (-0.125, -2),
        (-0.0625, -2), (0.0, 2), (0.0625, 2), (0.125, 0), (0.25, 0), (0.375, -2),
        (0.4375, -2), (0.5, 2), (0.75, 2),
    ],
    ("ter", 1.0): [(-0.5, 2), (-0.25, -2), (-0.125, -2), (0.0, 2), (0.25, -2), (0.5, 2)],
    ("1bit", 0.5): [
        (-0.5, 2), (-0.46875, 2), (-0.4375, 0), (-0.375, 0), (-0.3125, -2), (-0.25, 2), (0.0, 2),
        (0.0625, 0), (0.125, 0), (0.1875, -2), (0.25, 2), (0.4375, -2), (0.5, 2),
    ],
    ("2bit", 0.5): [
        (-0.5, 2), (-0.4375, 0), (-0.3125, -2), (-0.25, 2), (-0.21875, 0), (-0.15625, -2),
        (-0.125, 2), (0.0, 2), (0.03125, 0), (0.09375, -2), (0.125, 2), (0.15625, 0),
        (0.25, 2), (0.3125, 0), (0.4375, -2), (0.5, 2), (-0.75, -2),
    ],
}


@pytest.mark.parametrize("mode, ucs", sorted(GRAD_HAND))
def test_gradient_hand_values(mode, ucs):
    pts = GRAD_HAND[(mode, ucs)]
    got = grad_at([w for w, _ in pts], mode, ucs)
    assert torch.equal(got, torch.tensor([float(g) for _, g in pts]))


def rule(w: float, mode: str, ucs: float, scale: float) -> float:
    """The half-open piecewise rule, evaluated on the float32 edges."""
    ivs = edges(mode, ucs, scale)
    if w < float(ivs[0][0]):
        return -2.0
    if w >= float(ivs[-1][1]):
        return 2.0
    for lo, hi, _mid, r_lo, r_hi, _gap in ivs:
        if float(lo) <= w < float(hi):
            if w < float(r_lo):
                return 2.0
            if w >= float(r_hi):
                return -2.0
            return 0.0
    raise AssertionError("unreachable")


def edge_points(mode, ucs, scale):
    """Every level, midpoint, r_lo, r_hi (float32) and their float32 neighbours."""
    pts = []
    for lo, hi, mid, r_lo, r_hi, _ in edges(mode, ucs, scale):
        for p in (lo, hi, mid, r_lo, r_hi):
            pts += [p, torch.nextafter(p, torch.tensor([1e9])), torch.nextafter(p, torch.tensor([-1e9]))]
    return torch.cat(pts)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ucs", UCS_ALL)
def test_gradient_matches_rule_at_every_edge(mode, ucs):
    scale = 0.0731
    w = edge_points(mode, ucs, scale)
    got = grad_at(w.tolist(), mode, ucs, scale)
    want = torch.tensor([rule(x, mode, ucs, scale) for x in w.tolist()])
    assert torch.equal(got, want)


CASES = [(m, 0.0731) for m in MODES] + [("bin", 0.1), ("ter", 0.1), ("ter", 0.0123457)]


@pytest.mark.parametrize("mode, scale", CASES)
@pytest.mark.parametrize("ucs", UCS_ALL)
def test_gradient_bitwise_equals_baseline(mode, scale, ucs):
    g = torch.Generator().manual_seed(31 * MODES.index(mode) + UCS_ALL.index(ucs))
    s = torch.tensor([scale])
    w = torch.cat([
        edge_points(mode, ucs, scale),
        torch.randn(3000, generator=g) * scale * 1.3,
        (torch.rand(1000, generator=g) * 2 - 1) * scale,
    ]).requires_grad_()
    up = torch.randn(w.shape, generator=g)
    cbp.constraint(w, s, mode, ucs).backward(up)
    ref = baseline.constraint_backward(up, w.detach(), s, mode, ucs)
    assert torch.equal(w.grad, ref)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ucs", UCS_ALL)
def test_forward_matches_baseline_on_random_weights(mode, ucs):
    g = torch.Generator().manual_seed(7)
    s = torch.tensor([0.0731])
    w = torch.randn(5000, generator=g) * 0.1
    got = cbp.constraint(w, s, mode, ucs)
    ref = baseline.constraint_forward(w, s, mode, ucs)
    assert torch.equal(got, ref)  # the reference's formula and operation order, bit for bit
    lam = torch.rand(5000, generator=g)
    total = cbp.lagrangian(w, lam, s, mode, ucs)
    assert total.dtype == torch.float32 and torch.equal(total, (lam * ref).sum())


def test_no_gradient_to_scale():
    w = torch.tensor([0.3, -0.7, 0.1], requires_grad=True)
    s = torch.tensor([0.5], requires_grad=True)
    cbp.constraint(w, s, "ter", 0.5).sum().backward()
    assert s.grad is None
    assert w.grad is not None


# ----------------------------------------------------------------------------- properties


@settings(max_examples=150, deadline=None)
@given(
    mode=st.sampled_from(MODES),
    scale=st.floats(min_value=1e-4, max_value=1e3),
    ucs=st.floats(min_value=0.0, max_value=1.0),
)
def test_constraint_zero_on_levels(mode, scale, ucs):
    lv = torch.tensor(cbp.levels(mode)) * torch.tensor([scale], dtype=torch.float32)
    assert torch.equal(cbp.constraint(lv, lv.new_tensor([scale]), mode, ucs), torch.zeros_like(lv))


@settings(max_examples=150, deadline=None)
@given(
    mode=st.sampled_from(MODES),
    scale=st.floats(min_value=1e-4, max_value=1e3),
    ucs=st.floats(min_value=0.0, max_value=1.0),
    ws=st.lists(st.floats(min_value=-1e4, max_value=1e4, width=32), min_size=1, max_size=32),
)
def test_constraint_nonnegative_and_bounded(mode, scale, ucs, ws):
    w = torch.tensor(ws, dtype=torch.float32)
    y = cbp.constraint(w, scale, mode, ucs)
    assert (y >= 0).all()
    # never more than 2 * distance to the nearest level (the ucs = 1 sawtooth)
    lv = torch.tensor(cbp.levels(mode), dtype=torch.float64) * scale
    dist = (w.double()[:, None] - lv[None, :]).abs().min(dim=1).values
    assert (y.double() <= 2 * dist * (1 + 1e-5) + 1e-6 * scale).all()


# ----------------------------------------------------------------------------- Lagrangian


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ucs", [0.0, 0.5, 0.9, 1.0])
def test_lagrangian_value_and_gradients(mode, ucs):
    g = torch.Generator().manual_seed(3)
    s = torch.tensor([0.07])
    w0 = torch.randn(6, 5, generator=g) * 0.09
    lam0 = torch.rand(6, 5, generator=g)

    w1, lam1 = w0.clone().requires_grad_(), lam0.clone().requires_grad_()
    lag = cbp.lagrangian(w1, lam1, s, mode, ucs)
    assert lag.dim() == 0 and lag.dtype == torch.float32
    lag.backward()

    w2, lam2 = w0.clone().requires_grad_(), lam0.clone().requires_grad_()
    y = cbp.constraint(w2, s, mode, ucs)
    ref = (lam2 * y).sum()
    ref.backward()

    assert lag.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(w1.grad, w2.grad, rtol=1e-6, atol=0)  # lam * Y'
    assert torch.allclose(lam1.grad, lam2.grad, rtol=1e-6, atol=0)  # Y
    assert torch.equal(lam1.grad, cbp.constraint(w0, s, mode, ucs))


def test_lagrangian_hand_value_and_partial_grads():
    w = torch.tensor([-0.75, -0.375, 0.0, 0.125], requires_grad=True)  # ter, s=0.5, ucs=0.5
    lam = torch.tensor([1.0, 2.0, 3.0, 4.0])
    lag = cbp.lagrangian(w, lam, 0.5, "ter", 0.5)  # Y = [0.5, 0.25, 0, 0.25]
    assert lag.item() == pytest.approx(1 * 0.5 + 2 * 0.25 + 4 * 0.25)
    lag.backward()
    assert torch.equal(w.grad, torch.tensor([-2.0, 0.0, 6.0, 0.0]))
    # lam with requires_grad only
    lam2 = lam.clone().requires_grad_()
    cbp.lagrangian(w.detach(), lam2, 0.5, "ter", 0.5).backward()
    assert torch.equal(lam2.grad, torch.tensor([0.5, 0.25, 0.0, 0.25]))


@pytest.mark.parametrize("mode", MODES)
def test_constraint_sum(mode):
    g = torch.Generator().manual_seed(11)
    w = torch.randn(40, 3, generator=g) * 0.2
    for ucs in (0.0, 0.5, 1.0):
        got = cbp.constraint_sum(w, 0.15, mode, ucs)
        assert got.dtype == torch.float32 and got.dim() == 0
        assert torch.equal(got, cbp.constraint(w, 0.15, mode, ucs).sum())  # float32, as CFS
    # default ucs is 1 (the CFS metric)
    assert cbp.constraint_sum(w, 0.15, mode) == cbp.constraint_sum(w, 0.15, mode, 1.0)


def test_constraint_sum_hand_value():
    w = torch.tensor([0.125, -0.375, 0.75, 0.25])  # ter, s=0.5, ucs=1: 0.25 + 0.25 + 0.5 + 0.5
    assert cbp.constraint_sum(w, 0.5, "ter") == 1.5


# --------------------------------------------------------------------------- fused kernel


def _lagrangian_with(flag: str, w, lam, scale, mode, ucs, monkeypatch, lam_grad=False):
    """(value, weight gradient[, lambda gradient]) with CBP_FUSED=flag."""
    monkeypatch.setenv("CBP_FUSED", flag)
    wr = w.clone().requires_grad_()
    lr = lam.clone().requires_grad_(lam_grad)
    value = cbp.lagrangian(wr, lr, scale, mode, ucs)
    value.backward()
    return (value.detach(), wr.grad) + ((lr.grad,) if lam_grad else ())


def _edge_weights(mode, ucs, scale, n, seed):
    """Random weights plus every slope edge and the float just below it."""
    from cbp.functional import _plan

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g) * scale
    e = torch.tensor([v for v, _ in _plan(mode, scale, ucs, torch.float32)[0]])
    w[: len(e)] = e
    w[len(e): 2 * len(e)] = torch.nextafter(e, torch.full_like(e, -1.0))
    return w, torch.rand(n, generator=g) * 1e-3


def test_fused_kernel_falls_back_when_it_cannot_be_built(monkeypatch):
    """A kernel that fails to build warns once and leaves the chunked operations' values."""
    from cbp import functional

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    w, lam = _edge_weights("ter", 0.5, 0.01, 4000, 0)
    want = _lagrangian_with("0", w, lam, 0.01, "ter", 0.5, monkeypatch)
    monkeypatch.setitem(functional._fused_state, "fn", broken)
    monkeypatch.setitem(functional._fused_state, "failed", False)
    with pytest.warns(RuntimeWarning, match="fused constraint kernel unavailable"):
        got = _lagrangian_with("1", w, lam, 0.01, "ter", 0.5, monkeypatch)
    assert functional._fused_state["failed"]
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_fused_kernel_is_used_only_where_wanted(monkeypatch):
    from cbp import functional

    monkeypatch.setitem(functional._fused_state, "failed", False)
    cpu = torch.device("cpu")
    monkeypatch.setenv("CBP_FUSED", "0")
    assert not functional._fused_wanted(1 << 24, cpu, None)
    monkeypatch.setenv("CBP_FUSED", "auto")
    assert not functional._fused_wanted(functional.FUSED_MIN_NUMEL - 1, cpu, None)
    assert not functional._fused_wanted(1 << 24, cpu, ((0.0,), (1.0,)))  # rounded slopes
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("PATH", "")
    assert not functional._fused_wanted(1 << 24, cpu, None)  # no compiler on this machine


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["bin", "ter"])
def test_fused_kernel_is_bit_identical(mode, monkeypatch):
    """The compiled kernel gives the chunked operations' sum(lam * Y), lam * Y' and (when
    lambda takes a gradient) Y bit for bit, weights on every window edge included."""
    for i, ucs in enumerate([0.0, 0.5, 2 / 3, 0.9, 0.95, 1.0]):
        w, lam = _edge_weights(mode, ucs, 0.01, 30_000, i)
        for lam_grad in (False, True):
            want = _lagrangian_with("0", w, lam, 0.01, mode, ucs, monkeypatch, lam_grad)
            got = _lagrangian_with("1", w, lam, 0.01, mode, ucs, monkeypatch, lam_grad)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (ucs, lam_grad)
