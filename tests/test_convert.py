"""cbp.convert: quantizing models we did not write (spikingjelly layers in both step modes,
plain torch Conv1d/3d/Linear, the STBP network), the layers kept fp32, errors, and CBP
training of a converted model."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pipelines import load_pipeline
from spikingjelly.activation_based import functional, layer, neuron
from torch import nn

import cbp

ROOT = Path(__file__).resolve().parents[1]


def sj_net(step_mode: str = "m") -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Conv2d(1, 6, 3, padding=1), neuron.IFNode(), layer.Conv2d(6, 8, 3, padding=1),
        neuron.IFNode(), layer.MaxPool2d(2), layer.Flatten(), layer.Linear(8 * 4 * 4, 16),
        neuron.IFNode(), layer.Linear(16, 3))
    functional.set_step_mode(net, step_mode)
    return net


def torch_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Conv1d(4, 4, 3), nn.ReLU(),
                         nn.Unflatten(1, (4, 1, 1)), nn.Conv3d(4, 5, 1), nn.Flatten(),
                         nn.Linear(5 * 6, 7), nn.ReLU(), nn.Linear(7, 2))


def quantized_copy(original: nn.Module, converted: nn.Module) -> nn.Module:
    """``original`` with the converted layers' weights replaced by their quantized values."""
    ref = copy.deepcopy(original)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for name, m in cbp.quantized_modules(converted):
            mods[name].weight.copy_(cbp.quantize(m.weight, m.scale, m.mode))
    return ref


@pytest.mark.parametrize("mode", ["bin", "ter", "2bit"])
@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_spikingjelly_layers_in_both_step_modes(mode, step_mode):
    original = sj_net(step_mode)
    model = cbp.convert(copy.deepcopy(original), mode)
    names = [n for n, _ in cbp.quantized_modules(model)]
    assert names == ["2", "6"]  # first conv and last linear stay fp32
    before, after = original.state_dict(), model.state_dict()
    assert set(after) - set(before) == {"2.scale", "6.scale"} and set(before) <= set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model[2].step_mode == step_mode and isinstance(model[2], layer.Conv2d)
    x = torch.rand(4, 2, 1, 8, 8) if step_mode == "m" else torch.rand(2, 1, 8, 8)
    ref = quantized_copy(original, model)
    with torch.no_grad():
        out, want = model(x), ref(x)
    functional.reset_net(model)
    functional.reset_net(ref)
    assert torch.equal(out, want)
    assert float(model[2].scale) == pytest.approx(float(original[2].weight.detach().abs().mean()))


def test_plain_torch_layers_hooks_and_straight_through_gradient():
    original = torch_net()
    model = copy.deepcopy(original)
    seen = []
    model[2].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    weight = model[2].weight
    cbp.convert(model, "ter")
    assert model[2].weight is weight  # same parameter object (an optimizer keeps working)
    assert [type(m).__name__ for _, m in cbp.quantized_modules(model)] == [
        "QConv1d", "QConv3d", "QLinear"]
    x = torch.randn(3, 2, 10)
    ref = quantized_copy(original, model)
    out = model(x)
    assert seen and torch.equal(out, ref(x))
    out.square().sum().backward()
    ref(x).square().sum().backward()
    for (name, m), r in zip(cbp.quantized_modules(model), (ref[2], ref[5], ref[7])):
        assert torch.equal(m.weight.grad, r.weight.grad), name  # straight-through


def test_stbp_network_converts_to_the_quantized_networks_keys():
    model, q_model = load_pipeline(ROOT / "CBP-QSNN-STBP", "model", "q_model")
    fp = model.Conv_SNN(10, 0.5, 0.5, 0.5, None, 2, 0.0625)
    q = q_model.Q_Conv_SNN(10, 0.5, 0.5, 0.5, None, 2, "bin", 0.0625)
    cbp.convert(fp, "bin")
    assert list(fp.state_dict()) == list(q.state_dict())
    fp.load_state_dict(q.state_dict())  # the authors' prequantized files load as they are


def test_skip_by_name_or_predicate_and_keep_first_last():
    m = cbp.convert(sj_net(), "bin", skip=["6"])
    assert [n for n, _ in cbp.quantized_modules(m)] == ["2"]
    m = cbp.convert(sj_net(), "bin", skip=lambda name, mod: isinstance(mod, nn.Linear))
    assert [n for n, _ in cbp.quantized_modules(m)] == ["2"]
    m = cbp.convert(sj_net(), "bin", keep_first_last=False)
    assert [n for n, _ in cbp.quantized_modules(m)] == ["0", "2", "6", "8"]


def test_errors():
    with pytest.raises(cbp.ConvertError, match="no nn.Conv1d/2d/3d or nn.Linear"):
        cbp.convert(nn.Sequential(nn.ReLU(), neuron.IFNode()), "bin")
    with pytest.raises(cbp.ConvertError, match="no layer left to quantize"):
        cbp.convert(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), "bin")
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    tied[2].weight = tied[1].weight
    with pytest.raises(cbp.ConvertError, match=r"shared \(1.weight, 2.weight\)"):
        cbp.convert(tied, "bin")
    with pytest.raises(ValueError, match="mode"):
        cbp.convert(sj_net(), "4bit")
    done = cbp.convert(sj_net(), "bin")
    with pytest.raises(cbp.ConvertError, match="no layer left"):
        cbp.convert(done, "ter", keep_first_last=False, skip=["0", "8"])  # only fp32 ones left


def test_cbp_trains_a_converted_model():
    model = cbp.convert(sj_net(), "ter")
    controller = cbp.CBP(model, 1e-2, period_max=1)
    assert [t.name for t in controller.targets] == ["2", "6"]
    controller.start()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(4, 8, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    before = model[2].weight.detach().clone()
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(x).mean(0), y)
        lag = controller.lagrangian(loss)
        opt.zero_grad()
        lag.backward()
        cbp.clip_gradients(model.parameters(), 1.0)
        opt.step()
        controller.clamp_()
        functional.reset_net(model)
        controller.end_epoch(opt)
    assert not torch.equal(model[2].weight, before) and controller.g == 3


@pytest.mark.slow
def test_example_on_the_spikingjelly_model_zoo(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "quantize_spikingjelly_zoo.py"),
                          "--modes", "bin", "--fp32_epochs", "1", "--cbp_epochs", "1",
                          "--channels", "4"], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith("| fp32") or ln.startswith("| bin")]
    assert len(rows) == 2
    for row in rows:
        _, acc, mbit, synops, macs, energy = (c.strip() for c in row.strip("| ").split("|"))
        # the first conv (1 -> 4 channels, 3x3, 28x28) sees the analog image at each of 4 steps
        assert macs == f"{9 * 4 * 28 * 28 * 4 / 1e6:.3f} M"
        s, m = float(synops.split()[0]) * 1e6, float(macs.split()[0]) * 1e6
        assert float(energy) == pytest.approx((0.9 * s + 4.6 * m) * 1e-6, abs=0.01)
