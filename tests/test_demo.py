"""The embedded demo end to end at minimal size: table, packed exports and plot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_minimal(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, CBP_NO_PROGRESS="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "demo.py"), "--out", str(out), "--modes", "bin", "ter",
         "--fp32_epochs", "1", "--cbp_epochs", "1", "--T", "2"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| weights | best test acc (%)")
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in lines[1:]}
    assert set(rows) == {"fp32", "bin", "ter"}
    mbit = {k: float(v[3]) for k, v in rows.items()}
    # quantized layers cost 1 (bin) / 2 (ter) bits instead of 32
    assert mbit["bin"] < mbit["ter"] < mbit["fp32"]
    for name in ("bin", "ter"):
        assert 0.0 <= float(rows[name][0]) <= 100.0
        assert float(rows[name][2]) >= 0.0  # CFS
        assert (out / "checkpoint" / f"DIGITS_cbp_{name}_packed.pth").is_file()
    png = out / "demo.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
