"""CBP quantization of SEW-ResNet-18/34 on ImageNet.

Run from this folder (every path is relative to it):
    python -m torch.distributed.launch --nproc_per_node=2 --use_env main_quantize_cbp.py --model sew_resnet18 -b 32 --output-dir ./logs --tb --print-freq 128 --amp --cache-dataset --connect_f ADD --T 4 --lr 0.1 --lr_lambda 0.01 --epochs 100 --data-path ./datasets/imagenet --quant bin --period 20 --device cuda
    torchrun --nproc_per_node=2 main_quantize_cbp.py --model sew_resnet18 ... (same flags)
    python main_quantize_cbp.py --model sew_resnet18 --test-only --output-dir ./logs --print-freq 1024 --cache-dataset --connect_f ADD --T 4 --data-path ./datasets/imagenet --quant bin --device cuda:0

Reads ./trained_params/sew18_checkpoint_319.pth (sew34_... for sew_resnet34; make it with
main_train_fp32.py if needed).  Writes, under <output-dir>/<run name>/:
progress_<model>_<quant>.txt,
checkpoint_latest.pth (full state, for --resume), checkpoint_<epoch>.pth,
checkpoint_max_test_acc1.pth; with --tb the folders <run dir>_logs/{train,te}; and the best
weights as a plain state dict in
./trained_params/SEW_ResNet_<18|34>_ImageNet_<quant>_cbp_prequantized.pth.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sewcommon import data, engine  # noqa: E402

from cbp import MODES, methods  # noqa: E402
from cbp.runtime import UserError, nonneg_int, positive_float, positive_int, run_main  # noqa: E402

MODELS = ("sew_resnet18", "sew_resnet34", "sew_resnet50", "sew_resnet101", "sew_resnet152")


def depth(model: str) -> str:
    return re.sub(r"\D", "", model)


def pretrained_path(model: str) -> str:
    return f"./trained_params/sew{depth(model)}_checkpoint_319.pth"


def prequantized_path(model: str, quant: str, method: str = "cbp") -> str:
    return methods.tagged(
        f"./trained_params/SEW_ResNet_{depth(model)}_ImageNet_{quant}_cbp_prequantized.pth", method)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="CBP quantization of SEW-ResNet on ImageNet")
    p.add_argument("--data-path", default="/home/wfang/datasets/ImageNet",
                   help="folder with train/ and val/ (ImageFolder layout)")
    p.add_argument("--model", default="sew_resnet18", choices=list(MODELS))
    p.add_argument("--gpu", default=0, type=int,
                   help="accepted for the reference's command lines; the device comes from "
                        "--device, or from LOCAL_RANK under a launcher")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("-b", "--batch-size", default=32, type=positive_int, help="per process")
    p.add_argument("--epochs", default=100, type=nonneg_int, metavar="N")
    p.add_argument("-j", "--workers", default=16, type=nonneg_int, metavar="N")
    p.add_argument("--lr", default=0.1, type=positive_float)
    p.add_argument("--lr_lambda", default=0.01, type=positive_float)
    p.add_argument("--momentum", default=0.9, type=float, metavar="M")
    p.add_argument("--wd", "--weight-decay", default=0.0, type=float, dest="weight_decay")
    p.add_argument("--print-freq", default=10, type=nonneg_int)
    p.add_argument("--output-dir", default=".")
    p.add_argument("--resume", nargs="?", const="auto", default="", metavar="PATH",
                   help="resume training (default PATH: the run's checkpoint_latest.pth)")
    p.add_argument("--start-epoch", default=0, type=nonneg_int, metavar="N")
    p.add_argument("--cache-dataset", action="store_true",
                   help="cache the ImageFolder file lists in ~/.torch/vision/datasets/imagefolder")
    p.add_argument("--sync-bn", action="store_true")
    p.add_argument("--test-only", action="store_true")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--world-size", default=None, type=positive_int,
                   help="number of processes; checked against the launcher's WORLD_SIZE "
                        "(default: what the launcher started)")
    p.add_argument("--dist-url", default="env://")
    p.add_argument("--tb", action="store_true", help="write tensorboard scalars")
    p.add_argument("--T", default=4, type=positive_int, help="simulation steps")
    p.add_argument("--adam", action="store_true")
    p.add_argument("--cos_lr_T", default=320, type=positive_int,
                   help="cosine period of fp32 training (unused by CBP, as in the reference)")
    p.add_argument("--connect_f", type=str, choices=["ADD", "AND", "IAND"])
    p.add_argument("--zero_init_residual", action="store_true")
    p.add_argument("--quant", default="bin", choices=list(MODES))
    methods.add_method_flag(p)
    p.add_argument("--period", default=20, type=positive_int)
    # additions
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--seed", type=int, default=2020)
    p.add_argument("--width", type=positive_float, default=1.0,
                   help="channel multiplier (1.0 = the paper's networks)")
    p.add_argument("--crop-size", type=positive_int, default=224)
    p.add_argument("--resize-size", type=positive_int, default=256)
    p.add_argument("--amp-reference-clip", action="store_true",
                   help="under --amp clip the still-scaled gradients, as the reference did")
    p.add_argument("--pretrained", default=None,
                   help="fp32 checkpoint (default ./trained_params/sew<depth>_checkpoint_319.pth)")
    p.add_argument("--rank-state-dir", default=None,
                   help="write every rank's final weights, lambda and g there (to compare ranks)")
    return p


def run_name(args: argparse.Namespace, fp32: bool) -> str:
    if fp32:
        name = f"{args.model}_b{args.batch_size}_lr{args.lr}_T{args.T}_cnf_{args.connect_f}_fp32"
    else:
        name = (f"{args.model}_b{args.batch_size}_lr{args.lr}_lr_lambda{args.lr_lambda}_T{args.T}"
                f"_cnf_{args.connect_f}_P{args.period}_{args.quant}{methods.suffix(args.method)}")
    if args.zero_init_residual:
        name += "_zi"
    if args.weight_decay:
        name += f"_wd{args.weight_decay}"
    return os.path.join(args.output_dir, name)


def main(argv=None, fp32: bool = False) -> None:
    args = build_parser().parse_args(argv)
    if args.connect_f is None:
        raise UserError("--connect_f ADD|AND|IAND is required")
    import q_sew_resnet

    def build(mode):
        return getattr(q_sew_resnet, args.model)(
            zero_init_residual=args.zero_init_residual, T=args.T, connect_f=args.connect_f,
            mode=mode, width=args.width)

    def datasets():
        train = data.image_folder(os.path.join(args.data_path, "train"),
                                  data.imagenet_transforms(True, args.crop_size),
                                  args.cache_dataset)
        val = data.image_folder(os.path.join(args.data_path, "val"),
                                data.imagenet_transforms(False, args.crop_size, args.resize_size),
                                args.cache_dataset)
        return train, val

    out = run_name(args, fp32)
    tb = args.tb
    layout = engine.Layout(
        ckpt_dir=out,
        progress_file=os.path.join(out, f"progress_{args.model}_{args.quant}"
                                        f"{methods.suffix(args.method)}.txt"),
        progress_row=lambda s: [s.epoch, s.train_acc, s.train_acc5, s.test_acc, s.test_acc5,
                                s.train_loss, s.test_loss, s.cfs, s.lagsum_pre],
        keep_epoch=lambda e, n: e % 16 == 0 or e == n - 1,
        best_name="checkpoint_max_test_acc1.pth",
        tb_train=out + "_logs/train" if tb else None,
        tb_test=out + "_logs/te" if tb else None,
        tb_scalars=lambda s: (
            {"train_loss": s.train_loss, "train_acc1": s.train_acc, "train_acc5": s.train_acc5,
             "lagsum": s.lagsum},
            {"test_loss": s.test_loss, "test_acc1": s.test_acc, "test_acc5": s.test_acc5}),
        args_txt=out + "_logs/args.txt" if tb else None,
        final_weights=(pretrained_path(args.model) if fp32
                       else prequantized_path(args.model, args.quant, args.method)),
        final_wrap=fp32,
    )
    settings = engine.Settings(
        epochs=args.epochs, lr=args.lr, lr_lambda=args.lr_lambda, momentum=args.momentum,
        weight_decay=args.weight_decay, adam=args.adam, amp=args.amp, compile=args.compile,
        amp_reference_clip=args.amp_reference_clip, period=args.period,
        print_freq=args.print_freq, resume=args.resume or None, start_epoch=args.start_epoch,
        cos_lr_T=args.cos_lr_T if fp32 else None, rank_state_dir=args.rank_state_dir,
        method=args.method)
    fp32_cmd = (f"python main_train_fp32.py --model {args.model} --connect_f {args.connect_f} "
                f"--T {args.T} --data-path {args.data_path}")
    cbp_cmd = (f"python main_quantize_cbp.py --model {args.model} --connect_f {args.connect_f} "
               f"--T {args.T} --data-path {args.data_path} --quant {args.quant} --tb --amp"
               f"{methods.flag(args.method)}")
    pipeline = engine.Pipeline(
        build_model=build, datasets=datasets, layout=layout, settings=settings,
        quant=None if fp32 else args.quant, seed=args.seed, device=args.device,
        batch_size=args.batch_size, workers=args.workers, test_only=args.test_only,
        pretrained=args.pretrained or pretrained_path(args.model),
        pretrained_hint=f"download it from the SEW-ResNet release or {engine.DRIVE}, "
                        f"or create it with: {fp32_cmd}",
        prequantized=prequantized_path(args.model, args.quant, args.method),
        prequantized_hint=f"download it from {engine.DRIVE} or create it with: {cbp_cmd}",
        sync_bn=args.sync_bn, dist_url=args.dist_url, world_size=args.world_size,
    )
    pipeline.dataset = "ImageNet"
    engine.execute(pipeline, args)


if __name__ == "__main__":
    run_main(main)
