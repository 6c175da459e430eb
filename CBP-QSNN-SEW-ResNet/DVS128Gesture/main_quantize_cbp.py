"""CBP quantization of the SEW-ResNet 7B-Net on DVS128 Gesture.

Run from this folder (every path is relative to it):
    python main_quantize_cbp.py --tb --amp --output-dir ./logs --model SEWResNet --connect_f ADD --device cuda:0 --epoch 200 --T_train 12 --T 16 --data-path ./datasets/DVS128Gesture --lr 0.1 --lr-lambda 0.01 --quant bin --period 20
    python main_quantize_cbp.py --output-dir ./logs --model SEWResNet --connect_f ADD --device cuda:0 --data-path ./datasets/DVS128Gesture --test-only --quant bin

Reads ./trained_params/SEW_ResNet_DVS128Gesture_fp32_pretrained.pth (make it with
main_train_fp32.py if you do not have the authors' file).  Writes, under
<output-dir>/<run name>/lr<lr>_lrlamba<lr_lambda>/: progress.txt, checkpoint_latest.pth (full
state, for --resume), checkpoint_<epoch>.pth, checkpoint_max_test_acc1.pth; with --tb the
tensorboard folders <run dir>_logs/{train,te}; and the best weights as a plain state dict in
./trained_params/SEW_ResNet_DVS128Gesture_<quant>_cbp_prequantized.pth (what --test-only reads).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sewcommon import data, engine  # noqa: E402

from cbp import MODES, methods  # noqa: E402
from cbp.runtime import UserError, nonneg_int, positive_float, positive_int, run_main  # noqa: E402

DATASET = "DVS128Gesture"
MODELS = ("SEWResNet", "PlainNet", "SpikingResNet")
# --dataset DIGITS: the embedded digits as 16x16 event frames (sewcommon.dvs_emulator); the net
# keeps the first 3 of the 7 stages (16 -> 2: the output layer sees 2x2 positions)
DIGITS_SIZE, DIGITS_STAGES = 16, 3


def pretrained_path(dataset: str = DATASET) -> str:
    return f"./trained_params/SEW_ResNet_{dataset}_fp32_pretrained.pth"


def prequantized_path(quant: str, dataset: str = DATASET, method: str = "cbp") -> str:
    return methods.tagged(f"./trained_params/SEW_ResNet_{dataset}_{quant}_cbp_prequantized.pth",
                          method)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="CBP quantization of SEW-ResNet on DVS128 Gesture")
    p.add_argument("--model", help="SEWResNet (the paper's net), PlainNet or SpikingResNet")
    p.add_argument("--data-path", help="dataset root (holding download/ or events_np/)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("-b", "--batch-size", default=16, type=positive_int)
    p.add_argument("--epochs", default=200, type=nonneg_int, metavar="N")
    p.add_argument("-j", "--workers", default=4, type=nonneg_int, metavar="N")
    p.add_argument("--lr", type=positive_float, default=0.1, help="weight learning rate")
    p.add_argument("--lr-lambda", type=positive_float, default=0.01, help="lambda learning rate")
    p.add_argument("--momentum", default=0.9, type=float, metavar="M")
    p.add_argument("--wd", "--weight-decay", default=0.0, type=float, dest="weight_decay",
                   help="weight decay on the conv/linear weights")
    p.add_argument("--print-freq", default=64, type=nonneg_int)
    p.add_argument("--output-dir", default="./logs")
    p.add_argument("--resume", nargs="?", const="auto", default="", metavar="PATH",
                   help="resume training (default PATH: the run's checkpoint_latest.pth)")
    p.add_argument("--start-epoch", default=0, type=nonneg_int, metavar="N")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm (distributed, CUDA)")
    p.add_argument("--test-only", action="store_true")
    p.add_argument("--amp", action="store_true", help="automatic mixed precision")
    p.add_argument("--world-size", default=None, type=positive_int,
                   help="number of processes; checked against the launcher's WORLD_SIZE "
                        "(default: what the launcher started)")
    p.add_argument("--dist-url", default="env://")
    p.add_argument("--tb", action="store_true", help="write tensorboard scalars")
    p.add_argument("--T", default=16, type=positive_int, help="frames per sample")
    p.add_argument("--adam", action="store_true", help="Adam instead of SGD")
    p.add_argument("--connect_f", type=str, choices=["ADD", "AND", "IAND"])
    p.add_argument("--quant", default="bin", choices=list(MODES))
    methods.add_method_flag(p)
    p.add_argument("--period", default=20, type=positive_int,
                   help="max epochs between lambda updates")
    p.add_argument("--T_train", type=positive_int, help="random temporal crop while training")
    # additions
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--seed", type=int, default=2022)
    p.add_argument("--width", type=positive_float, default=1.0,
                   help="channel multiplier (1.0 = the paper's network)")
    p.add_argument("--amp-reference-clip", action="store_true",
                   help="under --amp clip the still-scaled gradients, as the reference did")
    p.add_argument("--pretrained", default=None, help=f"fp32 weights (default {pretrained_path()})")
    p.add_argument("--dataset", default=DATASET, choices=[DATASET, "DIGITS"],
                   help="DIGITS: the embedded digits as 16x16 two-polarity event frames "
                        "(no --data-path; the first 3 stages, 10 outputs)")
    return p


def check(args: argparse.Namespace) -> None:
    if args.model not in MODELS:
        raise UserError(f"--model must be one of {', '.join(MODELS)}")
    if args.model == "SEWResNet" and args.connect_f is None:
        raise UserError("--connect_f ADD|AND|IAND is required for SEWResNet")
    if args.T_train and args.T_train > args.T:
        raise UserError(f"--T_train {args.T_train} exceeds --T {args.T}")


def run_name(args: argparse.Namespace, fp32: bool) -> str:
    name = f"{args.model}_b{args.batch_size}_T{args.T}"
    if args.dataset != DATASET:
        name = f"{args.dataset}_{name}"
    if args.T_train:
        name += f"_Ttrain{args.T_train}"
    if args.weight_decay:
        name += f"_wd{args.weight_decay}"
    name += f"_epoch{args.epochs}" + ("_adam" if args.adam else "_sgd")
    name += f"_cnf_{args.connect_f}"
    if fp32:
        return os.path.join(args.output_dir, name + "_fp32", f"lr{args.lr}")
    name += f"_period{args.period}_{args.quant}{methods.suffix(args.method)}"
    return os.path.join(args.output_dir, name, f"lr{args.lr}_lrlamba{args.lr_lambda}")


def main(argv=None, fp32: bool = False) -> None:
    args = build_parser().parse_args(argv)
    check(args)
    import q_smodels

    digits = args.dataset == "DIGITS"
    shape = (dict(in_size=DIGITS_SIZE, num_classes=10, stages=DIGITS_STAGES) if digits else {})

    def build(mode):
        builder = getattr(q_smodels, args.model)
        if args.model == "SEWResNet":
            return builder(args.connect_f, mode, width=args.width, **shape)
        return builder(mode, width=args.width, **shape)

    def datasets():
        if digits:
            from sewcommon.dvs_emulator import digits_dvs

            return (digits_dvs(True, args.T, DIGITS_SIZE), digits_dvs(False, args.T, DIGITS_SIZE))
        return data.dvs128_gesture(args.data_path, args.T)

    out = run_name(args, fp32)
    tb = args.tb
    layout = engine.Layout(
        ckpt_dir=out,
        progress_file=os.path.join(out, "progress.txt"),
        progress_row=lambda s: [s.epoch, s.test_acc, s.test_acc5, s.cfs, s.lagsum_pre],
        keep_epoch=lambda e, n: e == 0 or (e + 1) % 40 == 0 or e == n - 1,
        best_name="checkpoint_max_test_acc1.pth",
        tb_train=out + "_logs/train" if tb else None,
        tb_test=out + "_logs/te" if tb else None,
        tb_scalars=lambda s: (
            {"lagsum": s.lagsum, "train_loss": s.train_loss, "train_acc1": s.train_acc,
             "train_acc5": s.train_acc5},
            {"test_loss": s.test_loss, "test_acc1": s.test_acc, "test_acc5": s.test_acc5}),
        args_txt=out + "_logs/args.txt" if tb else None,
        final_weights=(pretrained_path(args.dataset) if fp32
                       else prequantized_path(args.quant, args.dataset, args.method)),
    )
    settings = engine.Settings(
        epochs=args.epochs, lr=args.lr, lr_lambda=args.lr_lambda, momentum=args.momentum,
        weight_decay=args.weight_decay, adam=args.adam, amp=args.amp, compile=args.compile,
        amp_reference_clip=args.amp_reference_clip, period=args.period, T_train=args.T_train,
        print_freq=args.print_freq, resume=args.resume or None, start_epoch=args.start_epoch,
        method=args.method)
    src = "--dataset DIGITS" if digits else f"--data-path {args.data_path}"
    fp32_cmd = (f"python main_train_fp32.py --model {args.model} --connect_f {args.connect_f} "
                f"{src} --T {args.T}")
    cbp_cmd = (f"python main_quantize_cbp.py --tb --amp --model {args.model} --connect_f "
               f"{args.connect_f} {src} --quant {args.quant}{methods.flag(args.method)}")
    pipeline = engine.Pipeline(
        build_model=build,
        datasets=datasets,
        layout=layout, settings=settings, quant=None if fp32 else args.quant, seed=args.seed,
        device=args.device, batch_size=args.batch_size, workers=args.workers,
        test_only=args.test_only,
        pretrained=args.pretrained or pretrained_path(args.dataset),
        pretrained_hint=f"download it from {engine.DRIVE} or create it with: {fp32_cmd}",
        prequantized=prequantized_path(args.quant, args.dataset, args.method),
        prequantized_hint=f"download it from {engine.DRIVE} or create it with: {cbp_cmd}",
        sync_bn=args.sync_bn, dist_url=args.dist_url, world_size=args.world_size,
    )
    pipeline.dataset = args.dataset
    engine.execute(pipeline, args)


if __name__ == "__main__":
    run_main(main)
