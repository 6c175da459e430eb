"""Reproduce the paper's table: run each row's documented evaluation when its data and
checkpoints are present, otherwise say exactly what is missing and how to produce it.

    python reproduce.py                      # evaluate what is available, report the rest
    python reproduce.py --rows STBP          # only rows whose pipeline/network matches
    python reproduce.py --digits             # also run STBP bin/ter on the embedded DIGITS data
    python reproduce.py --root /data/cbp     # look for datasets/checkpoints in another tree

Each row runs in ``<root>/<pipeline folder>`` (where the scripts look for ``./datasets`` and
``./trained_params``); the result table is printed and written to ``--out`` (markdown).
Accuracy, CFS, weight memory, SynOps and the energy estimate per test sample are read from the
evaluation's output; the weight memory is ``cbp.export.weight_memory_mbit`` of the evaluated
model, i.e. the size of its packed export's weights (quantized layers at 1 / 2 / 3 bits, first
and last layer at 32 bits); SynOps and energy are ``cbp.metrics``' (45 nm: 0.9 pJ per
accumulate, 4.6 pJ per multiply-accumulate).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.abspath(__file__))
DRIVE = "the authors' Google Drive folder (CBP-QSNN README)"


@dataclass
class Row:
    """One line of the paper's table and how to evaluate it here."""

    pipeline: str
    network: str
    dataset: str
    T: int
    quant: str
    published_acc: str
    published_mbit: str
    folder: str  # pipeline folder, relative to the repository
    script: str
    eval_args: list[str]
    data: list[tuple[str, str]]  # (path relative to the folder, what to put there)
    checkpoints: list[tuple[str, str]]  # (path relative to the folder, how to get it)
    train: list[list[str]] = field(default_factory=list)  # [script, *args] commands

    @property
    def name(self) -> str:
        return f"{self.pipeline} {self.network} {self.dataset} {self.quant}"


CIFAR10_DATA = ("datasets/cifar-10-batches-py", "CIFAR-10 python archive from "
                "https://www.cs.toronto.edu/~kriz/cifar.html, extracted")
CIFAR100_DATA = ("datasets/cifar-100-python", "CIFAR-100 python archive from "
                 "https://www.cs.toronto.edu/~kriz/cifar.html, extracted")


def stbp_rows() -> list[Row]:
    rows = []
    for ds, decay, data in (("CIFAR10", "0.25", CIFAR10_DATA), ("CIFAR100", "0.8", CIFAR100_DATA)):
        net = ["--dataset", ds, "--decay", decay, "--thresh", "0.5", "--lens", "0.5", "--T", "8"]
        for q in ("bin", "ter"):
            rows.append(Row(
                "STBP", "7Conv,3FC", ds, 8, q, "—", "—", "CBP-QSNN-STBP", "main_quantize_cbp.py",
                [*net, "--mode", "eval", "--quant", q], [data],
                [(f"trained_params/STBP_{ds}_{q}_cbp_prequantized.pth", DRIVE)],
                [["main_train_fp32.py", *net, "--mode", "train"],
                 ["main_quantize_cbp.py", *net, "--mode", "train", "--quant", q]],
            ))
    return rows


def tssl_rows() -> list[Row]:
    out = []
    for q, acc in (("bin", "89.99"), ("ter", "88.79")):
        cfg = f"Networks/CIFAR10_{q}.yaml"
        out.append(Row(
            "TSSL-BP", "AlexNet-like", "CIFAR10", 5, q, acc, "—", "CBP-QSNN-TSSL-BP",
            "main_quantize_cbp.py", ["-config", cfg, "-mode", "eval"],
            [("datasets/cifar10/cifar-10-batches-py", CIFAR10_DATA[1])],
            [("trained_params/TSSL_BP_CIFAR10_fp32_pretrained.pth", DRIVE),
             (f"trained_params/TSSL_BP_CIFAR10_{q}_cbp_prequantized.pth", DRIVE)],
            [["main_train_fp32.py", "-config", cfg],
             ["main_quantize_cbp.py", "-config", cfg, "-mode", "train"]],
        ))
    return out


