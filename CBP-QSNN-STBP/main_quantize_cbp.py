"""Quantize the pretrained STBP network with constrained backpropagation (CBP).

Examples (working directory = CBP-QSNN-STBP/):
    python main_quantize_cbp.py --dataset CIFAR10 --mode train --decay 0.25 --thresh 0.5 --lens 0.5 --T 8 --quant bin
    python main_quantize_cbp.py --dataset CIFAR10 --mode eval --decay 0.25 --thresh 0.5 --lens 0.5 --T 8 --quant ter
    python main_quantize_cbp.py --dataset CIFAR100 --mode train --decay 0.8 --thresh 0.5 --lens 0.5 --T 8 --quant bin

Reads ./trained_params/STBP_<dataset>_fp32_pretrained.pth; writes ./checkpoint/<dataset>_cbp_<q>[_best].pth,
./progress/<dataset>_cbp_<q>_progress.txt (epoch, lagsum_pre, test acc %, CFS), the best weights as a
plain state dict in ./trained_params/STBP_<dataset>_<q>_cbp_prequantized.pth (what --mode eval reads)
and the packed low-bit export ./checkpoint/<dataset>_cbp_<q>_packed.pth.
--method ste / ptq runs a baseline instead (cbp.methods): every file name has ste / ptq in
place of cbp.
"""

from __future__ import annotations

import argparse

import torch

from cbp import CBP, MODES, methods, param_groups
from cbp import cfs as model_cfs
from cbp import distributed as D
from cbp.checkpoint import load_into
from cbp.export import pack_model, weight_memory_mbit
from cbp.run import Run
from cbp.runtime import run_main
from cbp.trainer import Epoch

import engine
from q_model import Q_Conv_SNN


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pre-train")
    engine.add_common_args(p, lr=5e-3)
    p.add_argument("--quant", type=str, default="bin", choices=list(MODES))
    p.add_argument("--learning_rate_lambda", type=engine.positive_float, default=5e-4)
    p.add_argument("--period", type=engine.positive_int, default=20,
                   help="epochs without a lambda update before one is forced")
    p.add_argument("--init_from", type=str, default=None,
                   help="fp32 weights to start from (default ./trained_params/STBP_<dataset>_fp32_pretrained.pth)")
    methods.add_method_flag(p)
    return p.parse_args(argv)


def build_optimizer(model, args) -> torch.optim.Optimizer:
    groups = param_groups(model)
    spec = [{"params": groups[k], "lr": args.learning_rate} for k in ("qweight", "nqweight", "otherparam")]
    if args.opt == "adam":
        return torch.optim.Adam(spec)
    return torch.optim.SGD(spec, momentum=0.9)


def evaluate(args, model, test_dl, device, outs) -> None:
    path = methods.tagged(engine.prequantized_path(args.dataset, args.quant), args.method)
    cmd = (f"python main_quantize_cbp.py --dataset {args.dataset} --mode train --decay {args.decay} "
           f"--thresh {args.thresh} --lens {args.lens} --T {args.T} --quant {args.quant}"
           + (f" --width {args.width}" if args.width != 1.0 else "")
           + methods.flag(args.method))
    engine.require_file(path, "prequantized checkpoint",
                        f"download it from {engine.DRIVE} or produce it with: {cmd}")
    load_into(model, path, nonfinite="warn")
    (_, acc), _ = engine.test_with_metrics(model, test_dl, device, outs, not args.no_progress)
    print(f"Test Accuracy: {acc:.3f}")
    print(f"CFS: {model_cfs(model):.6g}  weight memory: {weight_memory_mbit(model):.4f} Mbit")


