"""Checkpoint helpers shared by every pipeline: atomic save and tolerant, explicit loading."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError
from .files import save_atomic  # noqa: F401 (re-exported: the one way checkpoints are written)

STATE_DICT_KEYS = ("net", "model", "model_state_dict", "state_dict")


def load_file(
    path: str, map_location: Any = "cpu", trust: bool = False, safe: tuple = ()
) -> Any:
    """Load a checkpoint file.

    Only tensors, plain containers and the classes in ``safe`` (e.g. ``argparse.Namespace``)
    are unpickled unless ``trust`` is True (the user opts in to running arbitrary pickled code).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(list(safe)):
            return torch.load(path, map_location=map_location, weights_only=not trust)
    except Exception as exc:  # unpickling refused or corrupt file
        text = str(exc)
        if not trust and "unsupported global" in text.lower():
            raise CheckpointError(
                f"{path} contains pickled Python objects besides tensors; it is loaded only "
                "when you trust its source (trust=True)"
            ) from None
        raise CheckpointError(
            f"cannot read {path}: not a PyTorch checkpoint or the file is damaged"
        ) from None


def extract_state_dict(obj: Any, strip_prefix: str = "module.") -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: the object itself or its ``net`` / ``model`` /
    ``model_state_dict`` / ``state_dict`` entry.  A DDP ``module.`` prefix is removed."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
            if isinstance(inner, nn.Module):
                obj = inner.state_dict()
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            "checkpoint holds no state dict (expected a dict of tensors, or one under "
            + "/".join(STATE_DICT_KEYS)
            + ")"
        )
    out = dict(obj)
    if strip_prefix and out and all(k.startswith(strip_prefix) for k in out):
        out = {k[len(strip_prefix) :]: v for k, v in out.items()}
    return out


def check_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], allow_missing: tuple[str, ...] = ()
) -> None:
    """Raise ``CheckpointError`` listing missing, unexpected and shape-mismatched keys.

    Keys ending with one of ``allow_missing`` (e.g. ``".scale"``) may be absent.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(allow_missing or ("\0",))]
    unexpected = [k for k in state if k not in own]
    shape = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short(unexpected)}")
    if shape:
        problems.append(f"shape mismatch: {_short(shape)}")
    if problems:
        raise CheckpointError("; ".join(problems))


def nonfinite_tensors(obj: Any, prefix: str = "") -> list[str]:
    """Names (``net.conv1.weight``, ``lamb[2]``) of the floating-point tensors in ``obj``, a
    tensor or dicts / lists of them, that hold NaN or infinity."""
    if isinstance(obj, torch.Tensor):
        bad = obj.is_floating_point() and not bool(torch.isfinite(obj).all())
        return [prefix or "tensor"] if bad else []
    out: list[str] = []
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out += nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out += nonfinite_tensors(v, f"{prefix}[{i}]")
    return out


def check_finite(state: Mapping[str, Any], where: str, on_bad: str = "error") -> None:
    """Refuse (``on_bad='error'``) or warn about (``'warn'``) non-finite tensors in ``state``."""
    if on_bad == "ignore":
        return
    bad = nonfinite_tensors(state)
    if not bad:
        return
    text = f"{where} holds non-finite values (NaN/inf) in {_short(bad)}"
    if on_bad == "error":
        raise CheckpointError(text + "; it comes from a diverged run and cannot be used")
    print(f"warning: {text}", file=sys.stderr)


def _short(items: list[str], n: int = 6) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_into(
    model: nn.Module,
    source: str | Mapping[str, Any],
    *,
    allow_missing: tuple[str, ...] = (),
    trust: bool = False,
    nonfinite: str = "error",
) -> dict[str, torch.Tensor]:
    """Load a checkpoint (path or object, any accepted format) into ``model``.

    Keys matching ``allow_missing`` suffixes keep the model's values.  Returns the state dict
    that was applied.  Raises ``CheckpointError`` with one explanatory line on any mismatch.
    Tensors holding NaN/inf are refused (``nonfinite='error'``, for weights training starts
    from) or reported (``'warn'``, for evaluation).
    """
    obj = load_file(source, trust=trust) if isinstance(source, str) else source
    state = extract_state_dict(obj)
    check_finite(state, source if isinstance(source, str) else "the checkpoint", nonfinite)
    try:
        check_state_dict(model, state, allow_missing)
    except CheckpointError as exc:
        where = f"{source}: " if isinstance(source, str) else ""
        raise CheckpointError(f"{where}{exc}") from None
    merged = model.state_dict()
    merged.update({k: v for k, v in state.items()})
    model.load_state_dict(merged, strict=True)
    return state
