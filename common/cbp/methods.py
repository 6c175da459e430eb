"""The quantization methods every CBP entry point offers (``--method``): CBP and the two
standard baselines it is compared with, on the same network, levels and scales.

- ``cbp``: constrained backpropagation, :class:`cbp.CBP` (the default).
- ``ste``: plain quantization-aware training: the same loop, schedule, optimizer and quantized
  forward with straight-through gradients, but no Lagrangian term (every multiplier held at
  λ ≡ 0).  The schedule still runs on the task loss alone, so the weight learning rate decays
  by the same rule and the run has the same length.
- ``ptq``: post-training quantization: the fp32 weights quantized with the same scales
  (mean |W|) and levels, evaluated once, without training.

A training loop uses :func:`controller` in place of ``CBP(...)``; :class:`cbp.trainer.Trainer`
turns a ``ptq`` controller into one evaluation.  Users of :func:`cbp.convert` get the same
choice (``ptq`` is ``convert`` followed by evaluation).
"""

from __future__ import annotations

import argparse
import os
import re

import torch
from torch import Tensor

from .controller import CBP

METHODS = ("cbp", "ste", "ptq")
DESCRIPTIONS = {
    "cbp": "constrained backpropagation",
    "ste": "straight-through QAT (lambda = 0)",
    "ptq": "post-training quantization (no training)",
}


class STE(CBP):
    """CBP's schedule with every multiplier held at zero: the Lagrangian is the task loss."""

    method = "ste"

    def penalty(self) -> Tensor:
        w = self.targets[0].weight
        return torch.zeros((), dtype=torch.float32, device=w.device)

    def update_lambda(self) -> None:
        """No ascent step: λ stays 0 (the schedule's update count still advances)."""
        self.num_updates += 1


class PTQ(STE):
    """Post-training quantization: the scales of :class:`CBP` and nothing trained."""

    method = "ptq"


def controller(method: str, model_or_targets, lr_lambda: float, **kwargs) -> CBP:
    """The controller of ``method`` (``cbp``, ``ste`` or ``ptq``), built like ``CBP(...)``."""
    kinds = {"cbp": CBP, "ste": STE, "ptq": PTQ}
    if method not in kinds:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return kinds[method](model_or_targets, lr_lambda, **kwargs)


def add_method_flag(parser: argparse.ArgumentParser, prefix: str = "--") -> None:
    """``--method {cbp,ste,ptq}`` (``prefix`` "-" for the pipelines with single-dash flags)."""
    parser.add_argument(
        f"{prefix}method", default="cbp", choices=list(METHODS),
        help="cbp (default): constrained backpropagation; ste: the same training with "
             "straight-through gradients and no Lagrangian term; ptq: the fp32 weights "
             "quantized with the same scales and evaluated, no training.  Files other than "
             "cbp's carry the method in their names")


def suffix(method: str) -> str:
    """What a file name gains for ``method``: nothing for ``cbp``, else ``_<method>``."""
    return "" if method == "cbp" else f"_{method}"


def flag(method: str, prefix: str = "--") -> str:
    """The flag that selects ``method`` in a printed command (nothing for the default)."""
    return "" if method == "cbp" else f" {prefix}method {method}"


_TOKEN = re.compile(r"(?<![A-Za-z0-9])cbp(?![A-Za-z0-9])")


def tagged(path: str, method: str) -> str:
    """``path`` for ``method``: its file name's ``cbp`` token replaced by the method, or, when
    it has none, ``_<method>`` added before the extension; ``cbp`` leaves it unchanged."""
    if method == "cbp":
        return path
    folder, name = os.path.split(path)
    if _TOKEN.search(name):
        name = _TOKEN.sub(method, name, count=1)
    else:
        stem, ext = os.path.splitext(name)
        name = f"{stem}_{method}{ext}"
    return os.path.join(folder, name)


__all__ = ["DESCRIPTIONS", "METHODS", "PTQ", "STE", "add_method_flag", "controller", "flag", "suffix",
           "tagged"]
