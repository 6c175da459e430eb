"""Export the DVS128 Gesture 7B-Net to NIR (Neuromorphic Intermediate Representation).

Run from this folder, with the model and data flags of the --test-only evaluation:
    python export_nir.py --model SEWResNet --connect_f ADD --data-path ./datasets/DVS128Gesture --T 16 --quant bin
    python export_nir.py --model SEWResNet --connect_f ADD --dataset DIGITS --T 4 --width 0.125 --export_nir net.nir

Reads the checkpoint --test-only reads (./trained_params/SEW_ResNet_<dataset>_fp32_pretrained.pth
without --quant, ./trained_params/SEW_ResNet_<dataset>_<quant>_cbp_prequantized.pth with it),
exports it (quantized convs with their exact quantized weights), imports the file's bytes back
with spikingjelly and checks on the first test batch that every PLIF layer's spikes at every
step and the output layer's inputs are identical, and the logits equal within the float32
bound of taking the mean over T after the output layer instead of before it.  Only then is the
file written (atomically).  See sewcommon/nir_export.py for how the layers map.
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
from cbp.runtime import require_file, run_main  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    # the flags of main_quantize_cbp.py, so that the same command line selects the same network
    # and checkpoint (the training-only ones are accepted and ignored)
    p = argparse.ArgumentParser(description="Export the DVS128 Gesture 7B-Net to NIR",
                                parents=[mq.build_parser()], conflict_handler="resolve")
    ne.add_export_flags(p, "./trained_params/SEW_ResNet_<dataset>_<quant>[_<method>].nir")
    args = p.parse_args(argv)
    mq.check(args)
    return args


def checkpoint(args: argparse.Namespace) -> str:
    """The checkpoint the matching --test-only run reads (the same one-line error if missing)."""
    src = "--dataset DIGITS" if args.dataset == "DIGITS" else f"--data-path {args.data_path}"
    if args.quant == "fp32":
        path = args.pretrained or mq.pretrained_path(args.dataset)
        cmd = (f"python main_train_fp32.py --model {args.model} --connect_f {args.connect_f} "
               f"{src} --T {args.T}")
    else:
        path = mq.prequantized_path(args.quant, args.dataset, args.method)
        cmd = (f"python main_quantize_cbp.py --tb --amp --model {args.model} --connect_f "
               f"{args.connect_f} {src} --quant {args.quant}{methods.flag(args.method)}")
    require_file(path, "checkpoint", f"download it from {engine.DRIVE} or create it with: {cmd}")
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    import q_smodels

    out = ne.output_path(args, f"./trained_params/SEW_ResNet_{args.dataset}_{args.quant}.nir")
    path = checkpoint(args)
    device = engine.resolve_device(args.device)
    mode = None if args.quant == "fp32" else args.quant
    digits = args.dataset == "DIGITS"
    shape = (dict(in_size=mq.DIGITS_SIZE, num_classes=10, stages=mq.DIGITS_STAGES)
             if digits else {})
    builder = getattr(q_smodels, args.model)
    model = (builder(args.connect_f, mode, width=args.width, **shape)
             if args.model == "SEWResNet" else builder(mode, width=args.width, **shape))
    if digits:
        from sewcommon.dvs_emulator import digits_dvs

        test_set = digits_dvs(False, args.T, mq.DIGITS_SIZE)
    else:
        test_set = data.dvs128_gesture(args.data_path, args.T)[1]
    print(sne.export_checkpoint(model, path, test_set, args.batch_size, args.workers, out,
                                args.dt, device, f"{args.model} {args.quant}"))

if __name__ == "__main__":
    run_main(main)
