"""PSP filter and the spike losses (``kernel``, ``count``, ``softmax``) of TSSL-BP."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("kernel", "count", "softmax")


def psp(inputs: Tensor, network_config: Mapping) -> Tensor:
    """PSP filter along the last axis: s_t = s_{t-1} (1 - 1/tau_s) + x_t, y_t = s_t / tau_s.

    Uses the input's own time length (the reference reads ``n_steps`` from the config, which
    must be equal to it).  Differentiable.
    """
    tau_s = float(network_config["tau_s"])
    T = inputs.shape[-1]
    syn = torch.zeros_like(inputs[..., 0])
    out = []
    for t in range(T):
        syn = syn - syn / tau_s + inputs[..., t]
        out.append(syn / tau_s)
    return torch.stack(out, dim=-1)


@torch.no_grad()
def psp_inverse(y: Tensor, tau_s: float, snap: float = 1e-4) -> Tensor:
    """The input ``x`` of ``psp`` (and the spikes behind a ``TSSLBP`` trace, which follows
    the same filter): x_t = tau_s y_t - (tau_s - 1) y_{t-1}.  Values within ``snap`` of an
    integer are rounded to it, so spike trains come back exact."""
    x = y * tau_s
    x[..., 1:] -= (tau_s - 1.0) * y[..., :-1]
    r = x.round()
    return torch.where((x - r).abs() <= snap, r, x)


def desired_spikes(n_steps: int) -> Tensor:
    """The kernel loss's spike pattern: 0,1,0,1,... for T >= 10, else 0,1,1,1,1 (tiled, and
    cut to ``n_steps`` when T is not a multiple of the pattern)."""
    pattern = [0, 1] * 5 if n_steps >= 10 else [0, 1, 1, 1, 1]
    reps = -(-n_steps // len(pattern))
    return torch.tensor((pattern * reps)[:n_steps], dtype=torch.float32)


def kernel_targets(labels: Tensor, network_config: Mapping, dtype=torch.float32) -> Tensor:
    """(N, n_class, 1, 1, T) target: the PSP of ``desired_spikes`` on the label row, else 0.

    The loss filters the target through ``psp`` once more (see ``SpikeLoss.spike_kernel``).
    """
    T, n_class = int(network_config["n_steps"]), int(network_config["n_class"])
    desired = psp(desired_spikes(T).view(1, 1, 1, 1, T), network_config).view(T)
    out = torch.zeros(labels.shape[0], n_class, 1, 1, T, dtype=dtype, device=labels.device)
    out[torch.arange(labels.shape[0], device=labels.device), labels] = desired.to(out)
    return out


def count_targets(labels: Tensor, network_config: Mapping, dtype=torch.float32) -> Tensor:
    """(N, n_class, 1, 1): ``desired_count`` on the label, ``undesired_count`` elsewhere."""
    n_class = int(network_config["n_class"])
    out = torch.full((labels.shape[0], n_class, 1, 1), float(network_config["undesired_count"]),
                     dtype=dtype, device=labels.device)
    out[torch.arange(labels.shape[0], device=labels.device), labels] = float(
        network_config["desired_count"])
    return out


class _PassThrough(torch.autograd.Function):
    """Returns ``delta`` (computed without autograd) and hands the incoming gradient to the
    outputs unchanged, as the reference's hand-written loss backwards do."""

    @staticmethod
    def forward(ctx, outputs: Tensor, delta: Tensor) -> Tensor:
        return delta

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def count_delta(outputs: Tensor, targets: Tensor, label_mask: Tensor) -> Tensor:
    """(sum_t a - target)/T, kept only where the label neuron has too few (delta < 0) or another
    neuron too many (delta > 0); repeated over T."""
    T = outputs.shape[-1]
    delta = (outputs.detach().sum(dim=-1) - targets) / T
    keep = torch.where(label_mask, delta < 0, delta > 0)
    delta = torch.where(keep, delta, torch.zeros_like(delta))
    return delta.unsqueeze(-1).expand(*delta.shape, T).contiguous()


class SpikeLoss(torch.nn.Module):
    """The three losses; each returns a scalar (sums over batch, classes and time)."""

    def __init__(self, network_config: Mapping) -> None:
        super().__init__()
        self.network_config = network_config
        self.criterion = torch.nn.CrossEntropyLoss()

    def spike_kernel(self, outputs: Tensor, targets: Tensor, network_config: Mapping | None = None
                     ) -> Tensor:
        """1/2 sum (a - psp(target))^2."""
        delta = outputs - psp(targets, network_config or self.network_config)
        return 0.5 * torch.sum(delta**2)

    def spike_count(self, outputs: Tensor, targets: Tensor, network_config: Mapping | None = None,
                    layer_config: Mapping | None = None, labels: Tensor | None = None) -> Tensor:
        """1/2 sum delta^2 with the one-sided count error; dL/da_t = delta (pass-through)."""
        cfg = network_config or self.network_config
        if labels is not None:
            mask = torch.zeros_like(targets, dtype=torch.bool)
            mask[torch.arange(labels.shape[0], device=labels.device), labels] = True
        else:  # the reference identifies the label neuron by its target value
            mask = targets == float(cfg["desired_count"])
        delta = _PassThrough.apply(outputs, count_delta(outputs, targets, mask))
        return 0.5 * torch.sum(delta**2)

    def spike_soft_max(self, outputs: Tensor, labels: Tensor) -> Tensor:
        logits = F.log_softmax(outputs.sum(dim=4).squeeze(-1).squeeze(-1), dim=1)
        return self.criterion(logits, labels)

    def forward(self, outputs: Tensor, labels: Tensor) -> Tensor:
        """The configured loss (``network_config['loss']``) for integer ``labels``."""
        kind = self.network_config["loss"]
        if kind == "kernel":
            return self.spike_kernel(outputs, kernel_targets(labels, self.network_config,
                                                             outputs.dtype))
        if kind == "count":
            return self.spike_count(outputs, count_targets(labels, self.network_config,
                                                           outputs.dtype), labels=labels)
        if kind == "softmax":
            return self.spike_soft_max(outputs, labels)
        raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")


def predict(outputs: Tensor) -> Tensor:
    """Class with the largest summed PSP (first index on ties)."""
    return outputs.detach().sum(dim=-1).flatten(1).argmax(dim=1)
