"""Constrained backpropagation (CBP) for quantized spiking networks.

Public API: ``levels``, ``quantize``, ``constraint``, the quantized layers ``QConv2d`` /
``QLinear`` / ``QConv3d``, ``convert`` (quantize any model's conv / linear layers in place),
the ``CBP`` controller, packed export and checkpoint helpers.
"""

from .controller import (
    CBP,
    EpochDecision,
    QuantTarget,
    cfs,
    clip_gradients,
    next_g,
    param_groups,
    targets_of,
    ucs_of,
)
from .convert import ConvertError, convert, eligible_layers
from .functional import constraint, constraint_sum, lagrangian, quantize, quantize_codes
from .levels import MODES, LevelSet, bits, check_mode, levels
from .nn import QConv2d, QConv3d, QLinear, QuantMixin, quantized_modules

__all__ = [
    "CBP",
    "ConvertError",
    "EpochDecision",
    "LevelSet",
    "MODES",
    "QConv2d",
    "QConv3d",
    "QLinear",
    "QuantMixin",
    "QuantTarget",
    "bits",
    "cfs",
    "check_mode",
    "clip_gradients",
    "constraint",
    "constraint_sum",
    "convert",
    "eligible_layers",
    "lagrangian",
    "levels",
    "next_g",
    "param_groups",
    "quantize",
    "quantize_codes",
    "quantized_modules",
    "targets_of",
    "ucs_of",
]

__version__ = "0.1.0"
