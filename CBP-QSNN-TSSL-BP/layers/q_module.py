"""Quantizer and constraint used by the quantized layers (from the shared ``cbp`` package)."""

from cbp import check_mode, constraint, levels, quantize

__all__ = ["check_mode", "constraint", "levels", "quantize"]
