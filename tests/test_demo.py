"""The embedded demo end to end at minimal size: table, packed exports and plot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
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


def _demo():
    sys.path.insert(0, str(ROOT))
    import demo

    return demo


def test_summary_is_computed_from_the_table():
    """The prose under the table names the mode closest to fp32 and the differences, from the
    table's own rounded figures (hand-made numbers)."""
    demo = _demo()
    nan = float("nan")
    rows = [("fp32", 95.0, 94.5, nan, 7.7791, 974028.8),
            ("bin", 93.61111, 93.0, 0.0075, 0.2597, 34099.2),   # 93.61: -1.39
            ("ter", 94.72222, 94.0, 0.0037, 0.5023, 64409.6),   # 94.72: -0.28
            ("1bit", 95.55556, 95.0, 0.0027, 0.7448, 94822.4),  # 95.56: +0.56
            ("2bit", 96.0, 95.5, 0.0022, 0.7448, 94822.4)]      # +1.00
    text = demo.summary(rows)
    flat = " ".join(text.split())
    assert "against fp32 (95.00 %): bin -1.39, ter -0.28, 1bit +0.56 and 2bit +1.00 points" in flat
    assert "Closest to fp32: ter, 0.28 points away" in flat
    assert "2 of the 4 quantized modes end at or above the fp32 run" in flat
    assert "bin at most 1 point below fp32 (missed)" in flat
    assert "ter at most 0.5 points below fp32 (met)" in flat
    # ties name every closest mode; a table without fp32 has no summary
    tie = [rows[0], ("bin", 94.5, 94.0, 0.01, 0.3, 1.0), ("ter", 95.5, 95.0, 0.01, 0.5, 1.0)]
    assert "Closest to fp32: bin and ter, 0.50 points away" in " ".join(demo.summary(tie).split())
    assert demo.summary(rows[1:]) == ""
    block = demo.markdown(rows)
    assert block.startswith("| weights | best test acc (%) |")
    assert "| ter | 94.72 | 94.00 | 0.0037 | 0.5023 | 62.9 |" in block
    assert "| fp32 | 95.00 | 94.50 | — |" in block
    assert block.endswith(text)


def test_readme_holds_the_generated_block(tmp_path):
    """README.md has the demo block, and --readme replaces it (and nothing else)."""
    demo = _demo()
    text = (ROOT / "README.md").read_text()
    assert text.count(demo.START) == 1 and text.count(demo.END) == 1
    inside = text.split(demo.START, 1)[1].split(demo.END, 1)[0]
    assert "| weights | best test acc (%)" in inside and "Closest to fp32:" in inside
    page = tmp_path / "README.md"
    page.write_text(f"# D\n{demo.START}\nold\n{demo.END}\ntail\n")
    rows = [("fp32", 90.0, 90.0, float("nan"), 1.0, 1024.0), ("bin", 89.5, 89.0, 0.01, 0.1, 512.0)]
    demo.replace_block(str(page), demo.START, demo.END, demo.markdown(rows))
    out = page.read_text()
    assert out.startswith(f"# D\n{demo.START}\n| weights |") and out.endswith(f"{demo.END}\ntail\n")
    assert "bin -0.50 points" in " ".join(out.split())
    # --readme refuses settings other than the README's
    proc = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--readme", "--T", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--readme needs the default settings" in proc.stderr
