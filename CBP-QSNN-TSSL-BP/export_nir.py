"""Export a TSSL-BP network to NIR (Neuromorphic Intermediate Representation).

Examples (working directory = CBP-QSNN-TSSL-BP/):
    python export_nir.py -config Networks/CIFAR10_ter.yaml
    python export_nir.py -config Networks/DIGITS_bin.yaml -quant fp32 -export_nir net.nir

Reads the checkpoint the matching evaluation reads (``main_quantize_cbp.py -mode eval`` for the
config's mode or ``-quant``, with ``-method``; ``main_train_fp32.py -mode eval`` for
``-quant fp32``; ``-checkpoint`` overrides both), exports the network (quantized layers with
their exact quantized weights; see nir_tsslbp.py for the mapping), reads the exact bytes back
with ``cbp.nir_torch`` and checks on the first test batch that every layer's spikes at every
step and the output trace are identical.  Only then is the file written (atomically), by
default ./trained_params/TSSL_BP_<DS>_<quant>.nir.  What NIR cannot express is one
``NIRExportError`` line naming the layer; nothing is written.  See docs/nir.md.
"""

from __future__ import annotations

import argparse

import nir_tsslbp
import torch

from cbp import MODES, methods, nir_torch
from cbp import distributed as D
from cbp import nir_export as ne
from cbp.runtime import UserError, positive_float, run_main, seed_everything

import engine


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Export a TSSL-BP network to NIR")
    engine.add_common_args(p)
    p.add_argument("-quant", type=str, default=None, choices=["fp32", *MODES],
                   help="fp32 (the pretrained network) or a quantization mode (default: the "
                        "config's Network.mode, fp32 if it is null)")
    methods.add_method_flag(p, "-")
    p.add_argument("-export_nir", "--export_nir", default=None, metavar="PATH",
                   help="output file (default ./trained_params/TSSL_BP_<DS>_<quant>.nir)")
    p.add_argument("-dt", "--dt", type=positive_float, default=ne.DEFAULT_DT,
                   help="time step in seconds the NIR time constants refer to")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    dataset, tag = engine.config_names(args.config or "")
    fp32 = args.quant == "fp32"
    params = engine.load_config(args.config, None if fp32 else args.quant)
    mode = params["Network"].get("mode")
    fp32 = fp32 or mode is None
    args.quant = "fp32" if fp32 else (args.quant or tag or mode)
    out = ne.output_path(args, f"./trained_params/TSSL_BP_{dataset}_{args.quant}.nir")
    device = engine.setup_device(args)
    seed_everything(args.seed)
    with D.collective():
        train_dl, test_dl = engine.loaders(params["Network"], args.workers, args.download)
        net = engine.build(params, train_dl, device, quantize=not fp32)
    try:  # what NIR cannot express is refused before any checkpoint is read
        nir_tsslbp.tsslbp_graph(net, dt=args.dt)
    except ne.NIRExportError as exc:
        raise ne.NIRExportError(f"{exc}; {out} not written") from None
    if fp32:
        engine.load_pretrained(net, args, dataset)
    elif not net.q_layers_list:
        raise UserError(f"{args.config}: no layer has qtype q, nothing to quantize "
                        "(-quant fp32 exports the fp32 network)")
    else:
        engine.load_prequantized(net, args, params, dataset)
    net.eval()
    images, _ = next(iter(test_dl))
    images = images.to(device, torch.float32)

    result = ne.write_checked(
        lambda: nir_tsslbp.tsslbp_graph(net, dt=args.dt),
        lambda data: nir_tsslbp.compare(net, nir_torch.load(data, device=device), images),
        out)
    print(result.report(out, args.quant, int(params["Network"]["n_steps"]), args.dt,
                        images.shape[0]))


if __name__ == "__main__":
    run_main(main)
