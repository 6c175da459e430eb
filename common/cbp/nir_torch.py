"""A small torch interpreter for NIR graphs, run over a whole sequence at once or, for graphs
with recurrent edges, step by step.

spikingjelly's importer (:func:`cbp.nir_export.load`) has no ``nir.LI`` node, integrates
``nir.LIF`` in its own operation order and runs no recurrent edges.  :func:`load` runs a graph of
``Input``, ``Conv2d`` (grouped too), ``Linear``, ``Affine``, ``Flatten``, ``Scale``,
``Threshold``, ``I``, ``LIF``, ``LI`` and ``Output`` nodes directly, in float operations fixed
here, so that a network computing the same steps in the same order is reproduced bitwise:

* tensors are ``[N, *shape, T]`` (time last); a node with several inputs gets their sum, in
  edge order (the integrator ``I`` excepted, see below); ``Scale`` multiplies element-wise,
  ``Threshold`` gives ``1.0`` where its input exceeds the threshold (``>``, the NIR rule), else
  ``0.0``;
* a feed-forward graph runs node by node over all T steps: ``Conv2d`` as a ``conv3d`` with
  kernel ``(kh, kw, 1)``, ``Linear`` on the features of every step; a ``Conv2d`` without bias
  that filters every channel alone with one shared kernel (zero weights off the channel
  diagonal) runs as that kernel over each channel separately, the same sums without the zero
  terms;
* a graph with a cycle runs step by step, every node once per step in graph order: an edge
  that closes a cycle (found by a depth-first walk from the ``Input`` node, edges in file
  order) carries its source's output of the previous step and nothing at the first step (the
  one-step delay NIR simulators give recurrent edges).  Stateless nodes see one step
  ``[N, *shape]``: ``Conv2d`` is ``conv2d`` (a weight with zeros off the channel diagonal as
  the ``groups = C`` convolution of its diagonal kernels), ``Linear`` / ``Affine`` ``linear``;
  ``LIF`` and ``LI`` run only in feed-forward graphs;
* neurons walk the steps starting from ``v = 0``, forward Euler at the graph's ``dt`` with
  ``g = dt / tau`` and ``k = r dt / tau`` (``k = r dt`` for ``I``) computed in float64 from the
  node's (uniform) parameters and rounded once to the tensor's dtype:

  - ``I``: ``v = v + k I_j`` for each input ``j`` in edge order (``k I_j`` is ``I_j`` itself
    when ``k`` rounds to 1); it outputs ``v``.  A soft-reset IF neuron, ``I`` -> ``Threshold``
    -> ``Scale(-theta)`` back into the ``I`` with that recurrent edge listed first, thus computes
    ``u_t = (u_{t-1} - theta z_{t-1}) + I_t``;
  - ``LIF``: ``u = v + (g (v_leak - v) + k I)`` (``v · (-g)`` when ``v_leak = 0``; ``k I`` is
    ``I`` itself when ``k`` rounds to 1), spike ``z = u > v_threshold``, then ``v = v_reset``
    where ``z`` and ``u`` elsewhere; the node outputs ``z``;
  - ``LI``: ``v = v + g ((r I + v_leak) - v)`` (``r I`` is ``I`` for ``r = 1``); it outputs ``v``.

Time constants are best stored in float64 (``dt / tau`` then rounds to the same float32 as
``1 / (tau / dt)``).  :meth:`Interpreter.record` returns the output and every ``LIF`` and
``Threshold`` node's spikes as a :class:`cbp.nir_export.Recording` (``[T, N, ...]``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nir_export import Recording, graph_dt, read

if TYPE_CHECKING:
    import nir

NEURONS = ("LIF", "LI", "I")


def _uniform(node: nir.NIRNode, name: str, key: str) -> float:
    values = np.unique(np.asarray(getattr(node, key), dtype=np.float64))
    if values.size != 1:
        raise ValueError(f"node '{name}': {type(node).__name__}.{key} must be the same for "
                         "every neuron")
    return float(values[0])


def _pair(value) -> tuple[int, int]:
    v = np.asarray(value).reshape(-1)
    return (int(v[0]), int(v[0])) if v.size == 1 else (int(v[0]), int(v[1]))


def _delayed_edges(graph: nir.NIRGraph, starts: list[str]) -> set[tuple[str, str]]:
    """The edges that close a cycle: depth-first from ``starts``, following edges in file
    order, an edge into a node still on the walk's path."""
    outgoing: dict[str, list[str]] = {n: [] for n in graph.nodes}
    for s, t in graph.edges:
        outgoing[s].append(t)
    delayed: set[tuple[str, str]] = set()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    roots = starts + [n for n in graph.nodes if n not in starts]
    for root in roots:
        if root in state:
            continue
        state[root] = 1
        stack = [(root, iter(outgoing[root]))]
        while stack:
            node, targets = stack[-1]
            target = next(targets, None)
            if target is None:
                state[node] = 2
                stack.pop()
            elif state.get(target) == 1:
                delayed.add((node, target))
            elif target not in state:
                state[target] = 1
                stack.append((target, iter(outgoing[target])))
    return delayed


