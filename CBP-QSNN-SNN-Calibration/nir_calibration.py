"""The quantized spiking VGG (``SpikeModel_q``, eval mode) as NIR, node by node.

Each spiking layer ``<name>`` (a ``SpikeModule_q`` / ``SpikeModule_nq``; node names are the
module names with ``_`` for ``.``, e.g. ``model_features_0``) computes per step
``I_t = ((conv(x_t) + extra_bias) + theta / (2T))``, ``u_t = u'_{t-1} + I_t``,
``z_t = [u_t >= theta]`` and ``u'_t = u_t - z_t`` (spikes 0/1, reset by subtraction).  It maps to:

* ``<name>``: ``nir.Conv2d`` with the weight the forward uses (levels × scale for quantized
  layers) and the layer's bias (zeros without one); a pooling layer (``AvgPoolConv_q``, a
  depthwise 2×2 convolution) as a dense ``Conv2d`` with its kernels on the channel diagonal and
  zeros elsewhere (``nir.read`` 1.0 cannot read grouped convolutions back), its ReLU left out
  (it passes every value: non-negative kernels over spikes);
* ``<name>_bias`` (pooling layers after light calibration: ``extra_bias``) and ``<name>_shift``
  (the constant ``theta / (2T)``, rounded to float32 as torch adds it): ``nir.Conv2d`` nodes with
  zero weight (1×1 where that gives the layer's output size) and the constant as bias, fed by
  the layer's input, so they output the constant map; NIR has no bias node for feature maps;
* ``<name>_current``: ``nir.Scale(1)``, whose input is the sum of ``<name>``, ``<name>_bias`` and
  ``<name>_shift`` in that order, the network's additions;
* the neuron: :func:`cbp.nir_export.soft_reset_if` (``<name>_v`` = ``nir.I`` with ``r = 1/dt``,
  ``<name>_spike`` = ``nir.Threshold`` at the float32 below ``theta``, ``<name>_reset`` =
  ``nir.Scale(-1)`` back into ``<name>_v``, one step late);
* a ``FoldedBatchNorm2d`` after a spiking layer sees only 0/1 spikes: left out where it maps them
  to 0/1, else ``nir.Scale(BN(1))`` where ``BN(0) = 0``; the final ``AvgPool2d(1)``, ReLU slots and
  dropout pass their input and are left out;
* the classifier: ``nir.Flatten`` and ``nir.Affine``; ``logit_sum`` = ``nir.I`` (``r = 1/dt``)
  sums its logits over the steps, the network's output at the last step.

Outside the graph, as NIR leaves them to the caller: the input (the image at every step) and
the readout (the class with the largest output at the last step); both are in the metadata
with ``dt``, T and the firing rule.  What NIR cannot express is one ``NIRExportError`` naming
the layer: a non-zero initial membrane potential (``mem_pot_init`` of advanced calibration: NIR
states start at zero and have no initial-value parameter), a pooling kernel with negative
weights (its ReLU would act; NIR has no ReLU node), a batch norm that turns silence into a
non-zero value, grouped or non-zero-padded convolutions, or a layer NIR has no node for.

:func:`compare` runs the file with :mod:`cbp.nir_torch` (step by step, the same torch
operations in the same order as the network) against the network: every layer's spikes at
every step and the summed output must be identical.
"""

from __future__ import annotations

import nir
import numpy as np
import torch
from CIFAR.models.q_spiking_layer import SPIKE_TYPES
from CIFAR.models.q_utils import AvgPoolConv_q, StraightThrough
from torch import Tensor, nn

from cbp import nir_export as ne

INPUT_RULE = "the image [C, H, W] at every step (direct encoding)"
READOUT = "the class whose output (the logits summed over the steps) is largest at the last step"
OUTPUT_NODE = "logit_sum"
IMAGE_SHAPE = (3, 32, 32)  # CIFAR-10/100 and the embedded DIGITS images


def _refuse(name: str, module: nn.Module, why: str) -> ne.NIRExportError:
    return ne.NIRExportError(f"cannot export layer '{name}' ({type(module).__name__}): {why}")


