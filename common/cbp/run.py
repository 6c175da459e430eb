"""The life of one training run: what it may write, when, and how it stops.

Every pipeline's training loop is a thin script over :class:`Run`::

    with Run(identity, outputs, lr_flag="--lr") as run:   # locks the outputs
        state = run.resume(path, last_hint=...) if resuming else None  # same run? finite?
        for epoch ...:
            for batch, (x, y) in enumerate(loader):
                lag = ctl.lagrangian(loss_fn(model(x), y))
                run.check_loss(lag, epoch, batch)          # NaN/inf: stop at once
                ...
            decision = ctl.end_epoch(optimizer)
            run.check_epoch(model, epoch, decision.lagsum)
            with run.writes():                             # rank 0 writes, every rank agrees
                run.save(model.state_dict(), best_path)    # first replacement keeps a .bak
                run.save(run.checkpoint(full_state), last_path)   # the training state last

The rules it enforces:

* Nothing is written before an epoch has finished with finite loss, lagsum and weights; a
  non-finite value stops the run with :class:`Diverged` (one line naming epoch, batch, value
  and the learning-rate flag) and every file from before the run is left as it was.
* Every write is atomic and durable (:mod:`cbp.files`); the first time the run replaces a file
  that existed before it, that file is kept as ``<name>.bak`` (older backups are numbered, never
  removed).  A resumed run continues its own files and makes no new backups.
* One run per output: a second run that would write the same files stops with one line; a lock
  left by a killed run is taken over.
* Only the main process (rank 0) locks and writes; the others train in step with it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from . import distributed as D
from .checkpoint import load_file, nonfinite_tensors
from .errors import CheckpointError, Diverged, UserError
from .files import OutputLock, failpoint_nan, promote, save_atomic, write_table, write_text_atomic
from .runtime import rng_state, set_rng_state


def _finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value.detach()).all())
    return math.isfinite(float(value))


class Run:
    """One training run's outputs, checks and checkpoint identity.

    ``identity`` names what the checkpoints belong to (pipeline, model, dataset, quantization
    mode, width, ...): it is stored in every checkpoint and compared on resume.  ``outputs``
    are the files the run writes (locked for its duration).  ``lr_flag`` is the option the
    divergence message suggests lowering.
    """

    def __init__(self, identity: Mapping[str, Any], outputs: Iterable[str], *,
                 lr_flag: str = "--lr") -> None:
        self.identity = {k: _plain(v) for k, v in identity.items()}
        self.outputs = [os.fspath(p) for p in outputs]
        self.lr_flag = lr_flag
        self.main = D.is_main_process()
        self._lock = OutputLock(self.outputs) if self.main else None
        self._replaced: set[str] = set()  # outputs this run already replaced (or continues)
        self._at: tuple[int, int] | None = None  # (epoch, batch) of the last checked loss

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> Run:
        error = None
        if self._lock is not None:
            try:
                self._lock.acquire()
            except Exception as exc:  # noqa: BLE001 - every rank stops with it
                error = exc
        D.agree(error)
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if self._lock is not None:
            self._lock.release()
        if isinstance(exc, (RuntimeError, OverflowError)) and "overflow" in str(exc) \
                and not isinstance(exc, UserError):  # e.g. an optimizer step size past float32
            where = "training diverged" + (f" at epoch {self._at[0]}, batch {self._at[1]}"
                                           if self._at else "")
            raise Diverged(f"{where}: {str(exc).splitlines()[0]}; no file was written for this "
                           f"epoch (try a lower learning rate, {self.lr_flag})") from None

    def writes(self) -> D.collective:
        """``with run.writes(): ...`` around the main process's writes of an epoch: an error
        there (disk full, ...) ends every rank with its line instead of leaving them waiting.
        The block must hold no collective (compute :meth:`rng_state` before it)."""
        return D.collective()

    def finish(self, model: nn.Module, controller: Any = None, *,
               optimizer: torch.optim.Optimizer | None = None, folder: str | None = None) -> None:
        """Every rank saves its final weights, multipliers, g and learning rates as
        ``rank<r>.pth`` in ``folder`` (or ``CBP_RANK_STATE_DIR``), to compare ranks after a
        distributed run; nothing when neither is set."""
        folder = folder or os.environ.get("CBP_RANK_STATE_DIR")
        if not folder:
            return
        state = {"model": model.state_dict(), "lamb": [], "g": None, "ucs": None,
                 "lr": [g["lr"] for g in optimizer.param_groups] if optimizer else []}
        if controller is not None:
            state.update(lamb=[lam.detach().clone() for lam in controller.lambdas],
                         g=controller.g, ucs=controller.ucs)
        save_atomic(state, os.path.join(folder, f"rank{D.rank()}.pth"))

    def continue_files(self) -> None:
        """Treat the outputs as this run's own (after a resume): no backups are made."""
        self._replaced.update(self.outputs)

    # ------------------------------------------------------------------ checks
    def check_loss(self, value: torch.Tensor | float, epoch: int, batch: int) -> None:
        """Stop with :class:`Diverged` when the batch's loss / Lagrangian is not finite."""
        self._at = (epoch, batch)
        if failpoint_nan():
            value = float("nan")
        bad = not _finite(value)
        error = None
        if bad:
            v = float(value.detach().float().sum()) if isinstance(value, torch.Tensor) else value
            error = Diverged(
                f"training diverged at epoch {epoch}, batch {batch}: loss = {v}; no file was "
                f"written for this epoch (try a lower learning rate, {self.lr_flag})"
            )
        if D.is_distributed():  # every rank stops in the same batch
            dev = value.device if isinstance(value, torch.Tensor) else "cpu"
            flag = torch.tensor([float(bad)], device=dev)
            D.all_reduce_sum(flag)
            if float(flag) > 0:
                D.agree(error)
        elif error is not None:
            raise error

    def check_epoch(self, model: nn.Module, epoch: int, lagsum: float | None = None) -> None:
        """Before anything of the epoch is written: finite lagsum and finite parameters."""
        if lagsum is not None and not math.isfinite(lagsum):
            raise Diverged(
                f"training diverged at epoch {epoch}: lagsum = {lagsum}; no file was written "
                f"for this epoch (try a lower learning rate, {self.lr_flag})"
            )
        bad = [n for n, p in model.named_parameters() if not _finite(p)]
        if bad:
            more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
            raise Diverged(
                f"training diverged at epoch {epoch}: non-finite weights in "
                f"{', '.join(bad[:3])}{more}; no file was written for this epoch "
                f"(try a lower learning rate, {self.lr_flag})"
            )

    # ------------------------------------------------------------------ writing
    def checkpoint(self, state: Mapping[str, Any]) -> dict:
        """``state`` plus this run's identity (what :meth:`resume` compares)."""
        return {**state, "run": dict(self.identity)}

    def save(self, obj: Any, path: str) -> None:
        """Write a checkpoint (main process only): refused if it holds NaN/inf; the first
        replacement of a file from before the run keeps that file as ``<path>.bak``."""
        if not self.main:
            return
        bad = nonfinite_tensors(obj)
        if bad:
            raise Diverged(
                f"not writing {path}: non-finite values in {', '.join(bad[:3])}; no earlier "
                f"file was changed (try a lower learning rate, {self.lr_flag})"
            )
        self._write(path, lambda p: save_atomic(obj, p))

    def write_table(self, path: str, rows: Iterable[Iterable[float]]) -> None:
        """Write a progress table (main process only), backed up like :meth:`save`."""
        if not self.main:
            return
        rows = [list(r) for r in rows]
        self._write(path, lambda p: write_table(p, rows))

    def write_text(self, path: str, text: str) -> None:
        """Write a small text file (main process only), backed up like :meth:`save`."""
        if self.main:
            self._write(path, lambda p: write_text_atomic(p, text))

    def _write(self, path: str, write) -> None:
        path = os.fspath(path)
        bak = promote(path, write, self._replaced)
        if bak is not None:
            print(f"existing {path} kept as {bak}")

    # ------------------------------------------------------------------ RNG
    def rng_state(self) -> dict:
        """The RNG state a checkpoint stores: this process's (python, numpy, torch, CUDA) and,
        under torch.distributed, every rank's under ``ranks`` (a collective: call it on every
        rank)."""
        state = rng_state()
        if D.is_distributed():
            ranks: list = [None] * D.world_size()
            torch.distributed.all_gather_object(ranks, state)
            state = {**state, "ranks": ranks}
        return state

    def restore_rng(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`rng_state`: each rank its own when the checkpoint was written by as
        many ranks, else the one stored state."""
        ranks = state.get("ranks")
        if ranks is not None and len(ranks) == D.world_size():
            set_rng_state(ranks[D.rank()])
        else:
            set_rng_state(state)

    # ------------------------------------------------------------------ resume
    def resume(self, path: str, *, last_hint: str, trust: bool = False, safe: tuple = (),
               needs: tuple[str, ...] = ("epoch", "rng")) -> dict:
        """Load a resumable checkpoint of this run: it must hold a training state (the keys
        ``needs``), finite tensors, and an identity equal to this run's."""
        if not os.path.isfile(path):
            raise UserError(f"cannot resume: {path} not found ({last_hint})")
        state = load_file(path, trust=trust, safe=safe)
        if not isinstance(state, Mapping) or any(k not in state for k in needs):
            raise UserError(f"cannot resume from {path}: it holds no full training state "
                            f"(missing {', '.join(k for k in needs if k not in state) or 'a dict'}"
                            f"); {last_hint}")
        theirs = state.get("run")
        if isinstance(theirs, Mapping):
            diff = [f"{k} {theirs.get(k)!r} (this run: {v!r})"
                    for k, v in self.identity.items() if k in theirs and theirs[k] != v]
            if diff:
                raise UserError(f"cannot resume from {path}: it belongs to another run: "
                                + ", ".join(diff))
        bad = nonfinite_tensors({k: v for k, v in state.items() if k != "rng"})
        if bad:
            raise CheckpointError(f"cannot resume from {path}: non-finite values (NaN/inf) in "
                                  f"{', '.join(bad[:3])}; it comes from a diverged run")
        self.continue_files()
        return dict(state)


def _plain(v: Any) -> Any:
    return v if isinstance(v, (str, int, float, bool, type(None))) else str(v)


__all__ = ["Diverged", "Run"]
