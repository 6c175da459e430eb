"""NIR export of the STBP network (cbp.nir_export, CBP-QSNN-STBP/export_nir.py): exact weights,
spike-for-spike round trip through a NIR file and spikingjelly's importer, error messages,
atomic writes and the command-line script."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from nir_consumers import CONSUMERS, import_graph, restart
from nir_consumers import record as consumer_record
from pipelines import load_pipeline
from torch import nn

from cbp import QuantMixin, files, levels
from cbp import nir_export as ne
from cbp.data import digits

pytest.importorskip("nir")
pytest.importorskip("nirtorch")

STBP_DIR = Path(__file__).resolve().parents[1] / "CBP-QSNN-STBP"
SCRIPT = STBP_DIR / "export_nir.py"
_model, _q_model, stbp_nir = load_pipeline(STBP_DIR, "model", "q_model", "nir_stbp")
Conv_SNN, Q_Conv_SNN, scale_init = _model.Conv_SNN, _q_model.Q_Conv_SNN, _model.scale_init
LAYERS = _model.LAYER_NAMES

WIDTH, T, THRESH, GAIN = 0.0625, 4, 0.5, 3.0  # the gain keeps every layer firing at this width
CASES = [("fp32", 0.25), ("ter", 0.8), ("bin", 0.5)]  # (weights, decay)

pytestmark = pytest.mark.usefixtures("one_thread")


def build(quant: str, decay: float, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    kw = dict(decay=decay, thresh=THRESH, lens=0.5, timesteps=T, width=WIDTH)
    model = Conv_SNN(10, **kw) if quant == "fp32" else Q_Conv_SNN(10, mode=quant, **kw)
    scale_init(model, GAIN)
    for m in model.modules():
        if isinstance(m, QuantMixin):
            m.init_scale()
    return model.eval()


def used_weight(layer: nn.Module) -> torch.Tensor:
    return (layer.quantized_weight() if isinstance(layer, QuantMixin) else layer.weight).detach()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return digits(False).tensors[0][:8]


@pytest.fixture(scope="module", params=CASES, ids=[q for q, _ in CASES])
def exported(request, images, tmp_path_factory):
    """(quant, model, graph read back from the file, imported graph module)."""
    quant, decay = request.param
    model = build(quant, decay)
    path = str(tmp_path_factory.mktemp("nir") / f"stbp_{quant}.nir")
    stbp_nir.export_stbp(model, images, path)
    graph = ne.read(path)
    return quant, model, graph, ne.load(path)


def stbp_spikes(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The network's output and every layer's spikes [T, ...] (hooks on model.spike[name])."""
    steps: dict[str, list[torch.Tensor]] = {n: [] for n in LAYERS}
    hooks = [model.spike[n].register_forward_hook(
        lambda _m, _i, out, n=n: steps[n].append(out.clone())) for n in LAYERS]
    try:
        with torch.no_grad():
            out = model(images)
    finally:
        for h in hooks:
            h.remove()
    return out, {n: torch.stack(s) for n, s in steps.items()}


def test_weights_are_the_exact_quantized_weights(exported):
    quant, model, graph, gm = exported
    for name in LAYERS:
        layer = getattr(model, name)
        expected = used_weight(layer)
        in_file = torch.from_numpy(np.asarray(graph.nodes[name].weight))
        assert torch.equal(in_file, expected), name
        assert torch.equal(getattr(gm, name).weight, expected), name
        assert torch.equal(torch.from_numpy(np.asarray(graph.nodes[name].bias)),
                           layer.bias.detach()), name
        if isinstance(layer, QuantMixin):  # levels x scale only
            grid = torch.tensor(levels(quant), dtype=expected.dtype) * layer.scale.detach()
            assert torch.isin(in_file, grid).all(), name
            assert not torch.equal(expected, layer.weight.detach())  # not the latent weight


def test_neuron_parameters(exported):
    _, model, graph, gm = exported
    node = graph.nodes["conv1" + ne.NEURON_SUFFIX]
    # the NIR rule v > v_threshold is STBP's: the file holds thresh itself, spikingjelly
    # (v >= v_threshold) the next float32 above it
    assert np.all(np.asarray(node.v_threshold) == THRESH) and graph.metadata["firing"] == ne.FIRING
    assert getattr(gm, "conv1" + ne.NEURON_SUFFIX).module.v_threshold == ne.above(THRESH)
    assert np.all(np.asarray(node.v_reset) == 0) and np.all(np.asarray(node.v_leak) == 0)
    lif = getattr(gm, "fc3" + ne.NEURON_SUFFIX).module
    assert lif.c_decay == 0.0 and np.float32(lif.v_decay) == np.float32(model.decay)
    assert float(graph.metadata["dt"]) == ne.DEFAULT_DT
    assert [n for n, _ in ne.neuron_modules(gm)] == [n + ne.NEURON_SUFFIX for n in LAYERS]


