"""NIR export of the DVS 7B-Net (sewcommon/nir_export.py, cbp.nir_export's generic pieces,
DVS128Gesture/export_nir.py): exact (quantized) weights, spike-for-spike round trip through the
file's bytes on DIGITS event frames from the DVS emulator, logits within the float32 bound,
named errors for layers without a NIR node, and the command-line script."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from nir_consumers import import_graph
from nir_consumers import record as consumer_record
from pipelines import pipeline_path
from torch import nn

from cbp import QuantMixin, levels
from cbp import nir_export as ne
from cbp.runtime import run_main

pytest.importorskip("nir")
pytest.importorskip("nirtorch")
pytest.importorskip("spikingjelly")

SEW_DIR = Path(__file__).resolve().parents[1] / "CBP-QSNN-SEW-ResNet"
SCRIPT = SEW_DIR / "DVS128Gesture" / "export_nir.py"
if str(SEW_DIR) not in sys.path:
    sys.path.insert(0, str(SEW_DIR))

from sewcommon import neurons  # noqa: E402
from sewcommon import nir_export as sne  # noqa: E402
from sewcommon.dvs_emulator import emulate_dvs  # noqa: E402
from sewcommon.dvsnets import ResNetN  # noqa: E402
from spikingjelly.activation_based.neuron import ParametricLIFNode  # noqa: E402

_spec = importlib.util.spec_from_file_location("sew_nir_q_smodels",
                                               SEW_DIR / "DVS128Gesture" / "q_smodels.py")
Q_SMODELS = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(Q_SMODELS)

# the script's --dataset DIGITS shape (16x16 frames, 3 stages, 10 classes) at width 1/8, T=4
SIZE, STAGES, WIDTH, T, BATCH = 16, 3, 0.125, 4, 16
MODES = ["fp32", "ter", "bin"]
ARGS = ["--model", "SEWResNet", "--connect_f", "ADD", "--dataset", "DIGITS", "--T", str(T),
        "--width", str(WIDTH), "-b", str(BATCH), "-j", "0", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


def digits_frames(n: int) -> torch.Tensor:
    """The first ``n`` DIGITS test images as event frames [n, T, 2, 16, 16], as
    sewcommon.dvs_emulator.digits_dvs makes them (without emulating all 360)."""
    from spikingjelly.datasets.utils import integrate_events_by_fixed_frames_number

    from cbp.data import digits_arrays

    images = digits_arrays(SIZE, channels=1)[2][:n]
    frames = [integrate_events_by_fixed_frames_number(ev, "number", T, SIZE, SIZE)
              for ev in emulate_dvs(images, amplitude=SIZE / 4)]
    return torch.from_numpy(np.stack(frames)).float()


def build(mode: str, frames: torch.Tensor, seed: int = 0) -> ResNetN:
    """A 7B-Net whose PLIF layers all fire on ``frames``: random BN affine and PLIF ``w``
    (tau between 1.4 and 3.7), BN running statistics taken from one pass over ``frames``."""
    torch.manual_seed(seed)
    net = Q_SMODELS.SEWResNet("ADD", None if mode == "fp32" else mode, width=WIDTH,
                              in_size=SIZE, num_classes=10, stages=STAGES)
    return firing(net, frames)


def firing(net: nn.Module, frames: torch.Tensor) -> nn.Module:
    """``net`` (in eval mode) with random BN affine and PLIF ``w`` and the BN running
    statistics of one pass over ``frames``."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 1.0
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(0.3, 1.0)
            elif isinstance(m, ParametricLIFNode):
                m.w.uniform_(-1.0, 1.0)
        net.train()(frames)
    neurons.reset_net(net)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    return net.eval()


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    return digits_frames(BATCH)


@pytest.fixture(scope="module", autouse=True)
def script_run(tmp_path_factory):
    """The script exporting a ter checkpoint in a fresh folder, started first so that it
    overlaps the other tests: (folder, network, process).  The network's BatchNorm statistics
    come from random event counts (the DIGITS frames are not made yet)."""
    cwd = tmp_path_factory.mktemp("script")
    (cwd / "trained_params").mkdir()
    counts = torch.poisson(torch.full((BATCH, T, 2, SIZE, SIZE), 0.3),
                           torch.Generator().manual_seed(0))
    model = build("ter", counts, seed=3)
    torch.save(model.state_dict(), cwd / "trained_params/SEW_ResNet_DIGITS_ter_cbp_prequantized.pth")
    env = dict(os.environ, CBP_NO_PROGRESS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("CBP_FAILPOINT", None)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *ARGS, "--quant", "ter"], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield cwd, model, proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


