"""A small torch interpreter for feed-forward NIR graphs, run over a whole sequence at once.

spikingjelly's importer (:func:`cbp.nir_export.load`) has no ``nir.LI`` node and integrates
``nir.LIF`` in its own operation order.  :func:`load` runs a graph of ``Input``, ``Conv2d``
(grouped too), ``Linear``, ``Affine``, ``Flatten``, ``LIF``, ``LI`` and ``Output`` nodes
directly, in float operations fixed here, so that a network computing the same steps in the
same order is reproduced bitwise:

* tensors are ``[N, *shape, T]`` (time last); stateless nodes process all T steps in one call
  (``Conv2d`` as a ``conv3d`` with kernel ``(kh, kw, 1)``, ``Linear`` on the features of every
  step); a ``Conv2d`` without bias that filters every channel alone with one shared kernel
  (zero weights off the channel diagonal) runs as that kernel over each channel separately,
  the same sums without the zero terms; a node with several inputs gets their sum, in edge
  order;
* neurons walk the steps on a ``[T, M]`` buffer, starting from ``v = 0``, forward Euler at the
  graph's ``dt`` with ``g = dt / tau`` and ``k = r dt / tau`` computed in float64 from the
  node's (uniform) parameters and rounded once to the tensor's dtype:

  - ``LIF``: ``u = v + (g (v_leak - v) + k I)`` (``v · (-g)`` when ``v_leak = 0``; ``k I`` is
    ``I`` itself when ``k`` rounds to 1), spike ``z = u > v_threshold``, then ``v = v_reset``
    where ``z`` and ``u`` elsewhere; the node outputs ``z``;
  - ``LI``: ``v = v + g ((r I + v_leak) - v)`` (``r I`` is ``I`` for ``r = 1``); it outputs ``v``.

Time constants are best stored in float64 (``dt / tau`` then rounds to the same float32 as
``1 / (tau / dt)``).  :meth:`Interpreter.record` returns the output and every LIF node's
spikes as a :class:`cbp.nir_export.Recording` (``[T, N, ...]``).
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

NEURONS = ("LIF", "LI")


def _uniform(node: nir.NIRNode, name: str, key: str) -> float:
    values = np.unique(np.asarray(getattr(node, key), dtype=np.float64))
    if values.size != 1:
        raise ValueError(f"node '{name}': {type(node).__name__}.{key} must be the same for "
                         "every neuron")
    return float(values[0])


def _pair(value) -> tuple[int, int]:
    v = np.asarray(value).reshape(-1)
    return (int(v[0]), int(v[0])) if v.size == 1 else (int(v[0]), int(v[1]))


def _topological(graph: nir.NIRGraph) -> list[str]:
    inputs = {n: [s for s, t in graph.edges if t == n] for n in graph.nodes}
    order: list[str] = []
    done: set[str] = set()
    while len(order) < len(graph.nodes):
        ready = [n for n in graph.nodes if n not in done and all(s in done for s in inputs[n])]
        if not ready:
            raise ValueError("the graph has a cycle (only feed-forward graphs run here)")
        order += ready
        done.update(ready)
    return order


class Interpreter(nn.Module):
    """A feed-forward NIR graph as a module: ``forward(x)`` maps ``[N, *input, T]`` to
    ``[N, *output, T]`` (see the module docstring for the operations)."""

    def __init__(self, graph: nir.NIRGraph, dt: float, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        import nir

        super().__init__()
        self.dt, self.dtype = float(dt), dtype
        self.graph = graph
        self.order = _topological(graph)
        self.sources = {n: [s for s, t in graph.edges if t == n] for n in graph.nodes}
        self.tensors: dict[str, Tensor | None] = {}
        kinds = (nir.Input, nir.Output, nir.Conv2d, nir.Linear, nir.Affine, nir.Flatten,
                 nir.LIF, nir.LI)
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
        self.inputs = [n for n, node in graph.nodes.items() if isinstance(node, nir.Input)]
        self.outputs = [n for n, node in graph.nodes.items() if isinstance(node, nir.Output)]
        if len(self.inputs) != 1 or len(self.outputs) != 1:
            raise ValueError("the graph needs exactly one Input and one Output node")

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
            elif isinstance(node, nir.LIF):
                values[name], z = self._lif(name, node, h)
                if spikes is not None:
                    spikes[name] = z
            else:
                values[name] = self._li(name, node, h)
        return values[self.outputs[0]]

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, None)

    @torch.no_grad()
    def record(self, x: Tensor) -> Recording:
        """The output ``[T, N, ...]`` and every LIF node's spikes ``[T, N, ...]`` for the input
        sequence ``x`` (``[N, *input, T]``)."""
        spikes: dict[str, Tensor] = {}
        out = self._run(x, spikes)
        return Recording(out.movedim(-1, 0), spikes)


def load(source: str | os.PathLike | bytes | nir.NIRGraph, dt: float | None = None,
         device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Interpreter:
    """:class:`Interpreter` for a NIR file, its bytes or a graph; ``dt`` as in
    :func:`cbp.nir_export.load` (the stored one by default, a different one is an error)."""
    graph = read(source)
    return Interpreter(graph, graph_dt(graph, dt), device, dtype)
