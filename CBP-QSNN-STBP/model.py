"""7Conv,3FC LIF spiking network (fp32).  Attribute names follow the reference so that
state-dict keys are conv1, pool1, conv2, pool2, conv3, conv4, pool3, fc1, fc2, fc3."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from functions import Spike, lif_steps

# (attribute, out_channels at width 1, stride) of the convolutional stack
CONV_SPEC = (
    ("conv1", 128, 1),
    ("pool1", 256, 2),
    ("conv2", 256, 1),
    ("pool2", 512, 2),
    ("conv3", 512, 1),
    ("conv4", 1024, 1),
    ("pool3", 2048, 2),
)
FC_SPEC = (("fc1", 1024), ("fc2", 512))
LAYER_NAMES = tuple(n for n, _, _ in CONV_SPEC) + ("fc1", "fc2", "fc3")


@torch.no_grad()
def scale_init(model: nn.Module, gain: float) -> None:
    """Multiply every conv/linear weight by ``gain`` (1.0 keeps PyTorch's default init).

    Narrow networks receive fewer presynaptic spikes per neuron, so with the default init the
    activity of a reduced-width network dies out after a few layers; a gain of about 2 keeps
    spikes flowing at width 1/16.
    """
    if gain != 1.0:
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(gain)


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class Conv_SNN(nn.Module):  # noqa: N801 - reference name (checkpoint compatibility)
    """The STBP network.  ``width`` multiplies every hidden width (1.0 = the paper's net).

    ``batch_size`` is accepted for signature compatibility only: state shapes follow the
    input, so a partial last batch works.
    """

    def __init__(
        self,
        outs: int,
        decay: float,
        thresh: float,
        lens: float,
        batch_size: int | None = None,
        timesteps: int = 8,
        width: float = 1.0,
        in_channels: int = 3,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        self.outs, self.decay, self.thresh, self.lens = outs, decay, thresh, lens
        self.batch_size, self.T, self.width = batch_size, timesteps, width
        self._build(in_channels, image_size, self._conv, self._linear)

    # layer factories; the quantized network overrides the hidden ones
    def _conv(self, name: str, cin: int, cout: int, stride: int) -> nn.Module:
        return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1)

    def _linear(self, name: str, fin: int, fout: int) -> nn.Module:
        return nn.Linear(fin, fout)

    def _build(self, in_channels: int, image_size: int, conv, linear) -> None:
        cin, size = in_channels, image_size
        for i, (name, cout, stride) in enumerate(CONV_SPEC):
            cout = scaled(cout, self.width)
            first = i == 0
            layer = (
                nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1)
                if first
                else conv(name, cin, cout, stride)
            )
            setattr(self, name, layer)
            cin, size = cout, (size - 1) // stride + 1
        fin = cin * size * size
        for name, fout in FC_SPEC:
            fout = scaled(fout, self.width)
            setattr(self, name, linear(name, fin, fout))
            fin = fout
        self.fc3 = nn.Linear(fin, self.outs)
        # the firing step of each layer (no parameters: the state dict is unchanged)
        self.spike = nn.ModuleDict({name: Spike() for name in LAYER_NAMES})

    def forward(self, input: Tensor) -> Tensor:
        """Output spike rate (batch, outs), computed layer by layer: each layer runs once
        over all T steps' inputs (T * batch samples), then its LIF recurrence steps through
        time.  Per sample and step this is the reference's time-major update."""
        d, th, ln, T = self.decay, self.thresh, self.lens, self.T
        n = input.shape[0]
        fire = [self.spike[name] for name in LAYER_NAMES]
        # the analog input is identical at every step: its current is computed once
        x = lif_steps(d, th, ln, self.conv1(input), T, fire[0], shared=True)
        layers = [self.pool1, self.conv2, self.pool2, self.conv3, self.conv4, self.pool3]
        for i, layer in enumerate(layers, start=1):
            x = lif_steps(d, th, ln, layer(x), T, fire[i])
        x = x.reshape(T * n, -1)
        for i, layer in enumerate((self.fc1, self.fc2), start=7):
            x = lif_steps(d, th, ln, layer(x), T, fire[i])
        steps = lif_steps(d, th, ln, self.fc3(x), T, fire[9]).unflatten(0, (T, n))
        sumspike = steps[0]
        for t in range(1, T):  # summed step by step, as the time-major loop does
            sumspike = sumspike + steps[t]
        return sumspike / T
