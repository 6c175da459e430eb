"""SNN-Calibration pipeline (CBP-QSNN-SNN-Calibration/): model layout against the spec, BN
folding, the IF neuron, ANN->SNN conversion, threshold search, light/advanced calibration,
threshold normalisation and the quantized spiking network."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import rawdata
import torch
from torch import nn

CAL_DIR = Path(__file__).resolve().parents[1] / "CBP-QSNN-SNN-Calibration"
if str(CAL_DIR) not in sys.path:
    sys.path.insert(0, str(CAL_DIR))
for _name in ("data", "data.autoaugment"):  # make sure ``data`` is this pipeline's package
    _mod = sys.modules.get(_name)
    if _mod is not None and not str(getattr(_mod, "__file__", "") or "").startswith(str(CAL_DIR)):
        del sys.modules[_name]

import calib_engine as E  # noqa: E402
from CIFAR.models.calibration import (  # noqa: E402
    GetLayerInputOutput,
    bias_corr_model,
    weights_cali_layer,
)
from CIFAR.models.fold_bn import search_fold_and_remove_bn  # noqa: E402
from CIFAR.models.q_spiking_layer import SpikeModel_q, spikeAct  # noqa: E402
from CIFAR.models.q_vgg import VGG_q  # noqa: E402
from CIFAR.models.spiking_layer import (  # noqa: E402
    SpikeModel,
    SpikeModule,
    clip_floor,
    find_threshold_mse,
    get_maximum_activation,
)
from CIFAR.models.utils import StraightThrough  # noqa: E402
from CIFAR.models.vgg import VGG  # noqa: E402
from firing import no_tf32, spike_rates, thresholds_from_outputs  # noqa: E402

from cbp import quantized_modules  # noqa: E402

CONV_IDX = [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]
POOL_IDX = [6, 13, 23, 33, 43]
CHANNELS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


pytestmark = pytest.mark.usefixtures("one_thread")


def on_meta(fn):
    try:
        with torch.device("meta"):
            return fn()
    except (NotImplementedError, RuntimeError):
        return fn()


def expected_ann(num_class: int, use_bn: bool) -> dict[str, tuple]:
    want: dict[str, tuple] = {}
    cin = 3
    pools = iter(POOL_IDX)
    for k, (i, c) in enumerate(zip(CONV_IDX, CHANNELS)):
        want[f"features.{i}.weight"] = (c, cin, 3, 3)
        want[f"features.{i}.bias"] = (c,)
        if use_bn:
            for s in ("weight", "bias", "running_mean", "running_var"):
                want[f"features.{i + 1}.{s}"] = (c,)
            want[f"features.{i + 1}.num_batches_tracked"] = ()
        cin = c
        if k in (1, 3, 6, 9, 12):
            want[f"features.{next(pools)}.weight"] = (c, 1, 2, 2)
    want["classifier.weight"] = (num_class, 512)
    want["classifier.bias"] = (num_class,)
    return want


def shapes(sd) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in sd.items()}


# ------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("num_class", [10, 100])
@pytest.mark.parametrize("use_bn", [False, True])
def test_vgg16_state_dict_keys_match_spec(num_class, use_bn):
    want = expected_ann(num_class, use_bn)
    ann = on_meta(lambda: VGG("VGG16", num_class, use_bn))
    assert shapes(ann.state_dict()) == want
    assert list(ann.state_dict()) == list(want)

    snn = on_meta(lambda: SpikeModel(VGG("VGG16", num_class, use_bn), 32))
    assert shapes(snn.state_dict()) == {f"model.{k}": v for k, v in want.items()}
    assert len(snn.spike_modules()) == 18

    snn_q = on_meta(lambda: SpikeModel_q(VGG_q("VGG16", num_class, use_bn, mode="bin"), 32))
    qwant = {}
    for k, v in want.items():
        parts = k.split(".")
        idx = int(parts[1]) if parts[0] == "features" else -1
        if idx in CONV_IDX or idx in POOL_IDX:
            k = ".".join(parts[:-1] + ["conv", parts[-1]])
        qwant[f"model.{k}"] = v
    for i in CONV_IDX[1:]:
        qwant[f"model.features.{i}.conv.scale"] = (1,)
    assert shapes(snn_q.state_dict()) == qwant
    q = quantized_modules(snn_q)
    assert [n for n, _ in q] == [f"model.features.{i}.conv" for i in CONV_IDX[1:]]
    assert sum(m.weight.numel() for _, m in q) == 14_708_736
    # the calibration checkpoint (BN folded away) maps onto the quantized model's keys
    def folded():
        ann = VGG("VGG16", num_class, use_bn)
        search_fold_and_remove_bn(ann)
        return SpikeModel(ann, 32)

    remapped = shapes(E.remap_snn_keys(on_meta(folded).state_dict()))
    assert all(qwant[k] == v for k, v in remapped.items())
    assert len(remapped) == 13 * 2 + 5 + 2


def test_authors_style_ann_checkpoint_loads(tmp_path):
    args = _args(width=0.0625, usebn=True)
    src = VGG("VGG16", 10, True, width=0.0625)
    for variant, obj in (("plain", src.state_dict()), ("net", {"net": src.state_dict()}),
                         ("ddp", {f"module.{k}": v for k, v in src.state_dict().items()})):
        path = tmp_path / f"{variant}.pth"
        torch.save(obj, path)
        ann = E.load_ann(args, str(path))
        for k, v in src.state_dict().items():
            assert torch.equal(ann.state_dict()[k], v), (variant, k)
    wrong = _args(width=0.125, usebn=True)
    with pytest.raises(Exception, match="shape mismatch"):
        E.load_ann(wrong, str(tmp_path / "plain.pth"))


# ------------------------------------------------------------------------------ BN folding


def test_bn_folding_preserves_outputs_and_creates_bias():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Sequential(nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5)))
    for bn in (net[1], net[3][1]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    want = net(x)
    search_fold_and_remove_bn(net)
    assert isinstance(net[1], StraightThrough) and isinstance(net[3][1], StraightThrough)
    assert isinstance(net[0].bias, nn.Parameter)
    torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ IF neuron


def one_neuron(theta: float, T: int) -> SpikeModule:
    conv = nn.Conv2d(1, 1, 1, bias=True)
    conv.weight.data.fill_(1.0)
    conv.bias.data.zero_()
    m = SpikeModule(T, conv)
    m.add_module("relu", nn.ReLU())
    m.threshold = torch.tensor(theta)
    m.use_spike = True
    return m


def run_neuron(m: SpikeModule, value: float, T: int) -> list[float]:
    m.init_membrane_potential()
    x = torch.full((1, 1, 1, 1), value)
    return [float(m(x)) for _ in range(T)]


def test_if_neuron_hand_worked():
    # theta = 1, T = 4: current = x + 1/8 each step, reset by subtraction, spike when u >= 1
    m = one_neuron(1.0, 4)
    assert run_neuron(m, 0.3, 4) == [0, 0, 1, 0]  # u: .425 .85 1.275 -> .275, .7
    assert run_neuron(m, 0.6, 4) == [0, 1, 1, 0]  # u: .725 1.45 -> .45 1.175 -> .175 .9
    assert run_neuron(m, 0.7, 4) == [0, 1, 1, 1]  # round(0.7 * 4) = 3 spikes
    assert run_neuron(m, -0.5, 4) == [0, 0, 0, 0]
    assert run_neuron(m, 5.0, 4) == [1, 1, 1, 1]  # at most one spike per step
    # '>=': T = 2, x = 0.75 -> current 0.75 + 0.25 = 1.0 reaches theta exactly at each step
    # ('>' would give [0, 1])
    assert run_neuron(one_neuron(1.0, 2), 0.75, 2) == [1, 1]
    # spike amplitude is theta: theta = 2, x = 1.2 (0.6 theta) -> two spikes of 2
    assert run_neuron(one_neuron(2.0, 4), 1.2, 4) == [0, 2, 2, 0]
    # the ANN path ignores threshold and spikes
    m.use_spike = False
    assert float(m(torch.full((1, 1, 1, 1), -1.0))) == 0.0


def test_spike_act_surrogate_gradient():
    u = torch.tensor([1.0, 2.0, 0.5], requires_grad=True)
    s = spikeAct(u, 1.0, 2)
    assert s.tolist() == [1.0, 1.0, 0.0]
    s.sum().backward()
    expect = [1.0, 1 / (1 + math.pi**2), 1 / (1 + (math.pi * 0.5) ** 2)]
    torch.testing.assert_close(u.grad, torch.tensor(expect))


def random_snn(T: int, seed: int = 0, width: float = 0.0625):
    torch.manual_seed(seed)
    ann = VGG("VGG16", 10, use_bn=False, width=width).eval()
    return ann, SpikeModel(ann, T)


def set_T(snn: SpikeModel, T: int) -> None:
    snn.T = T
    for _, m in snn.spike_modules():
        m.sim_length = T


def test_snn_rates_approach_ann_as_T_grows():
    ann, snn = random_snn(8)
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        a = ann(x)
    get_maximum_activation([(x, None)], snn, iters=0, mse=False, sim_length=8)
    errs = []
    for T in (4, 16, 64):
        set_T(snn, T)
        snn.set_spike_state(True)
        with torch.no_grad():
            s = snn(x) / T
        errs.append(float((s - a).norm() / a.norm()))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.12, errs
    # per layer too: the first layer's rate * theta approaches its ANN activation
    snn.set_spike_state(False)
    first = snn.spike_modules()[0][1]
    with torch.no_grad():
        act = first(x)
    first.use_spike = True
    layer_errs = []
    for T in (4, 64):
        first.sim_length = T
        first.init_membrane_potential()
        with torch.no_grad():
            r = sum(first(x) for _ in range(T)) / T
        layer_errs.append(float((r - act).abs().max()))
    assert layer_errs[1] < layer_errs[0]
    assert layer_errs[1] <= float(first.threshold) / 64 / 2 + 1e-5  # rounding error <= theta/2T


# ------------------------------------------------------------------------------ thresholds


def test_threshold_mse_grid_search_hand_worked():
    # 50 activations of 0.85 and one of 1.0, T = 1: with V = max every 0.85 floors to 0,
    # so the search lowers V to (about) 0.85
    a = torch.tensor([0.85] * 50 + [1.0])
    T = 1
    best = find_threshold_mse(a, T=T, channel_wise=False)
    grid = [torch.tensor(1.0) * (1 - 0.01 * i) for i in range(95)]
    scores = [float(((a - clip_floor(a, T, v)) ** 2).mean()) for v in grid]
    assert float(best) == pytest.approx(float(grid[int(np.argmin(scores))]))
    assert 0.83 <= float(best) <= 0.85 + 1e-6
    # few large values: keeping V = max is optimal
    b = torch.tensor([0.0, 0.1, 0.2, 0.3, 10.0])
    assert float(find_threshold_mse(b, T=2, channel_wise=False)) == pytest.approx(10.0)
    # with a uniform activation the maximum is already optimal
    u = torch.linspace(0, 1, 101)
    assert float(find_threshold_mse(u, T=1000, channel_wise=False)) == pytest.approx(1.0)
    cw = find_threshold_mse(torch.rand(4, 3, 5, 5), T=8, channel_wise=True)
    assert cw.shape == (1, 3, 1, 1)


def test_threshold_ema_over_seven_batches():
    _, snn = random_snn(4)
    batches = [(torch.rand(2, 3, 32, 32) * (k + 1), None) for k in range(10)]
    seen = []
    first = snn.spike_modules()[0][1]
    h = first.register_forward_hook(lambda m, i, o: seen.append(float(o.max())))
    get_maximum_activation(batches, snn, momentum=0.9, iters=5, mse=False, sim_length=4)
    h.remove()
    assert len(seen) == 7
    ema = seen[0]
    for v in seen[1:]:
        ema = 0.9 * ema + 0.1 * v
    assert float(first.threshold) == pytest.approx(ema, rel=1e-5)


# ------------------------------------------------------------------------------ calibration


def layer_errors(snn: SpikeModel, x: torch.Tensor) -> list[tuple[float, float]]:
    """(mean |per-channel mean error|, MSE) between each layer's SNN rate and ANN output."""
    out = []
    for _, m in snn.spike_modules():
        get = GetLayerInputOutput(snn, m)
        snn.set_spike_state(False)
        a = get(x)[1]
        get.data_saver.reset()
        snn.set_spike_state(True)
        r = get(x)[1] / snn.T
        dims = (0, 2, 3)
        out.append((float((r.mean(dims) - a.mean(dims)).abs().mean()),
                    float(((r - a) ** 2).mean())))
    return out


