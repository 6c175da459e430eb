"""The reproduction harness: missing data/checkpoints are reported per row, and a DIGITS run
produces the table with the expected columns."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import reproduce  # noqa: E402

COLUMNS = ["pipeline", "network", "dataset", "T", "weights", "ours acc (%)", "published acc (%)",
           "ours weight memory (Mbit)", "published (Mbit)", "CFS", "SynOps/sample (M)",
           "energy/sample (µJ)", "status"]


def parse(table: str) -> list[dict]:
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == COLUMNS
    return [dict(zip(head, [c.strip() for c in ln.strip("|").split("|")])) for ln in lines[2:]]


def test_no_data_reports_every_row_missing(tmp_path):
    out = tmp_path / "table.md"
    rc = reproduce.main(["--root", str(tmp_path / "empty"), "--out", str(out),
                         "--log", str(tmp_path / "log.txt")])
    assert rc == 1  # nothing could be evaluated
    rows = parse(out.read_text())
    assert len(rows) == len(reproduce.all_rows()) == 16
    for row in rows:
        assert row["status"].startswith("missing "), row
        assert row["ours acc (%)"] == "—" and row["SynOps/sample (M)"] == "—"
    published = {(r["pipeline"], r["dataset"], r["weights"]): r["published acc (%)"] for r in rows}
    assert published["TSSL-BP", "CIFAR10", "bin"] == "89.99"
    assert published["SNN-Calibration", "CIFAR100", "bin"] == "66.53"


def test_missing_checkpoint_names_file_and_command(tmp_path):
    folder = tmp_path / "CBP-QSNN-STBP" / "datasets" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "data_batch_1").write_bytes(b"x")
    out = tmp_path / "t.md"
    rc = reproduce.main(["--root", str(tmp_path), "--rows", "STBP 7Conv,3FC CIFAR10 bin",
                         "--out", str(out), "--log", str(tmp_path / "l.txt")])
    assert rc == 1
    (row,) = parse(out.read_text())
    assert "trained_params/STBP_CIFAR10_bin_cbp_prequantized.pth" in row["status"]
    assert "produce with: cd CBP-QSNN-STBP && python main_train_fp32.py" in row["status"]
    assert "main_quantize_cbp.py --dataset CIFAR10" in row["status"]


def test_help_text_is_whole():
    proc = subprocess.run([sys.executable, str(ROOT / "reproduce.py"), "--help"],
                          capture_output=True, text=True)
    text = " ".join(proc.stdout.split())
    assert "otherwise say exactly what is missing and how to produce it." in text
    assert "Exit status: 0 when every requested row was evaluated" in text


def test_device_flag_follows_the_script_style():
    assert reproduce.device_args(["--model", "x", "--device", "cuda:0"], False) == [
        "--model", "x", "--device", "cpu"]
    assert reproduce.device_args(["-out_dir", "l", "-device", "cuda:0"], False) == [
        "-out_dir", "l", "-device", "cpu"]
    assert reproduce.device_args(["-config", "c.yaml"], True) == ["-config", "c.yaml"]


@pytest.mark.slow
def test_digits_rows_are_evaluated(tmp_path):
    env = dict(os.environ, CBP_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    out = tmp_path / "t.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "reproduce.py"), "--root", str(tmp_path), "--rows", "DIGITS",
         "--digits", "--digits_epochs", "1", "--out", str(out), "--log", str(tmp_path / "l.txt")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    rows = parse(out.read_text())
    assert [(r["dataset"], r["weights"], r["status"]) for r in rows] == [
        ("DIGITS", "bin", "evaluated"), ("DIGITS", "ter", "evaluated")]
    log = (tmp_path / "l.txt").read_text()
    synops = [float(v) for v in reproduce.SYNOPS.findall(log)]
    energy = [float(v) for v in reproduce.ENERGY.findall(log)]
    macs = [float(v) for v in re.findall(r"MACs/sample: ([0-9.e+]+)", log)]
    for r, s, e, m in zip(rows, synops, energy, macs, strict=True):
        assert 0.0 <= float(r["ours acc (%)"]) <= 100.0
        assert float(r["CFS"]) >= 0.0
        # the table shows the evaluation's SynOps in millions and its energy estimate
        assert r["SynOps/sample (M)"] == f"{s / 1e6:.4g}" and float(r["energy/sample (µJ)"]) == e
        assert e == pytest.approx((0.9 * s + 4.6 * m) * 1e-6, rel=1e-5)
    # bin layers cost 1 bit per weight, ter 2
    assert float(rows[0]["ours weight memory (Mbit)"]) < float(rows[1]["ours weight memory (Mbit)"])


def test_config_file_is_the_scripts_under_another_root(tmp_path, monkeypatch):
    """--root: the rows run in the other tree, the TSSL-BP config stays the repository's."""
    seen = []
    monkeypatch.setattr(reproduce.subprocess, "run",
                        lambda cmd, cwd, **kw: seen.append((cmd, cwd)) or
                        subprocess.CompletedProcess(cmd, 1, "", "error: stop"))
    script_dir = os.path.join(reproduce.ROOT, "CBP-QSNN-TSSL-BP")
    with open(os.devnull, "w") as log:
        reproduce.run(script_dir, str(tmp_path), ["main_quantize_cbp.py", "-config",
                                                  "Networks/CIFAR10_bin.yaml", "-mode", "eval"],
                      False, log)
    (cmd, cwd), = seen
    config = cmd[cmd.index("-config") + 1]
    assert config == os.path.join(script_dir, "Networks", "CIFAR10_bin.yaml")
    assert os.path.isfile(config) and cwd == str(tmp_path)
