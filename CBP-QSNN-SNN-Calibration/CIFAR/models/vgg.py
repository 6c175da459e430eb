"""The VGG ANN of SNN-Calibration (``VGG('VGG16', num_class, use_bn)``).

Layer indices, names and shapes equal the reference's at ``width=1`` so the authors'
``trained_params/ANN_VGG16_<wBN|woBN>_<DS>_ckpt.pth`` files load unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from CIFAR.models.utils import AvgPoolConv

cfg: dict[str, list] = {
    "VGG11": [16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128, "M"],
    "VGG13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "VGG16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "VGG19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


def scaled_cfg(vgg_name: str, width: float = 1.0) -> list:
    """The configuration of ``vgg_name`` with every channel count multiplied by ``width``."""
    if vgg_name not in cfg:
        raise ValueError(f"unknown VGG configuration {vgg_name!r}; choose from {', '.join(cfg)}")
    return [x if x == "M" else max(1, int(round(x * width))) for x in cfg[vgg_name]]


def last_channels(layers: list) -> int:
    return [x for x in layers if x != "M"][-1]


class VGG(nn.Module):
    """Conv(3x3, bias) -> BN or Dropout(0.25) -> ReLU blocks, AvgPoolConv for 'M', a final
    AvgPool2d(1) and one Linear classifier (512 -> num_class at width 1)."""

    def __init__(self, vgg_name: str, num_class: int = 100, use_bn: bool = True,
                 width: float = 1.0) -> None:
        super().__init__()
        layers = scaled_cfg(vgg_name, width)
        self.features = self._make_layers(layers, use_bn)
        self.classifier = nn.Linear(last_channels(layers), num_class)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not isinstance(m, AvgPoolConv):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                # std = 1/fan_in (not 1/sqrt(fan_in)), as the reference
                nn.init.normal_(m.weight, 0.0, 1.0 / m.weight.size(1))
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        return self.classifier(out.view(out.size(0), -1))

    @staticmethod
    def _make_layers(layers: list, use_bn: bool = True) -> nn.Sequential:
        mods: list[nn.Module] = []
        cin = 3
        for x in layers:
            if x == "M":
                mods.append(AvgPoolConv(kernel_size=2, stride=2, input_channel=cin))
            else:
                mods += [nn.Conv2d(cin, x, kernel_size=3, padding=1),
                         nn.BatchNorm2d(x) if use_bn else nn.Dropout(0.25),
                         nn.ReLU(inplace=True)]
                cin = x
        mods.append(nn.AvgPool2d(kernel_size=1, stride=1))
        return nn.Sequential(*mods)
