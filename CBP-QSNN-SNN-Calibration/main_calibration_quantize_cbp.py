"""Convert the pretrained VGG ANN to an SNN (threshold search + calibration), then quantize the
SNN with constrained backpropagation (CBP), training it directly with BPTT over T steps.

Examples (working directory = CBP-QSNN-SNN-Calibration/):
    python main_calibration_quantize_cbp.py --dataset CIFAR10 --arch VGG16 --T 32 --calib light --dpath ./datasets --device cuda:0 --opt SGD --quant bin --lr 1e-2 --lr_lambda 1e-3
    python main_calibration_quantize_cbp.py --dataset CIFAR100 --arch VGG16 --T 32 --calib light --dpath ./datasets --device cuda:0 --opt SGD --quant ter --lr 1e-2 --lr_lambda 1e-3
    python main_calibration_quantize_cbp.py --dataset DIGITS --dpath . --device cpu --width 0.125 --usebn --T 16 --calib light --quant bin --opt Adam --lr 1e-3 --lr_lambda 1e-3 -epochs 10 --trials 1 --seed 0

Reads ./trained_params/ANN_<arch>_<wBN|woBN>_<DATASET>[_w<width>]_ckpt.pth.  Per trial i writes
./logs/<arch>_<DS>_T<T>_<i>_<calib>_ckpt.pth (calibrated SNN), the CBP checkpoints
./logs/<stem>_<i>_ckpt.pth (best), _<i>_<epoch>.pth (snapshots), _<i>_last.pth (resume),
_<i>_packed.pth (packed low-bit export), and ./progress/<arch>_<DS>_T_<T>_..._progress_<i>.txt.
--method ste / ptq runs a baseline instead (cbp.methods) on the same calibrated SNN: its files
carry the method after the quantization mode (..._<quant>_ste_<i>_ckpt.pth, ...).
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import calib_engine as E
import torch

from cbp import CBP, MODES, methods, param_groups, quantized_modules
from cbp import distributed as D
from cbp.checkpoint import check_finite, extract_state_dict
from cbp.export import pack_model, weight_memory_mbit
from cbp.run import Run
from cbp.runtime import UserError, run_main, select_device
from cbp.trainer import Epoch, training_state


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    E.add_common_args(p)
    p.add_argument("--calib", default="none", type=str, help="calibration methods",
                   choices=["none", "light", "advanced"])
    p.add_argument("--T", default=None, type=E.positive_int,
                   help="snn simulation length (default: 32; with --evaluate, the checkpoint's)")
    p.add_argument("--reset_pool", action="store_true",
                   help="set the pooling kernels to exactly 1/4 before conversion (default: "
                        "convert them as loaded, as the reference does)")
    p.add_argument("-epochs", "--epochs", dest="epochs", default=100, type=E.nonneg_int,
                   metavar="N", help="number of total epochs to run")
    p.add_argument("--opt", type=str, default="SGD", choices=["SGD", "Adam"],
                   help="use which optimizer. SGD or Adam")
    p.add_argument("--lr", default=1e-4, type=E.positive_float, help="learning rate")
    p.add_argument("--momentum", default=0.9, type=float, help="momentum for SGD")
    p.add_argument("--wd", default=None, type=float,
                   help="weight decay (default: 1e-4 without BN, 5e-4 with BN)")
    p.add_argument("--lr_lambda", default=1e-5, type=E.positive_float,
                   help="learning rate for lambda update")
    p.add_argument("--quant", default=None, type=str, choices=list(MODES),
                   help="quantization (default: bin; with --evaluate, the checkpoint's)")
    p.add_argument("--period", type=E.positive_int, default=20,
                   help="max period of lambda update")
    # additions
    methods.add_method_flag(p)
    p.add_argument("--trials", type=E.positive_int, default=3,
                   help="number of trials (seeds seed, seed+1, ...)")
    p.add_argument("--wc_iters", type=E.positive_int, default=5000,
                   help="advanced calibration: weight-calibration iterations per layer")
    p.add_argument("--wc_samples", type=E.positive_int, default=1024,
                   help="advanced calibration: number of calibration images")
    p.add_argument("--wc_lr", type=E.positive_float, default=1e-5,
                   help="advanced calibration: weight-calibration learning rate")
    p.add_argument("--evaluate", type=str, default=None, metavar="CKPT",
                   help="only evaluate a CBP checkpoint (e.g. a ..._ckpt.pth written here)")
    args = p.parse_args(argv)
    args.given = {k for k in ("T", "quant") if getattr(args, k) is not None}
    args.T = 32 if args.T is None else args.T
    args.quant = args.quant or "bin"
    if args.wd is None:
        args.wd = 5e-4 if args.usebn else 1e-4
    if args.wd < 0:
        p.error(f"--wd must be >= 0, got {args.wd}")
    return args


def names(args, trial: int) -> dict[str, str]:
    w = E.width_tag(args.width)
    base = f"{args.arch}_{args.dataset}{w}_T{args.T}"
    quant = f"{args.quant}{methods.suffix(args.method)}"
    stem = (f"./logs/{base}_{args.opt}_lr{args.lr}lr_lambda{args.lr_lambda}wd{args.wd}_"
            f"{quant}_{trial}")
    return {
        "calib": f"logs/{base}_{trial}_{args.calib}_ckpt.pth",
        "stem": stem,
        "best": f"{stem}_ckpt.pth",
        "last": f"{stem}_last.pth",
        "packed": f"{stem}_packed.pth",
        "progress": (f"./progress/{args.arch}_{args.dataset}{w}_T_{args.T}_lr_{args.lr}_lrlambda_"
                     f"{args.lr_lambda}_wd_{args.wd}_period_{args.period}_{quant}"
                     f"_progress_{trial}.txt"),
        "run": f"{base}_{quant}_{args.calib}_{trial}",
    }




def build_optimizer(snn_q, args) -> torch.optim.Optimizer:
    g = param_groups(snn_q)  # pooling kernels and BN slots are frozen, hence in no group
    if args.opt == "SGD":
        return torch.optim.SGD([{"params": g["qweight"], "lr": args.lr, "weight_decay": args.wd},
                                {"params": g["nqweight"], "lr": args.lr, "weight_decay": args.wd},
                                {"params": g["otherparam"], "lr": args.lr}],
                               momentum=args.momentum)
    return torch.optim.Adam([{"params": g[k], "lr": args.lr}
                             for k in ("qweight", "nqweight", "otherparam")])


def convert_trial(args, trial, train_loader, test_loader, device, show) -> dict:
    """ANN -> calibrated SNN; returns the calibration checkpoint (written with the first
    finished CBP epoch, so a run that fails before leaves the earlier file alone)."""
    path = E.require_ann(args)
    ann = E.load_ann(args, path)
    snn, ann_acc, snn_acc = E.convert(args, ann, train_loader, test_loader, device, show)
    ckpt = {
        "net_snn": snn.state_dict(),
        "threshold_dict": {n: float(m.threshold) for n, m in snn.spike_modules()},
        "mem_pot_init_dict": E.mem_pot_dict(snn),
        "pool_bias_dict": E.pool_bias_dict(snn),
        "snn_test_acc": snn_acc,
        "ann_test_acc": ann_acc,
    }
    print(f"{trial} trial: DNN-to-SNN conversion end!! (ANN {ann_acc:.3f}%, SNN {snn_acc:.3f}%)")
    return ckpt


def snapshot_epochs(epochs: int) -> list[int]:
    return [e for e in range(epochs) if e == 0 or (e + 1) % 5 == 0]


def cbp_trial(args, trial, train_loader, test_loader, device, show) -> None:
    f = names(args, trial)
    outputs = [f["calib"], f["best"], f["last"], f["packed"], f["progress"],
               *(f"{f['stem']}_{e}.pth" for e in snapshot_epochs(args.epochs))]
    identity = {"pipeline": "SNN-Calibration", "script": args.method, "dataset": args.dataset,
                "arch": args.arch, "usebn": bool(args.usebn), "width": float(args.width),
                "T": int(args.T), "calib": args.calib, "quant": args.quant}
    with Run(identity, outputs, lr_flag="--lr") as run:
        resume_state = None
        if args.resume:
            path = f["last"] if args.resume == "auto" else args.resume
            if args.resume != "auto" or os.path.isfile(path):
                with D.collective():
                    resume_state = run.resume(path, last_hint=f"resume from {f['last']}",
                                              needs=())
                    done = training_state(resume_state, path)["epoch"]
                if int(done) + 1 >= args.epochs:
                    print(f"trial {trial} already finished ({path})")
                    return
        if resume_state is None:
            E.seed_all(args.seed + trial)
            with D.collective():
                calib_ckpt = convert_trial(args, trial, train_loader, test_loader, device, show)
            pending = {f["calib"]: calib_ckpt}
            snn_q = E.load_calibrated_snn_q(args, calib_ckpt, device)
            D.broadcast_(list(snn_q.state_dict().values()))  # every rank starts from rank 0's
            extras = {"pool_bias_dict": calib_ckpt.get("pool_bias_dict", {}),
                      "mem_pot_init_dict": calib_ckpt.get("mem_pot_init_dict", {})}
        else:
            pending = {}
            extras = {"pool_bias_dict": resume_state.get("pool_bias_dict", {}),
                      "mem_pot_init_dict": resume_state.get("mem_pot_init_dict", {})}
            snn_q = E.load_calibrated_snn_q(args, {"net_snn": {}, **extras}, device)
            state = extract_state_dict(resume_state)
            with D.collective():
                check_finite(state, f["last"])
                snn_q.load_state_dict(state)
        train_part, test_part = D.split_loaders(train_loader, test_loader, args.seed + trial)
        _train(args, trial, snn_q, extras, train_part, test_part, device, run, resume_state,
               f, pending)


class CBPTrainer(E.CETrainer):
    """CBP on the calibrated SNN: the progress table (epoch, train acc, test acc, train loss,
    test loss, CFS, lagsum_pre; accuracies as fractions), the best checkpoint and its packed
    export, snapshots at epoch 0 and every 5th, and the calibration checkpoint (``pending``)
    with the first finished epoch."""

    clip = "value"

    def __init__(self, *a, files: dict, extras: dict, pending: dict, **kw) -> None:
        self.files, self.extras, self.pending = files, extras, pending
        super().__init__(*a, **kw)
        self.snapshots = set(snapshot_epochs(self.epochs))

    def before_epoch(self, st: Epoch) -> None:
        self._start = time.time()

    def on_batch(self, index: int, st: Epoch) -> None:
        if index % 50 == 0:
            print(f"samples/acc = {int(st.totals['n'])}/{int(st.totals['correct'])}")

    def train_summary(self, st: Epoch) -> None:
        n = max(st.totals["n"], 1)
        st.train_loss = st.totals["loss"] / n
        st.train_acc = st.totals["correct"] / n

    def on_decision(self, st: Epoch) -> None:
        d, c = st.decision, self.controller
        print(f"epoch={st.epoch}...lagsum_pre={d.compared_to}...lagsum={d.lagsum}")
        if d.updated:
            print(f"Lambda update.... (g={c.g}, ucs={c.ucs:.4f}"
                  + (", lr x0.1" if d.lr_decayed else "") + ")")

    def evaluate(self, st: Epoch) -> None:
        st.test_loss, st.test_acc = E.evaluate_ce(self.model, self.test_loader, self.device,
                                                  self.show)

    def initial_row(self):
        return [0.0] * 7

    def row(self, st: Epoch):
        return [st.epoch, st.train_acc, st.test_acc, st.train_loss, st.test_loss, st.cfs,
                st.lagsum_pre]

    def report(self, st: Epoch) -> None:
        if st.improved:
            print("save_max")

    def extra_state(self) -> dict:
        return dict(self.extras)

    def reference_state(self, st: Epoch, state: dict) -> dict:
        return {
            "net": state["model"],
            "factor": [list(m.factor) for _, m in quantized_modules(self.model)],
            "scale": [t.scale.detach().clone() for t in self.controller.targets],
            "optimizer1": state["optimizer"],
            **CBP.reference_entries(state["cbp"]),
            "epoch": st.epoch,
            "progress": state["progress"],
            "args": dict(vars(self.args)),
            "max_test_acc": self.best["acc"],
            **state["extra"],
        }

    def write(self, st: Epoch, full: dict) -> None:
        f, run = self.files, self.run
        while self.pending:
            path, obj = self.pending.popitem()
            run.save(obj, path)
        run.write_table(f["progress"], self.rows)
        ref = self.reference_state(st, full["trainer"])
        if st.improved:
            run.save(ref, f["best"])
            run.save(pack_model(self.model), f["packed"])
        if st.epoch in self.snapshots:
            run.save(ref, f"{f['stem']}_{st.epoch}.pth")

    def after_epoch(self, st: Epoch) -> None:
        total_time = time.time() - self._start
        eta = datetime.datetime.now() + datetime.timedelta(
            seconds=total_time * (self.epochs - st.epoch))
        print(f"epoch={st.epoch}, train_loss={st.train_loss}, train_acc={st.train_acc}, "
              f"test_loss={st.test_loss}, test_acc={st.test_acc}, "
              f"max_test_acc={self.best['acc']}, cfs={st.cfs}, total_time={total_time}, "
              f"escape_time={eta.strftime('%Y-%m-%d %H:%M:%S')}")

    def last_path(self) -> str:
        return self.files["last"]


def _train(args, trial, snn_q, extras, train_loader, test_loader, device, run: Run,
           resume_state, f, pending: dict) -> None:
    """CBP epochs; ``pending`` files (the calibration checkpoint) are written with the first
    finished epoch."""
    optimizer = build_optimizer(snn_q, args)
    cbp = methods.controller(args.method, snn_q, args.lr_lambda, period_max=args.period,
                             init_scales=resume_state is None)
    trainer = CBPTrainer(snn_q, optimizer, run=run, device=device, controller=cbp, args=args,
                         files=f, extras=extras, pending=pending,
                         logdirs={"main": f"./runs/{f['run']}" if args.logdir is None else
                                  (os.path.join(args.logdir, f"trial{trial}")
                                   if args.logdir else "")})
    if resume_state is not None:
        trainer.restore(resume_state, f["last"])
        print(f"resumed trial {trial} at epoch {trainer.start_epoch}")
    print(f"Start Quantization ({args.quant}, {cbp.param_size} quantized weights)")
    trainer.fit(train_loader, test_loader)
    with run.writes():
        for path, obj in pending.items():  # no epoch to run: the conversion alone
            run.save(obj, path)
    print(f"trial {trial}: max_test_acc={trainer.best['acc']}, weight memory "
          f"{weight_memory_mbit(snn_q):.4f} Mbit")


def evaluate(args, device, show) -> None:
    """Test accuracy, CFS and weight memory of a saved CBP checkpoint."""
    from cbp import cfs as model_cfs
    from cbp.metrics import profiled

    snn_q = E.load_cbp_checkpoint(args, args.evaluate, device)
    print(f"checkpoint: {args.quant} weights, evaluated at T={args.T}")
    _, test_loader = E.loaders(args, device)
    # spike metrics: the IF layers emit spikes of amplitude theta (see cbp.metrics)
    (test_loss, test_acc), _ = profiled(
        snn_q, lambda: E.evaluate_ce(snn_q, test_loader, device, show),
        neurons=snn_q.spike_types)
    print(f"test_loss={test_loss}, test_acc={test_acc}")
    print(f"CFS: {model_cfs(snn_q):.6g}  weight memory: {weight_memory_mbit(snn_q):.4f} Mbit")


def main(argv=None) -> None:
    args = parse_args(argv)
    device = D.start(lambda: select_device(args.device), args.device)
    print(args)
    show = not args.no_progress
    if args.evaluate:
        evaluate(args, device, show)
        return
    os.makedirs("./logs", exist_ok=True)
    os.makedirs("./progress", exist_ok=True)
    if args.resume not in (None, "auto") and args.trials != 1:
        raise UserError("--resume PATH resumes one trial: add --trials 1 (or give --resume "
                        "alone to continue every trial from its _last.pth)")
    have_last = [os.path.isfile(names(args, i)["last"]) for i in range(args.trials)]
    if args.resume == "auto" and not any(have_last):
        raise UserError(f"cannot resume: {names(args, 0)['last']} not found "
                        "(run without --resume first)")
    if not (args.resume == "auto" and all(have_last)) and args.resume in (None, "auto"):
        E.require_ann(args)  # a trial still has to be converted from the ANN
    with D.collective():
        train_loader, test_loader = E.loaders(args, device)
    for trial in range(args.trials):
        cbp_trial(args, trial, train_loader, test_loader, device, show)


if __name__ == "__main__":
    run_main(main)
