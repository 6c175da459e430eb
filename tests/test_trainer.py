"""The one training loop (cbp.trainer.Trainer) on a toy network, in process: resume equals an
uninterrupted run (fp32 and CBP), the training-state schema, refusals of foreign states, both
clipping rules worked out by hand, AMP, and the fault matrix (NaN loss, a diverging learning
rate, a failing write at every write, files from before the run unchanged)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from clitools import snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import cbp
from cbp import files
from cbp.errors import Diverged, UserError, WriteError
from cbp.run import Run
from cbp.trainer import SCHEMA_VERSION, Epoch, Trainer, training_state

pytestmark = pytest.mark.usefixtures("one_thread")


class Toy(Trainer):
    """Cross-entropy on a 2-layer net; a progress table and one reference file."""

    def __init__(self, *a, folder: Path, **kw) -> None:
        self.folder = folder
        super().__init__(*a, **kw)

    def loss(self, output, target):
        return nn.functional.cross_entropy(output, target)

    def evaluate(self, st: Epoch) -> None:
        self.model.eval()
        with torch.no_grad():
            x, y = self.test_loader.dataset.tensors
            out = self.model(x)
        st.test_loss = float(nn.functional.cross_entropy(out, y))
        st.test_acc = 100.0 * float((out.argmax(1) == y).float().mean())
        self.history.setdefault("acc", []).append(st.test_acc)

    def initial_row(self):
        return [0.0, 0.0, 0.0]

    def row(self, st: Epoch):
        return [st.epoch, st.test_acc, st.cfs]

    def reference_state(self, st: Epoch, state: dict) -> dict:
        return {"net": state["model"], "epoch": st.epoch}

    def write(self, st: Epoch, full: dict) -> None:
        self.run.write_table(str(self.folder / "progress.txt"), self.rows)
        if st.improved:
            self.run.save(self.reference_state(st, full["trainer"]), str(self.folder / "best.pth"))

    def last_path(self) -> str:
        return str(self.folder / "last.pth")


def data(n: int = 48, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)


def net(quant: bool) -> nn.Module:
    torch.manual_seed(1)
    if quant:
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), cbp.QLinear(8, 8, mode="ter"),
                             nn.ReLU(), nn.Linear(8, 3))
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def make(folder: Path, epochs: int, quant: bool, run: Run, **kw) -> Toy:
    model = net(quant)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctl = cbp.CBP(model, 0.01, period_max=1) if quant else None
    sched = None if quant else torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3)
    return Toy(model, opt, run=run, epochs=epochs, device=torch.device("cpu"), controller=ctl,
               scheduler=sched, show=False, folder=folder, **kw)


def train(folder: Path, epochs: int, quant: bool, resume: bool = False, **kw) -> Toy:
    folder.mkdir(exist_ok=True)
    outputs = [folder / n for n in ("last.pth", "best.pth", "progress.txt")]
    torch.manual_seed(5)
    with Run({"toy": 1}, outputs) as run:
        t = make(folder, epochs, quant, run, **kw)
        if resume:
            t.resume(str(folder / "last.pth"), hint="resume from last.pth")
        t.clip = "value" if quant else None
        t.fit(data(), data(24, seed=1))
    return t


@pytest.mark.parametrize("quant", [False, True], ids=["fp32", "cbp"])
def test_resume_equals_uninterrupted(tmp_path, quant):
    full = train(tmp_path / "a", 3, quant)
    train(tmp_path / "b", 1, quant)
    resumed = train(tmp_path / "b", 3, quant, resume=True)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert full.rows == resumed.rows and len(full.rows) == 4
    assert full.best == resumed.best and full.history == resumed.history
    assert (tmp_path / "a/progress.txt").read_text() == (tmp_path / "b/progress.txt").read_text()
    if quant:
        a, b = full.controller, resumed.controller
        assert (a.g, a.ucs, a.period, a.lagsum_pre) == (b.g, b.ucs, b.period, b.lagsum_pre)
        assert a.g == 4  # period_max 1: g advanced once per epoch (1 -> 2 -> 3 -> 4)
        assert all(torch.equal(x, y) for x, y in zip(a.lambdas, b.lambdas))
    else:
        assert full.scheduler.last_epoch == resumed.scheduler.last_epoch == 3


def test_training_state_schema(tmp_path):
    t = train(tmp_path / "a", 2, quant=True)
    state = torch.load(tmp_path / "a/last.pth", weights_only=True)
    assert set(state) == {"net", "epoch", "trainer", "run"}  # the reference's keys + ours
    ts = state["trainer"]
    assert set(ts) == {"version", "epoch", "model", "optimizer", "scheduler", "scaler", "cbp",
                       "progress", "best", "history", "extra", "rng"}
    assert ts["version"] == SCHEMA_VERSION and ts["epoch"] == 1 and state["epoch"] == 1
    assert ts["progress"].tolist() == t.rows and ts["best"] == t.best
    assert ts["cbp"]["g"] == 3 and len(ts["cbp"]["lambdas"]) == 1
    # the reference's weights and the training state's are one tensor in the file
    only = tmp_path / "only.pth"
    torch.save({"trainer": ts}, only)
    assert os.path.getsize(tmp_path / "a/last.pth") < os.path.getsize(only) + 2048


def test_foreign_states_are_refused(tmp_path):
    train(tmp_path / "a", 1, quant=False)
    with pytest.raises(UserError, match="holds no full training state.*without --resume"):
        training_state({"net": {}, "epoch": 3}, "old.pth")
    with pytest.raises(UserError, match="newer version"):
        training_state({"trainer": {"version": SCHEMA_VERSION + 1}}, "new.pth")
    (tmp_path / "b").mkdir()
    os.link(tmp_path / "a/last.pth", tmp_path / "b/last.pth")
    with pytest.raises(UserError, match="fp32 training state, this is a CBP run"):
        train(tmp_path / "b", 2, quant=True, resume=True)


def test_clipping_by_value_and_by_norm(tmp_path):
    """One SGD step (lr 1, no momentum) from zero weights: the update is the clipped gradient."""
    x, y = torch.ones(1, 2), torch.zeros(1, 1)

    class Sq(Toy):
        def loss(self, output, target):
            return ((output - 3.0) ** 2).sum()  # d/dw = 2 (w.x - 3) x = -6 per weight

    for clip, want in (("value", [1.0, 1.0]), ("norm", [0.5**0.5, 0.5**0.5])):
        model = nn.Linear(2, 1, bias=False)
        nn.init.zeros_(model.weight)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        with Run({}, []) as run:
            t = Sq(model, opt, run=run, epochs=1, device=torch.device("cpu"), show=False,
                   folder=tmp_path)
            t.clip = clip
            t.train_one_epoch([(x, y)])
        got = model.weight.detach().flatten().tolist()
        assert got == pytest.approx(want, rel=1e-6), clip


def test_amp_on_cpu_trains_in_bfloat16(tmp_path):
    seen = []
    t = train(tmp_path / "a", 1, quant=True, amp=True)
    t.model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with cbp.trainer.autocast(torch.device("cpu"), True):
        t.model(torch.randn(2, 6))
    assert seen == [torch.bfloat16]
    state = torch.load(tmp_path / "a/last.pth", weights_only=True)["trainer"]
    assert state["scaler"] is not None and all(torch.isfinite(p).all()
                                               for p in t.model.parameters())


def test_compile_wraps_the_network(tmp_path):
    with Run({}, []) as run:
        t = make(tmp_path, 1, False, run, compile=True)
        assert isinstance(t.network(), torch._dynamo.eval_frame.OptimizedModule)
        assert t.network()._orig_mod is t.model


def test_nan_loss_stops_before_any_write(tmp_path, monkeypatch):
    train(tmp_path / "a", 1, quant=True)
    before = snapshot(tmp_path / "a")
    monkeypatch.setattr(files, "_losses", 0)
    monkeypatch.setenv("CBP_FAILPOINT", "2:nan")  # the resumed epoch 1, batch 1
    with pytest.raises(Diverged, match="epoch 1, batch 1: loss = nan.*no file was written"):
        train(tmp_path / "a", 3, quant=True, resume=True)
    assert snapshot(tmp_path / "a") == before


def test_diverging_learning_rate_is_one_line(tmp_path):
    class Wild(Toy):
        def after_step(self):
            with torch.no_grad():
                self.model[0].weight.mul_(1e38)

    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "best.pth").write_bytes(b"earlier result")
    with Run({}, [folder / "last.pth", folder / "best.pth"]) as run:
        model = net(False)
        t = Wild(model, torch.optim.SGD(model.parameters(), lr=1e38), run=run, epochs=2,
                 device=torch.device("cpu"), show=False, folder=folder)
        with pytest.raises(Diverged, match="training diverged at epoch 0"):
            t.fit(data(), data(24, seed=1))
    assert (folder / "best.pth").read_bytes() == b"earlier result"
    assert not (folder / "last.pth").exists()


@pytest.mark.parametrize("write", [1, 2, 3])
def test_failing_write_loses_nothing_and_resumes_exactly(tmp_path, monkeypatch, write):
    """The epoch writes progress.txt, best.pth (when better), then last.pth: ENOSPC in each
    leaves the training state of the epoch before, no temporary file, and a resume that ends
    like the uninterrupted run."""
    full = train(tmp_path / "full", 2, quant=True)
    train(tmp_path / "a", 1, quant=True)
    last = (tmp_path / "a/last.pth").read_bytes()
    monkeypatch.setattr(files, "_writes", 0)
    monkeypatch.setenv("CBP_FAILPOINT", f"{write}:oserror")
    with pytest.raises(WriteError, match="No space left on device"):
        train(tmp_path / "a", 2, quant=True, resume=True)
    assert (tmp_path / "a/last.pth").read_bytes() == last  # the training state is written last
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.endswith(".tmp")]
    monkeypatch.delenv("CBP_FAILPOINT")
    resumed = train(tmp_path / "a", 2, quant=True, resume=True)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert (tmp_path / "a/progress.txt").read_text() == \
        (tmp_path / "full/progress.txt").read_text()


def test_fresh_run_keeps_files_from_before_it(tmp_path):
    """A new run over earlier results keeps each replaced file as <name>.bak."""
    train(tmp_path / "a", 1, quant=True)
    before = snapshot(tmp_path / "a")
    train(tmp_path / "a", 1, quant=True)
    after = snapshot(tmp_path / "a")
    for name, digest in before.items():
        assert after[name + ".bak"] == digest
