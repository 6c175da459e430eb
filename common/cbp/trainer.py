"""The one training loop of every pipeline: fp32 training and CBP training are the same loop,
CBP being a controller attached to it.

A pipeline subclasses :class:`Trainer` and overrides a few small hooks: the loss, the
evaluation, what runs after each optimizer step, the progress row and the files the reference
defines.  The loop itself owns what must be written once::

    with Run(identity, outputs) as run:
        trainer = MyTrainer(model, optimizer, run=run, epochs=n, device=dev, controller=ctl)
        if resuming:
            trainer.resume(path, hint="resume from ...")
        trainer.fit(train_loader, test_loader)

Per batch: forward (under autocast with ``amp``), loss, the controller's Lagrangian, the
divergence check, backward (through the AMP gradient scaler), gradient clipping, the optimizer
step, :meth:`Trainer.after_step`.  Per epoch: the controller's schedule, the finite-weights
check, evaluation, the best-so-far rule, progress row, tensorboard, then the writes (rank 0;
every rank agrees on failure), the training state last.

The training state (the file ``--resume`` reads) has one schema for every pipeline, stored
under the key ``trainer`` beside the reference's own keys (:meth:`Trainer.reference_state`);
tensors shared by both are stored once.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from . import distributed as D
from .checkpoint import load_into
from .controller import CBP, EpochDecision, clip_gradients
from .errors import CheckpointError, UserError
from .run import Run
from .runtime import Scalars, progress

SCHEMA_VERSION = 1


@dataclass
class Epoch:
    """What one epoch measured (accuracies in %, as the pipeline defines them)."""

    epoch: int
    train_loss: float = 0.0
    train_acc: float = 0.0
    train_acc5: float = 0.0
    test_loss: float = 0.0
    test_acc: float = 0.0
    test_acc5: float = 0.0
    cfs: float = 0.0
    lagsum: float = 0.0
    lagsum_pre: float = 0.0
    decision: EpochDecision | None = None
    improved: bool = False
    totals: dict[str, float] = field(default_factory=dict)


def autocast(device: torch.device, enabled: bool):
    """Mixed precision: float16 on CUDA, bfloat16 elsewhere (a no-op when not ``enabled``)."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def training_state(state: Mapping[str, Any], path: str, flag: str = "--resume"
                   ) -> Mapping[str, Any]:
    """The training state inside a checkpoint read from ``path``, or one error line saying
    why it cannot be resumed and what to do instead."""
    ts = state.get("trainer") if isinstance(state, Mapping) else None
    if not isinstance(ts, Mapping):
        raise UserError(f"cannot resume from {path}: it holds no full training state of this "
                        f"version (an older or foreign file); start the run again without {flag}")
    if int(ts.get("version", 0)) > SCHEMA_VERSION:
        raise UserError(f"cannot resume from {path}: it was written by a newer version "
                        f"(training state {ts['version']}); update this project")
    return ts


def add_speed_flags(parser: argparse.ArgumentParser, prefix: str = "--") -> None:
    """The loop's opt-in speed flags ``amp`` and ``compile`` (``prefix`` "-" for pipelines
    with single-dash flags); off by default, so every number stays as without them."""
    parser.add_argument(f"{prefix}amp", action="store_true",
                        help="mixed precision: float16 on CUDA, bfloat16 on CPU (default: off)")
    parser.add_argument(f"{prefix}compile", action="store_true",
                        help="torch.compile the network (default: off)")