def test_calibration_steps_lower_layer_error():
    T = 8
    ann, snn = random_snn(T, seed=1)
    x = torch.rand(16, 3, 32, 32)
    loader = [(x, None)]
    # step 1: MSE threshold search beats the plain maximum on the clip-floor error
    get_maximum_activation(loader, snn, iters=0, mse=False, sim_length=T)
    th_max = [float(m.threshold) for _, m in snn.spike_modules()]
    get_maximum_activation(loader, snn, iters=0, mse=True, sim_length=T)
    th_mse = [float(m.threshold) for _, m in snn.spike_modules()]
    snn.set_spike_state(False)
    acts = []
    hooks = [m.register_forward_hook(lambda mod, i, o: acts.append(o.detach()))
             for _, m in snn.spike_modules()]
    with torch.no_grad():
        snn(x)
    for h in hooks:
        h.remove()
    improved = 0
    for a, vmax, vmse in zip(acts, th_max, th_mse):
        e_max = float(((a - clip_floor(a, T, vmax)) ** 2).mean())
        e_mse = float(((a - clip_floor(a, T, vmse)) ** 2).mean())
        assert e_mse <= e_max + 1e-9
        improved += e_mse < e_max
    assert improved >= len(acts) // 2

    # step 2: bias correction lowers every layer's mean-activation error
    before = layer_errors(snn, x)
    bias_corr_model(snn, loader, correct_mempot=False, verbose=False)
    after = layer_errors(snn, x)
    assert sum(a for a, _ in after) < 0.5 * sum(b for b, _ in before)
    assert sum(a < b for (a, _), (b, _) in zip(after, before)) >= 15
    pools = [m for _, m in snn.spike_modules() if m.weight.shape[-1] == 2]
    assert all(isinstance(m.bias, torch.Tensor) and m.bias.shape == (m.weight.shape[0],)
               for m in pools)

    # step 3: weight calibration lowers the layer's calibration loss
    name, mod = snn.spike_modules()[3]
    losses = weights_cali_layer(snn, mod, x, learning_rate=0.05, optimize_iter=40,
                                batch_size=16, verbose=False)
    assert np.mean(losses[-5:]) < losses[0]

    # step 4: potential correction lowers the error again (advanced's last step)
    mid = layer_errors(snn, x)
    bias_corr_model(snn, loader, correct_mempot=True, verbose=False)
    final = layer_errors(snn, x)
    assert sum(a for a, _ in final) < sum(b for b, _ in mid)
    assert all(isinstance(m.mem_pot_init, torch.Tensor) for _, m in snn.spike_modules())


