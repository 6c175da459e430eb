"""The YAML-built TSSL-BP network.

Only the conv/linear weights are registered (``my_parameters``, an ``nn.ParameterList`` in
YAML order), so the state dict is exactly ``my_parameters.0`` ... ``my_parameters.<n-1>``
like the reference's.  Layers sit in a plain list; quantized layers keep their scale outside
the state dict.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from layers import conv, dropout, linear, pooling
from torch import Tensor, nn

from cbp import QuantTarget, bits

from functions import loss_f

LAYER_TYPES = ("conv", "linear", "pooling", "dropout")


def quant_mode(network_config: Mapping) -> str | None:
    """The configured quantization mode (None: no quantized layers)."""
    if "mode" not in network_config:
        raise KeyError("Network.mode is missing (use bin, ter, 1bit, 2bit or null)")
    return network_config["mode"]


class Network(nn.Module):
    """``Network(network_config, layers_config, input_shape)`` with ``input_shape`` = [C, H, W].

    A conv/linear layer is quantized when the network's ``mode`` is set and its ``qtype`` is
    ``"q"``.  Pass ``quantize=False`` to build the fp32 network from a quantized config.
    """

    def __init__(self, network_config: Mapping, layers_config: Mapping, input_shape,
                 quantize: bool = True, verbose: bool = False) -> None:
        super().__init__()
        self.network_config = network_config
        self.layers_config = layers_config
        mode = quant_mode(network_config) if quantize else None
        self.layers: list[nn.Module] = []
        params, q_idx, nq_idx = [], [], []
        shape = list(input_shape)
        for key, c in layers_config.items():
            kind = c.get("type")
            if kind in ("conv", "linear"):
                q = mode is not None and c.get("qtype", "nq") == "q"
                mod = conv if kind == "conv" else linear
                cls = (mod.QConvLayer if kind == "conv" else mod.QLinearLayer) if q else (
                    mod.ConvLayer if kind == "conv" else mod.LinearLayer)
                layer = cls(network_config, c, key, shape)
                (q_idx if q else nq_idx).append(len(params))
                params.append(layer.weight)
            elif kind == "pooling":
                layer = pooling.PoolLayer(network_config, c, key, shape)
            elif kind == "dropout":
                layer = dropout.DropoutLayer(c, key)
            else:
                raise ValueError(f"Undefined layer type. It is: {kind} (layer {key})")
            shape = getattr(layer, "out_shape", shape)
            self.layers.append(layer)
            if verbose:
                print(f"{key}: {kind} -> {shape}")
        self.my_parameters = nn.ParameterList(params)
        self.q_layers_list = q_idx
        self.nq_layers_list = nq_idx
        self.weight_layers = [lay for lay in self.layers if hasattr(lay, "weight")]
        self.param_size_total = sum(params[i].numel() for i in q_idx)
        self.out_shape = shape

    # ------------------------------------------------------------------ structure
    @property
    def q_layers(self) -> list[nn.Module]:
        return [self.weight_layers[i] for i in self.q_layers_list]

    def get_parameters(self):
        """Reference 7-tuple (all, nq weights, q weights, factors, midpoints, scales, size),
        or ``my_parameters`` when nothing is quantized."""
        if not self.q_layers_list:
            return self.my_parameters
        ql = self.q_layers
        return (
            self.my_parameters,
            nn.ParameterList([self.my_parameters[i] for i in self.nq_layers_list]),
            nn.ParameterList([self.my_parameters[i] for i in self.q_layers_list]),
            [lay.factor for lay in ql],
            [lay.b for lay in ql],
            [lay.scale for lay in ql],
            self.param_size_total,
        )

    def quant_targets(self) -> list[QuantTarget]:
        """One ``cbp.QuantTarget`` per quantized weight (scale tensors shared with the layers)."""
        return [QuantTarget(f"my_parameters.{i}", lay.weight, lay.scale, lay.mode)
                for i, lay in zip(self.q_layers_list, self.q_layers)]

    def scales(self) -> dict[str, Tensor]:
        """``{"my_scales.<i>": scale}`` for every quantized weight index i."""
        return {f"my_scales.{i}": lay.scale.detach().clone()
                for i, lay in zip(self.q_layers_list, self.q_layers)}

    def set_scales(self, scales: Mapping[str, Tensor] | None = None) -> None:
        """Scales from a ``scales()`` dict, or mean |W| of the current weights if None."""
        for i, lay in zip(self.q_layers_list, self.q_layers):
            lay.set_scale(None if scales is None else scales[f"my_scales.{i}"])

    def weight_memory_mbit(self) -> float:
        """Weight memory in Mbit: quantized weights at ``bits(mode)``, the others at 32."""
        q = set(self.q_layers_list)
        total = sum(w.numel() * (bits(self.weight_layers[i].mode) if i in q else 32)
                    for i, w in enumerate(self.my_parameters))
        return total / 1e6

    # ------------------------------------------------------------------ running
    def forward(self, spike_input: Tensor, epoch: int | None = None,
                is_train: bool | None = None) -> Tensor:
        """(N, C, H, W, T) input -> PSP trace of the output layer (N, n_class, 1, 1, T).

        Dropout is applied when ``is_train`` (default: ``self.training``)."""
        if self.network_config.get("model", "LIF") != "LIF":
            raise ValueError(f"unsupported neuron model {self.network_config['model']!r}")
        if self.network_config.get("rule", "TSSLBP") != "TSSLBP":
            raise ValueError(f"Unrecognized rule type. It is: {self.network_config['rule']}")
        train = self.training if is_train is None else is_train
        x = loss_f.psp(spike_input, self.network_config)
        for layer in self.layers:
            if layer.type == "dropout":
                if train:
                    x = layer(x)
            else:
                x = layer.forward_pass(x, epoch)
        return x

    @torch.no_grad()
    def weight_clipper(self) -> None:
        for layer in self.layers:
            layer.weight_clipper()

    def train(self, mode: bool = True) -> Network:
        super().train(mode)
        for layer in self.layers:
            layer.train(mode)
        return self

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for layer in self.q_layers:
            layer.scale = fn(layer.scale)
        return self
