"""SEW-ResNet for ImageNet (torchvision-style ResNet with IF neurons and SEW shortcuts).

Names follow the reference: ``conv1``/``bn1`` (fp32 stem), ``layerL.B.conv{1,2}.0.weight|scale``,
``layerL.B.conv{1,2}.1.*`` (BN), ``layerL.0.downsample.0.{0,1}.*``, ``fc.*`` (fp32).  ``mode=None``
is the fp32 network of the upstream checkpoints; a mode in ``cbp.MODES`` quantizes every block
and downsample conv.  ``width`` scales the channel counts (1.0 = the paper's networks).
"""

from __future__ import annotations

import torch
from torch import nn

from cbp import MODES, QConv2d

from .neurons import SeqToANNContainer, connect, if_node

__all__ = ["SEWResNet", "BasicBlock", "Bottleneck", "sew_resnet18", "sew_resnet34",
           "sew_resnet50", "sew_resnet101", "sew_resnet152"]


def _check(mode: str | None) -> bool:
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r} (use one of {', '.join(MODES)})")
    return mode is not None


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1,
            mode: str | None = None) -> nn.Conv2d:
    kw = dict(kernel_size=3, stride=stride, padding=dilation, groups=groups, dilation=dilation,
              bias=False)
    return QConv2d(in_planes, out_planes, mode=mode, **kw) if _check(mode) else nn.Conv2d(
        in_planes, out_planes, **kw)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1, mode: str | None = None) -> nn.Conv2d:
    kw = dict(kernel_size=1, stride=stride, bias=False)
    return QConv2d(in_planes, out_planes, mode=mode, **kw) if _check(mode) else nn.Conv2d(
        in_planes, out_planes, **kw)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer=None, connect_f: str | None = None,
                 mode: str | None = None) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("dilation > 1 is not supported in BasicBlock")
        self.connect_f = connect_f
        self.conv1 = SeqToANNContainer(conv3x3(inplanes, planes, stride, mode=mode),
                                       norm_layer(planes))
        self.sn1 = if_node()
        self.conv2 = SeqToANNContainer(conv3x3(planes, planes, mode=mode), norm_layer(planes))
        self.downsample = downsample
        self.stride = stride
        self.sn2 = if_node()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.sn2(self.conv2(self.sn1(self.conv1(x))))
        identity = x if self.downsample is None else self.downsample(x)
        return connect(self.connect_f, out, identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer=None, connect_f: str | None = None,
                 mode: str | None = None) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.connect_f = connect_f
        self.conv1 = SeqToANNContainer(conv1x1(inplanes, width, mode=mode), norm_layer(width))
        self.sn1 = if_node()
        self.conv2 = SeqToANNContainer(conv3x3(width, width, stride, groups, dilation, mode=mode),
                                       norm_layer(width))
        self.sn2 = if_node()
        self.conv3 = SeqToANNContainer(conv1x1(width, planes * self.expansion, mode=mode),
                                       norm_layer(planes * self.expansion))
        self.downsample = downsample
        self.stride = stride
        self.sn3 = if_node()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.sn3(self.conv3(self.sn2(self.conv2(self.sn1(self.conv1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return connect(self.connect_f, out, identity)


def zero_init_blocks(net: nn.Module, connect_f: str | None) -> None:
    """Zero the last BN of every block (bias 1 for AND) so each block starts as its shortcut."""
    for m in net.modules():
        bn = None
        if isinstance(m, Bottleneck):
            bn = m.conv3[1]
        elif isinstance(m, BasicBlock):
            bn = m.conv2[1]
        if bn is not None:
            nn.init.constant_(bn.weight, 0)
            if connect_f == "AND":
                nn.init.constant_(bn.bias, 1)


class SEWResNet(nn.Module):
    def __init__(self, block, layers: list[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation=None, norm_layer=None, T: int = 4,
                 connect_f: str | None = None, mode: str | None = None,
                 width: float = 1.0) -> None:
        super().__init__()
        self.T = T
        self.connect_f = connect_f
        norm_layer = norm_layer or nn.BatchNorm2d
        self._norm_layer = norm_layer
        planes = [max(1, int(round(p * width))) for p in (64, 128, 256, 512)]
        self.inplanes = planes[0]
        self.dilation = 1
        dil = replace_stride_with_dilation or [False, False, False]
        if len(dil) != 3:
            raise ValueError("replace_stride_with_dilation should be None or a 3-element tuple")
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.sn1 = if_node()
        self.maxpool = SeqToANNContainer(nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.layer1 = self._make_layer(block, planes[0], layers[0], connect_f=connect_f, mode=mode)
        self.layer2 = self._make_layer(block, planes[1], layers[1], stride=2, dilate=dil[0],
                                       connect_f=connect_f, mode=mode)
        self.layer3 = self._make_layer(block, planes[2], layers[2], stride=2, dilate=dil[1],
                                       connect_f=connect_f, mode=mode)
        self.layer4 = self._make_layer(block, planes[3], layers[3], stride=2, dilate=dil[2],
                                       connect_f=connect_f, mode=mode)
        self.avgpool = SeqToANNContainer(nn.AdaptiveAvgPool2d((1, 1)))
        self.fc = nn.Linear(planes[3] * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            zero_init_blocks(self, connect_f)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilate: bool = False,
                    connect_f: str | None = None, mode: str | None = None) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                SeqToANNContainer(
                    conv1x1(self.inplanes, planes * block.expansion, stride, mode=mode),
                    norm_layer(planes * block.expansion)),
                if_node(),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                        previous_dilation, norm_layer, connect_f, mode=mode)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups,
                                base_width=self.base_width, dilation=self.dilation,
                                norm_layer=norm_layer, connect_f=connect_f, mode=mode))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)  # the static image at every time step
        x = self.maxpool(self.sn1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 2)
        return self.fc(x.mean(dim=0))


def sew_resnet18(**kwargs) -> SEWResNet:
    return SEWResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


def sew_resnet34(**kwargs) -> SEWResNet:
    return SEWResNet(BasicBlock, [3, 4, 6, 3], **kwargs)


def sew_resnet50(**kwargs) -> SEWResNet:
    return SEWResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


def sew_resnet101(**kwargs) -> SEWResNet:
    return SEWResNet(Bottleneck, [3, 4, 23, 3], **kwargs)


def sew_resnet152(**kwargs) -> SEWResNet:
    return SEWResNet(Bottleneck, [3, 8, 36, 3], **kwargs)