def test_threshold_normalisation_is_exact_and_quantized_snn_copies_it():
    T = 8
    _, snn = random_snn(T, seed=2)
    x = torch.rand(6, 3, 32, 32)
    get_maximum_activation([(x, None)], snn, iters=0, mse=True, sim_length=T)
    bias_corr_model(snn, [(x, None)], correct_mempot=False, verbose=False)
    bias_corr_model(snn, [(x, None)], correct_mempot=True, verbose=False)
    snn.set_spike_state(True)
    with torch.no_grad():
        before = snn(x)
    thetas = [float(m.threshold) for _, m in snn.spike_modules()]
    assert not all(t == pytest.approx(1.0) for t in thetas)
    E.normalise_thresholds(snn)
    assert all(m.threshold == 1.0 for _, m in snn.spike_modules())
    with torch.no_grad():
        after = snn(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)

    ckpt = {"net_snn": snn.state_dict(), "pool_bias_dict": E.pool_bias_dict(snn),
            "mem_pot_init_dict": E.mem_pot_dict(snn)}
    assert len(ckpt["pool_bias_dict"]) == 5
    args = _args(width=0.0625, usebn=False, quant=None, T=T)
    snn_q = E.load_calibrated_snn_q(args, ckpt, torch.device("cpu"))
    snn_q.eval()
    with torch.no_grad():
        q_out = snn_q(x)
    torch.testing.assert_close(q_out, before, rtol=1e-4, atol=1e-4)

    # quantized (ter) version: scales are mean|W| of the rescaled weights, pools frozen
    args.quant = "ter"
    snn_t = E.load_calibrated_snn_q(args, ckpt, torch.device("cpu"))
    for _, m in quantized_modules(snn_t):
        assert float(m.scale) == pytest.approx(float(m.weight.detach().abs().mean()), rel=1e-6)
    pools = [m for m in snn_t.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[-1] == 2]
    assert len(pools) == 5 and not any(p.weight.requires_grad for p in pools)
    snn_t.train()
    out = snn_t(x)
    out.sum().backward()
    first_q = quantized_modules(snn_t)[0][1]
    assert first_q.weight.grad is not None and first_q.weight.grad.abs().sum() > 0


