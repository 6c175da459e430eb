"""The TSSL-BP pipeline (CBP-QSNN-TSSL-BP/): YAML network layout and state-dict keys, the 5-D
layers, quantized weights and scales, and both scripts end to end on the embedded DIGITS data
(fp32 training -> CBP -> eval, resume, the authors' checkpoint format, clean errors)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from clitools import ok, run_here
from test_tsslbp import TSSL_DIR, tssl_modules

from cbp import QuantTarget, quantize
from cbp.run import Run

M = tssl_modules()
cnns, engine, loss_f = M["cnns"], M["engine"], M["functions.loss_f"]
tsslbp = M["functions.tsslbp"]
conv, linear, pooling, dropout = (M[f"layers.{n}"] for n in ("conv", "linear", "pooling",
                                                             "dropout"))
parse = M["network_parser"].parse

FP32 = TSSL_DIR / "main_train_fp32.py"
CBP_SCRIPT = TSSL_DIR / "main_quantize_cbp.py"
CIFAR_SHAPES = [(96, 3, 3, 3, 1), (256, 96, 3, 3, 1), (384, 256, 3, 3, 1), (384, 384, 3, 3, 1),
                (256, 384, 3, 3, 1), (1024, 16384), (1024, 1024), (10, 1024)]


pytestmark = pytest.mark.usefixtures("one_thread")


def cifar_params(mode="bin"):
    return parse(str(TSSL_DIR / "Networks" / f"CIFAR10_{mode}.yaml"))


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("mode", ["bin", "ter"])
def test_cifar_configs_and_state_dict_keys(mode):
    p = cifar_params(mode)
    assert p["Network"]["mode"] == mode and p["Network"]["epochs"] == 200
    assert list(p["Layers"])[:3] == ["conv_1", "dropout_1", "conv_2"]
    with torch.device("meta"):
        net = cnns.Network(p["Network"], p["Layers"], [3, 32, 32])
    sd = net.state_dict()
    assert list(sd) == [f"my_parameters.{i}" for i in range(8)]
    assert [tuple(v.shape) for v in sd.values()] == CIFAR_SHAPES
    assert net.q_layers_list == [1, 2, 3, 4, 5, 6] and net.nq_layers_list == [0, 7]
    assert net.param_size_total == 21_143_552
    assert net.out_shape == [10, 1, 1]
    shapes = [lay.out_shape for lay in net.layers if hasattr(lay, "out_shape")]
    assert shapes[:3] == [[96, 32, 32], [256, 32, 32], [256, 16, 16]]
    t = net.get_parameters()
    assert len(t) == 7 and len(t[2]) == 6 and t[3][0] == ([-1.0, 1.0] if mode == "bin"
                                                          else [-1.0, 0.0, 1.0])
    assert t[4][0] == ([0.0] if mode == "bin" else [-0.5, 0.5])


def test_reference_state_dict_loads_and_scales_come_from_fp32():
    """A bare state dict with the reference's keys loads strictly; scales = mean |W_fp32|."""
    p = cifar_params("bin")
    net = cnns.Network(p["Network"], p["Layers"], [3, 32, 32])
    g = torch.Generator().manual_seed(0)
    ref = {f"my_parameters.{i}": torch.randn(s, generator=g) * 0.01 for i, s in
           enumerate(CIFAR_SHAPES)}
    assert engine.load_weights(net, ref, "x") == {}
    net.set_scales(None)
    for i, lay in zip(net.q_layers_list, net.q_layers):
        assert torch.equal(lay.weight.detach(), ref[f"my_parameters.{i}"])
        assert lay.scale.item() == pytest.approx(ref[f"my_parameters.{i}"].abs().mean().item())
    assert all(not k.startswith("my_scales") for k in net.state_dict())
    bad = dict(ref)
    bad.pop("my_parameters.7")
    with pytest.raises(Exception, match="missing keys: my_parameters.7"):
        engine.load_weights(net, bad, "file.pth")