@pytest.fixture(scope="module", params=MODES)
def exported(request, frames, tmp_path_factory):
    """(mode, network, graph read back from its bytes, imported graph module)."""
    net = build(request.param, frames)
    path = str(tmp_path_factory.mktemp("nir") / f"sew_{request.param}.nir")
    sne.export(net, frames, path)
    blob = Path(path).read_bytes()
    return request.param, net, ne.read(blob), sne.load(blob)


def units(net: nn.Module) -> list[str]:
    """Names of the conv -> BN -> PLIF units (``<unit>.0`` = [conv, BN], ``<unit>.1`` = PLIF)."""
    return [n[:-2] for n, m in net.named_modules() if isinstance(m, ParametricLIFNode)]


def test_weights_are_the_exact_quantized_weights(exported):
    mode, net, graph, gm = exported
    quantized = 0
    for unit in units(net):
        conv, bn = net.get_submodule(unit + ".0.0"), net.get_submodule(unit + ".0.1")
        node = graph.nodes[ne.node_name(unit + ".conv.conv")]
        expected = ne.exact_weight(conv)
        in_file = torch.from_numpy(np.asarray(node.weight))
        assert torch.equal(in_file, expected), unit
        assert not np.asarray(node.bias).any()  # bias=False is written as zeros
        assert torch.equal(gm.get_submodule(ne.node_name(unit + ".conv.conv")).weight, expected)
        if isinstance(conv, QuantMixin):
            quantized += 1
            grid = torch.tensor(levels(mode), dtype=expected.dtype) * conv.scale.detach()
            assert torch.isin(in_file, grid).all(), unit
            assert not torch.equal(expected, conv.weight.detach())  # not the latent weight
        # BatchNorm: a separate diagonal 1x1 conv, A = gamma / sqrt(var + eps), B = beta - mean A
        w = np.asarray(graph.nodes[ne.node_name(unit + ".conv.bn")].weight)[:, :, 0, 0]
        a = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach().numpy()
        assert np.array_equal(w, np.diag(np.diag(w))) and np.allclose(np.diag(w), a, rtol=1e-6)
    assert quantized == (0 if mode == "fp32" else len(units(net)) - 1)  # the first conv is fp32
    out = graph.nodes["out"]
    assert torch.equal(torch.from_numpy(np.asarray(out.weight)), net.out.weight.detach())
    assert torch.equal(torch.from_numpy(np.asarray(out.bias)), net.out.bias.detach())


def test_neuron_nodes_and_metadata(exported):
    import nir

    _, net, graph, gm = exported
    dt = ne.DEFAULT_DT
    for unit in units(net):
        plif, node_name = net.get_submodule(unit + ".1"), ne.node_name(unit + ".plif")
        node = graph.nodes[node_name]
        q = plif.w.detach().sigmoid()
        assert isinstance(node, nir.LIF)
        assert np.allclose(np.asarray(node.tau), dt / float(q), rtol=1e-12, atol=0)
        assert np.all(np.asarray(node.r) == 1)
        # PLIF fires on v >= 1, NIR on v > v_threshold: the float32 below 1
        assert np.all(np.asarray(node.v_threshold) == 1 - 2.0**-24)
        assert imported_threshold(gm, node_name) == 1.0
        assert not np.asarray(node.v_leak).any() and not np.asarray(node.v_reset).any()
        imported = gm.get_submodule(node_name).module  # integrates with q, as PLIF does
        assert torch.equal(imported.w.detach().sigmoid(), q)
    steps = [n for n, v in graph.nodes.items() if isinstance(v, nir.CubaLIF)]
    assert steps and all(n.split("_")[2] in ("level", "any") for n in steps)
    assert sum(isinstance(v, nir.AvgPool2d) for v in graph.nodes.values()) == 2 + 3 + 4
    for pool in (v for v in graph.nodes.values() if isinstance(v, nir.AvgPool2d)):
        # (height, width) pairs, as the NIR spec defines them (snnTorch needs them)
        assert [np.asarray(getattr(pool, k)).tolist() for k in ("kernel_size", "stride",
                                                                "padding")] == [[2, 2], [2, 2],
                                                                                [0, 0]]
    assert float(graph.metadata["dt"]) == dt and int(graph.metadata["timesteps"]) == T


