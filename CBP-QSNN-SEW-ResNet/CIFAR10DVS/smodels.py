"""FP32 Wide-7B-Net for CIFAR10-DVS (the architecture of the pretrained checkpoint)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sewcommon.dvsnets import CIFAR10DVS_LAYERS, ResNetN, scaled  # noqa: E402

NUM_CLASSES = 10


def SEWResNet(connect_f, width: float = 1.0, in_size: int = 128) -> ResNetN:
    return ResNetN(scaled(CIFAR10DVS_LAYERS, width), NUM_CLASSES, connect_f, None, in_size)
