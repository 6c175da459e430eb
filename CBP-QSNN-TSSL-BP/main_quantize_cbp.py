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
file -mode eval reads.  -method ste / ptq runs a baseline instead (cbp.methods): its files
carry the method (<DS>_<q>_ste.pth, TSSL_BP_<DS>_<q>_ste_prequantized.pth, ...).
"""

from __future__ import annotations

import argparse
import os

import torch
from cnns import Network

from cbp import CBP, MODES, cfs, methods
from cbp import distributed as D
from cbp.export import pack_state_dict
from cbp.run import Run
from cbp.runtime import UserError, run_main, seed_everything
from cbp.trainer import Epoch

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
    methods.add_method_flag(p, "-")
    return p.parse_args(argv)


fp32_hint = engine.fp32_hint
load_fp32_scales = engine.load_fp32_scales


def evaluate(args, params, net: Network, test_dl, device, dataset: str, log) -> float:
    engine.load_prequantized(net, args, params, dataset)
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
    save_name = f"{dataset}_{quant}{methods.suffix(args.method)}"
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
    print(f"{save_name}: {len(net.my_parameters)} weights, {len(net.q_layers_list)} quantized "
          f"({net.param_size_total} values, mode {mode}), device {device}")

    if args.mode == "eval":
        evaluate(args, params, net, test_dl, device, dataset, log)
        return
    train(args, params, net, train_dl, test_dl, device, dataset, save_name, log)


def train(args, params, net: Network, train_dl, test_dl, device, dataset: str, save_name: str,
          log) -> None:
    net_cfg = params["Network"]
    ds, mode = net_cfg["dataset"], net_cfg["mode"]
    epochs = int(net_cfg["epochs"])
    last_path = f"./checkpoint/{save_name}_last.pth"
    pre_path = methods.tagged(engine.prequantized_path(ds, mode), args.method)
    stem = f"./progress/{ds}_{mode}{methods.suffix(args.method)}"
    progress_path = f"{stem}.txt"
    snapshots = [f"{stem}_{e}.pth" for e in range(0, epochs, SAVE_EVERY)]
    outputs = [last_path, pre_path, progress_path, f"./checkpoint/{save_name}.pth",
               f"./checkpoint/{save_name}_packed.pth", *snapshots]
    resume = engine.resume_path(args, last_path)
    with Run(engine.identity(params, args.method, dataset), outputs, lr_flag="-lr") as run:
        if not resume:
            with D.collective():
                load_fp32_scales(net, args.init_from or engine.pretrained_path(dataset),
                                 fp32_hint(args))
        _train(args, net_cfg, net, train_dl, test_dl, device, save_name, log, run, resume,
               pre_path, stem)


class CBPTrainer(engine.TSSLTrainer):
    """CBP on the quantized layers: the progress table (epoch, test acc %, CFS), the best
    epoch's checkpoint, weights and packed export, a snapshot every ``SAVE_EVERY`` epochs."""

    def __init__(self, *a, save_name: str, net_cfg, pre_path: str, stem: str, **kw) -> None:
        self.save_name, self.pre_path, self.stem = save_name, pre_path, stem
        super().__init__(*a, **kw)
        self.max_train_acc, self.min_loss = 0.0, float("inf")

    def before_epoch(self, st: Epoch) -> None:
        self.log.info("\nEpoch: %d", st.epoch)

    def after_train(self, st: Epoch) -> None:
        self.max_train_acc = max(self.max_train_acc, st.train_acc)
        self.min_loss = min(self.min_loss, st.train_loss)
        self.log.info("Train Accuracy: %.3f (%.3f). Loss: %.3f (%.3f)\n", st.train_acc,
                      self.max_train_acc, st.train_loss, self.min_loss)

    def on_decision(self, st: Epoch) -> None:
        self.log.info("Epoch %d... // lagsum, lagsum_pre = %s, %s", st.epoch, st.lagsum,
                      st.decision.compared_to)
        if st.decision.updated:
            self.log.info("lambda update ....")

    def initial_row(self):
        return [0.0, 0.0, 0.0]

    def row(self, st: Epoch):
        return [float(st.epoch), st.test_acc, st.cfs]

    def report(self, st: Epoch) -> None:
        c, best, at = self.controller, self.best["acc"], self.best["epoch"]
        self.log.info("Test Accuracy: %.3f (%.3f).\n", st.test_acc, best)
        print(f"epoch {st.epoch}: loss {st.train_loss:.4f} train {st.train_acc:.2f}% "
              f"test {st.test_acc:.2f}% (best {best:.2f}% @ {at}) lagsum {st.lagsum:.6g} "
              f"g {c.g} ucs {c.ucs:.3f} CFS {st.cfs:.6g}"
              + (" lambda update" if st.decision is not None and st.decision.updated else ""))

    def extra_state(self) -> dict:
        return {"scales": self.model.scales()}

    def load_extra_state(self, extra) -> None:
        self.model.set_scales(extra["scales"])

    def reference_state(self, st: Epoch, state: dict) -> dict:
        return {"net": state["model"], "scales": state["extra"]["scales"], "epoch": st.epoch,
                "optimizer": state["optimizer"], **CBP.reference_entries(state["cbp"]),
                "progress": state["progress"]}

    def write(self, st: Epoch, full: dict) -> None:
        run, net = self.run, self.model
        run.write_table(f"{self.stem}.txt", self.rows)
        weights = {**full["trainer"]["model"], **full["trainer"]["extra"]["scales"]}
        if st.improved:
            run.save({"net": weights, "accuracy": st.test_acc, "epoch": st.epoch},
                     f"./checkpoint/{self.save_name}.pth")
            run.save(weights, self.pre_path)
            spec = {t.name: (t.scale, t.mode) for t in self.controller.targets}
            run.save(pack_state_dict(net.state_dict(), spec),
                     f"./checkpoint/{self.save_name}_packed.pth")
        if st.epoch % SAVE_EVERY == 0:  # resumable, with the reference's snapshot keys
            run.save({**full, "model_state_dict": full["trainer"]["model"],
                      "scale": [lay.scale.detach().clone() for lay in net.q_layers]},
                     f"{self.stem}_{st.epoch}.pth")

    def last_path(self) -> str:
        return f"./checkpoint/{self.save_name}_last.pth"


def _train(args, net_cfg, net: Network, train_dl, test_dl, device, save_name: str, log,
           run: Run, resume: str | None, pre_path: str, stem: str) -> None:
    qweights = [net.my_parameters[i] for i in net.q_layers_list]
    optimizer = torch.optim.AdamW(qweights, lr=float(net_cfg["lr"]))
    # weight_clipper keeps the latent weights in range: the controller clamps nothing
    ctl = methods.controller(args.method, net.quant_targets(),
                             float(net_cfg.get("lr_lambda", 1e-4)), lambda_optimizer="adamw", period_max=int(net_cfg.get("period_max", PERIOD_MAX)),
              lr_decay_g=None, clamp=None, init_scales=False)
    trainer = CBPTrainer(net, optimizer, run=run, epochs=int(net_cfg["epochs"]), device=device,
                         controller=ctl, args=args, loss_fn=loss_f.SpikeLoss(net_cfg), log=log,
                         save_name=save_name, net_cfg=net_cfg, pre_path=pre_path, stem=stem,
                         logdirs={"main": f"./runs/{save_name}" if args.logdir is None
                                  else args.logdir})
    trainer.resume_from(resume)
    trainer.fit(train_dl, test_dl)
    trainer.final_report(pre_path)


if __name__ == "__main__":
    run_main(main)
