"""Export a CBP-quantized spiking VGG to NIR (Neuromorphic Intermediate Representation).

Run from this folder, with the flags of the ``--evaluate CKPT`` command (the checkpoint's
--quant and --T unless given):
    python export_nir.py --dataset CIFAR10 --arch VGG16 --dpath ./data --evaluate ./logs/<run>_0_ckpt.pth

Reads the checkpoint as the evaluation does, maps the network onto NIR nodes (see
nir_calibration.py: each IF layer, which resets by subtraction, becomes an integrator
``nir.I``, a ``nir.Threshold`` and a recurrent ``nir.Scale(-1)`` edge back into the
integrator), reads the exact bytes back with ``cbp.nir_torch`` and checks on the first test
batch that every IF layer's spikes at every step and the output (the logits summed over the
steps) are identical.  Only then is the file written (atomically), by default the checkpoint's
name with ``.nir``.  What NIR cannot express (e.g. the non-zero initial potentials of advanced
calibration) is one ``NIRExportError`` line naming the layer; nothing is written.  See
docs/nir.md.
"""

from __future__ import annotations

import argparse
import os

import calib_engine as E
import main_calibration_quantize_cbp as mq
import nir_calibration
import torch

from cbp import nir_export as ne
from cbp import nir_torch
from cbp.runtime import UserError, positive_float, run_main, select_device


def parse_args(argv=None) -> argparse.Namespace:
    """The flags of ``main_calibration_quantize_cbp.py --evaluate CKPT``, plus the output."""
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--export_nir", default=None, metavar="PATH",
                       help="output file (default: the checkpoint's name with .nir)")
    extra.add_argument("--dt", type=positive_float, default=ne.DEFAULT_DT,
                       help="time step in seconds the NIR time constants refer to")
    own, rest = extra.parse_known_args(argv)
    args = mq.parse_args(rest)
    if args.evaluate is None:
        raise UserError("--evaluate CKPT is required: the CBP checkpoint to export")
    args.export_nir, args.dt = own.export_nir, own.dt
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    out = args.export_nir or os.path.splitext(args.evaluate)[0] + ".nir"
    device = select_device(args.device)
    snn_q = E.load_cbp_checkpoint(args, args.evaluate, device)
    try:  # what NIR cannot express is refused before any data is read
        nir_calibration.calibration_graph(snn_q, dt=args.dt)
    except ne.NIRExportError as exc:
        raise ne.NIRExportError(f"{exc}; {out} not written") from None
    E.seed_all(args.seed)
    _, test_loader = E.loaders(args, device)
    images, _ = next(iter(test_loader))
    images = images.to(device, torch.float32)
    shape = tuple(images.shape[1:])
    result = ne.write_checked(
        lambda: nir_calibration.calibration_graph(snn_q, shape, args.dt),
        lambda data: nir_calibration.compare(snn_q, nir_torch.load(data, device=device), images),
        out)
    print(result.report(out, args.quant, args.T, args.dt, images.shape[0], "IF"))


if __name__ == "__main__":
    run_main(main)