def main(argv=None) -> None:
    args = parse_args(argv)
    device, train_dl, test_dl, outs = engine.prepare(args)
    with D.collective():
        model = Q_Conv_SNN(outs, args.decay, args.thresh, args.lens, args.batch_size, args.T,
                           mode=args.quant, width=args.width).to(device)
    if args.mode == "eval":
        evaluate(args, model, test_dl, device, outs)
        return

    name = f"{args.dataset}_{args.method}_{args.quant}"
    out_dir, progress_dir = "./checkpoint", "./progress"
    last_path = f"{out_dir}/{name}_last.pth"
    pre_path = methods.tagged(engine.prequantized_path(args.dataset, args.quant), args.method)
    progress_path = f"{progress_dir}/{name}_progress.txt"
    outputs = [f"{out_dir}/{name}_best.pth", f"{out_dir}/{name}.pth", last_path, pre_path,
               f"{out_dir}/{name}_packed.pth", progress_path]
    identity = engine.identity(args, args.method, model)
    fp32 = args.init_from or engine.pretrained_path(args.dataset)
    with Run(identity, outputs, lr_flag="--learning_rate") as run:
        if not args.resume:
            with D.collective():
                engine.require_file(fp32, "pretrained fp32 checkpoint", f"download it from "
                                    f"{engine.DRIVE} or create it with: "
                                    f"{engine.fp32_command(args)}")
                load_into(model, fp32, allow_missing=(".scale",))
        train(args, model, train_dl, test_dl, device, outs, run, name)


class CBPTrainer(engine.STBPTrainer):
    """CBP: gradients clipped to ±1, latent weights clamped; the progress table (epoch,
    lagsum_pre, test acc %, CFS) and the reference's checkpoints."""

    clip = "value"

    def __init__(self, *a, name: str, **kw) -> None:
        self.name = name
        super().__init__(*a, **kw)

    def batch_totals(self, output, target, loss):
        return {"loss": loss.detach() / len(self.train_loader)}  # read back once an epoch

    def train_summary(self, st: Epoch) -> None:
        st.train_loss = st.totals["loss"]

    def on_decision(self, st: Epoch) -> None:
        d = st.decision
        print(f"Epoch {st.epoch + 1}/{self.epochs} ... lagsum, lagsum_pre = "
              f"{d.lagsum},{d.compared_to}")
        if d.updated:
            print(f"Lambda update start at {st.epoch} epoch")

    def report(self, st: Epoch) -> None:
        print(f"Epoch {st.epoch + 1}/{self.epochs} ... test_acc, cfs = {st.test_acc}, {st.cfs}")

    def initial_row(self):
        return [0.0, 0.0, 0.0, 0.0]

    def row(self, st: Epoch):
        return [st.epoch, st.lagsum_pre, st.test_acc, st.cfs]

    def reference_state(self, st: Epoch, state: dict) -> dict:
        ref = CBP.reference_entries(state["cbp"])
        return {"epoch": st.epoch, "net": state["model"], "optimizer1": state["optimizer"],
                **{k: ref[k] for k in ("optimizer2", "lamb", "period", "ucs", "g")},
                "progress": state["progress"]}

    def write(self, st: Epoch, full: dict) -> None:
        out = f"./checkpoint/{self.name}"
        self.run.write_table(f"./progress/{self.name}_progress.txt", self.rows)
        if st.improved:
            self.run.save(self.reference_state(st, full["trainer"]), f"{out}_best.pth")
            self.run.save(full["trainer"]["model"], methods.tagged(
                engine.prequantized_path(self.args.dataset, self.args.quant), self.args.method))
            self.run.save(pack_model(self.model), f"{out}_packed.pth")
        else:
            self.run.save(self.reference_state(st, full["trainer"]), f"{out}.pth")

    def after_epoch(self, st: Epoch) -> None:
        print(f"Best Test Accuracy : {self.best['acc']} at {self.best['epoch']} Epoch ...")

    def last_path(self) -> str:
        return f"./checkpoint/{self.name}_last.pth"


def train(args, model, train_dl, test_dl, device, outs, run: Run, name: str) -> None:
    optimizer = build_optimizer(model, args)
    # scales := mean|W_fp32| (on resume they are overwritten by the checkpoint's)
    cbp = methods.controller(args.method, model, args.learning_rate_lambda, period_max=args.period)
    trainer = CBPTrainer(model, optimizer, run=run, device=device, controller=cbp, args=args,
                         outs=outs, name=name,
                         logdirs={"main": f"./runs/{name}" if args.logdir is None
                                  else args.logdir})
    trainer.resume_from(args.resume)
    trainer.fit(train_dl, test_dl)


if __name__ == "__main__":
    run_main(main)