def test_spikes_and_output_identical(exported, images):
    _, model, _, gm = exported
    out, ref = stbp_spikes(model, images)
    got = ne.record(gm, [images] * T)
    for name in LAYERS:
        s, g = ref[name], got.spikes[name + ne.NEURON_SUFFIX]
        assert s.shape[0] == T and g.shape == s.shape, name
        assert 0 < int(s.sum()) < s.numel(), f"{name}: no activity, the test could not fail"
        assert torch.equal(g, s), f"{name}: {int((g != s).sum())} spikes differ"
    assert torch.equal(got.outputs, ref["fc3"])
    assert torch.equal(ne.rate(got.outputs), out)
    assert torch.equal(ne.rate(ne.run(gm, [images] * T)), out)
    assert stbp_nir.compare(model, gm, images).exact


def at_threshold(quant: str = "fp32", decay: float = 0.25) -> nn.Module:
    """A network whose conv1 input current is exactly thresh (even channels) or the float32
    above it (odd channels) at every neuron and step."""
    model = copy.deepcopy(build(quant, decay))
    with torch.no_grad():
        model.conv1.weight.zero_()
        model.conv1.bias.fill_(THRESH)
        model.conv1.bias[1::2] = ne.above(THRESH)
    return model


@pytest.fixture(scope="module")
def boundary(images) -> tuple[nn.Module, bytes]:
    """(the at_threshold network, its NIR file's bytes)."""
    model = at_threshold()
    return model, ne.to_bytes(stbp_nir.export_stbp(model, images))


def test_plain_threshold_differs_where_membrane_equals_threshold(images, boundary):
    """Where conv1's input current is exactly thresh, STBP (u > thresh) stays silent at step 0,
    as NIR's rule does; spikingjelly's import alone (u >= v_threshold) fires."""
    model, data = boundary
    assert np.float32(ne.above(THRESH)) == np.nextafter(np.float32(THRESH), np.float32(1))
    assert ne.above(ne.below(THRESH)) == THRESH and ne.below(1.0) == 1 - 2.0**-24
    graph = ne.read(data)
    exact = stbp_nir.compare(model, ne.load(graph), images)
    assert exact.exact and exact.spikes["conv1"] > 0
    plain = stbp_nir.compare(model, ne.load(graph, nir_rule=False), images)
    # STBP at thresh: silent, fires, silent, ... (u = thresh, then thresh * (1 + decay));
    # plain: always.  Above thresh both fire at every step.
    neurons = images.shape[0] * model.conv1.out_channels // 2 * 32 * 32
    assert plain.mismatches["conv1"] == neurons * T // 2 and not plain.exact


@pytest.fixture(scope="module")
def ter_file(images) -> tuple[nn.Module, bytes]:
    """(a ternary network, its NIR file's bytes), read by both consumers."""
    model = build("ter", 0.8)
    return model, ne.to_bytes(stbp_nir.export_stbp(model, images))