def imported_threshold(gm: nn.Module, node: str) -> float:
    return float(gm.get_submodule(node).module.v_threshold)


def test_spikes_identical_and_logits_within_bound(exported, frames):
    _, net, _, gm = exported
    r = sne.compare(net, gm, frames)
    assert len(r.spikes) == 7
    for name, spikes in r.spikes.items():
        numel = r.outputs[name]
        assert 0 < spikes < numel, f"{name}: {spikes} of {numel}: the test could not fail"
        assert r.mismatches[name] == 0, f"{name}: {r.mismatches[name]} spikes differ"
    assert r.features_equal
    # the max-pools see the integer maps of SEW ADD: levels above 1 occur
    feats = net.conv(frames.transpose(0, 1))
    neurons.reset_net(net)
    assert feats.max() >= 2
    # mean over T after the output layer instead of before: equal up to float32 rounding
    assert r.logits_within_bound and r.max_logit_diff <= r.bound < 1e-4
    assert r.exact


@pytest.mark.parametrize("exported", ["ter"], indirect=True)
def test_snntorch_reproduces_the_spikes(exported, frames):
    """snnTorch reads the 7B-Net file (dt 1e-4 is its own; per-sample Flatten): every PLIF
    layer's spikes and the output layer's inputs identical on these samples, logits within the
    float32 bound.  Its LIF is a Leaky whose membrane is scaled by tau / dt (threshold
    (1 - 2**-24) * tau / dt): equal spikes here, not bitwise by construction (docs/nir.md).
    Norse has no AvgPool2d node, so it cannot read the max-pooling of this network."""
    _, net, graph, _ = exported
    frames = frames[:4]
    nodes = list(sne.to_single_step(net).plif_nodes.values())
    r = sne.compare(net, import_graph("snntorch", graph), frames,
                    lambda m, steps: consumer_record(m, steps, nodes))
    assert r.exact, r.problem()
    assert all(0 < v for v in r.spikes.values()) and r.max_logit_diff <= r.bound < 1e-4


def test_integer_max_pool_is_max_pool():
    g = torch.Generator().manual_seed(0)
    for k in (2, 3):
        x = torch.randint(0, 5, (3, 4, 12, 12), generator=g).float()
        got = ne.IntegerMaxPool2d(k, k, 4)(x)
        assert torch.equal(got, nn.MaxPool2d(k)(x))
    with pytest.raises(ne.NIRExportError, match=r"'p' \(MaxPool2d\): .*input is analog"):
        ne.integer_max_pool("p", nn.MaxPool2d(2), None)


def test_plif_membrane_bitwise_only_when_imported_as_product():
    """spikingjelly imports nir.LIF as h = v + (x - v) / tau; PLIF computes v + (x - v) * q."""
    plif = ParametricLIFNode(v_threshold=1e9, step_mode="m")  # no spikes: whole trajectories
    with torch.no_grad():
        plif.w.fill_(0.37)
    x = torch.randn(8, 1000, generator=torch.Generator().manual_seed(0))
    ref = []
    for xt in x:
        plif.step_mode = "s"
        plif(xt)
        ref.append(plif.v.clone())
    graph = ne.export(nn.Sequential(ne.plif_neuron("p", plif)), x[:1])
    for product in (False, True):
        wrapper, state, differ = ne.load(graph, multiply_lif=product).get_submodule("_0"), None, 0
        for xt, v in zip(x, ref):
            _, state = wrapper(xt, state)
            differ += int((state[0] != v).sum())
        assert (differ == 0) == product, differ


def test_layers_without_a_nir_node_are_named(frames):
    net = build("ter", frames)
    for connect in ("IAND", "AND"):
        other = copy.deepcopy(net)
        other.conv[1].connect_f = connect
        with pytest.raises(ne.NIRExportError) as exc:
            sne.export(other, frames)
        assert str(exc.value) == (f"cannot export layer 'conv.1' (SEWBlock, connect_f="
                                  f"'{connect}'): NIR has no node for the element-wise "
                                  "product; only ADD maps")
    other = copy.deepcopy(net)
    other.conv = nn.Sequential(*other.conv[:3], nn.Dropout(), *other.conv[3:])
    with pytest.raises(ne.NIRExportError,
                       match=r"^cannot export layer 'conv.3' \(Dropout\): NIR has no node for "
                             r"it$"):
        sne.export(other, frames)
    other = copy.deepcopy(net)
    other.conv[3].conv[1][1].v_reset = None
    with pytest.raises(ne.NIRExportError, match=r"^cannot export layer 'conv.3.conv.1.1' "
                                                r"\(ParametricLIFNode\): soft reset"):
        sne.export(other, frames)


