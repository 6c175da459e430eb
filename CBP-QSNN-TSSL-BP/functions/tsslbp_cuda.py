"""CuPy ``RawKernel`` backend of the TSSL-BP neuron (float32 CUDA tensors).

One thread per neuron walks the whole time axis, so a layer costs one launch forward and one
backward.  Tensors are read and written in place in torch's (N, C, H, W, T) layout (time
contiguous per neuron) through DLPack, and every launch goes to torch's current stream.
CuPy is imported on first use, so this module imports fine on machines without CUDA.

The forward uses round-to-nearest intrinsics so that no multiply-add is contracted: membrane
potentials, and hence spikes, are bit-identical to the torch backend's.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from global_v import psp_kernel
from torch import Tensor

BLOCK = 256

SOURCE = r"""
extern "C" __global__
void tsslbp_forward(const float* __restrict__ inputs, float* __restrict__ a_out,
                    float* __restrict__ u_out, float* __restrict__ du_out,
                    const long long n_neurons, const int T, const float theta_m,
                    const float theta_s, const float vth)
{
    const long long n = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= n_neurons) return;
    const long long base = n * (long long)T;
    float mem = 0.0f;  /* potential after reset */
    float syn = 0.0f;  /* PSP trace a */
    for (int t = 0; t < T; ++t) {
        const long long i = base + t;
        const float du = __fadd_rn(__fmul_rn(-theta_m, mem), inputs[i]);
        const float u = __fadd_rn(mem, du);
        const float o = (u > vth) ? 1.0f : 0.0f;
        du_out[i] = du;
        u_out[i] = u;
        mem = __fmul_rn(u, 1.0f - o);
        syn = __fadd_rn(syn, __fmul_rn(__fsub_rn(o, syn), theta_s));
        a_out[i] = syn;
    }
}

extern "C" __global__
void tsslbp_backward(const float* __restrict__ grad_a, const float* __restrict__ a,
                     const float* __restrict__ u_in, const float* __restrict__ du_in,
                     const float* __restrict__ kappa, float* __restrict__ grad_in,
                     const long long n_neurons, const int T, const float theta_m,
                     const float vth, const float switch_th, const float alpha,
                     const float pi_max, const float z_max)
{
    const long long n = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= n_neurons) return;
    const long long base = n * (long long)T;
    float theta = 0.0f;
    for (int t = T - 1; t >= 0; --t) {
        const long long i = base + t;
        /* future error seen through the PSP kernel */
        float s = 0.0f;
        for (int k = 0; k < T - t; ++k) s += kappa[k] * grad_a[i + k];
        const float u = u_in[i];
        const bool spike = u > vth;
        float pi = 0.0f;
        if (spike) pi = fminf(fmaxf(1.0f / du_in[i], 0.0f), pi_max);
        float g = pi * s;
        if (t != T - 1) {
            g += theta * u * theta_m * pi;
            if (!spike) g += theta * (1.0f - theta_m);
        }
        theta = spike ? g : theta * (1.0f - theta_m);
        if (a[i] < switch_th) {
            float z = fminf(fmaxf((vth - u) / alpha, -z_max), z_max);
            const float e = expf(z);
            g = s * (e / ((1.0f + e) * (1.0f + e) * alpha));
        }
        grad_in[i] = g;
    }
}
"""

_import_error: str | None = None


@functools.lru_cache(maxsize=1)
def _cupy():
    """The cupy module, or None (the reason is kept for ``import_error``)."""
    global _import_error
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device visible to CuPy")
        return cupy
    except Exception as exc:  # ImportError, missing driver, ...
        _import_error = f"{type(exc).__name__}: {exc}"
        return None


def available() -> bool:
    """True when CuPy imports and sees a CUDA device."""
    return torch.cuda.is_available() and _cupy() is not None


def import_error() -> str:
    _cupy()
    return _import_error or "CUDA is not available"


@functools.cache
def _kernels(device_index: int):
    cp = _cupy()
    with cp.cuda.Device(device_index):
        module = cp.RawModule(code=SOURCE, options=("--std=c++14",))
        return module.get_function("tsslbp_forward"), module.get_function("tsslbp_backward")


@functools.lru_cache(maxsize=64)
def _kappa(T: int, tau_s: float, device_index: int) -> Tensor:
    return psp_kernel(T, tau_s).to(f"cuda:{device_index}")


def _launch(kernel, n: int, device: torch.device, args: tuple) -> None:
    cp = _cupy()
    stream = torch.cuda.current_stream(device)
    grid = ((n + BLOCK - 1) // BLOCK,)
    with cp.cuda.Device(device.index), cp.cuda.ExternalStream(stream.cuda_stream, device.index):
        kernel(grid, (BLOCK,), args)


def _view(x: Tensor):
    """A CuPy array sharing ``x``'s memory (``x`` must be contiguous)."""
    return _cupy().from_dlpack(x.detach())


def forward(inputs: Tensor, theta_m: float, tau_s: float, vth: float):
    """(a, u, du), each shaped like ``inputs`` (float32, CUDA)."""
    x = inputs.detach().contiguous()
    T = x.shape[-1]
    n = x.numel() // T
    a, u, du = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    if n > 0:
        fwd, _ = _kernels(x.device.index)
        _launch(fwd, n, x.device, (
            _view(x), _view(a), _view(u), _view(du), np.int64(n), np.int32(T),
            np.float32(theta_m), np.float32(1.0 / tau_s), np.float32(vth),
        ))
    return a, u, du


def backward(grad: Tensor, a: Tensor, u: Tensor, du: Tensor,
             theta_m: float, tau_s: float, vth: float) -> Tensor:
    """dL/dI for dL/da = ``grad`` (same layout as the saved forward tensors)."""
    g = grad.detach().to(torch.float32).contiguous()
    T = g.shape[-1]
    n = g.numel() // T
    out = torch.empty_like(g)
    if n > 0:
        _, bwd = _kernels(g.device.index)
        kappa = _kappa(T, float(tau_s), g.device.index)
        _launch(bwd, n, g.device, (
            _view(g), _view(a), _view(u), _view(du), _view(kappa), _view(out),
            np.int64(n), np.int32(T), np.float32(theta_m), np.float32(vth),
            np.float32(1.0 / (4.0 * tau_s)), np.float32(0.2), np.float32(8.0), np.float32(8.0),
        ))
    return out.to(grad.dtype)
