"""TSSL-BP neuron benchmark: forward + backward of one layer, measured side by side in one run.

Baseline: a per-timestep loop written the way the reference writes the neuron (its backward
re-tiles the PSP kernel to the layer's shape and repeats partial_u over the remaining steps at
every t).  Ours: the torch backend (vectorised over neurons, (T, M) layout, kernel sum as one
matmul) and, on a GPU, the fused CuPy kernels.  Every backend is also checked against the loop:
forward bit-identical, gradients within 1e-5 relative; the script exits 1 otherwise.  Default shape: CIFAR-10 conv_2 output
(batch 50, 256 x 32 x 32, T = 5).

    python benchmarks/bench_tsslbp.py            # CPU, plus GPU rows when CUDA is available
    python benchmarks/bench_tsslbp.py --small    # small shape (fast on CPU)
    python benchmarks/bench_tsslbp.py --device cuda --repeat 20
    python benchmarks/bench_tsslbp.py --device cuda --conv-shapes   # every CIFAR-10 conv layer
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "CBP-QSNN-TSSL-BP"))

from functions import tsslbp  # noqa: E402

TAU_M, TAU_S, VTH = 5.0, 3.0, 1.0
# outputs of the five conv layers of the CIFAR-10 network (Networks/CIFAR10_*.yaml), batch 50
CONV_SHAPES = [(50, 96, 32, 32, 5), (50, 256, 32, 32, 5), (50, 384, 16, 16, 5),
               (50, 384, 8, 8, 5), (50, 256, 8, 8, 5)]
NET, LAYER = {"tau_m": TAU_M, "tau_s": TAU_S}, {"threshold": VTH}


def loop_forward(inputs):
    """The reference's forward: per-step tensors stacked at the end."""
    shape = inputs.shape
    theta_m, theta_s = 1 / TAU_M, 1 / TAU_S
    mem = torch.zeros(shape[:4], device=inputs.device)
    syn = torch.zeros(shape[:4], device=inputs.device)
    mems, dus, outs, syns = [], [], [], []
    for t in range(shape[4]):
        du = (-theta_m) * mem + inputs[..., t]
        mem = mem + du
        out = (mem > VTH).float()
        mems.append(mem)
        mem = mem * (1 - out)
        outs.append(out)
        dus.append(du)
        syn = syn + (out - syn) * theta_s
        syns.append(syn)
    return tuple(torch.stack(x, dim=4) for x in (syns, mems, dus, outs))


def loop_backward(grad, a, u, du, o):
    """The reference's backward: repeated kernels and a per-step repeat of partial_u."""
    shape = grad.shape
    T = shape[4]
    theta_m = 1 / TAU_M
    kappa = torch.zeros(T)
    s = 1.0
    for k in range(T):
        kappa[k] = s / TAU_S
        s = s - s / TAU_S
    kappa = kappa.to(grad.device).view(1, 1, 1, 1, T)
    syn_a = kappa.repeat(shape[0], shape[1], shape[2], shape[3], 1)
    partial_a = (kappa / (-TAU_S)).repeat(shape[0], shape[1], shape[2], shape[3], 1)
    out_grad = torch.zeros_like(grad)
    theta = torch.zeros(shape[:4], device=grad.device)
    for t in range(T - 1, -1, -1):
        n = T - t
        out = o[..., t]
        partial_u = torch.clamp(-1 / du[..., t], -8, 0) * out
        pap = partial_u.unsqueeze(-1).repeat(1, 1, 1, 1, n) * partial_a[..., :n]
        g = torch.sum(pap * grad[..., t:] * TAU_S, dim=4)
        if t != T - 1:
            g += theta * u[..., t] * (-1) * theta_m * partial_u
            g += theta * (1 - theta_m) * (1 - out)
        theta = g * out + theta * (1 - out) * (1 - theta_m)
        ga = torch.sum(syn_a[..., :n] * grad[..., t:], dim=-1)
        f = torch.exp(torch.clamp((-1 * u[..., t] + VTH) / 0.2, -8, 8))
        ga = ga * (f / ((1 + f) * (1 + f) * 0.2))
        quiet = a[..., t] < 1 / (4 * TAU_S)
        g[quiet] = ga[quiet]
        out_grad[..., t] = g
    return out_grad


