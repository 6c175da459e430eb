"""Export the CIFAR10-DVS Wide-7B-Net to NIR (Neuromorphic Intermediate Representation).

Run from this folder, with the model and data flags of the -test-only evaluation:
    python export_nir.py -model SEWResNet -cnf ADD -data_dir ./datasets/CIFAR10DVS -T 16 -quant bin
    python export_nir.py -model SEWResNet -cnf ADD -data_dir ./datasets/CIFAR10DVS -T 16 -export_nir net.nir

Reads the checkpoint -test-only reads (./trained_params/SEW_ResNet_CIFAR10DVS_fp32_pretrained.pth
with -quant fp32, the default; ./trained_params/SEW_ResNet_CIFAR10DVS_<quant>_cbp_prequantized.pth
otherwise), exports it and writes the file only after its bytes, imported back with
spikingjelly, reproduce every PLIF layer's spikes and the output layer's inputs on the first
test batch, and the logits within the float32 bound (as DVS128Gesture/export_nir.py; the
layers map as sewcommon/nir_export.py describes).
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
    p = argparse.ArgumentParser(description="Export the CIFAR10-DVS Wide-7B-Net to NIR",
                                parents=[mq.build_parser()], conflict_handler="resolve")
    ne.add_export_flags(p, "./trained_params/SEW_ResNet_CIFAR10DVS_<quant>[_<method>].nir", "-")
    args = p.parse_args(argv)
    if args.model != "SEWResNet":
        raise UserError("-model must be SEWResNet")
    if args.cnf is None:
        raise UserError("-cnf ADD|AND|IAND is required")
    return args


def checkpoint(args: argparse.Namespace) -> str:
    """The checkpoint the matching -test-only run reads (the same one-line error if missing)."""
    if args.quant == "fp32":
        path = args.pretrained or mq.pretrained_path()
        cmd = (f"python main_train_fp32.py -model SEWResNet -cnf {args.cnf} "
               f"-data_dir {args.data_dir} -T {args.T}")
    else:
        path = mq.prequantized_path(args.quant, args.method)
        cmd = (f"python main_quantize_cbp.py -amp -model SEWResNet -cnf {args.cnf} "
               f"-data_dir {args.data_dir} -quant {args.quant}{methods.flag(args.method, '-')}")
    require_file(path, "checkpoint", f"download it from {engine.DRIVE} or create it with: {cmd}")
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    import q_smodels

    out = ne.output_path(args, f"./trained_params/SEW_ResNet_{mq.DATASET}_{args.quant}.nir")
    path = checkpoint(args)
    device = engine.resolve_device(args.device)
    model = q_smodels.SEWResNet(args.cnf, None if args.quant == "fp32" else args.quant,
                                width=args.width)
    test_set = data.cifar10dvs(args.data_dir, args.T, args.dts_cache)[1]
    print(sne.export_checkpoint(model, path, test_set, args.b, args.j, out, args.dt, device,
                                f"SEWResNet {args.quant}"))


if __name__ == "__main__":
    run_main(main)
