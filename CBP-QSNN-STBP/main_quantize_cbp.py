"""Quantize the pretrained STBP network with constrained backpropagation (CBP).

Examples (working directory = CBP-QSNN-STBP/):
    python main_quantize_cbp.py --dataset CIFAR10 --mode train --decay 0.25 --thresh 0.5 --lens 0.5 --T 8 --quant bin
    python main_quantize_cbp.py --dataset CIFAR10 --mode eval --decay 0.25 --thresh 0.5 --lens 0.5 --T 8 --quant ter
    python main_quantize_cbp.py --dataset CIFAR100 --mode train --decay 0.8 --thresh 0.5 --lens 0.5 --T 8 --quant bin

Reads ./trained_params/STBP_<dataset>_fp32_pretrained.pth; writes ./checkpoint/<dataset>_cbp_<q>[_best].pth,
./progress/<dataset>_cbp_<q>_progress.txt (epoch, lagsum_pre, test acc %, CFS), the best weights as a
plain state dict in ./trained_params/STBP_<dataset>_<q>_cbp_prequantized.pth (what --mode eval reads)
and the packed low-bit export ./checkpoint/<dataset>_cbp_<q>_packed.pth.
"""

from __future__ import annotations

import argparse

import torch

from cbp import CBP, MODES, clip_gradients, param_groups
from cbp import cfs as model_cfs
from cbp import distributed as D
from cbp.checkpoint import load_into
from cbp.export import pack_model, weight_memory_mbit
from cbp.run import Run
from cbp.runtime import (
    Scalars,
    progress,
    run_main,
    seed_everything,
)

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
    return p.parse_args(argv)


def build_optimizer(model, args) -> torch.optim.Optimizer:
    groups = param_groups(model)
    spec = [{"params": groups[k], "lr": args.learning_rate} for k in ("qweight", "nqweight", "otherparam")]
    if args.opt == "adam":
        return torch.optim.Adam(spec)
    return torch.optim.SGD(spec, momentum=0.9)


def evaluate(args, model, test_dl, device, outs) -> None:
    path = engine.prequantized_path(args.dataset, args.quant)
    cmd = (f"python main_quantize_cbp.py --dataset {args.dataset} --mode train --decay {args.decay} "
           f"--thresh {args.thresh} --lens {args.lens} --T {args.T} --quant {args.quant}"
           + (f" --width {args.width}" if args.width != 1.0 else ""))
    engine.require_file(path, "prequantized checkpoint",
                        f"download it from {engine.DRIVE} or produce it with: {cmd}")
    load_into(model, path, nonfinite="warn")
    (_, acc), _ = engine.test_with_metrics(model, test_dl, device, outs, not args.no_progress)
    print(f"Test Accuracy: {acc:.3f}")
    print(f"CFS: {model_cfs(model):.6g}  weight memory: {weight_memory_mbit(model):.4f} Mbit")


def main(argv=None) -> None:
    args = parse_args(argv)
    device = engine.setup(args)
    print(args)
    seed_everything(args.seed)
    with D.collective():
        train_dl, test_dl, outs = engine.loaders(args)
        model = Q_Conv_SNN(outs, args.decay, args.thresh, args.lens, args.batch_size, args.T,
                           mode=args.quant, width=args.width).to(device)
    if args.mode == "eval":
        evaluate(args, model, test_dl, device, outs)
        return

    name = f"{args.dataset}_cbp_{args.quant}"
    out_dir, progress_dir = "./checkpoint", "./progress"
    last_path = f"{out_dir}/{name}_last.pth"
    pre_path = engine.prequantized_path(args.dataset, args.quant)
    progress_path = f"{progress_dir}/{name}_progress.txt"
    outputs = [f"{out_dir}/{name}_best.pth", f"{out_dir}/{name}.pth", last_path, pre_path,
               f"{out_dir}/{name}_packed.pth", progress_path]
    identity = engine.identity(args, "cbp", model)
    fp32 = args.init_from or engine.pretrained_path(args.dataset)
    with Run(identity, outputs, lr_flag="--learning_rate") as run:
        state = None
        with D.collective():
            if args.resume:
                path = last_path if args.resume == "auto" else args.resume
                state = run.resume(path, last_hint=f"resume from {last_path}")
                load_into(model, state)
                print(f"resuming from {path}")
            else:
                engine.require_file(fp32, "pretrained fp32 checkpoint", f"download it from "
                                    f"{engine.DRIVE} or create it with: "
                                    f"{engine.fp32_command(args)}")
                load_into(model, fp32, allow_missing=(".scale",))
        train(args, model, train_dl, test_dl, device, outs, run, state, name, progress_path)


