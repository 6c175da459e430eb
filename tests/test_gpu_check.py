"""tools/gpu_check.sh without a GPU and without network: pure-Python wheels come from the
wheel folder (here a tiny wheel built by the test), `cbp` from PYTHONPATH, the gpu tests are
collected and skip, the report is written under $OUT."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")


def make_wheel(folder: Path, name: str) -> Path:
    """A minimal pure-Python wheel ``name`` 0.1 whose module sets ``OK = True``."""
    whl = folder / f"{name}-0.1-py3-none-any.whl"
    info = f"{name}-0.1.dist-info"
    files = {
        f"{name}/__init__.py": "OK = True\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(whl, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr(f"{info}/RECORD", record)
    return whl


def run(tmp_path, *args, **env):
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    base.update(PYTHON=sys.executable, PIP_NO_INDEX="1", OUT=str(tmp_path / "out"), **env)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=base,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_offline_cpu_run_installs_missing_wheels_and_reports(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "cbp_gpucheck_dummy")
    res = run(tmp_path, "--no-bench", GPU_CHECK_WHEELS=str(wheels))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    assert "installing cbp_gpucheck_dummy-0.1-py3-none-any.whl" in res.stdout
    assert f"cbp from {ROOT / 'common' / 'cbp' / '__init__.py'}" in res.stdout
    report = (tmp_path / "out" / "report.md").read_text()
    assert "device none (CPU only)" in report
    assert "no CUDA device: GPU tests skipped" in report
    tests = (tmp_path / "out" / "tests.txt").read_text()
    assert " skipped" in tests and "error" not in tests.lower()
    # every gpu-marked test was collected (none hidden by an import error)
    n_gpu = int(tests.strip().splitlines()[-1].split()[0])
    assert n_gpu >= 19


@pytest.mark.slow  # runs the whole script twice
def test_require_gpu_and_bad_option(tmp_path):
    res = run(tmp_path, "--require-gpu", "--no-bench")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == "error: no CUDA device visible to torch"
    res = run(tmp_path, "--fast")
    assert res.returncode == 2 and "unknown option --fast" in res.stderr
