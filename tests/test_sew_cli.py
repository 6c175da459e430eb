"""SEW-ResNet command-line pipelines end to end on tiny synthetic data: events written in
spikingjelly's raw format (integrated to frames by spikingjelly), a tiny ImageFolder tree;
fp32 -> CBP -> test-only for each directory, resume equivalence, a 2-rank gloo run under
torchrun, the reference README command lines, and clean error lines."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import free_port
from pipelines import pipeline_path

import cbp
from cbp.errors import UserError
from cbp.export import load_packed
from cbp.runtime import run_main

SEW_DIR = Path(__file__).resolve().parents[1] / "CBP-QSNN-SEW-ResNet"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]


@pytest.fixture(autouse=True)
def quiet(monkeypatch, tmp_path):
    monkeypatch.setenv("CBP_NO_PROGRESS", "1")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli(directory: str, argv: str | list[str], cwd: Path, fp32: bool = False):
    """Run a script's main() in this process with ``cwd`` as working directory (the three
    folders share module names; ``pipeline_path`` isolates them)."""
    argv = shlex.split(argv) if isinstance(argv, str) else argv
    old = os.getcwd()
    with pipeline_path(SEW_DIR / directory):
        mod = importlib.import_module("main_train_fp32" if fp32 else "main_quantize_cbp")
        os.chdir(cwd)
        try:
            return mod.main(argv)
        finally:
            os.chdir(old)


def cli_error(directory: str, argv: str, cwd: Path, capsys) -> str:
    """Run through run_main and return the single stderr line of a user error."""
    old = os.getcwd()
    with pipeline_path(SEW_DIR / directory):
        mod = importlib.import_module("main_quantize_cbp")
        os.chdir(cwd)
        try:
            with pytest.raises(SystemExit) as exc:
                run_main(lambda: mod.main(shlex.split(argv)))
        finally:
            os.chdir(old)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    return err[0]


# ----------------------------------------------------------------------------- data
def events(rng, n: int) -> dict:
    return {"t": np.sort(rng.integers(0, 10**6, n)).astype(np.int64),
            "x": rng.integers(0, 128, n).astype(np.uint16),
            "y": rng.integers(0, 128, n).astype(np.uint16),
            "p": rng.integers(0, 2, n).astype(np.uint8)}


def write_dvs128(root: Path, per_class=(2, 1), n: int = 200) -> None:
    """events_np/{train,test}/<label>/*.npz, the layout spikingjelly converts the archive to."""
    rng = np.random.default_rng(0)
    for split, k in zip(("train", "test"), per_class):
        for label in range(11):
            d = root / "events_np" / split / str(label)
            d.mkdir(parents=True)
            for i in range(k):
                np.savez(d / f"user{i:02d}_{label}.npz", **events(rng, n))


def write_cifar10dvs(root: Path, per_class: int = 10, n: int = 100) -> None:
    rng = np.random.default_rng(1)
    for c in CIFAR_CLASSES:
        d = root / "events_np" / c
        d.mkdir(parents=True)
        for i in range(per_class):
            np.savez(d / f"cifar10_{c}_{i}.npz", **events(rng, n))


def write_imagefolder(root: Path, per_class: int = 2) -> None:
    from PIL import Image

    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for c in ("n01", "n02", "n03"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")


def rows(path: Path) -> np.ndarray:
    return np.loadtxt(path, delimiter="\t", ndmin=2)


DVS = ("--model SEWResNet --connect_f ADD --data-path data --T 2 -b 4 -j 0 --width 0.125 "
       "--device cpu")


@pytest.fixture(scope="module")
def dvs_pretrained(tmp_path_factory):
    """A working folder with synthetic DVS128 events and an fp32 checkpoint made by the CLI."""
    cwd = tmp_path_factory.mktemp("dvs")
    write_dvs128(cwd / "data")
    torch.set_num_threads(1)
    os.environ["CBP_NO_PROGRESS"] = "1"
    cli("DVS128Gesture", f"{DVS} --epochs 1 --lr 0.05 --tb", cwd, fp32=True)
    return cwd


# ----------------------------------------------------------------------------- DVS128 Gesture
def test_dvs128_frames_integrated_by_spikingjelly(dvs_pretrained):
    frames = dvs_pretrained / "data" / "frames_number_2_split_by_number"
    f = frames / "train" / "3" / "user01_3.npz"
    assert f.is_file()
    x = np.load(f)["frames"]
    ev = np.load(dvs_pretrained / "data" / "events_np" / "train" / "3" / "user01_3.npz")
    assert x.shape == (2, 2, 128, 128)
    half = len(ev["t"]) // 2  # split_by number: frame i holds events [i*N/2, (i+1)*N/2)
    for i, sl in enumerate((slice(0, half), slice(half, None))):
        for p in (0, 1):
            sel = ev["p"][sl] == p
            want = np.zeros((128, 128))
            np.add.at(want, (ev["y"][sl][sel], ev["x"][sl][sel]), 1)
            assert np.array_equal(x[i, p], want)


def test_dvs128_fp32_cbp_test_only(dvs_pretrained, capsys):
    cwd = dvs_pretrained
    pre = cwd / "trained_params" / "SEW_ResNet_DVS128Gesture_fp32_pretrained.pth"
    fp32_state = torch.load(pre, weights_only=True)
    assert not any(k.endswith(".scale") for k in fp32_state) and "out.weight" in fp32_state
    capsys.readouterr()
    cli("DVS128Gesture", f"--tb --amp --output-dir ./logs {DVS} --epoch 3 --T_train 1 "
        "--lr 0.05 --lr-lambda 0.01 --quant ter --period 1 --print-freq 2", cwd)
    out = capsys.readouterr().out
    assert out.count("lambda update...") == 3
    run = (cwd / "logs" / "SEWResNet_b4_T2_Ttrain1_epoch3_sgd_cnf_ADD_period1_ter"
           / "lr0.05_lrlamba0.01")
    prog = rows(run / "progress.txt")
    assert prog.shape == (4, 5) and np.all(prog[0] == 0)
    assert prog[1:, 0].tolist() == [0, 1, 2] and np.all(prog[1:, 4] == 1e10)
    assert np.all(prog[1:, 3] > 0)  # cfs
    for name in ("checkpoint_0.pth", "checkpoint_2.pth", "checkpoint_latest.pth",
                 "checkpoint_max_test_acc1.pth"):
        assert (run / name).is_file()
    assert (run.parent / "lr0.05_lrlamba0.01_logs" / "train").is_dir()
    ck = torch.load(run / "checkpoint_latest.pth", weights_only=True)  # no pickled objects
    assert ck["g"] == 4 and ck["epoch"] == 2 and len(ck["lamb"]) == 14
    # the reference's multipliers are the training state's tensors (stored once)
    assert all(a.data_ptr() == b.data_ptr()
               for a, b in zip(ck["lamb"], ck["trainer"]["cbp"]["lambdas"]))
    assert abs(ck["ucs"] - 0.75) < 1e-12
    assert all(float(lam.min()) >= 0 for lam in ck["lamb"]) and float(ck["lamb"][0].max()) > 0
    # scale = mean|W| of the fp32 weights, frozen
    w0 = fp32_state["conv.1.conv.0.0.0.weight"]
    assert torch.allclose(ck["model"]["conv.1.conv.0.0.0.scale"], w0.abs().mean().reshape(1))
    assert float(ck["model"]["conv.1.conv.0.0.0.weight"].abs().max()) <= 1.0
    # test-only evaluates the prequantized weights written for the best epoch
    best = torch.load(run / "checkpoint_max_test_acc1.pth", weights_only=True)
    packed = load_packed(run / "packed_ter.pth")  # the best weights at their bit width
    key = "conv.3.conv.1.0.0"
    want = cbp.quantize(best["model"][f"{key}.weight"], best["model"][f"{key}.scale"], "ter")
    assert torch.equal(packed[f"{key}.weight"], want.detach())
    cli("DVS128Gesture", f"--output-dir ./logs {DVS} --test-only --quant ter", cwd)
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith(" * Acc@1")][0]
    # spike metrics: a rate for each of the 15 PLIF layers; the event frames (counts) drive
    # the first conv and the classifier sees time-averaged spikes (analog: MACs)
    rates = re.search(r"firing rate \(spikes/neuron/step\): (.*)", out).group(1).split(", ")
    assert len(rates) == 15 and rates[0].startswith("conv.0.1 ")
    ops = re.search(r"SynOps/sample: (\S+)  MACs/sample: (\S+)  energy/sample: (\S+) uJ", out)
    synops, macs, energy = map(float, ops.groups())
    # the classifier's MACs, unless its averaged input is silent (then it is spike counts 0)
    assert synops > 0 and macs in (0, best["model"]["out.weight"].numel())
    assert energy == pytest.approx((0.9 * synops + 4.6 * macs) * 1e-6, rel=1e-5)
    acc1 = float(line.split("=")[1].split(",")[0])
    assert acc1 == pytest.approx(best["max_test_acc1"], abs=1e-3)


def test_dvs128_resume_equivalence(dvs_pretrained, tmp_path):
    base = dvs_pretrained
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "trained_params").mkdir(parents=True)
        (d / "data").symlink_to(base / "data")
        pre = "trained_params/SEW_ResNet_DVS128Gesture_fp32_pretrained.pth"
        (d / pre).write_bytes((base / pre).read_bytes())
    common = f"{DVS} --T_train 1 --quant bin --period 20 --lr 0.05"
    cli("DVS128Gesture", f"{common} --epochs 3", a)
    cli("DVS128Gesture", f"{common} --epochs 2", b)
    first = b / "logs/SEWResNet_b4_T2_Ttrain1_epoch2_sgd_cnf_ADD_period20_bin/lr0.05_lrlamba0.01"
    cli("DVS128Gesture", f"{common} --epochs 3 --resume {first}/checkpoint_latest.pth", b)
    rel = "logs/SEWResNet_b4_T2_Ttrain1_epoch3_sgd_cnf_ADD_period20_bin/lr0.05_lrlamba0.01"
    ca = torch.load(a / rel / "checkpoint_latest.pth", weights_only=True)
    cb = torch.load(b / rel / "checkpoint_latest.pth", weights_only=True)
    assert ca["epoch"] == cb["epoch"] == 2
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    assert all(torch.equal(x, y) for x, y in zip(ca["lamb"], cb["lamb"]))
    assert (ca["g"], ca["period"], ca["lagsum_pre"]) == (cb["g"], cb["period"], cb["lagsum_pre"])
    assert torch.equal(ca["progress"], cb["progress"])
    # the training state is what resumes: multipliers edited there come from the file, and a
    # checkpoint in the reference's layout alone is refused with one line
    ref = torch.load(first / "checkpoint_latest.pth", weights_only=True)
    ref["trainer"]["cbp"]["lambdas"] = [lam + 0.5 for lam in ref["trainer"]["cbp"]["lambdas"]]
    torch.save(ref, b / "ref.pth")
    cli("DVS128Gesture", f"{common} --epochs 3 --resume ref.pth --output-dir ./ref", b)
    cr = torch.load(b / rel.replace("logs/", "ref/") / "checkpoint_latest.pth", weights_only=True)
    assert cr["epoch"] == 2 and cr["progress"].shape == ca["progress"].shape
    assert all(float(x.min()) >= 0.5 for x in cr["lamb"])  # lambda came from the file
    torch.save({k: v for k, v in ref.items() if k != "trainer"}, b / "bare.pth")
    with pytest.raises(UserError, match="holds no full training state"):
        cli("DVS128Gesture", f"{common} --epochs 3 --resume bare.pth --output-dir ./bare", b)


def test_dvs128_errors(tmp_path, capsys):
    err = cli_error("DVS128Gesture", f"{DVS} --test-only", tmp_path, capsys)
    assert "DVS128 Gesture not found" in err and "download" in err
    write_dvs128(tmp_path / "data", per_class=(1, 1), n=20)
    err = cli_error("DVS128Gesture", f"{DVS} --epochs 1", tmp_path, capsys)
    assert "SEW_ResNet_DVS128Gesture_fp32_pretrained.pth not found" in err
    assert "main_train_fp32.py" in err
    err = cli_error("DVS128Gesture", f"{DVS} --test-only --quant bin", tmp_path, capsys)
    assert "SEW_ResNet_DVS128Gesture_bin_cbp_prequantized.pth not found" in err
    err = cli_error("DVS128Gesture", DVS.replace("--connect_f ADD", ""), tmp_path, capsys)
    assert "--connect_f" in err
    # --world-size is checked against what the launcher started (here: one process)
    err = cli_error("DVS128Gesture", f"{DVS} --test-only --world-size 2", tmp_path, capsys)
    assert err.startswith("error: --world-size 2, but 1 process(es) were started")


def test_dvs128_script_on_digits_events(tmp_path, capsys):
    """--dataset DIGITS: the embedded digits as event frames, fp32 -> CBP -> test-only."""
    base = "--dataset DIGITS --model SEWResNet --connect_f ADD --T 2 -b 64 -j 0 --width 0.125"
    err = cli_error("DVS128Gesture", f"{base} --quant ter", tmp_path, capsys)
    assert "SEW_ResNet_DIGITS_fp32_pretrained.pth not found" in err and "--dataset DIGITS" in err
    cli("DVS128Gesture", f"{base} --epochs 1 --lr 0.05", tmp_path, fp32=True)
    fp32 = torch.load(tmp_path / "trained_params" / "SEW_ResNet_DIGITS_fp32_pretrained.pth",
                      weights_only=True)
    assert fp32["out.weight"].shape == (10, 2 * 2 * 4)  # 3 stages: 16 -> 2, 4 channels
    assert fp32["conv.0.0.0.weight"].shape == (4, 2, 3, 3)  # two polarities in
    assert not any(k.startswith("conv.4.") for k in fp32)  # 3 x (up conv, block) + pool
    capsys.readouterr()
    cli("DVS128Gesture", f"{base} --epochs 1 --lr 0.01 --quant ter --period 1", tmp_path)
    run = tmp_path / "logs" / "DIGITS_SEWResNet_b64_T2_epoch1_sgd_cnf_ADD_period1_ter"
    prog = rows(run / "lr0.01_lrlamba0.01" / "progress.txt")
    assert prog.shape == (2, 5) and 0 < prog[1, 1] <= 100
    capsys.readouterr()
    cli("DVS128Gesture", f"{base} --test-only --quant ter", tmp_path)
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(" * Acc@1")][0]
    assert float(line.split("=")[1].split(",")[0]) == pytest.approx(prog[1, 1], abs=1e-3)


# ----------------------------------------------------------------------------- CIFAR10-DVS
def test_cifar10dvs_split_fp32_cbp_test_only(tmp_path, capsys):
    write_cifar10dvs(tmp_path / "data" / "CIFAR10DVS", per_class=10)
    (tmp_path / "data" / "CIFAR10DVS" / "events_np" / "airplane" / "cifar10_airplane_10.npz"
     ).write_bytes((tmp_path / "data/CIFAR10DVS/events_np/airplane/cifar10_airplane_9.npz"
                    ).read_bytes())
    small = ("-model SEWResNet -cnf ADD -T 2 -b 30 -j 0 -width 0.0625 -device cpu "
             "-data_dir ./data/CIFAR10DVS")
    cli("CIFAR10DVS", f"{small} -epochs 1 -out_dir ./logs", tmp_path, fp32=True)
    # the split is cached with the folder it belongs to; 11 airplane files -> ceil(9.9)=10 train
    cache = torch.load(tmp_path / "dts_cache" / "test_set_2.pt", weights_only=True)
    assert len(cache["indices"]) == 10
    from spikingjelly.datasets.cifar10_dvs import CIFAR10DVS

    full = CIFAR10DVS(str(tmp_path / "data" / "CIFAR10DVS"), data_type="frame", frames_number=2,
                      split_by="number")
    names = sorted(Path(full.samples[i][0]).stem for i in cache["indices"])
    # lexicographic file order: the airplane test sample is _9, not _10
    assert names == sorted(f"cifar10_{c}_9" for c in CIFAR_CLASSES)
    capsys.readouterr()
    cli("CIFAR10DVS", f"-amp -out_dir ./logs {small} -opt SGD -lr 0.1 -lr_lambda 0.01 "
        "-epochs 1 -quant 1bit -period 1", tmp_path)
    run = tmp_path / "logs" / ("SEWResNet_ADD_T_2_T_train_None_b_30_SGD_lr_0.1_lrlambda_0.01_amp"
                               "_period_1_1bit_3")
    prog = rows(run / "progress.txt")
    assert prog.shape == (2, 7) and np.all(prog[1:, 1:3] <= 1.0)  # fractions
    assert prog[1, 6] == 1e10 and prog[1, 5] > 0  # lambda updated (period 1); cfs
    assert (run / "args.txt").is_file() and (run / "logs").is_dir()
    pt = Path(str(run) + "_pt")
    for name in ("checkpoint_0.pth", "checkpoint_max.pth", "checkpoint_latest.pth",
                 "packed_1bit.pth"):
        assert (pt / name).is_file()
    assert "net" in torch.load(pt / "checkpoint_max.pth", weights_only=True)
    # a second run in the same out_dir no longer aborts
    cli("CIFAR10DVS", f"-out_dir ./logs {small} -epochs 0 -quant 1bit -period 1", tmp_path)
    capsys.readouterr()
    cli("CIFAR10DVS", f"-out_dir ./logs {small} -test-only -quant 1bit", tmp_path)
    assert "Test Loss: " in capsys.readouterr().out


# ----------------------------------------------------------------------------- ImageNet
IMNET = ("--model sew_resnet18 --connect_f ADD --T 2 -b 2 -j 0 --width 0.0625 --crop-size 32 "
         "--resize-size 36 --data-path ./datasets/imagenet --output-dir ./logs --cache-dataset")


@pytest.fixture(scope="module")
def imagenet_pretrained(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("imnet")
    write_imagefolder(cwd / "datasets" / "imagenet")
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(cwd / "home")
    torch.set_num_threads(1)
    try:
        cli("ImageNet", f"{IMNET} --device cpu --epochs 1 --print-freq 0", cwd, fp32=True)
    finally:
        if old is not None:
            os.environ["HOME"] = old
    return cwd


def test_imagenet_fp32_cbp_test_only(imagenet_pretrained, capsys, monkeypatch):
    cwd = imagenet_pretrained
    monkeypatch.setenv("HOME", str(cwd / "home"))
    ck = torch.load(cwd / "trained_params" / "sew18_checkpoint_319.pth", weights_only=True)
    assert "layer1.0.conv1.0.weight" in ck["model"]
    caches = list((cwd / "home" / ".torch" / "vision" / "datasets" / "imagefolder").glob("*.pt"))
    assert len(caches) == 2
    cli("ImageNet", f"{IMNET} --device cpu --tb --amp --lr 0.1 --lr_lambda 0.01 --epochs 2 "
        "--quant bin --period 20 --wd 1e-4", cwd)
    run = cwd / "logs" / "sew_resnet18_b2_lr0.1_lr_lambda0.01_T2_cnf_ADD_P20_bin_wd0.0001"
    prog = rows(run / "progress_sew_resnet18_bin.txt")
    assert prog.shape == (3, 9) and prog[1, 8] != 1e10  # no update after the first epoch
    for name in ("checkpoint_0.pth", "checkpoint_1.pth", "checkpoint_latest.pth"):
        assert (run / name).is_file()
    assert (Path(str(run) + "_logs") / "te").is_dir()
    capsys.readouterr()
    cli("ImageNet", f"{IMNET} --test-only --print-freq 1024 --quant bin --device cpu", cwd)
    assert " * Acc@1 = " in capsys.readouterr().out




@pytest.mark.slow
def test_imagenet_torchrun_two_ranks_agree(imagenet_pretrained, tmp_path):
    cwd = imagenet_pretrained
    env = {**os.environ, "HOME": str(cwd / "home"), "OMP_NUM_THREADS": "1",
           "CBP_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(SEW_DIR / "ImageNet" / "main_quantize_cbp.py"),
           *shlex.split(IMNET.replace("./logs", str(tmp_path / "logs"))), "--epochs", "3",
           "--period", "2", "--quant", "ter", "--rank-state-dir", str(tmp_path / "ranks")]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "ranks" / "rank0.pth", weights_only=True)
    r1 = torch.load(tmp_path / "ranks" / "rank1.pth", weights_only=True)
    assert r0["g"] == r1["g"] >= 2 and r0["ucs"] == r1["ucs"] and r0["lr"] == r1["lr"]
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), k
    assert len(r0["lamb"]) == 19 and float(sum(x.sum() for x in r0["lamb"])) > 0
    assert all(torch.equal(x, y) for x, y in zip(r0["lamb"], r1["lamb"]))
    # only rank 0 writes the run's files; each rank logs one line per epoch at most
    runs = list((tmp_path / "logs").iterdir())
    assert len(runs) == 1 and (runs[0] / "progress_sew_resnet18_ter.txt").is_file()
    assert proc.stdout.count("epoch=0 lagsum_pre=") == 1


# ----------------------------------------------------------------------------- README commands
README_COMMANDS = {
    "DVS128Gesture": [
        "--tb --amp --output-dir ./logs --model SEWResNet --connect_f ADD --device cuda:0 --epoch 200 --T_train 12 --T 16 --data-path ./datasets/DVS128Gesture --lr 0.1 --lr-lambda 0.01 --quant bin --period 20",
        "--tb --amp --output-dir ./logs --model SEWResNet --connect_f ADD --device cuda:0 --epoch 200 --T_train 12 --T 16 --data-path ./datasets/DVS128Gesture --lr 0.1 --lr-lambda 0.01 --quant ter --period 20",
        "--output-dir ./logs --model SEWResNet --connect_f ADD --device cuda:0 --data-path ./datasets/DVS128Gesture --test-only --quant bin",
        "--output-dir ./logs --model SEWResNet --connect_f ADD --device cuda:0 --data-path ./datasets/DVS128Gesture --test-only --quant ter",
    ],
    "CIFAR10DVS": [
        "-amp -out_dir ./logs -model SEWResNet -cnf ADD -device cuda:0 -opt SGD -lr 0.1 -lr_lambda 0.01 -epochs 64 -quant bin -period 20",
        "-amp -out_dir ./logs -model SEWResNet -cnf ADD -device cuda:0 -opt SGD -lr 0.1 -lr_lambda 0.01 -epochs 64 -quant ter -period 20",
        "-out_dir ./logs -model SEWResNet -cnf ADD -device cuda:0 -data_dir ./datasets/CIFAR10DVS -test-only -quant bin",
        "-out_dir ./logs -model SEWResNet -cnf ADD -device cuda:0 -data_dir ./datasets/CIFAR10DVS -test-only -quant ter",
    ],
    "ImageNet": [
        f"--model {m} -b 32 --output-dir ./logs --tb --print-freq 128 --amp --cache-dataset --connect_f ADD --T 4 --lr 0.1 --lr_lambda 0.01 --epochs 100 --data-path ./datasets/imagenet --quant {q} --period 20 --device cuda"
        for m in ("sew_resnet18", "sew_resnet34") for q in ("bin", "ter")
    ] + [
        f"--model {m} --test-only --output-dir ./logs --print-freq 1024 --cache-dataset --connect_f ADD --T 4 --data-path ./datasets/imagenet --quant {q} --device cuda:0"
        for m in ("sew_resnet18", "sew_resnet34") for q in ("bin", "ter")
    ],
}


@pytest.mark.parametrize("directory", sorted(README_COMMANDS))
def test_readme_command_lines_parse(directory):
    with pipeline_path(SEW_DIR / directory):
        parser = importlib.import_module("main_quantize_cbp").build_parser()
    for line in README_COMMANDS[directory]:
        args = parser.parse_args(shlex.split(line))
        assert args.quant in ("bin", "ter")
    args = parser.parse_args(shlex.split(README_COMMANDS[directory][0]))
    if directory == "DVS128Gesture":
        assert (args.epochs, args.T_train, args.lr_lambda) == (200, 12, 0.01)
    elif directory == "CIFAR10DVS":
        assert (args.epochs, args.opt, args.cnf, args.amp) == (64, "SGD", "ADD", True)
    else:
        assert (args.batch_size, args.print_freq, args.cache_dataset) == (32, 128, True)
    for mode in ("1bit", "2bit"):
        dash = "-" if directory == "CIFAR10DVS" else "--"
        line = f"{README_COMMANDS[directory][2]} {dash}quant {mode}"
        assert parser.parse_args(shlex.split(line)).quant == mode


def test_missing_datasets_are_one_line(tmp_path, capsys):
    err = cli_error("CIFAR10DVS", "-model SEWResNet -cnf ADD -device cpu -data_dir ./nope "
                    "-test-only", tmp_path, capsys)
    assert "CIFAR10-DVS not found in ./nope" in err and "airplane.zip" in err
    err = cli_error("ImageNet", "--connect_f ADD --device cpu --data-path ./nope --test-only",
                    tmp_path, capsys)
    assert "ImageNet folder ./nope/train not found" in err
    err = cli_error("CIFAR10DVS", "-model SEWResNet -device cpu", tmp_path, capsys)
    assert "-cnf" in err
