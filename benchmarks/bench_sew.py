"""SEW-ResNet CBP training step with and without AMP, measured side by side in one run.

One CBP step of the DVS128Gesture 7B-Net (binary weights, ADD connect; Lagrangian, gradient
clip, clamp) through the SEW engine's own loop: float32 (baseline) vs autocast + GradScaler
(float16 on CUDA, bfloat16 on CPU).  The two runs start from the same weights and batch.

    python benchmarks/bench_sew.py                  # CUDA when available: width 1, batch 16, T 16
    python benchmarks/bench_sew.py --device cpu     # small: width 1/8, batch 2, T 4
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
SEW = os.path.join(HERE, "..", "CBP-QSNN-SEW-ResNet")
sys.path.insert(0, SEW)
sys.path.insert(0, os.path.join(SEW, "DVS128Gesture"))

import q_smodels  # noqa: E402
from sewcommon import engine, neurons  # noqa: E402


def step_time(model, x, y, device: torch.device, amp: bool, repeat: int) -> float:
    model = copy.deepcopy(model).to(device)
    controller = cbp.CBP(model, 0.01)
    controller.start()
    s = engine.Settings(epochs=1, lr=0.1, amp=amp, show=False)
    opt = engine.build_optimizer(model, s)
    trainer = engine.step_trainer(model, opt, controller, device, s)
    batch = [(x, y)]

    def once():
        trainer.train_one_epoch(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    once()  # warm-up (cuDNN autotune, allocator)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--width", type=float, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--T", type=int, default=None)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda requested but CUDA is not available")
    device = torch.device(name)
    big = device.type == "cuda"
    width = args.width or (1.0 if big else 0.125)
    batch = args.batch or (16 if big else 2)
    T = args.T or (16 if big else 4)
    neurons.configure_backend(device)
    torch.manual_seed(0)
    model = q_smodels.SEWResNet("ADD", "bin", width=width)
    x = (torch.rand(batch, T, 2, 128, 128) < 0.2).float().to(device)
    y = torch.randint(0, 11, (batch,)).to(device)
    t_fp = step_time(model, x, y, device, False, args.repeat)
    t_amp = step_time(model, x, y, device, True, args.repeat)
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
               f"threads, torch {torch.__version__}")
    if device.type == "cuda":
        machine += f", {torch.cuda.get_device_name(device)}"
    print(f"machine: {machine}")
    print("| benchmark | baseline (s) | ours (s) | ratio |")
    print("|---|---|---|---|")
    print(f"| SEW 7B-Net CBP step, width {width:g}, batch {batch}, T {T}, {device.type}: "
          f"float32 vs AMP | {t_fp:.4f} | {t_amp:.4f} | {t_fp / t_amp:.1f}x faster |")


if __name__ == "__main__":
    main()
