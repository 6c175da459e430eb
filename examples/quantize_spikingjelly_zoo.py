"""CBP on a network we did not write: spikingjelly's model-zoo ``parametric_lif_net.MNISTNet``
(conv-BN-PLIF-pool ×2, two linear layers, voting layer), trained fp32 on the embedded digits
(28×28, 4 time steps, direct input), then quantized with ``cbp.convert`` to binary and ternary
weights and trained with CBP.  Prints accuracy, weight memory, synaptic operations, MACs and
the energy estimate over the test set (``cbp.metrics``, counted by spikingjelly's
``op_counter``) for each.

    python examples/quantize_spikingjelly_zoo.py            # about 2 minutes on 2 CPU cores
    python examples/quantize_spikingjelly_zoo.py --modes bin --cbp_epochs 3
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional, neuron, surrogate
from spikingjelly.activation_based.model import parametric_lif_net
from torch.utils.data import DataLoader

import cbp
from cbp.data import digits
from cbp.export import weight_memory_mbit
from cbp.metrics import profiled


def forward(model, x: torch.Tensor, T: int) -> torch.Tensor:
    """Mean output over T steps of the same (direct-coded) image."""
    out = model(x.unsqueeze(0).repeat(T, 1, 1, 1, 1)).mean(0)
    functional.reset_net(model)
    return out


def accuracy(model, loader, T: int) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((forward(model, x, T).argmax(1) == y).sum())
            total += len(y)
    model.train()
    return 100.0 * correct / total


def evaluate(model, loader, T: int) -> tuple[float, float, float, float]:
    """(test accuracy %, SynOps, MACs, energy in uJ per sample), counted by op_counter."""
    acc, r = profiled(model, lambda: accuracy(model, loader, T), log=None, batch_dim=1)
    return acc, r.synops, r.macs, r.energy_uj


def train(model, loader, epochs: int, lr: float, T: int, controller: cbp.CBP | None = None):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(forward(model, x, T) * 10, y)
            lag = controller.lagrangian(loss) if controller is not None else loss
            opt.zero_grad(set_to_none=True)
            lag.backward()
            if controller is not None:
                cbp.clip_gradients(model.parameters(), 1.0)
            opt.step()
            if controller is not None:
                controller.clamp_()
        if controller is not None:
            controller.end_epoch(opt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=["bin", "ter"], choices=list(cbp.MODES))
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--fp32_epochs", type=int, default=3)
    p.add_argument("--cbp_epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-3, help="Adam lr (fp32; CBP uses half)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    t0 = time.time()
    torch.manual_seed(args.seed)
    train_set, test_set = digits(True, size=28, channels=1), digits(False, size=28, channels=1)
    train_loader = DataLoader(train_set, batch_size=64, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=180)

    fp32 = parametric_lif_net.MNISTNet(channels=args.channels,
                                       spiking_neuron=neuron.ParametricLIFNode,
                                       surrogate_function=surrogate.ATan(), detach_reset=True)
    functional.set_step_mode(fp32, "m")
    train(fp32, train_loader, args.fp32_epochs, args.lr, args.T)
    rows = [("fp32", weight_memory_mbit(fp32), *evaluate(fp32, test_loader, args.T))]
    for mode in args.modes:
        model = cbp.convert(copy.deepcopy(fp32), mode)  # first and last layers stay fp32
        controller = cbp.CBP(model, 1e-3, period_max=1)  # g grows every epoch
        controller.start()
        train(model, train_loader, args.cbp_epochs, args.lr / 2, args.T, controller)
        rows.append((mode, weight_memory_mbit(model), *evaluate(model, test_loader, args.T)))

    print(f"spikingjelly MNISTNet (channels {args.channels}), DIGITS 28x28, T = {args.T}: "
          f"{len(cbp.eligible_layers(fp32))} weight layers, the middle ones quantized")
    print("| weights | test acc (%) | weight memory (Mbit) | SynOps per sample "
          "| MACs per sample | energy per sample (µJ) |")
    print("|---|---|---|---|---|---|")
    for name, mbit, acc, synops, macs, energy in rows:
        print(f"| {name} | {acc:.2f} | {mbit:.4f} | {synops / 1e6:.2f} M | {macs / 1e6:.3f} M "
              f"| {energy:.3f} |")
    print(f"time: {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
