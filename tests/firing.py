"""Inputs that make every spiking layer of a network fire, for tests that compare devices:
a comparison is only meaningful when no layer is silent."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def spike_rates(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], run: Callable[[], object]
                ) -> dict[str, float]:
    """Fraction of non-zero outputs of each layer over one call of ``run`` (all time steps)."""
    counts: dict[str, list[float]] = {name: [0.0, 0.0] for name, _ in layers}

    def hook(name):
        def record(_mod, _inp, out):
            counts[name][0] += float((out != 0).sum())
            counts[name][1] += out.numel()
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in layers]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return {name: (n / total if total else 0.0) for name, (n, total) in counts.items()}


def thresholds_from_inputs(layers: Sequence[tuple[str, nn.Module]], run: Callable[[], object],
                           attr: str = "v_threshold", quantile: float = 0.9,
                           factor: float = 0.5) -> None:
    """Set each neuron layer's threshold to ``factor`` x the ``quantile`` of the input it sees
    in one call of ``run``; layers are visited in forward order, so each sees the spikes of
    the layers already set."""
    def pre(mod, args):
        x = args[0].detach().flatten().float()
        x = x[:: max(1, x.numel() // 100_000)]
        setattr(mod, attr, max(float(torch.quantile(x, quantile)) * factor, 1e-3))

    handles = [m.register_forward_pre_hook(pre) for _, m in layers]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()


def thresholds_from_outputs(layers: Sequence[tuple[str, nn.Module]], run: Callable[[], object],
                            attr: str = "threshold", quantile: float = 0.99) -> None:
    """Set each layer's threshold to the ``quantile`` of its analog output in one call of
    ``run`` (threshold balancing, as in ANN-to-SNN conversion)."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(
        lambda _m, _i, out, name=name: outputs.__setitem__(name, out.detach().flatten().float()))
        for name, m in layers]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    for name, m in layers:
        x = outputs[name]
        x = x[:: max(1, x.numel() // 100_000)]
        setattr(m, attr, max(float(torch.quantile(x, quantile)), 1e-3))


def no_tf32():
    """Context: full-precision float32 convolutions and matmuls on CUDA (restored on exit)."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    return ctx()