def test_folded_bn_slot_is_identity_and_frozen():
    q = VGG_q("VGG16", 10, use_bn=True, mode="bin", width=0.0625)
    bn = q.features[1]
    x = torch.randn(2, bn.num_features, 4, 4)
    q.train()
    torch.testing.assert_close(bn(x), x, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in bn.parameters())


# ------------------------------------------------------------------------------ data


def test_autoaugment_ops_and_cutout():
    from data.autoaugment import RANGES, CIFAR10Policy, Cutout, SubPolicy, apply_op
    from PIL import Image

    assert list(RANGES["posterize"]) == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8))
    for op in RANGES:
        out = apply_op(op, img, RANGES[op][9])
        assert out.size == (32, 32) and out.mode == "RGB"
    policy = CIFAR10Policy()
    assert len(policy.policies) == 25
    assert all(isinstance(p, SubPolicy) for p in policy.policies)
    assert policy(img).size == (32, 32)

    np.random.seed(3)
    t = torch.ones(3, 32, 32)
    holes = [int((Cutout(1, 16)(t)[0] == 0).sum()) for _ in range(50)]
    assert max(holes) == 256 and min(holes) >= 64  # 16x16 inside, clipped at the border
    out = Cutout(1, 16)(t)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_build_data_reads_cifar_format(tmp_path, monkeypatch):
    import torchvision

    # the published MD5 sums replaced by those of these files (checking stays on)
    for key, value in rawdata.cifar_python(tmp_path, "CIFAR10", per_file=8).items():
        monkeypatch.setattr(torchvision.datasets.CIFAR10, key, value)
    train, test = E.build_data(str(tmp_path), batch_size=4, cutout=True, workers=0,
                               use_cifar10=True, auto_aug=True)
    assert len(train.dataset) == 40 and len(test.dataset) == 8
    x, y = next(iter(train))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,)
    x, _ = next(iter(test))
    mean, std = E.NORM["CIFAR10"]
    raw = test.dataset.data[:4].astype(np.float32) / 255.0
    want = (torch.from_numpy(raw).permute(0, 3, 1, 2) - torch.tensor(mean).view(1, 3, 1, 1)) \
        / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5)


