"""Embedded demo: STBP on DIGITS, fp32 -> CBP (bin, ter, 1bit, 2bit) -> eval -> packed export.

Runs the real CBP-QSNN-STBP scripts (as a user would, working directory = --out) at a reduced
width on scikit-learn's bundled digits, then prints a table of test accuracy, CFS and weight
memory, and writes a plot of test accuracy and CFS per epoch.

    python demo.py                 # about 7 minutes on a 2-core CPU
    python demo.py --modes bin ter --cbp_epochs 5
    python demo.py --readme        # also put the table and its summary into README.md

The table and a summary computed from it (how far each mode ends from fp32) are printed and
written to ``<out>/demo.md``; ``--readme`` also writes them between the README's
``<!-- demo:start -->`` / ``<!-- demo:end -->`` markers.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
import time

from docblock import replace_block

HERE = os.path.dirname(os.path.abspath(__file__))
STBP = os.path.join(HERE, "CBP-QSNN-STBP")
sys.path.insert(0, STBP)
README = os.path.join(HERE, "README.md")
START, END = "<!-- demo:start -->", "<!-- demo:end -->"
# the aim of each mode, in points of best test accuracy below fp32 at most
AIMS = {"bin": 1.0, "ter": 0.5}
# one row per network: (weights, best test acc %, last-epoch acc %, CFS or nan, Mbit, bytes)
Row = tuple[str, float, float, float, float, float]


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


def table(rows: list[Row]) -> str:
    """The result table (markdown), fp32 first."""
    lines = ["| weights | best test acc (%) | last-epoch acc (%) | CFS | weight memory (Mbit) "
             "| packed file payload (KiB) |",
             "|---|---|---|---|---|---|"]
    for name, best, last, cfs, mbit, nbytes in rows:
        cfs_s = "—" if cfs != cfs else f"{cfs:.4f}"
        lines.append(f"| {name} | {best:.2f} | {last:.2f} | {cfs_s} | {mbit:.4f} "
                     f"| {nbytes / 1024:.1f} |")
    return "\n".join(lines) + "\n"


def _points(d: float) -> str:
    return "0.00" if d == 0 else f"{d:+.2f}"


def summary(rows: list[Row]) -> str:
    """What the table says, computed from it: each quantized mode's best test accuracy against
    fp32's (the table's rounded figures, so the text and the table agree), the mode closest to
    fp32, and the aims (binary at most 1 point below fp32, ternary at most 0.5)."""
    fp32 = next((r for r in rows if r[0] == "fp32"), None)
    modes = [r for r in rows if r[0] != "fp32"]
    if fp32 is None or not modes:
        return ""
    ref = round(fp32[1], 2)
    diff = {r[0]: round(round(r[1], 2) - ref, 2) for r in modes}
    parts = [f"{name} {_points(d)}" for name, d in diff.items()]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    text = [f"Best test accuracy against fp32 ({ref:.2f} %): {listed} points."]
    gap = min(abs(d) for d in diff.values())
    closest = [name for name, d in diff.items() if abs(d) == gap]
    who = closest[0] if len(closest) == 1 else ", ".join(closest[:-1]) + " and " + closest[-1]
    above = sum(d >= 0 for d in diff.values())
    where = ("every quantized mode ends at or above the fp32 run" if above == len(diff) else
             "every quantized mode ends below the fp32 run" if above == 0 else
             f"{above} of the {len(diff)} quantized modes end at or above the fp32 run")
    text.append(f"Closest to fp32: {who}, {gap:.2f} points away; {where}.")
    aims = [f"{name} at most {aim:g} point{'s' if aim != 1 else ''} below fp32 "
            f"({'met' if diff[name] >= -aim else 'missed'})"
            for name, aim in AIMS.items() if name in diff]
    if aims:
        text.append("Aims: " + ", ".join(aims) + ".")
    return textwrap.fill(" ".join(text), width=95) + "\n"


def markdown(rows: list[Row]) -> str:
    """The table and its summary: what ``--readme`` puts between the README's markers."""
    prose = summary(rows)
    return table(rows) + (f"\n{prose}" if prose else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_out", help="working directory for all outputs")
    p.add_argument("--modes", nargs="+", default=["bin", "ter", "1bit", "2bit"])
    p.add_argument("--fp32_epochs", type=int, default=10)
    p.add_argument("--cbp_epochs", type=int, default=15)
    p.add_argument("--width", type=float, default=0.0625)
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--readme", action="store_true",
                   help="also write the table and its summary into README.md (between the "
                        "demo:start / demo:end markers); needs the default settings, which "
                        "the README describes")
    args = p.parse_args()
    if args.readme:
        changed = [f"--{k}" for k in ("modes", "fp32_epochs", "cbp_epochs", "width", "T", "seed")
                   if getattr(args, k) != p.get_default(k)]
        if changed:
            p.error(f"--readme needs the default settings (the README describes them); "
                    f"drop {', '.join(changed)}")
        with open(README, encoding="utf-8") as f:
            if START not in f.read():  # found out now, not after the whole run
                p.error(f"{README} has no {START} ... {END} block")

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
    text = markdown(rows)
    print(text)
    with open(os.path.join(out, "demo.md"), "w") as f:
        f.write(text)
    if args.readme:
        replace_block(README, START, END, text)
        print(f"README: {README}")

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
