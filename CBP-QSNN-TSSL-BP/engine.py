"""Shared code of the two TSSL-BP scripts: flags, config checks, data, train/test loops,
logging and file names (all paths relative to the working directory)."""

from __future__ import annotations

import argparse
import logging
import os

import global_v as glv
import torch
from cnns import Network
from network_parser import parse
from torch.utils.data import DataLoader

from cbp import MODES
from cbp import data as cbp_data
from cbp.runtime import (  # noqa: F401 (used by the scripts)
    UserError,
    nonneg_int,
    positive_float,
    progress,
    rng_state,
    set_rng_state,
    write_progress,
)

from functions import loss_f, tsslbp

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
DATASETS = ("CIFAR10", "DIGITS")
DRIVE = "the authors' Google Drive folder linked from the CBP-QSNN README"
REQUIRED_NETWORK_KEYS = ("epochs", "batch_size", "n_steps", "dataset", "lr", "loss", "n_class",
                         "tau_m", "tau_s")


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Reference flags (single dash) plus this port's additions."""
    p.add_argument("-config", action="store", dest="config", help="the YAML config file")
    p.add_argument("-checkpoint", action="store", dest="checkpoint", default=None,
                   help="train: resume from this full checkpoint (e.g. ./checkpoint/<name>_last.pth);"
                        " eval: evaluate this file instead of the default one")
    p.add_argument("-mode", type=str, default="train", choices=["train", "eval"])
    p.add_argument("-gpu", type=int, default=0, help="CUDA device index (ignored without CUDA)")
    p.add_argument("-seed", type=int, default=3, help="random seed (default: 3)")
    # additions
    p.add_argument("-device", type=str, default=None,
                   help="cpu, cuda or cuda:N (default: cuda:<gpu> if available, else cpu)")
    p.add_argument("-epochs", type=nonneg_int, default=None, help="override Network.epochs")
    p.add_argument("-lr", type=positive_float, default=None, help="override Network.lr")
    p.add_argument("-backend", type=str, default=None, choices=list(tsslbp.BACKENDS),
                   help="TSSL-BP neuron backend (default: env TSSLBP_BACKEND or auto)")
    p.add_argument("-download", action="store_true", help="download CIFAR-10 if missing")
    p.add_argument("-workers", type=nonneg_int, default=None,
                   help="data loader workers (default: 8 for CIFAR-10, 0 for DIGITS)")
    p.add_argument("-logdir", type=str, default=None,
                   help="tensorboard folder (default ./runs/<name>; '' disables)")
    p.add_argument("-no_progress", action="store_true", help="hide progress bars")


def load_config(path: str | None, quant: str | None = None) -> parse:
    """Parse and check the YAML; ``quant`` overrides ``Network.mode``."""
    if path is None:
        raise UserError("Unrecognized config file: pass -config Networks/<name>.yaml")
    try:
        params = parse(path)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    except Exception as exc:
        raise UserError(f"cannot parse {path}: {str(exc).splitlines()[0]}") from None
    if "Network" not in params or "Layers" not in params:
        raise UserError(f"{path}: needs the two maps Network and Layers")
    net = params["Network"]
    missing = [k for k in REQUIRED_NETWORK_KEYS if k not in net]
    if missing:
        raise UserError(f"{path}: Network lacks {', '.join(missing)}")
    if quant is not None:
        net["mode"] = quant
    mode = net.get("mode")
    if mode is not None and mode not in MODES:
        raise UserError(f"{path}: Network.mode {mode!r} is not one of {', '.join(MODES)}")
    if net["dataset"] not in DATASETS:
        raise UserError(f"Unrecognized dataset name {net['dataset']!r} (use {', '.join(DATASETS)})")
    if net["loss"] not in loss_f.LOSSES:
        raise UserError(f"Unrecognized loss function {net['loss']!r}")
    if net.get("rule", "TSSLBP") != "TSSLBP" or net.get("model", "LIF") != "LIF":
        raise UserError("only rule TSSLBP with model LIF is supported")
    return params


def config_names(path: str) -> tuple[str, str]:
    """(dataset, tag) from the config file name: ``CIFAR10_bin.yaml`` -> (CIFAR10, bin).

    A name without ``_`` gives an empty tag; further underscores stay in the tag."""
    stem = os.path.basename(path).split(".")[0]
    dataset, _, tag = stem.partition("_")
    return dataset, tag