def consumer_mismatches(consumer: str, model: nn.Module, images: torch.Tensor,
                        data) -> tuple[dict[str, int], bool]:
    """Run the exported file's bytes (or a graph) in ``consumer`` on the whole batch: differing
    spikes per layer, and whether the output equals the network's."""
    out, ref = stbp_spikes(model, images)
    net = import_graph(consumer, data)
    got = consumer_record(net, [images] * T, [n + ne.NEURON_SUFFIX for n in LAYERS])
    restart(consumer, net)  # a second sequence starts from rest
    assert torch.equal(consumer_record(net, [images] * T, []).outputs, got.outputs)
    mismatches, _ = ne.spike_mismatches(ref, got.spikes,
                                        {n: n + ne.NEURON_SUFFIX for n in LAYERS})
    return mismatches, (torch.equal(got.outputs, ref["fc3"])
                        and torch.equal(ne.rate(got.outputs), out))


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_snntorch_and_norse_reproduce_the_network(consumer, images, ter_file):
    """A batch of 4 through snnTorch's / Norse's importer (dt from the metadata, per-sample
    Flatten): every layer's spikes at every step and the output identical."""
    (model, data), images = ter_file, images[:4]
    _, ref = stbp_spikes(model, images)
    assert all(0 < int(ref[n].sum()) < ref[n].numel() for n in LAYERS)
    mismatches, outputs_equal = consumer_mismatches(consumer, model, images, data)
    assert not any(mismatches.values()) and outputs_equal, mismatches


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_snntorch_and_norse_at_the_threshold(consumer, images, boundary):
    """conv1's current is exactly thresh or the float32 above it: NIR's v > v_threshold with
    the file's thresh gives STBP's spikes in both simulators; a file holding the float32 above
    thresh (the spikingjelly threshold) would not fire on it at step 0."""
    (model, data), images = boundary, images[:2]
    _, ref = stbp_spikes(model, images)
    half = ref["conv1"][0].numel() // 2
    assert [int(s.sum()) for s in ref["conv1"]] == [half, 2 * half] * (T // 2)
    mismatches, outputs_equal = consumer_mismatches(consumer, model, images, data)
    assert not any(mismatches.values()) and outputs_equal, mismatches
    old = ne.nir_thresholds(ne.read(data), ne.above)
    assert consumer_mismatches(consumer, model, images, old)[0]["conv1"] == half * T // 2


def test_files_of_the_earlier_threshold_rule_load_unchanged(exported):
    """A file whose metadata say v >= v_threshold holds spikingjelly thresholds: kept as is."""
    _, _, graph, _ = exported
    old = copy.deepcopy(graph)
    ne.nir_thresholds(old, ne.above)
    old.metadata = {**old.metadata, "firing": "v >= v_threshold = next float32 above thresh"}
    assert not ne.spec_firing(old) and ne.spec_firing(graph)
    lif = getattr(ne.load(old), "conv1" + ne.NEURON_SUFFIX).module
    assert lif.v_threshold == ne.above(THRESH)


def test_unsupported_layer_is_named(images):
    model = build("fp32", 0.25)
    model.pool2 = nn.MaxPool2d(2)
    with pytest.raises(ne.NIRExportError, match=r"cannot export layer 'pool2' \(MaxPool2d\): "
                                                r"NIR has no node for it"):
        stbp_nir.export_stbp(model, images)
    model = build("ter", 0.25)
    model.conv3 = nn.Conv2d(model.conv3.in_channels, model.conv3.out_channels, 3, padding=1,
                            groups=2)
    with pytest.raises(ne.NIRExportError, match=r"'conv3' \(Conv2d\): grouped convolution"):
        stbp_nir.export_stbp(model, images)


def test_dt_is_stored_and_checked(exported):
    _, _, graph, _ = exported
    with pytest.raises(ValueError, match="differs from the dt"):
        ne.load(graph, dt=1e-3)
    assert ne.load(graph, dt=ne.DEFAULT_DT) is not None


def test_failed_write_keeps_the_existing_file(exported, tmp_path, monkeypatch):
    _, _, graph, _ = exported
    target = tmp_path / "net.nir"
    target.write_bytes(b"old")
    monkeypatch.setattr(files, "_writes", 0)
    monkeypatch.setenv("CBP_FAILPOINT", "1:oserror")
    with pytest.raises(files.WriteError, match="net.nir"):
        ne.save(graph, str(target))
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.nir"]


def test_a_round_trip_that_differs_writes_nothing(images, tmp_path):
    """A graph whose spikes differ (the plain threshold, on inputs that hit it exactly, or here
    a perturbed weight) is refused with one line; the existing file stays as it was."""
    from cbp.runtime import UserError

    model = build("ter", 0.8)
    target = tmp_path / "net.nir"
    target.write_bytes(b"old")
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.conv2.weight.mul_(-1.0)  # the file would not hold this network
    with pytest.raises(UserError, match=r"mismatching spikes per layer: .*net\.nir not written"):
        ne.write_checked(lambda: stbp_nir.export_stbp(other, images),
                         lambda data: stbp_nir.compare(model, ne.load(data), images), str(target))
    assert target.read_bytes() == b"old"
    result = ne.write_checked(lambda: stbp_nir.export_stbp(model, images),
                              lambda data: stbp_nir.compare(model, ne.load(data), images), str(target))
    assert result.exact and set(ne.read(str(target)).nodes) >= {f"{n}_lif" for n in LAYERS}


@pytest.mark.slow  # the library round trips above run in the default tier
def test_script_end_to_end(tmp_path, images):
    model = build("ter", 0.5)
    (tmp_path / "trained_params").mkdir()
    torch.save(model.state_dict(), tmp_path / "trained_params/STBP_DIGITS_ter_cbp_prequantized.pth")
    common = ["--dataset", "DIGITS", "--width", str(WIDTH), "--T", str(T), "--decay", "0.5",
              "--batch_size", "8", "--device", "cpu"]
    env = dict(os.environ, CBP_NO_PROGRESS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("CBP_FAILPOINT", None)
    runs = [subprocess.Popen([sys.executable, str(SCRIPT), *common, *extra], cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for extra in (["--quant", "ter"], ["--quant", "bin"])]
    (ok_out, ok_err), (bad_out, bad_err) = (p.communicate(timeout=120) for p in runs)

    assert runs[0].returncode == 0, ok_err
    assert len(ok_out.strip().splitlines()) == 1, ok_out
    assert "round trip exact on 8 test images, spikes identical in all 10 layers" in ok_out
    written = tmp_path / "trained_params/STBP_DIGITS_ter.nir"
    assert written.is_file()
    gm = ne.load(str(written))
    assert stbp_nir.compare(model, gm, images).exact

    assert runs[1].returncode != 0
    assert bad_out == ""
    lines = bad_err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: prequantized checkpoint "
                                                   "./trained_params/STBP_DIGITS_bin_"), bad_err
    assert not (tmp_path / "trained_params/STBP_DIGITS_bin.nir").exists()
