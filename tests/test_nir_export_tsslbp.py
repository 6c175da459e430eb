"""NIR export of the TSSL-BP network (CBP-QSNN-TSSL-BP/nir_tsslbp.py, export_nir.py) and the
torch interpreter that checks it (cbp.nir_torch): the LIF/LI steps worked out by hand, the
mapping node by node, a spike-for-spike round trip on the DIGITS images, a check that fails
where it should, refusals, what snnTorch and Norse make of the file, and the script."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from nir_consumers import import_graph
from pipelines import load_pipeline

from cbp import levels
from cbp import nir_export as ne
from cbp.data import digits
from cbp.runtime import UserError

nir = pytest.importorskip("nir")
nir_torch = pytest.importorskip("cbp.nir_torch")

TSSL_DIR = Path(__file__).resolve().parents[1] / "CBP-QSNN-TSSL-BP"
SCRIPT = TSSL_DIR / "export_nir.py"
cnns, nir_tsslbp, network_parser = load_pipeline(TSSL_DIR, "cnns", "nir_tsslbp", "network_parser")
SPIKING = ["conv_1", "conv_2", "FC_1", "output"]
TAU_M, TAU_S, STEPS = 5.0, 3.0, 5

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(folder: Path, mode: str = "ter", name: str = "DIGITS_ter.yaml",
                layers: dict | None = None) -> Path:
    """A DIGITS config with 8x8 images: conv, conv, pooling, dropout, linear, linear."""
    cfg = yaml.safe_load((TSSL_DIR / "Networks" / "DIGITS_bin.yaml").read_text())
    cfg["Network"].update({"mode": mode, "image_size": 8, "batch_size": 16, "n_steps": STEPS,
                           "tau_m": TAU_M, "tau_s": TAU_S})
    cfg["Layers"] = layers or {
        "conv_1": {"type": "conv", "qtype": "nq", "in_channels": 3, "out_channels": 6,
                   "kernel_size": 3, "padding": 1, "weight_scale": 5, "threshold": 1},
        "conv_2": {"type": "conv", "qtype": "q", "in_channels": 6, "out_channels": 8,
                   "kernel_size": 3, "padding": 1, "weight_scale": 5, "threshold": 1},
        "pooling_1": {"type": "pooling", "kernel_size": 2},
        "dropout_1": {"type": "dropout", "p": 0.5},
        "FC_1": {"type": "linear", "qtype": "q", "n_inputs": 128, "n_outputs": 32,
                 "weight_scale": 3, "threshold": 1},
        "output": {"type": "linear", "qtype": "nq", "n_inputs": 32, "n_outputs": 10,
                   "weight_scale": 3, "threshold": 1},
    }
    path = folder / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def build(folder: Path, quantize: bool, seed: int = 0):
    params = network_parser.parse(str(tiny_config(folder)))
    torch.manual_seed(seed)
    net = cnns.Network(params["Network"], params["Layers"], [3, 8, 8], quantize=quantize)
    net.set_scales(None)
    return net.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return digits(False, size=8).tensors[0][:16]


@pytest.fixture(scope="module", params=["fp32", "ter"])
def exported(request, images, tmp_path_factory):
    """(network, file bytes, interpreter loaded from them)."""
    net = build(tmp_path_factory.mktemp("cfg"), quantize=request.param == "ter")
    data = ne.to_bytes(nir_tsslbp.tsslbp_graph(net))
    return net, data, nir_torch.load(data)


# --------------------------------------------------------------------------- interpreter


def one_neuron_graph(tau_m: float, tau_s: float, dt: float = 1e-4) -> nir.NIRGraph:
    one = np.array([1])
    return nir.NIRGraph(
        nodes={"input": nir.Input(input_type={"input": one}),
               "lif": nir_tsslbp.lif_node([1], tau_m, 1.0, dt),
               "trace": nir_tsslbp.trace_node([1], tau_s, dt),
               "output": nir.Output(output_type={"output": one})},
        edges=[("input", "lif"), ("lif", "trace"), ("trace", "output")],
        metadata={"dt": dt})


def test_lif_and_li_steps_by_hand():
    """I = 0.625 at every step, tau_m = 2, V_th = 1: u = 0.625, 0.9375, 1.09375 (spike, reset
    to 0), 0.625; the trace with tau_s = 2: 0, 0, 0.5, 0.25 (all exact in float32)."""
    interp = nir_torch.load(ne.to_bytes(one_neuron_graph(2.0, 2.0)))
    rec = interp.record(torch.full((1, 1, 4), 0.625))
    assert rec.spikes["lif"].flatten().tolist() == [0.0, 0.0, 1.0, 0.0]
    assert rec.outputs.flatten().tolist() == [0.0, 0.0, 0.5, 0.25]
    with pytest.raises(ValueError, match="dt=0.001 differs from the dt=0.0001"):
        nir_torch.load(one_neuron_graph(2.0, 2.0), dt=1e-3)
    graph = one_neuron_graph(2.0, 2.0)
    graph.nodes["trace"] = nir.Delay(delay=np.array([1e-4]))
    with pytest.raises(ValueError, match="node 'trace': Delay is not one of"):
        nir_torch.load(graph)


def test_interpreter_matches_the_tsslbp_neuron_bitwise():
    """Random currents through the LIF + LI nodes give exactly ``tsslbp.torch_forward``'s
    trace, for tau_m and tau_s whose reciprocals are not exact in float32."""
    tsslbp = nir_tsslbp.tsslbp
    torch.manual_seed(1)
    current = torch.rand(200, 1, 12) * 0.9
    graph = one_neuron_graph(7.0, 3.0, dt=1e-3)
    a, u, _ = tsslbp.torch_forward(current, 1.0 / 7.0, 3.0, 1.0)
    rec = nir_torch.load(graph).record(current)
    assert torch.equal(rec.outputs.reshape(12, -1), a)
    assert torch.equal(rec.spikes["lif"].reshape(12, -1), (u > 1.0).float())
    assert 0 < int((u > 1.0).sum()) < u.numel()


def test_pooling_conv_runs_per_channel_as_the_network_pools(exported):
    """The diagonal pooling Conv2d gives the pooling layer's values bitwise; with one channel's
    kernel changed it is an ordinary convolution (the dense path), equal within rounding."""
    net, data, _ = exported
    pool = next(layer for layer in net.layers if layer.type == "pooling")
    graph = ne.read(data)
    x = torch.rand(3, 8, 8, 8, STEPS)
    sub = nir.NIRGraph(nodes={"input": nir.Input(input_type={"input": np.array([8, 8, 8])}),
                              "pool": graph.nodes["pooling_1"],
                              "output": nir.Output(output_type={"output": np.array([8, 4, 4])})},
                       edges=[("input", "pool"), ("pool", "output")], metadata={"dt": 1e-4})
    assert torch.equal(nir_torch.load(sub)(x), pool(x))
    sub.nodes["pool"].weight = sub.nodes["pool"].weight.copy()
    sub.nodes["pool"].weight[0, 0, 0, 0] = 2.0
    dense = nir_torch.load(sub)(x)
    want = pool(x)
    want[:, 0] += (2.0 - np.float32(1.1)) * x[:, 0, ::2, ::2]
    assert torch.allclose(dense, want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- the mapping


def test_nodes_and_parameters(exported):
    net, data, _ = exported
    graph = ne.read(data)
    kinds = {name: type(node).__name__ for name, node in graph.nodes.items()}
    chain = [
        ("input", "Input"), ("conv_1", "Conv2d"), ("conv_1_lif", "LIF"),
        ("conv_1_trace", "LI"), ("conv_2", "Conv2d"), ("conv_2_lif", "LIF"),
        ("conv_2_trace", "LI"), ("pooling_1", "Conv2d"), ("flatten", "Flatten"),
        ("FC_1", "Linear"), ("FC_1_lif", "LIF"), ("FC_1_trace", "LI"), ("output", "Linear"),
        ("output_lif", "LIF"), ("output_trace", "LI"), ("nir_output", "Output")]
    assert kinds == dict(chain)
    names = [n for n, _ in chain]
    assert graph.edges == list(zip(names[:-1], names[1:]))  # a chain; dropout left out
    dt = ne.DEFAULT_DT
    lif, li = graph.nodes["conv_2_lif"], graph.nodes["conv_2_trace"]
    assert lif.tau.shape == (8, 8, 8) and lif.tau.dtype == np.float64
    assert np.all(lif.tau == TAU_M * dt) and np.all(lif.r == TAU_M)
    assert np.all(lif.v_leak == 0) and np.all(lif.v_reset == 0) and np.all(lif.v_threshold == 1)
    assert np.all(li.tau == TAU_S * dt) and np.all(li.r == 1) and np.all(li.v_leak == 0)
    assert graph.nodes["output_trace"].tau.shape == (10,)
    pool = graph.nodes["pooling_1"].weight
    assert pool.shape == (8, 8, 2, 2)
    assert np.all(pool[range(8), range(8)] == np.float32(1.1))
    assert np.count_nonzero(pool) == 8 * 4
    meta = graph.metadata
    assert (meta["dt"], meta["tau_m"], meta["tau_s"], meta["timesteps"]) == (dt, TAU_M, TAU_S,
                                                                              STEPS)
    assert meta["firing"] == ne.FIRING and "PSP of the image" in meta["input"]


def test_weights_are_the_exact_quantized_weights(exported):
    net, data, _ = exported
    graph = ne.read(data)
    for layer in net.weight_layers:
        stored = graph.nodes[layer.name].weight
        used = layer.effective_weight().detach()
        assert np.array_equal(stored, used.squeeze(-1).numpy() if used.dim() == 5
                              else used.numpy())
        if layer.quantized:
            scale = float(layer.scale)
            assert set(np.unique(stored / scale).tolist()) <= set(levels("ter"))


def test_spikes_and_output_identical(exported, images):
    net, _, interp = exported
    result = nir_tsslbp.compare(net, interp, images)
    assert result.exact, result.problem()
    assert list(result.spikes) == SPIKING
    assert all(result.spikes[n] > 0 for n in SPIKING), result.spikes  # every layer fires
    ref = nir_tsslbp.tsslbp_recording(net, images)
    assert ref.outputs.shape == (STEPS, 16, 10)


def differ(net, images, graph) -> ne.RoundTrip:
    return nir_tsslbp.compare(net, nir_torch.load(ne.to_bytes(graph)), images)


def test_a_wrong_trace_fails_where_predicted(images, tmp_path):
    """tau_s + 1 in the LI nodes: conv_1 sees the input PSP (outside the graph), so its spikes
    stay identical; every later layer reads a wrong trace and differs, and so does the output.
    Dropping the traces (spikes straight into the next layer) does the same."""
    net = build(tmp_path, quantize=True)
    graph = nir_tsslbp.tsslbp_graph(net)
    for node in graph.nodes.values():
        if isinstance(node, nir.LI):
            node.tau = node.tau / TAU_S * (TAU_S + 1)
    result = differ(net, images, graph)
    assert result.mismatches["conv_1"] == 0
    assert all(result.mismatches[n] > 0 for n in SPIKING[1:]), result.mismatches
    assert not result.outputs_equal and not result.exact

    graph = nir_tsslbp.tsslbp_graph(net)
    for name in ("conv_1", "conv_2", "FC_1"):
        del graph.nodes[name + "_trace"]
    names = list(graph.nodes)
    graph.edges = list(zip(names[:-1], names[1:]))
    result = differ(net, images, graph)
    assert result.mismatches["conv_1"] == 0 and result.mismatches["conv_2"] > 0

    target = tmp_path / "net.nir"
    target.write_bytes(b"old")
    with pytest.raises(UserError, match=r"mismatching spikes per layer: \{'conv_2': .*"
                                        r"net\.nir not written"):
        ne.write_checked(lambda: graph, lambda data: differ(net, images, ne.read(data)),
                         str(target))
    assert target.read_bytes() == b"old"


def test_conv_after_a_linear_layer_is_refused(tmp_path):
    layers = {
        "FC_1": {"type": "linear", "qtype": "nq", "n_inputs": 192, "n_outputs": 4,
                 "threshold": 1},
        "conv_1": {"type": "conv", "qtype": "nq", "in_channels": 4, "out_channels": 10,
                   "kernel_size": 1, "threshold": 1},
    }
    params = network_parser.parse(str(tiny_config(tmp_path, layers=layers)))
    net = cnns.Network(params["Network"], params["Layers"], [3, 8, 8], quantize=False)
    with pytest.raises(ne.NIRExportError, match=r"^cannot export layer 'conv_1' \(conv after a "
                                                r"linear layer\): NIR has no node"):
        nir_tsslbp.tsslbp_graph(net)


# --------------------------------------------------------------------------- other readers


def test_snntorch_and_norse_cannot_read_the_trace(tmp_path):
    """Neither importer has a ``nir.LI`` node (docs/nir.md): snnTorch names it, Norse maps it
    to nothing and nirtorch fails on the first edge into it."""
    data = ne.to_bytes(nir_tsslbp.tsslbp_graph(build(tmp_path, quantize=True)))
    pytest.importorskip("snntorch")
    with pytest.raises(ValueError, match="Unknown node type <class 'nir.ir.neuron.LI'>"):
        import_graph("snntorch", data)
    pytest.importorskip("norse")
    with pytest.raises(KeyError, match="conv_1_trace"):
        import_graph("norse", data)


# --------------------------------------------------------------------------- the script


def test_missing_config_is_one_line(tmp_path, monkeypatch):
    from clitools import inproc

    code, out, err = inproc(SCRIPT, ["-config", "nope.yaml"], tmp_path, monkeypatch)
    assert code == 1 and out == "" and err.splitlines() == [
        "error: config file not found: nope.yaml"], err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # the library round trips above run in the default tier
def test_script_end_to_end(tmp_path, images):
    net = build(tmp_path, quantize=True)
    fp32 = copy.deepcopy(build(tmp_path, quantize=False, seed=1))
    (tmp_path / "trained_params").mkdir()
    state = dict(net.state_dict(), **net.scales())
    torch.save(state, tmp_path / "trained_params/TSSL_BP_DIGITS_ter_cbp_prequantized.pth")
    torch.save(fp32.state_dict(), tmp_path / "trained_params/TSSL_BP_DIGITS_fp32_pretrained.pth")
    env = dict(os.environ, CBP_NO_PROGRESS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("CBP_FAILPOINT", None)
    cifar = yaml.safe_load((TSSL_DIR / "Networks" / "CIFAR10_ter.yaml").read_text())
    cifar["Network"]["data_path"] = str(tmp_path / "no_cifar")
    (tmp_path / "CIFAR10_ter.yaml").write_text(yaml.safe_dump(cifar))
    config = ["-config", "DIGITS_ter.yaml", "-device", "cpu"]
    runs = [subprocess.Popen([sys.executable, str(SCRIPT), *config, *extra], cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for extra in ([], ["-quant", "fp32", "-dt", "1e-3"], ["-method", "ste"],
                          ["-config", "CIFAR10_ter.yaml"])]
    (ter_out, ter_err), (fp_out, fp_err), (ste_out, ste_err), (cf_out, cf_err) = (
        p.communicate(timeout=120) for p in runs)
    assert runs[0].returncode == 0, ter_err
    assert ("exported ./trained_params/TSSL_BP_DIGITS_ter.nir (ter, T=5, dt=0.0001): round "
            "trip exact on 16 test images, spikes identical in all 4 layers") in ter_out
    written = tmp_path / "trained_params/TSSL_BP_DIGITS_ter.nir"
    assert nir_tsslbp.compare(net, nir_torch.load(str(written)), images).exact

    assert runs[1].returncode == 0, fp_err
    fp_file = tmp_path / "trained_params/TSSL_BP_DIGITS_fp32.nir"
    assert ne.read(str(fp_file)).metadata["dt"] == 1e-3
    assert nir_tsslbp.compare(fp32, nir_torch.load(str(fp_file)), images).exact

    assert runs[2].returncode != 0 and ste_out == ""
    lines = ste_err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: prequantized checkpoint ./trained_params/TSSL_BP_DIGITS_ter_ste_"), ste_err
    assert not (tmp_path / "trained_params/TSSL_BP_DIGITS_ter_ste.nir").exists()

    lines = cf_err.strip().splitlines()  # no CIFAR-10 files: one line naming -download
    assert runs[3].returncode != 0 and cf_out == "" and len(lines) == 1, cf_err
    assert lines[0].startswith("error: ") and "-download" in lines[0], cf_err
    assert not (tmp_path / "trained_params/TSSL_BP_CIFAR10_ter.nir").exists()
