"""Level sets, the straight-through quantizer and the quantized layers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import cbp

S = 0.5  # dyadic scale: every level, midpoint and hand value below is exact in float32

# ----------------------------------------------------------------------------- levels / bits


@pytest.mark.parametrize(
    "mode, expected, nbits",
    [
        ("bin", [-1.0, 1.0], 1),
        ("ter", [-1.0, 0.0, 1.0], 2),
        ("1bit", [-1.0, -0.5, 0.0, 0.5, 1.0], 3),
        ("2bit", [-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0], 3),
    ],
)
def test_levels_and_bits_match_table(mode, expected, nbits):
    assert cbp.levels(mode) == expected
    assert cbp.bits(mode) == nbits


def test_modes_are_exactly_the_four_table_modes():
    assert set(cbp.MODES) == {"bin", "ter", "1bit", "2bit"}


def test_levels_returns_a_fresh_list():
    got = cbp.levels("ter")
    got.append(7.0)
    got[0] = 99.0
    assert cbp.levels("ter") == [-1.0, 0.0, 1.0]


@pytest.mark.parametrize("fn", [cbp.levels, cbp.bits, cbp.check_mode])
@pytest.mark.parametrize("bad", ["quad", "BIN", "", "3bit"])
def test_unknown_mode_names_every_valid_mode(fn, bad):
    with pytest.raises(ValueError) as info:
        fn(bad)
    msg = str(info.value)
    for mode in ("bin", "ter", "1bit", "2bit"):
        assert mode in msg


def test_levelset_midpoints_and_gaps():
    ls = cbp.LevelSet.of("2bit")
    assert ls.levels == (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0)
    assert ls.mids == (-0.75, -0.375, -0.125, 0.125, 0.375, 0.75)
    assert ls.gaps == (0.5, 0.25, 0.25, 0.25, 0.25, 0.5)


# ----------------------------------------------------------------------------- quantize values

# (input, expected output) with scale 0.5; midpoints map to the midpoint (sign(0) = 0).
HAND = {
    "bin": [
        (-3.0, -0.5), (-0.5, -0.5), (-0.3125, -0.5), (-2.0**-20, -0.5), (0.0, 0.0),
        (2.0**-20, 0.5), (0.25, 0.5), (0.5, 0.5), (0.75, 0.5), (3.0, 0.5),
    ],
    "ter": [
        (-2.0, -0.5), (-0.5, -0.5), (-0.375, -0.5), (-0.25, -0.25), (-0.125, 0.0),
        (0.0, 0.0), (0.125, 0.0), (0.25, 0.25), (0.375, 0.5), (0.5, 0.5), (2.0, 0.5),
    ],
    "1bit": [
        (-1.0, -0.5), (-0.5, -0.5), (-0.4375, -0.5), (-0.375, -0.375), (-0.3125, -0.25),
        (-0.25, -0.25), (-0.1875, -0.25), (-0.125, -0.125), (-0.0625, 0.0), (0.0, 0.0),
        (0.0625, 0.0), (0.125, 0.125), (0.1875, 0.25), (0.25, 0.25), (0.3125, 0.25),
        (0.375, 0.375), (0.4375, 0.5), (0.5, 0.5), (1.0, 0.5),
    ],
    "2bit": [
        (-0.75, -0.5), (-0.5, -0.5), (-0.4375, -0.5), (-0.375, -0.375), (-0.3125, -0.25),
        (-0.25, -0.25), (-0.1875, -0.1875), (-0.15625, -0.125), (-0.125, -0.125),
        (-0.0625, -0.0625), (-0.03125, 0.0), (0.0, 0.0), (0.03125, 0.0), (0.0625, 0.0625),
        (0.09375, 0.125), (0.125, 0.125), (0.1875, 0.1875), (0.21875, 0.25), (0.25, 0.25),
        (0.375, 0.375), (0.4375, 0.5), (0.5, 0.5), (0.75, 0.5),
    ],
}


@pytest.mark.parametrize("mode", sorted(HAND))
@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
def test_quantize_hand_values(mode, scale_kind):
    w = torch.tensor([a for a, _ in HAND[mode]])
    expected = torch.tensor([b for _, b in HAND[mode]])
    scale = S if scale_kind == "float" else torch.tensor([S])
    assert torch.equal(cbp.quantize(w, scale, mode), expected)


@pytest.mark.parametrize("mode", sorted(HAND))
def test_quantize_levels_are_fixed_points_and_midpoints_map_to_midpoints(mode):
    ls = cbp.LevelSet.of(mode)
    lv = torch.tensor(ls.levels) * S
    mids = torch.tensor(ls.mids) * S
    assert torch.equal(cbp.quantize(lv, S, mode), lv)
    assert torch.equal(cbp.quantize(mids, S, mode), mids)
    far = torch.tensor([-1e6, -1.0 - 1e-3, 1.0 + 1e-3, 1e6]) * S
    assert torch.equal(cbp.quantize(far, S, mode), torch.tensor([-S, -S, S, S]))


def test_quantize_keeps_shape_and_dtype():
    w = torch.tensor([[0.3, -0.1], [0.0, 2.0]], dtype=torch.float64)
    out = cbp.quantize(w, 0.5, "ter")
    assert out.dtype == torch.float64 and out.shape == (2, 2)
    assert torch.equal(out, torch.tensor([[0.5, 0.0], [0.0, 0.5]], dtype=torch.float64))


def test_quantize_unknown_mode_raises():
    with pytest.raises(ValueError):
        cbp.quantize(torch.ones(3), 0.5, "nope")


@pytest.mark.parametrize("mode", sorted(HAND))
def test_straight_through_gradient(mode):
    torch.manual_seed(0)
    w = (torch.randn(64) * 0.7).requires_grad_()
    scale = torch.tensor([0.4], requires_grad=True)
    up = torch.randn(64)
    cbp.quantize(w, scale, mode).backward(up)
    assert torch.equal(w.grad, up)  # unchanged, including outside [-s, s]
    assert scale.grad is None


# ----------------------------------------------------------------------------- property


@settings(max_examples=150, deadline=None)
@given(
    mode=st.sampled_from(["bin", "ter", "1bit", "2bit"]),
    scale=st.floats(min_value=1e-3, max_value=100.0),
    ws=st.lists(
        st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False),
        min_size=1,
        max_size=16,
    ),
)
def test_quantize_lands_on_nearest_level(mode, scale, ws):
    w = torch.tensor(ws, dtype=torch.float32)
    s = torch.tensor([scale], dtype=torch.float32)
    sf = float(s)
    lv = torch.tensor(cbp.levels(mode)) * s  # the float32 level values
    mids = [m * sf for m in cbp.LevelSet.of(mode).mids]
    for x in w.tolist():  # stay clear of midpoints (ties are tested by hand above)
        assume(all(abs(x - m) > 1e-5 * (sf + abs(x)) for m in mids))
    out = cbp.quantize(w, s, mode)
    lv64 = [float(v) for v in lv]
    for x, q in zip(w.tolist(), out.tolist()):
        assert q in lv64
        nearest = min(lv64, key=lambda v: abs(v - x))
        assert q == nearest
        assert math.isfinite(q)


# ----------------------------------------------------------------------------- layers


def _layers():
    torch.manual_seed(1)
    return [
        (cbp.QConv2d(3, 4, 3, stride=2, padding=1, bias=True, mode="ter"), torch.randn(2, 3, 7, 7)),
        (cbp.QConv2d(3, 4, 3, bias=False, mode="bin"), torch.randn(2, 3, 6, 6)),
        (cbp.QLinear(5, 3, bias=True, mode="1bit"), torch.randn(4, 5)),
        (cbp.QLinear(5, 3, mode="2bit"), torch.randn(4, 5)),
        (cbp.QConv3d(2, 3, (3, 3, 1), padding=(1, 1, 0), bias=True, mode="ter"), torch.randn(2, 2, 5, 5, 3)),
    ]


def _reference(layer, x):
    qw = cbp.quantize(layer.weight.detach(), layer.scale.detach(), layer.mode)
    if isinstance(layer, cbp.QLinear):
        return F.linear(x, qw, layer.bias)
    conv = F.conv2d if isinstance(layer, cbp.QConv2d) else F.conv3d
    return conv(x, qw, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


@pytest.mark.parametrize("idx", range(5))
def test_layer_state_dict_keys_and_frozen_scale(idx):
    layer, _ = _layers()[idx]
    keys = set(layer.state_dict())
    expected = {"weight", "scale"} | ({"bias"} if layer.bias is not None else set())
    assert keys == expected
    assert layer.scale.shape == (1,)
    assert layer.scale.requires_grad is False
    assert torch.allclose(layer.scale, layer.weight.detach().abs().mean().reshape(1))


@pytest.mark.parametrize("idx", range(5))
def test_layer_forward_uses_quantized_weight(idx):
    layer, x = _layers()[idx]
    out = layer(x)
    assert torch.allclose(out, _reference(layer, x), rtol=1e-6, atol=1e-6)
    assert torch.equal(layer.qweight, cbp.quantize(layer.weight, layer.scale, layer.mode))
    # the weights the forward uses are all on the level grid
    grid = torch.tensor(cbp.levels(layer.mode)) * layer.scale.detach()
    assert torch.isin(layer.qweight.detach(), grid).all()


@pytest.mark.parametrize("idx", range(5))
def test_layer_init_scale_is_mean_abs_weight(idx):
    layer, _ = _layers()[idx]
    with torch.no_grad():
        layer.weight.copy_(torch.full_like(layer.weight, 0.25))
        layer.weight.view(-1)[0] = -0.75  # mean |W| changes accordingly
    n = layer.weight.numel()
    layer.init_scale()
    expected = (0.25 * (n - 1) + 0.75) / n
    assert layer.scale.item() == pytest.approx(expected, rel=1e-6)
    assert layer.scale.requires_grad is False


@pytest.mark.parametrize("idx", range(5))
def test_layer_gradients_reach_weight_and_step_refreshes_forward(idx):
    layer, x = _layers()[idx]
    opt = torch.optim.SGD(p for p in layer.parameters() if p.requires_grad)
    with torch.no_grad():  # a cached no-grad forward must not break the next backward
        layer(x)
    out1 = layer(x)
    up = torch.randn_like(out1)
    out1.backward(up)
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert layer.scale.grad is None
    # STE: d(out)/d(weight) is what F.* gives for d(out)/d(qweight)
    qw = cbp.quantize(layer.weight.detach(), layer.scale.detach(), layer.mode).requires_grad_()
    if isinstance(layer, cbp.QLinear):
        ref = F.linear(x, qw, layer.bias)
    elif isinstance(layer, cbp.QConv2d):
        ref = F.conv2d(x, qw, layer.bias, layer.stride, layer.padding)
    else:
        ref = F.conv3d(x, qw, layer.bias, layer.stride, layer.padding)
    ref.backward(up)
    assert torch.allclose(layer.weight.grad, qw.grad, rtol=1e-5, atol=1e-6)

    before = layer.qweight.detach().clone()
    for group in opt.param_groups:
        group["lr"] = 10.0  # large step: many weights cross a midpoint
    opt.step()
    after = layer.qweight.detach()
    assert not torch.equal(before, after)
    assert torch.equal(after, cbp.quantize(layer.weight.detach(), layer.scale, layer.mode))
    out2 = layer(x)
    assert not torch.allclose(out1.detach(), out2.detach())
    assert torch.allclose(out2, _reference(layer, x), rtol=1e-6, atol=1e-6)


def test_layer_refreshes_after_manual_edit_and_load_state_dict():
    layer = cbp.QLinear(4, 2, mode="ter")
    x = torch.eye(4)
    with torch.no_grad():
        layer.weight.fill_(0.3)
        layer.scale.fill_(0.5)
    assert torch.equal(layer(x), torch.full((4, 2), 0.5))
    with torch.no_grad():
        layer.weight.fill_(-0.1)
    assert torch.equal(layer(x), torch.zeros(4, 2))
    sd = {"weight": torch.full((2, 4), -0.4), "scale": torch.tensor([0.25])}
    layer.load_state_dict(sd)
    assert torch.equal(layer(x), torch.full((4, 2), -0.25))


def test_layer_rejects_unknown_mode():
    with pytest.raises(ValueError):
        cbp.QLinear(3, 3, mode="4bit")
    with pytest.raises(ValueError):
        cbp.QConv2d(1, 1, 3, mode="quad")


def test_quantized_modules_in_registration_order():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), cbp.QConv2d(2, 2, 3), torch.nn.Flatten(), cbp.QLinear(8, 4),
        torch.nn.Linear(4, 2),
    )
    names = [n for n, _ in cbp.quantized_modules(model)]
    assert names == ["1", "3"]
