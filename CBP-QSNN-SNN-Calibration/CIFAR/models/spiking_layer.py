"""ANN -> SNN conversion: integrate-and-fire spiking layers and the threshold search.

``SpikeModel(ann, sim_length=T)`` replaces every conv (and every ``AvgPoolConv``) by a
``SpikeModule`` that owns the following ReLU.  In ANN mode a ``SpikeModule`` computes
relu(conv(x)) with the *original* parameters; in spike mode it is an IF neuron with reset by
subtraction, spike amplitude theta, comparison ``u >= theta`` and a constant theta/(2T) input
shift.  The classifier stays analog; ``SpikeModel`` sums its logits over the T steps.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from distributed_utils.dist_helper import allaverage
from torch import nn

from CIFAR.models.utils import AvgPoolConv, StraightThrough


class SpikeModule(nn.Module):
    """A conv/linear layer that runs either as ANN (relu) or as an IF spiking layer."""

    def __init__(self, sim_length: int, conv: nn.Conv2d | nn.Linear, enable_shift: bool = True
                 ) -> None:
        super().__init__()
        if isinstance(conv, nn.Conv2d):
            self.fwd_kwargs = {"stride": conv.stride, "padding": conv.padding,
                               "dilation": conv.dilation, "groups": conv.groups}
            self.fwd_func = F.conv2d
        else:
            self.fwd_kwargs = {}
            self.fwd_func = F.linear
        self.threshold: torch.Tensor | float | None = None
        self.mem_pot: torch.Tensor | float = 0
        self.mem_pot_init: torch.Tensor | int = 0
        self.weight = conv.weight  # shared parameter: the spike path uses (and calibrates) it
        self.org_weight = copy.deepcopy(conv.weight.data)  # the ANN path keeps the original
        if conv.bias is not None:
            self.bias = conv.bias
            self.org_bias = copy.deepcopy(conv.bias.data)
        else:
            # a plain attribute: light calibration may later store a tensor here
            self.bias = None
            self.org_bias = None
        self.use_spike = False
        self.enable_shift = enable_shift
        self.sim_length = sim_length
        self.cur_t = 0
        self.relu: nn.Module = StraightThrough()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.use_spike:
            return self.relu(self.fwd_func(input, self.org_weight, self.org_bias,
                                           **self.fwd_kwargs))
        self.cur_t += 1
        x = self.fwd_func(input, self.weight, self.bias, **self.fwd_kwargs)
        return integrate_and_fire(self, x, heaviside_spike)

    def init_membrane_potential(self) -> None:
        reset_potential(self)


def heaviside_spike(mem_pot: torch.Tensor, threshold) -> torch.Tensor:
    """Spike of amplitude ``threshold`` where the potential reaches it."""
    return (mem_pot >= threshold).to(mem_pot.dtype) * threshold


def integrate_and_fire(layer: nn.Module, x: torch.Tensor, fire) -> torch.Tensor:
    """One IF step of ``layer`` (``mem_pot``, ``threshold``, ``enable_shift``, ``sim_length``):
    add the input (plus the theta/2T shift), fire with ``fire(mem_pot, threshold)``, reset by
    subtraction."""
    if layer.enable_shift and layer.threshold is not None:
        x = x + layer.threshold * 0.5 / layer.sim_length
    layer.mem_pot = layer.mem_pot + x
    spike = fire(layer.mem_pot, layer.threshold)
    layer.mem_pot = layer.mem_pot - spike
    return spike


def reset_potential(layer: nn.Module) -> None:
    """Start a new sample: potential back to its (possibly corrected) initial value."""
    init = layer.mem_pot_init
    layer.mem_pot = init if isinstance(init, (int, float)) else init.clone()
    layer.cur_t = 0


class SpikeModel(nn.Module):
    """Wraps an ANN; ``set_spike_state(True)`` switches every ``SpikeModule`` to IF neurons."""

    def __init__(self, model: nn.Module, sim_length: int, specials: dict | None = None) -> None:
        super().__init__()
        if sim_length <= 0:
            raise ValueError("SNN simulation length must be positive")
        self.model = model
        self.specials = dict(specials or {})
        self.spike_module_refactor(self.model, sim_length)
        self.use_spike = False
        self.T = sim_length

    # what the refactor wraps: subclasses (the quantized model) override these three
    spike_types: tuple[type, ...] = ()
    pool_type: type = AvgPoolConv

    def wrap_conv(self, conv: nn.Module, sim_length: int) -> nn.Module:
        """The spiking layer that replaces a (non-pooling) conv."""
        return SpikeModule(sim_length=sim_length, conv=conv)

    def wrap_pool(self, pool: nn.Module, sim_length: int) -> nn.Module:
        """The spiking layer that replaces an average-pooling conv."""
        return SpikeModule(sim_length=sim_length, conv=pool)

    def spike_module_refactor(self, module: nn.Module, sim_length: int,
                              prev_module: nn.Module | None = None) -> nn.Module | None:
        """Recursively replace convs by spiking layers and move each following ReLU into it."""
        for name, child in module.named_children():
            if type(child) in self.specials:
                setattr(module, name, self.specials[type(child)](child, sim_length=sim_length))
            elif isinstance(child, nn.Conv2d) and not isinstance(child, self.pool_type):
                setattr(module, name, self.wrap_conv(child, sim_length))
                prev_module = getattr(module, name)
            elif isinstance(child, (nn.ReLU, nn.ReLU6)):
                if prev_module is not None:
                    prev_module.add_module("relu", child)
                    setattr(module, name, StraightThrough())
            elif isinstance(child, self.pool_type):
                relu = child.relu
                setattr(module, name, self.wrap_pool(child, sim_length))
                getattr(module, name).add_module("relu", relu)
            else:
                prev_module = self.spike_module_refactor(child, sim_length, prev_module)
        return prev_module

    def spike_modules(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, self.spike_types)]

    def set_spike_state(self, use_spike: bool = True) -> None:
        self.use_spike = use_spike
        for m in self.model.modules():
            if isinstance(m, self.spike_types):
                m.use_spike = use_spike

    def init_membrane_potential(self) -> None:
        for m in self.model.modules():
            if isinstance(m, self.spike_types):
                m.init_membrane_potential()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.use_spike:
            return self.model(input)
        self.init_membrane_potential()
        out = 0
        for _ in range(self.T):
            out = out + self.model(input)  # direct encoding; logits summed over T
        return out


# ----------------------------------------------------------------------- threshold search


SpikeModel.spike_types = (SpikeModule,)


class DataSaverHook:
    """Forward hook that sets ``module.threshold`` from the layer's ANN output (EMA over
    batches with ``momentum``, or the running max when ``momentum`` is None)."""

    def __init__(self, momentum: float | None = 0.9, sim_length: int = 8, mse: bool = True,
                 percentile: float | None = None, channel_wise: bool = False,
                 dist_avg: bool = False) -> None:
        self.momentum = momentum
        self.max_act = None
        self.T = sim_length
        self.mse = mse
        self.percentile = percentile
        self.channel_wise = channel_wise
        self.dist_avg = dist_avg

    def _threshold(self, out: torch.Tensor) -> torch.Tensor:
        if self.mse:
            return find_threshold_mse(out, T=self.T, channel_wise=self.channel_wise)
        if self.percentile is not None:
            if not 0.0 <= self.percentile <= 1.0:
                raise ValueError("percentile must be in [0, 1]")
            return quantile(out, self.percentile)
        return out.max()

    def __call__(self, module: nn.Module, input_batch, output_batch: torch.Tensor) -> None:
        cur = self._threshold(output_batch.detach())
        if self.max_act is None:
            self.max_act = cur
        elif self.momentum is None:
            self.max_act = torch.maximum(self.max_act, cur)
        else:
            self.max_act = self.momentum * self.max_act + (1 - self.momentum) * cur
        if self.dist_avg:
            allaverage(self.max_act)
        module.threshold = self.max_act


def quantile(tensor: torch.Tensor, p: float) -> torch.Tensor:
    try:
        return torch.quantile(tensor.flatten().float(), p).to(tensor.dtype)
    except RuntimeError:  # input too large for torch.quantile
        arr = tensor.detach().cpu().numpy()
        return torch.tensor(np.percentile(arr, q=p * 100)).type_as(tensor)


def clip_floor(tensor: torch.Tensor, T: int, Vth: torch.Tensor | float) -> torch.Tensor:
    """What T IF steps without shift can represent: floor(clamp(a/V*T, 0, T)) * V/T."""
    return torch.clamp(tensor / Vth * T, min=0, max=T).floor() * Vth / T


def find_threshold_mse(tensor: torch.Tensor, T: int = 8, channel_wise: bool = True
                       ) -> torch.Tensor:
    """Grid search V = max*(1 - 0.01 i), i = 0..94, minimising mean((a - clip_floor(a))^2).
    ``channel_wise`` returns one threshold per channel (shape (1, C, 1, 1) or (1, C))."""
    if channel_wise:
        c = tensor.shape[1]
        best = torch.stack([find_threshold_mse(tensor[:, i], T, channel_wise=False)
                            for i in range(c)]).type_as(tensor)
        return best.reshape(1, c, 1, 1) if tensor.dim() == 4 else best.reshape(1, c)
    max_act = tensor.max()
    scores = []
    for i in range(95):
        v = max_act * (1.0 - i * 0.01)
        scores.append(lp_loss(tensor, clip_floor(tensor, T, v), p=2.0, reduction="other"))
    scores_t = torch.stack(scores)
    scores_t = torch.nan_to_num(scores_t, nan=float("inf"))
    if not (scores_t < 1e5).any():  # the reference's scan starts at 1e5 and then keeps 0
        return max_act * 0
    i = int(torch.argmin(scores_t))  # first minimum, as the strict '<' scan
    return max_act * (1.0 - i * 0.01)


@torch.no_grad()
def get_maximum_activation(train_loader, model: SpikeModel, momentum: float | None = 0.9,
                           iters: int = 20, sim_length: int = 8, mse: bool = True,
                           percentile: float | None = None, channel_wise: bool = False,
                           dist_avg: bool = False) -> None:
    """Set every SpikeModule's threshold from its ANN activations on batches 0..iters+1 of
    ``train_loader`` (the loop stops after the batch whose index exceeds ``iters``)."""
    model.set_spike_state(use_spike=False)
    model.eval()
    device = next(model.parameters()).device
    hooks = [m.register_forward_hook(DataSaverHook(momentum, sim_length, mse, percentile,
                                                   channel_wise, dist_avg))
             for m in model.modules() if isinstance(m, SpikeModule)]
    try:
        for i, (inputs, _) in enumerate(train_loader):
            model(inputs.to(device))
            if i > iters:
                break
    finally:
        for h in hooks:
            h.remove()


def lp_loss(pred: torch.Tensor, tgt: torch.Tensor, p: float = 2.0, reduction: str = "none"
            ) -> torch.Tensor:
    """``none``: |pred-tgt|^p summed over dim 1, averaged over the rest; ``channel_split``:
    summed per channel; anything else: the plain mean."""
    err = (pred - tgt).abs().pow(p)
    if reduction == "none":
        return err.sum(1).mean()
    if reduction == "channel_split":
        return err.sum((0, 2, 3))
    return err.mean()
