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

from cbp import distributed as D
from cbp.checkpoint import load_into
from cbp.run import Run
from cbp.runtime import (
    Scalars,
    progress,
    run_main,
    seed_everything,
)

import engine
from model import Conv_SNN, scale_init


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pre-train")
    engine.add_common_args(p, lr=0.3)
    p.add_argument("--init_gain", type=engine.positive_float, default=1.0,
                   help="scale the initial weights (1.0 = PyTorch default init, as the reference)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = engine.setup(args)
    print(args)
    seed_everything(args.seed)
    with D.collective():
        train_dl, test_dl, outs = engine.loaders(args)
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
        best_acc, start_epoch = 0.0, 0
        hist = {"loss_train_hist": [], "loss_test_hist": [], "test_acc_hist": []}
        if args.resume:
            path = last_path if args.resume == "auto" else args.resume
            with D.collective():
                state = run.resume(path, last_hint=f"resume from {last_path}")
                load_into(model, state)
            optimizer.load_state_dict(state["optimizer"])
            run.restore_rng(state["rng"])
            best_acc, start_epoch = float(state["best_acc"]), int(state["epoch"]) + 1
            hist = {k: list(state[k]) for k in hist}
            print(f"resumed from {path} at epoch {start_epoch + 1}")

        logdir = f"./runs/{args.dataset}_fp32" if args.logdir is None else args.logdir
        tb = Scalars(logdir if run.main else None)
        net = D.ddp(model)
        for epoch in range(start_epoch, args.num_epochs):
            D.set_epoch(train_dl, epoch)
            model.train()
            running_loss, loss_train = 0.0, 0.0
            for i, (images, labels) in enumerate(progress(train_dl, f"epoch {epoch + 1}",
                                                          enabled=show)):
                model.zero_grad()
                optimizer.zero_grad()
                images, labels = images.to(device), labels.to(device)
                loss = engine.mse_onehot(net(images), labels, outs)
                run.check_loss(loss, epoch, i)
                running_loss += loss.item() / len(train_dl)
                loss_train += loss.item() / len(train_dl)
                if (i + 1) % 100 == 0:
                    print(f"{int(i + 1)} iterations ... running train loss:{running_loss}")
                    running_loss = 0
                loss.backward()
                optimizer.step()
            run.check_epoch(model, epoch)
            if epoch % 45 == 0 and epoch > 1:
                for group in optimizer.param_groups:
                    group["lr"] *= 0.1
            loss_test, acc = engine.test(model, test_dl, device, outs, show)
            hist["test_acc_hist"].append(acc)
            hist["loss_train_hist"].append(loss_train)
            hist["loss_test_hist"].append(loss_test)
            print(f"Epoch: {epoch + 1}/{args.num_epochs}.. ",
                  "Learning_rate: {}.. ".format(optimizer.param_groups[0]["lr"]),
                  f"Loss train: {loss_train:.5f}.. ",
                  f"Loss test: {loss_test:.5f}.. ",
                  f"Test Acc: {acc}..")
            tb.add("loss/train", loss_train, epoch)
            tb.add("loss/test", loss_test, epoch)
            tb.add("accuracy/test", acc, epoch)
            tb.add("lr", optimizer.param_groups[0]["lr"], epoch)
            improved = acc > best_acc
            best_acc = max(best_acc, acc)
            state = {"epoch": epoch, "net": model.state_dict(),
                     "optimizer": optimizer.state_dict(), **hist}
            rng = run.rng_state()  # every rank's (a collective: outside the writes)
            with run.writes():
                if improved:
                    run.save(state, f"{out_dir}/{args.dataset}_best.pth")
                    run.save(model.state_dict(), pre_path)
                else:
                    run.save(state, f"{out_dir}/{args.dataset}.pth")
                # the training state last: a run killed before it redoes this epoch on resume
                run.save(run.checkpoint({**state, "best_acc": best_acc, "rng": rng}),
                         last_path)
        tb.close()
        run.finish(model)
    print(f"Best Test Accuracy : {best_acc}; pretrained weights in {pre_path}")


if __name__ == "__main__":
    run_main(main)
