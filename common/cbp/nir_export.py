"""NIR (Neuromorphic Intermediate Representation) export and import for any network that can
be written as a chain of plain layers and spikingjelly neurons, with a check-before-write round
trip.

* :func:`export` writes a single-step module (plain ``nn.Conv2d`` / ``nn.Linear`` /
  ``nn.Flatten`` and spikingjelly neurons) with spikingjelly's ``export_to_nir``; ``dt`` and
  the pipeline's own facts go into the graph's metadata (NIR stores no time step).
* Thresholds follow the NIR spec: a neuron fires on ``v > v_threshold``.  spikingjelly fires on
  ``v >= v_threshold``, so :func:`export` stores the float32 just below each spikingjelly
  threshold (:func:`below`) and :func:`load` raises it back (:func:`above`): the same spikes
  for every float32 membrane value, in spikingjelly and in simulators that follow the spec.
* :func:`load` imports a graph with spikingjelly, using the ``dt`` in its metadata.
* :func:`write_checked` writes a file only after its exact bytes, read back, reproduce the
  network (e.g. :func:`record` compared with the network's own spikes).
* Building blocks for layers NIR has no node for (:func:`bn_as_conv`, integer max pooling,
  PLIF as LIF, the soft-reset IF of :func:`soft_reset_if`) are below.

Each pipeline maps its own network onto these (``CBP-QSNN-STBP/nir_stbp.py``,
``CBP-QSNN-SEW-ResNet/sewcommon/nir_export.py``); TSSL-BP's LIF + LI graphs and
SNN-Calibration's soft-reset IF graphs (integrator, threshold, recurrent reset), which
spikingjelly cannot import, run in :mod:`cbp.nir_torch` (``CBP-QSNN-TSSL-BP/nir_tsslbp.py``,
``CBP-QSNN-SNN-Calibration/nir_calibration.py``).
"""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import NIRExportError, UserError
from .files import write_atomic
from .nn import QuantMixin

if TYPE_CHECKING:
    import nir
    from torch import fx

DEFAULT_DT = 1e-4


def add_export_flags(parser: argparse.ArgumentParser, default_out: str, prefix: str = "--"
                     ) -> None:
    """The export scripts' own flags beside their evaluation's: ``quant`` (``fp32`` or a
    mode), ``export_nir`` (the output file, default ``default_out``) and ``dt`` (with
    ``prefix`` "-" also spelled with two dashes)."""
    from .levels import MODES
    from .runtime import positive_float

    def names(flag: str) -> list[str]:
        return [f"{prefix}{flag}"] + ([f"--{flag}"] if prefix == "-" else [])

    parser.add_argument(f"{prefix}quant", default="fp32", choices=["fp32", *MODES],
                        help="fp32 (the pretrained network, default) or a quantized one "
                             "(whose file the method flag names)")
    parser.add_argument(*names("export_nir"), default=None, metavar="PATH",
                        help=f"output file (default {default_out})")
    parser.add_argument(*names("dt"), type=positive_float, default=DEFAULT_DT,
                        help="time step in seconds the NIR time constants refer to")


def output_path(args: argparse.Namespace, default: str) -> str:
    """``--export_nir``, else ``default`` (with the method in its name for a baseline's
    quantized weights)."""
    from .methods import tagged

    if args.export_nir:
        return args.export_nir
    method = getattr(args, "method", "cbp")
    return default if args.quant == "fp32" else tagged(default, method)
NEURON_SUFFIX = "_lif"  # graph node name of the neuron after layer <name>: <name>_lif


def above(thresh: float) -> float:
    """The next float32 after ``thresh`` towards +inf: ``u >= above(t)`` iff ``u > t`` for
    every float32 ``u``."""
    return float(np.nextafter(np.float32(thresh), np.float32(np.inf)))


def below(thresh: float) -> float:
    """The float32 before ``thresh`` towards -inf: ``u > below(t)`` iff ``u >= t`` for every
    float32 ``u`` (``above(below(t)) == t``)."""
    return float(np.nextafter(np.float32(thresh), np.float32(-np.inf)))


FIRING = "v > v_threshold (the NIR rule)"
SPIKINGJELLY_FIRING = "v >= v_threshold"  # the rule of files written by earlier versions


