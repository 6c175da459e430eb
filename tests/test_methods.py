"""The baselines of cbp.methods on the one training loop (toy network, in process): STE is the
same training with the multipliers held at zero, PTQ one evaluation of the quantized fp32
weights with no training; file names per method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_trainer import Toy, data, net
from torch import nn

import cbp
from cbp import methods
from cbp.errors import UserError
from cbp.run import Run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_file_names_carry_the_method():
    t = methods.tagged
    assert t("./trained_params/STBP_CIFAR10_bin_cbp_prequantized.pth", "ste") == \
        "./trained_params/STBP_CIFAR10_bin_ste_prequantized.pth"
    assert t("./checkpoint/CIFAR10_cbp_ter_best.pth", "ptq") == "./checkpoint/CIFAR10_ptq_ter_best.pth"
    # no cbp token: the method goes before the extension; folders are never renamed
    assert t("./progress/CIFAR10_bin.txt", "ptq") == "./progress/CIFAR10_bin_ptq.txt"
    assert t("/home/cbp/runs/cbpx_bin", "ste") == "/home/cbp/runs/cbpx_bin_ste"
    assert t("/home/cbp/a_cbp_cbp.pth", "ste") == "/home/cbp/a_ste_cbp.pth"
    assert t("anything_cbp.pth", "cbp") == "anything_cbp.pth"
    assert [methods.suffix(m) for m in methods.METHODS] == ["", "_ste", "_ptq"]
    assert methods.flag("cbp") == "" and methods.flag("ste", "-") == " -method ste"
    with pytest.raises(ValueError, match="cbp, ste, ptq"):
        methods.controller("qat", net(True), 0.01)


def fit(folder: Path, method: str | None, epochs: int = 3) -> Toy:
    """The toy network trained (or, for ptq, evaluated) with ``method``; ``None``: plain
    training of the quantized network, clamped like the controllers clamp."""
    folder.mkdir(exist_ok=True)
    torch.manual_seed(5)
    with Run({"toy": 1}, [folder / n for n in ("last.pth", "best.pth", "progress.txt")]) as run:
        model = net(True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        ctl = None if method is None else methods.controller(method, model, 0.01, period_max=1)
        t = Toy(model, opt, run=run, epochs=epochs, device=torch.device("cpu"), controller=ctl,
                show=False, folder=folder)
        if method is None:
            model[2].init_scale()
            t.after_step = lambda: model[2].weight.data.clamp_(-1.0, 1.0)
        t.clip = "value"
        t.fit(data(), data(24, seed=1))
    return t


def test_ste_is_quantization_aware_training_with_lambda_zero(tmp_path):
    ste, plain = fit(tmp_path / "ste", "ste"), fit(tmp_path / "plain", None)
    # the same weights, bit for bit, as training the task loss alone through the quantizer
    for (k, a), b in zip(ste.model.state_dict().items(), plain.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert [r[1] for r in ste.rows] == [r[1] for r in plain.rows]
    c = ste.controller
    assert all(not lam.any() for lam in c.lambdas)  # never moved from zero
    assert c.g == 4 and c.num_updates == 4  # the schedule ran: start + one update per epoch
    # and it differs from CBP, whose multipliers pull the weights
    cbp_run = fit(tmp_path / "cbp", "cbp")
    assert any(lam.any() for lam in cbp_run.controller.lambdas)
    assert not torch.equal(cbp_run.model[2].weight, ste.model[2].weight)


def test_ste_lagsum_is_the_task_loss():
    model = net(True)
    c = methods.controller("ste", model, 0.01)
    c.start()
    loss = torch.tensor(0.75)
    assert c.lagrangian(loss).item() == 0.75
    assert c.penalty().item() == 0.0
    assert c.epoch_lagsum() == 0.75


def test_ptq_evaluates_the_quantized_fp32_weights_once(tmp_path):
    before = net(True).state_dict()
    t = fit(tmp_path / "ptq", "ptq", epochs=5)
    after = t.model.state_dict()
    for k, v in before.items():
        if not k.endswith("scale"):
            assert torch.equal(v, after[k]), k  # nothing trained
    w = before["2.weight"]
    assert after["2.scale"].item() == pytest.approx(w.abs().mean().item(), rel=1e-6)
    assert t.optimizer.state_dict()["state"] == {}  # no step was taken
    # one evaluation of the quantized network, written as epoch 0, the best
    x, y = data(24, seed=1).dataset.tensors
    with torch.no_grad():
        acc = 100.0 * float((t.model.eval()(x).argmax(1) == y).float().mean())
    q = cbp.quantize(w, after["2.scale"], "ter")
    assert set(torch.unique(q / after["2.scale"]).tolist()) <= {-1.0, 0.0, 1.0}
    assert t.rows == [[0.0, 0.0, 0.0], [0, acc, pytest.approx(cbp.cfs(t.model))]]
    assert (tmp_path / "ptq/best.pth").is_file() and t.best == {"acc": acc, "epoch": 0}
    assert (tmp_path / "ptq/progress.txt").read_text().count("\n") == 2


def test_ptq_has_nothing_to_resume(tmp_path):
    fit(tmp_path / "p", "ptq")
    with Run({"toy": 1}, [tmp_path / "p/last.pth"]) as run:
        model = net(True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        t = Toy(model, opt, run=run, epochs=1, device=torch.device("cpu"),
                controller=methods.controller("ptq", model, 0.01), show=False,
                folder=tmp_path / "p")
        t.resume(str(tmp_path / "p/last.pth"), hint="")
        with pytest.raises(UserError, match="nothing to resume: leave out --resume"):
            t.fit(data(), data(24, seed=1))


def test_convert_users_choose_a_method_too():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(),
                          nn.Linear(6, 2))
    cbp.convert(model, "bin")
    for method, kind in (("cbp", cbp.CBP), ("ste", methods.STE), ("ptq", methods.PTQ)):
        c = methods.controller(method, model, 1e-3)
        assert type(c) is kind and c.method == method and len(c.targets) == 1


def test_nir_export_names_the_methods_file():
    import argparse

    from cbp import nir_export

    p = argparse.ArgumentParser()
    methods.add_method_flag(p)
    nir_export.add_export_flags(p, "OUT")
    a = p.parse_args(["--quant", "ter", "--method", "ste"])
    assert nir_export.output_path(a, "./t/STBP_X_ter.nir") == "./t/STBP_X_ter_ste.nir"
    a = p.parse_args(["--method", "ptq"])  # fp32: no method in the name
    assert nir_export.output_path(a, "./t/STBP_X_fp32.nir") == "./t/STBP_X_fp32.nir"
    a = p.parse_args(["--quant", "bin", "--export_nir", "mine.nir"])
    assert nir_export.output_path(a, "x") == "mine.nir" and a.dt == nir_export.DEFAULT_DT
    single = argparse.ArgumentParser()
    nir_export.add_export_flags(single, "OUT", "-")
    assert single.parse_args(["-quant", "bin", "--dt", "0.001"]).dt == 0.001
