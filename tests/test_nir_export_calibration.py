"""NIR export of SNN-Calibration's converted VGG (CBP-QSNN-SNN-Calibration/nir_calibration.py,
export_nir.py): the soft-reset IF (integrator, threshold, recurrent Scale(-1)) worked out by
hand in cbp.nir_torch, a spike-for-spike round trip of a converted network on the DIGITS
images, checks that fail where they should, refusals, what snnTorch and Norse make of the file,
and the script."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import inproc
from nir_consumers import import_graph
from pipelines import load_pipeline

from cbp import nir_export as ne
from cbp.runtime import UserError

nir = pytest.importorskip("nir")
nir_torch = pytest.importorskip("cbp.nir_torch")

CAL_DIR = Path(__file__).resolve().parents[1] / "CBP-QSNN-SNN-Calibration"
SCRIPT = CAL_DIR / "export_nir.py"
E, mq, nir_calibration = load_pipeline(CAL_DIR, "calib_engine", "main_calibration_quantize_cbp",
                                       "nir_calibration")
STEPS = 4
BASE = ["--dataset", "DIGITS", "--dpath", ".", "--device", "cpu", "--width", "0.0625",
        "--usebn", "--subset", "16", "--batch_size", "8", "--no_progress"]
FLAGS = BASE + ["--T", str(STEPS), "--quant", "ter"]
FIRST = "model.features.0"
POOLS = ["model.features.6", "model.features.13", "model.features.23", "model.features.33",
         "model.features.43"]

pytestmark = pytest.mark.usefixtures("one_thread")


def one_neuron(reset_edge: bool = True) -> nir.NIRGraph:
    """Input -> soft-reset IF (threshold 1) -> Output (the integrator's potential)."""
    one = np.array([1])
    nodes, edges = ne.soft_reset_if("n", [1], 1.0, 1.0, ne.DEFAULT_DT)
    nodes = {"input": nir.Input(input_type={"input": one}), **nodes,
             "output": nir.Output(output_type={"output": one})}
    graph = nir.NIRGraph(nodes=nodes, edges=[*edges, ("input", "n_v"), ("n_v", "output")],
                         metadata={"dt": ne.DEFAULT_DT})
    if not reset_edge:  # (after construction: NIRGraph would give the spikes an Output)
        del graph.nodes["n_reset"]
        graph.edges = [e for e in graph.edges if "n_reset" not in e]
    return graph


@pytest.mark.parametrize("current, potentials, spikes", [
    # u = 0.625, 1.25 (spike, keeps 0.25), 0.875, 1.5 (spike), 1.125 (spike), 0.75
    (0.625, [0.625, 1.25, 0.875, 1.5, 1.125, 0.75], [0, 1, 0, 1, 1, 0]),
    # u reaches the threshold exactly: u >= theta fires (stored as the float32 below 1)
    (0.5, [0.5, 1.0, 0.5, 1.0, 0.5, 1.0], [0, 1, 0, 1, 0, 1]),
])
def test_soft_reset_steps_by_hand(current, potentials, spikes):
    interp = nir_torch.load(ne.to_bytes(one_neuron()))
    assert interp.delayed == {("n_reset", "n_v")}
    assert float(interp.graph.nodes["n_spike"].threshold[0]) == ne.below(1.0)
    rec = interp.record(torch.full((1, 1, 6), current))
    assert rec.outputs.flatten().tolist() == potentials
    assert rec.spikes["n_spike"].flatten().tolist() == spikes


def test_without_the_reset_edge_the_potential_only_grows():
    """The recurrent edge dropped: u = 0.625 t, spikes from the second step on."""
    rec = nir_torch.load(one_neuron(reset_edge=False)).record(torch.full((1, 1, 6), 0.625))
    assert rec.outputs.flatten().tolist() == [0.625 * t for t in range(1, 7)]
    assert rec.spikes["n_spike"].flatten().tolist() == [0, 1, 1, 1, 1, 1]


def test_lif_in_a_recurrent_graph_is_refused():
    graph = one_neuron()
    graph.nodes["n_spike"] = nir.LIF(tau=np.array([1e-3]), r=np.array([1.0]),
                                     v_leak=np.array([0.0]), v_threshold=np.array([1.0]),
                                     v_reset=np.array([0.0]))
    with pytest.raises(ValueError, match="node 'n_spike': LIF runs only in graphs without "
                                         "recurrent edges"):
        nir_torch.load(graph)


@pytest.fixture(scope="module")
def converted():
    """A converted (max-activation thresholds), CBP-quantized VGG16 of width 1/16 with light
    calibration's pooling biases, and the first 8 DIGITS test images."""
    args = mq.parse_args(FLAGS + ["--calib", "none"])
    torch.manual_seed(0)
    with torch.random.fork_rng():
        train, test = E.loaders(args, torch.device("cpu"))
        ann = E.build_ann(args)
        snn, _, _ = E.convert(args, ann, train, test, torch.device("cpu"), False)
        extras = {"net_snn": snn.state_dict(), "mem_pot_init_dict": E.mem_pot_dict(snn),
                  "pool_bias_dict": {n: torch.randn(m.weight.shape[0]) * 0.05
                                     for n, m in snn.spike_modules() if n in POOLS}}
        snn_q = E.load_calibrated_snn_q(args, extras, torch.device("cpu"))
        images, _ = next(iter(test))
    return snn_q.eval(), images


@pytest.fixture(scope="module")
def exported(converted):
    snn, _ = converted
    data = ne.to_bytes(nir_calibration.calibration_graph(snn))
    return data, nir_torch.load(data)


def test_graph_nodes_of_one_layer(converted, exported):
    snn, _ = converted
    graph = exported[1].graph
    assert {k: graph.metadata[k] for k in ("dt", "timesteps", "firing")} == {
        "dt": ne.DEFAULT_DT, "timesteps": STEPS, "firing": ne.FIRING}
    n = "model_features_6"  # the first pooling layer (light calibration bias, shift)
    kinds = {k: type(graph.nodes[k]).__name__ for k in graph.nodes if k.startswith(n + "_")
             or k == n}
    assert kinds == {n: "Conv2d", n + "_bias": "Conv2d", n + "_shift": "Conv2d",
                     n + "_current": "Scale", n + "_v": "I", n + "_spike": "Threshold",
                     n + "_reset": "Scale"}
    edges = [e for e in graph.edges if n in e[0] or n in e[1]]
    assert edges == [("model_features_3_spike", n), ("model_features_3_spike", n + "_bias"),
                     ("model_features_3_spike", n + "_shift"), (n, n + "_current"),
                     (n + "_bias", n + "_current"), (n + "_shift", n + "_current"),
                     (n + "_reset", n + "_v"), (n + "_v", n + "_spike"),
                     (n + "_spike", n + "_reset"), (n + "_current", n + "_v"),
                     (n + "_spike", "model_features_7"),
                     (n + "_spike", "model_features_7_shift")]
    pool = snn.model.features[6]
    w = graph.nodes[n].weight  # the depthwise kernels on the channel diagonal
    assert w.shape == (4, 4, 2, 2) and np.array_equal(w[range(4), range(4)],
                                                      pool.conv.weight[:, 0].numpy())
    assert not np.delete(w.reshape(16, 4), [0, 5, 10, 15], axis=0).any()
    assert np.array_equal(graph.nodes[n + "_bias"].bias, pool.extra_bias.numpy())
    assert graph.nodes[n + "_shift"].bias.tolist() == [0.5 / STEPS] * 4
    assert not graph.nodes[n + "_shift"].weight.any()
    assert graph.nodes[n + "_reset"].scale.flatten().tolist() == [-1.0] * 4 * 16 * 16
    assert len(exported[1].delayed) == len(snn.spike_modules()) == 18


def test_round_trip_is_exact(converted, exported):
    snn, images = converted
    result = nir_calibration.compare(snn, exported[1], images)
    assert result.exact, result.problem()
    assert len(result.spikes) == 18 and sum(v > 0 for v in result.spikes.values()) >= 15
    ref = nir_calibration.calibration_recording(snn, images)
    assert ref.outputs.shape == (STEPS, 8, 10)
    with torch.no_grad():
        assert torch.equal(ref.outputs[-1], snn(images))


def test_round_trip_is_exact_where_the_shift_is_rounded(converted):
    """T = 5: the shift theta / (2T) = 0.1 is not a float32; torch rounds it to float32 before it
    adds it, and so does the graph's constant node."""
    snn, images = converted
    net = copy.deepcopy(snn)
    net.T = 5
    for _, m in net.spike_modules():
        m.sim_length = 5
    graph = nir_calibration.calibration_graph(net)
    shift = graph.nodes["model_features_0_shift"].bias
    assert shift.dtype == np.float32 and shift[0] == np.float32(0.1) and float(shift[0]) != 0.1
    result = nir_calibration.compare(net, nir_torch.load(ne.to_bytes(graph)), images)
    assert result.exact, result.problem()
    assert graph.metadata["timesteps"] == 5


def test_check_fails_without_the_reset(converted, exported, tmp_path):
    """The recurrent edges dropped: the first layer's neurons integrate the same current
    ``I`` every step without reset, so they fire where ``(I + I) + ...`` reaches 1 - exactly
    the predicted spikes; the check reports the differences and nothing is written."""
    snn, images = converted
    graph = ne.read(exported[0])
    for name in [n for n in graph.nodes if n.endswith("_reset")]:
        del graph.nodes[name]
    graph.edges = [e for e in graph.edges if not e[0].endswith("_reset")
                   and not e[1].endswith("_reset")]
    got = nir_torch.load(graph).record(nir_calibration.network_input(snn, images))
    with torch.no_grad():
        current = snn.model.features[0].conv(images) + 0.5 / STEPS
    u, predicted = torch.zeros_like(current), []
    for _ in range(STEPS):
        u = u + current
        predicted.append((u >= 1.0).float())
    assert torch.equal(got.spikes["model_features_0_spike"], torch.stack(predicted))
    ref = nir_calibration.calibration_recording(snn, images).spikes[FIRST]
    result = nir_calibration.compare(snn, nir_torch.load(graph), images)
    assert result.mismatches[FIRST] == int((torch.stack(predicted) != ref).sum()) > 0
    out = tmp_path / "x.nir"
    with pytest.raises(UserError, match=r"round trip differs from the network on the first "
                                        r"test batch \(mismatching spikes per layer: "
                                        r"\{'model.features.0': \d+.*x.nir not written"):
        ne.write_checked(lambda: graph, lambda data: nir_calibration.compare(
            snn, nir_torch.load(data), images), str(out))
    assert not out.exists()


def test_check_fails_with_the_threshold_itself(converted):
    """Stored at theta = 1 itself instead of the float32 below, NIR's ``>`` misses the
    potentials that reach 1.0 exactly: with a current of 0.5 every step the network's neurons
    reach 1.0 and fire at steps 1 and 3; the graph's reach 1.0 (no spike), 1.5 (spike at step
    2, keeps 0.5) and 1.0 again: three differing spikes per neuron."""
    snn, images = converted
    net = copy.deepcopy(snn)
    first = net.model.features[0]
    with torch.no_grad():
        first.conv.weight.zero_()
        first.conv.bias.fill_(0.5 - 0.5 / STEPS)  # + the shift: exactly 0.5
    graph = nir_calibration.calibration_graph(net)
    graph.nodes["model_features_0_spike"].threshold[:] = 1.0
    result = nir_calibration.compare(net, nir_torch.load(ne.to_bytes(graph)), images)
    n = images.shape[0] * first.conv.out_channels * 32 * 32
    assert result.spikes[FIRST] == 2 * n and result.mismatches[FIRST] == 3 * n


@pytest.mark.parametrize("case, layer, why", [
    ("mem_pot_init", "model.features.3", "non-zero initial membrane potential (advanced "
     "calibration's mem_pot_init): NIR states start at zero and have no initial-value "
     "parameter"),
    ("negative_pool", "model.features.13", "pooling kernel with negative weights: its ReLU "
     "would act and NIR has no ReLU node"),
    ("bn_shift", "model.features.1", "it maps a silent neuron to a non-zero value and NIR has "
     "no bias node for feature maps"),
])
def test_what_nir_cannot_express_is_named(converted, case, layer, why):
    snn, _ = converted
    net = copy.deepcopy(snn)
    module = net.get_submodule(layer)
    with torch.no_grad():
        if case == "mem_pot_init":
            module.mem_pot_init = torch.zeros(1, 4, 32, 32)
            module.mem_pot_init[0, 2, 5, 7] = 0.25
        elif case == "negative_pool":
            module.conv.weight[3, 0, 1, 0] = -0.01
        else:
            module.bias[1] = 0.5
    kind = type(module).__name__
    with pytest.raises(ne.NIRExportError) as info:
        nir_calibration.calibration_graph(net)
    assert str(info.value) == f"cannot export layer '{layer}' ({kind}): {why}"


def test_zero_initial_potentials_and_a_scaling_batch_norm_export(converted):
    """A zero ``mem_pot_init`` tensor exports; a batch norm scaling spikes by 2 becomes a
    ``Scale(2)`` node and the round trip stays exact."""
    snn, images = converted
    net = copy.deepcopy(snn)
    net.model.features[3].mem_pot_init = torch.zeros(1, 4, 32, 32)
    with torch.no_grad():
        net.model.features[1].weight.fill_(2.0)
    graph = nir_calibration.calibration_graph(net)
    assert graph.nodes["model_features_1"].scale.flatten().tolist() == [2.0] * 4 * 32 * 32
    result = nir_calibration.compare(net, nir_torch.load(ne.to_bytes(graph)), images)
    assert result.exact, result.problem()


def test_snntorch_norse_and_spikingjelly_cannot_run_it(exported):
    """snnTorch 1.0, Norse 1.1 and spikingjelly map neither ``nir.I`` nor ``nir.Threshold`` nor
    ``nir.Scale``: snnTorch and spikingjelly stop at the first such node they map (the output
    integrator), Norse leaves them out and then misses the first one when it wires the edges."""
    data, _ = exported
    unknown = (r"^Unknown node type <class 'nir\.ir\.neuron\.I'>, mapping does not exist in "
               "node_map$")
    with pytest.raises(ValueError, match=unknown):
        import_graph("snntorch", data)
    with pytest.raises(ValueError, match=unknown):
        ne.load(data)
    with pytest.raises(KeyError) as info:
        import_graph("norse", data)
    assert info.value.args == ("model_features_0_current",)


@pytest.mark.slow
def test_script_writes_a_checked_file(converted, tmp_path, monkeypatch):
    snn, images = converted
    torch.save({"net": snn.state_dict(), "args": {"quant": "ter", "T": STEPS},
                "pool_bias_dict": {n: m.extra_bias for n, m in snn.spike_modules()
                                   if m.extra_bias is not None}}, tmp_path / "cbp_ckpt.pth")
    (tmp_path / "cbp_ckpt.nir").write_bytes(b"old")
    flags = BASE  # --quant and --T come from the checkpoint
    code, out, err = inproc(SCRIPT, [*flags, "--evaluate", "cbp_ckpt.pth"], tmp_path,
                            monkeypatch)
    assert code == 0, err
    assert re.fullmatch(r"exported cbp_ckpt.nir \(ter, T=4, dt=0.0001\): round trip exact on 8 "
                        r"test images, spikes identical in all 18 IF layers \(\d+ spikes\), "
                        r"outputs equal\n", out), out
    written = tmp_path / "cbp_ckpt.nir"
    assert nir_calibration.compare(snn, nir_torch.load(str(written)), images).exact
    # advanced calibration's initial potentials: one line naming the layer, nothing replaced
    before = written.read_bytes()
    ckpt = torch.load(tmp_path / "cbp_ckpt.pth", weights_only=True)
    ckpt["mem_pot_init_dict"] = {POOLS[0]: torch.full((1, 4, 16, 16), 0.125)}
    torch.save(ckpt, tmp_path / "cbp_ckpt.pth")
    code, out, err = inproc(SCRIPT, [*flags, "--evaluate", "cbp_ckpt.pth"], tmp_path,
                            monkeypatch)
    assert code == 1 and out == ""
    assert err.splitlines() == [
        f"error: cannot export layer '{POOLS[0]}' (SpikeModule_nq): non-zero initial membrane "
        "potential (advanced calibration's mem_pot_init): NIR states start at zero and have no "
        "initial-value parameter; cbp_ckpt.nir not written"], err
    assert written.read_bytes() == before
