"""Quantize the pretrained TSSL-BP network with constrained backpropagation (CBP), or evaluate
a quantized one.

Examples (working directory = CBP-QSNN-TSSL-BP/):
    python main_quantize_cbp.py -config Networks/CIFAR10_bin.yaml -mode train
    python main_quantize_cbp.py -config Networks/CIFAR10_ter.yaml -mode eval
    python main_quantize_cbp.py -config Networks/DIGITS_bin.yaml -mode train -quant 1bit

Reads ./trained_params/TSSL_BP_<DS>_fp32_pretrained.pth (train; and eval of files without
stored scales).  Writes ./logs/<DS>_<q>_<mode>.log, ./progress/<DS>_<q>.txt (epoch, test acc %,
CFS; first row zeros), ./progress/<DS>_<q>_<e>.pth every 40 epochs, ./checkpoint/<DS>_<q>.pth
(best: net, accuracy, epoch) and its bit-packed export <DS>_<q>_packed.pth,
./checkpoint/<DS>_<q>_last.pth (resume with -checkpoint) and the
best weights with their scales in ./trained_params/TSSL_BP_<DS>_<q>_cbp_prequantized.pth, the
file -mode eval reads.
"""

from __future__ import annotations

import argparse
import os

import torch
from cnns import Network

from cbp import CBP, MODES, cfs
from cbp import distributed as D
from cbp.checkpoint import check_finite, extract_state_dict, load_file
from cbp.export import pack_state_dict
from cbp.run import Run
from cbp.runtime import Scalars, UserError, run_main, seed_everything

import engine
from functions import loss_f

PERIOD_MAX = 20
SAVE_EVERY = 40


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="CBP quantization of a TSSL-BP network")
    engine.add_common_args(p)
    p.add_argument("-quant", type=str, default=None, choices=list(MODES),
                   help="quantization mode, overrides Network.mode of the config")
    p.add_argument("-lr_lambda", type=engine.positive_float, default=None,
                   help="override Network.lr_lambda")
    p.add_argument("-init_from", type=str, default=None,
                   help="fp32 weights to start from (default "
                        "./trained_params/TSSL_BP_<DS>_fp32_pretrained.pth)")
    return p.parse_args(argv)


def fp32_hint(args) -> str:
    return f"download it from {engine.DRIVE} or create it with: " \
           f"python main_train_fp32.py -config {args.config}"


def load_fp32_scales(net: Network, path: str, hint: str) -> None:
    """Load the fp32 weights and set every scale to mean |W_fp32| (the reference's start-up)."""
    engine.require_file(path, "pretrained fp32 checkpoint", hint)
    state = extract_state_dict(load_file(path))
    check_finite(state, path)
    engine.load_weights(net, state, path)
    net.set_scales(None)


def evaluate(args, params, net: Network, test_dl, device, dataset: str, log) -> float:
    mode = params["Network"]["mode"]
    path = args.checkpoint or engine.prequantized_path(params["Network"]["dataset"], mode)
    cmd = f"python main_quantize_cbp.py -config {args.config} -mode train"
    engine.require_file(path, "prequantized checkpoint",
                        f"download it from {engine.DRIVE} or produce it with: {cmd}")
    obj = load_file(path)
    state = extract_state_dict(obj)
    check_finite(state, path, "warn")
    _, scales = engine.split_state(state)
    if not scales and isinstance(obj, dict) and isinstance(obj.get("scales"), dict):
        scales = dict(obj["scales"])  # a full training checkpoint (_last.pth, progress/*.pth)
    if not scales:  # authors' files: scales come from the fp32 weights, as in the reference
        load_fp32_scales(net, engine.pretrained_path(dataset),
                         f"{path} stores no scales, so they are recomputed from the fp32 "
                         f"weights; {fp32_hint(args)}")
    engine.load_weights(net, state, path)
    if scales:
        net.set_scales(scales)
    acc, _ = engine.test_with_metrics(net, test_dl, device, not args.no_progress,
                                      log=engine.echo(log))
    log.info("Test Accuracy: %.3f (%.3f).\n", acc, acc)
    print("Test Accuracy: ", acc)
    print(f"CFS: {cfs(net.quant_targets()):.6g}  weight memory: "
          f"{net.weight_memory_mbit():.4f} Mbit")
    return acc


