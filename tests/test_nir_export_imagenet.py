"""NIR export of the ImageNet SEW-ResNets (sewcommon/nir_export.py, ImageNet/export_nir.py):
spike-for-spike round trip of every IF layer through the file's bytes, the stem's padded max
pooling, named errors, and the command-line script on a stand-in validation set."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import inproc
from torch import nn

from cbp import nir_export as ne

pytest.importorskip("nir")
pytest.importorskip("spikingjelly")

SEW_DIR = Path(__file__).resolve().parents[1] / "CBP-QSNN-SEW-ResNet"
SCRIPT = SEW_DIR / "ImageNet" / "export_nir.py"
if str(SEW_DIR) not in sys.path:
    sys.path.insert(0, str(SEW_DIR))

from sewcommon import imagenet_nets, neurons  # noqa: E402
from sewcommon import nir_export as sne  # noqa: E402

T, WIDTH = 2, 0.0625

pytestmark = pytest.mark.usefixtures("one_thread")


def build(model: str, mode: str | None, images: torch.Tensor, connect_f: str = "ADD",
          seed: int = 0) -> nn.Module:
    """A SEW-ResNet whose IF layers fire on ``images``: random BN affine (bias 0.3 .. 1), BN
    running statistics from one pass over ``images``."""
    torch.manual_seed(seed)
    net = getattr(imagenet_nets, model)(T=T, connect_f=connect_f, mode=mode, width=WIDTH)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 1.0
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(0.3, 1.0)
        net.train()(images)
    neurons.reset_net(net)
    return net.eval()


def images_(n: int, side: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_and_iand_and_soft_reset_are_named():
    """Refused while the layers are rebuilt (no forward pass)."""
    images = images_(1, 32)
    net = imagenet_nets.sew_resnet18(T=T, connect_f="IAND", mode="ter", width=WIDTH).eval()
    with pytest.raises(ne.NIRExportError, match=r"^cannot export layer 'layer1.0' \(BasicBlock, "
                                                r"connect_f='IAND'\): NIR has no node for the "
                                                r"element-wise product; only ADD maps$"):
        sne.export(net, images)
    other = imagenet_nets.sew_resnet18(T=T, connect_f="ADD", width=WIDTH).eval()
    other.layer2[0].downsample[1].v_reset = None
    with pytest.raises(ne.NIRExportError, match=r"^cannot export layer 'layer2.0.downsample.1' "
                                                r"\(IFNode\): soft reset"):
        sne.export(other, images)


def test_padded_integer_max_pool_is_max_pool():
    x = torch.randint(0, 2, (2, 3, 9, 9), generator=torch.Generator().manual_seed(0)).float()
    pool = nn.MaxPool2d(3, 2, 1)
    assert torch.equal(ne.integer_max_pool("p", pool, 1)(x), pool(x))


@pytest.mark.slow
@pytest.mark.parametrize("model,mode", [("sew_resnet18", "ter"), ("sew_resnet34", None)])
def test_round_trip_is_exact(model, mode):
    import nir

    images = images_(2)
    net = build(model, mode, images)
    graph = ne.read(ne.to_bytes(sne.export(net, images)))
    r = sne.compare(net, sne.load(graph), images)
    assert r.exact, r.problem()
    ifs = 1 + (8 if model == "sew_resnet18" else 16) * 2 + 3  # stem, 2 per block, downsamples
    assert len(r.spikes) == ifs and all(0 < v < r.outputs[k] for k, v in r.spikes.items())
    assert r.max_logit_diff <= r.bound
    node = graph.nodes["layer1_0_sn1"]
    assert isinstance(node, nir.IF) and np.all(np.asarray(node.v_threshold) == 1 - 2.0**-24)
    assert np.allclose(np.asarray(node.r), 1 / ne.DEFAULT_DT, rtol=1e-12, atol=0)
    pools = [v for v in graph.nodes.values() if isinstance(v, nir.AvgPool2d)]
    assert sorted(np.asarray(p.padding).tolist() for p in pools) == [[0, 0], [1, 1]]
    assert int(graph.metadata["timesteps"]) == T


@pytest.mark.slow
def test_script_end_to_end(tmp_path, monkeypatch):
    from sewcommon import data

    images = images_(3)
    net = build("sew_resnet18", "bin", images, seed=2)
    (tmp_path / "trained_params").mkdir()
    torch.save(net.state_dict(),
               tmp_path / "trained_params/SEW_ResNet_18_ImageNet_bin_cbp_prequantized.pth")
    val = torch.utils.data.TensorDataset(images, torch.arange(3))
    monkeypatch.setattr(data, "image_folder", lambda path, transform, cache: val)
    args = ["--model", "sew_resnet18", "--connect_f", "ADD", "--T", str(T), "-b", "2", "-j", "0",
            "--device", "cpu", "--width", str(WIDTH), "--quant", "bin"]
    code, out, err = inproc(SCRIPT, args, tmp_path, monkeypatch)
    assert code == 0, err
    assert out.startswith("exported ./trained_params/SEW_ResNet_18_ImageNet_bin.nir (sew_resnet18 "
                          f"bin, T={T}, dt=0.0001): round trip exact on 2 test samples, spikes "
                          "identical in all 20 IF layers"), out
    written = tmp_path / "trained_params/SEW_ResNet_18_ImageNet_bin.nir"
    assert sne.compare(net, sne.load(str(written)), images).exact
    code, out, err = inproc(SCRIPT, [*args[:-1], "fp32"], tmp_path, monkeypatch)
    assert code == 1 and out == "" and err.startswith(
        "error: checkpoint ./trained_params/sew18_checkpoint_319.pth not found"), err
