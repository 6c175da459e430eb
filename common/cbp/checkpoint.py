"""Checkpoint helpers shared by every pipeline: atomic save and tolerant, explicit loading."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

STATE_DICT_KEYS = ("net", "model", "model_state_dict", "state_dict")


class CheckpointError(RuntimeError):
    """A checkpoint is missing or does not fit the model (message is one readable line)."""


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=folder)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
        if not trust and "Unsupported global" in text:
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


def _short(items: list[str], n: int = 6) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_into(
    model: nn.Module,
    source: str | Mapping[str, Any],
    *,
    allow_missing: tuple[str, ...] = (),
    trust: bool = False,
) -> dict[str, torch.Tensor]:
    """Load a checkpoint (path or object, any accepted format) into ``model``.

    Keys matching ``allow_missing`` suffixes keep the model's values.  Returns the state dict
    that was applied.  Raises ``CheckpointError`` with one explanatory line on any mismatch.
    """
    obj = load_file(source, trust=trust) if isinstance(source, str) else source
    state = extract_state_dict(obj)
    try:
        check_state_dict(model, state, allow_missing)
    except CheckpointError as exc:
        where = f"{source}: " if isinstance(source, str) else ""
        raise CheckpointError(f"{where}{exc}") from None
    merged = model.state_dict()
    merged.update({k: v for k, v in state.items()})
    model.load_state_dict(merged, strict=True)
    return state
