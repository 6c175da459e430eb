"""Export the trained STBP network to NIR (Neuromorphic Intermediate Representation).

Examples (working directory = CBP-QSNN-STBP/):
    python export_nir.py --dataset CIFAR10 --decay 0.25 --thresh 0.5 --T 8 --quant ter
    python export_nir.py --dataset CIFAR10 --decay 0.25 --thresh 0.5 --T 8 --export_nir net.nir

Reads the checkpoint the evaluation reads (./trained_params/STBP_<dataset>_fp32_pretrained.pth,
or ./trained_params/STBP_<dataset>_<q>_cbp_prequantized.pth with --quant), exports it (quantized
layers with their exact quantized weights), imports the graph back with spikingjelly and checks
on the first test batch that every layer's spikes at every step and the output are identical.
Only then is the file written (atomically: an existing file is replaced only by a complete one).
See cbp/nir_export.py for how the neuron maps.
"""

from __future__ import annotations

import argparse

import nir_stbp

from cbp import distributed as D
from cbp import methods, nir_export
from cbp.checkpoint import load_into
from cbp.runtime import run_main, seed_everything

import engine
from model import Conv_SNN
from q_model import Q_Conv_SNN


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Export the STBP network to NIR")
    # the flags of the other two scripts, so that the same command line selects the same
    # network and checkpoint (the training-only ones are accepted and ignored)
    engine.add_common_args(p, lr=5e-3)
    methods.add_method_flag(p)
    nir_export.add_export_flags(p, "./trained_params/STBP_<dataset>_<quant>[_<method>].nir")
    return p.parse_args(argv)


def checkpoint(args) -> str:
    """The checkpoint the matching ``--mode eval`` reads (a one-line error if missing)."""
    width = f" --width {args.width}" if args.width != 1.0 else ""
    if args.quant == "fp32":
        path = engine.pretrained_path(args.dataset)
        engine.require_file(path, "pretrained fp32 checkpoint", f"download it from "
                            f"{engine.DRIVE} or create it with: {engine.fp32_command(args)}")
        return path
    path = methods.tagged(engine.prequantized_path(args.dataset, args.quant), args.method)
    cmd = (f"python main_quantize_cbp.py --dataset {args.dataset} --mode train --decay "
           f"{args.decay} --thresh {args.thresh} --lens {args.lens} --T {args.T} "
           f"--quant {args.quant}{width}{methods.flag(args.method)}")
    engine.require_file(path, "prequantized checkpoint",
                        f"download it from {engine.DRIVE} or produce it with: {cmd}")
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    device = engine.setup(args)
    seed_everything(args.seed)
    out = nir_export.output_path(args, f"./trained_params/STBP_{args.dataset}_{args.quant}.nir")
    path = checkpoint(args)
    with D.collective():
        _, test_dl, outs = engine.loaders(args)
    common = (outs, args.decay, args.thresh, args.lens, args.batch_size, args.T)
    model = (Conv_SNN(*common, width=args.width) if args.quant == "fp32"
             else Q_Conv_SNN(*common, mode=args.quant, width=args.width))
    model = model.to(device).eval()
    load_into(model, path, nonfinite="warn")
    images, _ = next(iter(test_dl))
    images = images.to(device)

    result = nir_export.write_checked(
        lambda: nir_stbp.export_stbp(model, images, dt=args.dt),
        lambda data: nir_stbp.compare(model, nir_export.load(data, device=device), images),
        out)
    print(result.report(out, args.quant, args.T, args.dt, images.shape[0]))


if __name__ == "__main__":
    run_main(main)
