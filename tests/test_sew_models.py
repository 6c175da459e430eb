"""SEW-ResNet pipelines (CBP-QSNN-SEW-ResNet/): the six networks' state-dict keys, shapes and
sizes against the reference, the spikingjelly neurons' maths, the SEW connect functions and
loading of upstream-format fp32 checkpoints."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import cbp

pytest.importorskip("spikingjelly")  # the GPU check collects this file without it
SEW_DIR = Path(__file__).resolve().parents[1] / "CBP-QSNN-SEW-ResNet"
if str(SEW_DIR) not in sys.path:
    sys.path.insert(0, str(SEW_DIR))

from firing import no_tf32, spike_rates, thresholds_from_inputs  # noqa: E402
from sewcommon import engine, neurons  # noqa: E402
from sewcommon.dvsnets import DVS128_LAYERS, ResNetN  # noqa: E402
from spikingjelly.activation_based.neuron import ParametricLIFNode  # noqa: E402


def load(name: str, rel: str):
    spec = importlib.util.spec_from_file_location(name, SEW_DIR / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


DVS_Q = load("sew_dvs_q_smodels", "DVS128Gesture/q_smodels.py")
DVS_F = load("sew_dvs_smodels", "DVS128Gesture/smodels.py")
C10_Q = load("sew_c10_q_smodels", "CIFAR10DVS/q_smodels.py")
C10_F = load("sew_c10_smodels", "CIFAR10DVS/smodels.py")
IN_Q = load("sew_in_q_sew_resnet", "ImageNet/q_sew_resnet.py")
IN_F = load("sew_in_sew_resnet", "ImageNet/sew_resnet.py")


pytestmark = pytest.mark.usefixtures("one_thread")


def sizes(model: nn.Module) -> tuple[int, int, int]:
    """(total parameters, quantized weights, number of quantized layers)."""
    q = cbp.quantized_modules(model)
    return (sum(p.numel() for p in model.parameters()), sum(m.weight.numel() for _, m in q), len(q))


def without_scale(keys) -> list[str]:
    return [k for k in keys if not k.endswith(".scale")]


# ----------------------------------------------------------------------------- DVS nets
def test_dvs128_keys_and_sizes():
    q = DVS_Q.SEWResNet("ADD", "bin")
    f = DVS_F.SEWResNet("ADD")
    assert sizes(q) == (130_952, 129_024, 14)
    sd = q.state_dict()
    assert sd["conv.0.0.0.weight"].shape == (32, 2, 3, 3)  # fp32 3x3 first layer
    assert "conv.0.0.0.scale" not in sd
    assert sd["conv.0.1.w"].shape == () and float(sd["conv.0.1.w"]) == 0.0  # init_tau 2
    for i in range(1, 14, 2):
        for j in (0, 1):
            assert sd[f"conv.{i}.conv.{j}.0.0.weight"].shape == (32, 32, 3, 3)
            assert sd[f"conv.{i}.conv.{j}.0.0.scale"].shape == (1,)
            assert f"conv.{i}.conv.{j}.0.1.running_var" in sd
            assert f"conv.{i}.conv.{j}.1.w" in sd
    assert sd["out.weight"].shape == (11, 32) and sd["out.bias"].shape == (11,)
    assert sum(k.endswith(".w") for k in sd) == 15
    assert list(f.state_dict()) == without_scale(sd)
    assert sizes(f)[1:] == (0, 0)


def test_cifar10dvs_keys_and_sizes():
    q = C10_Q.SEWResNet("ADD", "ter")
    assert sizes(q) == (1_258_793, 1_253_376, 15)
    sd = q.state_dict()
    assert sd["conv.0.0.0.weight"].shape == (64, 2, 3, 3) and "conv.0.0.0.scale" not in sd
    assert sd["conv.9.0.0.weight"].shape == (128, 64, 3, 3)  # quantized 3x3 transition
    assert "conv.9.0.0.scale" in sd and "conv.9.1.w" in sd
    assert sd["out.weight"].shape == (10, 128)
    assert sum(k.endswith(".w") for k in sd) == 16
    assert list(C10_F.SEWResNet("ADD").state_dict()) == without_scale(sd)


@pytest.mark.parametrize("builder,counts,blocks", [
    ("sew_resnet18", (11_689_531, 11_157_504, 19), [2, 2, 2, 2]),
    ("sew_resnet34", (21_797_707, 21_258_240, 35), [3, 4, 6, 3]),
])
def test_imagenet_keys_and_sizes(builder, counts, blocks):
    with torch.device("meta"):
        q = getattr(IN_Q, builder)(T=4, connect_f="ADD", mode="bin")
        f = getattr(IN_F, builder)(T=4, connect_f="ADD")
    assert sizes(q) == counts
    sd = q.state_dict()
    assert sd["conv1.weight"].shape == (64, 3, 7, 7) and "conv1.scale" not in sd
    assert "bn1.running_mean" in sd and sd["fc.weight"].shape == (1000, 512)
    for L, n in enumerate(blocks, start=1):
        for b in range(n):
            for c in (1, 2):
                assert f"layer{L}.{b}.conv{c}.0.scale" in sd
                assert f"layer{L}.{b}.conv{c}.1.running_var" in sd
    for L, planes in ((2, 128), (3, 256), (4, 512)):
        assert sd[f"layer{L}.0.downsample.0.0.weight"].shape == (planes, planes // 2, 1, 1)
        assert f"layer{L}.0.downsample.0.0.scale" in sd
    assert "layer1.0.downsample.0.0.weight" not in sd
    assert list(f.state_dict()) == without_scale(sd)
    assert not any(re.search(r"\.module\.", k) for k in sd)


def test_modes_and_width():
    for mode in cbp.MODES:
        m = DVS_Q.SEWResNet("IAND", mode, width=0.125)
        assert {mm.mode for _, mm in cbp.quantized_modules(m)} == {mode}
        assert m.state_dict()["conv.1.conv.0.0.0.weight"].shape == (4, 4, 3, 3)
    with pytest.raises(ValueError, match="unknown quantization mode"):
        DVS_Q.SEWResNet("ADD", "4bit")
    # the reference's BasicBlock used a QConv2d even for the fp32 net
    assert sizes(DVS_Q.SpikingResNet(None, width=0.25))[1:] == (0, 0)
    assert sizes(DVS_Q.SpikingResNet("bin", width=0.25))[2] == 14


def test_forward_shapes_and_reset():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 2, 128, 128)
    m = DVS_Q.SEWResNet("ADD", "ter", width=0.125).eval()
    first = m.conv[0][1]
    with torch.no_grad():
        a = m(x)
        assert isinstance(first.v, torch.Tensor) and first.v.shape == (2, 4, 128, 128)
        neurons.reset_net(m)
        assert not isinstance(first.v, torch.Tensor) and first.v == 0.0
        b = m(x)
    assert a.shape == (2, 11) and torch.equal(a, b)
    im = IN_Q.sew_resnet18(T=2, connect_f="AND", mode="bin", width=1 / 16).eval()
    with torch.no_grad():
        assert im(torch.rand(2, 3, 32, 32)).shape == (2, 1000)


def test_zero_init_residual():
    m = IN_Q.sew_resnet18(T=1, connect_f="AND", mode="bin", width=1 / 16, zero_init_residual=True)
    bn = m.layer1[0].conv2[1]
    assert torch.all(bn.weight == 0) and torch.all(bn.bias == 1)


# ----------------------------------------------------------------------------- neurons
def test_plif_and_if_dynamics():
    n = neurons.plif()
    x = torch.tensor([[1.5, 2.5, 0.5, 2.0]] * 2)  # [T=2, 4 neurons]
    s = n(x)
    # v1 = x/2 = (.75, 1.25, .25, 1.0) -> fire at >= 1; v2 = v1 + (x - v1)/2 after hard reset
    assert s.tolist() == [[0, 1, 0, 1], [1, 1, 0, 1]]
    neurons.reset_net(n)
    i = neurons.if_node()
    assert i(torch.tensor([[0.6], [0.6], [0.6]])).flatten().tolist() == [0, 1, 0]
    # ATan surrogate: d spike / d v at v = threshold is alpha/2 = 1
    v = torch.tensor([1.0], requires_grad=True)
    neurons.reset_net(i)
    i(v.view(1, 1)).sum().backward()
    assert v.grad.item() == pytest.approx(1.0)


def test_connect_functions():
    out, idt = torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert neurons.connect("ADD", out, idt).tolist() == [0, 1, 1, 2]
    assert neurons.connect("AND", out, idt).tolist() == [0, 0, 0, 1]
    assert neurons.connect("IAND", out, idt).tolist() == [0, 0, 1, 0]
    with pytest.raises(NotImplementedError):
        neurons.connect(None, out, idt)


# ----------------------------------------------------------------------------- checkpoints
def test_upstream_checkpoint_loads_into_quantized_model(tmp_path):
    """sew18_checkpoint_319.pth style: {'model': old '.module' keys, 'args': Namespace, ...}."""
    f = IN_F.sew_resnet18(T=1, connect_f="ADD", width=1 / 16)
    old = {re.sub(r"(conv\d|downsample\.0)\.(\d)\.", r"\1.module.\2.", k): v
           for k, v in f.state_dict().items()}
    assert "layer1.0.conv1.module.0.weight" in old
    path = tmp_path / "sew18_checkpoint_319.pth"
    torch.save({"model": old, "args": argparse.Namespace(lr=0.1), "epoch": 319}, path)
    q = IN_Q.sew_resnet18(T=1, connect_f="ADD", mode="bin", width=1 / 16)
    engine.load_pretrained(q, str(path), "hint")
    w = f.layer2[0].conv1[0].weight
    assert torch.equal(q.layer2[0].conv1[0].weight, w)
    torch.save({"model": {**old, "extra.weight": torch.zeros(1)}}, path)
    with pytest.raises(cbp.checkpoint.CheckpointError, match="unexpected keys: extra.weight"):
        engine.load_pretrained(q, str(path), "hint")


def test_missing_pretrained_is_user_error(tmp_path):
    q = DVS_Q.SEWResNet("ADD", "bin", width=0.125)
    with pytest.raises(cbp.runtime.UserError, match="not found: make it"):
        engine.load_pretrained(q, str(tmp_path / "none.pth"), "make it")


def test_resnetn_linear_follows_input_size():
    m = ResNetN(DVS128_LAYERS, 11, "ADD", "bin", in_size=256)
    assert m.out.in_features == 4 * 32


def _one_amp_step(reference_clip: bool) -> float:
    """Largest weight change of one CBP step under AMP (CPU: bf16 autocast, GradScaler)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), cbp.QLinear(8, 3, mode="bin"))
    controller = cbp.CBP(model, 0.01)
    controller.start()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 8) * 10, torch.tensor([0, 1, 2, 0])
    s = engine.Settings(epochs=1, lr=0.1, amp=True, amp_reference_clip=reference_clip, show=False)
    before = model[1].weight.detach().clone()
    trainer = engine.step_trainer(model, opt, controller, torch.device("cpu"), s)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    trainer.train_one_epoch([(x, y)])
    return float((model[1].weight.detach() - before).abs().max())


