"""The STBP network as NIR: its layers in firing order, each followed by the STBP neuron.

The STBP network (``Conv_SNN`` / ``Q_Conv_SNN``) is rebuilt as a plain chain of
``nn.Conv2d`` / ``nn.Linear`` layers, each followed by a spikingjelly ``CUBALIFNode``, and
exported with :func:`cbp.nir_export.export`.  Quantized layers contribute the weight their
forward pass uses (levels x scale), so the file holds the exact float32 weights.

How the STBP neuron maps (``u[t] = decay * u[t-1] * (1 - s[t-1]) + I[t]``, ``s = u > thresh``):

* ``nir.CubaLIF`` with ``tau_syn = dt``, ``tau_mem = dt / (1 - decay)``, ``r = tau_mem / dt``,
  ``w_in = 1``, ``v_leak = 0``, ``v_reset = 0``.  spikingjelly imports it as
  ``CUBALIFNode(c_decay=0, v_decay=decay)`` (forward Euler), whose membrane update is bitwise
  the STBP one; the multiplicative reset ``(1 - s)`` equals a hard reset to 0.
* STBP fires on ``u > thresh``, as NIR's neurons do: the file's ``v_threshold`` is ``thresh``.
  The spikingjelly copy fires on ``u >= above(thresh)`` (the next float32), the same spikes on
  every float32 membrane value; ``cbp.nir_export`` converts between the two rules.
* decay, thresh and T are stored in the graph's metadata beside ``dt``.
* The analog image is the input at every step (STBP computes ``conv1(image)`` once and reuses
  it; recomputing it each step gives the same values).  The network output, the mean over T
  of the last layer's spikes, is computed outside the graph (``cbp.nir_export.rate``).
"""

from __future__ import annotations

from collections import OrderedDict

import nir
import numpy as np
import torch
from spikingjelly.activation_based import neuron
from torch import Tensor, nn

from cbp import nir_export as ne


def stbp_neuron(decay: float, thresh: float) -> nn.Module:
    """The STBP neuron as a spikingjelly ``CUBALIFNode`` (see the module docstring)."""
    decay, thresh = float(decay), float(thresh)
    if not 0.0 <= decay < 1.0:
        raise ne.NIRExportError(f"cannot export decay {decay}: CubaLIF needs 0 <= decay < 1")
    if not np.isfinite(thresh):
        raise ne.NIRExportError(f"cannot export threshold {thresh}: it must be finite")
    return neuron.CUBALIFNode(c_decay=0.0, v_decay=decay,
                              v_threshold=ne.above(thresh), v_reset=0.0)


def stbp_sequential(model: nn.Module) -> nn.Sequential:
    """The STBP network as an ``nn.Sequential`` of plain layers and ``CUBALIFNode`` neurons.

    ``model`` follows the ``Conv_SNN`` contract: ``decay`` and ``thresh`` attributes and a
    ``spike`` ModuleDict whose keys name its layers in firing order; every layer's output
    feeds a neuron, and the feature map is flattened before the first linear layer.
    """
    names = list(getattr(model, "spike", {}))
    if not names:
        raise ne.NIRExportError(f"cannot export {type(model).__name__}: it has no 'spike' "
                             "ModuleDict naming its spiking layers")
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    flat = False
    for name in names:
        layer = getattr(model, name, None)
        if layer is None:
            raise ne.NIRExportError(f"cannot export layer '{name}': the model has no such layer")
        plain = ne.plain_layer(name, layer)
        if isinstance(plain, nn.Linear) and not flat:
            if parts:
                parts["flatten"] = nn.Flatten()
            flat = True
        elif isinstance(plain, nn.Conv2d) and flat:
            raise ne.NIRExportError(f"cannot export layer '{name}' ({type(layer).__name__}): a "
                                 "convolution after a linear layer is not the STBP layout")
        parts[name] = plain
        parts[name + ne.NEURON_SUFFIX] = stbp_neuron(model.decay, model.thresh)
    return nn.Sequential(parts).eval()


def export_stbp(
    model: nn.Module,
    example_image: Tensor,
    path: str | None = None,
    dt: float = ne.DEFAULT_DT,
) -> nir.NIRGraph:
    """Export the STBP ``model`` as a ``nir.NIRGraph`` (written atomically to ``path`` if given).

    ``example_image``: one input batch ``[N, C, H, W]`` (or one image ``[C, H, W]``); only its
    shape is used.  The graph's input is the image, its output the last layer's spikes (one
    step); ``dt``, decay, thresh and T are stored in ``graph.metadata``.
    """
    seq = stbp_sequential(model)
    example = example_image.detach()[:1] if example_image.dim() == 4 else example_image[None]
    example = example.to(next(seq.parameters()).device)
    return ne.export(seq, example, path, dt, metadata={
        "decay": float(model.decay),
        "thresh": float(model.thresh),
        "timesteps": int(getattr(model, "T", 0)),
    })


@torch.no_grad()
def stbp_recording(model: nn.Module, images: Tensor) -> ne.Recording:
    """``model(images)`` with every layer's spikes ``[T, ...]`` (hooks on ``model.spike``);
    ``outputs`` holds the network output (the mean over T), not per-step values."""
    steps: dict[str, list[Tensor]] = {name: [] for name in model.spike}
    handles = [
        m.register_forward_hook(lambda _m, _i, out, n=n: steps[n].append(out.detach().clone()))
        for n, m in model.spike.items()
    ]
    try:
        out = model(images)
    finally:
        for h in handles:
            h.remove()
    return ne.Recording(out, {n: torch.stack(s) for n, s in steps.items()})


@torch.no_grad()
def compare(model: nn.Module, graph_module: nn.Module, images: Tensor) -> ne.RoundTrip:
    """Run ``model`` and the imported graph of it on ``images`` (T steps) and compare every
    layer's spikes and the output."""
    ref = stbp_recording(model, images)
    got = ne.record(graph_module, [images] * int(model.T))
    rated = ne.Recording(ne.rate(got.outputs), got.spikes)  # the network's output: the mean
    return ne.RoundTrip.of(ref, rated, {n: n + ne.NEURON_SUFFIX for n in ref.spikes})
