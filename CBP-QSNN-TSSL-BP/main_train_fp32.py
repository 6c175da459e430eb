"""FP32 training of the TSSL-BP network (the pre-training CBP starts from).

Examples (working directory = CBP-QSNN-TSSL-BP/):
    python main_train_fp32.py -config Networks/CIFAR10_bin.yaml -epochs 150
    python main_train_fp32.py -config Networks/DIGITS_bin.yaml
    python main_train_fp32.py -config Networks/CIFAR10_bin.yaml -mode eval

The quantization keys of the config are ignored: every layer is fp32.  All weights are trained
with AdamW (lr Network.lr unless Network.lr_fp32 or -lr is given), gradient norm clipped to 1,
weights clamped to [-4, 4].  The best epoch (test accuracy >= the best so far) is written as a
bare state dict to ./trained_params/TSSL_BP_<DS>_fp32_pretrained.pth, the file
main_quantize_cbp.py loads, and as {net, loss (= test acc %), epoch} to
./checkpoint/<DS>_fp32.pth; ./checkpoint/<DS>_fp32_last.pth allows -checkpoint resume.
"""

from __future__ import annotations

import argparse

import torch

from cbp import distributed as D
from cbp.checkpoint import check_finite, extract_state_dict, load_file
from cbp.run import Run
from cbp.runtime import Scalars, UserError, run_main, seed_everything

import engine
from functions import loss_f


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="FP32 training of a TSSL-BP network")
    engine.add_common_args(p)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    dataset, _ = engine.config_names(args.config or "")
    params = engine.load_config(args.config)
    net_cfg = params["Network"]
    name = f"{dataset}_fp32"
    log = engine.setup_logging(f"./logs/{name}_{args.mode}.log")
    device = engine.setup_device(args)
    seed_everything(args.seed)
    epochs = int(net_cfg.get("epochs_fp32", net_cfg["epochs"])) if args.epochs is None \
        else args.epochs
    lr = args.lr or float(net_cfg.get("lr_fp32", net_cfg["lr"]))
    with D.collective():
        train_dl, test_dl = engine.loaders(net_cfg, args.workers, args.download)
        net = engine.build(params, train_dl, device, quantize=False)
    show = not args.no_progress
    pre_path = engine.pretrained_path(dataset)

    if args.mode == "eval":
        path = args.checkpoint or pre_path
        engine.require_file(path, "fp32 checkpoint",
                            f"create it with: python main_train_fp32.py -config {args.config}")
        state = extract_state_dict(load_file(path))
        check_finite(state, path, "warn")
        engine.load_weights(net, state, path)
        acc, _ = engine.test_with_metrics(net, test_dl, device, show, log=engine.echo(log))
        log.info("Test Accuracy: %.3f", acc)
        print("Test Accuracy: ", acc)
        return

    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    last_path = f"./checkpoint/{name}_last.pth"
    outputs = [last_path, pre_path, f"./checkpoint/{name}.pth"]
    resume = engine.resume_path(args, last_path)
    with Run(engine.identity(params, "fp32", dataset), outputs, lr_flag="-lr") as run:
        best_acc, best_epoch, start = 0.0, 0, 0
        if resume:
            with D.collective():
                state = run.resume(resume, last_hint=f"resume from {last_path}")
                engine.load_weights(net, extract_state_dict(state), resume)
            optimizer.load_state_dict(state["optimizer"])
            best_acc, best_epoch = float(state["best_acc"]), int(state["best_epoch"])
            start = int(state["epoch"]) + 1
            run.restore_rng(state["rng"])
            print(f"resumed from {resume} at epoch {start}")
        if epochs <= start:
            raise UserError(f"nothing to do: {epochs} epochs, starting at epoch {start}")
        loss_fn = loss_f.SpikeLoss(net_cfg)
        tb = Scalars((f"./runs/{name}" if args.logdir is None else args.logdir)
                     if run.main else None)
        for e in range(start, epochs):
            log.info("\nEpoch: %d", e)
            loss, train_acc = engine.train_epoch(net, train_dl, loss_fn, optimizer, device, e,
                                                 run=run, show=show)
            run.check_epoch(net, e)
            acc = engine.test(net, test_dl, device, show)
            improved = acc >= best_acc
            if acc > best_acc:
                best_acc, best_epoch = acc, e
            log.info("Train Accuracy: %.3f. Loss: %.3f", train_acc, loss)
            log.info("Test Accuracy: %.3f (%.3f).", acc, best_acc)
            print(f"epoch {e}: loss {loss:.4f} train {train_acc:.2f}% test {acc:.2f}% "
                  f"(best {best_acc:.2f}% @ {best_epoch})")
            tb.add("loss/train", loss, e)
            tb.add("accuracy/train", train_acc, e)
            tb.add("accuracy/test", acc, e)
            rng = run.rng_state()  # every rank's (a collective: outside the writes)
            with run.writes():
                if improved:
                    run.save({"net": net.state_dict(), "loss": acc, "epoch": e},
                             f"./checkpoint/{name}.pth")
                    run.save(net.state_dict(), pre_path)
                # the training state last: a run killed before it redoes this epoch on resume
                run.save(run.checkpoint({"net": net.state_dict(), "optimizer": optimizer.state_dict(),
                                         "epoch": e, "best_acc": best_acc, "best_epoch": best_epoch,
                                         "rng": rng}), last_path)
        tb.close()
        run.finish(net)
    log.info("Best Accuracy: %.3f, at epoch: %d", best_acc, best_epoch)
    print(f"Best Accuracy: {best_acc:.3f} at epoch {best_epoch}; weights in {pre_path}")


if __name__ == "__main__":
    run_main(main)
