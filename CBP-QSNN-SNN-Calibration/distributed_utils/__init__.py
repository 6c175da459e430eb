"""Distributed helpers used by the calibration code (no-ops in a single process)."""

from distributed_utils.dist_helper import allaverage, allreduce

__all__ = ["allaverage", "allreduce"]
