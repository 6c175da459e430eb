"""Command-line plumbing shared by the pipeline scripts: devices, seeds, clean errors,
progress bars and optional tensorboard logging."""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from .errors import UserError


def fail(message: str, code: int = 1) -> None:
    """Print ``error: message`` to stderr and exit."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_main(main: Callable[[], Any]) -> None:
    """Run ``main()``; user-fixable errors become one line on stderr and exit status 1.  The
    process group (under torch.distributed) is left on every way out, success included."""
    try:
        main()
    except UserError as exc:
        _leave_process_group(ok=False)
        if getattr(exc, "reported", False):  # already printed by every rank (distributed)
            raise SystemExit(1) from None
        fail(str(exc))
    except KeyboardInterrupt:
        _leave_process_group(ok=False)
        fail("interrupted", 130)
    except BaseException:
        _leave_process_group(ok=False)
        raise
    _leave_process_group(ok=True)


def _leave_process_group(ok: bool) -> None:
    """Destroy the default process group (if any).  After a success every rank first waits
    for the others, so that no rank tears its connections down while a peer still uses them."""
    try:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if ok:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


def select_device(name: str | None = None) -> torch.device:
    """``None``/``"auto"``: cuda if available else cpu; otherwise the named device, checked."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"invalid device {name!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name} requested but CUDA is not available (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {name} requested but only {torch.cuda.device_count()} GPU(s) exist")
    return dev


def gpu_to_device(gpu: str | None, device: str | None) -> torch.device:
    """Honour the reference's ``--gpu N`` (a CUDA index) unless ``--device`` is given."""
    if device not in (None, "", "auto"):
        return select_device(device)
    if torch.cuda.is_available() and gpu not in (None, ""):
        try:
            idx = int(str(gpu).split(",")[0])
        except ValueError:
            raise UserError(f"--gpu expects a device index, got {gpu!r}") from None
        return select_device(f"cuda:{idx}")
    return select_device(None)


def seed_everything(seed: int | None, deterministic: bool = False) -> None:
    """Seed python, numpy and torch on every device (no-op for None).  ``deterministic``
    also asks cuDNN for deterministic kernels (and no autotuning)."""
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def require_file(path: str, what: str, hint: str) -> None:
    """``what path not found: hint`` as a user error when ``path`` is not a file."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} not found: {hint}")


CHECKPOINT_SOURCE = "the authors' Google Drive folder linked from the CBP-QSNN README"


def positive_int(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def positive_float(text: str) -> float:
    v = float(text)
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def nonneg_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def progress(iterable: Iterable, desc: str = "", total: int | None = None, enabled: bool = True):
    """A tqdm bar on stderr when tqdm is installed and enabled (no-op otherwise)."""
    if not enabled or os.environ.get("CBP_NO_PROGRESS"):
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


class Scalars:
    """Tensorboard scalar logger that silently does nothing if disabled or unavailable."""

    def __init__(self, logdir: str | None, purge_step: int | None = None) -> None:
        self._w = None
        if logdir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._w = SummaryWriter(logdir, purge_step=purge_step)
            except Exception:  # tensorboard not installed
                self._w = None

    @property
    def enabled(self) -> bool:
        return self._w is not None

    def add(self, tag: str, value: float, step: int) -> None:
        if self._w is not None:
            self._w.add_scalar(tag, float(value), step)

    def close(self) -> None:
        if self._w is not None:
            self._w.close()


def rng_state() -> dict:
    """torch, CUDA, numpy and python RNG states as tensors and plain lists (loadable with
    ``weights_only``), saved with a checkpoint so a resumed run draws the same numbers."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": list(py_state[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if isinstance(state.get("numpy"), list):  # older layout: the full numpy/python tuples
        n, p = state["numpy"], state["python"]
        np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
        random.setstate((p[0], tuple(p[1]), p[2]))
    elif "numpy" in state:
        np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32),
                             int(state["numpy_pos"]), 0, 0.0))
    if "python" in state:
        random.setstate((3, tuple(int(v) for v in state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