def train(args, model, train_dl, test_dl, device, outs, run: Run, state, name: str,
          progress_path: str) -> None:
    out_dir = "./checkpoint"
    pre_path = engine.prequantized_path(args.dataset, args.quant)
    show = not args.no_progress
    optimizer = build_optimizer(model, args)
    # scales := mean|W_fp32| (on resume they are overwritten by the checkpoint's)
    cbp = CBP(model, args.learning_rate_lambda, period_max=args.period,
              init_scales=state is None)
    rows = [[0.0, 0.0, 0.0, 0.0]]
    best_acc, best_epoch, start_epoch = 0.0, 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer1"])
        cbp.load_checkpoint_entries(state)
        run.restore_rng(state["rng"])
        rows = state["progress"].tolist()
        best_acc, best_epoch = float(state["best_acc"]), int(state["best_epoch"])
        start_epoch = int(state["epoch"]) + 1
        print(f"resumed at epoch {start_epoch + 1}")
    else:
        cbp.start()  # initial lambda update with ucs = 0

    tb = Scalars((f"./runs/{name}" if args.logdir is None else args.logdir) if run.main else None)
    net = D.ddp(model)
    for epoch in range(start_epoch, args.num_epochs):
        D.set_epoch(train_dl, epoch)
        model.train()
        loss_train = 0.0
        for i, (images, labels) in enumerate(progress(train_dl, f"epoch {epoch + 1}",
                                                      enabled=show)):
            model.zero_grad()
            optimizer.zero_grad()
            images, labels = images.to(device), labels.to(device)
            loss = engine.mse_onehot(net(images), labels, outs)
            lag = cbp.lagrangian(loss)
            run.check_loss(lag, epoch, i)
            loss_train = loss_train + loss.detach() / len(train_dl)
            lag.backward()
            clip_gradients(model.parameters(), 1.0)
            optimizer.step()
            cbp.clamp_()
        decision = cbp.end_epoch(optimizer)
        run.check_epoch(model, epoch, decision.lagsum)
        print(f"Epoch {epoch + 1}/{args.num_epochs} ... lagsum, lagsum_pre = "
              f"{decision.lagsum},{decision.compared_to}")
        if decision.updated:
            print(f"Lambda update start at {epoch} epoch")
        _, acc = engine.test(model, test_dl, device, outs, show)
        cfs = cbp.cfs()
        print(f"Epoch {epoch + 1}/{args.num_epochs} ... test_acc, cfs = {acc}, {cfs}")
        rows.append([epoch, cbp.lagsum_pre, acc, cfs])
        for tag, value in (("loss/train", float(loss_train)), ("lagsum", decision.lagsum),
                           ("accuracy/test", acc), ("cfs", cfs), ("g", cbp.g), ("ucs", cbp.ucs),
                           ("lambda/mean", cbp.lambda_mean()), ("lr", optimizer.param_groups[0]["lr"])):
            tb.add(tag, value, epoch)
        improved = acc > best_acc
        if improved:
            best_acc, best_epoch = acc, epoch
        entries = cbp.checkpoint_entries()
        state = {  # the reference's keys
            "epoch": epoch,
            "net": model.state_dict(),
            "optimizer1": optimizer.state_dict(),
            **{k: entries[k] for k in ("optimizer2", "lamb", "period", "ucs", "g")},
            "progress": torch.tensor(rows, dtype=torch.float64),
        }
        rng = run.rng_state()  # every rank's (a collective: outside the writes)
        with run.writes():
            run.write_table(progress_path, rows)
            if improved:
                run.save(state, f"{out_dir}/{name}_best.pth")
                run.save(model.state_dict(), pre_path)
                run.save(pack_model(model), f"{out_dir}/{name}_packed.pth")
            else:
                run.save(state, f"{out_dir}/{name}.pth")
            # the training state last: a run killed before it redoes this epoch on resume
            run.save(run.checkpoint({**state, **entries, "best_acc": best_acc,
                                     "best_epoch": best_epoch, "rng": rng}),
                     f"{out_dir}/{name}_last.pth")
        print(f"Best Test Accuracy : {best_acc} at {best_epoch} Epoch ...")
    tb.close()
    run.finish(model, cbp)


if __name__ == "__main__":
    run_main(main)
