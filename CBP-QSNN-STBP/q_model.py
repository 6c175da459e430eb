"""Quantized 7Conv,3FC network: hidden layers are cbp QConv2d/QLinear (first conv and fc3
stay fp32), so state-dict keys equal ``Conv_SNN``'s plus ``<layer>.scale``."""

from __future__ import annotations

from torch import nn

from model import Conv_SNN
from q_module import QConv2d, QLinear


class Q_Conv_SNN(Conv_SNN):  # noqa: N801 - reference name
    """``mode`` is one of bin, ter, 1bit, 2bit."""

    def __init__(
        self,
        outs: int,
        decay: float,
        thresh: float,
        lens: float,
        batch_size: int | None = None,
        timesteps: int = 8,
        mode: str = "bin",
        width: float = 1.0,
        in_channels: int = 3,
        image_size: int = 32,
    ) -> None:
        self.mode = mode
        super().__init__(outs, decay, thresh, lens, batch_size, timesteps, width, in_channels, image_size)

    def _conv(self, name: str, cin: int, cout: int, stride: int) -> nn.Module:
        return QConv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=True, mode=self.mode)

    def _linear(self, name: str, fin: int, fout: int) -> nn.Module:
        return QLinear(fin, fout, bias=True, mode=self.mode)
