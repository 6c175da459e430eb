"""Data, loss, train/test loops and file names shared by the two STBP scripts."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cbp import data as cbp_data
from cbp import distributed as D
from cbp.data import CIFAR_MEAN, CIFAR_STD  # CIFAR-10's, used for CIFAR-100 too (reference)
from cbp.metrics import profiled
from cbp.runtime import CHECKPOINT_SOURCE as DRIVE  # noqa: F401
from cbp.runtime import (  # noqa: F401 (used by the scripts)
    UserError,
    gpu_to_device,
    nonneg_int,
    positive_float,
    positive_int,
    progress,
    require_file,
    seed_everything,
)
from cbp.trainer import Epoch, Trainer, add_speed_flags

from functions import Spike

NUM_CLASSES = {"CIFAR10": 10, "CIFAR100": 100, "DIGITS": 10}


def add_common_args(p: argparse.ArgumentParser, lr: float) -> None:
    """Flags shared by main_train_fp32.py and main_quantize_cbp.py (reference names/defaults)."""
    p.add_argument("--gpu", type=str, default="0", help="CUDA device index (ignored on CPU)")
    p.add_argument("--dataset", type=str, default="CIFAR10", choices=sorted(NUM_CLASSES))
    p.add_argument("--mode", type=str, default="train", choices=["train", "eval"])
    p.add_argument("--decay", type=float, default=0.25)
    p.add_argument("--thresh", type=float, default=0.5)
    p.add_argument("--lens", type=positive_float, default=0.5)
    p.add_argument("--T", type=positive_int, default=8)
    p.add_argument("--num_workers", type=nonneg_int, default=0)
    p.add_argument("--batch_size", type=positive_int, default=50)
    p.add_argument("--num_epochs", type=nonneg_int, default=100)
    p.add_argument("--opt", type=str, default="sgd", choices=["sgd", "adam"])
    p.add_argument("--learning_rate", type=positive_float, default=lr)
    # additions
    p.add_argument("--device", type=str, default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--data_path", type=str, default="./datasets")
    p.add_argument("--download", action="store_true", help="download CIFAR if missing")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--width", type=positive_float, default=1.0,
                   help="channel-width multiplier (1.0 = the paper's network)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume training from a checkpoint (default: this run's _last.pth)")
    p.add_argument("--logdir", type=str, default=None,
                   help="tensorboard folder (default ./runs/<run name>; '' disables)")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    add_speed_flags(p)


def loaders(args) -> tuple[DataLoader, DataLoader, int]:
    """(train loader, test loader, number of classes).  Under torch.distributed each rank
    trains on its ``DistributedSampler`` share and tests on every world-size-th sample."""
    if args.dataset == "DIGITS":
        train_ds, test_ds = cbp_data.digits(True), cbp_data.digits(False)
    else:
        import torchvision.transforms as T

        norm = T.Normalize(CIFAR_MEAN, CIFAR_STD)
        train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        test_tf = T.Compose([T.ToTensor(), norm])
        train_ds = cbp_data.cifar(args.dataset, args.data_path, True, train_tf, args.download)
        test_ds = cbp_data.cifar(args.dataset, args.data_path, False, test_tf, args.download)
    train_dl = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers)
    test_dl = DataLoader(test_ds, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
    train_dl, test_dl = D.split_loaders(train_dl, test_dl, args.seed or 0)
    return train_dl, test_dl, NUM_CLASSES[args.dataset]


def prepare(args) -> tuple[torch.device, DataLoader, DataLoader, int]:
    """A script's start: device (joining torchrun's process group), the arguments printed, the
    seed, then (train loader, test loader, number of classes) on every rank together."""
    device = setup(args)
    print(args)
    seed_everything(args.seed)
    with D.collective():
        train_dl, test_dl, outs = loaders(args)
    return device, train_dl, test_dl, outs


def setup(args) -> torch.device:
    """Join the process group when started by torchrun, then the device: ``--device``, else the
    reference's ``--gpu``, else cuda if available (one GPU per rank under torchrun)."""
    return D.start(lambda: gpu_to_device(args.gpu, args.device), args.device)


def mse_onehot(output: torch.Tensor, labels: torch.Tensor, outs: int) -> torch.Tensor:
    """MSE between the output spike rate and the one-hot label (the reference's loss)."""
    return F.mse_loss(output, F.one_hot(labels, outs).to(output.dtype))


@torch.no_grad()
def test(model, loader, device, outs: int, show: bool = True) -> tuple[float, float]:
    """(test loss, accuracy %) with the reference's definitions."""
    model.eval()
    distributed = D.is_distributed()
    loss, batches, correct, total = 0.0, len(loader), 0, 0
    for images, labels in progress(loader, "test", enabled=show):
        images, labels = images.to(device), labels.to(device)
        out = model(images)
        value = mse_onehot(out, labels, outs).item()
        loss += value if distributed else value / len(loader)  # the reference's running mean
        correct += (out.argmax(1) == labels).sum().item()
        total += labels.numel()
    model.train()
    if distributed:  # mean over every rank's batches
        loss, batches, correct, total = D.sum_over_ranks([loss, batches, correct, total])
        loss /= max(batches, 1)
    return loss, 100.0 * correct / max(total, 1)


def test_with_metrics(model, loader, device, outs: int, show: bool = True):
    """``test`` under the spike profiler: prints the firing rate of every layer, SynOps, MACs
    and the energy estimate.  Returns ``((test loss, accuracy %), SpikeReport)``."""
    return profiled(model, lambda: test(model, loader, device, outs, show), neurons=[Spike])


def pretrained_path(dataset: str) -> str:
    return f"./trained_params/STBP_{dataset}_fp32_pretrained.pth"


def prequantized_path(dataset: str, quant: str) -> str:
    return f"./trained_params/STBP_{dataset}_{quant}_cbp_prequantized.pth"


def fp32_command(args) -> str:
    return (
        f"python main_train_fp32.py --dataset {args.dataset} --mode train --decay {args.decay} "
        f"--thresh {args.thresh} --lens {args.lens} --T {args.T}"
        + (f" --width {args.width}" if args.width != 1.0 else "")
    )


def identity(args, script: str, model) -> dict:
    """What this run's checkpoints belong to (compared on resume)."""
    return {"pipeline": "STBP", "script": script, "model": type(model).__name__,
            "dataset": args.dataset, "quant": getattr(args, "quant", "fp32"),
            "width": float(args.width), "T": int(args.T)}


class STBPTrainer(Trainer):
    """The loop of both STBP scripts: MSE between output rate and one-hot label.  The first
    epoch counts as the best so far (its files are written even at 0 % test accuracy)."""

    best_init = -1.0

    def __init__(self, model, optimizer, *, args, outs: int, **kw) -> None:
        self.args, self.outs = args, outs
        super().__init__(model, optimizer, epochs=args.num_epochs, amp=args.amp,
                         compile=args.compile, show=not args.no_progress, **kw)

    def loss(self, output, target):
        return mse_onehot(output, target, self.outs)

    def evaluate(self, st: Epoch) -> None:
        st.test_loss, st.test_acc = test(self.model, self.test_loader, self.device, self.outs,
                                         self.show)
