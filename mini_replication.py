"""Miniature replication of the paper on the embedded DIGITS data, on a CPU.

Every pipeline runs its own scripts, as a user would, at a small width: fp32 training, then
CBP to bin / ter / 1bit / 2bit and the documented evaluation of each result, and the same with
the two baselines of ``--method`` (post-training quantization and straight-through QAT).

    python mini_replication.py                      # everything (about 20 min on 2 cores
                                                    # for CBP alone, 2 h with the baselines)
    python mini_replication.py --pipelines SEW STBP --seeds 0
    python mini_replication.py --methods cbp        # CBP alone (the first table)
    python mini_replication.py --readme             # also put the table/figure in docs/

STBP runs three seeds (mean and sample standard deviation); the others one.  SEW-ResNet sees
the digits as two-polarity event frames from an emulated DVS (``sewcommon.dvs_emulator``) and the
calibration pipeline converts a trained ANN to an SNN before CBP, so its fp32 column is the
calibrated SNN.  Jobs run ``--jobs`` at a time with the cores split between them; a finished
job's result (``<out>/<pipeline>/seed<k>/<mode>[_<method>].json``) is reused unless ``--force``,
and the tables also show the results earlier calls left in ``--out`` for the pipelines this
call does not name, so that separate calls add up.
Writes ``<out>/mini_replication.md`` and ``<out>/mini_replication.png``; with ``--readme``
also the tables into ``docs/mini_replication.md`` (CBP between the ``<!-- mini:start -->`` /
``<!-- mini:end -->`` markers, the baselines between ``<!-- baselines:start -->`` /
``<!-- baselines:end -->``) and the figure to ``docs/mini_replication.png``.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from cbp.methods import METHODS, suffix
from docblock import replace_block
from reproduce import METRICS, device_args

ROOT = os.path.dirname(os.path.abspath(__file__))
MODES = ("bin", "ter", "1bit", "2bit")
LEVEL_COUNT = {"bin": 2, "ter": 3, "1bit": 5, "2bit": 7}
STBP_SEEDS = (0, 1, 2)



@dataclass
class Pipeline:
    """How one pipeline trains fp32, quantizes and evaluates on DIGITS."""

    name: str
    folder: str  # script folder, relative to the repository
    network: str
    T: int
    epochs: str  # "fp32 / CBP" for the table
    fp32: list[str]  # [script, *args]
    fp32_acc: re.Pattern  # best fp32 test accuracy in the fp32 (or CBP) output
    train: object  # (mode, seed) -> [script, *args]
    evaluate: object  # (mode, seed, cwd, method) -> [script, *args]
    seeded: object  # (args, seed) -> args with the seed set
    fp32_from_cbp: bool = False  # the fp32 accuracy is printed by the CBP run (calibration)
    # the CBP runs of one seed share an output file (calibration: the calibrated SNN), which
    # one run at a time may write: run them one after another
    serial_cbp: bool = False
    acc_scale: float = 1.0  # 100 where the evaluation prints accuracy as a fraction
    seeds: tuple[int, ...] = (0,)
    notes: list[str] = field(default_factory=list)
    method_flag: str = "--method"  # how the scripts choose cbp / ste / ptq


def _seed_flag(flag: str):
    return lambda args, seed: [*args, flag, str(seed)]


def pipelines() -> dict[str, Pipeline]:
    stbp_net = ["--dataset", "DIGITS", "--decay", "0.5", "--thresh", "0.5", "--lens", "0.5",
                "--T", "4", "--width", "0.0625"]
    tssl_cfg = ["-config", os.path.join(ROOT, "CBP-QSNN-TSSL-BP", "Networks", "DIGITS_bin.yaml")]
    sew_net = ["--dataset", "DIGITS", "--model", "SEWResNet", "--connect_f", "ADD", "--T", "8",
               "--width", "0.25", "-b", "32", "-j", "0"]
    cal_net = ["--dataset", "DIGITS", "--dpath", ".", "--width", "0.125", "--usebn"]
    cal_cbp = [*cal_net, "--T", "16", "--calib", "light", "--opt", "Adam", "--lr", "1e-3",
               "--lr_lambda", "1e-3", "-epochs", "10", "--trials", "1", "--no_progress"]

    def cal_eval(mode, seed, cwd, method="cbp"):
        hits = sorted(glob.glob(os.path.join(cwd, "logs", f"*_{mode}{suffix(method)}_0_ckpt.pth")))
        ckpt = os.path.relpath(hits[-1], cwd) if hits else f"logs/<missing {mode} checkpoint>"
        return ["main_calibration_quantize_cbp.py", *cal_cbp, "--quant", mode,
                "--evaluate", ckpt]

    return {
        "STBP": Pipeline(
            "STBP", "CBP-QSNN-STBP", "7Conv,3FC ×1/16", 4, "10 / 15",
            ["main_train_fp32.py", *stbp_net, "--mode", "train", "--init_gain", "2",
             "--learning_rate", "0.1", "--num_epochs", "10"],
            re.compile(r"Best Test Accuracy : ([0-9.]+)"),
            lambda m, s: ["main_quantize_cbp.py", *stbp_net, "--mode", "train", "--quant", m,
                          "--learning_rate", "0.05", "--period", "3", "--num_epochs", "15"],
            lambda m, s, cwd, *_: ["main_quantize_cbp.py", *stbp_net, "--mode", "eval",
                               "--quant", m],
            _seed_flag("--seed"), seeds=STBP_SEEDS),
        "TSSL-BP": Pipeline(
            "TSSL-BP", "CBP-QSNN-TSSL-BP", "AlexNet-like, small (DIGITS_bin.yaml)", 5, "8 / 6",
            ["main_train_fp32.py", *tssl_cfg],
            re.compile(r"Best Accuracy: ([0-9.]+)"),
            lambda m, s: ["main_quantize_cbp.py", *tssl_cfg, "-mode", "train", "-quant", m],
            lambda m, s, cwd, *_: ["main_quantize_cbp.py", *tssl_cfg, "-mode", "eval", "-quant", m],
            _seed_flag("-seed"), method_flag="-method"),
        "SEW-ResNet": Pipeline(
            "SEW-ResNet", "CBP-QSNN-SEW-ResNet/DVS128Gesture",
            "7B-Net, 3 stages ×1/4, DVS events", 8, "10 / 10",
            ["main_train_fp32.py", *sew_net, "--epochs", "10", "--lr", "0.1"],
            re.compile(r"max test acc1 ([0-9.]+)"),
            lambda m, s: ["main_quantize_cbp.py", *sew_net, "--epochs", "10", "--lr", "0.01",
                          "--quant", m, "--period", "3"],
            lambda m, s, cwd, *_: ["main_quantize_cbp.py", *sew_net, "--test-only", "--quant", m],
            _seed_flag("--seed")),
        "SNN-Calibration": Pipeline(
            "SNN-Calibration", "CBP-QSNN-SNN-Calibration", "VGG16 ×1/8 (BN folded)", 16,
            "10 (ANN) / 10",
            ["main_train_ann.py", *cal_net, "--epochs", "10", "--no_progress"],
            re.compile(r"conversion end!! \(ANN [0-9.]+%, SNN ([0-9.]+)%\)"),
            lambda m, s: ["main_calibration_quantize_cbp.py", *cal_cbp, "--quant", m],
            cal_eval, _seed_flag("--seed"), fp32_from_cbp=True, acc_scale=100.0,
            serial_cbp=True),
    }


# ----------------------------------------------------------------------------- running
class Runner:
    """Runs the jobs of all pipelines, ``jobs`` at a time, logging every command."""

    def __init__(self, out: str, jobs: int, force: bool) -> None:
        self.out, self.force = out, force
        self.ran = False  # whether any command ran (not only reused results)
        self.threads = max(1, (os.cpu_count() or 1) // jobs)
        self.pool = ThreadPoolExecutor(max_workers=jobs)
        self.lock = threading.Lock()

    def run(self, p: Pipeline, cwd: str, cmd: list[str], log: str) -> str:
        script = os.path.join(ROOT, p.folder, cmd[0])
        args = device_args(cmd[1:], cuda=False)  # a CPU replication, in each script's flag style
        full = [sys.executable, script, *args]
        env = dict(os.environ, CBP_NO_PROGRESS="1", OMP_NUM_THREADS=str(self.threads),
                   MKL_NUM_THREADS=str(self.threads))
        t0 = time.time()
        self.ran = True
        proc = subprocess.run(full, cwd=cwd, env=env, capture_output=True, text=True)
        with open(os.path.join(cwd, log), "a") as f:
            f.write(f"$ python {' '.join([cmd[0], *args])}\n{proc.stdout}{proc.stderr}\n")
        with self.lock:
            print(f"[{time.time() - t0:6.0f} s] {p.name} {os.path.basename(cwd)}: "
                  f"{' '.join(cmd[:1] + [a for a in cmd[1:] if a in MODES])}"
                  f"{'' if proc.returncode == 0 else '  FAILED'}", flush=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            raise RuntimeError(f"{p.name}: python {' '.join(cmd)} (in {cwd}): {last}")
        return proc.stdout

    def fp32_job(self, p: Pipeline, seed: int) -> Future:
        cwd = os.path.join(self.out, p.name, f"seed{seed}")
        os.makedirs(cwd, exist_ok=True)
        res = os.path.join(cwd, "fp32.json")

        def job():
            if os.path.isfile(res) and not self.force:
                with open(res) as f:
                    return json.load(f)
            t0 = time.time()
            text = self.run(p, cwd, p.seeded(p.fp32, seed), "fp32.log")
            hits = [] if p.fp32_from_cbp else p.fp32_acc.findall(text)
            r = {"acc": float(hits[-1]) if hits else None, "seconds": time.time() - t0}
            with open(res, "w") as f:
                json.dump(r, f)
            return r

        return self.pool.submit(job)

    def cbp_job(self, p: Pipeline, seed: int, mode: str, after: Future,
                method: str = "cbp") -> Future:
        cwd = os.path.join(self.out, p.name, f"seed{seed}")
        label = f"{mode}{suffix(method)}"
        res = os.path.join(cwd, f"{label}.json")
        chosen = [] if method == "cbp" else [p.method_flag, method]

        def job():
            after.result()
            if os.path.isfile(res) and not self.force:
                with open(res) as f:
                    return json.load(f)
            t0 = time.time()
            text = self.run(p, cwd, p.seeded(p.train(mode, seed) + chosen, seed),
                            f"{label}.log")
            r: dict = {"seconds": time.time() - t0}
            if p.fp32_from_cbp:
                hits = p.fp32_acc.findall(text)
                r["fp32_acc"] = float(hits[-1]) if hits else None
            ev = self.run(p, cwd, p.seeded(p.evaluate(mode, seed, cwd, method) + chosen, seed),
                          f"{label}.log")
            for key, rx in METRICS:
                hits = rx.findall(ev)
                r[key] = float(hits[-1]) if hits else None
            if r["acc"] is not None:
                r["acc"] *= p.acc_scale
            with open(res, "w") as f:
                json.dump(r, f)
            return r

        return self.pool.submit(job)


def replicate(names: list[str], seeds: tuple[int, ...] | None, out: str, jobs: int,
              force: bool, modes: tuple[str, ...] = MODES, stats: dict | None = None,
              methods: tuple[str, ...] = ("cbp",)) -> dict:
    """{pipeline: {seed: {'fp32': result, mode: result, mode_ste: ..., mode_ptq: ...}}} (a
    result is None if it failed; ``methods`` beside cbp add their labels); ``stats['ran']``
    tells whether any command ran (rather than every result being reused)."""
    table = pipelines()
    runner = Runner(out, jobs, force)
    fp32: dict = {}
    # fp32 jobs are queued first, so no CBP job can wait on one that has not started
    for n in names:
        p = table[n]
        for s in (seeds or p.seeds):
            fp32[(n, s)] = runner.fp32_job(p, s)
    cbp: dict = {}
    for (n, s) in fp32:
        after = fp32[(n, s)]
        for m in modes:
            for method in sorted(methods, key=("ptq", "cbp", "ste").index):  # quickest first
                label = f"{m}{suffix(method)}"
                cbp[(n, s, label)] = runner.cbp_job(table[n], s, m, after, method)
                if table[n].serial_cbp:  # FIFO queue: the one waited on has already started
                    after = cbp[(n, s, label)]
    results: dict = {}
    failures = []
    for key, fut in list(fp32.items()) + list(cbp.items()):
        n, s = key[0], key[1]
        label = key[2] if len(key) == 3 else "fp32"
        try:
            r = fut.result()
        except RuntimeError as e:
            failures.append(str(e))
            r = None
        results.setdefault(n, {}).setdefault(s, {})[label] = r
    runner.pool.shutdown()
    if stats is not None:
        stats["ran"] = runner.ran
    for msg in dict.fromkeys(failures):
        print("failed:", msg, file=sys.stderr)
    return results


def stored(names: list[str], out: str, modes: tuple[str, ...] = MODES,
           methods: tuple[str, ...] = tuple(METHODS)) -> dict:
    """The results earlier calls left in ``out`` for ``names``, read without running anything
    (same layout as :func:`replicate`; pipelines and seeds without any result are left out)."""
    labels = ["fp32"] + [f"{m}{suffix(me)}" for m in modes for me in methods]
    results: dict = {}
    for n in names:
        folder = os.path.join(out, n)
        seeds = sorted(int(d[4:]) for d in (os.listdir(folder) if os.path.isdir(folder) else [])
                       if re.fullmatch(r"seed\d+", d))
        for seed in seeds:
            runs = {}
            for label in labels:
                path = os.path.join(folder, f"seed{seed}", f"{label}.json")
                if os.path.isfile(path):
                    with open(path) as f:
                        runs[label] = json.load(f)
            if runs:
                results.setdefault(n, {})[seed] = runs
    return results


def run_seconds(results: dict) -> float:
    """Each run's own time, summed over every result."""
    return sum(r.get("seconds") or 0.0 for per_seed in results.values()
               for runs in per_seed.values() for r in runs.values() if r)