def main(argv=None) -> None:
    args = parse_args(argv)
    os.makedirs("./logs", exist_ok=True)
    os.makedirs("./progress", exist_ok=True)
    dataset, tag = engine.config_names(args.config or "")
    params = engine.load_config(args.config, args.quant)
    net_cfg = params["Network"]
    mode = net_cfg.get("mode")
    if mode is None:
        raise UserError(f"{args.config}: Network.mode is null; set bin, ter, 1bit or 2bit "
                        "(or pass -quant)")
    quant = args.quant or tag or mode
    save_name = f"{dataset}_{quant}"
    log = engine.setup_logging(f"./logs/{save_name}_{args.mode}.log")
    log.info("start parsing settings")
    log.info("finish parsing settings")
    device = engine.setup_device(args)
    seed_everything(args.seed)
    if args.epochs is not None:
        net_cfg["epochs"] = args.epochs
    if args.lr is not None:
        net_cfg["lr"] = args.lr
    if args.lr_lambda is not None:
        net_cfg["lr_lambda"] = args.lr_lambda
    with D.collective():
        train_dl, test_dl = engine.loaders(net_cfg, args.workers, args.download)
        log.info("dataset loaded")
        net = engine.build(params, train_dl, device, quantize=True)
    if not net.q_layers_list:
        raise UserError(f"{args.config}: no layer has qtype q, nothing to quantize")
    show = not args.no_progress
    print(f"{save_name}: {len(net.my_parameters)} weights, {len(net.q_layers_list)} quantized "
          f"({net.param_size_total} values, mode {mode}), device {device}")

    if args.mode == "eval":
        evaluate(args, params, net, test_dl, device, dataset, log)
        return
    train(args, params, net, train_dl, test_dl, device, dataset, save_name, log, show)


def train(args, params, net: Network, train_dl, test_dl, device, dataset: str, save_name: str,
          log, show: bool) -> None:
    net_cfg = params["Network"]
    ds, mode = net_cfg["dataset"], net_cfg["mode"]
    epochs = int(net_cfg["epochs"])
    last_path = f"./checkpoint/{save_name}_last.pth"
    pre_path = engine.prequantized_path(ds, mode)
    progress_path = f"./progress/{ds}_{mode}.txt"
    snapshots = [f"./progress/{ds}_{mode}_{e}.pth" for e in range(0, epochs, SAVE_EVERY)]
    outputs = [last_path, pre_path, progress_path, f"./checkpoint/{save_name}.pth",
               f"./checkpoint/{save_name}_packed.pth", *snapshots]
    resume = engine.resume_path(args, last_path)
    with Run(engine.identity(params, "cbp", dataset), outputs, lr_flag="-lr") as run:
        state = None
        with D.collective():
            if resume:
                state = run.resume(resume, last_hint=f"resume from {last_path} or a "
                                   "./progress/*.pth snapshot")
                if "cbp" not in state and "lamb" not in state:
                    raise UserError(f"{resume} is not a CBP checkpoint; resume from "
                                    f"{last_path}")
                engine.load_weights(net, state["net"], resume)
                net.set_scales(state["scales"])
                print(f"resumed from {resume} at epoch {int(state['epoch']) + 1}")
            else:
                load_fp32_scales(net, args.init_from or engine.pretrained_path(dataset),
                                 fp32_hint(args))
        _train(args, net_cfg, net, train_dl, test_dl, device, save_name, log, show, run, state,
               last_path, pre_path, progress_path)


