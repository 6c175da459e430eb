"""CuPy ``RawKernel`` backend of the TSSL-BP neuron (float32 CUDA tensors).

One thread per neuron walks the whole time axis, so a layer costs one launch forward and one
backward.  Tensors are read and written in place in torch's (N, C, H, W, T) layout (time
contiguous per neuron) through DLPack, and every launch goes to torch's current stream.
CuPy is imported on first use, so this module imports fine on machines without CUDA.

The forward uses round-to-nearest intrinsics so that no multiply-add is contracted: membrane
potentials, and hence spikes, are bit-identical to the torch backend's.  CuPy compiles every
kernel with flush-to-zero (``-ftz=true``): subnormal floats (|x| < 1.2e-38) read or produced by
the kernels become 0, where torch keeps them; normal inputs are unaffected.  The backward
follows the torch backend's recurrence and clamps, so NaN propagates the same way.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from global_v import psp_kernel
from torch import Tensor

BLOCK = 256

SOURCE = r"""
/* clamp that keeps NaN (like torch.clamp); fminf/fmaxf would drop it */
__device__ __forceinline__ float clamp_nan(float x, float lo, float hi)
{
    return (x != x) ? x : fminf(fmaxf(x, lo), hi);
}

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
    float theta = 0.0f;  /* Theta_{t+1} */
    for (int t = T - 1; t >= 0; --t) {
        const long long i = base + t;
        /* S_t: future error seen through the PSP kernel */
        float s = 0.0f;
        for (int k = 0; k < T - t; ++k) s += kappa[k] * grad_a[i + k];
        const float u = u_in[i];
        const float o = (u > vth) ? 1.0f : 0.0f;
        /* Theta_t = A_t + B_t Theta_{t+1}, in the torch backend's operation order */
        const float pi = clamp_nan(1.0f / du_in[i], 0.0f, pi_max) * o;
        const float A = pi * s;
        const float B = (u * theta_m) * pi + (1.0f - o) * (1.0f - theta_m);
        theta = (t == T - 1) ? A : A + B * theta;
        float g = theta;
        if (a[i] < switch_th) {
            const float e = expf(clamp_nan((vth - u) / alpha, -z_max, z_max));
            g = s * (e / ((1.0f + e) * (1.0f + e) * alpha));
        }
        grad_in[i] = g;
    }
}
"""

_import_error: str | None = None
MAX_GRID = 2**31 - 1  # CUDA's limit on gridDim.x


@functools.lru_cache(maxsize=1)
def _cupy():
    """The cupy module, or None (the reason is kept for ``import_error``)."""
    global _import_error
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device visible to CuPy")
        major = cupy.cuda.runtime.runtimeGetVersion() // 1000
        want = int(torch.version.cuda.split(".")[0]) if torch.version.cuda else major
        if major != want:
            raise RuntimeError(f"CuPy is built for CUDA {major} but torch for CUDA {want}; "
                               f"install cupy-cuda{want}x (the project's cuda{want} extra)")
        return cupy
    except Exception as exc:  # ImportError, missing driver, ...
        _import_error = f"{type(exc).__name__}: {exc}"
        return None


def reset() -> None:
    """Forget the imported CuPy module, compiled kernels and cached constants."""
    global _import_error
    _import_error = None
    _cupy.cache_clear()
    _kernels.cache_clear()
    _kappa.cache_clear()


def supports(x: Tensor) -> bool:
    """True when the kernels can run on ``x`` (a float32 CUDA tensor)."""
    return x.is_cuda and x.dtype == torch.float32


def available() -> bool:
    """True when CuPy imports and sees a CUDA device."""
    return _cupy() is not None


def import_error() -> str:
    _cupy()
    return _import_error or "CUDA is not available"


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _kernels(device_index: int):
    """(forward, backward) kernels compiled for one device (NVRTC, CuPy's options)."""
    cp = _cupy()
    with cp.cuda.Device(device_index):
        module = cp.RawModule(code=SOURCE, options=("--std=c++14",))
        return module.get_function("tsslbp_forward"), module.get_function("tsslbp_backward")


@functools.lru_cache(maxsize=64)
def _kappa(T: int, tau_s: float, device: torch.device) -> Tensor:
    return psp_kernel(T, tau_s).to(device)


class _TorchStream:
    """A torch stream seen through the CUDA stream protocol (``__cuda_stream__``)."""

    def __init__(self, stream) -> None:
        self.handle = int(stream.cuda_stream)

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


def _stream(cp, device: torch.device):
    """torch's current stream on ``device`` as a CuPy stream."""
    torch_stream = _TorchStream(torch.cuda.current_stream(device))
    if hasattr(cp.cuda.Stream, "from_external"):  # CuPy >= 14
        return cp.cuda.Stream.from_external(torch_stream)
    return cp.cuda.ExternalStream(torch_stream.handle, _device_index(device))


def _launch(kernel, n: int, device: torch.device, args: tuple) -> None:
    cp = _cupy()
    grid = ((n + BLOCK - 1) // BLOCK,)
    if grid[0] > MAX_GRID:
        raise RuntimeError(f"TSSL-BP layer too large for one launch: {n} neurons")
    with cp.cuda.Device(_device_index(device)), _stream(cp, device):
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
        fwd, _ = _kernels(_device_index(x.device))
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
        _, bwd = _kernels(_device_index(g.device))
        kappa = _kappa(T, float(tau_s), g.device)
        _launch(bwd, n, g.device, (
            _view(g), _view(a), _view(u), _view(du), _view(kappa), _view(out),
            np.int64(n), np.int32(T), np.float32(theta_m), np.float32(vth),
            np.float32(1.0 / (4.0 * tau_s)), np.float32(0.2), np.float32(8.0), np.float32(8.0),
        ))
    return out.to(grad.dtype)
