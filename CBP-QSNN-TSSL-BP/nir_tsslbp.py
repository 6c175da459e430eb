"""The TSSL-BP network as NIR: each conv/linear layer, its neuron and the neuron's trace.

How ``cnns.Network`` (eval mode) maps, node by node (``dt`` in seconds, default 1e-4):

* conv → ``nir.Conv2d`` with the weight the forward uses (levels × scale for quantized layers)
  and a zero bias; linear → ``nir.Linear`` (after a ``nir.Flatten`` when a feature map comes
  in);
* the TSSL-BP membrane ``u_t = u+_{t-1} (1 - 1/tau_m) + I_t``, spike ``u_t > V_th``, reset to 0
  → ``nir.LIF`` (node ``<layer>_lif``) with ``tau = tau_m dt``, ``r = tau_m``, ``v_leak = 0``,
  ``v_reset = 0``, ``v_threshold = V_th``: its forward-Euler step is ``u + (I - u / tau_m)``;
* what the layer passes on, the trace ``a_t = a_{t-1} + (o_t - a_{t-1}) / tau_s`` of the
  spikes → ``nir.LI`` (node ``<layer>_trace``) with ``tau = tau_s dt``, ``r = 1``,
  ``v_leak = 0``;
* pooling (``theta`` × the window sum of each channel, the network's fixed convolution) →
  ``nir.Conv2d`` with ``theta`` on the channel diagonal and zeros elsewhere (``SumPool2d``
  followed by a ``Scale`` would round ``theta · sum`` differently from ``sum theta · x``; a
  grouped ``Conv2d`` is a file that ``nir.read`` 1.0 refuses, as its type inference takes
  ``weight.shape[1]`` for the input channels);
* dropout does nothing at evaluation and is left out.

Outside the graph, as NIR leaves them to the caller: the input, the PSP of the image
``loss_f.psp`` (``s_t = s_{t-1} - s_{t-1} / tau_s + x_t``, ``y_t = s_t / tau_s``, the image
``x`` at every step), whose float operations differ from the neurons' trace, so no single LI
node could give both bitwise; and the readout, the class whose output trace sums highest over
the T steps.  Time constants are stored in float64, thresholds as given; tau_m, tau_s, T and
the input and readout rules are in the graph's metadata beside ``dt``.

:func:`compare` runs the file with :mod:`cbp.nir_torch` (same operations in the same order as
``functions.tsslbp.torch_forward``) against the network: every layer's spikes and the output
trace must be identical.
"""

from __future__ import annotations

import nir
import numpy as np
import torch
from torch import Tensor, nn

from cbp import nir_export as ne

from functions import loss_f, tsslbp

TRACE_SUFFIX = "_trace"
INPUT_RULE = ("the PSP of the image x (given at every step): s_t = s_{t-1} - s_{t-1} / tau_s "
              "+ x_t, y_t = s_t / tau_s")
READOUT = "the class whose output trace summed over the T steps is largest"


def _array(shape, value: float) -> np.ndarray:
    return np.full(tuple(shape), float(value), dtype=np.float64)


def lif_node(shape, tau_m: float, threshold: float, dt: float) -> nir.LIF:
    """The TSSL-BP membrane as ``nir.LIF`` (see the module docstring)."""
    return nir.LIF(tau=_array(shape, tau_m * dt), r=_array(shape, tau_m),
                   v_leak=_array(shape, 0.0), v_threshold=_array(shape, threshold),
                   v_reset=_array(shape, 0.0))


def trace_node(shape, tau_s: float, dt: float) -> nir.LI:
    """The TSSL-BP trace ``a += (o - a) / tau_s`` as ``nir.LI``."""
    return nir.LI(tau=_array(shape, tau_s * dt), r=_array(shape, 1.0),
                  v_leak=_array(shape, 0.0))


def _conv_node(weight: Tensor, layer: nn.Module) -> nir.Conv2d:
    w = weight.detach().float().cpu().numpy()[..., 0]  # (k, k, 1) kernels: drop the time axis
    return nir.Conv2d(input_shape=tuple(int(s) for s in layer.in_shape[1:]), weight=w,
                      stride=np.array(layer.stride[:2]), padding=np.array(layer.padding[:2]),
                      dilation=np.array(layer.dilation[:2]), groups=1,
                      bias=np.zeros(w.shape[0], dtype=np.float32))


def pool_weight(layer: nn.Module) -> Tensor:
    """The pooling layer as a dense convolution weight ``[C, C, kh, kw, 1]``: ``theta`` on the
    diagonal, zeros elsewhere (each channel pooled alone)."""
    c = int(layer.in_shape[0])
    weight = torch.zeros(c, c, *layer.kernel)
    weight[range(c), range(c)] = layer.theta
    return weight


