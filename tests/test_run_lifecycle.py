"""The run lifecycle library (cbp.files, cbp.run) and the controller's one-call step: atomic
writes, backups, locks, divergence checks, resume checks, checkpoint entries."""

from __future__ import annotations

import glob
import math
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import cbp
from cbp import files
from cbp.checkpoint import CheckpointError, load_file, load_into
from cbp.controller import LAGSUM_INIT
from cbp.run import Diverged, Run
from cbp.runtime import UserError


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ----------------------------------------------------------------------------- files
def test_write_atomic_gives_normal_permissions_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "a.pth"
    old = os.umask(0o022)
    try:
        files.save_atomic({"x": torch.ones(2)}, str(target))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644  # not mkstemp's 0600
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.ones(2))
    assert os.listdir(target.parent) == ["a.pth"]


def test_write_error_is_one_line_naming_the_path(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    target.write_text("old\n")

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", full)
    with pytest.raises(files.WriteError) as info:
        files.write_text_atomic(str(target), "new\n")
    assert str(info.value) == f"cannot write {target}: No space left on device"
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["a.txt"]  # the temporary file was removed
    assert isinstance(info.value, UserError)


def test_write_into_a_file_that_is_a_folder_fails_cleanly(tmp_path):
    (tmp_path / "blocker").write_text("x")  # a file where a folder is needed
    with pytest.raises(files.WriteError, match=r"cannot write .*blocker/a\.pth"):
        files.save_atomic({}, str(tmp_path / "blocker" / "a.pth"))


def test_a_lock_under_a_file_that_is_a_folder_fails_cleanly(tmp_path):
    (tmp_path / "progress").write_text("x")
    target = tmp_path / "progress" / "p.txt"
    with pytest.raises(files.WriteError) as info:
        files.OutputLock([str(target)]).acquire()
    assert str(info.value) == f"cannot write {target}: {tmp_path / 'progress'} is not a folder"


def test_failpoint_oserror_hits_the_nth_write(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_writes", 0)
    monkeypatch.setenv("CBP_FAILPOINT", "2:oserror")
    files.write_text_atomic(str(tmp_path / "one"), "1")
    with pytest.raises(files.WriteError, match="two"):
        files.write_text_atomic(str(tmp_path / "two"), "2")
    files.write_text_atomic(str(tmp_path / "three"), "3")
    assert sorted(os.listdir(tmp_path)) == ["one", "three"]


def test_kill_during_a_write_keeps_the_old_file_and_the_next_lock_cleans_up(tmp_path):
    target = tmp_path / "best.pth"
    target.write_bytes(b"old")
    code = textwrap.dedent(f"""
        from cbp import files
        files.write_text_atomic({str(target)!r}, "new")
    """)
    env = dict(os.environ, CBP_FAILPOINT="1:kill")
    proc = subprocess.run([sys.executable, "-c", code], env=env)
    assert proc.returncode == -9
    assert target.read_bytes() == b"old"
    leftovers = glob.glob(files.temp_pattern(str(target)))
    assert len(leftovers) == 1 and _read(leftovers[0]) == b"new"  # complete, never renamed
    with files.OutputLock([str(target)]):
        assert glob.glob(files.temp_pattern(str(target))) == []
    assert sorted(os.listdir(tmp_path)) == ["best.pth"]  # lock file removed too


def test_backups_are_numbered_and_never_removed(tmp_path):
    p = str(tmp_path / "w.pth")
    for i in range(4):
        files.write_text_atomic(p, f"v{i}")
        if i < 3:
            assert files.rotate_backup(p) is not None
    assert open(p).read() == "v3"
    assert open(p + ".bak").read() == "v2"
    assert open(p + ".bak.1").read() == "v0"
    assert open(p + ".bak.2").read() == "v1"
    assert files.rotate_backup(str(tmp_path / "none")) is None


def test_promote_backs_up_once_per_run_and_undoes_on_failure(tmp_path):
    p = str(tmp_path / "pre.pth")
    files.write_text_atomic(p, "user")
    done: set[str] = set()
    assert files.promote(p, lambda q: files.write_text_atomic(q, "e0"), done) == p + ".bak"
    assert files.promote(p, lambda q: files.write_text_atomic(q, "e1"), done) is None
    assert open(p).read() == "e1" and open(p + ".bak").read() == "user"
    assert not os.path.exists(p + ".bak.1")

    q = str(tmp_path / "q.pth")
    files.write_text_atomic(q, "user")
    files.write_text_atomic(q + ".bak", "older")

    def failing(path):
        raise files.WriteError(f"cannot write {path}: disk full")

    with pytest.raises(files.WriteError):
        files.promote(q, failing, set())
    assert open(q).read() == "user" and open(q + ".bak").read() == "older"
    assert not os.path.exists(q + ".bak.1")


HOLD = textwrap.dedent("""
    import sys, time
    from cbp.files import OutputLock
    OutputLock([sys.argv[1]]).acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def test_a_second_run_on_the_same_output_is_refused_and_a_dead_lock_is_taken_over(tmp_path):
    target = str(tmp_path / "out.pth")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, target], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(files.LockedError) as info:
            files.OutputLock([target]).acquire()
        text = str(info.value)
        assert target in text and f"process {holder.pid}@" in text
    finally:
        holder.kill()
        holder.wait()
    assert os.path.exists(files.lock_name(target))  # the killed run left its lock file
    with files.OutputLock([target]):
        pass
    assert not os.path.exists(files.lock_name(target))


# ----------------------------------------------------------------------------- run checks
def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def test_check_loss_names_epoch_batch_value_and_the_lr_flag(tmp_path):
    run = Run({"pipeline": "x"}, [], lr_flag="--learning_rate")
    run.check_loss(torch.tensor(1.5), 0, 0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(Diverged) as info:
            run.check_loss(torch.tensor([1.0, bad]), 3, 17)
        text = str(info.value)
        assert text.startswith("training diverged at epoch 3, batch 17: loss = ")
        assert str(float(torch.tensor([1.0, bad]).sum())) in text and "--learning_rate" in text


def test_check_epoch_refuses_nonfinite_lagsum_and_weights():
    m = _model()
    run = Run({}, [])
    run.check_epoch(m, 0, 12.5)
    with pytest.raises(Diverged, match="lagsum = nan"):
        run.check_epoch(m, 2, math.nan)
    with torch.no_grad():
        m[1].weight[0, 0] = math.inf
    with pytest.raises(Diverged, match=r"epoch 4: non-finite weights in 1\.weight"):
        run.check_epoch(m, 4)


def test_save_refuses_nonfinite_state_and_backs_up_the_users_file(tmp_path, capsys):
    p = str(tmp_path / "best.pth")
    files.save_atomic({"w": torch.zeros(2)}, p)
    before = _read(p)
    with Run({}, [p]) as run:
        with pytest.raises(Diverged, match=r"not writing .*best\.pth: non-finite values in net\.w"):
            run.save({"net": {"w": torch.tensor([0.0, math.nan])}}, p)
        assert _read(p) == before and not os.path.exists(p + ".bak")
        run.save({"w": torch.ones(2)}, p)
        run.save({"w": torch.full((2,), 2.0)}, p)
    assert _read(p + ".bak") == before
    assert torch.equal(load_file(p)["w"], torch.full((2,), 2.0))
    assert capsys.readouterr().out.count("kept as") == 1


def test_resume_checks_file_training_state_identity_and_finiteness(tmp_path):
    ident = {"pipeline": "STBP", "quant": "ter", "width": 0.5}
    run = Run(ident, [])
    good = run.checkpoint({"epoch": 2, "rng": {"torch": torch.get_rng_state()},
                           "net": {"w": torch.ones(1)}})
    path = str(tmp_path / "last.pth")
    files.save_atomic(good, path)
    assert run.resume(path, last_hint="h")["epoch"] == 2

    with pytest.raises(UserError, match=r"cannot resume: .*nope\.pth not found \(use last\)"):
        run.resume(str(tmp_path / "nope.pth"), last_hint="use last")
    weights = str(tmp_path / "best.pth")
    files.save_atomic({"w": torch.ones(1)}, weights)
    with pytest.raises(UserError, match="holds no full training state"):
        run.resume(weights, last_hint="h")
    other = Run({**ident, "quant": "bin"}, [])
    with pytest.raises(UserError) as info:
        other.resume(path, last_hint="h")
    assert str(info.value).endswith("belongs to another run: quant 'ter' (this run: 'bin')")
    files.save_atomic({**good, "net": {"w": torch.tensor([math.nan])}}, path)
    with pytest.raises(CheckpointError, match=r"non-finite values \(NaN/inf\) in net\.w"):
        run.resume(path, last_hint="h")


def test_a_resumed_run_makes_no_backups(tmp_path):
    p = str(tmp_path / "last.pth")
    files.save_atomic({"epoch": 0, "rng": {}}, p)
    with Run({}, [p]) as run:
        run.resume(p, last_hint="h")
        run.save({"epoch": 1, "rng": {}}, p)
    assert not os.path.exists(p + ".bak")


# ----------------------------------------------------------------------------- checkpoint load
def test_load_into_refuses_nonfinite_weights_and_eval_only_warns(tmp_path, capsys):
    m = _model()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["0.bias"][1] = math.nan
    path = str(tmp_path / "nan.pth")
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"nan\.pth holds non-finite values .* in 0\.bias"):
        load_into(m, path)
    load_into(m, path, nonfinite="warn")
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "non-finite values (NaN/inf) in 0.bias" in err


def test_pickled_code_is_refused_with_the_trust_message(tmp_path):
    path = str(tmp_path / "evil.pth")
    torch.save({"f": os.system}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects besides tensors"):
        load_file(path)


# ----------------------------------------------------------------------------- controller
def test_lagrangian_is_loss_plus_penalty_and_counts_into_lagsum():
    m = nn.Sequential(cbp.QLinear(4, 3, mode="ter"))
    with torch.no_grad():
        m[0].weight.copy_(torch.linspace(-0.9, 0.9, 12).reshape(3, 4))
    ctl = cbp.CBP(m, lr_lambda=0.1)
    ctl.start()
    loss = torch.tensor(0.25)
    lag = ctl.lagrangian(loss)
    assert torch.allclose(lag, loss + ctl.penalty())
    ctl.lagrangian(torch.tensor(1.0))
    d = ctl.end_epoch()
    penalty = float(ctl.penalty().detach())
    assert penalty > 0
    assert d.lagsum == pytest.approx(0.25 + 1.0 + 2 * penalty, rel=1e-6)
    assert d.compared_to == LAGSUM_INIT and d.lagsum_pre == d.lagsum and not d.updated
    d2 = ctl.end_epoch()  # lagsum 0 < previous: no update, compared with the first epoch's
    assert d2.compared_to == d.lagsum


def test_checkpoint_entries_store_lambda_once_and_round_trip():
    m = nn.Sequential(cbp.QLinear(4, 3, mode="bin"))
    ctl = cbp.CBP(m, lr_lambda=0.1)
    ctl.start()
    ctl.lagrangian(torch.tensor(0.5))
    ctl.end_epoch()
    e = ctl.checkpoint_entries()
    assert set(e) == {"lamb", "optimizer2", "lagsum_pre", "period", "ucs", "g", "cbp"}
    assert "lambdas" not in e["cbp"] and "optimizer" not in e["cbp"]
    other = cbp.CBP(m, lr_lambda=0.1, init_scales=False)
    other.load_checkpoint_entries(e)
    assert all(torch.equal(a, b) for a, b in zip(other.lambdas, ctl.lambdas))
    assert (other.g, other.ucs, other.period, other.lagsum_pre, other.started) == \
        (ctl.g, ctl.ucs, ctl.period, ctl.lagsum_pre, True)
    legacy = cbp.CBP(m, lr_lambda=0.1, init_scales=False)  # whole state under "cbp"
    legacy.load_checkpoint_entries({"cbp": ctl.state_dict()})
    assert all(torch.equal(a, b) for a, b in zip(legacy.lambdas, ctl.lambdas))


# ----------------------------------------------------------------------------- per-rank RNG
def _rng_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from cbp import distributed as D

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(100 + rank)  # each rank its own stream (dropout, augmentation)
        run = Run({}, [])
        state = run.rng_state()
        expected = torch.rand(3)
        torch.manual_seed(7)  # lose it
        run.restore_rng(state)
        again = torch.rand(3)
        torch.save({"state": state, "expected": expected, "again": again,
                    "world": D.world_size()}, f"{out}/{rank}.pth")
    finally:
        dist.destroy_process_group()


def test_each_rank_gets_its_own_rng_back(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rng_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pth", weights_only=False) for r in (0, 1))
    assert r0["world"] == 2
    assert torch.equal(r0["expected"], r0["again"]) and torch.equal(r1["expected"], r1["again"])
    assert not torch.equal(r0["expected"], r1["expected"])
    ranks = r0["state"]["ranks"]  # what rank 0 writes: every rank's state
    assert len(ranks) == 2 and torch.equal(ranks[1]["torch"], r1["state"]["torch"])
    # a single-process resume of that checkpoint takes rank 0's state
    run = Run({}, [])
    run.restore_rng(r0["state"])
    assert torch.equal(torch.rand(3), r0["expected"])


def _setup_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from cbp import distributed as D
    from cbp.data import DatasetMissing

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    result = "no error"
    try:
        def load():
            if rank == 1:
                raise DatasetMissing("CIFAR-10 not found in ./datasets: put it there")
            return "data"

        try:
            D.first_then_others(load)  # rank 0 first, then rank 1, which fails
        except Exception as exc:  # noqa: BLE001
            result = f"{type(exc).__name__}: {exc}"
        try:
            with D.collective():  # and a failure inside a block on rank 0 only
                if rank == 0:
                    raise files.WriteError("cannot write x.pth: No space left on device")
        except Exception as exc:  # noqa: BLE001
            result += f" | {type(exc).__name__}: {exc}"
    finally:
        with open(f"{out}/{rank}.txt", "w") as f:
            f.write(result)
        dist.destroy_process_group()


def test_an_error_on_one_rank_ends_every_rank_with_its_line(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_setup_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "0.txt").read_text() == (
        "RankError: rank 1: CIFAR-10 not found in ./datasets: put it there"
        " | WriteError: cannot write x.pth: No space left on device")
    assert (tmp_path / "1.txt").read_text() == (
        "DatasetMissing: CIFAR-10 not found in ./datasets: put it there"
        " | RankError: rank 0: cannot write x.pth: No space left on device")