def sew_rows() -> list[Row]:
    rows = []
    dvs = ["--output-dir", "./logs", "--model", "SEWResNet", "--connect_f", "ADD",
           "--data-path", "./datasets/DVS128Gesture"]
    for q, acc in (("bin", "drop < 1 vs 97.92"), ("ter", "—")):
        rows.append(Row(
            "SEW-ResNet", "7B-Net", "DVS128Gesture", 16, q, acc, "—",
            "CBP-QSNN-SEW-ResNet/DVS128Gesture", "main_quantize_cbp.py",
            [*dvs, "--test-only", "--quant", q],
            [("datasets/DVS128Gesture", "DVS128 Gesture from IBM (see datasets/README.md)")],
            [(f"trained_params/SEW_ResNet_DVS128Gesture_{q}_cbp_prequantized.pth", DRIVE)],
            [["main_train_fp32.py", *dvs],
             ["main_quantize_cbp.py", *dvs, "--T_train", "12", "--T", "16", "--quant", q]],
        ))
    c10 = ["-out_dir", "./logs", "-model", "SEWResNet", "-cnf", "ADD",
           "-data_dir", "./datasets/CIFAR10DVS"]
    for q, acc, mbit in (("bin", "74.70", "1.33"), ("ter", "—", "—")):
        rows.append(Row(
            "SEW-ResNet", "Wide-7B-Net", "CIFAR10DVS", 16, q, acc, mbit,
            "CBP-QSNN-SEW-ResNet/CIFAR10DVS", "main_quantize_cbp.py",
            [*c10, "-test-only", "-quant", q],
            [("datasets/CIFAR10DVS", "CIFAR10-DVS from figshare (see datasets/README.md)")],
            [(f"trained_params/SEW_ResNet_CIFAR10DVS_{q}_cbp_prequantized.pth", DRIVE)],
            [["main_train_fp32.py", *c10], ["main_quantize_cbp.py", *c10, "-quant", q]],
        ))
    published = {("18", "bin"): "54.34", ("18", "ter"): "57.88",
                 ("34", "bin"): "60.23", ("34", "ter"): "62.98"}
    for depth in ("18", "34"):
        net = ["--model", f"sew_resnet{depth}", "--output-dir", "./logs", "--cache-dataset",
               "--connect_f", "ADD", "--T", "4", "--data-path", "./datasets/imagenet"]
        for q in ("bin", "ter"):
            rows.append(Row(
                "SEW-ResNet", f"SEW-ResNet-{depth}", "ImageNet", 4, q, published[depth, q], "—",
                "CBP-QSNN-SEW-ResNet/ImageNet", "main_quantize_cbp.py",
                [*net, "--test-only", "--quant", q],
                [("datasets/imagenet/val", "ImageNet ILSVRC2012 train/ and val/ class folders")],
                [(f"trained_params/SEW_ResNet_{depth}_ImageNet_{q}_cbp_prequantized.pth", DRIVE)],
                [["main_quantize_cbp.py", *net, "--quant", q]],
            ))
    return rows


def calibration_rows() -> list[Row]:
    rows = []
    for ds, acc, mbit, data in (("CIFAR10", "91.51", "15.10", CIFAR10_DATA),
                                ("CIFAR100", "66.53", "16.60", CIFAR100_DATA)):
        args = ["--dataset", ds, "--arch", "VGG16", "--T", "32", "--calib", "light",
                "--dpath", "./datasets", "--opt", "SGD", "--quant", "bin", "--lr", "1e-2",
                "--lr_lambda", "1e-3"]
        ckpt = f"logs/VGG16_{ds}_T32_SGD_lr0.01lr_lambda0.001wd0.0001_bin_0_ckpt.pth"
        rows.append(Row(
            "SNN-Calibration", "VGG16", ds, 32, "bin", acc, mbit, "CBP-QSNN-SNN-Calibration",
            "main_calibration_quantize_cbp.py", [*args, "--evaluate", ckpt], [data],
            [(f"trained_params/ANN_VGG16_woBN_{ds}_ckpt.pth", "python main_train_ann.py "
              f"--dataset {ds} --arch VGG16 --dpath ./datasets"),
             (ckpt, "the CBP training command below")],
            [["main_train_ann.py", "--dataset", ds, "--arch", "VGG16", "--dpath", "./datasets"],
             ["main_calibration_quantize_cbp.py", *args]],
        ))
    return rows