def _pair(v) -> tuple[int, int]:
    return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _out_hw(hw, kernel, stride, padding, dilation) -> tuple[int, int]:
    return tuple((h + 2 * p - d * (k - 1) - 1) // s + 1
                 for h, k, s, p, d in zip(hw, kernel, stride, padding, dilation))


def _conv_node(hw, weight: Tensor, bias: Tensor | None, conv: nn.Conv2d) -> nir.Conv2d:
    w = weight.detach().float().cpu().numpy()
    b = (np.zeros(w.shape[0], dtype=np.float32) if bias is None
         else bias.detach().float().cpu().numpy())
    return nir.Conv2d(input_shape=tuple(hw), weight=w, stride=np.array(_pair(conv.stride)),
                      padding=np.array(_pair(conv.padding)),
                      dilation=np.array(_pair(conv.dilation)), groups=1, bias=b)


def _constant_node(cin: int, hw, out_hw, values: np.ndarray, conv: nn.Conv2d) -> nir.Conv2d:
    """A zero-weight ``Conv2d`` giving the map ``values[c]`` (per channel) of ``out_hw``."""
    c = values.shape[0]
    stride = _pair(conv.stride)
    if _out_hw(hw, (1, 1), stride, (0, 0), (1, 1)) == tuple(out_hw):
        kernel, padding, dilation = (1, 1), (0, 0), (1, 1)
    else:
        kernel, padding, dilation = (_pair(conv.kernel_size), _pair(conv.padding),
                                     _pair(conv.dilation))
    return nir.Conv2d(input_shape=tuple(hw), weight=np.zeros((c, cin, *kernel), np.float32),
                      stride=np.array(stride), padding=np.array(padding),
                      dilation=np.array(dilation), groups=1,
                      bias=values.astype(np.float32))


def _layer_conv(name: str, m: nn.Module) -> tuple[Tensor, Tensor | None, bool]:
    """(dense weight, bias, is pooling) of a spiking layer's convolution."""
    conv = m.conv
    if isinstance(conv, AvgPoolConv_q):
        w = conv.weight.detach()
        c = conv.out_channels
        if conv.groups != c or conv.in_channels != c or conv.padding_mode != "zeros":
            raise _refuse(name, m, f"pooling convolution with groups={conv.groups} over {c} "
                                   "channels")
        if bool((w < 0).any()):
            raise _refuse(name, m, "pooling kernel with negative weights: its ReLU would act "
                                   "and NIR has no ReLU node")
        dense = torch.zeros(c, c, *w.shape[2:], dtype=w.dtype, device=w.device)
        dense[range(c), range(c)] = w[:, 0]
        return dense, conv.bias, True
    try:
        plain = ne.plain_layer(name, conv)
    except ne.NIRExportError as exc:
        raise _refuse(name, m, str(exc).split("): ", 1)[-1]) from None
    if not isinstance(plain, nn.Conv2d):
        raise _refuse(name, m, "NIR has no node for its layer")
    return plain.weight, plain.bias, False


def _initial_potential(name: str, m: nn.Module) -> None:
    init = m.mem_pot_init
    nonzero = bool(init != 0) if isinstance(init, (int, float)) else bool(init.ne(0).any())
    if nonzero:
        raise _refuse(name, m, "non-zero initial membrane potential (advanced calibration's "
                               "mem_pot_init): NIR states start at zero and have no "
                               "initial-value parameter")


def _threshold(name: str, m: nn.Module) -> float:
    th = m.threshold
    value = None if th is None else (float(th) if not torch.is_tensor(th) or th.numel() == 1
                                     else None)
    if value is None or not np.isfinite(value):
        raise _refuse(name, m, f"threshold {th!r} is not one finite number")
    return value


