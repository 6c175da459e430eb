"""FP32 SEW-ResNet for ImageNet (the architecture of sew18/34_checkpoint_319.pth)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sewcommon import imagenet_nets as _nets  # noqa: E402
from sewcommon.imagenet_nets import BasicBlock, Bottleneck, SEWResNet  # noqa: E402, F401

__all__ = ["SEWResNet", "sew_resnet18", "sew_resnet34", "sew_resnet50", "sew_resnet101",
           "sew_resnet152"]


def sew_resnet18(**kwargs) -> SEWResNet:
    return _nets.sew_resnet18(mode=None, **kwargs)


def sew_resnet34(**kwargs) -> SEWResNet:
    return _nets.sew_resnet34(mode=None, **kwargs)


def sew_resnet50(**kwargs) -> SEWResNet:
    return _nets.sew_resnet50(mode=None, **kwargs)


def sew_resnet101(**kwargs) -> SEWResNet:
    return _nets.sew_resnet101(mode=None, **kwargs)


def sew_resnet152(**kwargs) -> SEWResNet:
    return _nets.sew_resnet152(mode=None, **kwargs)
