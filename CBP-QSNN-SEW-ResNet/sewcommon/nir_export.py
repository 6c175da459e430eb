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

The ImageNet SEW-ResNets (``imagenet_nets.SEWResNet``, ADD) map the same way
(:func:`imagenet_single_step`): the image is the input at every step, IF neurons become
``nir.IF`` (``r = 1 / dt``), the stem's max pooling (padding 1) of 0/1 spikes the same step
neurons around a padded ``nir.AvgPool2d``, the global average pooling an ``nir.AvgPool2d`` over
the whole feature map, ``fc`` an ``nir.Affine`` per step.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
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

    input_kind = "one event frame [2, H, W] per step"
    neuron_kind = "PLIF"

    def __init__(self, conv: nn.Sequential, out: nn.Module, plif_nodes: dict[str, str],
                 features_node: str) -> None:
        super().__init__()
        self.conv = conv
        self.out = out
        self.plif_nodes = plif_nodes
        self.features_node = features_node
        # the original module whose output [T, N, ...] are the features
        self.features_of = f"conv.{len(conv) - 1}"

    @property
    def head(self) -> nn.Module:
        """The output layer."""
        return self.out

    @staticmethod
    def steps(x: Tensor) -> list[Tensor]:
        """The per-step graph inputs of a network input ``[N, T, 2, H, W]``."""
        return [x[:, t] for t in range(x.shape[1])]

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.conv(x))


def _plif_names(prefix: str, module: nn.Module) -> list[str]:
    from spikingjelly.activation_based.neuron import IFNode, ParametricLIFNode

    return [f"{prefix}.{n}" for n, m in module.named_modules()
            if isinstance(m, (ParametricLIFNode, IFNode))]


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


def single_step(net: nn.Module, x: Tensor) -> nn.Module:
    """The single-step rebuild of a DVS ``ResNetN`` (:func:`to_single_step`) or an ImageNet
    ``SEWResNet`` (:func:`imagenet_single_step`); ``x``: a network input batch."""
    from .imagenet_nets import SEWResNet

    if isinstance(net, SEWResNet):
        return imagenet_single_step(net, x)
    return to_single_step(net)


def export(net: nn.Module, frames: Tensor, path: str | None = None,
           dt: float = ne.DEFAULT_DT) -> nir.NIRGraph:
    """Export ``net`` as a ``nir.NIRGraph`` (written atomically to ``path`` if given);
    ``frames``: an input batch, ``[N, T, 2, H, W]`` event frames for the DVS networks,
    ``[N, 3, H, W]`` images for ImageNet (only its shape is used).  The graph maps one step's
    input to that step's logits; ``dt``, T and the conventions go into its metadata."""
    single = single_step(net, frames)
    steps = single.steps(frames)
    meta = {"network": type(net).__name__, "timesteps": len(steps),
            "input": single.input_kind,
            "output": "per-step logits; the network's logits are their mean over the steps"}
    graph = ne.export(single, steps[0][:1], dt=dt, metadata=meta)
    missing = sorted(set(single.plif_nodes.values()) - set(graph.nodes))
    if missing:
        raise ne.NIRExportError(f"cannot export {type(net).__name__}: neuron nodes {missing} "
                                "are missing from the graph")
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

    mismatches: dict[str, int]  # differing spikes per spiking layer (over all steps)
    spikes: dict[str, int]  # spikes of the network per spiking layer (over all steps)
    outputs: dict[str, int]  # neuron outputs per spiking layer (neurons x samples x steps)
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
        return (f"mismatching spikes per spiking layer: {bad}, output-layer inputs equal: "
                f"{self.features_equal}, logits max |diff| {self.max_logit_diff:.3g} "
                f"(bound {self.bound:.3g})")


