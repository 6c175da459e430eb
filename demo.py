"""Embedded demo: STBP on DIGITS, fp32 -> CBP (bin, ter, 1bit, 2bit) -> eval -> packed export.

Runs the real CBP-QSNN-STBP scripts (as a user would, working directory = --out) at a reduced
width on scikit-learn's bundled digits, then prints a table of test accuracy, CFS and weight
memory, and writes a plot of test accuracy and CFS per epoch.

    python demo.py                 # about 7 minutes on a 2-core CPU
    python demo.py --modes bin ter --cbp_epochs 5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
STBP = os.path.join(HERE, "CBP-QSNN-STBP")
sys.path.insert(0, STBP)


def run(cmd: list[str], cwd: str) -> str:
    print("$ (cd", cwd, "&&", " ".join(cmd[1:]).replace(STBP + os.sep, "") + ")", flush=True)
    env = dict(os.environ, CBP_NO_PROGRESS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"demo step failed: {' '.join(cmd)}")
    return proc.stdout


def read_progress(path: str) -> list[list[float]]:
    with open(path) as f:
        return [[float(v) for v in line.split("\t")] for line in f if line.strip()][1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_out", help="working directory for all outputs")
    p.add_argument("--modes", nargs="+", default=["bin", "ter", "1bit", "2bit"])
    p.add_argument("--fp32_epochs", type=int, default=10)
    p.add_argument("--cbp_epochs", type=int, default=15)
    p.add_argument("--width", type=float, default=0.0625)
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch

    from cbp.export import packed_nbytes, weight_memory_mbit

    from model import Conv_SNN

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    py = sys.executable
    net = ["--dataset", "DIGITS", "--decay", "0.5", "--thresh", "0.5", "--lens", "0.5",
           "--T", str(args.T), "--width", str(args.width), "--seed", str(args.seed)]
    t0 = time.time()
    run([py, os.path.join(STBP, "main_train_fp32.py"), *net, "--mode", "train",
         "--init_gain", "2", "--learning_rate", "0.1", "--num_epochs", str(args.fp32_epochs)], out)
    fp32_state = torch.load(os.path.join(out, "checkpoint", "DIGITS_last.pth"), weights_only=True)
    fp32_curve = list(fp32_state["test_acc_hist"])
    fp32_model = Conv_SNN(10, 0.5, 0.5, 0.5, None, args.T, args.width)
    rows = [("fp32", max(fp32_curve), fp32_curve[-1], float("nan"),
             weight_memory_mbit(fp32_model), 4 * sum(v.numel() for v in fp32_model.state_dict().values()))]
    curves = {}
    for mode in args.modes:
        run([py, os.path.join(STBP, "main_quantize_cbp.py"), *net, "--mode", "train",
             "--quant", mode, "--learning_rate", "0.05", "--period", "3",
             "--num_epochs", str(args.cbp_epochs)], out)
        ev = run([py, os.path.join(STBP, "main_quantize_cbp.py"), *net, "--mode", "eval", "--quant", mode], out)
        acc = float(ev.split("Test Accuracy:")[1].split()[0])
        prog = read_progress(os.path.join(out, "progress", f"DIGITS_cbp_{mode}_progress.txt"))
        curves[mode] = prog
        pk = torch.load(os.path.join(out, "checkpoint", f"DIGITS_cbp_{mode}_packed.pth"), weights_only=True)
        rows.append((mode, acc, prog[-1][2], prog[-1][3], weight_memory_mbit(packed=pk), packed_nbytes(pk)))

    print(f"\nSTBP 7Conv,3FC at width {args.width}, T={args.T}, DIGITS test set (360 images); "
          f"{time.time() - t0:.0f} s in all\n")
    print("| weights | best test acc (%) | last-epoch acc (%) | CFS | weight memory (Mbit) | packed file payload (KiB) |")
    print("|---|---|---|---|---|---|")
    for name, best, last, cfs, mbit, nbytes in rows:
        cfs_s = "—" if cfs != cfs else f"{cfs:.4f}"
        print(f"| {name} | {best:.2f} | {last:.2f} | {cfs_s} | {mbit:.4f} | {nbytes / 1024:.1f} |")
    fp32_best = rows[0][1]
    for name, best, *_ in rows[1:]:
        print(f"{name}: {best - fp32_best:+.2f} points vs fp32")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(range(1, len(fp32_curve) + 1), fp32_curve, label="fp32 (pre-training)", color="k")
    off = len(fp32_curve)
    for mode, prog in curves.items():
        ep = [off + int(r[0]) + 1 for r in prog]
        ax1.plot(ep, [r[2] for r in prog], label=f"CBP {mode}")
        ax2.semilogy([int(r[0]) + 1 for r in prog], [r[3] for r in prog], label=f"CBP {mode}")
    ax1.set(xlabel="epoch", ylabel="test accuracy (%)", title="DIGITS test accuracy", ylim=(0, 100))
    ax2.set(xlabel="CBP epoch", ylabel="CFS", title="constraint-function score")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    path = os.path.join(out, "demo.png")
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
