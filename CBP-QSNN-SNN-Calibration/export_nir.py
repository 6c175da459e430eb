"""Export a CBP-quantized spiking VGG to NIR (Neuromorphic Intermediate Representation) - or
say, in one line naming the layer, why it cannot be.

Run from this folder, with the flags of the ``--evaluate CKPT`` command:
    python export_nir.py --dataset CIFAR10 --arch VGG16 --T 32 --quant bin --evaluate ./logs/<run>_0_ckpt.pth

The converted network's IF layers reset by subtraction: a spike takes theta off the potential
and keeps the rest, u - theta, for the next step.  NIR's IF neuron resets to ``v_reset``
(and so do spikingjelly's, snnTorch's and Norse's imports of it), so no file can reproduce
the network and the export ends with one ``NIRExportError`` line naming the first spiking
layer; nothing is written.  See docs/nir.md.
"""

from __future__ import annotations

import argparse
import os

import calib_engine as E
import main_calibration_quantize_cbp as mq
from torch import nn

from cbp import nir_export as ne
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


def check_exportable(snn: nn.Module) -> None:
    """Raise :class:`cbp.nir_export.NIRExportError` naming the first spiking layer NIR cannot
    express (every IF layer of this pipeline resets by subtraction)."""
    for name, m in snn.spike_modules():
        raise ne.NIRExportError(
            f"cannot export layer '{name}' ({type(m).__name__}): reset by subtraction (a spike "
            "keeps u - theta for the next step; NIR's IF resets to v_reset)")
    raise ne.NIRExportError(f"cannot export {type(snn).__name__}: it has no spiking layers")


def main(argv=None) -> None:
    args = parse_args(argv)
    out = args.export_nir or os.path.splitext(args.evaluate)[0] + ".nir"
    snn_q = E.load_cbp_checkpoint(args, args.evaluate, select_device(args.device))
    try:
        check_exportable(snn_q)
    except ne.NIRExportError as exc:
        raise ne.NIRExportError(f"{exc}; {out} not written") from None


if __name__ == "__main__":
    run_main(main)
