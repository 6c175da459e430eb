"""Quantized SEW-ResNet for ImageNet: ``sew_resnet18/34(..., T, connect_f, mode)``; block and
downsample convs are ``cbp.QConv2d``, the stem conv and ``fc`` stay fp32."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sewcommon.imagenet_nets import (  # noqa: E402, F401
    BasicBlock,
    Bottleneck,
    SEWResNet,
    sew_resnet18,
    sew_resnet34,
    sew_resnet50,
    sew_resnet101,
    sew_resnet152,
)

__all__ = ["SEWResNet", "sew_resnet18", "sew_resnet34", "sew_resnet50", "sew_resnet101",
           "sew_resnet152"]
