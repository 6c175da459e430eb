"""The quantized VGG used for CBP (``VGG_q``): first conv and classifier fp32, the other convs
``cbp.QConv2d`` (bias, frozen ``scale``), pooling kernels taken from the loaded state."""

from __future__ import annotations

import torch
from torch import nn

from cbp import MODES
from CIFAR.models.q_module import QConv2d
from CIFAR.models.q_utils import AvgPoolConv_q, FoldedBatchNorm2d
from CIFAR.models.vgg import last_channels, scaled_cfg


def conv(in_planes: int, out_planes: int, kernel_size: int, stride: int = 1, padding: int = 1,
         groups: int = 1, dilation: int = 1, mode: str | None = None, bias: bool = False
         ) -> nn.Conv2d:
    """A quantized conv for a known ``mode`` (bin, ter, 1bit, 2bit), else a plain conv."""
    if mode in MODES:
        return QConv2d(in_planes, out_planes, kernel_size, stride=stride, padding=padding,
                       groups=groups, bias=bias, dilation=dilation, mode=mode)
    return nn.Conv2d(in_planes, out_planes, kernel_size, stride=stride, padding=padding,
                     groups=groups, bias=bias, dilation=dilation)


class VGG_q(nn.Module):  # noqa: N801 - reference name
    """Same layout and state-dict keys as ``VGG`` (plus ``<conv>.scale``)."""

    def __init__(self, vgg_name: str, num_class: int = 100, use_bn: bool = True,
                 mode: str | None = None, width: float = 1.0) -> None:
        super().__init__()
        self.mode = mode
        layers = scaled_cfg(vgg_name, width)
        self.features = self._make_layers(layers, use_bn)
        self.classifier = nn.Linear(last_channels(layers), num_class)  # not quantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        return self.classifier(out.view(out.size(0), -1))

    def _make_layers(self, layers: list, use_bn: bool = True) -> nn.Sequential:
        mods: list[nn.Module] = []
        cin = 3
        for x in layers:
            if x == "M":
                mods.append(AvgPoolConv_q(kernel_size=2, stride=2, input_channel=cin))
                continue
            if cin == 3:  # the first layer is not quantized
                layer = nn.Conv2d(cin, x, kernel_size=3, padding=1)
            else:
                layer = conv(cin, x, kernel_size=3, padding=1, mode=self.mode, bias=True)
            mods += [layer, FoldedBatchNorm2d(x) if use_bn else nn.Dropout(0.25),
                     nn.ReLU(inplace=True)]
            cin = x
        mods.append(nn.AvgPool2d(kernel_size=1, stride=1))
        return nn.Sequential(*mods)