def _topological(graph: nir.NIRGraph, delayed: set[tuple[str, str]] = frozenset()) -> list[str]:
    inputs = {n: [s for s, t in graph.edges if t == n and (s, t) not in delayed]
              for n in graph.nodes}
    order: list[str] = []
    done: set[str] = set()
    while len(order) < len(graph.nodes):
        ready = [n for n in graph.nodes if n not in done and all(s in done for s in inputs[n])]
        if not ready:
            raise ValueError("the graph has a cycle no input reaches")
        order += ready
        done.update(ready)
    return order


class Interpreter(nn.Module):
    """A NIR graph as a module: ``forward(x)`` maps ``[N, *input, T]`` to ``[N, *output, T]``
    (see the module docstring for the operations)."""

    def __init__(self, graph: nir.NIRGraph, dt: float, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        import nir

        super().__init__()
        self.dt, self.dtype = float(dt), dtype
        self.graph = graph
        self.sources = {n: [s for s, t in graph.edges if t == n] for n in graph.nodes}
        self.tensors: dict[str, Tensor | None] = {}
        kinds = (nir.Input, nir.Output, nir.Conv2d, nir.Linear, nir.Affine, nir.Flatten,
                 nir.Scale, nir.Threshold, nir.I, nir.LIF, nir.LI)
        for name, node in graph.nodes.items():
            if not isinstance(node, kinds):
                raise ValueError(f"node '{name}': {type(node).__name__} is not one of "
                                 f"{', '.join(k.__name__ for k in kinds)}")
            for key in ("weight", "bias"):
                value = getattr(node, key, None)
                if value is not None and (key == "weight" or np.any(value)):
                    # an all-zero bias is left out (adding 0 changes no value)
                    self.tensors[f"{name}.{key}"] = torch.as_tensor(
                        np.asarray(value), dtype=dtype, device=device)
            for key in ("scale", "threshold"):  # element-wise, over the node's shape
                if isinstance(node, (nir.Scale, nir.Threshold)) and hasattr(node, key):
                    self.tensors[f"{name}.{key}"] = torch.as_tensor(
                        np.asarray(getattr(node, key), dtype=np.float64), dtype=dtype,
                        device=device)
        self.inputs = [n for n, node in graph.nodes.items() if isinstance(node, nir.Input)]
        self.outputs = [n for n, node in graph.nodes.items() if isinstance(node, nir.Output)]
        if len(self.inputs) != 1 or len(self.outputs) != 1:
            raise ValueError("the graph needs exactly one Input and one Output node")
        self.delayed = _delayed_edges(graph, self.inputs)
        self.order = _topological(graph, self.delayed)
        if self.delayed:
            stateful = [n for n, node in graph.nodes.items() if isinstance(node, (nir.LIF, nir.LI))]
            if stateful:
                raise ValueError(f"node '{stateful[0]}': {type(graph.nodes[stateful[0]]).__name__} "
                                 "runs only in graphs without recurrent edges")

    def _param(self, name: str, key: str) -> Tensor | None:
        return self.tensors.get(f"{name}.{key}")

    # ------------------------------------------------------------------ nodes
    def _conv2d(self, name: str, node, x: Tensor) -> Tensor:
        w = self._param(name, "weight")
        padding = _pair(node.padding) if not isinstance(node.padding, str) else None
        if padding is None:
            raise ValueError(f"node '{name}': Conv2d padding {node.padding!r} is not supported")
        stride, dilation = _pair(node.stride), _pair(node.dilation)
        args = ((*stride, 1), (*padding, 0), (*dilation, 1))
        bias, groups = self._param(name, "bias"), int(np.asarray(node.groups))
        shared = self._shared_kernel(name, w) if groups == 1 and bias is None else None
        if shared is not None:  # each channel alone: the same sums without the zero terms
            n, c = x.shape[:2]
            y = F.conv3d(x.reshape(n * c, 1, *x.shape[2:]), shared[None, None, ..., None],
                         None, *args)
            return y.reshape(n, c, *y.shape[2:])
        return F.conv3d(x, w[..., None], bias, *args, groups)

    def _shared_kernel(self, name: str, w: Tensor) -> Tensor | None:
        """The one kernel of a convolution that filters every channel alone with it (zero
        weights off the channel diagonal, the same kernel on it), else None."""
        key = f"{name}.shared"
        if key not in self.tensors:
            c = w.shape[0]
            found = None
            if c == w.shape[1] and c > 1:
                diagonal = w[range(c), range(c)]
                off = w.clone()
                off[range(c), range(c)] = 0
                if not off.any() and bool((diagonal == diagonal[0]).all()):
                    found = diagonal[0].clone()
            self.tensors[key] = found
        return self.tensors[key]

    def _linear(self, name: str, x: Tensor) -> Tensor:
        w = self._param(name, "weight")
        y = F.linear(x.transpose(-1, -2), w, self._param(name, "bias"))
        return y.transpose(-1, -2)

    @staticmethod
    def _flatten(node, x: Tensor) -> Tensor:
        features = x.dim() - 2  # NIR's dims exclude the batch; time is last here
        start, end = int(node.start_dim) % features + 1, int(node.end_dim) % features + 1
        return x.flatten(start, end)

    def _lif(self, name: str, node, x: Tensor) -> tuple[Tensor, Tensor]:
        tau = _uniform(node, name, "tau")
        g = self.dt / tau
        k = _uniform(node, name, "r") * self.dt / tau
        leak = _uniform(node, name, "v_leak")
        thresh = _uniform(node, name, "v_threshold")
        reset = _uniform(node, name, "v_reset")
        steps = x.shape[-1]
        xs = x.reshape(-1, steps).t().contiguous()
        z = torch.empty_like(xs)
        v = torch.zeros_like(xs[0])
        one = torch.tensor(k, dtype=xs.dtype).item() == 1.0
        reset_t = torch.full_like(v, reset)
        for t in range(steps):
            du = torch.mul(v, -g) if leak == 0.0 else torch.rsub(v, leak).mul_(g)
            du.add_(xs[t] if one else xs[t] * k)
            u = v + du
            torch.gt(u, thresh, out=z[t])
            v = torch.where(z[t] > 0, reset_t, u)
        return z.t().reshape(x.shape), z.reshape(steps, *x.shape[:-1])

    def _li(self, name: str, node, x: Tensor) -> Tensor:
        tau = _uniform(node, name, "tau")
        g = self.dt / tau
        r = _uniform(node, name, "r")
        leak = _uniform(node, name, "v_leak")
        steps = x.shape[-1]
        xs = x.reshape(-1, steps).t().contiguous()
        out = torch.empty_like(xs)
        v = torch.zeros_like(xs[0])
        for t in range(steps):
            drive = xs[t] if r == 1.0 else xs[t] * r
            if leak != 0.0:
                drive = drive + leak
            tmp = torch.sub(drive, v).mul_(g)
            torch.add(v, tmp, out=out[t])
            v = out[t]
        return out.t().reshape(x.shape)

    def _k(self, name: str, node) -> float | None:
        """``I``'s ``k = r dt``; None where it rounds to 1 (the input is added itself)."""
        k = _uniform(node, name, "r") * self.dt
        return None if torch.tensor(k, dtype=self.dtype).item() == 1.0 else k

    def _integrate(self, name: str, node, feeds: list[Tensor]) -> Tensor:
        """``I`` over a whole sequence: ``v = v + k I_j`` per input, in edge order."""
        k = self._k(name, node)
        steps = feeds[0].shape[-1]
        xs = [f.reshape(-1, steps).t().contiguous() for f in feeds]
        out = torch.empty_like(xs[0])
        v = torch.zeros_like(xs[0][0])
        for t in range(steps):
            for f in xs:
                v = v + (f[t] if k is None else f[t] * k)
            out[t] = v
        return out.t().reshape(feeds[0].shape)

    def _over_time(self, name: str, key: str) -> Tensor:
        """An element-wise parameter broadcast over the time axis."""
        return self._param(name, key).unsqueeze(-1)

    def _diagonal(self, name: str, w: Tensor) -> Tensor | None:
        """``[C, 1, kh, kw]``: the kernels of a convolution with zero weights off the channel
        diagonal, else None."""
        key = f"{name}.diagonal"
        if key not in self.tensors:
            c = w.shape[0]
            found = None
            if c == w.shape[1] and c > 1:
                off = w.clone()
                off[range(c), range(c)] = 0
                if not off.any():
                    found = w[range(c), range(c)].unsqueeze(1).contiguous()
            self.tensors[key] = found
        return self.tensors[key]

    def _conv2d_step(self, name: str, node, x: Tensor) -> Tensor:
        w, bias = self._param(name, "weight"), self._param(name, "bias")
        if isinstance(node.padding, str):
            raise ValueError(f"node '{name}': Conv2d padding {node.padding!r} is not supported")
        args = (_pair(node.stride), _pair(node.padding), _pair(node.dilation))
        groups = int(np.asarray(node.groups))
        diagonal = self._diagonal(name, w) if groups == 1 else None
        if diagonal is not None:  # each channel alone: the same sums without the zero terms
            return F.conv2d(x, diagonal, bias, *args, diagonal.shape[0])
        return F.conv2d(x, w, bias, *args, groups)

    def _step_node(self, name: str, node, h: Tensor) -> Tensor:
        """A stateless node on one step ``[N, *shape]``."""
        import nir

        if isinstance(node, nir.Conv2d):
            return self._conv2d_step(name, node, h)
        if isinstance(node, (nir.Linear, nir.Affine)):
            return F.linear(h, self._param(name, "weight"), self._param(name, "bias"))
        if isinstance(node, nir.Flatten):
            features = h.dim() - 1
            start, end = int(node.start_dim) % features + 1, int(node.end_dim) % features + 1
            return h.flatten(start, end)
        if isinstance(node, nir.Scale):
            return h * self._param(name, "scale")
        if isinstance(node, nir.Threshold):
            return torch.gt(h, self._param(name, "threshold")).to(h.dtype)
        return h  # Output

    # ------------------------------------------------------------------ running
    def _run(self, x: Tensor, spikes: dict[str, Tensor] | None) -> Tensor:
        import nir

        values: dict[str, Tensor] = {}
        for name in self.order:
            node = self.graph.nodes[name]
            if isinstance(node, nir.Input):
                values[name] = x.to(self.dtype)
                continue
            feeds = [values[s] for s in self.sources[name]]
            if not feeds:
                raise ValueError(f"node '{name}' has no input")
            if isinstance(node, nir.I):
                values[name] = self._integrate(name, node, feeds)
                continue
            h = feeds[0]
            for other in feeds[1:]:
                h = h + other
            if isinstance(node, nir.Output):
                values[name] = h
            elif isinstance(node, nir.Conv2d):
                values[name] = self._conv2d(name, node, h)
            elif isinstance(node, (nir.Linear, nir.Affine)):
                values[name] = self._linear(name, h)
            elif isinstance(node, nir.Flatten):
                values[name] = self._flatten(node, h)
            elif isinstance(node, nir.Scale):
                values[name] = h * self._over_time(name, "scale")
            elif isinstance(node, nir.Threshold):
                values[name] = torch.gt(h, self._over_time(name, "threshold")
                                        ).to(h.dtype)
                if spikes is not None:
                    spikes[name] = values[name].movedim(-1, 0)
            elif isinstance(node, nir.LIF):
                values[name], z = self._lif(name, node, h)
                if spikes is not None:
                    spikes[name] = z
            else:
                values[name] = self._li(name, node, h)
        return values[self.outputs[0]]

    def _run_steps(self, x: Tensor, spikes: dict[str, Tensor] | None) -> Tensor:
        """A graph with recurrent edges, step by step (see the module docstring)."""
        import nir

        steps = x.shape[-1]
        last: dict[str, Tensor] = {}  # the previous step's outputs of delayed edges' sources
        held = {s for s, _ in self.delayed}
        potentials: dict[str, Tensor] = {}
        outputs: list[Tensor] = []
        fired: dict[str, list[Tensor]] = {}
        for t in range(steps):
            values: dict[str, Tensor] = {}
            for name in self.order:
                node = self.graph.nodes[name]
                if isinstance(node, nir.Input):
                    values[name] = x[..., t].to(self.dtype).contiguous()
                    continue
                feeds = [last.get(s) if (s, name) in self.delayed else values[s]
                         for s in self.sources[name]]
                feeds = [f for f in feeds if f is not None]
                if not feeds:
                    raise ValueError(f"node '{name}' has no input at step {t}")
                if isinstance(node, nir.I):
                    k = self._k(name, node)
                    v = potentials.get(name)
                    v = torch.zeros_like(feeds[0]) if v is None else v
                    for f in feeds:
                        v = v + (f if k is None else f * k)
                    potentials[name] = values[name] = v
                    continue
                h = feeds[0]
                for other in feeds[1:]:
                    h = h + other
                values[name] = self._step_node(name, node, h)
                if isinstance(node, nir.Threshold):
                    fired.setdefault(name, []).append(values[name])
            last = {s: values[s] for s in held}
            outputs.append(values[self.outputs[0]])
        if spikes is not None:
            spikes.update({n: torch.stack(z) for n, z in fired.items()})
        return torch.stack(outputs, -1)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self._run_steps(x, None) if self.delayed else self._run(x, None)

    @torch.no_grad()
    def record(self, x: Tensor) -> Recording:
        """The output ``[T, N, ...]`` and every LIF and Threshold node's spikes ``[T, N, ...]``
        for the input sequence ``x`` (``[N, *input, T]``)."""
        spikes: dict[str, Tensor] = {}
        out = self._run_steps(x, spikes) if self.delayed else self._run(x, spikes)
        return Recording(out.movedim(-1, 0), spikes)


def load(source: str | os.PathLike | bytes | nir.NIRGraph, dt: float | None = None,
         device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Interpreter:
    """:class:`Interpreter` for a NIR file, its bytes or a graph; ``dt`` as in
    :func:`cbp.nir_export.load` (the stored one by default, a different one is an error)."""
    graph = read(source)
    return Interpreter(graph, graph_dt(graph, dt), device, dtype)
