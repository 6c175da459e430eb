"""The 7B-Net family of the DVS experiments (``ResNetN`` built from a layer list).

Module names and nesting follow the reference so that state-dict keys are
``conv.0.0.0.weight`` (first conv), ``conv.<i>.conv.<j>.0.0.weight|scale`` (block convs),
``conv.<i>.1.w`` (PLIF), ``out.weight|bias``.  ``mode=None`` builds the fp32 network;
``mode`` in ``cbp.MODES`` replaces every conv except the first by ``cbp.QConv2d``.
"""

from __future__ import annotations

import torch
from torch import nn

from cbp import MODES, QConv2d

from .neurons import SeqToANNContainer, connect, plif


def _conv(cin: int, cout: int, k: int, mode: str | None) -> nn.Conv2d:
    if mode in MODES:
        return QConv2d(cin, cout, kernel_size=k, padding=k // 2, stride=1, bias=False, mode=mode)
    if mode is not None:
        raise ValueError(f"unknown quantization mode {mode!r} (use one of {', '.join(MODES)})")
    return nn.Conv2d(cin, cout, kernel_size=k, padding=k // 2, stride=1, bias=False)


def conv3x3(in_channels: int, out_channels: int, mode: str | None = None) -> nn.Sequential:
    """[conv3x3 + BN] over time, then PLIF."""
    return nn.Sequential(
        SeqToANNContainer(_conv(in_channels, out_channels, 3, mode), nn.BatchNorm2d(out_channels)),
        plif(),
    )


def conv1x1(in_channels: int, out_channels: int, mode: str | None = None) -> nn.Sequential:
    """[conv1x1 + BN] over time, then PLIF."""
    return nn.Sequential(
        SeqToANNContainer(_conv(in_channels, out_channels, 1, mode), nn.BatchNorm2d(out_channels)),
        plif(),
    )


class SEWBlock(nn.Module):
    """Two conv3x3 units combined with the input by ``connect_f``."""

    def __init__(self, in_channels: int, mid_channels: int, connect_f: str | None = None,
                 mode: str | None = None) -> None:
        super().__init__()
        self.connect_f = connect_f
        self.conv = nn.Sequential(
            conv3x3(in_channels, mid_channels, mode=mode),
            conv3x3(mid_channels, in_channels, mode=mode),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return connect(self.connect_f, self.conv(x), x)


class PlainBlock(nn.Module):
    """Two conv3x3 units without a shortcut."""

    def __init__(self, in_channels: int, mid_channels: int, mode: str | None = None) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            conv3x3(in_channels, mid_channels, mode=mode),
            conv3x3(mid_channels, in_channels, mode=mode),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class BasicBlock(nn.Module):
    """Spiking ResNet block: sn(x + BN(conv(sn(BN(conv(x)))))).  Unlike the reference, the
    second conv follows ``mode`` (fp32 when ``mode`` is None)."""

    def __init__(self, in_channels: int, mid_channels: int, mode: str | None = None) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            conv3x3(in_channels, mid_channels, mode=mode),
            SeqToANNContainer(_conv(mid_channels, in_channels, 3, mode),
                              nn.BatchNorm2d(in_channels)),
        )
        self.sn = plif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sn(x + self.conv(x))


def scaled(layer_list: list[dict], width: float, stages: int | None = None) -> list[dict]:
    """Multiply every channel count by ``width`` (at least 1 channel; 1.0 leaves it unchanged)
    and keep the first ``stages`` stages (each halves H and W: all 7 for the 128x128 sensor,
    fewer for smaller inputs such as 16x16 DIGITS frames; None keeps all)."""
    layer_list = layer_list[:stages]
    if width == 1.0:
        return layer_list
    out = []
    for cfg in layer_list:
        cfg = dict(cfg)
        for key in ("channels", "mid_channels"):
            if key in cfg:
                cfg[key] = max(1, int(round(cfg[key] * width)))
        out.append(cfg)
    return out


class ResNetN(nn.Module):
    """Input [N, T, 2, H, W] -> logits [N, num_classes]; the first (2-channel) conv and the
    output Linear stay fp32."""

    def __init__(self, layer_list: list[dict], num_classes: int, connect_f: str | None = None,
                 mode: str | None = None, in_size: int = 128) -> None:
        super().__init__()
        in_channels = 2
        conv: list[nn.Module] = []
        for cfg in layer_list:
            channels = cfg["channels"]
            mid_channels = cfg.get("mid_channels", channels)
            if in_channels != channels:
                unit_mode = None if in_channels == 2 else mode
                k = cfg["up_kernel_size"]
                if k == 3:
                    conv.append(conv3x3(in_channels, channels, unit_mode))
                elif k == 1:
                    conv.append(conv1x1(in_channels, channels, unit_mode))
                else:
                    raise NotImplementedError(f"up_kernel_size {k}")
            in_channels = channels
            block = cfg.get("block_type")
            for _ in range(cfg.get("num_blocks", 0)):
                if block == "sew":
                    conv.append(SEWBlock(in_channels, mid_channels, connect_f, mode))
                elif block == "plain":
                    conv.append(PlainBlock(in_channels, mid_channels, mode))
                elif block == "basic":
                    conv.append(BasicBlock(in_channels, mid_channels, mode))
                else:
                    raise NotImplementedError(f"block_type {block!r}")
            if "k_pool" in cfg:
                k_pool = cfg["k_pool"]
                conv.append(SeqToANNContainer(nn.MaxPool2d(k_pool, k_pool)))
        conv.append(nn.Flatten(2))
        self.conv = nn.Sequential(*conv)
        side = in_size
        for m in self.conv.modules():
            if isinstance(m, nn.MaxPool2d):
                side = (side - m.kernel_size) // m.stride + 1
        self.out = nn.Linear(side * side * in_channels, num_classes, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(1, 0, 2, 3, 4)  # [T, N, 2, H, W]
        x = self.conv(x)
        return self.out(x.mean(0))


def layers(channels: list[int], up_kernel: list[int], block_type: str = "sew") -> list[dict]:
    """A layer list with one block and a 2x2 max-pool per entry."""
    return [
        {"channels": c, "up_kernel_size": k, "mid_channels": c, "num_blocks": 1,
         "block_type": block_type, "k_pool": 2}
        for c, k in zip(channels, up_kernel)
    ]


# the two networks of the paper
DVS128_LAYERS = layers([32] * 7, [3, 1, 1, 1, 1, 1, 1])
CIFAR10DVS_LAYERS = layers([64, 64, 64, 64, 128, 128, 128], [3, 1, 1, 1, 3, 1, 1])