def _bn_scale(name: str, bn: nn.Module, shape) -> np.ndarray | None:
    """The batch norm after a spiking layer on 0/1 spikes: None where it passes them, else the
    per-element scale ``BN(1)`` (``BN(0)`` must be 0)."""
    if bn.running_mean is None or bn.running_var is None:
        raise _refuse(name, bn, "without running statistics it normalises with batch "
                                "statistics")
    p = bn.running_mean
    c = int(shape[0])
    with torch.no_grad():
        was = bn.training
        bn.eval()
        try:
            zero = bn(torch.zeros(1, c, 1, 1, dtype=p.dtype, device=p.device)).flatten()
            one = bn(torch.ones(1, c, 1, 1, dtype=p.dtype, device=p.device)).flatten()
        finally:
            bn.train(was)
    if bool((zero != 0).any()):
        raise _refuse(name, bn, "it maps a silent neuron to a non-zero value and NIR has no "
                                "bias node for feature maps")
    if bool((one == 1).all()):
        return None
    return np.broadcast_to(one.float().cpu().numpy()[:, None, None], tuple(shape)).copy()


@torch.no_grad()
def calibration_graph(snn: nn.Module, image_shape=IMAGE_SHAPE, dt: float = ne.DEFAULT_DT
                      ) -> nir.NIRGraph:
    """The eval-mode ``snn`` (``SpikeModel_q``) as a ``nir.NIRGraph`` whose input is one step's
    image ``[C, H, W]`` and whose output is the logits summed up to that step."""
    if not dt > 0:
        raise ne.NIRExportError(f"cannot export with dt={dt}: it must be positive")
    model = snn.model
    shape = [int(s) for s in image_shape]
    nodes: dict[str, nir.NIRNode] = {"input": nir.Input(input_type={"input": np.array(shape)})}
    edges: list[tuple[str, str]] = []
    last = "input"
    after_spikes = False  # the last node's values are spikes of a spiking layer (0/1 or scaled)
    spiking = 0
    steps = int(snn.T)
    for idx, child in model.features.named_children():
        name = f"model.features.{idx}"
        node = ne.node_name(name)
        if isinstance(child, SPIKE_TYPES):
            _initial_potential(name, child)
            theta = _threshold(name, child)
            weight, bias, pooling = _layer_conv(name, child)
            if pooling and not after_spikes:
                raise _refuse(name, child, "pooling of an analog map: its ReLU would act and "
                                           "NIR has no ReLU node")
            conv = child.conv
            hw = shape[1:]
            out_hw = _out_hw(hw, _pair(conv.kernel_size), _pair(conv.stride),
                             _pair(conv.padding), _pair(conv.dilation))
            out_shape = [int(weight.shape[0]), *out_hw]
            nodes[node] = _conv_node(hw, weight, bias, conv)
            edges.append((last, node))
            feeds = [node]
            constants = []
            if child.extra_bias is not None:
                constants.append(("_bias", child.extra_bias.detach().float().cpu().numpy()))
            if child.enable_shift:
                shift = theta * 0.5 / child.sim_length  # as the forward computes it
                constants.append(("_shift", np.full(out_shape[0], shift, dtype=np.float32)))
            for suffix, values in constants:
                nodes[node + suffix] = _constant_node(shape[0], hw, out_hw,
                                                      values.reshape(-1), conv)
                edges.append((last, node + suffix))
                feeds.append(node + suffix)
            current = node + "_current"
            nodes[current] = nir.Scale(scale=np.ones(out_shape, dtype=np.float32))
            edges += [(f, current) for f in feeds]
            neuron, inner = ne.soft_reset_if(node, out_shape, theta, 1.0, dt)
            nodes.update(neuron)
            edges += inner
            edges.append((current, node + "_v"))
            last, shape, after_spikes = node + ne.SPIKE_SUFFIX, out_shape, True
            spiking += 1
        elif isinstance(child, nn.BatchNorm2d):
            if not after_spikes:
                raise _refuse(name, child, "a batch norm of an analog map has no NIR node")
            scale = _bn_scale(name, child, shape)
            if scale is not None:
                if bool((scale < 0).any()):
                    after_spikes = False  # negative values: a pooling ReLU would act
                nodes[node] = nir.Scale(scale=scale)
                edges.append((last, node))
                last = node
        elif isinstance(child, (StraightThrough, nn.Identity, nn.Dropout)):
            continue  # passes its input at evaluation
        elif isinstance(child, nn.AvgPool2d) and _pair(child.kernel_size) == (1, 1) and \
                _pair(child.stride or 1) == (1, 1) and _pair(child.padding) == (0, 0):
            continue  # a 1x1 average passes its input
        else:
            raise _refuse(name, child, "NIR has no node for it")
    if not spiking:
        raise ne.NIRExportError(f"cannot export {type(snn).__name__}: it has no spiking layers")
    fc = model.classifier
    if type(fc) is not nn.Linear:
        raise _refuse("model.classifier", fc, "expected a plain nn.Linear")
    n_in = int(np.prod(shape))
    if fc.in_features != n_in:
        raise _refuse("model.classifier", fc, f"{fc.in_features} inputs for {n_in} features")
    nodes["flatten"] = nir.Flatten(input_type={"input": np.array(shape)}, start_dim=0,
                                   end_dim=-1)
    edges.append((last, "flatten"))
    w = fc.weight.detach().float().cpu().numpy()
    classifier = ne.node_name("model.classifier")
    nodes[classifier] = (nir.Affine(weight=w, bias=fc.bias.detach().float().cpu().numpy())
                         if fc.bias is not None else nir.Linear(weight=w))
    nodes[OUTPUT_NODE] = nir.I(r=np.full(fc.out_features, 1.0 / dt, dtype=np.float64))
    nodes["output"] = nir.Output(output_type={"output": np.array([fc.out_features])})
    edges += [("flatten", classifier), (classifier, OUTPUT_NODE), (OUTPUT_NODE, "output")]
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata={
        "dt": float(dt), "firing": ne.FIRING, "neuron": ne.SOFT_RESET_FIRING,
        "timesteps": steps, "input": INPUT_RULE, "readout": READOUT,
    })