def tiny_config(tmp: Path, mode="bin", name="DIGITS_bin.yaml", **net_over) -> Path:
    cfg = yaml.safe_load((TSSL_DIR / "Networks" / "DIGITS_bin.yaml").read_text())
    cfg["Network"].update({"mode": mode, "image_size": 8, "batch_size": 120, "epochs": 2,
                           "epochs_fp32": 2, "lr_fp32": 0.003, "period_max": 1, **net_over})
    cfg["Layers"] = {
        "conv_1": {"type": "conv", "qtype": "nq", "in_channels": 3, "out_channels": 6,
                   "kernel_size": 3, "padding": 1, "weight_scale": 5, "threshold": 1},
        "conv_2": {"type": "conv", "qtype": "q", "in_channels": 6, "out_channels": 8,
                   "kernel_size": 3, "padding": 1, "weight_scale": 5, "threshold": 1},
        "pooling_1": {"type": "pooling", "kernel_size": 2},
        "dropout_1": {"type": "dropout", "p": 0.1},
        "FC_1": {"type": "linear", "qtype": "q", "n_inputs": 128, "n_outputs": 32,
                 "threshold": 1},
        "output": {"type": "linear", "qtype": "nq", "n_inputs": 32, "n_outputs": 10,
                   "threshold": 1},
    }
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def small_net(tmp: Path, mode="ter"):
    p = parse(str(tiny_config(tmp, mode)))
    return cnns.Network(p["Network"], p["Layers"], [3, 8, 8]), p


# --------------------------------------------------------------------------- layers


def test_conv_acts_per_time_step_and_quantized_weight(tmp_path):
    net, _ = small_net(tmp_path, "ter")
    c1, c2 = net.weight_layers[0], net.weight_layers[1]
    x = torch.randn(2, 3, 8, 8, 4)
    y = c1(x)
    for t in range(4):
        want = F.conv2d(x[..., t], c1.weight[..., 0], padding=1)
        assert torch.allclose(y[..., t], want, atol=1e-5)
    c2.set_scale(0.3)
    with torch.no_grad():
        c2.weight.copy_(torch.linspace(-1, 1, c2.weight.numel()).view_as(c2.weight))
    c2(torch.randn(1, 6, 8, 8, 2))
    assert torch.allclose(c2.qweight.unique(), torch.tensor([-0.3, 0.0, 0.3]))
    assert torch.equal(c2.qweight, quantize(c2.weight, torch.tensor([0.3]), "ter"))


def test_linear_flattens_c_major_and_pooling_sums_times_theta(tmp_path):
    cfg = {"type": "linear", "n_inputs": 12, "n_outputs": 5, "threshold": 1}
    lay = linear.LinearLayer({"tau_m": 5, "tau_s": 3}, cfg, "fc", [3, 2, 2])
    x = torch.randn(2, 3, 2, 2, 4)
    y = lay(x)
    assert y.shape == (2, 5, 1, 1, 4)
    for t in range(4):
        assert torch.allclose(y[:, :, 0, 0, t], x[..., t].reshape(2, -1) @ lay.weight.t(),
                              atol=1e-5)
    pool = pooling.PoolLayer({}, {"type": "pooling", "kernel_size": 2}, "p", [3, 5, 4])
    assert pool.out_shape == [3, 2, 2]  # odd H works (the reference's reshape fails)
    x = torch.rand(2, 3, 5, 4, 3)
    y = pool(x)
    want = F.avg_pool3d(x, (2, 2, 1)) * 4 * 1.1
    assert torch.allclose(y, want, atol=1e-6)