def tsslbp_graph(net: nn.Module, dt: float = ne.DEFAULT_DT) -> nir.NIRGraph:
    """The eval-mode ``net`` (``cnns.Network``) as a ``nir.NIRGraph`` whose input is the PSP of
    the image (``[C, H, W]`` per step) and whose output is the last layer's trace."""
    if not dt > 0:
        raise ne.NIRExportError(f"cannot export with dt={dt}: it must be positive")
    cfg = net.network_config
    tau_m, tau_s = float(cfg["tau_m"]), float(cfg["tau_s"])
    first = net.layers[0] if net.layers else None
    shape = list(getattr(first, "in_shape", []))
    if not shape:
        raise ne.NIRExportError("cannot export a TSSL-BP network without layers")
    taken = {layer.name for layer in net.layers}

    def free(name: str) -> str:  # a graph node name no layer uses ("output" often is one)
        while name in taken:
            name = "nir_" + name
        return name

    last = free("input")
    nodes: dict[str, nir.NIRNode] = {last: nir.Input(input_type={"input": np.array(shape)})}
    edges: list[tuple[str, str]] = []
    flat = False
    spiking = 0

    def add(name: str, node: nir.NIRNode) -> None:
        nonlocal last
        nodes[name] = node
        edges.append((last, name))
        last = name

    for layer in net.layers:
        name, kind = layer.name, layer.type
        if kind == "dropout":
            continue  # identity at evaluation
        if kind in ("conv", "pooling") and flat:
            raise ne.NIRExportError(
                f"cannot export layer '{name}' ({kind} after a linear layer): NIR has no node "
                "that turns the linear output back into a feature map")
        if kind == "conv":
            add(name, _conv_node(layer.effective_weight(), layer))
        elif kind == "pooling":
            add(name, _conv_node(pool_weight(layer), layer))
        elif kind == "linear":
            if not flat and len(shape) > 1:
                add(free("flatten"), nir.Flatten(input_type={"input": np.array(shape)}, start_dim=0,
                                           end_dim=-1))
            flat = True
            add(name, nir.Linear(weight=layer.effective_weight().detach().float().cpu()
                                 .numpy()))
        else:
            raise ne.NIRExportError(f"cannot export layer '{name}' ({kind}): NIR has no node "
                                    "for it")
        shape = [int(layer.out_shape[0])] if flat else [int(s) for s in layer.out_shape]
        if kind in ("conv", "linear"):
            spiking += 1
            threshold = float(layer.layer_config["threshold"])
            if not np.isfinite(threshold):
                raise ne.NIRExportError(f"cannot export layer '{name}': threshold {threshold} "
                                        "is not finite")
            add(name + ne.NEURON_SUFFIX, lif_node(shape, tau_m, threshold, dt))
            add(name + TRACE_SUFFIX, trace_node(shape, tau_s, dt))
    if not spiking:
        raise ne.NIRExportError("cannot export a TSSL-BP network without conv/linear layers")
    add(free("output"), nir.Output(output_type={"output": np.array(shape)}))
    graph = nir.NIRGraph(nodes=nodes, edges=edges, metadata={
        "dt": float(dt), "firing": ne.FIRING, "tau_m": tau_m, "tau_s": tau_s,
        "timesteps": int(cfg["n_steps"]), "input": INPUT_RULE, "readout": READOUT,
    })
    return graph


def spiking_layers(net: nn.Module) -> list[nn.Module]:
    """The conv/linear layers of ``net`` in firing order."""
    return [layer for layer in net.layers if layer.type in ("conv", "linear")]


def network_input(net: nn.Module, images: Tensor) -> Tensor:
    """The graph's input for ``images`` ``[N, C, H, W]``: the PSP over T steps of the image
    given at every step, ``[N, C, H, W, T]``."""
    steps = int(net.network_config["n_steps"])
    x = images.unsqueeze(-1).expand(*images.shape, steps).contiguous()
    return loss_f.psp(x, net.network_config)


@torch.no_grad()
def tsslbp_recording(net: nn.Module, images: Tensor) -> ne.Recording:
    """``net``'s output trace ``[T, N, n_class]`` on ``images`` (eval, the image at every step,
    the neuron's torch backend) and every conv/linear layer's spikes ``[T, N, ...]`` (linear
    layers ``[T, N, n]``), recomputed from the current its neuron receives with
    ``tsslbp.torch_forward``."""
    currents: dict[str, Tensor] = {}
    layers = spiking_layers(net)
    handles = [layer.neuron.register_forward_hook(
        lambda _m, args, _out, n=layer.name: currents.__setitem__(n, args[0].detach()))
        for layer in layers]
    steps = int(net.network_config["n_steps"])
    backend, was = tsslbp.get_backend(), net.training
    # the torch backend (the CuPy kernels compute the same values) hands each trace on in the
    # [T, M] layout that cbp.nir_torch uses, so both feed the next layer the same tensors
    tsslbp.set_backend("torch")
    try:
        net.eval()
        out = net(images.unsqueeze(-1).expand(*images.shape, steps).contiguous(), None, False)
    finally:
        net.train(was)
        tsslbp.set_backend(backend)
        for h in handles:
            h.remove()
    spikes = {}
    theta_m, tau_s = 1.0 / float(net.network_config["tau_m"]), float(net.network_config["tau_s"])
    for layer in layers:
        i = currents[layer.name]
        vth = float(layer.layer_config["threshold"])
        _, u, _ = tsslbp.torch_forward(i, theta_m, tau_s, vth)
        s = torch.gt(u, vth).to(i.dtype).reshape(steps, *i.shape[:-1])
        spikes[layer.name] = s.reshape(steps, i.shape[0], -1) if layer.type == "linear" else s
    return ne.Recording(out.reshape(out.shape[0], -1, steps).movedim(-1, 0), spikes)


@torch.no_grad()
def compare(net: nn.Module, interpreter: nn.Module, images: Tensor) -> ne.RoundTrip:
    """Run ``net`` and the loaded graph (:func:`cbp.nir_torch.load`) on ``images`` and compare
    every layer's spikes at every step and the output trace."""
    ref = tsslbp_recording(net, images)
    got = interpreter.record(network_input(net, images))
    return ne.RoundTrip.of(ref, got, {n: n + ne.NEURON_SUFFIX for n in ref.spikes})