def firing_vgg_snn():
    """A quantized VGG16 SNN (width 1/8, T = 4) and an input on which all 18 layers fire:
    thresholds balanced on the input's analog activations."""
    torch.manual_seed(0)
    snn = SpikeModel_q(VGG_q("VGG16", 10, use_bn=False, mode="bin", width=0.125), 4).eval()
    x = torch.rand(2, 3, 32, 32)
    snn.set_spike_state(False)
    thresholds_from_outputs(snn.spike_modules(), lambda: snn(x), attr="threshold")
    snn.set_spike_state(True)
    return snn, x


def test_device_comparison_input_fires_every_layer():
    """The GPU test below compares devices on this input: no layer may be silent."""
    snn, x = firing_vgg_snn()
    rates = spike_rates(snn, snn.spike_modules(), lambda: snn(x))
    assert len(rates) == 18
    assert all(0.02 < r < 0.5 for r in rates.values()), rates


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quantized_snn_on_gpu_matches_cpu():
    snn, x = firing_vgg_snn()
    layers = snn.spike_modules()
    cpu_rates = spike_rates(snn, layers, lambda: snn(x))
    with torch.no_grad():
        cpu = snn(x)
    snn = snn.to("cuda:0")
    with no_tf32(), torch.no_grad():
        gpu_rates = spike_rates(snn, layers, lambda: snn(x.to("cuda:0")))
        gpu = snn(x.to("cuda:0")).cpu()
    assert all(r > 0.02 for r in gpu_rates.values()), gpu_rates
    for name in cpu_rates:  # a rounding difference may flip a rare spike, no more
        assert abs(gpu_rates[name] - cpu_rates[name]) <= 1e-3, name
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3 * float(cpu.abs().max()))


