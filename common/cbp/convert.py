"""Quantize any network in place: ``cbp.convert(model, mode)`` turns its ``nn.Conv1d/2d/3d``
and ``nn.Linear`` layers (and subclasses such as spikingjelly's ``layer.Conv2d`` /
``layer.Linear`` in either step mode) into quantized layers, in the style of ``torch.ao``'s
module swaps.

Each converted layer stays the same object: its class becomes a quantized subclass of its own
class and it gains a frozen ``scale`` parameter (mean |W| at conversion), so weights, biases,
hooks, devices, step modes and references held elsewhere (an optimizer) are kept, and the
state-dict keys only gain ``<layer>.scale``.  The forward pass then uses the quantized weight
(straight-through gradient), and ``cbp.CBP(model, ...)`` finds the layers by themselves.
As in the paper, the first and the last weight layer stay fp32 by default.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

from torch import nn

from .errors import ConvertError
from .levels import check_mode
from .nn import QuantConvMixin, QuantLinearMixin, QuantMixin

ELIGIBLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
Skip = Iterable[str] | Callable[[str, nn.Module], bool] | None


_CLASSES: dict[type, type] = {}


def _quantized_class(cls: type) -> type:
    """The quantized subclass of ``cls`` (one per class, importable by name for pickling)."""
    if cls not in _CLASSES:
        if issubclass(cls, nn.Linear):
            if cls.forward is not nn.Linear.forward:
                raise ConvertError(f"{cls.__name__} has its own forward; only layers that use "
                                   "nn.Linear's forward can be quantized")
            mixin = QuantLinearMixin
        else:
            mixin = QuantConvMixin
        key = f"Q_{cls.__module__.replace('.', '_')}_{cls.__qualname__.replace('.', '_')}"
        new = type(f"Q{cls.__name__}", (mixin, cls), {"__module__": __name__})
        new.__qualname__ = key
        globals()[key] = _CLASSES[cls] = new
    return _CLASSES[cls]


def eligible_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every conv / linear layer not yet quantized, in registration order."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, ELIGIBLE) and not isinstance(m, QuantMixin)]


def _skipped(skip: Skip) -> Callable[[str, nn.Module], bool]:
    if skip is None:
        return lambda name, module: False
    if callable(skip):
        return skip
    patterns = [skip] if isinstance(skip, str) else list(skip)
    return lambda name, module: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_untied(model: nn.Module, chosen: list[tuple[str, nn.Module]]) -> None:
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for name, module in chosen:
        shared = names.get(id(module.weight), [])
        if len(shared) > 1:
            raise ConvertError(f"the weight of {name or type(module).__name__!r} is shared "
                               f"({', '.join(shared)}); CBP keeps one multiplier per weight, so "
                               "untie them or skip these layers")


def convert(model: nn.Module, mode: str, skip: Skip = None, keep_first_last: bool = True
            ) -> nn.Module:
    """Quantize ``model``'s conv / linear layers in place to ``mode`` and return ``model``.

    ``keep_first_last`` leaves the first and last eligible layer (registration order) fp32, as
    the paper does.  ``skip`` keeps more layers fp32: module names (``fnmatch`` patterns such as
    ``"head.*"``) or a predicate ``(name, module) -> bool``.  Raises :class:`ConvertError` when
    no layer is left to quantize or a chosen weight is shared with another parameter.
    """
    mode = check_mode(mode)
    layers = eligible_layers(model)
    if not layers:
        raise ConvertError(f"{type(model).__name__} has no nn.Conv1d/2d/3d or nn.Linear layer "
                           "to quantize")
    if keep_first_last:
        layers = layers[1:-1]
    is_skipped = _skipped(skip)
    chosen = [(n, m) for n, m in layers if not is_skipped(n, m)]
    if not chosen:
        raise ConvertError("no layer left to quantize (the first and last weight layers stay "
                           "fp32 unless keep_first_last=False; check skip)")
    _check_untied(model, chosen)
    for _, module in chosen:
        module.__class__ = _quantized_class(type(module))
        module._init_quant(mode)  # mode, levels and the frozen scale = mean |W|, on W's device
    return model
