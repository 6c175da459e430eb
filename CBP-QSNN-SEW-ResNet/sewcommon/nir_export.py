"""NIR export of the DVS 7B-Net family (``ResNetN``: SEW ADD, plain and spiking-ResNet blocks).

The multi-step network is rebuilt as a single-step one from NIR-mappable layers
(``cbp.nir_export``) and exported with spikingjelly; one graph step takes one event frame
``[N, 2, H, W]`` and returns that step's logits.  Submodules keep the original names, so the
PLIF layer ``conv.1.conv.0.1`` becomes the NIR node ``conv_1_conv_0_plif``.

* conv (quantized or not) -> ``nir.Conv2d`` holding the exact weight the forward uses;
* BatchNorm2d -> a separate diagonal 1x1 ``nir.Conv2d`` (weights of the conv stay exact);
* PLIF -> ``nir.LIF`` (``tau = dt / sigmoid(w)``, ``r = 1``, ``v_leak = v_reset = 0``);
* SEW ADD and the spiking-ResNet shortcut -> two edges into the consumer (NIR sums inputs);
* MaxPool2d over integer spike counts -> ``nir.CubaLIF`` step neurons around ``nir.AvgPool2d``
  (``cbp.nir_export.IntegerMaxPool2d``);
* Flatten + output Linear -> ``nir.Flatten`` + ``nir.Affine`` per step; the network's logits
  are the mean over T of the per-step logits (the original takes the mean of the features
  first: equal up to float32 rounding, bounded by ``cbp.nir_export.affine_mean_bound``).
* AND / IAND connect functions (element-wise products) have no NIR node and are refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from spikingjelly.activation_based import layer
from torch import Tensor, nn

from cbp import nir_export as ne

from .dvsnets import BasicBlock, PlainBlock, SEWBlock
from .neurons import reset_net

if TYPE_CHECKING:
    import nir


class ConvBN(nn.Module):
    """conv -> BatchNorm (as a 1x1 conv), single step."""

    def __init__(self, name: str, seq: nn.Module) -> None:
        super().__init__()
        if not isinstance(seq, layer.SeqToANNContainer) or len(seq) != 2:
            raise ne.NIRExportError(f"cannot export layer '{name}' ({type(seq).__name__}): "
                                    "expected SeqToANNContainer(conv, BatchNorm2d)")
        self.conv = ne.plain_layer(f"{name}.0", seq[0])
        self.bn = ne.bn_as_conv(f"{name}.1", seq[1])

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class Unit(nn.Module):
    """conv -> BN -> PLIF (``nn.Sequential(SeqToANNContainer(conv, bn), plif)``)."""

    def __init__(self, name: str, seq: nn.Module) -> None:
        super().__init__()
        if not isinstance(seq, nn.Sequential) or len(seq) != 2:
            raise ne.NIRExportError(f"cannot export layer '{name}' ({type(seq).__name__}): "
                                    "expected Sequential(SeqToANNContainer(conv, bn), PLIF)")
        self.conv = ConvBN(f"{name}.0", seq[0])
        self.plif = ne.plif_neuron(f"{name}.1", seq[1])

    def forward(self, x: Tensor) -> Tensor:
        return self.plif(self.conv(x))


class SEWAdd(nn.Module):
    """SEW block with ADD: ``conv(x) + x``."""

    def __init__(self, name: str, block: SEWBlock) -> None:
        super().__init__()
        self.conv = nn.Sequential(*(Unit(f"{name}.conv.{i}", u) for i, u in enumerate(block.conv)))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) + x


class Plain(nn.Module):
    """Two units without a shortcut."""

    def __init__(self, name: str, block: PlainBlock) -> None:
        super().__init__()
        self.conv = nn.Sequential(*(Unit(f"{name}.conv.{i}", u) for i, u in enumerate(block.conv)))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Basic(nn.Module):
    """Spiking ResNet block: ``sn(x + BN(conv(unit(x))))``."""

    def __init__(self, name: str, block: BasicBlock) -> None:
        super().__init__()
        self.conv = nn.Sequential(Unit(f"{name}.conv.0", block.conv[0]),
                                  ConvBN(f"{name}.conv.1", block.conv[1]))
        self.sn = ne.plif_neuron(f"{name}.sn", block.sn)

    def forward(self, x: Tensor) -> Tensor:
        return self.sn(x + self.conv(x))


class SingleStep(nn.Module):
    """The single-step, NIR-exportable network: ``out(conv(frame))`` per step.

    ``plif_nodes`` maps each original PLIF layer name to its NIR node name;
    ``features_node`` names the Flatten node (the input of the output layer)."""

    def __init__(self, conv: nn.Sequential, out: nn.Module, plif_nodes: dict[str, str],
                 features_node: str) -> None:
        super().__init__()
        self.conv = conv
        self.out = out
        self.plif_nodes = plif_nodes
        self.features_node = features_node

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.conv(x))


def _plif_names(prefix: str, module: nn.Module) -> list[str]:
    from spikingjelly.activation_based.neuron import ParametricLIFNode

    return [f"{prefix}.{n}" for n, m in module.named_modules()
            if isinstance(m, ParametricLIFNode)]


def to_single_step(net: nn.Module) -> SingleStep:
    """Rebuild ``net`` (a ``ResNetN``) from NIR-mappable single-step layers; a layer that has no
    NIR counterpart raises :class:`cbp.nir_export.NIRExportError` naming it."""
    if not isinstance(getattr(net, "conv", None), nn.Sequential) or not isinstance(
            getattr(net, "out", None), nn.Linear):
        raise ne.NIRExportError(f"cannot export {type(net).__name__}: expected a ResNetN "
                                "(a 'conv' Sequential and an 'out' Linear)")
    parts: list[nn.Module] = []
    plif_nodes: dict[str, str] = {}
    features = None
    levels: int | None = None  # the input maps hold integers in [0, levels] (None: analog)
    for i, m in enumerate(net.conv):
        name, kind = f"conv.{i}", type(m).__name__
        if features is not None:
            raise ne.NIRExportError(f"cannot export layer '{name}' ({kind}): layers after the "
                                    "Flatten are not part of the 7B-Net layout")
        if isinstance(m, SEWBlock):
            if m.connect_f != "ADD":
                raise ne.NIRExportError(
                    f"cannot export layer '{name}' (SEWBlock, connect_f={m.connect_f!r}): NIR "
                    "has no node for the element-wise product; only ADD maps")
            part, levels = SEWAdd(name, m), None if levels is None else levels + 1
        elif isinstance(m, PlainBlock):
            part, levels = Plain(name, m), 1
        elif isinstance(m, BasicBlock):
            part, levels = Basic(name, m), 1
        elif isinstance(m, layer.SeqToANNContainer) and len(m) == 1:
            part = ne.integer_max_pool(f"{name}.0", m[0], levels)
        elif isinstance(m, nn.Sequential) and not isinstance(m, layer.SeqToANNContainer):
            part, levels = Unit(name, m), 1
        elif isinstance(m, nn.Flatten):
            if (m.start_dim, m.end_dim) != (2, -1):
                raise ne.NIRExportError(f"cannot export layer '{name}' (Flatten): expected "
                                        "Flatten(2) over [T, N, C, H, W]")
            part, features = nn.Flatten(1), ne.node_name(name)
        else:
            raise ne.NIRExportError(f"cannot export layer '{name}' ({kind}): NIR has no node "
                                    "for it")
        parts.append(part)
        olds, news = _plif_names(name, m), _plif_names(name, part)
        if len(olds) != len(news):
            raise ne.NIRExportError(f"cannot export layer '{name}' ({kind}): it holds "
                                    f"{len(olds)} PLIF layers, the rebuilt one {len(news)}")
        plif_nodes.update((o, ne.node_name(n)) for o, n in zip(olds, news))
    if features is None:
        raise ne.NIRExportError(f"cannot export {type(net).__name__}: no Flatten before 'out'")
    out = ne.plain_layer("out", net.out)
    return SingleStep(nn.Sequential(*parts), out, plif_nodes, features).eval()


def export(net: nn.Module, frames: Tensor, path: str | None = None,
           dt: float = ne.DEFAULT_DT) -> nir.NIRGraph:
    """Export ``net`` as a ``nir.NIRGraph`` (written atomically to ``path`` if given);
    ``frames``: an input batch ``[N, T, 2, H, W]`` (only its shape is used).  The graph maps
    one frame to that step's logits; ``dt``, T and the conventions go into its metadata."""
    single = to_single_step(net)
    meta = {"network": type(net).__name__, "timesteps": int(frames.shape[1]),
            "input": "one event frame [2, H, W] per step",
            "output": "per-step logits; the network's logits are their mean over the steps"}
    graph = ne.export(single, frames[:1, 0], dt=dt, metadata=meta)
    missing = sorted(set(single.plif_nodes.values()) - set(graph.nodes))
    if missing:
        raise ne.NIRExportError(f"cannot export {type(net).__name__}: PLIF nodes {missing} are "
                                "missing from the graph")
    if path is not None:
        ne.save(graph, path)
    return graph


