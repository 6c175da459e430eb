"""CBP benchmarks (CPU by default, ``--device cuda`` on a GPU), each measured side by side in
one run.

(a) Constraint + lambda-term forward and backward over the quantized weights of the full STBP
    network (62,095,360 weights in 8 layers): ``cbp.lagrangian`` vs a straightforward
    per-level masked implementation of the same maths (``benchmarks/baseline.py``).
(b) One STBP training step at reduced width: fp32 network vs quantized network + CBP
    (penalty, lagsum, gradient clip, latent clamp).

    python benchmarks/bench_cbp.py [--modes bin ter] [--width 0.25] [--batch 50] [--T 4]
    python benchmarks/bench_cbp.py --device cuda
"""

from __future__ import annotations

import argparse
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

STBP_QSHAPES = [
    (256, 128, 3, 3), (256, 256, 3, 3), (512, 256, 3, 3), (512, 512, 3, 3),
    (1024, 512, 3, 3), (2048, 1024, 3, 3), (1024, 32768), (512, 1024),
]


DEVICE = torch.device("cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_constraint(modes: list[str], repeat: int) -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(s, generator=g) * 0.01).to(DEVICE) for s in STBP_QSHAPES]
    lams = [(torch.rand(s, generator=g) * 1e-3).to(DEVICE) for s in STBP_QSHAPES]
    scales = [w.abs().mean().reshape(1) for w in weights]
    n = sum(w.numel() for w in weights)
    rows = []
    for mode in modes:
        ucs = 0.5

        def ours(mode=mode, ucs=ucs):
            for w, lam, s in zip(weights, lams, scales):
                wr = w.requires_grad_()
                cbp.lagrangian(wr, lam, s, mode, ucs).backward()
                wr.grad = None

        def base(mode=mode, ucs=ucs):
            with torch.no_grad():
                for w, lam, s in zip(weights, lams, scales):
                    baseline.lagrangian_forward_backward(w.detach(), lam, s, mode, ucs)

        t_base, t_ours = timed(base, repeat), timed(ours, repeat)
        rows.append((f"constraint+lambda fwd/bwd, {n / 1e6:.1f} M weights, {mode}, {DEVICE.type}",
                     t_base, t_ours, t_base / t_ours))
    return rows


def bench_step(width: float, batch: int, T: int, repeat: int) -> list[tuple]:
    import engine
    from model import Conv_SNN
    from q_model import Q_Conv_SNN

    x = torch.randn(batch, 3, 32, 32).to(DEVICE)
    y = torch.randint(0, 10, (batch,)).to(DEVICE)
    torch.manual_seed(0)
    fp = Conv_SNN(10, 0.5, 0.5, 0.5, None, T, width).to(DEVICE)
    q = Q_Conv_SNN(10, 0.5, 0.5, 0.5, None, T, "bin", width).to(DEVICE)
    q.load_state_dict(fp.state_dict(), strict=False)
    opt_fp = torch.optim.SGD(fp.parameters(), lr=1e-3, momentum=0.9)
    groups = cbp.param_groups(q)
    opt_q = torch.optim.SGD([{"params": v} for v in groups.values()], lr=1e-3, momentum=0.9)
    ctl = cbp.CBP(q, 5e-4)
    ctl.start()
    ctl.end_epoch()  # move to ucs = 0.5 so the window is active

    def step_fp():
        opt_fp.zero_grad()
        engine.mse_onehot(fp(x), y, 10).backward()
        opt_fp.step()

    def step_q():
        opt_q.zero_grad()
        lag = engine.mse_onehot(q(x), y, 10) + ctl.penalty()
        ctl.accumulate(lag)
        lag.backward()
        cbp.clip_gradients(q.parameters(), 1.0)
        opt_q.step()
        ctl.clamp_()

    t_fp, t_q = [], []
    step_fp(), step_q()
    sync()
    for _ in range(repeat):  # interleaved so background load hits both alike
        t = time.perf_counter()
        step_fp()
        sync()
        t_fp.append(time.perf_counter() - t)
        t = time.perf_counter()
        step_q()
        sync()
        t_q.append(time.perf_counter() - t)
    a, b = statistics.median(t_fp), statistics.median(t_q)
    nq = sum(t.weight.numel() for t in ctl.targets)
    return [(f"STBP train step width {width} ({nq / 1e6:.2f} M q-weights), batch {batch}, T {T}, "
             f"{DEVICE.type}: "
             "fp32 vs CBP (overhead)", a, b, b / a)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=["bin", "ter"])
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    global DEVICE
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda requested but CUDA is not available")
    DEVICE = torch.device(args.device)
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
               f"threads, torch {torch.__version__}")
    if DEVICE.type == "cuda":
        machine += f", {torch.cuda.get_device_name(DEVICE)}"
    rows = bench_constraint(args.modes, args.repeat)
    rows += bench_step(args.width, args.batch, args.T, max(args.repeat, 5))
    print(f"machine: {machine}")
    print("| benchmark | baseline (s) | ours (s) | ratio |")
    print("|---|---|---|---|")
    for name, a, b, r in rows:
        label = f"{(r - 1) * 100:+.1f} %" if "overhead" in name else f"{r:.1f}x faster"
        print(f"| {name} | {a:.3f} | {b:.3f} | {label} |")


if __name__ == "__main__":
    main()
