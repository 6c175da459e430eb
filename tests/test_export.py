import math
import os

import pytest
import torch
from torch import nn

import cbp
from cbp.export import (
    load_packed,
    pack_model,
    pack_state_dict,
    packed_nbytes,
    save_packed,
    unpack_state_dict,
    weight_memory_mbit,
)


def small_model(mode: str, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),  # fp32 first layer: 108 weights
        cbp.QConv2d(4, 8, 3, mode=mode, bias=True),  # 288 quantized weights
        nn.BatchNorm2d(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        cbp.QLinear(8, 16, mode=mode),  # 128 quantized weights
        nn.Linear(16, 10),  # fp32 classifier: 160 weights
    )
    with torch.no_grad():
        bn = model[2]
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return model.eval()


@pytest.mark.parametrize("mode", cbp.MODES)
def test_round_trip_is_bit_identical(mode):
    model = small_model(mode, seed=0)
    packed = pack_model(model)
    assert set(packed["quantized"]) == {"1.weight", "5.weight"}

    fresh = small_model(mode, seed=1)
    assert not torch.equal(fresh[1].quantized_weight(), model[1].quantized_weight())
    state = load_packed(packed, fresh)
    assert list(state) == list(model.state_dict())

    for i in (1, 5):
        assert torch.equal(fresh[i].quantized_weight(), model[i].quantized_weight())
        # the stored value itself is the quantized weight
        assert torch.equal(state[f"{i}.weight"], model[i].quantized_weight())
        assert torch.equal(fresh[i].scale, model[i].scale)
    for key, value in model.state_dict().items():
        if key not in packed["quantized"]:
            assert torch.equal(state[key], value), key

    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("mode", cbp.MODES)
@pytest.mark.parametrize("numel", [1, 13, 288, 3700])
def test_codes_use_bits_per_weight(mode, numel):
    torch.manual_seed(numel)
    w = torch.randn(numel)
    packed = pack_state_dict({"w": w}, {"w": (0.7, mode)})
    entry = packed["quantized"]["w"]
    nbits = {"bin": 1, "ter": 2, "1bit": 3, "2bit": 3}[mode]
    assert entry["codes"].dtype == torch.uint8
    assert entry["codes"].numel() == nbits * math.ceil(numel / 8)
    assert entry["exc_index"].numel() == 0
    # codes + 4-byte float32 scale, nothing else
    assert packed_nbytes(packed) == nbits * math.ceil(numel / 8) + 4
    assert torch.equal(unpack_state_dict(packed)["w"], cbp.quantize(w, 0.7, mode))


@pytest.mark.parametrize("mode", cbp.MODES)
def test_midpoints_round_trip_through_exceptions(mode):
    torch.manual_seed(3)
    scale = torch.tensor([0.37])
    w = torch.randn(6, 5)
    mids = cbp.LevelSet.of(mode).mids
    planted = torch.tensor(mids, dtype=torch.float32) * scale
    flat_idx = torch.arange(len(mids)) * 3
    w.view(-1)[flat_idx] = planted
    ref = cbp.quantize(w, scale, mode)
    # the sign rule keeps midpoints, which are not levels
    assert torch.equal(ref.view(-1)[flat_idx], planted)

    packed = pack_state_dict({"layer.weight": w}, {"layer.weight": (scale, mode)})
    entry = packed["quantized"]["layer.weight"]
    assert torch.equal(entry["exc_index"], flat_idx)
    assert entry["exc_value"].dtype == torch.float32
    out = unpack_state_dict(packed)["layer.weight"]
    assert out.shape == w.shape
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))


def test_bin_negative_zero_is_exact():
    w = torch.tensor([-0.0, 0.0, 0.5, -0.5])
    ref = cbp.quantize(w, 1.0, "bin")
    out = unpack_state_dict(pack_state_dict({"w": w}, {"w": (1.0, "bin")}))["w"]
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))


