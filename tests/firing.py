"""Inputs that make every spiking layer of a network fire, for tests that compare devices:
a comparison is only meaningful when no layer is silent."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn


@contextlib.contextmanager
def _hooks(layers: Sequence[tuple[str, nn.Module]], hook: Callable, pre: bool = False):
    """``hook(name)`` registered as a forward (or pre-forward) hook on every layer."""
    handles = [(m.register_forward_pre_hook if pre else m.register_forward_hook)(hook(name))
               for name, m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def spike_rates(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], run: Callable[[], object]
                ) -> dict[str, float]:
    """Fraction of non-zero outputs of each layer over one call of ``run`` (all time steps)."""
    counts: dict[str, list[float]] = {name: [0.0, 0.0] for name, _ in layers}

    def hook(name):
        def record(_mod, _inp, out):
            counts[name][0] += float((out != 0).sum())
            counts[name][1] += out.numel()
        return record

    with _hooks(layers, hook), torch.no_grad():
        run()
    return {name: (n / total if total else 0.0) for name, (n, total) in counts.items()}


def _sample(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().flatten().float()
    return x[:: max(1, x.numel() // 100_000)]  # torch.quantile takes at most 16 M elements


def thresholds_from_inputs(layers: Sequence[tuple[str, nn.Module]], run: Callable[[], object],
                           attr: str = "v_threshold", quantile: float = 0.9,
                           factor: float = 0.5) -> None:
    """Set each neuron layer's threshold to ``factor`` x the ``quantile`` of the input it sees
    in one call of ``run``; layers are visited in forward order, so each sees the spikes of
    the layers already set."""
    def hook(_name):
        def pre(mod, args):
            setattr(mod, attr, max(float(torch.quantile(_sample(args[0]), quantile)) * factor,
                                   1e-3))
        return pre

    with _hooks(layers, hook, pre=True), torch.no_grad():
        run()


def thresholds_from_outputs(layers: Sequence[tuple[str, nn.Module]], run: Callable[[], object],
                            attr: str = "threshold", quantile: float = 0.99) -> None:
    """Set each layer's threshold to the ``quantile`` of its analog output in one call of
    ``run`` (threshold balancing, as in ANN-to-SNN conversion)."""
    outputs: dict[str, torch.Tensor] = {}

    def hook(name):
        return lambda _m, _i, out: outputs.__setitem__(name, _sample(out))

    with _hooks(layers, hook), torch.no_grad():
        run()
    for name, m in layers:
        setattr(m, attr, max(float(torch.quantile(outputs[name], quantile)), 1e-3))


@contextlib.contextmanager
def no_tf32():
    """Full-precision float32 convolutions and matmuls on CUDA inside (restored on exit)."""
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