def load(source: str | os.PathLike | bytes | nir.NIRGraph,
         device: str | torch.device = "cpu") -> nn.Module:
    """Import an exported 7B-Net graph with spikingjelly, PLIF nodes integrating by product."""
    return ne.load(source, device=device, multiply_lif=True)


@dataclass
class RoundTrip:
    """How an imported graph compares with the network on one batch."""

    mismatches: dict[str, int]  # differing spikes per PLIF layer (over all steps)
    spikes: dict[str, int]  # spikes of the network per PLIF layer (over all steps)
    outputs: dict[str, int]  # neuron outputs per PLIF layer (neurons x samples x steps)
    features_equal: bool  # the output layer's inputs at every step
    max_logit_diff: float
    logits_within_bound: bool  # |diff| <= affine_mean_bound everywhere
    bound: float  # largest per-logit bound
    logits: dict[str, Tensor] = field(default_factory=dict)  # 'network', 'graph'

    @property
    def exact(self) -> bool:
        return (self.features_equal and self.logits_within_bound
                and not any(self.mismatches.values()))

    def problem(self) -> str:
        bad = {k: v for k, v in self.mismatches.items() if v}
        return (f"mismatching spikes per PLIF layer: {bad}, output-layer inputs equal: "
                f"{self.features_equal}, logits max |diff| {self.max_logit_diff:.3g} "
                f"(bound {self.bound:.3g})")