def test_amp_unscales_before_clipping():
    # true gradients are O(1): clipped at 1 then stepped with lr 0.1
    assert 1e-2 < _one_amp_step(False) <= 0.1 + 1e-6
    # the reference clipped the scaled gradients: every element moves by at most lr / 2**16
    assert _one_amp_step(True) <= 0.1 / 2**16 * 1.01


def plif_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ParametricLIFNode)]


def firing_sew(seed: int = 0):
    """The DVS128 7B-Net (width 1/4) and an input on which all 15 PLIF layers fire:
    thresholds set from the currents each layer sees."""
    torch.manual_seed(seed)
    model = DVS_Q.SEWResNet("ADD", "bin", width=0.25).eval()
    x = torch.rand(2, 4, 2, 128, 128) * 3

    def run():
        model(x)
        neurons.reset_net(model)

    thresholds_from_inputs(plif_layers(model), run)
    return model, x


def test_device_comparison_input_fires_every_plif_layer():
    """The GPU test below compares devices on this input: no layer may be silent."""
    model, x = firing_sew()
    rates = spike_rates(model, plif_layers(model), lambda: model(x))
    assert len(rates) == 15
    assert all(0.02 < r < 0.5 for r in rates.values()), rates


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_amp_step():
    cpu, x = firing_sew()
    layers = plif_layers(cpu)
    cpu_rates = spike_rates(cpu, layers, lambda: cpu(x))
    neurons.reset_net(cpu)
    with torch.no_grad():
        want = cpu(x)
    neurons.reset_net(cpu)
    gpu = copy.deepcopy(cpu).cuda().eval()
    with no_tf32(), torch.no_grad():
        gpu_rates = spike_rates(gpu, plif_layers(gpu), lambda: gpu(x.cuda()))
        neurons.reset_net(gpu)
        got = gpu(x.cuda()).cpu()
    assert all(r > 0.02 for r in gpu_rates.values()), gpu_rates
    for name in cpu_rates:  # a rounding difference may flip a rare spike, no more
        assert abs(gpu_rates[name] - cpu_rates[name]) <= 1e-3, name
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    neurons.reset_net(gpu)
    gpu.train()
    controller = cbp.CBP(gpu, 0.01)
    controller.start()
    opt = torch.optim.SGD(gpu.parameters(), lr=0.1, momentum=0.9)
    s = engine.Settings(epochs=1, lr=0.1, amp=True, show=False)
    y = torch.tensor([0, 5])
    trainer = engine.step_trainer(gpu, opt, controller, torch.device("cuda"), s)
    loss = trainer.train_one_epoch([(x, y)]).train_loss
    assert np.isfinite(loss)
    assert all(lam.is_cuda for lam in controller.lambdas)
    assert all(float(t.weight.abs().max()) <= 1.0 for t in controller.targets)