@pytest.mark.slow  # the library round trips above run in the default tier
def test_script_end_to_end(script_run, frames):
    cwd, model, proc = script_run
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert len(out.strip().splitlines()) == 1, out
    assert out.startswith("exported ./trained_params/SEW_ResNet_DIGITS_ter.nir (SEWResNet ter, "
                          f"T={T}, dt=0.0001): round trip exact on {BATCH} test samples, spikes "
                          "identical in all 7 PLIF layers"), out
    written = cwd / "trained_params/SEW_ResNet_DIGITS_ter.nir"
    assert sne.compare(model, sne.load(str(written)), frames).exact
    assert sorted(p.name for p in written.parent.iterdir()) == [
        "SEW_ResNet_DIGITS_ter.nir", "SEW_ResNet_DIGITS_ter_cbp_prequantized.pth"]


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cifar10dvs_script_end_to_end(tmp_path, monkeypatch):
    """CIFAR10DVS/export_nir.py on the Wide-7B-Net (128x128 frames, width 1/16) with the first
    test batch of a stand-in CIFAR10-DVS test set: one line, the file reproduces the network."""
    from clitools import inproc
    from sewcommon import data

    folder = SEW_DIR / "CIFAR10DVS"
    q = load_module(folder / "q_smodels.py", "sew_nir_c10_q_smodels")
    counts = torch.poisson(torch.full((3, T, 2, 128, 128), 0.3), torch.Generator().manual_seed(1))
    torch.manual_seed(4)
    net = firing(q.SEWResNet("ADD", "ter", width=1 / 16), counts)
    (tmp_path / "trained_params").mkdir()
    torch.save(net.state_dict(), tmp_path / "trained_params/SEW_ResNet_CIFAR10DVS_ter_cbp_prequantized.pth")
    test_set = torch.utils.data.TensorDataset(counts, torch.arange(3))
    monkeypatch.setattr(data, "cifar10dvs", lambda root, t, cache: (None, test_set))
    args = ["-model", "SEWResNet", "-cnf", "ADD", "-T", str(T), "-b", "2", "-j", "0",
            "-device", "cpu", "-width", "0.0625", "-quant", "ter"]
    code, out, err = inproc(folder / "export_nir.py", args, tmp_path, monkeypatch)
    assert code == 0, err
    assert out.startswith("exported ./trained_params/SEW_ResNet_CIFAR10DVS_ter.nir (SEWResNet "
                          f"ter, T={T}, dt=0.0001): round trip exact on 2 test samples, spikes "
                          "identical in all 16 PLIF layers"), out
    assert len(out.splitlines()) == 1
    r = sne.compare(net, sne.load(str(tmp_path / "trained_params/SEW_ResNet_CIFAR10DVS_ter.nir")),
                    counts[:2])
    assert r.exact and all(0 < v for v in r.spikes.values()), r.spikes
    code, out, err = inproc(folder / "export_nir.py", [*args[:-1], "bin"], tmp_path, monkeypatch)
    assert code == 1 and out == "" and err.startswith(
        "error: checkpoint ./trained_params/SEW_ResNet_CIFAR10DVS_bin_cbp_prequantized.pth not "
        "found"), err


def test_script_missing_checkpoint(tmp_path, monkeypatch, capsys):
    """Without --quant the fp32 checkpoint is read; missing: --test-only's one-line error."""
    monkeypatch.chdir(tmp_path)
    with pipeline_path(SEW_DIR / "DVS128Gesture"):
        script = importlib.import_module("export_nir")
        with pytest.raises(SystemExit) as exc:
            run_main(lambda: script.main(ARGS))
    assert exc.value.code == 1
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [
        "error: checkpoint ./trained_params/SEW_ResNet_DIGITS_fp32_pretrained.pth not found: "
        "download it from the authors' Google Drive folder linked from the CBP-QSNN README or "
        f"create it with: python main_train_fp32.py --model SEWResNet --connect_f ADD --dataset "
        f"DIGITS --T {T}"], err
    assert not list(tmp_path.iterdir())