@torch.no_grad()
def compare(net: nn.Module, graph_module: nn.Module, frames: Tensor,
            record: Callable[[nn.Module, list[Tensor]], ne.Recording] = ne.record,
            ) -> RoundTrip:
    """Run ``net`` on ``frames`` ``[N, T, 2, H, W]`` and the imported graph step by step, and
    compare every PLIF layer's spikes, the output layer's inputs and the logits.
    ``record(graph_module, steps)``: the graph's outputs and spikes per neuron node name
    (default: spikingjelly's graph modules; other simulators' imports need their own)."""
    single = to_single_step(net)
    flatten = net.conv[-1]
    plifs = {n: m for n, m in net.named_modules() if n in single.plif_nodes}
    ref: dict[str, Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, n=n: ref.__setitem__(n, out.clone()))
               for n, m in [*plifs.items(), ("features", flatten)]]
    reset_net(net)
    try:
        logits = net(frames)
    finally:
        for h in handles:
            h.remove()
        reset_net(net)

    steps: list[Tensor] = []
    hook = getattr(graph_module, single.features_node).register_forward_hook(
        lambda _m, _i, out: steps.append(out.clone()))
    try:
        got = record(graph_module, [frames[:, t] for t in range(frames.shape[1])])
    finally:
        hook.remove()
    mismatches, spikes = ne.spike_mismatches(ref, got.spikes, single.plif_nodes)
    outputs = {orig: ref[orig].numel() for orig in single.plif_nodes}
    features = torch.stack(steps) if steps else torch.empty(0)
    graph_logits = got.outputs.mean(0)
    if graph_logits.shape != logits.shape:
        return RoundTrip(mismatches, spikes, outputs, False, float("inf"), False, float("nan"))
    bound = ne.affine_mean_bound(net.out.weight, net.out.bias, features)
    diff = (graph_logits - logits).abs()
    return RoundTrip(mismatches, spikes, outputs,
                     features.shape == ref["features"].shape and torch.equal(features,
                                                                            ref["features"]),
                     float(diff.max()), bool((diff <= bound).all()), float(bound.max()),
                     {"network": logits, "graph": graph_logits})


def export_checked(net: nn.Module, frames: Tensor, path: str, dt: float = ne.DEFAULT_DT,
                   device: str | torch.device = "cpu", label: str = "") -> str:
    """Export ``net`` to ``path`` only if the file's bytes, imported back, reproduce it on
    ``frames`` (:func:`compare`); the one-line report of an export script.  A layer without a
    NIR node or a differing round trip is one ``UserError`` line and nothing is written."""
    result = ne.write_checked(lambda: export(net, frames, dt=dt),
                              lambda blob: compare(net, load(blob, device=device), frames), path)
    label = label or type(net).__name__
    return (f"exported {path} ({label}, T={frames.shape[1]}, dt={dt:g}): round trip exact on "
            f"{frames.shape[0]} test samples, spikes identical in all {len(result.spikes)} "
            f"PLIF layers ({sum(result.spikes.values())} spikes), logits max |diff| "
            f"{result.max_logit_diff:.2g} (float32 bound {result.bound:.2g})")