def network_input(snn: nn.Module, images: Tensor) -> Tensor:
    """The graph's input sequence for ``images`` ``[N, C, H, W]``: the image at each of the T
    steps, ``[N, C, H, W, T]``."""
    return images.unsqueeze(-1).expand(*images.shape, int(snn.T))


@torch.no_grad()
def calibration_recording(snn: nn.Module, images: Tensor) -> ne.Recording:
    """``snn``'s running output (the logits summed up to each step, the last one its output)
    ``[T, N, classes]`` and every spiking layer's spikes ``[T, N, C, H, W]`` on ``images``."""
    spikes: dict[str, list[Tensor]] = {name: [] for name, _ in snn.spike_modules()}
    logits: list[Tensor] = []
    handles = [m.register_forward_hook(
        lambda _m, _i, out, n=name: spikes[n].append(out.detach().clone()))
        for name, m in snn.spike_modules()]
    handles.append(snn.model.classifier.register_forward_hook(
        lambda _m, _i, out: logits.append(out.detach().clone())))
    was = snn.training
    try:
        snn.eval()
        out = snn(images)
    finally:
        snn.train(was)
        for h in handles:
            h.remove()
    running, total = [], 0
    for step in logits[:-1]:
        total = total + step  # the network's own sum, step by step
        running.append(total)
    running.append(out)
    return ne.Recording(torch.stack(running), {n: torch.stack(s) for n, s in spikes.items()})


@torch.no_grad()
def compare(snn: nn.Module, interpreter: nn.Module, images: Tensor) -> ne.RoundTrip:
    """Run ``snn`` and the loaded graph (:func:`cbp.nir_torch.load`) on ``images`` and compare
    every spiking layer's spikes at every step and the summed output at every step."""
    ref = calibration_recording(snn, images)
    got = interpreter.record(network_input(snn, images))
    return ne.RoundTrip.of(ref, got, {n: ne.node_name(n) + ne.SPIKE_SUFFIX for n in ref.spikes})
