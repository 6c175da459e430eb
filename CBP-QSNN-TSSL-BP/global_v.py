"""Module-level simulation constants and the PSP kernel (kept for compatibility).

``init(n_steps, tau_s)`` sets ``n_steps``, ``tau_s`` and ``syn_a``, the PSP kernel
kappa_k = (1 - 1/tau_s)^k / tau_s of shape (1, 1, 1, 1, n_steps) on the CPU.  The neuron does
not depend on this state: it builds its kernel from the config it is given.
"""

from __future__ import annotations

import torch

n_steps: int | None = None
tau_s: float | None = None
syn_a: torch.Tensor | None = None


def psp_kernel(T: int, tau_s: float, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.Tensor:
    """kappa_k = (1 - 1/tau_s)^k / tau_s, k = 0..T-1 (the PSP response to a unit spike)."""
    s = torch.ones((), dtype=dtype, device=device)
    out = torch.empty(T, dtype=dtype, device=device)
    for k in range(T):
        out[k] = s / tau_s
        s = s - s / tau_s
    return out


def init(steps: int, tau: float) -> None:
    """Set the module-level ``n_steps``, ``tau_s`` and ``syn_a``."""
    global n_steps, tau_s, syn_a
    n_steps, tau_s = int(steps), float(tau)
    syn_a = psp_kernel(n_steps, tau_s).view(1, 1, 1, 1, n_steps)
