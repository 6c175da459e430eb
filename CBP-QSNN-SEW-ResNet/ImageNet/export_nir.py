"""Export an ImageNet SEW-ResNet (18/34, ADD) to NIR (Neuromorphic Intermediate Representation).

Run from this folder, with the model and data flags of the --test-only evaluation:
    python export_nir.py --model sew_resnet18 --connect_f ADD --T 4 --data-path ./datasets/imagenet --quant bin
    python export_nir.py --model sew_resnet34 --connect_f ADD --T 4 --data-path ./datasets/imagenet --export_nir net.nir

Reads the checkpoint --test-only reads (./trained_params/sew<depth>_checkpoint_319.pth with
--quant fp32, the default; ./trained_params/SEW_ResNet_<depth>_ImageNet_<quant>_cbp_prequantized.pth
otherwise), exports it and writes the file only after its bytes, imported back with
spikingjelly, reproduce every IF layer's spikes and the output layer's inputs on the first
validation batch, and the logits within the float32 bound of taking the mean over T after
``fc`` instead of before it.  The layers map as sewcommon/nir_export.py describes.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import main_quantize_cbp as mq  # noqa: E402
from sewcommon import data, engine  # noqa: E402
from sewcommon import nir_export as sne  # noqa: E402

from cbp import methods  # noqa: E402
from cbp import nir_export as ne  # noqa: E402
from cbp.runtime import UserError, require_file, run_main  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    # the flags of main_quantize_cbp.py, so that the same command line selects the same network
    # and checkpoint (the training-only ones are accepted and ignored)
    p = argparse.ArgumentParser(description="Export an ImageNet SEW-ResNet to NIR",
                                parents=[mq.build_parser()], conflict_handler="resolve")
    ne.add_export_flags(p, "./trained_params/SEW_ResNet_<depth>_ImageNet_<quant>[_<method>].nir")
    args = p.parse_args(argv)
    if args.connect_f is None:
        raise UserError("--connect_f ADD|AND|IAND is required")
    return args


def checkpoint(args: argparse.Namespace) -> str:
    """The checkpoint the matching --test-only run reads (the same one-line error if missing)."""
    if args.quant == "fp32":
        path = args.pretrained or mq.pretrained_path(args.model)
        hint = (f"download it from the SEW-ResNet release or {engine.DRIVE}, or create it "
                f"with: python main_train_fp32.py --model {args.model} --connect_f "
                f"{args.connect_f} --T {args.T} --data-path {args.data_path}")
    else:
        path = mq.prequantized_path(args.model, args.quant, args.method)
        hint = (f"download it from {engine.DRIVE} or create it with: python main_quantize_cbp.py "
                f"--model {args.model} --connect_f {args.connect_f} --T {args.T} --data-path "
                f"{args.data_path} --quant {args.quant} --tb --amp{methods.flag(args.method)}")
    require_file(path, "checkpoint", hint)
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    import q_sew_resnet

    depth = mq.depth(args.model)
    out = ne.output_path(args, f"./trained_params/SEW_ResNet_{depth}_ImageNet_{args.quant}.nir")
    path = checkpoint(args)
    device = engine.resolve_device(args.device)
    model = getattr(q_sew_resnet, args.model)(
        T=args.T, connect_f=args.connect_f, mode=None if args.quant == "fp32" else args.quant,
        width=args.width)
    val = data.image_folder(os.path.join(args.data_path, "val"),
                            data.imagenet_transforms(False, args.crop_size, args.resize_size),
                            args.cache_dataset)
    print(sne.export_checkpoint(model, path, val, args.batch_size, args.workers, out, args.dt,
                                device, f"{args.model} {args.quant}"))


if __name__ == "__main__":
    run_main(main)