def nir_thresholds(graph: nir.NIRGraph, shift: Callable[[float], float]) -> nir.NIRGraph:
    """Apply ``shift`` to every neuron threshold of ``graph`` (nested graphs included), in
    place: ``below`` turns spikingjelly thresholds into NIR ones, ``above`` the reverse."""
    for node in graph.nodes.values():
        if hasattr(node, "nodes"):
            nir_thresholds(node, shift)
        elif getattr(node, "v_threshold", None) is not None:
            old = np.asarray(node.v_threshold)
            node.v_threshold = np.vectorize(shift, otypes=[old.dtype])(old) if old.size else old
    return graph


def pool_pairs(graph: nir.NIRGraph) -> nir.NIRGraph:
    """Write every pooling node's ``kernel_size`` / ``stride`` / ``padding`` as the (height,
    width) pair the NIR spec defines (spikingjelly writes one number for square pools), in
    place."""
    import nir

    for node in graph.nodes.values():
        if isinstance(node, nir.NIRGraph):
            pool_pairs(node)
        elif isinstance(node, (nir.AvgPool2d, nir.SumPool2d)):
            for key in ("kernel_size", "stride", "padding"):
                value = np.asarray(getattr(node, key))
                setattr(node, key, np.broadcast_to(value, (2,)).astype(np.int64)
                        if value.size == 1 else value)
    return graph


def spec_firing(graph: nir.NIRGraph) -> bool:
    """Whether ``graph``'s thresholds follow the NIR rule ``v > v_threshold`` (every file this
    module writes); files of earlier versions, whose metadata say ``v >= v_threshold``, hold
    spikingjelly's thresholds."""
    firing = str((graph.metadata or {}).get("firing", ""))
    return not firing.startswith(SPIKINGJELLY_FIRING)


def exact_weight(layer: nn.Module) -> Tensor:
    """The weight ``layer``'s forward uses (the quantized one for cbp quantized layers)."""
    w = layer.quantized_weight() if isinstance(layer, QuantMixin) else layer.weight
    return w.detach().clone()