def setup_logging(path: str) -> logging.Logger:
    """INFO log appended to ``path`` (a dedicated logger, not the root one)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    log = logging.getLogger(f"tsslbp.{os.path.abspath(path)}")
    log.setLevel(logging.INFO)
    log.propagate = False
    if not log.handlers:
        handler = logging.FileHandler(path, mode="a")
        handler.setFormatter(logging.Formatter("%(levelname)s:%(message)s"))
        log.addHandler(handler)
    return log


def setup_device(args) -> torch.device:
    from cbp.runtime import gpu_to_device

    device = gpu_to_device(str(args.gpu), args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.enabled = True
    if args.backend is not None:
        tsslbp.set_backend(args.backend)
    return device


def loaders(net_cfg, workers: int | None, download: bool) -> tuple[DataLoader, DataLoader]:
    """Train (shuffled) and test loaders, batch ``Network.batch_size``."""
    name = net_cfg["dataset"]
    bs = int(net_cfg["batch_size"])
    if name == "DIGITS":
        size = int(net_cfg.get("image_size", 32))
        train_ds, test_ds = cbp_data.digits(True, size=size), cbp_data.digits(False, size=size)
        workers = 0 if workers is None else workers
    else:
        import torchvision.transforms as T

        root = os.path.expanduser(net_cfg.get("data_path", "./datasets/cifar10"))
        norm = T.Normalize(CIFAR_MEAN, CIFAR_STD)
        train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                              norm])
        test_tf = T.Compose([T.ToTensor(), norm])
        if download:
            os.makedirs(root, exist_ok=True)
        train_ds = cbp_data.cifar("CIFAR10", root, True, train_tf, download)
        test_ds = cbp_data.cifar("CIFAR10", root, False, test_tf, download)
        workers = 8 if workers is None else workers
    train_dl = DataLoader(train_ds, batch_size=bs, shuffle=True, num_workers=workers)
    test_dl = DataLoader(test_ds, batch_size=bs, shuffle=False, num_workers=workers)
    return train_dl, test_dl


def build(params: parse, train_dl: DataLoader, device: torch.device, quantize: bool) -> Network:
    net_cfg = params["Network"]
    glv.init(net_cfg["n_steps"], net_cfg["tau_s"])
    input_shape = list(train_dl.dataset[0][0].shape)
    try:
        net = Network(net_cfg, params["Layers"], input_shape, quantize=quantize)
    except (KeyError, ValueError) as exc:
        raise UserError(f"bad layer configuration: {exc}") from None
    return net.to(device)


def repeat_time(images: torch.Tensor, T: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H, W, T) constant input."""
    return images.unsqueeze(-1).expand(*images.shape, T).contiguous()


def train_epoch(net: Network, loader: DataLoader, loss_fn: loss_f.SpikeLoss,
                optimizer: torch.optim.Optimizer, device: torch.device, epoch: int,
                penalty=None, after_step=None, show: bool = True) -> tuple[float, float]:
    """One epoch; returns (task loss per sample, train accuracy %).

    ``penalty()`` (e.g. ``CBP.penalty``) is added to the loss and the sum handed to
    ``after_step`` (before backward) for bookkeeping.  All weights take part in the gradient-norm
    clipping (max 1) and are clamped by ``weight_clipper`` after each step.
    """
    net.train()
    T = int(net.network_config["n_steps"])
    loss_sum, correct, total = 0.0, 0, 0
    for images, labels in progress(loader, f"epoch {epoch}", enabled=show):
        x = repeat_time(images.to(device, torch.float32), T)
        labels = labels.to(device)
        outputs = net(x, epoch, True)
        loss = loss_fn(outputs, labels)
        lag = loss + penalty() if penalty is not None else loss
        if after_step is not None:
            after_step(lag)
        net.zero_grad(set_to_none=True)
        optimizer.zero_grad(set_to_none=True)
        lag.backward()
        torch.nn.utils.clip_grad_norm_(list(net.my_parameters), 1.0)
        optimizer.step()
        net.weight_clipper()
        loss_sum += float(loss.detach())
        correct += int((loss_f.predict(outputs) == labels).sum())
        total += labels.numel()
    return loss_sum / max(total, 1), 100.0 * correct / max(total, 1)


@torch.no_grad()
def test(net: Network, loader: DataLoader, device: torch.device, show: bool = True) -> float:
    """Test accuracy in % (argmax of the summed output PSP, no dropout)."""
    net.eval()
    T = int(net.network_config["n_steps"])
    correct, total = 0, 0
    for images, labels in progress(loader, "test", enabled=show):
        x = repeat_time(images.to(device, torch.float32), T)
        labels = labels.to(device)
        correct += int((loss_f.predict(net(x, None, False)) == labels).sum())
        total += labels.numel()
    net.train()
    return 100.0 * correct / max(total, 1)


# ------------------------------------------------------------------ files


def pretrained_path(dataset: str) -> str:
    return f"./trained_params/TSSL_BP_{dataset}_fp32_pretrained.pth"


def prequantized_path(dataset: str, mode: str) -> str:
    return f"./trained_params/TSSL_BP_{dataset}_{mode}_cbp_prequantized.pth"


def require_file(path: str, what: str, hint: str) -> None:
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} not found: {hint}")


def split_state(state: dict) -> tuple[dict, dict]:
    """(weights ``my_parameters.*``, scales ``my_scales.*``) of a saved state dict."""
    weights = {k: v for k, v in state.items() if not k.startswith("my_scales.")}
    scales = {k: v for k, v in state.items() if k.startswith("my_scales.")}
    return weights, scales


def load_weights(net: Network, state: dict, where: str) -> dict:
    """Strictly load ``my_parameters.*`` from ``state``; return its ``my_scales.*`` entries."""
    from cbp.checkpoint import CheckpointError, check_state_dict

    weights, scales = split_state(state)
    try:
        check_state_dict(net, weights)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    net.load_state_dict(weights, strict=True)
    return scales