def test_dropout_mask_shared_over_width_and_time():
    torch.manual_seed(0)
    lay = dropout.DropoutLayer({"type": "dropout", "p": 0.5}, "d")
    x = torch.ones(64, 4, 3, 5, 6)
    y = lay(x)
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    flat = y.reshape(64, 4, 3, -1)
    assert torch.equal(flat, flat[..., :1].expand_as(flat))  # one value per (n, c, h)
    frac = (flat[..., 0] == 0).float().mean().item()
    assert 0.35 < frac < 0.65
    assert not torch.equal(flat[0], flat[1]) or not torch.equal(flat[2], flat[3])
    lay.eval()
    assert lay(x) is x


def test_network_forward_uses_psp_input_and_dropout_only_in_training(tmp_path):
    net, p = small_net(tmp_path)
    x = torch.rand(3, 3, 8, 8, 5)
    net.eval()
    a = net(x, 0, False)
    assert a.shape == (3, 10, 1, 1, 5)
    assert torch.equal(a, net(x, 0, False))
    net.train()
    torch.manual_seed(1)
    b = net(x)
    torch.manual_seed(1)
    assert torch.equal(b, net(x, 0, True))
    assert a.min() >= 0 and a.max() <= 1


def test_weight_clipper_and_scale_outside_state_dict(tmp_path):
    net, _ = small_net(tmp_path)
    with torch.no_grad():
        for w in net.my_parameters:
            w.fill_(5.0)
    net.weight_clipper()
    assert [w.max().item() for w in net.my_parameters] == [4.0, 1.0, 1.0, 4.0]
    targets = net.quant_targets()
    assert all(isinstance(t, QuantTarget) for t in targets)
    assert [t.name for t in targets] == ["my_parameters.1", "my_parameters.2"]
    net.set_scales(None)
    assert targets[0].scale is net.q_layers[0].scale  # in-place update, shared with CBP
    assert net.q_layers[0].scale.item() == 1.0
    assert list(net.scales()) == ["my_scales.1", "my_scales.2"]
    assert list(net.state_dict()) == [f"my_parameters.{i}" for i in range(4)]


def test_config_names_and_checks(tmp_path):
    assert engine.config_names("Networks/CIFAR10_bin.yaml") == ("CIFAR10", "bin")
    assert engine.config_names("a/DIGITS.yaml") == ("DIGITS", "")
    assert engine.config_names("x/DIGITS_bin_small.yaml") == ("DIGITS", "bin_small")
    path = tiny_config(tmp_path, "2bit")
    assert engine.load_config(str(path))["Network"]["mode"] == "2bit"
    assert engine.load_config(str(path), "1bit")["Network"]["mode"] == "1bit"
    bad = tiny_config(tmp_path, "4bit", name="bad.yaml")
    with pytest.raises(Exception, match="not one of bin, ter, 1bit, 2bit"):
        engine.load_config(str(bad))


# --------------------------------------------------------------------------- CLI