def all_rows() -> list[Row]:
    return stbp_rows() + tssl_rows() + sew_rows() + calibration_rows()


def digits_rows(epochs: int) -> list[Row]:
    """STBP bin/ter on DIGITS at width 1/16, trained here (the fp32 step runs once)."""
    net = ["--dataset", "DIGITS", "--decay", "0.5", "--thresh", "0.5", "--lens", "0.5", "--T", "4",
           "--width", "0.0625", "--seed", "0"]
    fp32 = ["main_train_fp32.py", *net, "--mode", "train", "--init_gain", "2",
            "--learning_rate", "0.1", "--num_epochs", str(epochs)]
    rows = []
    for q in ("bin", "ter"):
        rows.append(Row(
            "STBP", "7Conv,3FC ×1/16", "DIGITS", 4, q, "—", "—", "CBP-QSNN-STBP",
            "main_quantize_cbp.py", [*net, "--mode", "eval", "--quant", q], [],
            [(f"trained_params/STBP_DIGITS_{q}_cbp_prequantized.pth", "trained by --digits")],
            [fp32, ["main_quantize_cbp.py", *net, "--mode", "train", "--quant", q,
                    "--learning_rate", "0.05", "--period", "3", "--num_epochs", str(epochs)]],
        ))
    return rows


# ----------------------------------------------------------------------------- running

ACC = re.compile(r"(?:Test Accuracy:\s*|Acc@1 = |test_acc=)\s*([0-9]+(?:\.[0-9]+)?)")
CFS = re.compile(r"(?:CFS:|cfs =)\s*([0-9.eE+-]+)")
MBIT = re.compile(r"weight memory:?\s*([0-9.]+)\s*Mbit")
SYNOPS = re.compile(r"SynOps/sample:\s*([0-9.eE+-]+)")
ENERGY = re.compile(r"energy/sample:\s*([0-9.eE+-]+)\s*uJ")
METRICS = (("acc", ACC), ("cfs", CFS), ("mbit", MBIT), ("synops", SYNOPS), ("energy", ENERGY))


def present(path: str) -> bool:
    """A file, or a folder with something in it."""
    if os.path.isdir(path):
        return any(os.scandir(path))
    return os.path.isfile(path)


def device_args(args: list[str], cuda: bool) -> list[str]:
    """Pick the device: the documented commands name cuda, which a CPU machine lacks."""
    out = list(args)
    for flag in ("--device", "-device"):
        if flag in out:
            i = out.index(flag)
            del out[i : i + 2]
    if cuda:
        return out
    single_dash = bool(out) and out[0].startswith("-") and not out[0].startswith("--")
    return out + ["-device" if single_dash else "--device", "cpu"]


def run(script_dir: str, cwd: str, cmd: list[str], cuda: bool, log) -> subprocess.CompletedProcess:
    """Run ``[script, *args]`` from ``script_dir`` with working directory ``cwd``."""
    cmd = [cmd[0], *device_args(cmd[1:], cuda)]
    for i in range(1, len(cmd) - 1):  # a config file is the script's, not the data tree's
        if cmd[i] == "-config" and not os.path.isabs(cmd[i + 1]):
            cmd[i + 1] = os.path.join(script_dir, cmd[i + 1])
    full = [sys.executable, os.path.join(script_dir, cmd[0]), *cmd[1:]]
    os.makedirs(cwd, exist_ok=True)
    env = dict(os.environ, CBP_NO_PROGRESS="1")
    proc = subprocess.run(full, cwd=cwd, env=env, capture_output=True, text=True)
    log.write(f"$ (cd {cwd} && python {' '.join(cmd)})\n{proc.stdout}{proc.stderr}\n")
    return proc


