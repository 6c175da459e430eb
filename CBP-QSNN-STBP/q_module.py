"""Quantized layers and constraint used by the STBP scripts (re-exported from ``cbp``)."""

from cbp import QConv2d, QLinear, constraint, levels, quantize

__all__ = ["QConv2d", "QLinear", "constraint", "levels", "quantize"]