def rows(path: Path) -> list[list[float]]:
    return [[float(v) for v in ln.split("\t")] for ln in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """fp32 training (2 epochs), CBP (2 epochs, lambda update every epoch) and eval of the
    result, tiny net, each through its command line."""
    d = tmp_path_factory.mktemp("tssl")
    cfg = tiny_config(d)
    fp = ok(run_here(FP32, ["-config", str(cfg), "-seed", "1"], d))
    cb = ok(run_here(CBP_SCRIPT, ["-config", str(cfg), "-mode", "train", "-seed", "1"], d))
    ev = ok(run_here(CBP_SCRIPT, ["-config", str(cfg), "-mode", "eval"], d))
    return d, cfg, fp, cb, ev


def test_fp32_then_cbp_then_eval(trained):
    d, cfg, fp_out, cbp_out, ev = trained
    fp32 = torch.load(d / "trained_params/TSSL_BP_DIGITS_fp32_pretrained.pth", weights_only=True)
    assert list(fp32) == [f"my_parameters.{i}" for i in range(4)]
    ck = torch.load(d / "checkpoint/DIGITS_fp32.pth", weights_only=True)
    assert set(ck) == {"net", "loss", "epoch"}
    assert "Best Accuracy" in fp_out

    prog = rows(d / "progress/DIGITS_bin.txt")
    assert prog[0] == [0.0, 0.0, 0.0] and [r[0] for r in prog[1:]] == [0.0, 1.0]
    assert all(0 <= r[1] <= 100 and r[2] > 0 for r in prog[1:])
    log = (d / "logs/DIGITS_bin_train.log").read_text()
    assert log.count("lambda update ....") == 2  # period_max 1: an update after every epoch
    assert "lagsum, lagsum_pre = " in log and "Best Accuracy:" in log

    pre = torch.load(d / "trained_params/TSSL_BP_DIGITS_bin_cbp_prequantized.pth",
                     weights_only=True)
    assert sorted(pre) == sorted([f"my_parameters.{i}" for i in range(4)] +
                                 ["my_scales.1", "my_scales.2"])
    for i in (1, 2):  # scales are mean |W_fp32|, frozen
        want = fp32[f"my_parameters.{i}"].abs().mean()
        assert pre[f"my_scales.{i}"].item() == pytest.approx(want.item(), rel=1e-6)
        assert pre[f"my_parameters.{i}"].abs().max() <= 1.0
    assert torch.equal(pre["my_parameters.0"], fp32["my_parameters.0"])  # nq never updated
    last = torch.load(d / "checkpoint/DIGITS_bin_last.pth", weights_only=True)
    assert last["epoch"] == 1 and last["g"] == 3 and last["ucs"] == pytest.approx(2 / 3)
    periodic = torch.load(d / "progress/DIGITS_bin_0.pth", weights_only=True)
    assert {"model_state_dict", "scale", "scales", "lamb", "g", "ucs", "period",
            "lagsum_pre", "epoch", "optimizer", "trainer"} <= set(periodic)
    assert [s.item() for s in periodic["scale"]] == [pre["my_scales.1"].item(),
                                                     pre["my_scales.2"].item()]
    assert (d / "runs/DIGITS_bin").is_dir()

    best = torch.load(d / "checkpoint/DIGITS_bin.pth", weights_only=True)
    assert accuracy(ev) == pytest.approx(best["accuracy"])
    assert (d / "logs/DIGITS_bin_eval.log").is_file()
    # spike metrics, also in the log: one rate per neuron layer; conv_1 alone is analog
    rates = ev.split("firing rate (spikes/neuron/step): ")[1].splitlines()[0].split(", ")
    assert [r.split()[0] for r in rates] == [
        "conv_1.neuron", "conv_2.neuron", "FC_1.neuron", "output.neuron"]
    T = int(parse(str(cfg))["Network"]["n_steps"])
    assert f"MACs/sample: {3 * 9 * 6 * 8 * 8 * T}  " in ev
    assert "SynOps/sample: " in (d / "logs/DIGITS_bin_eval.log").read_text()


def test_metrics_count_the_spikes_behind_the_psp(tmp_path):
    """SynOps from the spikes each layer emits, found independently from the membrane
    potentials (u > threshold), against the hand formulas of each connection."""
    net, p = small_net(tmp_path, "bin")
    net.eval()
    T = int(p["Network"]["n_steps"])
    spikes = {}

    def keep(layer):
        def hook(module, args, out):
            u = tsslbp.torch_forward(args[0], *tsslbp._params(net.network_config,
                                                              layer.layer_config))[1]
            spikes[layer.name] = (u > float(layer.layer_config["threshold"])).float().t()
        return hook

    for lay in net.weight_layers:
        lay.neuron.register_forward_hook(keep(lay))
    torch.manual_seed(0)
    images = torch.rand(4, 3, 8, 8) * 2
    acc, r = engine.test_with_metrics(net, [(images, torch.zeros(4, dtype=torch.long))],
                                      torch.device("cpu"), False, log=None)
    s = {k: v.reshape(4, -1, T) for k, v in spikes.items()}
    assert all(float(v.sum()) > 0 for v in s.values())  # every layer fires
    # conv_2: each conv_1 spike reaches the 8 channels x the 3x3 positions inside the map
    c1 = s["conv_1"].reshape(4, 6, 8, 8, T)
    reach = F.conv3d(c1, torch.ones(8, 6, 3, 3, 1), padding=(1, 1, 0)).sum()
    # FC_1 sees 2x2 sum-pooled spikes (weight 1.1): each conv_2 spike reaches 32 neurons;
    # the output layer: each FC_1 spike reaches 10
    want = float(reach) + 32 * float(s["conv_2"].sum()) + 10 * float(s["FC_1"].sum())
    assert r.synops == pytest.approx(want / 4, abs=1e-9)
    assert r.macs == 3 * 9 * 6 * 8 * 8 * T  # conv_1 on the analog image, at every step
    for name, v in s.items():
        assert r.rates[f"{name}.neuron"] == pytest.approx(float(v.double().mean()), abs=1e-12)


def accuracy(stdout: str) -> float:
    return float(stdout.split("Test Accuracy: ")[1].split()[0])


def in_process(script, argv, cwd, monkeypatch, capsys):
    """Run a script's ``main`` under ``run_main`` in ``cwd``; (exit code, stderr)."""
    from cbp.runtime import run_main

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("CBP_NO_PROGRESS", "1")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: script.main(argv))
    return exc.value.code, capsys.readouterr().err


