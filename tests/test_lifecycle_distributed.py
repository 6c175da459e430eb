"""Never lose a result under torchrun: 2 gloo ranks per pipeline stay bit-identical, and an
error on one rank (a NaN, a failed write) ends every rank with that rank's line and leaves the
folder as it was.  (A separate file from test_lifecycle_cli.py so the two run in parallel.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from clitools import snapshot, torchrun
from test_lifecycle_cli import PIPELINES, Pipeline, _finished, copy, kept, tssl_config


@pytest.fixture
def done_by_name(tmp_path_factory):
    """name -> a folder where that pipeline's fp32 and CBP runs have finished."""
    return lambda name: _finished(name, tmp_path_factory)[2]

# (SEW-ResNet's ImageNet script has its own 2-rank torchrun test in test_sew_cli.py)
DISTRIBUTED = ["STBP", "TSSL-BP", "SNN-Calibration", "SEW-ResNet"]
CPU = {"STBP": ["--device", "cpu"], "TSSL-BP": ["-device", "cpu"]}
ONCE = {"TSSL-BP": "tiny_ter: "}  # a line each run prints once (else its arguments)




@pytest.mark.slow
@pytest.mark.parametrize("name", DISTRIBUTED)
def test_two_ranks_train_in_step_and_one_ranks_error_ends_both(name, done_by_name, tmp_path):
    """torchrun, 2 gloo ranks: CBP ends with weights and multipliers bit-identical on both
    ranks; a NaN on rank 1 only ends both ranks with rank 1's line, and no file changes; on
    STBP a failed write on rank 0 ends both ranks with rank 0's line."""
    p, d = PIPELINES[name], done_by_name(name)
    work = copy(d, tmp_path / "w")
    ranks = tmp_path / "ranks"
    cpu = CPU.get(name, [])
    proc = torchrun(p.directory / p.cbp[0], p.cbp[1] + cpu, work, CBP_RANK_STATE_DIR=str(ranks))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(ranks / "rank0.pth", weights_only=True)
    r1 = torch.load(ranks / "rank1.pth", weights_only=True)
    assert r0["g"] == r1["g"] and r0["ucs"] == r1["ucs"] and len(r0["lamb"]) > 0
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), k
    assert all(torch.equal(x, y) for x, y in zip(r0["lamb"], r1["lamb"]))
    # only rank 0 prints
    assert proc.stdout.count(ONCE.get(name, "Namespace(")) == 1, proc.stdout

    _one_rank_fails(p, work, cpu)
    if name == "STBP":  # a failed write on rank 0 (the writer) ends rank 1 too
        before = snapshot(work)
        proc = torchrun(p.directory / p.cbp[0], p.cbp[1] + cpu, work, CBP_FAILPOINT="1:oserror@0")
        errors = sorted(ln for ln in proc.stderr.splitlines() if ln.startswith("error: "))
        assert proc.returncode != 0 and len(errors) == 2, proc.stderr[-3000:]
        assert errors[0].startswith("error: cannot write ") and "No space left" in errors[0]
        assert errors[1] == "error: rank 0: " + errors[0][len("error: "):]
        kept(before, work)


@pytest.mark.slow
def test_one_ranks_error_ends_every_rank_on_sew(done_by_name, tmp_path):
    p = PIPELINES["SEW-ResNet"]
    _one_rank_fails(p, copy(done_by_name("SEW-ResNet"), tmp_path / "w"), [])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PIPELINES))
def test_two_ranks_of_the_fp32_script_end_identical(name, tmp_path):
    """The fp32 (ANN) script of every pipeline under torchrun, 2 gloo ranks: both end with the
    same weights and learning rates, only rank 0 prints, and rank 0 wrote the files."""
    p = PIPELINES[name]
    work = tmp_path / "w"
    work.mkdir()
    if name == "TSSL-BP":
        tssl_config(work)
    ranks = tmp_path / "ranks"
    proc = torchrun(p.directory / p.fp32[0], p.fp32[1] + CPU.get(name, []), work,
                    CBP_RANK_STATE_DIR=str(ranks))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(ranks / "rank0.pth", weights_only=True)
    r1 = torch.load(ranks / "rank1.pth", weights_only=True)
    assert r0["lr"] == r1["lr"] and r0["g"] is None and r0["lamb"] == []
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), k
    assert proc.stdout.count(ONCE.get(name, "Namespace(")) <= 1, proc.stdout
    assert (work / p.pretrained).is_file()


def _one_rank_fails(p: Pipeline, work: Path, cpu: list[str]) -> None:
    before = snapshot(work)
    proc = torchrun(p.directory / p.cbp[0], p.cbp[1] + cpu, work, CBP_FAILPOINT="1:nan@1")
    assert proc.returncode != 0
    errors = sorted(ln for ln in proc.stderr.splitlines() if ln.startswith("error: "))
    assert len(errors) == 2, proc.stderr[-3000:]
    own = errors[1][len("error: "):]  # rank 1's line; rank 0 says the same after "rank 1: "
    assert errors[0] == f"error: rank 1: {own}"
    assert re.fullmatch(r"training diverged at epoch 0, batch 0: loss = nan; no file was "
                        r"written for this epoch \(try a lower learning rate, " + p.lr + r"\)",
                        own), own
    assert "gloo" not in proc.stderr and "Connection closed" not in proc.stderr
    assert snapshot(work) == before