@torch.no_grad()
def compare(net: nn.Module, graph_module: nn.Module, frames: Tensor,
            record: Callable[[nn.Module, list[Tensor]], ne.Recording] = ne.record,
            ) -> RoundTrip:
    """Run ``net`` on ``frames`` (its input batch) and the imported graph step by step, and
    compare every spiking layer's spikes, the output layer's inputs and the logits.
    ``record(graph_module, steps)``: the graph's outputs and spikes per neuron node name
    (default: spikingjelly's graph modules; other simulators' imports need their own)."""
    single = single_step(net, frames)
    features_of = net.get_submodule(single.features_of)
    plifs = {n: m for n, m in net.named_modules() if n in single.plif_nodes}
    ref: dict[str, Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, n=n: ref.__setitem__(n, out.clone()))
               for n, m in [*plifs.items(), ("features", features_of)]]
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
        got = record(graph_module, single.steps(frames))
    finally:
        hook.remove()
    ref["features"] = ref["features"].flatten(2)
    mismatches, spikes = ne.spike_mismatches(ref, got.spikes, single.plif_nodes)
    outputs = {orig: ref[orig].numel() for orig in single.plif_nodes}
    features = torch.stack(steps) if steps else torch.empty(0)
    graph_logits = got.outputs.mean(0)
    if graph_logits.shape != logits.shape:
        return RoundTrip(mismatches, spikes, outputs, False, float("inf"), False, float("nan"))
    bound = ne.affine_mean_bound(single.head.weight, single.head.bias, features)
    diff = (graph_logits - logits).abs()
    return RoundTrip(mismatches, spikes, outputs,
                     features.shape == ref["features"].shape and torch.equal(features,
                                                                            ref["features"]),
                     float(diff.max()), bool((diff <= bound).all()), float(bound.max()),
                     {"network": logits, "graph": graph_logits})


# ----------------------------------------------------------------------------- ImageNet
class ImageNetBlock(nn.Module):
    """A SEW ``BasicBlock`` / ``Bottleneck`` with ADD: ``sn_k(conv_k(...sn1(conv1(x))))`` plus
    the shortcut (``x`` or ``downsample(x)`` = IF(BN(conv1x1(x))))."""

    def __init__(self, name: str, block: nn.Module) -> None:
        super().__init__()
        kind = type(block).__name__
        if block.connect_f != "ADD":
            raise ne.NIRExportError(
                f"cannot export layer '{name}' ({kind}, connect_f={block.connect_f!r}): NIR has "
                "no node for the element-wise product; only ADD maps")
        self.depth = 3 if hasattr(block, "conv3") else 2
        for k in range(1, self.depth + 1):
            setattr(self, f"conv{k}", ConvBN(f"{name}.conv{k}", getattr(block, f"conv{k}")))
            setattr(self, f"sn{k}", ne.if_neuron(f"{name}.sn{k}", getattr(block, f"sn{k}")))
        self.downsample = None
        if block.downsample is not None:
            ds = block.downsample
            if not isinstance(ds, nn.Sequential) or len(ds) != 2:
                raise ne.NIRExportError(f"cannot export layer '{name}.downsample' "
                                        f"({type(ds).__name__}): expected Sequential(conv+BN, IF)")
            self.downsample = nn.Sequential(ConvBN(f"{name}.downsample.0", ds[0]),
                                            ne.if_neuron(f"{name}.downsample.1", ds[1]))

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for k in range(1, self.depth + 1):
            out = getattr(self, f"sn{k}")(getattr(self, f"conv{k}")(out))
        return out + (x if self.downsample is None else self.downsample(x))


