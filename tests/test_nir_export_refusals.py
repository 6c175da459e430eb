"""What NIR cannot express: the export scripts end with one
``NIRExportError`` line naming the layer and write nothing (SNN-Calibration's initial membrane
potentials; a TSSL-BP convolution after a linear layer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from clitools import inproc
from pipelines import load_pipeline

pytest.importorskip("nir")

CALIB_DIR = Path(__file__).resolve().parents[1] / "CBP-QSNN-SNN-Calibration"
TSSL_DIR = Path(__file__).resolve().parents[1] / "CBP-QSNN-TSSL-BP"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_calibration_initial_potential_is_named(tmp_path, monkeypatch):
    """Advanced calibration's initial membrane potentials: NIR states start at zero.  Refused
    before any data is read."""
    (mq, engine) = load_pipeline(CALIB_DIR, "main_calibration_quantize_cbp", "calib_engine")
    flags = ["--dataset", "DIGITS", "--dpath", ".", "--device", "cpu", "--width", "0.125",
             "--usebn", "--T", "4", "--quant", "ter"]
    snn = engine.build_snn_q(mq.parse_args(flags))
    pot = torch.zeros(1, 8, 32, 32)
    pot[0, 3, 1, 2] = -0.5
    torch.save({"net": snn.state_dict(), "mem_pot_init_dict": {"model.features.0": pot}},
               tmp_path / "cbp_ckpt.pth")
    code, out, err = inproc(CALIB_DIR / "export_nir.py", [*flags, "--evaluate", "cbp_ckpt.pth"],
                            tmp_path, monkeypatch)
    assert code == 1 and out == "", out
    assert err.splitlines() == [
        "error: cannot export layer 'model.features.0' (SpikeModule_nq): non-zero initial "
        "membrane potential (advanced calibration's mem_pot_init): NIR states start at zero and "
        "have no initial-value parameter; cbp_ckpt.nir not written"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cbp_ckpt.pth"]
    code, _, err = inproc(CALIB_DIR / "export_nir.py", flags, tmp_path, monkeypatch)
    assert code == 1 and err.splitlines() == [
        "error: --evaluate CKPT is required: the CBP checkpoint to export"], err


def test_tssl_bp_conv_after_linear_is_named(tmp_path, monkeypatch):
    """A TSSL-BP config whose convolution follows a linear layer: NIR has no node to reshape
    the linear output into a feature map.  Refused before any checkpoint is read."""
    cfg = yaml.safe_load((TSSL_DIR / "Networks/DIGITS_bin.yaml").read_text())
    cfg["Network"]["image_size"] = 8
    cfg["Layers"] = {
        "FC_1": {"type": "linear", "qtype": "q", "n_inputs": 192, "n_outputs": 4,
                 "threshold": 1},
        "conv_out": {"type": "conv", "qtype": "nq", "in_channels": 4, "out_channels": 10,
                     "kernel_size": 1, "threshold": 1},
    }
    (tmp_path / "DIGITS_bin.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = inproc(TSSL_DIR / "export_nir.py", ["-config", "DIGITS_bin.yaml"],
                            tmp_path, monkeypatch)
    assert code == 1 and out == "", out
    assert err.splitlines() == [
        "error: cannot export layer 'conv_out' (conv after a linear layer): NIR has no node "
        "that turns the linear output back into a feature map; "
        "./trained_params/TSSL_BP_DIGITS_bin.nir not written"], err
    assert [p.name for p in tmp_path.iterdir()] == ["DIGITS_bin.yaml"]
