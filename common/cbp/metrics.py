"""Spike and energy metrics of a spiking network, counted by spikingjelly's ``op_counter``.

``SpikeProfiler`` wraps an evaluation loop and reports, per sample:

* the firing rate of every spiking layer (spikes per neuron per time step), from
  :class:`FiringCounter`, an ``op_counter.ModuleCounter`` whose rules say which modules emit
  spikes (spikingjelly's ``BaseNode`` by default; pipelines register their own neurons);
* synaptic operations: accumulates (``SynOpCounter``) for layers driven by spikes and
  multiply-accumulates (``MACCounter``) for layers driven by analog values, such as the
  first layer on an image;
* an energy estimate ``E = SynOps * E_AC + MACs * E_MAC`` with the 45 nm, 32-bit float
  figures the SNN literature uses (Horowitz, ISSCC 2014): E_AC = 0.9 pJ, E_MAC = 4.6 pJ.

Counting conventions (extensions registered through ``op_counter``'s ``extra_rules``):

* A layer input of binary spikes, of spikes with one amplitude theta (ANN-to-SNN conversion)
  or of non-negative integer spike counts (event frames, SEW ``ADD`` sums) is a spike input:
  each spike costs one accumulate per synapse it reaches.  Any other input is analog and
  costs MACs, e.g. time-averaged spikes fed to a classifier; a pipeline that knows better
  (sum-pooled spikes in TSSL-BP) says so with a layer rule.
* Batch normalization is folded into the preceding layer at inference and not counted.
* Only what the forward pass executes is counted, e.g. a first layer that the network
  computes once for all time steps costs its MACs once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from spikingjelly.activation_based.neuron import BaseNode
from spikingjelly.activation_based.op_counter import (
    DispatchCounterMode,
    MACCounter,
    ModuleCounter,
    ModuleCounterMode,
    SynOpCounter,
)
from torch import Tensor, nn

from . import distributed as D

E_AC_PJ = 0.9  # 32-bit float add, 45 nm (Horowitz, ISSCC 2014)
E_MAC_PJ = 4.6  # 32-bit float multiply (3.7 pJ) + add (0.9 pJ), 45 nm
ENERGY_SOURCE = "45 nm, 32-bit float: E_AC 0.9 pJ, E_MAC 4.6 pJ (Horowitz, ISSCC 2014)"

aten = torch.ops.aten
# aten ops whose first tensor argument (after an optional bias) is the layer input
_INPUT_ARG = {
    aten.convolution.default: 0,
    aten.mm.default: 0,
    aten.bmm.default: 0,
    aten.addmm.default: 1,
    aten.baddbmm.default: 1,
}
_REL_TOL = 1e-4  # how close ``x / a`` must be to an integer to count as a spike count

NeuronRule = Callable[[nn.Module, tuple, dict, Any], Tensor]
# spiking module types, or {type: rule returning its spikes} (None: the module's output)
Neurons = Mapping[type[nn.Module], NeuronRule | None] | Iterable[type[nn.Module]]


# ----------------------------------------------------------------------------- spikes
@torch.no_grad()
def spike_counts(x: Tensor, amplitude: float | None = None) -> Tensor | None:
    """Spikes per element (exact non-negative integers, float32) when ``x`` is a spike
    tensor, else ``None``.  Spike tensors: bool or 0/1 values, non-negative integer counts,
    or one amplitude ``a > 0`` (every non-zero value equal).  With ``amplitude``, any
    ``amplitude * k`` (``k`` non-negative integers, up to float rounding) also counts."""
    if not torch.is_tensor(x) or x.numel() == 0:
        return None
    if x.dtype == torch.bool:
        return x.to(torch.float32)
    if not x.is_floating_point() or bool((x < 0).any()):
        return None
    if bool((x == x.round()).all()):
        return x.to(torch.float32)
    if amplitude is not None:
        k = (x / amplitude).round()
        if bool(((x - k * amplitude).abs() <= _REL_TOL * amplitude * k.clamp(min=1.0)).all()):
            return k.to(torch.float32)
        return None
    nz = x[x != 0]
    if bool((nz == nz[0]).all()):
        return (x != 0).to(torch.float32)
    return None


def _bit_planes(k: Tensor) -> list[tuple[int, Tensor]]:
    """``k = sum_b 2**b * plane_b`` with binary planes, for the non-empty planes."""
    top = int(k.max().item()) if k.numel() else 0
    if top <= 1:  # already binary (the common case)
        return [(1, k)] if top == 1 else []
    out, ki = [], k.to(torch.int64)
    for b in range(top.bit_length()):
        plane = ((ki >> b) & 1).to(torch.float32)
        if bool(plane.any()):
            out.append((1 << b, plane))
    return out


_LAST: list = [None, -1, None]  # (input tensor, its version, spike_counts of it)


def _input_counts(x: Tensor) -> Tensor | None:
    """``spike_counts(x)``, computed once for the SynOp and MAC rules of the same op."""
    if _LAST[0] is x and _LAST[1] == x._version:
        return _LAST[2]
    k = spike_counts(x)
    _LAST[:] = [x, x._version, k]
    return k


def _analog_weight(args: tuple, pos: int) -> tuple:
    """``args`` with the weight operand replaced by a non-binary stand-in of its shape, so
    that op_counter's rules look at the layer input only (a weight tensor that happens to
    hold only 0 and 1 is not a spike train)."""
    w = args[pos]
    a = list(args)
    a[pos] = torch.full((), 2.0, dtype=torch.float32, device=w.device).expand(w.shape)
    return tuple(a)


def _counts_as_spikes(rule: Callable, pos: int) -> Callable:
    """A SynOp rule for spike inputs, spike counts and amplitude-``a`` spikes: the rule is
    linear in the number of input spikes, so it is applied to each binary bit plane.  Analog
    inputs cost no SynOps."""

    def counted(args, kwargs, out):
        k = _input_counts(args[pos])
        if k is None:
            return 0
        args = _analog_weight(args, pos + 1)
        total = 0
        for weight, plane in _bit_planes(k):
            a = list(args)
            a[pos] = plane
            total += weight * int(rule(tuple(a), kwargs, out))
        return total

    return counted


def _analog_only(rule: Callable, pos: int) -> Callable:
    """A MAC rule that costs nothing when the layer input is a spike (count) tensor."""

    def counted(args, kwargs, out):
        if _input_counts(args[pos]) is not None:
            return 0
        return rule(_analog_weight(args, pos + 1), kwargs, out)

    return counted


def synop_counter(ignore: Iterable[type[nn.Module]] = ()) -> SynOpCounter:
    """``op_counter.SynOpCounter`` with the spike-count convention of this module."""
    base = SynOpCounter()
    rules = {op: _counts_as_spikes(base.rules[op], pos) for op, pos in _INPUT_ARG.items()}
    return SynOpCounter(extra_rules=rules, extra_ignore_modules=list(ignore))


def mac_counter(ignore: Iterable[type[nn.Module]] = ()) -> MACCounter:
    """``op_counter.MACCounter`` for analog inputs only (no batch norm, see the module doc)."""
    base = MACCounter()
    rules = {op: _analog_only(base.rules[op], pos) for op, pos in _INPUT_ARG.items()}
    counter = MACCounter(extra_rules=rules, extra_ignore_modules=list(ignore))
    counter.rules.pop(aten.native_batch_norm.default, None)
    return counter


_SYNOP_RULES = synop_counter().rules
_MAC_RULES = mac_counter().rules


def conv_ops(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int = 1, *,
             out: Tensor) -> tuple[int, int]:
    """(SynOps, MACs) of ``out = conv(x, weight)`` (any spatial rank) by op_counter's rules."""
    args = (x, weight, None, tuple(stride), tuple(padding), tuple(dilation), False,
            tuple(0 for _ in stride), groups)
    op = aten.convolution.default
    return int(_SYNOP_RULES[op](args, {}, out)), int(_MAC_RULES[op](args, {}, out))


