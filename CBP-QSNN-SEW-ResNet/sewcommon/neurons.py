"""Multi-step spiking neurons from spikingjelly ``activation_based`` with the reference settings
(hard reset to 0, threshold 1, detached reset, ATan surrogate)."""

from __future__ import annotations

import importlib.util
import inspect

import torch
from spikingjelly.activation_based import functional, layer, neuron, surrogate

SeqToANNContainer = layer.SeqToANNContainer
reset_net = functional.reset_net

_BACKEND = {"name": None}


def configure_backend(device: torch.device | str) -> str:
    """Pick the neuron backend for models built afterwards: ``cupy`` on CUDA when cupy is
    installed, ``torch`` otherwise.  Only used by spikingjelly versions whose neurons take a
    ``backend`` argument; 2.0.0 dispatches on the tensor's device by itself."""
    dev = torch.device(device)
    has_cupy = importlib.util.find_spec("cupy") is not None
    _BACKEND["name"] = "cupy" if dev.type == "cuda" and has_cupy else "torch"
    return _BACKEND["name"]


def _kwargs(cls) -> dict:
    kw = {"step_mode": "m"}
    if "backend" in inspect.signature(cls.__init__).parameters:
        kw["backend"] = _BACKEND["name"] or "torch"
    return kw


def plif() -> neuron.ParametricLIFNode:
    """PLIF neuron, init_tau 2 (learnable ``w`` = 0), as the DVS networks use."""
    return neuron.ParametricLIFNode(
        init_tau=2.0, decay_input=True, v_threshold=1.0, v_reset=0.0, detach_reset=True,
        surrogate_function=surrogate.ATan(), **_kwargs(neuron.ParametricLIFNode),
    )


def if_node() -> neuron.IFNode:
    """IF neuron, as the ImageNet networks use."""
    return neuron.IFNode(
        v_threshold=1.0, v_reset=0.0, detach_reset=True, surrogate_function=surrogate.ATan(),
        **_kwargs(neuron.IFNode),
    )


def connect(connect_f: str | None, out: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """The SEW element-wise connect function g(out, identity)."""
    if connect_f == "ADD":
        return out + identity
    if connect_f == "AND":
        return out * identity
    if connect_f == "IAND":
        return identity * (1.0 - out)
    raise NotImplementedError(f"connect function {connect_f!r} (use ADD, AND or IAND)")