def _args(**kw):
    from types import SimpleNamespace

    base = {"arch": "VGG16", "dataset": "DIGITS", "usebn": False, "width": 1.0, "T": 4,
            "quant": "bin", "dpath": "."}
    base.update(kw)
    return SimpleNamespace(**base)


def test_calibrated_snn_of_another_width_is_rejected():
    from cbp.checkpoint import CheckpointError

    _, snn = random_snn(4, width=0.125)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        E.load_calibrated_snn_q(_args(width=0.0625), {"net_snn": snn.state_dict()},
                                torch.device("cpu"))


@pytest.mark.parametrize("calib", ["none", "light"])
def test_reported_snn_accuracy_is_measured_in_spike_mode(calib, monkeypatch):
    seen = []

    def fake_validate(loader, model, show=False, desc="test"):
        seen.append((desc, getattr(model, "use_spike", None)))
        return 50.0

    monkeypatch.setattr(E, "validate_model", fake_validate)
    torch.manual_seed(0)
    ann = VGG("VGG16", 10, use_bn=True, width=0.0625)
    x = torch.rand(4, 3, 32, 32)
    args = _args(width=0.0625, usebn=True, T=2, calib=calib, wc_iters=1, wc_samples=4,
                 wc_lr=1e-5)
    snn, _, _ = E.convert(args, ann, [(x, None)], [(x, torch.zeros(4).long())],
                          torch.device("cpu"), False)
    assert seen == [("ANN test", None), ("SNN test", True)]
    assert all(m.threshold == 1.0 for _, m in snn.spike_modules())


# ---------------------------------------------------------------------------- fidelity


def test_bias_correction_reduces_axis_by_axis_like_the_reference():
    """The per-channel mean is x.mean(3).mean(2).mean(0), bit for bit; a one-call
    mean((0, 2, 3)) differs in the last bit on this input (so the test can tell them apart)."""
    from CIFAR.models import calibration

    x = torch.randn(16, 4, 7, 9, generator=torch.Generator().manual_seed(3)).abs()
    ref = x.mean(3).mean(2).mean(0)
    assert torch.equal(calibration.channel_mean(x), ref)
    assert not torch.equal(x.mean((0, 2, 3)), ref)
    assert torch.equal(calibration.channel_mean(x[:, :, 0, 0]), x[:, :, 0, 0].mean(0))

    # bias correction of one layer: b <- b - (mean_c(snn / T) - mean_c(ann)), exactly
    m, b0, org, snn_out = bias_corrected_layer(torch.rand(8, 3, 32, 32))
    want = b0 - (snn_out.mean(3).mean(2).mean(0) - org.mean(3).mean(2).mean(0))
    assert torch.equal(m.bias.detach(), want)