def linear_ops(x: Tensor, weight: Tensor) -> tuple[int, int]:
    """(SynOps, MACs) of ``x @ weight.T`` for ``x`` of shape (rows, in_features)."""
    args, op = (x, weight.t()), aten.mm.default
    return int(_SYNOP_RULES[op](args, {}, None)), int(_MAC_RULES[op](args, {}, None))


# ----------------------------------------------------------------------------- counters
def _output_spikes(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Tensor:
    return out


class FiringCounter(ModuleCounter):
    """Spikes emitted by spiking modules, and their neuron-steps, per module scope.

    ``rules`` maps ``("forward", module_type)`` to a function ``(module, args, kwargs, out)``
    returning the module's spikes as a tensor (``a * k`` counts, see ``spike_counts``);
    spikingjelly's ``BaseNode`` is registered.  ``register`` adds a neuron type.
    """

    def __init__(self, neurons: Neurons = ()) -> None:
        super().__init__()
        self.slots: dict[str, int] = defaultdict(int)
        self.register(BaseNode)
        if not isinstance(neurons, Mapping):
            neurons = dict.fromkeys(neurons)
        for cls, fn in neurons.items():
            self.register(cls, fn)

    def register(self, module_type: type[nn.Module], fn: NeuronRule | None = None) -> None:
        rule = fn or _output_spikes
        self.rules[("forward", module_type)] = lambda m, a, k, o: self._count(rule(m, a, k, o))

    def _count(self, spikes: Tensor) -> int:
        k = spike_counts(spikes.detach())
        if k is None:  # not spiking in this call (e.g. a converted layer in ANN mode)
            self._last_slots = 0
            return 0
        self._last_slots = spikes.numel()
        return int(k.sum().item())

    def record(self, scope: str, func: Any, value: int) -> None:
        super().record(scope, func, value)
        self.slots[scope] += self._last_slots

    def reset(self) -> None:
        super().reset()
        self.slots = defaultdict(int)


class LayerOpCounter(ModuleCounter):
    """SynOps and MACs of layers whose aten ops do not show the spikes that drive them (e.g.
    a layer fed a filtered spike train).  ``rules`` maps a module type to a function
    ``(module, args, kwargs, out) -> (synops, macs)``; ``SpikeProfiler`` makes the dispatch
    counters skip these modules.  SynOps are the records, MACs are kept in ``macs``."""

    def __init__(self, rules: Mapping[type[nn.Module], Callable] | None = None) -> None:
        super().__init__()
        self.macs: dict[str, int] = defaultdict(int)
        for cls, fn in (rules or {}).items():
            self.rules[("forward", cls)] = self._rule(fn)

    def _rule(self, fn: Callable) -> Callable:
        def rule(module, args, kwargs, out) -> int:
            synops, self._last_macs = fn(module, args, kwargs, out)
            return int(synops)
        return rule

    def record(self, scope: str, func: Any, value: int) -> None:
        super().record(scope, func, value)
        self.macs[scope] += int(self._last_macs)

    def reset(self) -> None:
        super().reset()
        self.macs = defaultdict(int)


# ----------------------------------------------------------------------------- report
@dataclass
class SpikeReport:
    """Per-sample operation counts and energy, and per-layer firing rates."""

    samples: int
    synops: float  # accumulates per sample
    macs: float  # multiply-accumulates per sample
    rates: dict[str, float] = field(default_factory=dict)  # layer -> spikes/neuron/step
    e_ac_pj: float = E_AC_PJ
    e_mac_pj: float = E_MAC_PJ

    @property
    def energy_uj(self) -> float:
        """Estimated energy per sample in microjoules."""
        return (self.synops * self.e_ac_pj + self.macs * self.e_mac_pj) * 1e-6

    def lines(self) -> list[str]:
        """The lines the evaluation commands print."""
        rates = ", ".join(f"{n} {r:.4f}" for n, r in self.rates.items()) or "none"
        return [
            f"firing rate (spikes/neuron/step): {rates}",
            f"SynOps/sample: {self.synops:.6g}  MACs/sample: {self.macs:.6g}  "
            f"energy/sample: {self.energy_uj:.6g} uJ  ({self.samples} samples; "
            f"{ENERGY_SOURCE})",
        ]


class SpikeProfiler:
    """Counts what ``model`` does inside ``with`` (any number of forward passes).

    ``neurons`` registers spiking module types (see ``FiringCounter``), ``layers`` registers
    ``LayerOpCounter`` rules ``{type: fn -> (synops, macs)}``, ``ignore`` adds module types
    the dispatch counters skip.  Samples are counted from dimension ``batch_dim`` of the
    model's first input; then ``report()``.
    ``scope`` is the module tree whose modules are hooked and named (default ``model``; pass
    a container of the layers of a model that keeps them in a plain list).
    """

    def __init__(self, model: nn.Module, *,
                 neurons: Neurons = (),
                 layers: Mapping[type[nn.Module], Callable] | None = None,
                 ignore: Iterable[type[nn.Module]] = (), batch_dim: int = 0,
                 scope: nn.Module | None = None) -> None:
        self.model = model
        self.scope = model if scope is None else scope
        self.batch_dim = batch_dim
        layers = dict(layers or {})
        skip = [nn.modules.batchnorm._BatchNorm, *ignore, *layers]
        self.synops = synop_counter(skip)
        self.macs = mac_counter(skip)
        self.firing = FiringCounter(neurons)
        self.layers = LayerOpCounter(layers)
        self.samples = 0
        self._modes: list = []

    def __enter__(self) -> SpikeProfiler:
        module_mode = ModuleCounterMode(
            [self.firing, self.layers], model=self.scope)
        dispatch_mode = DispatchCounterMode([self.synops, self.macs])
        module_mode.__enter__()
        try:
            dispatch_mode.__enter__()
        except BaseException:
            module_mode.__exit__(None, None, None)
            raise
        self._modes = [dispatch_mode, module_mode]
        self._hook = self.model.register_forward_pre_hook(self._count_batch)
        return self

    def _count_batch(self, module: nn.Module, args: tuple) -> None:
        if args and torch.is_tensor(args[0]):
            self.samples += int(args[0].shape[self.batch_dim])

    def __exit__(self, *exc) -> None:
        _LAST[:] = [None, -1, None]
        dispatch_mode, module_mode = self._modes
        self._hook.remove()
        try:
            dispatch_mode.__exit__(*exc)
        finally:
            module_mode.__exit__(*exc)

    def totals(self) -> dict[str, float]:
        """Raw sums (for reducing across processes): samples, synops, macs, and per layer
        ``spikes:<name>`` / ``slots:<name>``."""
        root = type(self.scope).__name__ + "."
        out = {
            "samples": float(self.samples),
            "synops": float(self.synops.get_total() + self.layers.get_total()),
            "macs": float(self.macs.get_total() + self.layers.macs["Global"]),
        }
        scopes = {k: sum(v.values()) for k, v in self.firing.get_counts().items()}
        order = {root + n: i for i, (n, _) in enumerate(self.scope.named_modules())}
        for scope in sorted(_leaf_scopes(set(scopes)), key=lambda s: order.get(s, len(order))):
            name = scope[len(root):]
            out[f"spikes:{name}"] = float(scopes[scope])
            out[f"slots:{name}"] = float(self.firing.slots[scope])
        return out

    def report(self) -> SpikeReport:
        """The per-sample report of this process's counts."""
        return report_from_totals(self.totals())


def report_from_totals(t: dict[str, float]) -> SpikeReport:
    """The per-sample report of (possibly reduced) ``SpikeProfiler.totals()``."""
    n = max(t["samples"], 1.0)
    rates = {}
    for key, spikes in t.items():
        name = key.removeprefix("spikes:")
        if name != key and t[f"slots:{name}"] > 0:
            rates[name] = spikes / t[f"slots:{name}"]
    return SpikeReport(samples=int(t["samples"]), synops=t["synops"] / n, macs=t["macs"] / n,
                       rates=rates)


def _leaf_scopes(scopes: set[str]) -> set[str]:
    """Scopes of the spiking modules themselves (no other recorded scope below them)."""
    return {s for s in scopes if "." in s
            and not any(o != s and o.startswith(s + ".") for o in scopes)}


def reduce_totals(t: dict[str, float]) -> dict[str, float]:
    """Sum ``totals()`` over the processes of an initialized default process group (a layer
    that one process never ran counts as zero there)."""
    if not D.is_distributed():
        return t
    parts: list = [None] * D.world_size()
    torch.distributed.all_gather_object(parts, t)
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + v
    return out


def summarize(profiler: SpikeProfiler, log: Callable[[str], Any] | None = print
              ) -> SpikeReport:
    """Reduce over processes (a collective call), then print the report with ``log`` (pass
    ``None`` on the processes that should stay quiet)."""
    report = report_from_totals(reduce_totals(profiler.totals()))
    if log is not None:
        for line in report.lines():
            log(line)
    return report


def profiled(model: nn.Module, run: Callable[[], Any], *,
             log: Callable[[str], Any] | None = print, **kwargs) -> tuple[Any, SpikeReport]:
    """``run()`` (an evaluation pass over ``model``) under a ``SpikeProfiler(model,
    **kwargs)``; prints the report with ``log`` on the main process.  Returns ``(run(),
    report)``."""
    with SpikeProfiler(model, **kwargs) as prof:
        result = run()
    return result, summarize(prof, log if D.is_main_process() else None)