GRAD_RTOL = 1e-5
FAILURES: list[str] = []


def grad_error(g, ref) -> float:
    """max |g - ref| / (|ref| + max |ref|): relative, with entries that cancel to ~0 measured
    against the largest gradient."""
    scale = ref.abs().max().clamp(min=1e-30)
    return ((g - ref).abs() / (ref.abs() + scale)).max().item()


def run_loop(x, grad):
    a, u, du, o = loop_forward(x)
    return a, loop_backward(grad, a, u, du, o)


def run_ours(x, grad, backend: str):
    tsslbp.set_backend(backend)
    xi = x.detach().requires_grad_()
    a = tsslbp.TSSLBP.apply(xi, NET, LAYER)
    a.backward(grad)
    return a.detach(), xi.grad


def timed(fn, device: torch.device, repeat: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up (and kernel compilation)
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def inputs(shape, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 1.2 + 0.5
    grad = torch.randn(shape, generator=g)
    return x.to(device), grad.to(device)


def bench_device(shape, device: torch.device, repeat: int) -> list[tuple]:
    x, grad = inputs(shape, device)
    label = f"{tuple(shape)}, {device.type}"
    ref_a, ref_g = run_loop(x, grad)
    rows = []
    backends = ["torch"] + (["cupy"] if device.type == "cuda" else [])
    t_loop = timed(lambda: run_loop(x, grad), device, repeat)
    results = {}
    for b in backends:
        a, g = run_ours(x, grad, b)
        err = grad_error(g, ref_g)
        if not torch.equal(a, ref_a):
            FAILURES.append(f"{label}: {b} backend forward differs from the reference loop "
                            f"(max {(a - ref_a).abs().max().item():.1e}; must be bit-identical)")
        if not err <= GRAD_RTOL:
            FAILURES.append(f"{label}: {b} backend gradient error {err:.1e} > {GRAD_RTOL:g}")
        results[b] = timed(lambda b=b: run_ours(x, grad, b), device, repeat)
        rows.append((f"neuron fwd+bwd {label}: {b} backend vs reference loop (grad error "
                     f"{err:.1e})", t_loop, results[b]))
    if "cupy" in results:
        rows.append((f"neuron fwd+bwd {label}: cupy vs torch backend", results["torch"],
                     results["cupy"]))
    tsslbp.set_backend("auto")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="batch 4, 64 x 16 x 16 (fast on CPU)")
    p.add_argument("--shape", type=int, nargs=5, default=None, metavar=("N", "C", "H", "W", "T"))
    p.add_argument("--conv-shapes", action="store_true",
                   help="every conv layer shape of the CIFAR-10 network")
    p.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    shape = args.shape or ([4, 64, 16, 16, 5] if args.small else [50, 256, 32, 32, 5])
    shapes = CONV_SHAPES if args.conv_shapes else [shape]
    devices = []
    if args.device in ("all", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("all", "cuda"):
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
        elif args.device == "cuda":
            raise SystemExit("error: --device cuda requested but CUDA is not available")
    rows = []
    for dev in devices:
        for shape in shapes:
            rows += bench_device(shape, dev,
                                 args.repeat if dev.type == "cpu" else max(args.repeat, 10))
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
               f"threads, torch {torch.__version__}")
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name()}"
    print(f"machine: {machine}")
    print("| benchmark | baseline (s) | ours (s) | ratio |")
    print("|---|---|---|---|")
    for name, base, ours in rows:
        print(f"| {name} | {base:.4f} | {ours:.4f} | {base / ours:.1f}x faster |")
    if FAILURES:
        for line in FAILURES:
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