class ImageNetSingleStep(nn.Module):
    """The single-step, NIR-exportable ImageNet SEW-ResNet: the image at every step, the
    stem (conv1 -> BN -> IF -> max pooling of the 0/1 spikes), the SEW blocks, global average
    pooling and ``fc``; submodules keep the original names."""

    input_kind = "the image [3, H, W] at every step"
    neuron_kind = "IF"
    features_of = "avgpool"

    def __init__(self, net: nn.Module, example: Tensor) -> None:
        super().__init__()
        self.T = int(net.T)
        self.conv1 = ne.plain_layer("conv1", net.conv1)
        self.bn1 = ne.bn_as_conv("bn1", net.bn1)
        self.sn1 = ne.if_neuron("sn1", net.sn1)
        pool = net.maxpool[0] if isinstance(net.maxpool, layer.SeqToANNContainer) else net.maxpool
        self.maxpool = ne.integer_max_pool("maxpool.0", pool, 1)  # of the 0/1 spikes of sn1
        for i in range(1, 5):
            name = f"layer{i}"
            setattr(self, name, nn.Sequential(*(ImageNetBlock(f"{name}.{j}", b)
                                                for j, b in enumerate(getattr(net, name)))))
        avg = net.avgpool[0] if isinstance(net.avgpool, layer.SeqToANNContainer) else net.avgpool
        if not isinstance(avg, nn.AdaptiveAvgPool2d) or tuple(np.broadcast_to(
                avg.output_size, 2)) != (1, 1):
            raise ne.NIRExportError(f"cannot export layer 'avgpool' ({type(avg).__name__}): "
                                    "expected global average pooling")
        with torch.no_grad():  # the feature map's size sets the pooling kernel
            side = self.body(example[:1].to(self.conv1.weight.device)).shape[-2:]
        reset_net(self)
        self.avgpool = nn.AvgPool2d(tuple(side))
        self.flatten = nn.Flatten(1)
        self.fc = ne.plain_layer("fc", net.fc)
        self.features_node = "flatten"
        theirs = [n.removeprefix(".") for n in _plif_names("", net)]
        self.plif_nodes = {n: ne.node_name(n) for n in theirs}
        ours = {n.removeprefix(".") for n in _plif_names("", self)}
        if ours != set(theirs):
            raise ne.NIRExportError(f"cannot export {type(net).__name__}: IF layers "
                                    f"{sorted(ours ^ set(self.plif_nodes))} do not match")

    @property
    def head(self) -> nn.Module:
        return self.fc

    def steps(self, x: Tensor) -> list[Tensor]:
        """The per-step graph inputs of an image batch ``[N, 3, H, W]``: the batch T times."""
        return [x] * self.T

    def body(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.sn1(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.avgpool(self.body(x))))


def imagenet_single_step(net: nn.Module, example: Tensor) -> ImageNetSingleStep:
    """Rebuild an ImageNet ``SEWResNet`` (ADD) from NIR-mappable single-step layers; a layer
    without a NIR counterpart raises :class:`cbp.nir_export.NIRExportError` naming it."""
    return ImageNetSingleStep(net, example).eval()


def export_checked(net: nn.Module, frames: Tensor, path: str, dt: float = ne.DEFAULT_DT,
                   device: str | torch.device = "cpu", label: str = "") -> str:
    """Export ``net`` to ``path`` only if the file's bytes, imported back, reproduce it on
    ``frames`` (:func:`compare`); the one-line report of an export script.  A layer without a
    NIR node or a differing round trip is one ``UserError`` line and nothing is written."""
    result = ne.write_checked(lambda: export(net, frames, dt=dt),
                              lambda blob: compare(net, load(blob, device=device), frames), path)
    label = label or type(net).__name__
    single = single_step(net, frames)
    steps, kind = len(single.steps(frames)), single.neuron_kind
    return (f"exported {path} ({label}, T={steps}, dt={dt:g}): round trip exact on "
            f"{frames.shape[0]} test samples, spikes identical in all {len(result.spikes)} "
            f"{kind} layers ({sum(result.spikes.values())} spikes), logits max |diff| "
            f"{result.max_logit_diff:.2g} (float32 bound {result.bound:.2g})")


def export_checkpoint(model: nn.Module, checkpoint: str, test_set, batch_size: int, workers: int,
                      path: str, dt: float, device: torch.device, label: str) -> str:
    """An export script's work: ``checkpoint`` loaded into ``model`` as the test-only run
    loads it, then :func:`export_checked` on the first batch that run evaluates."""
    from torch.utils.data import DataLoader

    from cbp.checkpoint import load_into

    from .engine import load_checkpoint_file

    model = model.to(device).eval()
    load_into(model, load_checkpoint_file(checkpoint), nonfinite="warn")
    loader = DataLoader(test_set, batch_size=batch_size, shuffle=False, num_workers=workers)
    frames = next(iter(loader))[0].to(device).float()
    return export_checked(model, frames, path, dt, device, label)
