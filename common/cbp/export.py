"""Packed low-bit export of quantized models.

A quantized weight is stored as the index (code) of its level, bit-packed with
``bits(mode)`` bits per weight (one ``numpy.packbits`` plane per bit), plus its shape, mode
and float32 scale.  Elements whose quantized value is not ``level * scale`` (the sign rule
maps a weight exactly on a midpoint to the midpoint) are kept in a sparse exception list, so
``unpack_state_dict(pack_state_dict(...))`` reproduces ``quantize(w, scale, mode)`` bit for
bit.  Every other state-dict entry is stored unchanged.  The packed dict holds only tensors,
ints, strs, lists and dicts, so ``torch.load(..., weights_only=True)`` reads it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .files import save_atomic
from .functional import quantize, quantize_codes
from .levels import bits, check_mode, levels
from .nn import quantized_modules

FORMAT = "cbp-packed"
VERSION = 1

_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_DENSE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

Quantized = Mapping[str, tuple["float | Tensor", str]]


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"unsupported weight dtype {dtype} for packing")
    return name


def _scale32(scale: float | Tensor) -> Tensor:
    """The scale as a 1-element float32 CPU tensor."""
    if isinstance(scale, Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must have one element, got shape {tuple(scale.shape)}")
        return scale.detach().reshape(1).to(device="cpu", dtype=torch.float32).clone()
    return torch.tensor([float(scale)], dtype=torch.float32)


def _bit_view(x: Tensor) -> Tensor:
    """Integer view of a float tensor, so comparisons are bitwise (NaN, -0.0 included)."""
    return x.view(_INT_OF_SIZE[x.element_size()])


def _pack_codes(codes: Tensor, nbits: int) -> Tensor:
    """uint8 tensor of shape (nbits, ceil(N / 8)): bit plane b holds bit b of each code."""
    flat = codes.reshape(-1).numpy()
    planes = np.stack([(flat >> b) & 1 for b in range(nbits)]).astype(np.uint8)
    return torch.from_numpy(np.packbits(planes, axis=1)).contiguous()


def _unpack_codes(planes: Tensor, numel: int) -> Tensor:
    """Inverse of ``_pack_codes``: int64 codes of length ``numel``."""
    bitsets = np.unpackbits(planes.numpy(), axis=1, count=numel).astype(np.int64)
    codes = np.zeros(numel, dtype=np.int64)
    for b in range(bitsets.shape[0]):
        codes |= bitsets[b] << b
    return torch.from_numpy(codes)


def _reconstruct(codes: Tensor, scale: Tensor, mode: str, dtype: torch.dtype) -> Tensor:
    """level * scale for flat int64 ``codes``, in the weight's dtype."""
    return torch.tensor(levels(mode), dtype=dtype)[codes] * scale.to(dtype)


def _pack_weight(weight: Tensor, scale: float | Tensor, mode: str) -> dict[str, Any]:
    mode = check_mode(mode)
    w = weight.detach().to("cpu")
    dtype_name = _dtype_name(w.dtype)
    s_ref = scale.detach().to("cpu") if isinstance(scale, Tensor) else float(scale)
    ref = quantize(w, s_ref, mode).reshape(-1)
    codes = quantize_codes(w, s_ref, mode).reshape(-1)
    s32 = _scale32(scale)
    recon = _reconstruct(codes.long(), s32, mode, w.dtype)
    miss = (_bit_view(recon) != _bit_view(ref)).nonzero().reshape(-1)
    return {
        "shape": list(w.shape),
        "numel": w.numel(),
        "dtype": dtype_name,
        "mode": mode,
        "bits": bits(mode),
        "scale": s32,
        "codes": _pack_codes(codes, bits(mode)),
        "exc_index": miss.to(torch.int64).contiguous(),
        "exc_value": ref[miss].clone().contiguous(),
    }


def _unpack_weight(entry: Mapping[str, Any]) -> Tensor:
    dtype = _DTYPES[entry["dtype"]]
    codes = _unpack_codes(entry["codes"], int(entry["numel"]))
    flat = _reconstruct(codes, entry["scale"], entry["mode"], dtype)
    idx = entry["exc_index"]
    if idx.numel():
        flat[idx] = entry["exc_value"].to(dtype)
    return flat.reshape(entry["shape"])


