"""Export a TSSL-BP network to NIR (Neuromorphic Intermediate Representation) - or say, in one
line naming the layer, why no file can reproduce it.

Run from this folder, with the flags of the evaluation command:
    python export_nir.py -config Networks/CIFAR10_ter.yaml

Every conv/linear layer of TSSL-BP ends in its LIF neuron, and what the layer passes on is the
neuron's post-synaptic trace ``a += (o - a) / tau_s``, an analog first-order filter (NIR's
``LI`` node) that none of spikingjelly, snnTorch and Norse imports; the membrane update
``u + (I - u / tau_m)`` is also not the forward-Euler form their LIF/CubaLIF imports compute.
So no NIR file could be checked spike for spike against the network (the check every export
script makes before writing), and the export ends with one ``NIRExportError`` line naming the
first spiking layer; nothing is written.  See docs/nir.md.
"""

from __future__ import annotations

import argparse

from cbp import MODES
from cbp import nir_export as ne
from cbp.runtime import positive_float, run_main

import engine


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Export a TSSL-BP network to NIR")
    engine.add_common_args(p)
    p.add_argument("-quant", type=str, default=None, choices=list(MODES),
                   help="quantization mode, overrides Network.mode of the config")
    p.add_argument("-export_nir", "--export_nir", default=None, metavar="PATH",
                   help="output file (default ./trained_params/TSSL_BP_<DS>_<quant>.nir)")
    p.add_argument("-dt", "--dt", type=positive_float, default=ne.DEFAULT_DT,
                   help="time step in seconds the NIR time constants refer to")
    return p.parse_args(argv)


def check_exportable(layers: dict, network: str) -> None:
    """Raise :class:`cbp.nir_export.NIRExportError` naming the first spiking layer of the
    ``Layers`` config (every one is a TSSL-BP neuron, see the module docstring)."""
    for name, cfg in layers.items():
        if cfg.get("type") in ("conv", "linear"):
            raise ne.NIRExportError(
                f"cannot export layer '{name}' ({cfg['type']} + TSSL-BP neuron): its output, "
                "the trace a += (o - a) / tau_s, is a NIR LI node that no importer "
                "(spikingjelly, snnTorch, Norse) reads, and its membrane u + (I - u / tau_m) "
                "is not the update their LIF imports compute")
    raise ne.NIRExportError(f"cannot export {network}: it has no spiking layers")


def main(argv=None) -> None:
    args = parse_args(argv)
    dataset, tag = engine.config_names(args.config or "")
    params = engine.load_config(args.config, args.quant)
    quant = args.quant or tag or params["Network"].get("mode") or "fp32"
    out = args.export_nir or f"./trained_params/TSSL_BP_{dataset}_{quant}.nir"
    try:
        check_exportable(dict(params["Layers"]), args.config)
    except ne.NIRExportError as exc:
        raise ne.NIRExportError(f"{exc}; {out} not written") from None


if __name__ == "__main__":
    run_main(main)
