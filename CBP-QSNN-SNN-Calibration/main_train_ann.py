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
from torch import nn

from cbp import distributed as D
from cbp.checkpoint import extract_state_dict, load_into
from cbp.run import Run
from cbp.runtime import (
    Scalars,
    UserError,
    progress,
    run_main,
    select_device,
)

build_data = E.build_data  # the reference imports build_data from this module


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
    show = not args.no_progress
    save_path = E.ann_path(args)
    stem = os.path.basename(save_path).replace("_ckpt.pth", "")
    last_path = f"./logs/{stem}_last.pth"

    ann = E.build_ann(args).to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(ann.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, eta_min=0,
                                                           T_max=max(args.epochs, 1))
    identity = {"pipeline": "SNN-Calibration", "script": "ann", "dataset": args.dataset,
                "arch": args.arch, "usebn": bool(args.usebn), "width": float(args.width)}
    with Run(identity, [save_path, last_path], lr_flag="--learning_rate") as run:
        best_acc, best_epoch, start_epoch = 0.0, 0, 0
        if args.resume:
            path = last_path if args.resume == "auto" else args.resume
            with D.collective():
                state = run.resume(path, last_hint=f"resume from {last_path}")
                load_into(ann, extract_state_dict(state))
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            best_acc, best_epoch = float(state["best_acc"]), int(state["best_epoch"])
            start_epoch = int(state["epoch"]) + 1
            run.restore_rng(state["rng"])
            print(f"resumed from {path} at epoch {start_epoch}")

        tb = Scalars((f"./runs/{stem}" if args.logdir is None else args.logdir)
                     if run.main else None)
        net = D.ddp(ann)
        for epoch in range(start_epoch, args.epochs):
            running_loss, start = 0.0, time.time()
            D.set_epoch(train_loader, epoch)
            ann.train()
            seen, total_loss = 0, 0.0
            for i, (images, labels) in enumerate(progress(train_loader, f"epoch {epoch + 1}",
                                                          enabled=show)):
                optimizer.zero_grad()
                images, labels = images.to(device), labels.to(device)
                loss = criterion(net(images), labels)
                run.check_loss(loss, epoch, i)
                running_loss += loss.item()
                total_loss += loss.item() * labels.numel()
                seen += labels.numel()
                loss.backward()
                optimizer.step()
                if (i + 1) % 40 == 0:
                    print(f"Epoch [{epoch + 1}/{args.epochs}], Step [{i + 1}/{len(train_loader)}], "
                          f"Loss: {running_loss:.5f}")
                    running_loss = 0.0
                    print("Time elapsed:", time.time() - start)
            run.check_epoch(ann, epoch)
            scheduler.step()
            print("Iters:", epoch)
            acc = E.validate_model(test_loader, ann, show)
            improved = acc > best_acc
            if improved:
                best_acc, best_epoch = acc, epoch + 1
            print("best_acc is: ", best_acc, " find in epoch: ", best_epoch)
            print("\n")
            tb.add("loss/train", total_loss / max(seen, 1), epoch)
            tb.add("accuracy/test", acc, epoch)
            tb.add("lr", optimizer.param_groups[0]["lr"], epoch)
            rng = run.rng_state()  # every rank's (a collective: outside the writes)
            with run.writes():
                if improved:
                    run.save(ann.state_dict(), save_path)
                # the training state last: a run killed before it redoes this epoch on resume
                run.save(run.checkpoint({
                    "epoch": epoch, "net": ann.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "best_acc": best_acc,
                    "best_epoch": best_epoch, "rng": rng}), last_path)
        tb.close()
        run.finish(ann)
    print(f"best ANN weights: {save_path}")


if __name__ == "__main__":
    run_main(main)
