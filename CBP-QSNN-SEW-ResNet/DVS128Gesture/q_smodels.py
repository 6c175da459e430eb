"""Quantized 7B-Net for DVS128 Gesture: every conv except the first is a ``cbp.QConv2d``."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sewcommon.dvsnets import DVS128_LAYERS, ResNetN, layers, scaled  # noqa: E402

NUM_CLASSES = 11


def SEWResNet(connect_f, mode, width: float = 1.0, in_size: int = 128,
              num_classes: int = NUM_CLASSES, stages: int = 7) -> ResNetN:
    return ResNetN(scaled(DVS128_LAYERS, width, stages), num_classes, connect_f, mode, in_size)


def PlainNet(mode, width: float = 1.0, in_size: int = 128,
             num_classes: int = NUM_CLASSES, stages: int = 7) -> ResNetN:
    net = scaled(layers([32] * 7, [1] * 7, "plain"), width, stages)
    return ResNetN(net, num_classes, None, mode, in_size)


def SpikingResNet(mode, width: float = 1.0, in_size: int = 128,
                  num_classes: int = NUM_CLASSES, stages: int = 7) -> ResNetN:
    net = scaled(layers([32] * 7, [1] * 7, "basic"), width, stages)
    return ResNetN(net, num_classes, None, mode, in_size)
