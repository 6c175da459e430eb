"""Train the VGG ANN that is later converted to an SNN.

Examples (working directory = CBP-QSNN-SNN-Calibration/):
    python main_train_ann.py --dataset CIFAR10 --arch VGG16 --dpath ./datasets
    python main_train_ann.py --dataset CIFAR100 --arch VGG16 --dpath ./datasets
    python main_train_ann.py --dataset DIGITS --dpath . --device cpu --width 0.125 --usebn --epochs 10 --seed 0

The best epoch's weights are written as a plain state dict to
./trained_params/ANN_VGG16_<wBN|woBN>_<DATASET>[_w<width>]_ckpt.pth (what the calibration script
loads); ./logs/ANN_..._last.pth holds the full state for --resume.
"""

from __future__ import annotations

import argparse
import os
import time

import calib_engine as E
import torch

from cbp import distributed as D
from cbp.run import Run
from cbp.runtime import UserError, run_main, select_device
from cbp.trainer import Epoch

build_data = E.build_data  # the reference imports build_data from this module


class ANNTrainer(E.CETrainer):
    """ANN training: SGD with a cosine schedule; the best epoch's weights are the ANN file
    the calibration script converts."""

    def __init__(self, *a, save_path: str, last: str, **kw) -> None:
        self.save_path, self.last_file = save_path, last
        super().__init__(*a, **kw)
        self._running = 0.0

    def before_epoch(self, st: Epoch) -> None:
        self._running, self._start = 0.0, time.time()

    def batch_totals(self, output, target, loss):
        value = loss.item()
        self._running += value
        return {"loss": value * target.numel(), "n": target.numel()}

    def on_batch(self, index: int, st: Epoch) -> None:
        if (index + 1) % 40 == 0:
            print(f"Epoch [{st.epoch + 1}/{self.epochs}], Step [{index + 1}/"
                  f"{len(self.train_loader)}], Loss: {self._running:.5f}")
            self._running = 0.0
            print("Time elapsed:", time.time() - self._start)

    def on_decision(self, st: Epoch) -> None:
        print("Iters:", st.epoch)

    def evaluate(self, st: Epoch) -> None:
        st.test_acc = E.validate_model(self.test_loader, self.model, self.show)

    def update_best(self, st: Epoch) -> None:
        if st.improved:
            self.best.update(acc=st.test_acc, epoch=st.epoch + 1)

    def report(self, st: Epoch) -> None:
        print("best_acc is: ", self.best["acc"], " find in epoch: ", self.best["epoch"])
        print("\n")

    def write(self, st: Epoch, full: dict) -> None:
        if st.improved:
            self.run.save(full["trainer"]["model"], self.save_path)

    def last_path(self) -> str:
        return self.last_file


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="model parameters",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    E.add_common_args(p)
    p.add_argument("--learning_rate", default=None, type=E.positive_float,
                   help="initial learning rate (default: 0.01 without BN, 0.1 with BN)")
    p.add_argument("--epochs", default=300, type=E.nonneg_int, help="number of training epochs")
    p.add_argument("--wd", default=None, type=float,
                   help="weight decay (default: 1e-4 without BN, 5e-4 with BN)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = D.start(lambda: select_device(args.device), args.device)
    E.seed_all(args.seed)
    lr = args.learning_rate if args.learning_rate is not None else (0.1 if args.usebn else 0.01)
    wd = args.wd if args.wd is not None else (5e-4 if args.usebn else 1e-4)
    if wd < 0:
        raise UserError(f"--wd must be >= 0, got {wd}")
    print(args)
    print(f"use_bn={args.usebn} lr={lr} wd={wd}")
    with D.collective():
        train_loader, test_loader = E.loaders(args, device)
    train_loader, _ = D.split_loaders(train_loader, test_loader, args.seed)  # every rank tests on all
    save_path = E.ann_path(args)
    stem = os.path.basename(save_path).replace("_ckpt.pth", "")
    last_path = f"./logs/{stem}_last.pth"

    ann = E.build_ann(args).to(device)
    optimizer = torch.optim.SGD(ann.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, eta_min=0,
                                                           T_max=max(args.epochs, 1))
    identity = {"pipeline": "SNN-Calibration", "script": "ann", "dataset": args.dataset,
                "arch": args.arch, "usebn": bool(args.usebn), "width": float(args.width)}
    with Run(identity, [save_path, last_path], lr_flag="--learning_rate") as run:
        trainer = ANNTrainer(ann, optimizer, run=run, device=device, args=args,
                             scheduler=scheduler, save_path=save_path, last=last_path,
                             logdirs={"main": f"./runs/{stem}" if args.logdir is None
                                      else args.logdir})
        trainer.resume_from(args.resume)
        trainer.fit(train_loader, test_loader)
    print(f"best ANN weights: {save_path}")


if __name__ == "__main__":
    run_main(main)