class Trainer:
    """The training loop; subclass and override the hooks below.

    ``clip``: ``None``, ``"value"`` (every gradient element clamped to ±``clip_max``, the
    CBP pipelines) or ``"norm"`` (total norm ≤ ``clip_max``, TSSL-BP) over
    :meth:`clip_parameters`.  ``amp``: autocast + gradient scaling; the gradients are unscaled
    before clipping unless ``amp_reference_clip``.  ``compile``: the network the loop calls is
    ``torch.compile``'d.
    """

    clip: str | None = None
    clip_max: float = 1.0
    best_init: float = 0.0  # best accuracy before the first epoch
    resume_flag: str = "--resume"
    rank_state_dir: str | None = None  # every rank saves its final state there (testing)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, run: Run,
                 epochs: int, device: torch.device, controller: CBP | None = None,
                 scheduler: Any = None, amp: bool = False, amp_reference_clip: bool = False,
                 compile: bool = False, show: bool = True,
                 logdirs: Mapping[str, str | None] | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.run = run
        self.epochs = int(epochs)
        self.device = torch.device(device)
        self.controller = controller
        self.scheduler = scheduler
        self.amp = bool(amp)
        self.amp_reference_clip = amp_reference_clip
        self.compile = bool(compile)
        self.show = show
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        self.logdirs = dict(logdirs or {})
        self.start_epoch = 0
        self.rows: list[list[float]] = []
        row = self.initial_row()
        if row is not None:
            self.rows = [row]
        self.best = {"acc": self.best_init, "epoch": 0}
        self.history: dict[str, list[float]] = {}
        self.last: Epoch | None = None
        self.epoch = 0  # the epoch being trained
        self.net: nn.Module = model  # what the batches run through (see network())
        self._resumed = False

    # ================================================================ hooks
    def inputs(self, batch: Any) -> tuple[Any, Tensor]:
        """(network input, target) of a loader batch, on the device."""
        x, y = batch
        return x.to(self.device), y.to(self.device)

    def forward(self, net: nn.Module, x: Any) -> Any:
        return net(x)

    def loss(self, output: Any, target: Tensor) -> Tensor:
        raise NotImplementedError

    def batch_totals(self, output: Any, target: Tensor, loss: Tensor) -> dict[str, float]:
        """Per-batch sums added up over the epoch (and over ranks): by default the loss
        weighted by the batch size, top-1 hits and the sample count.  A value may be a
        tensor on the device (read back once, at the end of the epoch)."""
        n = target.shape[0]
        hits = int((output.detach().argmax(1) == target).sum())
        return {"loss": float(loss.detach()) * n, "correct": hits, "n": n}

    def train_summary(self, st: Epoch) -> None:
        """Fill ``st.train_*`` from ``st.totals``."""
        n = max(st.totals.get("n", 0), 1)
        st.train_loss = st.totals.get("loss", 0.0) / n
        st.train_acc = 100.0 * st.totals.get("correct", 0) / n

    def before_epoch(self, st: Epoch) -> None:
        """Before the epoch's first batch."""

    def on_batch(self, index: int, st: Epoch) -> None:
        """After each optimizer step (periodic progress lines)."""

    def after_step(self) -> None:
        """After each optimizer step: the controller clamps the latent quantized weights."""
        if self.controller is not None:
            self.controller.clamp_()

    def clip_parameters(self) -> Iterable[Tensor]:
        return self.model.parameters()

    def after_train(self, st: Epoch) -> None:
        """After the epoch's batches, before the controller's decision."""

    def schedule(self, st: Epoch) -> None:
        """The weight learning-rate schedule, once per epoch (after the controller's)."""
        if self.scheduler is not None:
            self.scheduler.step()

    def on_decision(self, st: Epoch) -> None:
        """After the controller's end-of-epoch decision (printing it)."""

    def evaluate(self, st: Epoch) -> None:
        """Fill ``st.test_*`` (every rank; the loader holds this rank's share)."""
        raise NotImplementedError

    def improved(self, st: Epoch) -> bool:
        """Whether this epoch's files replace the best ones (and the best is updated)."""
        return st.test_acc > self.best["acc"]

    def update_best(self, st: Epoch) -> None:
        if st.improved:
            self.best.update(acc=st.test_acc, epoch=st.epoch)

    def initial_row(self) -> list[float] | None:
        """The progress table's first row (None: the pipeline writes no table)."""
        return None

    def row(self, st: Epoch) -> list[float] | None:
        return None

    def scalars(self, st: Epoch) -> Mapping[str, Mapping[str, float]]:
        """Tensorboard scalars of the epoch, per writer (``logdirs`` key)."""
        out = {"loss/train": st.train_loss, "accuracy/test": st.test_acc,
               "lr": self.optimizer.param_groups[0]["lr"]}
        c = self.controller
        if c is not None:
            out.update({"cbp/lagsum": st.lagsum, "cbp/cfs": st.cfs, "cbp/g": c.g,
                        "cbp/ucs": c.ucs, "cbp/lambda_mean": c.lambda_mean()})
        return {"main": out}

    def report(self, st: Epoch) -> None:
        """Print the epoch's summary (before the writes)."""

    def reference_state(self, st: Epoch, state: dict) -> dict:
        """The reference's checkpoint of this epoch, derived from the training ``state``."""
        return {}

    def write(self, st: Epoch, full: dict) -> None:
        """The reference-named files of the epoch (rank 0, inside the writes).  ``full`` is the
        resumable checkpoint: :meth:`reference_state`'s keys, the training state under
        ``trainer`` and the run's identity under ``run``."""

    def after_epoch(self, st: Epoch) -> None:
        """After the epoch's files are written."""

    def extra_state(self) -> dict:
        """Pipeline state the training state must carry besides the model's state dict."""
        return {}

    def load_extra_state(self, extra: Mapping[str, Any]) -> None:
        pass

    def last_path(self) -> str:
        """The training-state file (what ``--resume`` reads)."""
        raise NotImplementedError

    # ================================================================ state
    def state(self, st: Epoch, rng: dict) -> dict:
        """The training state after epoch ``st`` (one schema for every pipeline)."""
        c = self.controller
        return {
            "version": SCHEMA_VERSION,
            "epoch": st.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.amp else None,
            "cbp": c.state_dict() if c is not None else None,
            "progress": torch.tensor(self.rows, dtype=torch.float64) if self.rows else None,
            "best": dict(self.best),
            "history": {k: list(v) for k, v in self.history.items()},
            "extra": self.extra_state(),
            "rng": rng,
        }

    def resume(self, path: str, hint: str, safe: tuple = ()) -> dict:
        """Load a training state written by this loop and continue after its epoch; returns
        the whole checkpoint.  ``safe``: classes the file may hold besides tensors."""
        state = self.run.resume(path, last_hint=hint, safe=safe, needs=())
        self.restore(state, path)
        return state

    def resume_from(self, value: str | None, safe: tuple = ()) -> dict | None:
        """Resume as the ``--resume [PATH]`` flag says (``auto``: :meth:`last_path`; empty: no
        resume), every rank together; returns the checkpoint, or None."""
        if not value:
            return None
        path = self.last_path() if value == "auto" else value
        with D.collective():
            state = self.resume(path, hint=f"resume from {self.last_path()}", safe=safe)
        print(f"resumed from {path} at epoch {self.start_epoch}")
        return state

    def restore(self, state: Mapping[str, Any], path: str) -> None:
        """Continue from a checkpoint already read (``state``, read from ``path``)."""
        ts = training_state(state, path, self.resume_flag)
        c = self.controller
        if (ts.get("cbp") is None) != (c is None):
            kind, this = ("fp32", "CBP") if c is not None else ("CBP", "fp32")
            raise UserError(f"cannot resume from {path}: it is a {kind} training state, this is "
                            f"a {this} run")
        try:
            load_into(self.model, ts["model"])
        except CheckpointError as exc:
            raise CheckpointError(f"cannot resume from {path}: {exc}") from None
        self.optimizer.load_state_dict(ts["optimizer"])
        if self.scheduler is not None and ts.get("scheduler") is not None:
            self.scheduler.load_state_dict(ts["scheduler"])
        if self.amp and ts.get("scaler") is not None:
            self.scaler.load_state_dict(ts["scaler"])
        if c is not None:
            c.load_state_dict(ts["cbp"])
        if ts.get("progress") is not None:
            self.rows = torch.as_tensor(ts["progress"]).tolist()
        self.best = {**self.best, **ts["best"]}
        self.history = {k: list(v) for k, v in ts.get("history", {}).items()}
        self.load_extra_state(ts.get("extra", {}))
        self.start_epoch = int(ts["epoch"]) + 1
        self.run.restore_rng(ts["rng"])
        self._resumed = True

    # ================================================================ loop
    def network(self) -> nn.Module:
        """What the batches run through: DDP under torch.distributed, compiled with
        ``compile``."""
        net = D.ddp(self.model)
        if self.compile:
            net = torch.compile(net)
        return net

    def fit(self, train_loader: DataLoader, test_loader: DataLoader) -> Epoch | None:
        """Train from ``start_epoch`` to ``epochs``; returns the last epoch's measurements.
        With a ``ptq`` controller (:mod:`cbp.methods`) nothing trains: see :meth:`post_training`."""
        if getattr(self.controller, "method", "cbp") == "ptq":
            return self.post_training(test_loader)
        if self.controller is not None and not self._resumed:
            self.controller.start()  # the initial lambda update at ucs = 0
        main = self.run.main
        writers = {k: Scalars(v if main else None) for k, v in self.logdirs.items()}
        self.net = self.network()
        self.test_loader = test_loader
        try:
            for epoch in range(self.start_epoch, self.epochs):
                st = self.train_one_epoch(train_loader, epoch)
                self.end_epoch(st, writers)
        finally:
            for w in writers.values():
                w.close()
        self.run.finish(self.model, self.controller, optimizer=self.optimizer,
                        folder=self.rank_state_dir)
        return self.last

    def post_training(self, test_loader: DataLoader) -> Epoch:
        """Post-training quantization: the quantized network (scales mean |W| of the loaded
        weights) evaluated once, no training; its files are written as epoch 0's, the best."""
        if self._resumed:
            raise UserError("post-training quantization trains nothing, so there is nothing to "
                            f"resume: leave out {self.resume_flag}")
        print("post-training quantization: the loaded weights quantized, evaluated without "
              "training")
        self.net = self.network()
        self.test_loader = test_loader
        st = Epoch(0)
        self.before_epoch(st)
        self.run.check_epoch(self.model, st.epoch, None)
        self.record(st, {}, best=True)
        self.run.finish(self.model, self.controller, optimizer=self.optimizer,
                        folder=self.rank_state_dir)
        return st

    def step(self, batch: Any, epoch: int, index: int) -> tuple[Any, Tensor, Tensor]:
        """One optimizer step on ``batch``: (output, target, task loss)."""
        x, y = self.inputs(batch)
        with autocast(self.device, self.amp):
            out = self.forward(self.net, x)
            loss = self.loss(out, y)
        c = self.controller
        lag = c.lagrangian(loss.float()) if c is not None else loss
        self.run.check_loss(lag, epoch, index)
        self.model.zero_grad(set_to_none=True)  # parameters outside the optimizer too
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(lag).backward()
        if self.clip is not None:
            if self.amp and not self.amp_reference_clip:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients
            if self.clip == "value":
                clip_gradients(self.clip_parameters(), self.clip_max)
            else:  # parameters without a gradient are skipped by both
                torch.nn.utils.clip_grad_norm_(self.clip_parameters(), self.clip_max)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.after_step()
        return out, y, loss

    def train_one_epoch(self, loader: Iterable, epoch: int = 0) -> Epoch:
        """The batches of one epoch (no controller decision, evaluation or file): its
        training measurements."""
        self.train_loader = loader
        return self.train_epoch(epoch)

    def train_epoch(self, epoch: int) -> Epoch:
        st = Epoch(epoch)
        self.epoch = epoch
        self.before_epoch(st)
        D.set_epoch(self.train_loader, epoch)
        self.model.train()
        totals: dict[str, float] = {}
        bar = progress(self.train_loader, f"epoch {epoch}",
                       enabled=self.show and D.is_main_process())
        for i, batch in enumerate(bar):
            out, y, loss = self.step(batch, epoch, i)
            for k, v in self.batch_totals(out, y, loss).items():
                totals[k] = totals.get(k, 0.0) + v
            st.totals = totals
            self.on_batch(i, st)
        keys = sorted(totals)
        st.totals = dict(zip(keys, D.sum_over_ranks([float(totals[k]) for k in keys])))
        self.train_summary(st)
        return st

    def end_epoch(self, st: Epoch, writers: Mapping[str, Scalars]) -> None:
        self.after_train(st)
        c = self.controller
        if c is not None:
            st.decision = c.end_epoch(self.optimizer)
            st.lagsum, st.lagsum_pre = st.decision.lagsum, c.lagsum_pre
        self.run.check_epoch(self.model, st.epoch, st.lagsum if c is not None else None)
        self.schedule(st)
        self.on_decision(st)
        self.record(st, writers)

    def record(self, st: Epoch, writers: Mapping[str, Scalars], best: bool = False) -> None:
        """Evaluate the epoch, then its best-so-far rule (``best``: it is the best), row,
        scalars, report and files, the training state last."""
        c = self.controller
        D.broadcast_(list(self.model.buffers()))  # evaluate rank 0's statistics everywhere
        self.evaluate(st)
        if c is not None:
            st.cfs = c.cfs()
        st.improved = True if best else self.improved(st)
        self.update_best(st)
        row = self.row(st)
        if row is not None:
            self.rows.append(row)
        if any(w.enabled for w in writers.values()):  # (lambda_mean reads every multiplier)
            for name, values in self.scalars(st).items():
                w = writers.get(name)
                if w is not None:
                    for tag, v in values.items():
                        w.add(tag, v, st.epoch)
        self.report(st)
        self.last = st
        rng = self.run.rng_state()  # every rank's (a collective: outside the writes)
        state = self.state(st, rng)
        full = self.run.checkpoint({**self.reference_state(st, state), "trainer": state})
        with self.run.writes():
            if self.run.main:
                self.write(st, full)
                # the training state last: a run killed before it redoes this epoch on resume
                self.run.save(full, self.last_path())
        self.after_epoch(st)


__all__ = ["Epoch", "SCHEMA_VERSION", "Trainer", "add_speed_flags", "autocast", "training_state"]
