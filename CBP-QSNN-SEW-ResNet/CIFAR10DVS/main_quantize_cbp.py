"""CBP quantization of the SEW-ResNet Wide-7B-Net on CIFAR10-DVS (single-dash flags).

Run from this folder (every path is relative to it):
    python main_quantize_cbp.py -amp -out_dir ./logs -model SEWResNet -cnf ADD -device cuda:0 -opt SGD -lr 0.1 -lr_lambda 0.01 -epochs 64 -quant bin -period 20
    python main_quantize_cbp.py -out_dir ./logs -model SEWResNet -cnf ADD -device cuda:0 -data_dir ./datasets/CIFAR10DVS -test-only -quant bin

Reads ./trained_params/SEW_ResNet_CIFAR10DVS_fp32_pretrained.pth (make it with main_train_fp32.py
if you do not have the authors' file).  The split is the reference's: per class the first 900
samples (DatasetFolder order) train, the last 100 test; the index lists are cached in
<dts_cache>/{train,test}_set_<T>.pt.  Writes <out_dir>/<run name>/{progress.txt, args.txt, logs/}
and <run name>_pt/{checkpoint_latest.pth, checkpoint_<epoch>.pth, checkpoint_max.pth}; the best
weights go to ./trained_params/SEW_ResNet_CIFAR10DVS_<quant>_cbp_prequantized.pth
(what -test-only reads).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sewcommon import data, engine  # noqa: E402

from cbp import MODES, methods  # noqa: E402
from cbp.runtime import UserError, nonneg_int, positive_float, positive_int, run_main  # noqa: E402

DATASET = "CIFAR10DVS"


def pretrained_path() -> str:
    return f"./trained_params/SEW_ResNet_{DATASET}_fp32_pretrained.pth"


def prequantized_path(quant: str, method: str = "cbp") -> str:
    return methods.tagged(f"./trained_params/SEW_ResNet_{DATASET}_{quant}_cbp_prequantized.pth",
                          method)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="CBP quantization of SEW-ResNet on CIFAR10-DVS")
    p.add_argument("-T", default=16, type=positive_int, help="frames per sample")
    p.add_argument("-device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("-b", default=16, type=positive_int, help="batch size")
    p.add_argument("-epochs", default=64, type=nonneg_int)
    p.add_argument("-j", default=4, type=nonneg_int, help="data loading workers")
    p.add_argument("-data_dir", default="./datasets/CIFAR10DVS")
    p.add_argument("-out_dir", default="./logs")
    p.add_argument("-resume", "--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="resume training (default PATH: the run's checkpoint_latest.pth)")
    p.add_argument("-test-only", action="store_true", dest="test_only")
    p.add_argument("-amp", action="store_true")
    p.add_argument("-opt", default="SGD", choices=["SGD", "Adam"])
    p.add_argument("-lr", default=0.1, type=positive_float)
    p.add_argument("-lr_lambda", default=0.01, type=positive_float)
    p.add_argument("-momentum", default=0.9, type=float)
    p.add_argument("-model", default=None, help="SEWResNet")
    p.add_argument("-cnf", default=None, choices=["ADD", "AND", "IAND"])
    p.add_argument("-quant", default="bin", choices=list(MODES))
    methods.add_method_flag(p, "-")
    p.add_argument("-period", default=20, type=positive_int)
    p.add_argument("-T_train", default=None, type=positive_int)
    p.add_argument("-dts_cache", default="./dts_cache")
    # additions
    p.add_argument("-compile", action="store_true", help="torch.compile the network")
    p.add_argument("-seed", type=int, default=2020)
    p.add_argument("-width", type=positive_float, default=1.0,
                   help="channel multiplier (1.0 = the paper's network)")
    p.add_argument("-amp_reference_clip", action="store_true",
                   help="under -amp clip the still-scaled gradients, as the reference did")
    p.add_argument("-pretrained", default=None, help=f"fp32 weights (default {pretrained_path()})")
    return p


def run_name(args: argparse.Namespace, fp32: bool) -> str:
    name = (f"{args.model}_{args.cnf}_T_{args.T}_T_train_{args.T_train}_b_{args.b}_{args.opt}"
            f"_lr_{args.lr}")
    if fp32:
        return os.path.join(args.out_dir, name + ("_amp" if args.amp else "") + "_fp32")
    name += f"_lrlambda_{args.lr_lambda}" + ("_amp" if args.amp else "")
    return os.path.join(args.out_dir, name + f"_period_{args.period}_{args.quant}"
                        f"{methods.suffix(args.method)}_3")


def main(argv=None, fp32: bool = False) -> None:
    args = build_parser().parse_args(argv)
    if args.model != "SEWResNet":
        raise UserError("-model must be SEWResNet")
    if args.cnf is None:
        raise UserError("-cnf ADD|AND|IAND is required")
    if args.T_train and args.T_train > args.T:
        raise UserError(f"-T_train {args.T_train} exceeds -T {args.T}")
    import q_smodels

    out = run_name(args, fp32)
    pct = 0.01  # this pipeline logs accuracies as fractions
    layout = engine.Layout(
        ckpt_dir=out + "_pt",
        progress_file=os.path.join(out, "progress.txt"),
        progress_row=lambda s: [s.epoch, s.train_acc * pct, s.test_acc * pct, s.train_loss,
                                s.test_loss, s.cfs, s.lagsum_pre],
        keep_epoch=lambda e, n: e == 0 or (e + 1) % 10 == 0 or e == n - 1,
        best_name="checkpoint_max.pth",
        model_key="net",
        tb_train=os.path.join(out, "logs"),
        tb_test=os.path.join(out, "logs"),
        tb_scalars=lambda s: ({"train_loss": s.train_loss, "train_acc": s.train_acc * pct},
                              {"test_loss": s.test_loss, "test_acc": s.test_acc * pct}),
        args_txt=os.path.join(out, "args.txt"),
        lr_flag="-lr",
        final_weights=pretrained_path() if fp32 else prequantized_path(args.quant, args.method),
    )
    settings = engine.Settings(
        epochs=args.epochs, lr=args.lr, lr_lambda=args.lr_lambda, momentum=args.momentum,
        adam=args.opt == "Adam", amp=args.amp, compile=args.compile, amp_reference_clip=args.amp_reference_clip,
        period=args.period, T_train=args.T_train, resume=args.resume, method=args.method)
    fp32_cmd = (f"python main_train_fp32.py -model SEWResNet -cnf {args.cnf} "
                f"-data_dir {args.data_dir} -T {args.T}")
    cbp_cmd = (f"python main_quantize_cbp.py -amp -model SEWResNet -cnf {args.cnf} "
               f"-data_dir {args.data_dir} -quant {args.quant}{methods.flag(args.method, '-')}")

    def report(loss: float, acc1: float, acc5: float) -> None:
        print(f"Test Loss: {loss:.5f}.. Test Accuracy: {acc1:.3f}")

    pipeline = engine.Pipeline(
        build_model=lambda mode: q_smodels.SEWResNet(args.cnf, mode, width=args.width),
        datasets=lambda: data.cifar10dvs(args.data_dir, args.T, args.dts_cache),
        layout=layout, settings=settings, quant=None if fp32 else args.quant, seed=args.seed,
        device=args.device, batch_size=args.b, workers=args.j, test_only=args.test_only,
        pretrained=args.pretrained or pretrained_path(),
        pretrained_hint=f"download it from {engine.DRIVE} or create it with: {fp32_cmd}",
        prequantized=prequantized_path(args.quant, args.method),
        prequantized_hint=f"download it from {engine.DRIVE} or create it with: {cbp_cmd}",
        drop_last_train=True, test_only_report=report,
    )
    pipeline.dataset = "CIFAR10DVS"
    engine.execute(pipeline, args)


if __name__ == "__main__":
    run_main(main)