def test_authors_format_eval_recomputes_scales_from_fp32(trained, tmp_path, monkeypatch, capsys):
    d, cfg, _, _, ev = trained
    pre = torch.load(d / "trained_params/TSSL_BP_DIGITS_bin_cbp_prequantized.pth",
                     weights_only=True)
    bare = {k: v for k, v in pre.items() if k.startswith("my_parameters.")}
    ref_file = tmp_path / "authors.pth"
    torch.save(bare, ref_file)
    out = ok(run_here(CBP_SCRIPT, ["-config", str(cfg), "-mode", "eval", "-checkpoint", str(ref_file),
                              "-logdir", ""], d))
    # same weights, scales recomputed from the same fp32 file -> same accuracy
    assert accuracy(out) == pytest.approx(accuracy(ev))
    # without the fp32 file the scales cannot be recomputed: one clear line
    code, err = in_process(M["main_quantize_cbp"], ["-config", str(cfg), "-mode", "eval",
                                                     "-checkpoint", str(ref_file)],
                           tmp_path, monkeypatch, capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: ")
    assert "stores no scales" in err and "TSSL_BP_DIGITS_fp32_pretrained.pth" in err


def test_resume_continues_exactly(trained, tmp_path):
    """The fixture's 2 epochs + resume to 3 == 3 epochs straight (progress rows, weights)."""
    import shutil

    d, cfg, _, _, _ = trained
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(d, b)
    (a / "trained_params").mkdir(parents=True)
    shutil.copy(d / "trained_params/TSSL_BP_DIGITS_fp32_pretrained.pth", a / "trained_params")
    ok(run_here(CBP_SCRIPT, ["-config", str(cfg), "-seed", "1", "-epochs", "3", "-logdir", ""], a))
    out = ok(run_here(CBP_SCRIPT, ["-config", str(cfg), "-seed", "1", "-epochs", "3", "-logdir", "",
                              "-checkpoint", "checkpoint/DIGITS_bin_last.pth"], b))
    assert "resumed from checkpoint/DIGITS_bin_last.pth at epoch 2" in out
    assert rows(a / "progress/DIGITS_bin.txt") == rows(b / "progress/DIGITS_bin.txt")
    la = torch.load(a / "checkpoint/DIGITS_bin_last.pth", weights_only=True)
    lb = torch.load(b / "checkpoint/DIGITS_bin_last.pth", weights_only=True)
    for k in la["net"]:
        assert torch.equal(la["net"][k], lb["net"][k])
    assert la["g"] == lb["g"] == 4


@pytest.mark.parametrize("argv,fragments", [
    (["-mode", "eval"], ["prequantized checkpoint",
                         "TSSL_BP_DIGITS_bin_cbp_prequantized.pth not found"]),
    (["-mode", "train"], ["TSSL_BP_DIGITS_fp32_pretrained.pth not found", "main_train_fp32.py"]),
    (["-mode", "train", "-checkpoint", "nope.pth"], ["cannot resume: nope.pth not found"]),
])
def test_missing_files_are_one_clear_line(tmp_path, monkeypatch, capsys, argv, fragments):
    cfg = tiny_config(tmp_path)
    code, err = in_process(M["main_quantize_cbp"], ["-config", str(cfg), *argv], tmp_path,
                           monkeypatch, capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: "), err
    for frag in fragments:
        assert frag in err


def test_bad_config_is_one_clear_line(tmp_path, monkeypatch, capsys):
    code, err = in_process(M["main_quantize_cbp"], ["-config", "nope.yaml"], tmp_path,
                           monkeypatch, capsys)
    assert code == 1 and "config file not found: nope.yaml" in err
    code, err = in_process(M["main_train_fp32"], ["-mode", "eval"], tmp_path, monkeypatch, capsys)
    assert code == 1 and "Unrecognized config file" in err
    cfg = tiny_config(tmp_path)
    code, err = in_process(M["main_train_fp32"], ["-config", str(cfg), "-mode", "eval"], tmp_path,
                           monkeypatch, capsys)
    assert code == 1 and "fp32 checkpoint" in err and "not found" in err


def test_bad_numbers_in_the_yaml_are_one_line_each(tmp_path, monkeypatch, capsys):
    cfg = tiny_config(tmp_path, n_steps=0, batch_size=0, lr=-0.1, tau_m="fast", epochs=1.5,
                      period_max=True)
    code, err = in_process(M["main_quantize_cbp"], ["-config", str(cfg)], tmp_path, monkeypatch,
                           capsys)
    lines = err.strip().splitlines()
    assert code == 1 and all(ln.startswith(f"error: {cfg}: Network.") for ln in lines), err
    assert [ln.split("Network.")[1] for ln in lines] == [
        "epochs must be an integer >= 0, got 1.5",
        "batch_size must be an integer >= 1, got 0",
        "n_steps must be an integer >= 1, got 0",
        "period_max must be an integer >= 1, got True",
        "lr must be a number > 0, got -0.1",
        "tau_m must be a number > 0, got 'fast'",
    ]
    assert not (tmp_path / "checkpoint").exists()


@pytest.mark.parametrize("loss", ["kernel", "count", "softmax"])
def test_train_epoch_with_each_loss_updates_only_given_weights(tmp_path, loss):
    p = parse(str(tiny_config(tmp_path, "ter", loss=loss)))
    net = cnns.Network(p["Network"], p["Layers"], [3, 8, 8])
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(40, 3, 8, 8) * 2, torch.arange(40) % 10)
    loader = torch.utils.data.DataLoader(data, batch_size=20)
    before = [w.detach().clone() for w in net.my_parameters]
    qweights = [net.my_parameters[i] for i in net.q_layers_list]
    opt = torch.optim.AdamW(qweights, lr=1e-2)
    args = argparse.Namespace(amp=False, compile=False, no_progress=True)
    with Run({}, []) as run:
        trainer = engine.TSSLTrainer(net, opt, run=run, epochs=1, device=torch.device("cpu"),
                                     args=args, loss_fn=loss_f.SpikeLoss(p["Network"]), log=None)
        st = trainer.train_one_epoch(loader)
    mean_loss, acc = st.train_loss, st.train_acc
    assert mean_loss > 0 and 0 <= acc <= 100
    changed = [not torch.equal(b, w) for b, w in zip(before, net.my_parameters)]
    assert changed == [False, True, True, False]  # only the optimised (quantized) weights
    assert all(w.abs().max() <= 1 for w in qweights)