def test_codes_by_hand():
    # ter, scale 1: levels [-1, 0, 1], midpoints -0.5 / 0.5
    w = torch.tensor([-0.9, -0.2, 0.3, 0.7])
    packed = pack_state_dict({"w": w}, {"w": (1.0, "ter")})
    assert torch.equal(cbp.quantize_codes(w, 1.0, "ter"), torch.tensor([0, 1, 1, 2]).byte())
    # codes [0, 1, 1, 2]: bit 0 = 0110 -> 0b01100000 = 96, bit 1 = 0001 -> 0b00010000 = 16
    assert packed["quantized"]["w"]["codes"].tolist() == [[96], [16]]
    assert unpack_state_dict(packed)["w"].tolist() == [-1.0, 0.0, 0.0, 1.0]

    # 2bit, scale 2: levels 2 * [-1, -.5, -.25, 0, .25, .5, 1]
    w = torch.tensor([-1.9, -0.6, 0.3, 1.2, 0.1])
    packed = pack_state_dict({"w": w}, {"w": (2.0, "2bit")})
    # codes [0, 2, 4, 5, 3]: bit 0 = 00011 -> 24, bit 1 = 01001 -> 72, bit 2 = 00110 -> 48
    assert packed["quantized"]["w"]["codes"].tolist() == [[24], [72], [48]]
    assert unpack_state_dict(packed)["w"].tolist() == [-2.0, -0.5, 0.5, 1.0, 0.0]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        # fp32: (108 + 160) * 32 = 8576; quantized: (288 + 128) * bits
        ("bin", (8576 + 416 * 1) / 1e6),
        ("ter", (8576 + 416 * 2) / 1e6),
    ],
)
def test_weight_memory_small(mode, expected):
    model = small_model(mode, seed=0)
    assert weight_memory_mbit(model) == pytest.approx(expected, rel=1e-12)
    assert weight_memory_mbit(packed=pack_model(model)) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError):
        weight_memory_mbit()


def test_weight_memory_vgg16_cifar10():
    cfg = [64, 64, "P", 128, 128, "P", 256, 256, 256, "P", 512, 512, 512, "P", 512, 512, 512, "P"]
    layers, c = [], 3
    with torch.device("meta"):
        for v in cfg:
            if v == "P":  # average pooling as a fixed depthwise 2x2 conv: 4 * C weights
                layers.append(nn.Conv2d(c, c, 2, stride=2, groups=c, bias=False))
            elif c == 3:
                layers.append(nn.Conv2d(c, v, 3, padding=1, bias=False))
                c = v
            else:
                layers.append(cbp.QConv2d(c, v, 3, padding=1, mode="bin"))
                c = v
        layers.append(nn.Linear(512, 10))
        model = nn.Sequential(*layers)
    qbits = sum(m.weight.numel() for _, m in cbp.quantized_modules(model))
    assert qbits == 14_708_736
    # 14,708,736 + 32 * (1,728 + 5,120 + 4 * 1,472) = 15,116,288 bits
    assert weight_memory_mbit(model) == pytest.approx(15.116288, rel=1e-12)


def test_save_and_load_file(tmp_path):
    model = small_model("ter", seed=0)
    path = save_packed(model, tmp_path / "model.pt")
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]

    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "cbp-packed"
    assert packed_nbytes(raw) < sum(
        t.numel() * t.element_size() for t in model.state_dict().values()
    )

    fresh = small_model("ter", seed=5)
    load_packed(path, fresh)
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))

    # saving a packed dict and overwriting keeps a single file
    save_packed(raw, path)
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]
    assert torch.equal(load_packed(path)["1.weight"], model[1].quantized_weight())


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle")


def test_failed_save_leaves_target_and_no_temp(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"old")
    bad = dict(pack_model(small_model("bin", seed=0)))
    bad["extra"] = _Unpicklable()
    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_packed(bad, path)
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]
    assert path.read_bytes() == b"old"


def test_rejects_unknown_input():
    with pytest.raises(KeyError):
        pack_state_dict({"a": torch.zeros(2)}, {"b": (1.0, "bin")})
    with pytest.raises(ValueError):
        unpack_state_dict({"format": "other"})
