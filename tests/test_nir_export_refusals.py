"""Pipelines whose neurons NIR cannot express: the export scripts end with one
``NIRExportError`` line naming the layer and write nothing (SNN-Calibration's IF layers reset
by subtraction; TSSL-BP's neuron passes on an analog PSP trace)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from clitools import inproc
from pipelines import load_pipeline

pytest.importorskip("nir")

CALIB_DIR = Path(__file__).resolve().parents[1] / "CBP-QSNN-SNN-Calibration"
TSSL_DIR = Path(__file__).resolve().parents[1] / "CBP-QSNN-TSSL-BP"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_calibration_soft_reset_is_named(tmp_path, monkeypatch):
    (mq, engine) = load_pipeline(CALIB_DIR, "main_calibration_quantize_cbp", "calib_engine")
    flags = ["--dataset", "DIGITS", "--dpath", ".", "--device", "cpu", "--width", "0.125",
             "--usebn", "--T", "4", "--quant", "ter"]
    snn = engine.build_snn_q(mq.parse_args(flags))
    torch.save(snn.state_dict(), tmp_path / "cbp_ckpt.pth")
    code, out, err = inproc(CALIB_DIR / "export_nir.py", [*flags, "--evaluate", "cbp_ckpt.pth"],
                            tmp_path, monkeypatch)
    assert code == 1 and out == "", out
    assert err.splitlines() == [
        "error: cannot export layer 'model.features.0' (SpikeModule_nq): reset by subtraction "
        "(a spike keeps u - theta for the next step; NIR's IF resets to v_reset); "
        "cbp_ckpt.nir not written"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cbp_ckpt.pth"]
    code, _, err = inproc(CALIB_DIR / "export_nir.py", flags, tmp_path, monkeypatch)
    assert code == 1 and err.splitlines() == [
        "error: --evaluate CKPT is required: the CBP checkpoint to export"], err


def test_tssl_bp_neuron_is_named(tmp_path, monkeypatch):
    folder = TSSL_DIR
    code, out, err = inproc(folder / "export_nir.py",
                            ["-config", str(folder / "Networks/DIGITS_bin.yaml")], tmp_path,
                            monkeypatch)
    assert code == 1 and out == "", out
    assert err.splitlines() == [
        "error: cannot export layer 'conv_1' (conv + TSSL-BP neuron): its output, the trace "
        "a += (o - a) / tau_s, is a NIR LI node that no importer (spikingjelly, snnTorch, "
        "Norse) reads, and its membrane u + (I - u / tau_m) is not the update their LIF "
        "imports compute; ./trained_params/TSSL_BP_DIGITS_bin.nir not written"], err
    assert not list(tmp_path.iterdir())