def plain_layer(name: str, layer: nn.Module) -> nn.Module:
    """A plain ``nn.Conv2d`` / ``nn.Linear`` with ``layer``'s exact weight and bias."""
    kind = type(layer).__name__
    if isinstance(layer, nn.Conv2d):
        problem = None
        if layer.groups != 1:
            problem = f"grouped convolution (groups={layer.groups})"
        elif layer.padding_mode != "zeros":
            problem = f"padding_mode={layer.padding_mode!r}"
        elif isinstance(layer.padding, str):
            problem = f"padding={layer.padding!r}"
        if problem:
            raise NIRExportError(f"cannot export layer '{name}' ({kind}): {problem} has no "
                                 "NIR node")
        plain: nn.Module = nn.Conv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
            layer.padding, layer.dilation, bias=layer.bias is not None,
        )
    elif isinstance(layer, nn.Linear):
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    else:
        raise NIRExportError(f"cannot export layer '{name}' ({kind}): NIR has no node for it")
    plain = plain.to(device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        plain.weight.copy_(exact_weight(layer))
        if layer.bias is not None:
            plain.bias.copy_(layer.bias.detach())
    return plain.requires_grad_(False)


def write_checked(make_graph: Callable[[], nir.NIRGraph], check: Callable[[bytes], Any],
                  path: str) -> Any:
    """Export with ``make_graph()``, check the exact bytes that would be written with
    ``check(data)`` (a result with ``exact`` and ``problem()``, e.g. a round trip on test
    inputs) and write ``path`` (atomically) only if it is exact.  Returns the check's result;
    an export error or a failed check is one ``UserError`` line and nothing is written."""

    try:
        graph = make_graph()
    except NIRExportError as exc:
        raise UserError(str(exc)) from None
    data = to_bytes(graph)
    result = check(data)
    if not result.exact:
        raise UserError(f"round trip differs from the network on the first test batch "
                        f"({result.problem()}); {path} not written")
    save(data, path)
    return result


def to_bytes(graph: nir.NIRGraph) -> bytes:
    """The NIR (HDF5) file contents of ``graph``."""
    import nir

    buffer = io.BytesIO()
    nir.write(buffer, graph)
    return buffer.getvalue()


def save(graph: nir.NIRGraph | bytes, path: str) -> None:
    """Write ``graph`` (or its :func:`to_bytes`) to ``path``; an existing file is replaced only
    by a complete new one."""
    data = graph if isinstance(graph, bytes) else to_bytes(graph)
    write_atomic(path, lambda f: f.write(data))


def read(source: str | os.PathLike | bytes | nir.NIRGraph) -> nir.NIRGraph:
    """A NIR graph from a path, file contents or a graph (returned as is)."""
    import nir

    if isinstance(source, bytes):
        return nir.read(io.BytesIO(source))
    if isinstance(source, (str, os.PathLike)):
        return nir.read(source)
    return source


def graph_dt(graph: nir.NIRGraph, dt: float | None = None) -> float:
    """The time step to run ``graph`` with: ``dt``, else the one in its metadata (else 1e-4).
    A ``dt`` other than the stored one would silently rescale every time constant: an error."""
    stored = graph.metadata.get("dt") if graph.metadata else None
    stored = None if stored is None else float(stored)
    if dt is None:
        return stored if stored is not None else DEFAULT_DT
    if stored is not None and not np.isclose(dt, stored, rtol=1e-9, atol=0.0):
        raise ValueError(f"dt={dt} differs from the dt={stored} the graph was exported with")
    return float(dt)


def load(
    source: str | os.PathLike | bytes | nir.NIRGraph,
    dt: float | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    multiply_lif: bool = False,
    nir_rule: bool = True,
) -> fx.GraphModule:
    """Import a NIR graph with spikingjelly (single-step ``forward(x, state) -> (y, state)``).

    ``dt`` defaults to the one stored in the graph's metadata (else 1e-4); a different ``dt``
    would silently rescale every time constant, so a mismatch is an error.
    ``multiply_lif``: ``nir.LIF`` nodes integrate by multiplying with ``dt / tau`` (see
    :func:`lif_as_product`) instead of dividing by ``tau / dt``.
    ``nir_rule``: every neuron fires on ``v > v_threshold`` as NIR defines (its spikingjelly
    threshold is :func:`above` the stored one); ``False`` keeps the stored thresholds under
    spikingjelly's ``v >= v_threshold``, as ``import_from_nir`` alone does.
    """
    from spikingjelly.activation_based.nir_exchange import import_from_nir

    graph = read(source)
    dt = graph_dt(graph, dt)
    graph_module = import_from_nir(graph, dt=dt, device=str(device), dtype=dtype,
                                   step_mode="s")
    if nir_rule and spec_firing(graph):
        for _, wrapper in neuron_modules(graph_module):
            wrapper.module.v_threshold = above(wrapper.module.v_threshold)
    return lif_as_product(graph_module) if multiply_lif else graph_module


def neuron_modules(graph_module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(node name, module) of every stateful neuron of an imported graph, in graph order."""
    from spikingjelly.activation_based.base import MemoryModule

    return [(n, m) for n, m in graph_module.named_children()
            if isinstance(getattr(m, "module", None), MemoryModule)]


@dataclass
class Recording:
    """Per-step outputs ``[T, ...]`` and per-step spikes of every neuron node ``[T, ...]``."""

    outputs: Tensor
    spikes: dict[str, Tensor] = field(default_factory=dict)


@torch.no_grad()
def record(graph_module: nn.Module, x_steps: Iterable[Tensor]) -> Recording:
    """Run an imported graph over the inputs ``x_steps`` (one tensor per step, e.g. ``[image] *
    T``), passing the state on from step to step, and record every neuron's spikes."""
    steps: dict[str, list[Tensor]] = {name: [] for name, _ in neuron_modules(graph_module)}

    def hook(name: str):
        return lambda _m, _i, out: steps[name].append(out[0].detach().clone())

    handles = [m.register_forward_hook(hook(n)) for n, m in neuron_modules(graph_module)]
    state: Any = None
    outputs = []
    try:
        for x in x_steps:
            y, state = graph_module(x, state)
            outputs.append(y)
    finally:
        for h in handles:
            h.remove()
    if not outputs:
        raise ValueError("x_steps is empty")
    return Recording(torch.stack(outputs), {n: torch.stack(s) for n, s in steps.items() if s})


def run(graph_module: nn.Module, x_steps: Iterable[Tensor]) -> Tensor:
    """The per-step outputs ``[T, ...]`` of an imported graph (state passed between steps)."""
    return record(graph_module, x_steps).outputs


def rate(outputs: Tensor) -> Tensor:
    """The STBP network output: the mean over the steps (dim 0) of the output spikes."""
    return outputs.sum(0) / outputs.shape[0]


def spike_mismatches(reference: dict[str, Tensor], graph: dict[str, Tensor],
                     nodes: dict[str, str]) -> tuple[dict[str, int], dict[str, int]]:
    """Per layer: spikes that differ between the network (``reference[layer]``) and the graph
    (``graph[nodes[layer]]``; all of them when the node is missing or its shape differs), and
    the network's spike count."""
    mismatches, spikes = {}, {}
    for layer, node in nodes.items():
        s, g = reference[layer], graph.get(node)
        spikes[layer] = int(s.sum())
        mismatches[layer] = (int((s != g).sum()) if g is not None and g.shape == s.shape
                             else s.numel())
    return mismatches, spikes


@dataclass
class RoundTrip:
    """How an imported graph compares with the network it was exported from, on one batch."""

    mismatches: dict[str, int]  # differing spikes per layer (over all steps)
    spikes: dict[str, int]  # spikes of the network per layer (over all steps)
    outputs_equal: bool
    max_output_diff: float

    @property
    def exact(self) -> bool:
        return self.outputs_equal and not any(self.mismatches.values())

    def problem(self) -> str:
        bad = {k: v for k, v in self.mismatches.items() if v}
        return (f"mismatching spikes per layer: {bad}, output max |diff| "
                f"{self.max_output_diff:.3g}")

    @classmethod
    def of(cls, ref: Recording, got: Recording, nodes: dict[str, str]) -> RoundTrip:
        """Compare the network's recording ``ref`` with the graph's ``got``: the spikes of every
        layer against its node (``nodes``: layer -> node name) and the outputs, exactly."""
        mismatches, spikes = spike_mismatches(ref.spikes, got.spikes, nodes)
        same = got.outputs.shape == ref.outputs.shape
        diff = float((got.outputs - ref.outputs).abs().max()) if same else np.inf
        return cls(mismatches, spikes, same and torch.equal(got.outputs, ref.outputs), diff)

    def report(self, path: str, label: str, steps: int, dt: float, samples: int,
               kind: str = "") -> str:
        """The export scripts' one line once ``path`` is written."""
        layers = f"{kind} layers" if kind else "layers"
        return (f"exported {path} ({label}, T={steps}, dt={dt:g}): round trip exact on {samples} "
                f"test images, spikes identical in all {len(self.spikes)} {layers} "
                f"({sum(self.spikes.values())} spikes), outputs equal")


# ----------------------------------------------------------------------------- generic pieces
# Building blocks for exporting other single-step networks (see sewcommon/nir_export.py):
#
# * eval BatchNorm2d -> a separate diagonal 1x1 ``nn.Conv2d`` (NIR has no normalisation node;
#   folding it into the preceding convolution would change the quantized weights);
# * max-pooling over small non-negative integers -> stateless threshold neurons around an
#   ``AvgPool2d`` (NIR has no max-pool node);
# * spikingjelly's ``ParametricLIFNode`` -> ``nir.LIF`` (``tau = dt / sigmoid(w)``, ``r = 1``);
# * element-wise addition -> two edges into the consumer (NIR sums a node's inputs).

FP32_UNIT = 2.0**-24  # unit roundoff of float32


def node_name(qualname: str) -> str:
    """The NIR node name :func:`export` gives the submodule ``qualname`` (``a.0.b`` -> ``a_0_b``)."""
    return qualname.replace(".", "_")


def bn_as_conv(name: str, bn: nn.Module) -> nn.Conv2d:
    """Eval-mode ``BatchNorm2d`` as a 1x1 ``nn.Conv2d`` with diagonal weight ``A = gamma /
    sqrt(var + eps)`` and bias ``B = beta - mean * A``.

    Of the usual float32 roundings of ``A`` and ``B``, the first that reproduces ``bn`` bitwise
    on a probe spanning five decades is kept (else the closest; the caller's end-to-end
    comparison remains the judge)."""
    import torch.nn.functional as F

    kind = type(bn).__name__
    if not isinstance(bn, nn.BatchNorm2d):
        raise NIRExportError(f"cannot export layer '{name}' ({kind}): expected BatchNorm2d")
    if bn.running_mean is None or bn.running_var is None:
        raise NIRExportError(f"cannot export layer '{name}' ({kind}): without running "
                             "statistics it normalises with batch statistics")
    c = bn.num_features
    ref = dict(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones(c, **ref)
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros(c, **ref)
    mean, var = bn.running_mean.detach(), bn.running_var.detach()
    std = (var + bn.eps).sqrt()
    scales = [gamma * (1.0 / std), gamma * torch.rsqrt(var + bn.eps), gamma / std]
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(6, c, 8, 8, generator=generator) * torch.logspace(-2, 3, 6).view(
        -1, 1, 1, 1)
    probe = probe.to(**ref) + mean.view(1, -1, 1, 1)
    want = F.batch_norm(probe, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)
    best: tuple[int, nn.Conv2d] | None = None
    with torch.no_grad():
        for a in scales:
            for b in (beta - mean * a,
                      (beta.double() - mean.double() * a.double()).to(beta.dtype)):
                conv = nn.Conv2d(c, c, 1, bias=True).to(**ref).requires_grad_(False)
                conv.weight.zero_()
                conv.weight[range(c), range(c), 0, 0] = a
                conv.bias.copy_(b)
                bad = int((conv(probe) != want).sum())
                if not bad:
                    return conv
                if best is None or bad < best[0]:
                    best = (bad, conv)
    return best[1]


def step_neuron(threshold: float) -> nn.Module:
    """A stateless Heaviside ``y = (x >= threshold)``: spikingjelly's ``CUBALIFNode`` with no
    current or voltage decay, exported as ``nir.CubaLIF(tau_syn = tau_mem = dt)``."""
    from spikingjelly.activation_based import neuron

    return neuron.CUBALIFNode(c_decay=0.0, v_decay=0.0, v_threshold=float(threshold),
                              v_reset=0.0)


class IntegerMaxPool2d(nn.Module):
    """``MaxPool2d(kernel, stride, padding)`` of maps holding integers in ``[0, levels]``,
    built from NIR nodes: ``max = sum_j any_window(x >= j)``, each ``x >= j`` a step neuron at
    ``j - 1/2`` and each ``any`` an ``AvgPool2d`` (zero padding counted, as max pooling of
    non-negative maps may) followed by a step neuron at ``1 / (2 kernel**2)``.
    The thresholds lie half-way between attainable values, so ``>=`` and ``>`` agree."""

    def __init__(self, kernel: int, stride: int, levels: int, padding: int = 0) -> None:
        super().__init__()
        self.levels = int(levels)
        # 0/1 maps need no level neuron
        self.level = nn.ModuleList([step_neuron(j - 0.5) for j in range(1, levels + 1)]
                                   if levels > 1 else [])
        self.pool = nn.ModuleList([nn.AvgPool2d(kernel, stride, padding)
                                   for _ in range(levels)])
        self.any = nn.ModuleList([step_neuron(0.5 / kernel**2) for _ in range(levels)])

    def forward(self, x: Tensor) -> Tensor:
        out = None
        for j in range(self.levels):
            y = self.any[j](self.pool[j](self.level[j](x) if self.levels > 1 else x))
            out = y if out is None else out + y
        return out


def integer_max_pool(name: str, pool: nn.Module, levels: int | None) -> IntegerMaxPool2d:
    """:class:`IntegerMaxPool2d` for ``pool`` (an ``nn.MaxPool2d`` without padding) over maps
    holding integers in ``[0, levels]`` (``None``: not known to hold such integers)."""
    kind = type(pool).__name__

    def pair(v) -> tuple[int, int]:
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    problem = None
    if not isinstance(pool, nn.MaxPool2d):
        problem = "NIR has no node for it"
    elif levels is None or levels < 1:
        problem = "max-pooling maps only to integer spike counts, and its input is analog"
    else:
        k, s = pair(pool.kernel_size), pair(pool.stride or pool.kernel_size)
        if k[0] != k[1] or s[0] != s[1]:
            problem = "non-square kernel or stride"
        elif len(set(pair(pool.padding))) != 1:
            problem = "non-square padding"
        elif pair(pool.dilation) != (1, 1) or pool.ceil_mode:
            problem = "dilation or ceil_mode"
    if problem:
        raise NIRExportError(f"cannot export layer '{name}' ({kind}): {problem}")
    return IntegerMaxPool2d(pair(pool.kernel_size)[0], pair(pool.stride or pool.kernel_size)[0],
                            levels, pair(pool.padding)[0])


def if_neuron(name: str, node: nn.Module) -> nn.Module:
    """A single-step copy of a spikingjelly ``IFNode`` with hard reset (exported as ``nir.IF``
    with ``r = 1 / dt``: ``v += x`` per step)."""
    from spikingjelly.activation_based import neuron

    kind = type(node).__name__
    if type(node) is not neuron.IFNode:
        raise NIRExportError(f"cannot export layer '{name}' ({kind}): expected IFNode")
    if node.v_reset is None:
        raise NIRExportError(f"cannot export layer '{name}' ({kind}): soft reset (NIR's IF "
                             "resets to v_reset)")
    return neuron.IFNode(v_threshold=float(node.v_threshold), v_reset=float(node.v_reset),
                         step_mode="s")


SPIKE_SUFFIX = "_spike"  # soft-reset IF after layer <name>: <name>_v, <name>_spike, <name>_reset
SOFT_RESET_FIRING = ("soft-reset IF: u_t = (u_{t-1} - theta z_{t-1}) + I_t, z_t = u_t > "
                     "v_threshold (I, Threshold and a recurrent Scale(-theta) edge, one step "
                     "late)")


def soft_reset_if(name: str, shape, threshold: float, amplitude: float, dt: float
                  ) -> tuple[dict[str, nir.NIRNode], list[tuple[str, str]]]:
    """An IF neuron that resets by subtraction, ``u_t = (u_{t-1} - a z_{t-1}) + I_t``,
    ``z_t = [u_t >= threshold]`` (spikes of amplitude 1, ``a = amplitude``), as NIR nodes.

    ``<name>_v``: ``nir.I`` with ``r = 1 / dt`` (``v += I`` per step); ``<name>_spike``:
    ``nir.Threshold`` at :func:`below` ``threshold`` (the NIR rule ``>``); ``<name>_reset``:
    ``nir.Scale(-a)`` from the spikes back into ``<name>_v``, a recurrent edge that NIR
    simulators deliver one step late.  The reset edge comes first in the returned edges, so the
    caller's edge from the current into ``<name>_v`` follows it (:mod:`cbp.nir_torch` then
    subtracts before it adds).  ``r`` is stored in float64, the threshold and scale (float32
    values) in float32."""
    import nir

    if not (np.isfinite(threshold) and np.isfinite(amplitude)):
        raise NIRExportError(f"cannot export layer '{name}': threshold {threshold} or spike "
                             f"amplitude {amplitude} is not finite")
    shape = tuple(int(s) for s in shape)
    v, spike, reset = name + "_v", name + SPIKE_SUFFIX, name + "_reset"
    nodes = {
        v: nir.I(r=np.full(shape, 1.0 / dt, dtype=np.float64)),
        spike: nir.Threshold(threshold=np.full(shape, below(threshold), dtype=np.float32)),
        reset: nir.Scale(scale=np.full(shape, -float(amplitude), dtype=np.float32)),
    }
    return nodes, [(reset, v), (v, spike), (spike, reset)]


def plif_neuron(name: str, plif: nn.Module) -> nn.Module:
    """A single-step copy of a spikingjelly ``ParametricLIFNode`` (exported as ``nir.LIF`` with
    ``tau = dt / sigmoid(w)``, ``r = 1``, hard reset)."""
    from spikingjelly.activation_based import neuron

    kind = type(plif).__name__
    if type(plif) is not neuron.ParametricLIFNode:
        raise NIRExportError(f"cannot export layer '{name}' ({kind}): expected "
                             "ParametricLIFNode")
    q = float(plif.w.detach().float().sigmoid())
    problem = None
    if plif.v_reset is None:
        problem = "soft reset (NIR's LIF resets to v_reset)"
    elif not 0.0 < q < 1.0:
        problem = f"sigmoid(w) = {q} (tau = dt / sigmoid(w) must exceed dt)"
    if problem:
        raise NIRExportError(f"cannot export layer '{name}' ({kind}): {problem}")
    single = neuron.ParametricLIFNode(init_tau=2.0, decay_input=plif.decay_input,
                                      v_threshold=float(plif.v_threshold),
                                      v_reset=float(plif.v_reset), step_mode="s")
    with torch.no_grad():
        single.w.copy_(plif.w.detach())
    return single.to(plif.w.device).requires_grad_(False)


def export(
    module: nn.Module,
    example: Tensor,
    path: str | None = None,
    dt: float = DEFAULT_DT,
    metadata: dict[str, Any] | None = None,
) -> nir.NIRGraph:
    """Export a single-step module built from NIR-mappable layers (``nn.Conv2d``,
    ``nn.Linear``, ``nn.AvgPool2d``, ``nn.Flatten``, spikingjelly IF/LIF/PLIF/CUBALIF neurons,
    ``+``) with spikingjelly's ``export_to_nir``; ``example``: one step's input batch (only its
    shape is used).  Every threshold is stored by NIR's rule (:func:`below` spikingjelly's).
    ``dt`` and ``metadata`` go into ``graph.metadata``; the graph is written atomically to
    ``path`` if given."""
    from spikingjelly.activation_based.nir_exchange import export_to_nir

    if not dt > 0:
        raise NIRExportError(f"cannot export with dt={dt}: it must be positive")
    module = module.eval()
    try:
        with torch.no_grad():
            graph = export_to_nir(module, example.detach(), dt=dt)
    except (KeyError, NotImplementedError, ValueError, TypeError) as exc:
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, type):
            detail = f"NIR has no node for {detail.__name__}"
        raise NIRExportError(f"cannot export {type(module).__name__}: {detail}") from None
    nir_thresholds(graph, below)
    pool_pairs(graph)
    graph.metadata = {"dt": float(dt), "firing": FIRING, **(metadata or {})}
    if path is not None:
        save(graph, path)
    return graph


def _sigmoid_preimage(q: Tensor) -> Tensor | None:
    """A float32 ``w`` with ``sigmoid(w) == q`` bitwise, or None."""
    w = torch.log(q.double() / (1 - q.double())).float()
    up, down = w.clone(), w.clone()
    for _ in range(64):
        for c in (up, down):
            if torch.equal(c.sigmoid(), q):
                return c
        up = torch.nextafter(up, torch.tensor(np.inf, dtype=up.dtype))
        down = torch.nextafter(down, torch.tensor(-np.inf, dtype=down.dtype))
    return None


def lif_as_product(graph_module: nn.Module) -> nn.Module:
    """Replace every imported ``LIFNode`` (``h = v + (x - v) / tau``) whose ``fl32(1 / tau)`` is
    a float32 sigmoid value by a ``ParametricLIFNode`` computing ``h = v + (x - v) * q``,
    ``q = fl32(dt / tau_nir)``; other neurons stay.

    Both are forward-Euler steps of NIR's LIF; the product is the PLIF update, which the
    quotient reproduces only where ``fl32((x - v) / tau) == fl32((x - v) * q)``."""
    from spikingjelly.activation_based import neuron

    device = next((t.device for t in graph_module.parameters()), torch.device("cpu"))
    for _, wrapper in neuron_modules(graph_module):
        lif = wrapper.module
        if type(lif) is not neuron.LIFNode or lif.v_reset is None:
            continue
        w = _sigmoid_preimage(torch.tensor(1.0 / float(lif.tau), dtype=torch.float32))
        if w is None:
            continue
        plif = neuron.ParametricLIFNode(init_tau=2.0, decay_input=lif.decay_input,
                                        v_threshold=float(lif.v_threshold),
                                        v_reset=float(lif.v_reset), step_mode="s")
        with torch.no_grad():
            plif.w.copy_(w)
        wrapper.module = plif.to(device).requires_grad_(False)
    return graph_module


def affine_mean_bound(weight: Tensor, bias: Tensor | None, features: Tensor) -> Tensor:
    """Bound on ``|mean_t(W x_t + b) - (W mean_t(x_t) + b)|`` in float32, ``features`` ``[T,
    N, n]`` -> ``[N, out]``: each side is within ``(n + T + 2) u (|W| max_t|x_t| + |b|)`` of
    the exact value (the recursive-summation error bound, ``u = 2**-24``), so they differ by at
    most twice that."""
    t, n = features.shape[0], features.shape[-1]
    scale = features.abs().amax(0).double() @ weight.detach().abs().double().t()
    if bias is not None:
        scale = scale + bias.detach().abs().double()
    return (2 * (n + t + 2) * FP32_UNIT * scale).to(features.dtype)
