"""FP32 pre-training of the 7Conv,3FC STBP network.

Examples (working directory = CBP-QSNN-STBP/):
    python main_train_fp32.py --dataset CIFAR10 --mode train --decay 0.25 --thresh 0.5 --lens 0.5 --T 8
    python main_train_fp32.py --dataset CIFAR100 --mode train --decay 0.8 --thresh 0.5 --lens 0.5 --T 8
    python main_train_fp32.py --dataset DIGITS --T 4 --width 0.0625 --num_epochs 10 --learning_rate 0.1

The best epoch's weights are also written as a plain state dict to
./trained_params/STBP_<dataset>_fp32_pretrained.pth, the file main_quantize_cbp.py loads.
"""

from __future__ import annotations

import argparse

import torch

from cbp.checkpoint import load_into
from cbp.run import Run
from cbp.runtime import run_main
from cbp.trainer import Epoch

import engine
from model import Conv_SNN, scale_init


class FP32Trainer(engine.STBPTrainer):
    """fp32 pre-training: no clipping, learning rate x0.1 at every 45th epoch; the best epoch
    goes to ``<dataset>_best.pth`` and the pretrained-weights file, the others to
    ``<dataset>.pth`` (the reference's files)."""

    HISTORY = ("loss_train_hist", "loss_test_hist", "test_acc_hist")

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.history = {k: [] for k in self.HISTORY}
        self._running = 0.0

    def batch_totals(self, output, target, loss):
        share = loss.item() / len(self.train_loader)  # the reference's running mean
        self._running += share
        return {"loss": share}

    def train_summary(self, st: Epoch) -> None:
        st.train_loss = st.totals["loss"]

    def on_batch(self, index: int, st: Epoch) -> None:
        if (index + 1) % 100 == 0:
            print(f"{int(index + 1)} iterations ... running train loss:{self._running}")
            self._running = 0.0

    def after_train(self, st: Epoch) -> None:
        self._running = 0.0

    def schedule(self, st: Epoch) -> None:
        if st.epoch % 45 == 0 and st.epoch > 1:
            for group in self.optimizer.param_groups:
                group["lr"] *= 0.1

    def evaluate(self, st: Epoch) -> None:
        super().evaluate(st)
        for key, value in zip(self.HISTORY, (st.train_loss, st.test_loss, st.test_acc)):
            self.history[key].append(value)

    def scalars(self, st: Epoch):
        return {"main": {"loss/train": st.train_loss, "loss/test": st.test_loss,
                         "accuracy/test": st.test_acc,
                         "lr": self.optimizer.param_groups[0]["lr"]}}

    def report(self, st: Epoch) -> None:
        print(f"Epoch: {st.epoch + 1}/{self.epochs}.. ",
              "Learning_rate: {}.. ".format(self.optimizer.param_groups[0]["lr"]),
              f"Loss train: {st.train_loss:.5f}.. ",
              f"Loss test: {st.test_loss:.5f}.. ",
              f"Test Acc: {st.test_acc}..")

    def reference_state(self, st: Epoch, state: dict) -> dict:
        return {"epoch": st.epoch, "net": state["model"], "optimizer": state["optimizer"],
                **state["history"]}

    def write(self, st: Epoch, full: dict) -> None:
        ref = self.reference_state(st, full["trainer"])
        name = f"./checkpoint/{self.args.dataset}"
        if st.improved:
            self.run.save(ref, f"{name}_best.pth")
            self.run.save(full["trainer"]["model"], engine.pretrained_path(self.args.dataset))
        else:
            self.run.save(ref, f"{name}.pth")

    def last_path(self) -> str:
        return f"./checkpoint/{self.args.dataset}_last.pth"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pre-train")
    engine.add_common_args(p, lr=0.3)
    p.add_argument("--init_gain", type=engine.positive_float, default=1.0,
                   help="scale the initial weights (1.0 = PyTorch default init, as the reference)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device, train_dl, test_dl, outs = engine.prepare(args)
    model = Conv_SNN(outs, args.decay, args.thresh, args.lens, args.batch_size, args.T, args.width).to(device)
    scale_init(model, args.init_gain)
    show = not args.no_progress

    if args.mode == "eval":
        path = engine.pretrained_path(args.dataset)
        engine.require_file(path, "pretrained fp32 checkpoint",
                            f"download it from {engine.DRIVE} or create it with: {engine.fp32_command(args)}")
        load_into(model, path, nonfinite="warn")
        (loss_test, acc), _ = engine.test_with_metrics(model, test_dl, device, outs, show)
        print(f"Test Loss: {loss_test:.5f}.. ", f"Test Accuracy: {acc:.3f}")
        return

    if args.opt == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=0.9)

    out_dir = "./checkpoint"
    last_path = f"{out_dir}/{args.dataset}_last.pth"
    pre_path = engine.pretrained_path(args.dataset)
    outputs = [f"{out_dir}/{args.dataset}_best.pth", f"{out_dir}/{args.dataset}.pth", last_path,
               pre_path]
    with Run(engine.identity(args, "fp32", model), outputs,
             lr_flag="--learning_rate") as run:
        trainer = FP32Trainer(model, optimizer, run=run, device=device, args=args, outs=outs,
                              logdirs={"main": f"./runs/{args.dataset}_fp32"
                                       if args.logdir is None else args.logdir})
        trainer.resume_from(args.resume)
        trainer.fit(train_dl, test_dl)
    best_acc = trainer.best["acc"]
    print(f"Best Test Accuracy : {best_acc}; pretrained weights in {pre_path}")


if __name__ == "__main__":
    run_main(main)
