"""A full STBP CBP training step vs the same step written like the reference, side by side.

Both steps train the quantized 7Conv,3FC network (binary weights by default) from the same
weights on the same batch: forward, MSE on the one-hot label, Lagrangian sum(lambda * Y(W)),
backward, gradient clip, SGD step, latent clamp.  The baseline (``benchmarks/baseline.py``)
runs time-major, recomputes the input convolution and quantizes every weight at every step,
and evaluates the constraint with per-level masks; ours is ``Q_Conv_SNN`` + ``cbp.CBP``.
Repetitions alternate between the two, and the medians are compared.

    python benchmarks/bench_stbp_step.py                      # paper width, batch 4, T 4, CPU
    python benchmarks/bench_stbp_step.py --device cuda --batch 50 --T 8
    python benchmarks/bench_stbp_step.py --profile            # also print our step's top ops
    python benchmarks/bench_stbp_step.py --channels-last      # ours in channels_last format
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch

import cbp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "CBP-QSNN-STBP"))
sys.path.insert(0, HERE)
import baseline  # noqa: E402


def build(width: float, T: int, mode: str, device: torch.device, channels_last: bool = False):
    """(our step, the reference-style step): two copies of one quantized network (ours in
    ``channels_last`` memory format when asked)."""
    import engine
    from q_model import Q_Conv_SNN

    torch.manual_seed(0)
    ours = Q_Conv_SNN(10, 0.25, 0.5, 0.5, None, T, mode, width).to(device)
    ctl = cbp.CBP(ours, 5e-4)
    ctl.start()
    ctl.end_epoch()  # ucs = 0.5: the window is active
    with torch.no_grad():  # some multipliers > 0 everywhere, as after a few lambda updates
        for lam in ctl.lambdas:
            lam.uniform_(0.0, 1e-3)
    ref = copy.deepcopy(ours)
    if channels_last:
        ours.to(memory_format=torch.channels_last)
    lambdas = [lam.detach().clone() for lam in ctl.lambdas]
    groups = cbp.param_groups(ours)
    opt = torch.optim.SGD([{"params": v} for v in groups.values()], lr=5e-3, momentum=0.9)
    ref_groups = cbp.param_groups(ref)
    ref_opt = torch.optim.SGD([{"params": v} for v in ref_groups.values()], lr=5e-3,
                              momentum=0.9)

    def step_ours(x, y):
        opt.zero_grad()
        lag = ctl.lagrangian(engine.mse_onehot(ours(x), y, 10))
        lag.backward()
        cbp.clip_gradients(ours.parameters(), 1.0)
        opt.step()
        ctl.clamp_()

    def step_ref(x, y):
        baseline.stbp_reference_step(ref, ref_opt, lambdas, ctl.ucs, x, y, 10)

    return step_ours, step_ref


def measure(step_ours, step_ref, x, y, repeat: int, sync) -> tuple[float, float]:
    """Medians (baseline, ours) over ``repeat`` alternating repetitions after one warm-up."""
    step_ref(x, y), step_ours(x, y)
    sync()
    t_ref, t_ours = [], []
    for _ in range(repeat):
        for fn, acc in ((step_ref, t_ref), (step_ours, t_ours)):
            t = time.perf_counter()
            fn(x, y)
            sync()
            acc.append(time.perf_counter() - t)
    return statistics.median(t_ref), statistics.median(t_ours)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--mode", default="bin", choices=["bin", "ter"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--profile", action="store_true", help="print our step's top operators")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's default)")
    p.add_argument("--channels-last", action="store_true",
                   help="run our network and its input in channels_last memory format")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda requested but CUDA is not available")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
               f"threads, torch {torch.__version__}")
    if device.type == "cuda":
        machine += f", {torch.cuda.get_device_name(device)}"
    step_ours, step_ref = build(args.width, args.T, args.mode, device, args.channels_last)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    base, ours = measure(step_ours, step_ref, x, y, args.repeat, sync)
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            step_ours(x, y)
            sync()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(f"machine: {machine}")
    print("| benchmark | baseline (s) | ours (s) | ratio |")
    print("|---|---|---|---|")
    name = (f"STBP CBP train step width {args.width:g}, batch {args.batch}, T {args.T}, "
            f"{args.mode}, {device.type}: reference-style vs ours")
    print(f"| {name} | {base:.3f} | {ours:.3f} | {base / ours:.1f}x faster |")


if __name__ == "__main__":
    main()