def _train(args, net_cfg, net: Network, train_dl, test_dl, device, save_name: str, log,
           show: bool, run: Run, state, last_path: str, pre_path: str,
           progress_path: str) -> None:
    ds, mode = net_cfg["dataset"], net_cfg["mode"]
    qweights = [net.my_parameters[i] for i in net.q_layers_list]
    optimizer = torch.optim.AdamW(qweights, lr=float(net_cfg["lr"]))
    ctl = CBP(net.quant_targets(), float(net_cfg.get("lr_lambda", 1e-4)),
              lambda_optimizer="adamw", period_max=int(net_cfg.get("period_max", PERIOD_MAX)),
              lr_decay_g=None, clamp=1.0, init_scales=False)
    rows = [[0.0, 0.0, 0.0]]
    best_acc, best_epoch, start = 0.0, 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        ctl.load_checkpoint_entries(state)
        rows = state["progress"].tolist()
        best_acc, best_epoch = float(state["best_acc"]), int(state["best_epoch"])
        start = int(state["epoch"]) + 1
        run.restore_rng(state["rng"])
    else:
        ctl.start()  # initial lambda update with ucs = 0

    loss_fn = loss_f.SpikeLoss(net_cfg)
    tb = Scalars((f"./runs/{save_name}" if args.logdir is None else args.logdir)
                 if run.main else None)
    max_train_acc, min_loss = 0.0, float("inf")
    for e in range(start, int(net_cfg["epochs"])):
        log.info("\nEpoch: %d", e)
        loss, train_acc = engine.train_epoch(net, train_dl, loss_fn, optimizer, device, e,
                                             cbp=ctl, run=run, show=show)
        max_train_acc, min_loss = max(max_train_acc, train_acc), min(min_loss, loss)
        log.info("Train Accuracy: %.3f (%.3f). Loss: %.3f (%.3f)\n", train_acc, max_train_acc,
                 loss, min_loss)
        decision = ctl.end_epoch(optimizer)
        run.check_epoch(net, e, decision.lagsum)
        log.info("Epoch %d... // lagsum, lagsum_pre = %s, %s", e, decision.lagsum,
                 decision.compared_to)
        if decision.updated:
            log.info("lambda update ....")
        acc = engine.test(net, test_dl, device, show)
        improved = acc >= best_acc
        if acc > best_acc:
            best_acc, best_epoch = acc, e
        log.info("Test Accuracy: %.3f (%.3f).\n", acc, best_acc)
        cfs_value = ctl.cfs()
        rows.append([float(e), acc, cfs_value])
        print(f"epoch {e}: loss {loss:.4f} train {train_acc:.2f}% test {acc:.2f}% "
              f"(best {best_acc:.2f}% @ {best_epoch}) lagsum {decision.lagsum:.6g} "
              f"g {ctl.g} ucs {ctl.ucs:.3f} CFS {cfs_value:.6g}"
              + (" lambda update" if decision.updated else ""))
        for name, value in (("loss/train", loss), ("accuracy/train", train_acc),
                            ("accuracy/test", acc), ("lagsum", decision.lagsum), ("cfs", cfs_value),
                            ("g", ctl.g), ("ucs", ctl.ucs), ("lambda/mean", ctl.lambda_mean())):
            tb.add(name, value, e)
        full = run.checkpoint({
            "net": net.state_dict(), "scales": net.scales(), "epoch": e,
            "optimizer": optimizer.state_dict(), **ctl.checkpoint_entries(),
            "progress": torch.tensor(rows, dtype=torch.float64),
            "best_acc": best_acc, "best_epoch": best_epoch, "rng": run.rng_state(),
        })
        with run.writes():
            run.write_table(progress_path, rows)
            weights = {**net.state_dict(), **net.scales()}
            if improved:  # ties save too, as the reference's early stopping does
                run.save({"net": weights, "accuracy": acc, "epoch": e},
                         f"./checkpoint/{save_name}.pth")
                run.save(weights, pre_path)
                spec = {t.name: (t.scale, t.mode) for t in ctl.targets}
                run.save(pack_state_dict(net.state_dict(), spec),
                         f"./checkpoint/{save_name}_packed.pth")
            if e % SAVE_EVERY == 0:
                run.save({**full, "model_state_dict": net.state_dict(),
                          "scale": [lay.scale.detach().clone() for lay in net.q_layers]},
                         f"./progress/{ds}_{mode}_{e}.pth")
            # the training state last: a run killed before it redoes this epoch on resume
            run.save(full, last_path)
    tb.close()
    run.finish(net, ctl)
    log.info("Best Accuracy: %.3f, at epoch: %d \n", best_acc, best_epoch)
    print(f"Best Accuracy: {best_acc:.3f} at epoch {best_epoch}; weights in {pre_path}")


if __name__ == "__main__":
    run_main(main)
