"""Quantized layers and constraint used by the CBP stage (provided by the shared ``cbp``)."""

from cbp import QConv2d, QLinear, constraint, levels, quantize

__all__ = ["QConv2d", "QLinear", "constraint", "levels", "quantize"]