# ----------------------------------------------------------------------------- reporting
def _accs(per_seed: dict, label: str) -> list[float]:
    out = []
    for runs in per_seed.values():
        r = runs.get(label)
        if label == "fp32" and (r is None or r.get("acc") is None):
            # the calibration pipeline's fp32 number is the calibrated SNN of a CBP run
            r = next(({"acc": x["fp32_acc"]} for m in MODES
                      if (x := runs.get(m)) and x.get("fp32_acc") is not None), None)
        if r is not None and r.get("acc") is not None:
            out.append(r["acc"])
    return out


def _cell(vals: list[float], digits: int = 2) -> str:
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def _values(per_seed: dict, label: str, key: str) -> list[float]:
    return [r[label][key] for r in per_seed.values()
            if r.get(label) and r[label].get(key) is not None]


BASELINE_ORDER = ("ptq", "ste", "cbp")


def baselines(results: dict) -> str:
    """The second table: PTQ, STE and CBP accuracy and CFS per pipeline and mode (empty when
    no baseline ran)."""
    if not any(label.endswith(("_ste", "_ptq")) for per_seed in results.values()
               for runs in per_seed.values() for label in runs):
        return ""
    lines = ["| pipeline | seeds | mode | PTQ | STE | CBP | CFS PTQ / STE / CBP |",
             "|---|---|---|---|---|---|---|"]
    for n, per_seed in results.items():
        for m in MODES:
            labels = [f"{m}{suffix(method)}" for method in BASELINE_ORDER]
            if not any(_values(per_seed, lb, "acc") for lb in labels):
                continue
            accs = [_cell(_values(per_seed, lb, "acc")) for lb in labels]
            cfs = " / ".join(_cell(_values(per_seed, lb, "cfs"), 4) for lb in labels)
            lines.append(f"| {n} | {len(per_seed)} | {m} | " + " | ".join(accs) + f" | {cfs} |")
    lines.append("")
    lines.append("The same fp32 network of each seed quantized three ways (`--method`): PTQ "
                 "quantizes its weights with the scales and levels CBP uses and evaluates them, "
                 "STE trains like CBP for the same epochs with the multipliers held at 0, CBP "
                 "is the first table.  Best test accuracy (%), mean ± sample standard "
                 "deviation over seeds where there are several; CFS is 0 on the levels.")
    return "\n".join(lines) + "\n"


