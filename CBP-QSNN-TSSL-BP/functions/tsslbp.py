"""The TSSL-BP LIF neuron as an autograd Function, with a torch and a CuPy backend.

Per neuron, with input current I_t (time is the last axis), theta_m = 1/tau_m and
theta_s = 1/tau_s:

    dU_t = I_t - theta_m u+_{t-1};  u_t = u+_{t-1} + dU_t;  o_t = [u_t > V_th]
    u+_t = u_t (1 - o_t);            a_t = a_{t-1} + (o_t - a_{t-1}) theta_s      (output)

The backward pass is the TSSL-BP rule: with S_t = sum_k kappa_k G_{t+k} (kappa the PSP
kernel, G = dL/da), pi_t = o_t clip(1/dU_t, 0, 8) and Theta_T = 0, for t = T-1 .. 0:

    g_t = pi_t S_t + [t < T-1] (Theta_{t+1} u_t theta_m pi_t + Theta_{t+1} (1-theta_m)(1-o_t))
    Theta_t = o_t g_t + (1 - o_t)(1 - theta_m) Theta_{t+1}
    dL/dI_t = g_t if a_t >= 1/(4 tau_s) else S_t sigma'(u_t)

with sigma' the derivative of a logistic centred at V_th of width alpha = 0.2 (argument clamped
to +-8).  Backends: ``torch`` (any device; vectorised over neurons, loops over T) and ``cupy``
(float32 CUDA tensors; one fused kernel per direction).  ``auto`` picks CuPy for CUDA tensors
when it imports, torch otherwise, and falls back to torch with one warning if the kernels fail
to compile or launch; set ``TSSLBP_BACKEND`` or call ``set_backend`` to force one (an unknown
value is an error).  The backend in use is printed once per process.  The backward pass is
differentiable once (double backward raises).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

import torch
from global_v import psp_kernel
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from cbp.runtime import UserError

from functions import tsslbp_cuda

ALPHA = 0.2  # width of the surrogate logistic
PI_MAX = 8.0  # cap on |du/dt|^-1 in the spike-timing term
Z_MAX = 8.0  # clamp of the surrogate's argument
BACKENDS = ("auto", "torch", "cupy")
ENV = "TSSLBP_BACKEND"


class BackendError(UserError):
    """A TSSL-BP backend that was asked for cannot run (printed as one line)."""


_backend = os.environ.get(ENV, "auto").strip().lower() or "auto"
_cupy_failure: str | None = None  # why auto mode stopped using CuPy in this process
_announced: set[str] = set()


def set_backend(name: str) -> None:
    """Force ``torch`` or ``cupy`` for every later call, or go back to ``auto``."""
    global _backend
    name = name.strip().lower()
    if name not in BACKENDS:
        raise BackendError(f"unknown TSSL-BP backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    """The requested backend; an unknown ``TSSLBP_BACKEND`` value is an error."""
    if _backend not in BACKENDS:
        raise BackendError(f"{ENV}={_backend!r} is not a TSSL-BP backend; "
                           f"choose one of {', '.join(BACKENDS)}")
    return _backend


def resolve_backend(x: Tensor) -> str:
    """The backend that will run for tensor ``x`` under the current setting."""
    name = get_backend()
    if name == "torch":
        return "torch"
    if name == "cupy":
        if not tsslbp_cuda.supports(x):
            raise BackendError("TSSL-BP backend 'cupy' needs float32 CUDA tensors, got "
                               f"{x.dtype} on {x.device} (set {ENV}=torch)")
        if not tsslbp_cuda.available():
            raise BackendError(f"TSSL-BP backend 'cupy' unavailable: "
                               f"{tsslbp_cuda.import_error()} (set {ENV}=torch)")
        return "cupy"
    usable = _cupy_failure is None and tsslbp_cuda.supports(x) and tsslbp_cuda.available()
    return "cupy" if usable else "torch"


def _announce(backend: str) -> None:
    """Say once per process which backend runs the neuron."""
    if backend not in _announced:
        _announced.add(backend)
        what = "CuPy CUDA kernels" if backend == "cupy" else "torch operations"
        print(f"TSSL-BP neuron: {backend} backend ({what})", flush=True)


def _cupy_failed(exc: Exception, requested: str) -> None:
    """A CuPy compile or launch error: an error for ``cupy``, a fallback for ``auto``."""
    global _cupy_failure
    reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    if requested == "cupy":
        raise BackendError(f"TSSL-BP backend 'cupy' failed: {reason} (set {ENV}=torch to use "
                           "the torch backend)") from exc
    _cupy_failure = reason
    warnings.warn(f"TSSL-BP: the CuPy kernels failed ({reason}); using the torch backend for "
                  f"the rest of this run (set {ENV}=torch to skip CuPy)", RuntimeWarning,
                  stacklevel=3)


def _params(network_config: Mapping, layer_config: Mapping) -> tuple[float, float, float]:
    return (
        1.0 / float(network_config["tau_m"]),
        float(network_config["tau_s"]),
        float(layer_config["threshold"]),
    )


def kernel_matrix(T: int, tau_s: float, dtype: torch.dtype, device) -> Tensor:
    """Upper-triangular Toeplitz K with K[t, t+k] = kappa_k, so S = K @ G (G as (T, M))."""
    kappa = psp_kernel(T, tau_s, dtype)
    idx = torch.arange(T)
    lag = idx.view(1, T) - idx.view(T, 1)
    mat = torch.where(lag >= 0, kappa[lag.clamp(min=0)], torch.zeros((), dtype=dtype))
    return mat.to(device)


# ----------------------------------------------------------------------------- torch backend


def torch_forward(inputs: Tensor, theta_m: float, tau_s: float, vth: float):
    """(a, u, du) in (T, M) layout for ``inputs`` of shape (..., T)."""
    T = inputs.shape[-1]
    x = inputs.detach().reshape(-1, T).t().contiguous()
    u = torch.empty_like(x)
    du = torch.empty_like(x)
    a = torch.empty_like(x)
    theta_s = 1.0 / tau_s
    mem = torch.zeros_like(x[0])
    syn = torch.zeros_like(x[0])
    spike = torch.empty_like(x[0])  # 0/1 floats: much faster on CPU than bool masks
    tmp = torch.empty_like(x[0])
    for t in range(T):
        torch.mul(mem, -theta_m, out=du[t])
        du[t].add_(x[t])
        torch.add(mem, du[t], out=u[t])
        torch.gt(u[t], vth, out=spike)
        # u (1 - o): a spiking neuron has u > vth > 0, so this is exactly the reset to +0
        torch.neg(spike, out=tmp).add_(1.0)
        torch.mul(u[t], tmp, out=mem)
        # syn + (o - syn) * theta_s, in the reference's operation order
        torch.sub(spike, syn, out=tmp)
        tmp.mul_(theta_s)
        torch.add(syn, tmp, out=a[t])
        syn = a[t]
    return a, u, du


def _surrogate(u: Tensor, vth: float) -> Tensor:
    f = ((-u + vth) / ALPHA).clamp_(-Z_MAX, Z_MAX).exp_()
    return f / ((1 + f) * (1 + f) * ALPHA)


def torch_backward(grad: Tensor, a: Tensor, u: Tensor, du: Tensor,
                   theta_m: float, tau_s: float, vth: float) -> Tensor:
    """dL/dI in (T, M) layout; ``grad`` is dL/da of shape (..., T).

    With A_t = pi_t S_t and B_t = u_t theta_m pi_t (spike) or 1 - theta_m (no spike), the
    spike-timing gradient g_t equals Theta_t and obeys Theta_t = A_t + B_t Theta_{t+1}
    (pi_t = 0 without a spike), so only one multiply-add per step is sequential; everything
    else is computed for all steps at once.
    """
    T = grad.shape[-1]
    g_tm = grad.reshape(-1, T).t().to(u.dtype)
    S = kernel_matrix(T, tau_s, u.dtype, u.device) @ g_tm  # S[t] = sum_k kappa_k G[t+k]
    spike = torch.gt(u, vth).to(u.dtype)
    pi = torch.reciprocal(du).clamp_(0.0, PI_MAX).mul_(spike)  # 0 without a spike
    A = pi * S
    # u theta_m pi with a spike, 1 - theta_m without (pi = 0 there, so the sum is exact)
    B = (u * theta_m).mul_(pi).add_(spike.neg_().add_(1.0).mul_(1 - theta_m))
    theta = torch.empty_like(u)
    theta[T - 1] = A[T - 1]
    for t in range(T - 2, -1, -1):
        torch.addcmul(A[t], B[t], theta[t + 1], out=theta[t])
    quiet = a < 1.0 / (4.0 * tau_s)
    return torch.where(quiet, S.mul_(_surrogate(u, vth)), theta)


def _from_tm(x_tm: Tensor, shape: torch.Size) -> Tensor:
    return x_tm.t().reshape(shape)


# ----------------------------------------------------------------------------- autograd


class TSSLBP(torch.autograd.Function):
    """``TSSLBP.apply(inputs, network_config, layer_config)``: PSP trace a of the LIF layer.

    ``network_config`` needs ``tau_m`` and ``tau_s``, ``layer_config`` needs ``threshold``.
    """

    @staticmethod
    def forward(ctx, inputs: Tensor, network_config: Mapping, layer_config: Mapping) -> Tensor:
        theta_m, tau_s, vth = _params(network_config, layer_config)
        backend = resolve_backend(inputs)
        ctx.shape = inputs.shape
        if backend == "cupy":
            try:
                a, u, du = tsslbp_cuda.forward(inputs, theta_m, tau_s, vth)
            except Exception as exc:  # compile or launch failure
                _cupy_failed(exc, get_backend())
                backend = "torch"
        if backend == "torch":
            a, u, du = torch_forward(inputs, theta_m, tau_s, vth)
        _announce(backend)
        ctx.consts = (theta_m, tau_s, vth, backend)
        ctx.save_for_backward(a, u, du)
        return a if backend == "cupy" else _from_tm(a, inputs.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        a, u, du = ctx.saved_tensors
        theta_m, tau_s, vth, backend = ctx.consts
        if backend == "cupy":
            try:
                return tsslbp_cuda.backward(grad, a, u, du, theta_m, tau_s, vth), None, None
            except Exception as exc:
                _cupy_failed(exc, get_backend())
            # saved tensors are in (..., T) layout: view them as (T, M) for the torch backend
            T = ctx.shape[-1]
            a, u, du = (t.reshape(-1, T).t() for t in (a, u, du))
        out = torch_backward(grad, a, u, du, theta_m, tau_s, vth)
        return _from_tm(out, ctx.shape).to(grad.dtype), None, None


class Neuron(nn.Module):
    """The TSSL-BP LIF neuron of one layer as a (parameterless) module: its output is the PSP
    trace of its spikes (``TSSLBP.apply``).  Being a module lets hooks, such as the spike
    metrics, see each layer's firing."""

    def __init__(self, network_config: Mapping, layer_config: Mapping) -> None:
        super().__init__()
        self.network_config, self.layer_config = network_config, layer_config

    def forward(self, current: Tensor) -> Tensor:
        return TSSLBP.apply(current, self.network_config, self.layer_config)


def tsslbp(inputs: Tensor, network_config: Mapping, layer_config: Mapping) -> Tensor:
    """Functional form of ``TSSLBP.apply``."""
    return TSSLBP.apply(inputs, network_config, layer_config)