def test_optimizer_groups_momentum_and_weight_decay():
    m = DVS_Q.SEWResNet("ADD", "bin", width=0.125)
    s = engine.Settings(epochs=1, lr=0.1, momentum=0.5, weight_decay=1e-4)
    opt = engine.build_optimizer(m, s)
    assert isinstance(opt, torch.optim.SGD)
    assert [len(g["params"]) for g in opt.param_groups] == [14, 2, 15 + 2 * 15 + 1]
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 1e-4, 0.0]
    assert {g["momentum"] for g in opt.param_groups} == {0.5}
    scales = {id(mm.scale) for _, mm in cbp.quantized_modules(m)}
    assert not scales & {id(p) for g in opt.param_groups for p in g["params"]}
    s.adam = True
    assert isinstance(engine.build_optimizer(m, s), torch.optim.Adam)


def test_cifar10dvs_split_and_cache(tmp_path, monkeypatch):
    from sewcommon import data

    assert data.split_per_class([0] * 11 + [1] * 3, 0.9, 2) == (
        list(range(10)) + [11, 12, 13], [10])  # ceil(9.9) = 10, ceil(2.7) = 3
    fake = list(range(20))
    fake_ds = type("Fake", (list,), {"targets": [0] * 10 + [1] * 10})(fake)
    monkeypatch.setattr(data, "cifar10dvs_full", lambda root, T: fake_ds)
    cache = tmp_path / "cache"
    train, test = data.cifar10dvs(str(tmp_path / "a"), 4, str(cache))
    assert test.indices == [9, 19] and len(train.indices) == 18
    saved = torch.load(cache / "test_set_4.pt", weights_only=True)
    assert saved["root"] == str(tmp_path / "a")
    torch.save({**saved, "indices": [0]}, cache / "test_set_4.pt")
    assert data.cifar10dvs(str(tmp_path / "a"), 4, str(cache))[1].indices == [0]  # reused
    # another data folder does not reuse the cache (the reference keyed it on T only)
    assert data.cifar10dvs(str(tmp_path / "b"), 4, str(cache))[1].indices == [9, 19]


def test_event_integration_threads_on_racy_interpreters(monkeypatch):
    from sewcommon import data
    from spikingjelly import configure

    assert not data._ast_thread_safe((3, 11, 7))
    assert data._ast_thread_safe((3, 11, 8)) and data._ast_thread_safe((3, 13, 0))
    assert not data._ast_thread_safe((3, 12, 1)) and data._ast_thread_safe((3, 12, 2))
    monkeypatch.setattr(configure, "max_threads_number_for_datasets_preprocess", 16)
    monkeypatch.setattr(data, "_ast_thread_safe", lambda: False)
    monkeypatch.setenv("SJ_MAX_THREADS_NUMBER_FOR_DATASETS_PREPROCESS", "8")
    data._spikingjelly_preprocess_threads()
    assert configure.max_threads_number_for_datasets_preprocess == 16  # the user's choice
    monkeypatch.delenv("SJ_MAX_THREADS_NUMBER_FOR_DATASETS_PREPROCESS")
    data._spikingjelly_preprocess_threads()
    assert configure.max_threads_number_for_datasets_preprocess == 1
