"""Fold BatchNorm layers into the preceding conv / linear layer."""

from __future__ import annotations

import torch
from torch import nn

from CIFAR.models.utils import StraightThrough


def _fold_bn(conv_module: nn.Module, bn_module: nn.modules.batchnorm._BatchNorm, avg: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``conv_module`` with ``bn_module`` (eval statistics) folded in:
    W * gamma/sigma per output channel and gamma*(b - mu)/sigma + beta."""
    w = conv_module.weight.data
    sigma = torch.sqrt(bn_module.running_var + bn_module.eps)
    view = (w.shape[0],) + (1,) * (w.dim() - 1)
    if bn_module.affine:
        gamma, beta = bn_module.weight.data, bn_module.bias.data
    else:
        gamma, beta = torch.ones_like(sigma), torch.zeros_like(sigma)
    weight = w * (gamma / sigma).view(view)
    bias = beta - gamma * bn_module.running_mean / sigma
    if conv_module.bias is not None:
        bias = bias + gamma * conv_module.bias.data / sigma
    return weight, bias


def fold_bn_into_conv(conv_module: nn.Module, bn_module: nn.modules.batchnorm._BatchNorm,
                      avg: bool = False) -> None:
    """Fold in place; a conv without bias gets a new bias parameter.  The BN's running stats
    are then set to (beta, gamma^2), as the reference does."""
    w, b = _fold_bn(conv_module, bn_module, avg)
    if conv_module.bias is None:
        conv_module.bias = nn.Parameter(b)
    else:
        conv_module.bias.data = b
    conv_module.weight.data = w
    if bn_module.affine:
        bn_module.running_mean = bn_module.bias.data.clone()
        bn_module.running_var = bn_module.weight.data.clone() ** 2


def reset_bn(module: nn.BatchNorm2d) -> None:
    if module.track_running_stats:
        module.running_mean.zero_()
        module.running_var.fill_(1 - module.eps)
    if module.affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def is_bn(m: nn.Module) -> bool:
    return isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d))


def is_absorbing(m: nn.Module | None) -> bool:
    """Conv2d / Linear (the cbp quantized layers are subclasses)."""
    return isinstance(m, (nn.Conv2d, nn.Linear))


def search_fold_and_remove_bn(model: nn.Module) -> nn.Module | None:
    """Recursively fold every BN that directly follows a conv/linear and replace it by
    ``StraightThrough``.  Puts the model in eval mode."""
    model.eval()
    prev = None
    for name, m in model.named_children():
        if is_bn(m) and is_absorbing(prev):
            fold_bn_into_conv(prev, m)
            setattr(model, name, StraightThrough())
        elif is_absorbing(m):
            prev = m
        else:
            prev = search_fold_and_remove_bn(m)
    return prev


def search_fold_and_reset_bn(model: nn.Module) -> None:
    """Fold every BN into its conv but keep the BN module (with its stats overwritten)."""
    model.eval()
    prev = None
    for _, m in model.named_children():
        if is_bn(m) and is_absorbing(prev):
            fold_bn_into_conv(prev, m)
        else:
            search_fold_and_reset_bn(m)
        prev = m
