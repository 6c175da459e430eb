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
from cbp.run import Run
from cbp.runtime import UserError, run_main, seed_everything
from cbp.trainer import Epoch

import engine
from functions import loss_f


class FP32Trainer(engine.TSSLTrainer):
    """fp32 training: the best epoch (ties included) goes to ``./checkpoint/<DS>_fp32.pth``
    and the pretrained-weights file."""

    def __init__(self, *a, name: str, pre_path: str, **kw) -> None:
        self.name, self.pre_path = name, pre_path
        super().__init__(*a, **kw)

    def before_epoch(self, st: Epoch) -> None:
        self.log.info("\nEpoch: %d", st.epoch)

    def report(self, st: Epoch) -> None:
        best, at = self.best["acc"], self.best["epoch"]
        self.log.info("Train Accuracy: %.3f. Loss: %.3f", st.train_acc, st.train_loss)
        self.log.info("Test Accuracy: %.3f (%.3f).", st.test_acc, best)
        print(f"epoch {st.epoch}: loss {st.train_loss:.4f} train {st.train_acc:.2f}% "
              f"test {st.test_acc:.2f}% (best {best:.2f}% @ {at})")

    def reference_state(self, st: Epoch, state: dict) -> dict:
        return {"net": state["model"], "loss": st.test_acc, "epoch": st.epoch}

    def write(self, st: Epoch, full: dict) -> None:
        if st.improved:
            self.run.save(self.reference_state(st, full["trainer"]),
                          f"./checkpoint/{self.name}.pth")
            self.run.save(full["trainer"]["model"], self.pre_path)

    def last_path(self) -> str:
        return f"./checkpoint/{self.name}_last.pth"


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
        engine.load_pretrained(net, args, dataset)
        acc, _ = engine.test_with_metrics(net, test_dl, device, show, log=engine.echo(log))
        log.info("Test Accuracy: %.3f", acc)
        print("Test Accuracy: ", acc)
        return

    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    last_path = f"./checkpoint/{name}_last.pth"
    outputs = [last_path, pre_path, f"./checkpoint/{name}.pth"]
    resume = engine.resume_path(args, last_path)
    with Run(engine.identity(params, "fp32", dataset), outputs, lr_flag="-lr") as run:
        trainer = FP32Trainer(net, optimizer, run=run, epochs=epochs, device=device, args=args,
                              loss_fn=loss_f.SpikeLoss(net_cfg), log=log, name=name,
                              pre_path=pre_path,
                              logdirs={"main": f"./runs/{name}" if args.logdir is None
                                       else args.logdir})
        trainer.resume_from(resume)
        if epochs <= trainer.start_epoch:
            raise UserError(f"nothing to do: {epochs} epochs, starting at epoch "
                            f"{trainer.start_epoch}")
        trainer.fit(train_dl, test_dl)
    trainer.final_report(pre_path)


if __name__ == "__main__":
    run_main(main)