def bias_corrected_layer(xin, T: int = 4):
    """Bias-correct the second layer of a small VGG16 SNN on ``xin``: (layer, bias before,
    ANN output, SNN output / T) as the correction saw them."""
    from CIFAR.models import calibration

    _, snn = random_snn(T, seed=5)
    get_maximum_activation([(xin, None)], snn, iters=0, mse=False, sim_length=T)
    _, m = snn.spike_modules()[1]
    b0 = m.bias.detach().clone()
    get = GetLayerInputOutput(snn, m)
    snn.set_spike_state(False)
    org = get(xin)[1]
    snn.set_spike_state(True)
    get.data_saver.reset()
    snn_out = get(xin)[1] / T
    calibration.emp_bias_corr(snn, m, xin, verbose=False)
    return m, b0, org, snn_out


def test_reduction_order_flips_a_spike():
    """Why the order matters: on this layer the one-call mean gives a bias 1 ulp off in some
    channel, and a current that reaches the threshold with the reference's bias stays below
    it with the other (the layer-by-layer correction then carries that spike onward)."""
    from CIFAR.models.spiking_layer import heaviside_spike, integrate_and_fire

    T = 4
    xin = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    m, b0, org, snn_out = bias_corrected_layer(xin, T)
    b_ref = m.bias.detach()
    b_alt = b0 - (snn_out.mean((0, 2, 3)) - org.mean((0, 2, 3)))
    differ = (b_ref != b_alt).nonzero().flatten()
    assert differ.numel() > 0  # the two orders disagree on this layer
    c = int(differ[0])
    # a neuron of channel c whose threshold lies where the two biases disagree: threshold in
    # the bias's binade, currents z (bias excluded) one float apart around the crossing
    theta = 2.0 * abs(float(b_ref[c]))
    m.threshold = theta
    shift = theta * 0.5 / T
    z0 = torch.tensor(theta - shift - float(b_ref[c]), dtype=torch.float32)
    z = [z0]
    for _ in range(64):
        z = [torch.nextafter(z[0], torch.tensor(-1e9)), *z, torch.nextafter(z[-1],
                                                                           torch.tensor(1e9))]
    z = torch.stack(z)

    def spikes(bias):
        m.mem_pot = 0
        return integrate_and_fire(m, z + bias, heaviside_spike) > 0

    flipped = spikes(b_ref[c]) != spikes(b_alt[c])
    assert flipped.sum() >= 1


@pytest.mark.parametrize("reset", [False, True])
def test_pooling_kernels_are_converted_as_loaded(reset):
    """The ANN training moves the pooling kernels off 1/4 (they are parameters); the reference
    converts them as loaded.  --reset_pool sets them to 1/4 first."""
    from CIFAR.models.utils import AvgPoolConv

    torch.manual_seed(0)
    ann = VGG("VGG16", 10, use_bn=False, width=0.0625)
    pools = [m for m in ann.modules() if isinstance(m, AvgPoolConv)]
    with torch.no_grad():
        for i, m in enumerate(pools):
            m.weight.add_(1e-3 * (i + 1))  # e.g. 0.251, 0.252, ...
    loaded = [m.weight.detach().clone() for m in pools]
    x = torch.rand(4, 3, 32, 32)
    args = _args(width=0.0625, T=2, calib="none", wc_iters=1, wc_samples=4, wc_lr=1e-5,
                 reset_pool=reset)
    snn, _, _ = E.convert(args, ann, [(x, None)], [(x, torch.zeros(4).long())],
                          torch.device("cpu"), False)
    spiking_pools = [m for _, m in snn.spike_modules() if m.weight.shape[-1] == 2]
    assert len(spiking_pools) == len(pools) == 5
    for m, w in zip(spiking_pools, loaded):
        # org_weight: the kernel as converted (weight is rescaled by threshold normalisation)
        want = torch.full_like(w, 0.25) if reset else w
        assert torch.equal(m.org_weight, want)