def pack_state_dict(state_dict: Mapping[str, Tensor], quantized: Quantized) -> dict[str, Any]:
    """Pack ``state_dict``: keys in ``quantized`` (key -> (scale, mode)) become bit-packed level
    codes; all other entries are stored unchanged (detached contiguous CPU clones)."""
    missing = [k for k in quantized if k not in state_dict]
    if missing:
        raise KeyError(f"quantized keys not in the state dict: {missing}")
    packed_q: dict[str, dict[str, Any]] = {}
    plain: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in quantized:
            scale, mode = quantized[key]
            packed_q[key] = _pack_weight(value, scale, mode)
        else:
            plain[key] = value.detach().to("cpu").clone().contiguous()
    return {
        "format": FORMAT,
        "version": VERSION,
        "order": list(state_dict.keys()),
        "quantized": packed_q,
        "tensors": plain,
    }


def _check_format(packed: Mapping[str, Any]) -> None:
    if not isinstance(packed, Mapping) or packed.get("format") != FORMAT:
        raise ValueError("not a packed cbp state dict")
    if packed.get("version") != VERSION:
        raise ValueError(f"unsupported packed format version {packed.get('version')!r}")


def unpack_state_dict(packed: Mapping[str, Any]) -> dict[str, Tensor]:
    """State dict in the original key order; quantized weights hold their quantized values."""
    _check_format(packed)
    q, plain = packed["quantized"], packed["tensors"]
    return {k: _unpack_weight(q[k]) if k in q else plain[k].clone() for k in packed["order"]}


def pack_model(model: nn.Module, quantized: Quantized | None = None) -> dict[str, Any]:
    """Pack ``model.state_dict()``; weights of the quantized layers are packed with their own
    scale and mode, plus any extra ``quantized`` (key -> (scale, mode)) entries."""
    spec: dict[str, tuple[float | Tensor, str]] = {
        f"{name}.weight": (m.scale, m.mode) for name, m in quantized_modules(model)
    }
    spec.update(quantized or {})
    return pack_state_dict(model.state_dict(), spec)


def save_packed(model_or_packed: nn.Module | Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a packed model atomically (:func:`cbp.files.save_atomic`)."""
    if isinstance(model_or_packed, nn.Module):
        packed = pack_model(model_or_packed)
    else:
        _check_format(model_or_packed)
        packed = dict(model_or_packed)
    path = Path(path)
    save_atomic(packed, os.fspath(path))
    return path


def load_packed(
    path_or_packed: str | os.PathLike | Mapping[str, Any],
    model: nn.Module | None = None,
    strict: bool = True,
) -> dict[str, Tensor]:
    """Unpack a packed dict or file (read with ``weights_only=True``); if ``model`` is given,
    load the result into it.  Returns the unpacked state dict."""
    if isinstance(path_or_packed, Mapping):
        packed = path_or_packed
    else:
        packed = torch.load(path_or_packed, map_location="cpu", weights_only=True)
    state = unpack_state_dict(packed)
    if model is not None:
        model.load_state_dict(state, strict=strict)
    return state


def weight_memory_mbit(
    model: nn.Module | None = None, *, packed: Mapping[str, Any] | None = None
) -> float:
    """Weight memory in megabits: quantized weights x bits(mode) + other conv/linear weights x 32.

    For a model, the other weights are those of non-quantized ``nn.Conv1d/2d/3d`` and
    ``nn.Linear`` modules; for a packed dict, unquantized entries whose key ends with
    ``weight`` and that have at least two dimensions.  Biases, BatchNorm and neuron
    parameters are not counted.
    """
    if (model is None) == (packed is None):
        raise ValueError("pass exactly one of model or packed")
    total = 0
    if model is not None:
        qnames = set()
        for name, m in quantized_modules(model):
            qnames.add(name)
            total += m.weight.numel() * bits(m.mode)
        for name, m in model.named_modules():
            if name not in qnames and isinstance(m, _DENSE):
                total += m.weight.numel() * 32
    else:
        _check_format(packed)
        for entry in packed["quantized"].values():
            total += int(entry["numel"]) * bits(entry["mode"])
        for key, t in packed["tensors"].items():
            if key.endswith("weight") and t.dim() >= 2:
                total += t.numel() * 32
    return total / 1e6


def packed_nbytes(packed: Any) -> int:
    """Total bytes of all tensor payloads in a packed dict (nested dicts/lists walked)."""
    if isinstance(packed, Tensor):
        return packed.numel() * packed.element_size()
    if isinstance(packed, Mapping):
        return sum(packed_nbytes(v) for v in packed.values())
    if isinstance(packed, (list, tuple)):
        return sum(packed_nbytes(v) for v in packed)
    return 0
