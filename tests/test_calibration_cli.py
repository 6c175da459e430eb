"""The two SNN-Calibration scripts end to end on the embedded DIGITS data: ANN training,
conversion + light / advanced calibration, CBP on the spiking network, evaluation, resume,
flag handling and one-line errors."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from clitools import call_main, error_line, inproc, ok, run, run_here

CAL_DIR = Path(__file__).resolve().parents[1] / "CBP-QSNN-SNN-Calibration"
if str(CAL_DIR) not in sys.path:
    sys.path.insert(0, str(CAL_DIR))
for _name in ("data", "data.autoaugment"):
    _mod = sys.modules.get(_name)
    if _mod is not None and not str(getattr(_mod, "__file__", "") or "").startswith(str(CAL_DIR)):
        del sys.modules[_name]

import calib_engine as E  # noqa: E402
import main_calibration_quantize_cbp as CBPMAIN  # noqa: E402
import main_train_ann as ANNMAIN  # noqa: E402
from CIFAR.models.vgg import VGG  # noqa: E402

from cbp.export import load_packed  # noqa: E402

SMALL = ["--dataset", "DIGITS", "--dpath", ".", "--device", "cpu", "--width", "0.0625",
         "--usebn", "--subset", "192", "--batch_size", "64", "--logdir", "", "--no_progress"]
ANN_ARGS = SMALL + ["--epochs", "1"]
CBP_ARGS = SMALL + ["--T", "2", "--calib", "light", "--quant", "ter", "--lr", "1e-2",
                    "--lr_lambda", "1e-3", "--trials", "1", "--period", "1"]
ANN_CKPT = "trained_params/ANN_VGG16_wBN_DIGITS_w0.0625_ckpt.pth"
CALIB_CKPT = "logs/VGG16_DIGITS_w0.0625_T2_0_light_ckpt.pth"
STEM = "logs/VGG16_DIGITS_w0.0625_T2_SGD_lr0.01lr_lambda0.001wd0.0005_ter_0"
PROGRESS = ("progress/VGG16_DIGITS_w0.0625_T_2_lr_0.01_lrlambda_0.001_wd_0.0005_period_1_ter"
            "_progress_0.txt")








def load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def rows(path: Path) -> list[list[float]]:
    return [[float(v) for v in line.split("\t")] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """ANN training, then conversion + light calibration + 2 CBP epochs, as subprocesses."""
    d = tmp_path_factory.mktemp("calib")
    ok(run_here(CAL_DIR / "main_train_ann.py", ANN_ARGS, d))
    out = ok(run_here(CAL_DIR / "main_calibration_quantize_cbp.py", CBP_ARGS + ["-epochs", "2"], d))
    (d / "cbp_stdout.txt").write_text(out)
    return d


def copy_run(src: Path, dst: Path, only_ann: bool = False) -> Path:
    if only_ann:
        (dst / "trained_params").mkdir(parents=True)
        shutil.copy(src / ANN_CKPT, dst / ANN_CKPT)
    else:
        shutil.copytree(src, dst)
    return dst


def test_ann_checkpoint_is_a_plain_state_dict(run_dir):
    sd = load(run_dir / ANN_CKPT)
    ann = VGG("VGG16", 10, use_bn=True, width=0.0625)
    assert list(sd) == list(ann.state_dict())
    ann.load_state_dict(sd)
    pools = [v for v in sd.values() if v.dim() == 4 and v.shape[-1] == 2]
    assert len(pools) == 5 and all(bool((p == 0.25).all()) for p in pools)


def test_calibration_and_cbp_outputs(run_dir):
    out = (run_dir / "cbp_stdout.txt").read_text()
    assert "Start Quantization" in out and "Lambda update" in out
    calib = load(run_dir / CALIB_CKPT)
    assert set(calib) >= {"net_snn", "threshold_dict", "mem_pot_init_dict", "pool_bias_dict",
                          "snn_test_acc", "ann_test_acc"}
    assert len(calib["threshold_dict"]) == 18
    assert set(calib["threshold_dict"].values()) == {1.0}
    assert len(calib["pool_bias_dict"]) == 5  # light calibration's pooling biases are kept
    assert all(k.startswith("model.") for k in calib["net_snn"])

    prog = rows(run_dir / PROGRESS)
    assert len(prog) == 3 and all(len(r) == 7 for r in prog)
    assert prog[0] == [0.0] * 7
    assert [r[0] for r in prog[1:]] == [0.0, 1.0]
    assert all(0.0 <= r[1] <= 1.0 and 0.0 <= r[2] <= 1.0 and r[5] >= 0 for r in prog[1:])
    assert all(r[6] == 1e10 for r in prog[1:])  # --period 1: a lambda update every epoch

    args = CBPMAIN.parse_args(CBP_ARGS)
    snn_q = E.build_snn_q(args)
    best = load(run_dir / f"{STEM}_ckpt.pth")
    assert set(best) >= {"net", "factor", "scale", "optimizer1", "optimizer2", "epoch", "lamb",
                         "lagsum_pre", "period", "ucs", "g", "progress", "args", "max_test_acc"}
    assert list(best["net"]) == list(snn_q.state_dict())
    assert len(best["lamb"]) == 12 and best["factor"][0] == [-1.0, 0.0, 1.0]
    last = load(run_dir / f"{STEM}_last.pth")
    assert last["epoch"] == 1 and last["g"] == 3 and last["trainer"]["cbp"]["g"] == 3
    assert (run_dir / f"{STEM}_0.pth").is_file() and not (run_dir / f"{STEM}_1.pth").exists()

    # evaluation of the saved CBP network: its weights are on the ternary levels
    E.apply_extras(snn_q, last["pool_bias_dict"], last["mem_pot_init_dict"], "cpu")
    snn_q.load_state_dict(best["net"])
    for _, m in snn_q.spike_modules():
        m.threshold = 1.0
    snn_q.set_spike_state(True)
    for m in snn_q.modules():
        if hasattr(m, "quantized_weight"):
            q = (m.quantized_weight() / m.scale).detach()
            assert set(q.unique().tolist()) <= {-1.0, 0.0, 1.0}
    test = E.build_data(".", 64, dataset="DIGITS", workers=0)[1]
    _, acc = E.evaluate_ce(snn_q, [next(iter(test))], torch.device("cpu"))
    assert 0.0 <= acc <= 1.0
    packed = load_packed(run_dir / f"{STEM}_packed.pth")
    assert packed is not None


def test_resume_continues_like_an_uninterrupted_run(run_dir, tmp_path, monkeypatch):
    resumed = copy_run(run_dir, tmp_path / "resumed")
    fresh = copy_run(run_dir, tmp_path / "fresh", only_ann=True)
    (resumed / ANN_CKPT).unlink()  # resuming needs only the run's own checkpoint
    monkeypatch.chdir(resumed)
    code, out, err = call_main(CBPMAIN.main, CBP_ARGS + ["-epochs", "3", "--resume"])
    assert code == 0, err
    assert "resumed trial 0" in out and "DNN-to-SNN" not in out
    monkeypatch.chdir(fresh)
    code, out, err = call_main(CBPMAIN.main, CBP_ARGS + ["--epochs", "3"])
    assert code == 0, err
    a, b = load(resumed / f"{STEM}_last.pth"), load(fresh / f"{STEM}_last.pth")
    assert a["epoch"] == b["epoch"] == 2
    for k in b["net"]:
        torch.testing.assert_close(a["net"][k], b["net"][k], rtol=1e-5, atol=1e-6)
    pa, pb = rows(resumed / PROGRESS), rows(fresh / PROGRESS)
    assert len(pa) == len(pb) == 4
    assert pa[1:3] == rows(run_dir / PROGRESS)[1:3]
    assert pa[3][:3] == pytest.approx(pb[3][:3], abs=1e-6)
    # a finished run is not repeated
    monkeypatch.chdir(resumed)
    code, out, _ = call_main(CBPMAIN.main, CBP_ARGS + ["-epochs", "3", "--resume"])
    assert code == 0 and "already finished" in out


def test_evaluate_only(run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(run_dir)
    best = load(run_dir / f"{STEM}_ckpt.pth")
    # neither --quant nor --T given: the checkpoint's (ter, T 2), not the flags' defaults
    code, out, err = call_main(CBPMAIN.main, SMALL + ["--evaluate", f"{STEM}_ckpt.pth"])
    assert code == 0, err
    assert "checkpoint: ter weights, evaluated at T=2" in out
    acc = float(out.split("test_acc=")[1].split()[0])
    assert acc == best["max_test_acc"]  # the same network, the same test set
    assert "CFS:" in out and "Mbit" in out
    # spike metrics: every IF layer (13 convs + 5 pooling convs of VGG16) fires spikes of
    # amplitude theta; the first conv sees the analog image at each of the T = 2 steps
    rates = out.split("firing rate (spikes/neuron/step): ")[1].splitlines()[0].split(", ")
    assert len(rates) == 18 and all(0 < float(r.split()[1]) < 1 for r in rates)
    macs = float(out.split("MACs/sample: ")[1].split()[0])
    c1 = best["net"]["model.features.0.conv.weight"]
    assert macs == 2 * c1.numel() * 32 * 32  # the first conv only: C_out C_in 9 x 32 x 32 x T
    code, out, err = call_main(CBPMAIN.main, SMALL + ["--quant", "bin", "--evaluate",
                                                      f"{STEM}_ckpt.pth"])
    assert code == 1 and "test_acc" not in out
    error_line(err, "holds ter weights: evaluate it with --quant ter (or without --quant)")
    monkeypatch.chdir(tmp_path)
    code, _, err = call_main(CBPMAIN.main, CBP_ARGS + ["--evaluate", "missing.pth"])
    assert code == 1
    error_line(err, "missing.pth")


@pytest.mark.slow
def test_nir_export_of_the_cbp_checkpoint(run_dir, tmp_path, monkeypatch):
    """export_nir.py on the trained ternary checkpoint (T and --quant from it, light
    calibration's pooling biases): written after a spike-for-spike round trip."""
    nir = pytest.importorskip("nir")
    out_file = tmp_path / "cbp.nir"
    code, out, err = inproc(CAL_DIR / "export_nir.py", SMALL + [
        "--evaluate", f"{STEM}_ckpt.pth", "--export_nir", str(out_file)], run_dir, monkeypatch)
    assert code == 0, err
    assert out.startswith(f"exported {out_file} (ter, T=2, dt=0.0001): round trip exact on 64 "
                          "test images, spikes identical in all 18 IF layers ("), out
    graph = nir.read(str(out_file))
    assert sum(name.endswith("_bias") for name in graph.nodes) == 5
    assert graph.metadata["timesteps"] == 2


def test_advanced_calibration_runs(run_dir, tmp_path, monkeypatch):
    d = copy_run(run_dir, tmp_path / "adv", only_ann=True)
    monkeypatch.chdir(d)
    code, out, err = call_main(CBPMAIN.main, CBP_ARGS[:-8] + [
        "--T", "2", "--calib", "advanced", "--quant", "bin", "--trials", "1", "-epochs", "0",
        "--wc_iters", "3", "--wc_samples", "64"])
    assert code == 0, err
    assert "Weights Calibration" in out and "Potential Correction" in out
    calib = load(d / "logs/VGG16_DIGITS_w0.0625_T2_0_advanced_ckpt.pth")
    pots = calib["mem_pot_init_dict"]
    assert len(pots) == 18 and all(isinstance(v, torch.Tensor) for v in pots.values())


def test_ann_resume(run_dir, tmp_path, monkeypatch):
    d = copy_run(run_dir, tmp_path / "annres")
    monkeypatch.chdir(d)
    code, out, err = call_main(ANNMAIN.main, ANN_ARGS[:-1] + ["2", "--resume"])
    assert code == 0, err
    assert "resumed from" in out and "Iters: 1" in out and "Iters: 0" not in out


# ---------------------------------------------------------------------------- flags


def test_flags_defaults_and_fixed_options():
    a = CBPMAIN.parse_args(["--dpath", "x"])
    assert (a.dataset, a.arch, a.seed, a.batch_size, a.calib, a.T, a.epochs, a.opt, a.lr,
            a.momentum, a.lr_lambda, a.quant, a.period, a.device, a.usebn) == (
        "CIFAR10", "VGG16", 1000, 128, "none", 32, 100, "SGD", 1e-4, 0.9, 1e-5, "bin", 20,
        None, False)  # device None = cuda when available, else cpu (the reference: "cuda")
    assert a.wd == 1e-4 and CBPMAIN.parse_args(["--dpath", "x", "--usebn"]).wd == 5e-4
    assert CBPMAIN.parse_args(["--dpath", "x", "--wd", "3e-3"]).wd == 3e-3
    assert CBPMAIN.parse_args(["--dpath", "x", "-epochs", "7"]).epochs == 7
    assert CBPMAIN.parse_args(["--dpath", "x", "--epochs", "7"]).epochs == 7
    for q in ("bin", "ter", "1bit", "2bit"):
        assert CBPMAIN.parse_args(["--dpath", "x", "--quant", q]).quant == q
    b = ANNMAIN.parse_args(["--dpath", "x"])
    assert (b.epochs, b.learning_rate, b.wd, b.batch_size) == (300, None, None, 128)

    # --wd and --batch_size reach the optimizer and the loaders
    args = CBPMAIN.parse_args(SMALL + ["--wd", "3e-3", "--batch_size", "48", "--quant", "2bit"])
    snn_q = E.build_snn_q(args)
    E.freeze_fixed(snn_q)
    opt = CBPMAIN.build_optimizer(snn_q, args)
    assert [g["weight_decay"] for g in opt.param_groups] == [3e-3, 3e-3, 0]
    assert len(opt.param_groups[0]["params"]) == 12 and len(opt.param_groups[1]["params"]) == 2
    train, test = E.loaders(args, torch.device("cpu"))
    assert train.batch_size == test.batch_size == 48

    # progress files of different datasets no longer collide
    c10 = CBPMAIN.names(CBPMAIN.parse_args(["--dpath", "x", "--dataset", "CIFAR10"]), 0)
    c100 = CBPMAIN.names(CBPMAIN.parse_args(["--dpath", "x", "--dataset", "CIFAR100"]), 0)
    assert c10["progress"] != c100["progress"] and "CIFAR100" in c100["progress"]
    assert c10["best"] == "./logs/VGG16_CIFAR10_T32_SGD_lr0.0001lr_lambda1e-05wd0.0001_bin_0_ckpt.pth"
    assert c10["calib"] == "logs/VGG16_CIFAR10_T32_0_none_ckpt.pth"


# ---------------------------------------------------------------------------- bad inputs




def test_missing_ann_checkpoint_subprocess(tmp_path):
    proc = run(CAL_DIR / "main_calibration_quantize_cbp.py", CBP_ARGS, tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    error_line(proc.stderr, ANN_CKPT, "main_train_ann.py")


@pytest.mark.parametrize("case", ["no_cifar", "no_cifar_ann", "wrong_width", "resume_nothing",
                                  "ann_resume_nothing", "cuda", "bad_quant", "bad_T"])
def test_bad_inputs_give_error_line(case, run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module, argv, needles, code = CBPMAIN, list(CBP_ARGS), [], 1
    if case == "no_cifar":
        (tmp_path / "trained_params").mkdir()
        torch.save(VGG("VGG16", 10, False, 0.0625).state_dict(),
                   tmp_path / "trained_params/ANN_VGG16_woBN_CIFAR10_w0.0625_ckpt.pth")
        argv = ["--dataset", "CIFAR10", "--dpath", "nowhere", "--device", "cpu",
                "--width", "0.0625"]
        needles = ["cifar-10-python.tar.gz", "nowhere"]
    elif case == "no_cifar_ann":
        module, argv = ANNMAIN, ["--dataset", "CIFAR100", "--dpath", "nowhere", "--device", "cpu"]
        needles = ["cifar-100-python.tar.gz"]
    elif case == "wrong_width":
        (tmp_path / "trained_params").mkdir()
        torch.save(VGG("VGG16", 10, True, 0.125).state_dict(), tmp_path / ANN_CKPT)
        needles = ["shape mismatch", ANN_CKPT]
    elif case == "resume_nothing":
        copy_run(run_dir, tmp_path / "x", only_ann=True)
        monkeypatch.chdir(tmp_path / "x")
        argv += ["--resume"]
        needles = ["cannot resume", "_last.pth"]
    elif case == "ann_resume_nothing":
        module, argv, needles = ANNMAIN, ANN_ARGS + ["--resume"], ["cannot resume"]
    elif case == "cuda":
        if torch.cuda.is_available():
            pytest.skip("CUDA present")
        argv = [a if a != "cpu" else "cuda:0" for a in argv]
        needles = ["CUDA is not available", "--device cpu"]
    elif case == "bad_quant":
        argv += ["--quant", "4bit"]
        needles, code = ["--quant", "4bit"], 2
    elif case == "bad_T":
        argv += ["--T", "0"]
        needles, code = ["--T"], 2
    rc, _, err = call_main(module.main, argv)
    assert rc == code, err
    error_line(err, *needles)