def evaluate(row: Row, root: str, train: bool, cuda: bool, log) -> dict:
    script_dir = os.path.join(ROOT, row.folder)
    cwd = os.path.join(root, row.folder)
    def missing():
        data = [f"{p} ({w})" for p, w in row.data if not present(os.path.join(cwd, p))]
        ckpt = [f"{p} (from {w})" for p, w in row.checkpoints if not present(os.path.join(cwd, p))]
        return data, ckpt

    data, ckpt = missing()
    if train and not data:
        for cmd in row.train:
            proc = run(script_dir, cwd, cmd, cuda, log)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                return {"status": f"training failed: {last}"}
        data, ckpt = missing()
    if data or ckpt:
        status = "missing " + "; ".join(data + ckpt)
        if ckpt and row.train:
            cmds = " && ".join("python " + " ".join(c) for c in row.train)
            status += f" — produce with: cd {row.folder} && {cmds}"
        return {"status": status}
    proc = run(script_dir, cwd, [row.script, *row.eval_args], cuda, log)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return {"status": f"evaluation failed: {last}"}
    text = proc.stdout
    res = {"status": "evaluated"}
    for key, rx in METRICS:
        hits = rx.findall(text)
        res[key] = hits[-1] if hits else "?"
    return res


def _mega(value: str) -> str:
    try:
        return f"{float(value) / 1e6:.4g}"
    except ValueError:
        return value


HEADER = ("| pipeline | network | dataset | T | weights | ours acc (%) | published acc (%) "
          "| ours weight memory (Mbit) | published (Mbit) | CFS | SynOps/sample (M) "
          "| energy/sample (µJ) | status |")


def table(results: list[tuple[Row, dict]]) -> str:
    lines = [HEADER, "|" + "---|" * 13]
    for row, res in results:
        ok = res["status"] == "evaluated"
        lines.append(
            f"| {row.pipeline} | {row.network} | {row.dataset} | {row.T} | {row.quant} "
            f"| {res.get('acc', '—') if ok else '—'} | {row.published_acc} "
            f"| {res.get('mbit', '—') if ok else '—'} | {row.published_mbit} "
            f"| {res.get('cfs', '—') if ok else '—'} "
            f"| {_mega(res.get('synops', '—')) if ok else '—'} "
            f"| {res.get('energy', '—') if ok else '—'} | {res['status']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                epilog="Exit status: 0 when every requested row was evaluated, "
                                       "1 when a row is missing data or checkpoints or failed.")
    p.add_argument("--root", default=ROOT, help="tree holding each folder's datasets/ and trained_params/")
    p.add_argument("--rows", default=None, help="only rows whose name contains this text")
    p.add_argument("--train", action="store_true", help="run the full training before evaluating")
    p.add_argument("--digits", action="store_true", help="add STBP bin/ter rows trained on DIGITS")
    p.add_argument("--digits_epochs", type=int, default=15)
    p.add_argument("--out", default="reproduce.md", help="markdown table written here")
    p.add_argument("--log", default="reproduce.log", help="command output written here")
    args = p.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    rows = all_rows()
    if args.rows:
        rows = [r for r in rows if args.rows.lower() in r.name.lower()]
    results = []
    with open(args.log, "w") as log:
        for row in rows:
            results.append((row, evaluate(row, args.root, args.train, cuda, log)))
            print(f"{row.name}: {results[-1][1]['status']}", flush=True)
        if args.digits:
            for i, row in enumerate(digits_rows(args.digits_epochs)):
                if i > 0:
                    row.train = row.train[1:]  # the fp32 network is shared
                results.append((row, evaluate(row, args.root, True, cuda, log)))
                print(f"{row.name}: {results[-1][1]['status']}", flush=True)
    text = table(results)
    with open(args.out, "w") as f:
        f.write(text)
    print()
    print(text)
    failed = [row.name for row, res in results if res["status"] != "evaluated"]
    if failed:
        print(f"{len(failed)} of {len(results)} rows could not be evaluated (see the status "
              "column)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