def _per_mode(per_seed: dict, key: str, fmt: str, scale: float = 1.0,
              first: bool = False) -> list[str]:
    """One cell part per mode: the value of ``key`` (the first seed's, or the mean)."""
    out = []
    for m in MODES:
        vals = [r[m][key] * scale for r in per_seed.values()
                if r.get(m) and r[m].get(key) is not None]
        if not vals:
            out.append("—")
        else:
            out.append(fmt.format(vals[0] if first else statistics.mean(vals)))
    return out


def markdown(results: dict, seconds: float, jobs: int) -> str:
    table = pipelines()
    lines = [
        "| pipeline | network | T | epochs (fp32 / CBP) | seeds | fp32 | bin | ter | 1bit | 2bit "
        "| weight memory bin / ter / 1bit / 2bit (Mbit) "
        "| SynOps/sample bin / ter / 1bit / 2bit (M) | energy/sample bin / ter / 1bit / 2bit (µJ) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, per_seed in results.items():
        p = table[n]
        cells = [_cell(_accs(per_seed, label)) for label in ("fp32", *MODES)]
        mbit = " / ".join(_per_mode(per_seed, "mbit", "{:.4f}", first=True))
        synops = " / ".join(_per_mode(per_seed, "synops", "{:.3g}", scale=1e-6))
        energy = " / ".join(_per_mode(per_seed, "energy", "{:.3g}"))
        lines.append(f"| {n} | {p.network} | {p.T} | {p.epochs} | {len(per_seed)} | "
                     + " | ".join(cells) + f" | {mbit} | {synops} | {energy} |")
    lines.append("")
    lines.append(f"Best test accuracy (%) on the 360 DIGITS test images; mean ± sample standard "
                 f"deviation over seeds where there are several. {seconds / 60:.1f} min of "
                 f"runs in all (each run's own time, summed; {jobs} ran at a time).  SynOps (accumulates driven by spikes) and the "
                 f"energy estimate (0.9 pJ per accumulate, 4.6 pJ per multiply-accumulate of "
                 f"an analog input; 45 nm) are per test sample, from each quantized network's "
                 f"evaluation (mean over seeds).")
    return "\n".join(lines) + "\n"


def figure(results: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    bits = [math.log2(LEVEL_COUNT[m]) for m in MODES]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for n, per_seed in results.items():
        xs, ys, es = [], [], []
        for b, mode in zip(bits, MODES):
            vals = _accs(per_seed, mode)
            if vals:
                xs.append(b)
                ys.append(statistics.mean(vals))
                es.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
        line = ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=n)
        fp32 = _accs(per_seed, "fp32")
        if fp32:  # the fp32 network (32 bits per weight) as a dashed level
            ax.axhline(statistics.mean(fp32), color=line[0].get_color(), ls="--", lw=1)
    ax.set_xticks(bits)
    ax.set_xticklabels([f"{m}\n{b:.2f}" for m, b in zip(MODES, bits)])
    ax.set(xlabel="bits of information per weight (log2 of the number of levels)",
           ylabel="DIGITS test accuracy (%)",
           title="Miniature replication on DIGITS (dashed: fp32)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


DOC = os.path.join(ROOT, "docs", "mini_replication.md")
START, END = "<!-- mini:start -->", "<!-- mini:end -->"
BASE_START, BASE_END = "<!-- baselines:start -->", "<!-- baselines:end -->"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipelines", nargs="+", default=list(pipelines()), choices=list(pipelines()))
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="seeds for every pipeline (default: 0, 1, 2 for STBP, 0 for the others)")
    p.add_argument("--out", default="mini_out", help="working folder of every run")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs at a time (the cores are split between them)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                   help="cbp (the first table) and the baselines ste / ptq (the second)")
    p.add_argument("--force", action="store_true", help="rerun jobs that already have results")
    p.add_argument("--readme", action="store_true",
                   help="write the table into docs/mini_replication.md and the figure "
                        "into docs/mini_replication.png")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    ran = replicate(args.pipelines, tuple(args.seeds) if args.seeds else None, out,
                    max(1, args.jobs), args.force, tuple(args.modes), {},
                    tuple(args.methods))
    # the tables also show what earlier calls left in --out for the other pipelines
    earlier = stored([n for n in pipelines() if n not in ran], out, tuple(args.modes),
                     tuple(args.methods))
    results = {n: ran.get(n) or earlier[n] for n in pipelines() if n in ran or n in earlier}
    text = markdown(results, run_seconds(results), args.jobs)
    extra = baselines(results)
    with open(os.path.join(out, "mini_replication.md"), "w") as f:
        f.write(text + (f"\n{extra}" if extra else ""))
    png = os.path.join(out, "mini_replication.png")
    drawn = figure(results, png)
    print()
    print(text)
    if extra:
        print(extra)
    if drawn:
        print(f"figure: {png}")
    if args.readme:
        fig = "mini_replication.png"  # beside DOC, linked relative to it
        if drawn:
            figure(results, os.path.join(os.path.dirname(DOC), fig))
        replace_block(DOC, START, END,
                      text + (f"\n![accuracy vs bits per weight]({fig})\n" if drawn else ""))
        if extra:
            replace_block(DOC, BASE_START, BASE_END, extra)
    failed = any(r is None for per_seed in results.values() for runs in per_seed.values()
                 for r in runs.values())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
