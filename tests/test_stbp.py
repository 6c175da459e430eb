"""The STBP pipeline (CBP-QSNN-STBP/): network layout, LIF neuron, forward pass, and the two
command-line scripts end to end on the embedded DIGITS data (fp32 pre-training, CBP
quantization, evaluation, resume and error handling)."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import re
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from clitools import inproc, ok, run, run_here
from pipelines import load_pipeline, pipeline_path

from cbp import cfs as model_cfs
from cbp import levels, quantize, quantized_modules
from cbp.export import load_packed

STBP_DIR = Path(__file__).resolve().parents[1] / "CBP-QSNN-STBP"
functions, _model, _q_model = load_pipeline(STBP_DIR, "functions", "model", "q_model")
Conv_SNN, scale_init = _model.Conv_SNN, _model.scale_init
Q_Conv_SNN = _q_model.Q_Conv_SNN
LAYER_NAMES = _model.LAYER_NAMES
(baseline,) = load_pipeline(Path(__file__).resolve().parents[1] / "benchmarks", "baseline")

FP32_SCRIPT = STBP_DIR / "main_train_fp32.py"
CBP_SCRIPT = STBP_DIR / "main_quantize_cbp.py"

WIDTH, T, BATCH, DECAY = 0.0625, 2, 100, 0.5
SMALL = ["--dataset", "DIGITS", "--width", str(WIDTH), "--T", str(T),
         "--batch_size", str(BATCH), "--decay", str(DECAY)]
FP32_TRAIN = SMALL + ["--mode", "train", "--init_gain", "2", "--learning_rate", "0.1",
                      "--num_epochs", "2", "--seed", "0"]
CBP_TRAIN = SMALL + ["--mode", "train", "--quant", "ter", "--period", "1", "--seed", "0"]
CBP_EPOCHS = 3

PRETRAINED = "trained_params/STBP_DIGITS_fp32_pretrained.pth"
PREQUANTIZED = "trained_params/STBP_DIGITS_ter_cbp_prequantized.pth"
CBP_BEST = "checkpoint/DIGITS_cbp_ter_best.pth"
CBP_LAST = "checkpoint/DIGITS_cbp_ter_last.pth"
CBP_PACKED = "checkpoint/DIGITS_cbp_ter_packed.pth"
PROGRESS = "progress/DIGITS_cbp_ter_progress.txt"

LAYERS = ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "pool3", "fc1", "fc2", "fc3")
QUANTIZED = ("pool1", "conv2", "pool2", "conv3", "conv4", "pool3", "fc1", "fc2")
# stbp.md section 3.1 at width 1.0 (fc3 is (outs, 512))
WEIGHT_SHAPES = {
    "conv1": (128, 3, 3, 3),
    "pool1": (256, 128, 3, 3),
    "conv2": (256, 256, 3, 3),
    "pool2": (512, 256, 3, 3),
    "conv3": (512, 512, 3, 3),
    "conv4": (1024, 512, 3, 3),
    "pool3": (2048, 1024, 3, 3),
    "fc1": (1024, 32768),
    "fc2": (512, 1024),
}
QUANTIZED_COUNTS = {
    "pool1": 294_912,
    "conv2": 589_824,
    "pool2": 1_179_648,
    "conv3": 2_359_296,
    "conv4": 4_718_592,
    "pool3": 18_874_368,
    "fc1": 33_554_432,
    "fc2": 524_288,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def read_progress(path: Path) -> list[list[float]]:
    return [[float(v) for v in line.split("\t")] for line in path.read_text().splitlines()]


def small_q_model(mode: str = "ter") -> Q_Conv_SNN:
    return Q_Conv_SNN(10, DECAY, 0.5, 0.5, BATCH, T, mode=mode, width=WIDTH)


# --------------------------------------------------------------------------- layout


def build_on_meta(cls, *args, **kwargs):
    try:
        with torch.device("meta"):
            return cls(*args, **kwargs)
    except (NotImplementedError, RuntimeError):
        return cls(*args, **kwargs)


@pytest.mark.parametrize("outs", [10, 100])
def test_state_dict_layout_matches_spec(outs):
    fp = build_on_meta(Conv_SNN, outs, 0.25, 0.5, 0.5, 50, 8)
    q = build_on_meta(Q_Conv_SNN, outs, 0.25, 0.5, 0.5, 50, 8, mode="bin")
    expected = {**WEIGHT_SHAPES, "fc3": (outs, 512)}

    fp_sd = fp.state_dict()
    want = {}
    for name in LAYERS:
        want[f"{name}.weight"] = expected[name]
        want[f"{name}.bias"] = (expected[name][0],)
    assert list(fp_sd) == list(want)
    assert {k: tuple(v.shape) for k, v in fp_sd.items()} == want

    q_sd = q.state_dict()
    scales = {k for k in q_sd if k.endswith(".scale")}
    assert scales == {f"{name}.scale" for name in QUANTIZED}
    assert all(tuple(q_sd[k].shape) == (1,) for k in scales)
    assert {k: tuple(v.shape) for k, v in q_sd.items() if k not in scales} == want

    qmods = quantized_modules(q)
    assert [n for n, _ in qmods] == list(QUANTIZED)
    assert {n: m.weight.numel() for n, m in qmods} == QUANTIZED_COUNTS
    assert sum(m.weight.numel() for _, m in qmods) == 62_095_360
    assert q.conv1.weight.numel() == 3_456
    assert q.fc3.weight.numel() == 512 * outs
    assert type(q.conv1) is torch.nn.Conv2d and type(q.fc3) is torch.nn.Linear


# --------------------------------------------------------------------------- neuron


def test_spike_is_strict_and_surrogate_is_open_boxcar():
    thresh, lens = 0.5, 0.25
    u = torch.tensor([0.1, 0.25, 0.3, 0.5, 0.6, 0.75, 0.9, -1.0, 2.0], requires_grad=True)
    upstream = torch.tensor([1.0, 1.0, 1.0, 3.0, -1.0, 1.0, 1.0, 1.0, 1.0])
    s = functions.ActFun.apply(u, thresh, lens)
    assert s.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    s.backward(upstream)
    # 1 / (2 lens) = 2 on the open window (0.25, 0.75); zero at both edges and outside
    assert u.grad.tolist() == [0.0, 0.0, 2.0, 6.0, -2.0, 0.0, 0.0, 0.0, 0.0]


def test_spike_module_is_act_fun_and_adds_no_state():
    u = torch.tensor([0.2, 0.5, 0.7], requires_grad=True)
    s = functions.Spike()(u, 0.5, 0.25)
    assert s.tolist() == [0.0, 0.0, 1.0]
    s.sum().backward()
    assert u.grad.tolist() == [0.0, 2.0, 2.0]  # the same boxcar as ActFun
    model = Conv_SNN(10, 0.25, 0.5, 0.5, timesteps=2, width=0.0625)
    assert list(model.spike) == list(LAYER_NAMES)
    assert not any(k.startswith("spike.") for k in model.state_dict())


def test_lif_recursion_by_hand():
    decay, thresh, lens = 0.5, 0.5, 0.5
    currents = torch.tensor(
        [[0.3, 0.6, 1.0, 0.5], [0.3, 0.2, 1.0, 0.25], [0.3, 0.2, -0.5, 0.0]], dtype=torch.float64
    )
    mem, spike = 0.0, 0.0
    mems, spikes = [], []
    for t in range(3):
        mem, spike = functions.mem_update(decay, thresh, lens, currents[t], None, mem, spike)
        mems.append(mem)
        spikes.append(spike)
    # u_t = decay * u_{t-1} * (1 - s_{t-1}) + I_t, s_t = [u_t > thresh]
    want_mem = [[0.3, 0.6, 1.0, 0.5], [0.45, 0.2, 1.0, 0.5], [0.525, 0.3, -0.5, 0.25]]
    want_spike = [[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    assert torch.allclose(torch.stack(mems), torch.tensor(want_mem, dtype=torch.float64))
    assert torch.stack(spikes).tolist() == want_spike

    # a callable layer is applied to x
    mem, spike = functions.mem_update(decay, thresh, lens, lambda x: 2 * x, torch.tensor([0.3]),
                                      torch.tensor([0.4]), torch.tensor([0.0]))
    assert torch.allclose(mem, torch.tensor([0.8])) and spike.tolist() == [1.0]


def test_gradient_flows_through_the_reset():
    # u1 = I1 = 0.6 spikes; u2 = decay * u1 * (1 - s1) + I2.  With the spike not detached,
    # du2/dI1 = decay * (1 - s1) - decay * u1 * ds1/du1 = 0 - 0.5 * 0.6 * 1 = -0.3
    i1 = torch.tensor([0.6], dtype=torch.float64, requires_grad=True)
    mem, spike = functions.mem_update(0.5, 0.5, 0.5, i1, None, 0.0, 0.0)
    mem, spike = functions.mem_update(0.5, 0.5, 0.5, torch.zeros(1, dtype=torch.float64),
                                      None, mem, spike)
    mem.sum().backward()
    assert torch.allclose(i1.grad, torch.tensor([-0.3], dtype=torch.float64))


# --------------------------------------------------------------------------- forward


def images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


@pytest.mark.parametrize("cls", [Conv_SNN, Q_Conv_SNN])
def test_forward_gives_spike_rates_and_accepts_partial_batch(cls):
    steps = 4
    torch.manual_seed(0)
    model = cls(10, DECAY, 0.5, 0.5, 50, steps, width=WIDTH)
    scale_init(model, 2.0)
    with torch.no_grad():
        out = model(images(7))  # batch_size 50 in the constructor, 7 samples given
    assert out.shape == (7, 10)
    counts = out * steps
    assert torch.equal(counts, counts.round())
    assert out.min() >= 0 and out.max() <= 1


def test_quantized_forward_uses_quantized_weights():
    steps = 4
    torch.manual_seed(1)
    q = Q_Conv_SNN(10, DECAY, 0.5, 0.5, 50, steps, mode="ter", width=WIDTH)
    scale_init(q, 3.0)  # enough gain that spikes reach the output layer
    for _, m in quantized_modules(q):
        m.init_scale()
    latent = {k: v.clone() for k, v in q.state_dict().items() if not k.endswith(".scale")}
    hard = dict(latent)
    for name, m in quantized_modules(q):
        qw = m.quantized_weight().detach()
        s = m.scale.detach()
        assert torch.isin(qw, torch.tensor(levels("ter")) * s).all()
        hard[f"{name}.weight"] = qw

    plain_q = Conv_SNN(10, DECAY, 0.5, 0.5, 50, steps, width=WIDTH)
    plain_q.load_state_dict(hard)
    plain_latent = Conv_SNN(10, DECAY, 0.5, 0.5, 50, steps, width=WIDTH)
    plain_latent.load_state_dict(latent)
    x = images(20, seed=3)
    with torch.no_grad():
        out_q, out_hard, out_latent = q(x), plain_q(x), plain_latent(x)
    assert out_hard.sum() > 0, "no output spikes: the comparison below would be vacuous"
    assert torch.equal(out_q, out_hard)
    assert not torch.equal(out_q, out_latent)


def reference_pair(steps: int, mode: str = "bin"):
    """A quantized network with enough gain to spike, and an identical copy for the
    time-major reference-style forward (``benchmarks/baseline.py``)."""
    torch.manual_seed(0)
    q = Q_Conv_SNN(10, 0.25, 0.5, 0.5, None, steps, mode=mode, width=WIDTH)
    scale_init(q, 4.0)
    for _, m in quantized_modules(q):
        m.init_scale()
    return q, copy.deepcopy(q)


def loss_and_grads(output, model, labels):
    torch.nn.functional.mse_loss(output, torch.nn.functional.one_hot(labels, 10).float()).backward()
    return {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("steps", [1, 3])
def test_layer_major_forward_matches_the_time_major_reference(steps):
    """Each layer runs once over all T steps (T * batch samples), then its LIF recurrence:
    spikes and output equal the reference's time-major loop (quantizing at every call,
    the input convolution at every step); at T = 1 the gradients are bit-identical too, at
    T >= 2 the weight gradients sum the steps inside one product (within 1e-5 relative)."""
    q, ref = reference_pair(steps)
    x = images(3, seed=5)
    labels = torch.tensor([1, 4, 7])
    out, out_ref = q(x), baseline.stbp_reference_forward(ref, x)
    assert 0 < float(out.detach().mean()) < 1, "no output activity: the comparison would be vacuous"
    assert torch.equal(out, out_ref)
    grads, grads_ref = loss_and_grads(out, q, labels), loss_and_grads(out_ref, ref, labels)
    assert grads.keys() == grads_ref.keys() and len(grads) == 20
    assert all(float(g.abs().max()) > 0 for g in grads.values())
    for k, g in grads.items():
        if steps == 1:
            assert torch.equal(g, grads_ref[k]), k
        else:
            assert float((g - grads_ref[k]).abs().max()) <= 1e-5 * float(g.abs().max()), k


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """fp32 pre-training (2 epochs) then CBP ternary (3 epochs, an update every epoch)."""
    work = tmp_path_factory.mktemp("stbp_run")
    fp32 = run_here(FP32_SCRIPT, FP32_TRAIN, work)
    ok(fp32)
    cbp_run = run_here(CBP_SCRIPT, CBP_TRAIN + ["--num_epochs", str(CBP_EPOCHS)], work)
    ok(cbp_run)
    return {"dir": work, "fp32": fp32, "cbp": cbp_run}


def test_fp32_training_writes_checkpoint_and_pretrained_state_dict(runs):
    work = runs["dir"]
    best = load(work / "checkpoint/DIGITS_best.pth")
    assert {"net", "optimizer", "epoch", "loss_train_hist", "loss_test_hist",
            "test_acc_hist"} <= set(best)
    assert len(best["test_acc_hist"]) == best["epoch"] + 1
    pre = load(work / PRETRAINED)
    assert all(isinstance(v, torch.Tensor) for v in pre.values())
    ref = Conv_SNN(10, DECAY, 0.5, 0.5, BATCH, T, width=WIDTH).state_dict()
    assert {k: v.shape for k, v in pre.items()} == {k: v.shape for k, v in ref.items()}
    # the pretrained file holds the best epoch's weights
    assert set(best["net"]) == set(pre)
    assert all(torch.equal(best["net"][k], pre[k]) for k in pre)
    assert "Best Test Accuracy : " in runs["fp32"].stdout


def check_metrics(out: str, conv1_weight: torch.Tensor) -> None:
    """The spike metrics of an evaluation: a firing rate for each of the 10 layers; the
    analog image drives conv1 once (its MACs), every other layer is driven by spikes."""
    rates = re.search(r"firing rate \(spikes/neuron/step\): (.*)", out).group(1).split(", ")
    assert [r.split()[0] for r in rates] == [f"spike.{n}" for n in LAYER_NAMES]
    assert all(0.0 <= float(r.split()[1]) <= 1.0 for r in rates)
    assert float(rates[0].split()[1]) > 0
    ops = re.search(r"SynOps/sample: (\S+)  MACs/sample: (\S+)  energy/sample: (\S+) uJ", out)
    synops, macs, energy = map(float, ops.groups())
    assert macs == conv1_weight.numel() * 32 * 32  # C_out x 3 x 3 x 3 x 32 x 32, once
    assert synops > 0
    assert energy == pytest.approx((0.9 * synops + 4.6 * macs) * 1e-6, rel=1e-5)


def test_fp32_eval_reports_accuracy(runs):
    out = ok(run_here(FP32_SCRIPT, SMALL + ["--mode", "eval"], runs["dir"]))
    m = re.search(r"Test Accuracy: (\d+\.\d{3})", out)
    assert m, out
    best = load(runs["dir"] / "checkpoint/DIGITS_best.pth")
    assert m.group(1) == f"{max(best['test_acc_hist']):.3f}"
    check_metrics(out, best["net"]["conv1.weight"])


def test_cbp_training_outputs(runs):
    work = runs["dir"]
    best = load(work / CBP_BEST)
    assert set(best) == {"epoch", "net", "optimizer1", "optimizer2", "lamb", "period", "ucs",
                         "g", "progress"}
    q = small_q_model()
    assert {k: v.shape for k, v in best["net"].items()} == {
        k: v.shape for k, v in q.state_dict().items()}
    assert [tuple(lam.shape) for lam in best["lamb"]] == [
        tuple(m.weight.shape) for _, m in quantized_modules(q)]
    # --period 1: every epoch is a lambda update, so g = epoch + 2 after epoch `epoch`
    assert best["g"] == best["epoch"] + 2
    assert math.isclose(best["ucs"], 1 - 1 / best["g"])
    assert best["period"] == 0

    rows = read_progress(work / PROGRESS)
    assert (work / PROGRESS).read_text().splitlines()[0] == "0.0\t0.0\t0.0\t0.0"
    assert len(rows) == CBP_EPOCHS + 1 and all(len(r) == 4 for r in rows)
    assert [r[0] for r in rows[1:]] == [float(e) for e in range(CBP_EPOCHS)]
    assert all(r[1] == 1e10 for r in rows[1:])
    assert all(0.0 <= r[2] <= 100.0 for r in rows[1:])
    assert all(math.isfinite(r[3]) and r[3] >= 0 for r in rows[1:])
    best_acc = max(r[2] for r in rows[1:])
    best_epoch = next(int(r[0]) for r in rows[1:] if r[2] == best_acc)
    assert best["epoch"] == best_epoch
    assert best["progress"].tolist() == rows[: best_epoch + 2]

    # the prequantized file is the best epoch's plain state dict, scales included
    pre = load(work / PREQUANTIZED)
    assert set(pre) == set(best["net"])
    assert {k for k in pre if k.endswith(".scale")} == {f"{n}.scale" for n in QUANTIZED}
    assert all(torch.equal(pre[k], best["net"][k]) for k in pre)

    # CFS in the last row is the CFS of the last epoch's weights
    last = load(work / CBP_LAST)
    q.load_state_dict(last["net"])
    assert model_cfs(q) == pytest.approx(rows[-1][3], rel=1e-9)
    assert last["g"] == CBP_EPOCHS + 1

    # epochs that did not improve the best accuracy go to the non-best checkpoint
    running, not_best = 0.0, []
    for r in rows[1:]:
        if r[2] > running:
            running = r[2]
        else:
            not_best.append(int(r[0]))
    other = work / "checkpoint/DIGITS_cbp_ter.pth"
    assert other.exists() == bool(not_best)
    if not_best:
        assert load(other)["epoch"] == not_best[-1]


def test_cbp_console_lines(runs):
    out = runs["cbp"].stdout
    rows = read_progress(runs["dir"] / PROGRESS)
    for e in range(CBP_EPOCHS):
        # with --period 1 every epoch ends in an update, so the previous lagsum_pre is
        # always the reset value 1e10
        m = re.search(rf"^Epoch {e + 1}/{CBP_EPOCHS} \.\.\. lagsum, lagsum_pre = "
                      r"(\S+),10000000000\.0$", out, re.M)
        assert m, out
        assert math.isfinite(float(m.group(1))) and float(m.group(1)) > 0
        assert f"Lambda update start at {e} epoch" in out
        m = re.search(rf"^Epoch {e + 1}/{CBP_EPOCHS} \.\.\. test_acc, cfs = (\S+), (\S+)$",
                      out, re.M)
        assert m, out
        assert float(m.group(1)) == rows[e + 1][2]
        assert float(m.group(2)) == rows[e + 1][3]
    assert out.count("Best Test Accuracy : ") == CBP_EPOCHS


def test_packed_export_holds_level_values(runs):
    work = runs["dir"]
    packed = load(work / CBP_PACKED)
    assert set(packed["quantized"]) == {f"{n}.weight" for n in QUANTIZED}
    unpacked = load_packed(work / CBP_PACKED)
    pre = load(work / PREQUANTIZED)
    assert list(unpacked) == list(pre)
    ter = torch.tensor(levels("ter"))
    for name in QUANTIZED:
        key, scale = f"{name}.weight", pre[f"{name}.scale"]
        allowed = ter * scale
        assert torch.isin(unpacked[key], allowed).all(), key
        from_latent = quantize(pre[key], scale, "ter")
        assert torch.isin(from_latent, allowed).all(), key
        assert torch.equal(unpacked[key], from_latent), key
    for key in pre:
        if key not in packed["quantized"]:
            assert torch.equal(unpacked[key], pre[key]), key


def test_cbp_eval_reports_best_accuracy(runs):
    out = ok(run_here(CBP_SCRIPT, SMALL + ["--mode", "eval", "--quant", "ter"], runs["dir"]))
    m = re.search(r"Test Accuracy: (\d+\.\d{3})", out)
    assert m, out
    check_metrics(out, load(runs["dir"] / PREQUANTIZED)["conv1.weight"])
    rows = read_progress(runs["dir"] / PROGRESS)
    assert m.group(1) == f"{max(r[2] for r in rows[1:]):.3f}"


def test_resume_reproduces_uninterrupted_run(runs, tmp_path, monkeypatch):
    (tmp_path / "trained_params").mkdir()
    shutil.copy(runs["dir"] / PRETRAINED, tmp_path / PRETRAINED)
    for epochs, more in ((CBP_EPOCHS - 1, []), (CBP_EPOCHS, ["--resume"])):
        code, out, err = inproc(CBP_SCRIPT, CBP_TRAIN + ["--num_epochs", str(epochs)] + more,
                                tmp_path, monkeypatch)
        assert code == 0, out + err
    assert f"Epoch {CBP_EPOCHS}/{CBP_EPOCHS}" in out
    assert "Epoch 1/" not in out

    full, resumed = load(runs["dir"] / CBP_LAST), load(tmp_path / CBP_LAST)
    assert resumed["epoch"] == full["epoch"] == CBP_EPOCHS - 1
    assert (resumed["g"], resumed["ucs"]) == (full["g"], full["ucs"])
    assert len(resumed["lamb"]) == len(full["lamb"])
    assert all(torch.equal(a, b) for a, b in zip(resumed["lamb"], full["lamb"]))
    assert set(resumed["net"]) == set(full["net"])
    for k in full["net"]:
        assert torch.equal(resumed["net"][k], full["net"][k]), k
    assert (tmp_path / PROGRESS).read_text() == (runs["dir"] / PROGRESS).read_text()


# --------------------------------------------------------------------------- bad input

BAD_CASES = {
    # id: (script, extra args, setup, expected in the message)
    "quant_foo": (CBP_SCRIPT, ["--quant", "foo"], None, ["--quant"]),
    "dataset_mnist": (FP32_SCRIPT, ["--dataset", "MNIST"], None, ["--dataset"]),
    "T_zero": (CBP_SCRIPT, ["--T", "0"], None, ["--T"]),
    "negative_batch": (FP32_SCRIPT, ["--batch_size", "-1"], None, ["--batch_size"]),
    "no_pretrained": (CBP_SCRIPT, CBP_TRAIN + ["--num_epochs", "1"], None,
                      ["./" + PRETRAINED, "main_train_fp32.py", f"--width {WIDTH}"]),
    "no_prequantized": (CBP_SCRIPT, SMALL + ["--mode", "eval", "--quant", "ter"], None,
                        ["./" + PREQUANTIZED, "main_quantize_cbp.py", f"--width {WIDTH}"]),
    "fp32_eval_no_pretrained": (FP32_SCRIPT, SMALL + ["--mode", "eval"], None,
                                ["./" + PRETRAINED, "main_train_fp32.py", f"--width {WIDTH}"]),
    "corrupt_pretrained": (CBP_SCRIPT, CBP_TRAIN + ["--num_epochs", "1"], "corrupt_pretrained",
                           ["./" + PRETRAINED, "cannot read"]),
    "no_cifar": (FP32_SCRIPT, ["--dataset", "CIFAR10", "--data_path", "{data}", "--T", "2",
                               "--width", str(WIDTH), "--num_epochs", "1"], "data",
                 ["cifar-10-python.tar.gz", "{data}"]),
    "no_cuda": (CBP_SCRIPT, CBP_TRAIN + ["--num_epochs", "1", "--device", "cuda"], None,
                ["CUDA"]),
    "resume_missing": (CBP_SCRIPT, CBP_TRAIN + ["--num_epochs", "1", "--resume"], "pretrained",
                       ["resume", "./checkpoint/DIGITS_cbp_ter_last.pth"]),
    "wrong_shapes": (CBP_SCRIPT, CBP_TRAIN + ["--num_epochs", "1"], "wide_pretrained",
                     ["./" + PRETRAINED, "shape mismatch", "conv1.weight (16, 3, 3, 3) vs model (8, 3, 3, 3)"]),
}
ARGPARSE_CASES = {"quant_foo", "dataset_mnist", "T_zero", "negative_batch"}


def _save_pretrained(folder: Path, width: float) -> None:
    (folder / "trained_params").mkdir()
    torch.manual_seed(0)
    net = Conv_SNN(10, DECAY, 0.5, 0.5, BATCH, T, width=width)
    torch.save(net.state_dict(), folder / PRETRAINED)


def _prepare(case: str, work: Path) -> tuple[Path, list[str], list[str]]:
    script, args, setup, expected = BAD_CASES[case]
    subs = {"data": str(work / "datasets_empty")}
    if setup == "data":
        Path(subs["data"]).mkdir()
    elif setup == "pretrained":
        _save_pretrained(work, WIDTH)
    elif setup == "wide_pretrained":
        _save_pretrained(work, 2 * WIDTH)
    elif setup == "corrupt_pretrained":
        (work / "trained_params").mkdir()
        (work / PRETRAINED).write_bytes(b"not a checkpoint\n")
    return script, [a.format(**subs) for a in args], [e.format(**subs) for e in expected]


_FLAGS: dict[Path, set[str]] = {}


def script_flags(script: Path) -> set[str]:
    """Long options a script accepts, read from its --help."""
    if script not in _FLAGS:
        out = io.StringIO()
        argv = sys.argv
        sys.argv = [str(script), "--help"]
        try:
            with pipeline_path(STBP_DIR), contextlib.redirect_stdout(out), pytest.raises(SystemExit):
                runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = argv
        _FLAGS[script] = set(re.findall(r"--\w+", out.getvalue()))
    return _FLAGS[script]


def _check_failure(case: str, code, stderr: str, expected: list[str]) -> None:
    assert code not in (0, None), stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    if case in ARGPARSE_CASES:
        assert code == 2
        assert lines[0].startswith("usage: "), stderr
        assert re.match(r"main_\w+\.py: error: argument ", lines[-1]), stderr
        message = lines[-1]
    else:
        assert code == 1
        assert len(lines) == 1, stderr
        assert lines[0].startswith("error: "), stderr
        message = lines[0]
    for text in expected:
        assert text in message, message
    # any option the message suggests must exist in one of the two scripts
    known = script_flags(CBP_SCRIPT) | script_flags(FP32_SCRIPT)
    assert set(re.findall(r"--\w[\w-]*", message)) <= known, message


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_fails_cleanly(case, tmp_path, monkeypatch, capsys):
    """Each script is executed as ``__main__`` in this process (the same entry point as the
    command line, without paying for a new interpreter per case)."""
    if case == "no_cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available")
    script, args, expected = _prepare(case, tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CBP_NO_PROGRESS", "1")
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    rng = torch.get_rng_state()
    try:
        with pipeline_path(STBP_DIR), pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        torch.set_rng_state(rng)
    _check_failure(case, exit_info.value.code, capsys.readouterr().err, expected)


@pytest.mark.parametrize("case", ["no_pretrained"])
def test_bad_input_fails_cleanly_in_a_subprocess(case, tmp_path):
    script, args, expected = _prepare(case, tmp_path)
    proc = run(script, args, tmp_path)
    _check_failure(case, proc.returncode, proc.stderr, expected)
