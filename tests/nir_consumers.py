"""Running exported NIR files in other NIR simulators (snnTorch, Norse) exactly as
docs/nir.md tells a user to: dt from the file's metadata, Flatten nodes made per-sample."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import TYPE_CHECKING

import pytest
import torch
from torch import nn

from cbp import nir_export as ne

if TYPE_CHECKING:
    import nir

CONSUMERS = ["snntorch", "norse"]
REASON = 'install the dev extra: pip install -e ".[dev]"'


def per_sample_flatten(net: nn.Module) -> nn.Module:
    """The batch recipe of docs/nir.md: NIR's ``Flatten(start_dim=0)`` excludes the batch
    dimension, the importers turn it into ``nn.Flatten(0, -1)``; start at dim 1 instead."""
    for m in net.modules():
        if isinstance(m, nn.Flatten) and m.start_dim == 0:
            m.start_dim = 1
    return net


def import_graph(consumer: str, data: bytes | nir.NIRGraph) -> nn.Module:
    """A NIR file's bytes (or a graph, not modified) imported by ``consumer`` (skipped with the
    reason if it is not installed)."""
    graph = ne.read(data) if isinstance(data, bytes) else copy.deepcopy(data)
    if consumer == "snntorch":
        import_nir = pytest.importorskip("snntorch.import_nir", reason=REASON)
        net = import_nir.import_from_nir(graph)
    else:
        norse = pytest.importorskip("norse.torch", reason=REASON)
        net = norse.from_nir(graph, dt=float(graph.metadata["dt"]))
    return per_sample_flatten(net)


def restart(consumer: str, net: nn.Module) -> None:
    """Before the next sequence: snnTorch's neurons keep their membranes in the modules, Norse
    starts afresh from ``state=None`` (docs/nir.md)."""
    if consumer == "snntorch":
        import snntorch.utils

        snntorch.utils.reset(net)


@torch.no_grad()
def record(net: nn.Module, x_steps: Iterable[torch.Tensor], nodes: list[str]) -> ne.Recording:
    """Per-step outputs and the spikes of the neuron nodes ``nodes`` of an imported graph,
    state passed on from step to step."""
    steps: dict[str, list[torch.Tensor]] = {n: [] for n in nodes}

    def hook(name: str):
        return lambda _m, _i, out: steps[name].append(
            (out if torch.is_tensor(out) else out[0]).clone())

    handles = [net.get_submodule(n).register_forward_hook(hook(n)) for n in nodes]
    state, outputs = None, []
    try:
        for x in x_steps:
            y, state = net(x, state)
            outputs.append(y.clone())
    finally:
        for h in handles:
            h.remove()
    return ne.Recording(torch.stack(outputs), {n: torch.stack(s) for n, s in steps.items()})
