"""Code shared by ``main_train_ann.py`` and ``main_calibration_quantize_cbp.py``: data, seeds,
file names, evaluation, ANN->SNN conversion with calibration, and the quantized-SNN loader."""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from CIFAR.models.calibration import bias_corr_model, weights_cali_model
from CIFAR.models.fold_bn import search_fold_and_remove_bn
from CIFAR.models.q_spiking_layer import SpikeModel_q
from CIFAR.models.q_utils import FoldedBatchNorm2d
from CIFAR.models.q_vgg import VGG_q
from CIFAR.models.spiking_layer import SpikeModel, get_maximum_activation
from CIFAR.models.utils import AvgPoolConv
from CIFAR.models.vgg import VGG
from torch import nn
from torch.utils.data import DataLoader

from cbp import data as cbp_data
from cbp import distributed as D
from cbp.checkpoint import CheckpointError, extract_state_dict
from cbp.data import CIFAR_MEAN, CIFAR_STD
from cbp.runtime import CHECKPOINT_SOURCE as DRIVE  # noqa: F401 (used by the scripts)
from cbp.runtime import (
    UserError,
    nonneg_int,
    positive_float,
    positive_int,
    progress,
    seed_everything,
)
from cbp.trainer import Trainer, add_speed_flags

NUM_CLASSES = {"CIFAR10": 10, "CIFAR100": 100, "DIGITS": 10}
NORM = {
    "CIFAR10": (CIFAR_MEAN, CIFAR_STD),
    "CIFAR100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}


# ----------------------------------------------------------------------------- arguments


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Flags both scripts share (reference names and defaults, plus the documented additions)."""
    p.add_argument("--dataset", default="CIFAR10", type=str, help="dataset name",
                   choices=["CIFAR10", "CIFAR100", "DIGITS"])
    p.add_argument("--arch", default="VGG16", type=str, help="network architecture",
                   choices=["VGG16"])
    p.add_argument("--dpath", required=True, type=str, help="dataset directory")
    p.add_argument("--seed", default=1000, type=int, help="random seed to reproduce results")
    p.add_argument("--batch_size", default=128, type=_positive_int, help="minibatch size")
    p.add_argument("--usebn", action="store_true", help="use batch normalization in ann")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    # additions
    p.add_argument("--width", default=1.0, type=_positive_float,
                   help="channel-width multiplier (1.0 = the paper's VGG16)")
    p.add_argument("--workers", default=None, type=_nonneg_int,
                   help="data-loader workers (default: 4 for CIFAR, 0 for DIGITS)")
    p.add_argument("--download", action="store_true", help="download CIFAR if it is missing")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue from the run's _last.pth checkpoint(s), or from PATH")
    p.add_argument("--logdir", type=str, default=None,
                   help="tensorboard folder (default ./runs/<run name>; '' disables)")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    add_speed_flags(p)
    p.add_argument("--subset", default=None, type=_positive_int,
                   help="use only the first N training and N test images (quick runs)")


_positive_int, _nonneg_int, _positive_float = positive_int, nonneg_int, positive_float


# ----------------------------------------------------------------------------- data, seeds


def seed_all(seed: int = 1029) -> None:
    """Seed every RNG, deterministic cuDNN (the reference's seeding)."""
    seed_everything(seed, deterministic=True)


def cifar_transforms(dataset: str, cutout: bool = True, auto_aug: bool = True):
    """(train, test) transforms: crop + flip [+ AutoAugment] + tensor [+ Cutout] + normalise."""
    import torchvision.transforms as T
    from data.autoaugment import CIFAR10Policy, Cutout

    mean, std = NORM[dataset]
    aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    if auto_aug:
        aug.append(CIFAR10Policy())
    aug.append(T.ToTensor())
    if cutout:
        aug.append(Cutout(n_holes=1, length=16))
    aug.append(T.Normalize(mean, std))
    return T.Compose(aug), T.Compose([T.ToTensor(), T.Normalize(mean, std)])


def build_data(dpath: str, batch_size: int = 128, cutout: bool = False, workers: int = 4,
               use_cifar10: bool = False, auto_aug: bool = False, dataset: str | None = None,
               download: bool = False, pin_memory: bool = False
               ) -> tuple[DataLoader, DataLoader]:
    """(train loader, test loader).  ``dataset`` (CIFAR10 / CIFAR100 / DIGITS) overrides
    ``use_cifar10``; DIGITS is the embedded data set, without augmentation."""
    name = dataset or ("CIFAR10" if use_cifar10 else "CIFAR100")
    if name == "DIGITS":
        train_ds, test_ds = cbp_data.digits(True), cbp_data.digits(False)
    else:
        train_tf, test_tf = cifar_transforms(name, cutout, auto_aug)
        train_ds = cbp_data.cifar(name, dpath, True, train_tf, download)
        test_ds = cbp_data.cifar(name, dpath, False, test_tf, download)
    kw = {"num_workers": workers, "pin_memory": pin_memory}
    return (DataLoader(train_ds, batch_size=batch_size, shuffle=True, **kw),
            DataLoader(test_ds, batch_size=batch_size, shuffle=False, **kw))


def loaders(args, device: torch.device) -> tuple[DataLoader, DataLoader]:
    workers = args.workers if args.workers is not None else (0 if args.dataset == "DIGITS" else 4)
    train, test = build_data(args.dpath, args.batch_size, cutout=True, workers=workers,
                             auto_aug=True, dataset=args.dataset, download=args.download,
                             pin_memory=device.type == "cuda")
    n = getattr(args, "subset", None)
    if n is None:
        return train, test
    kw = {"num_workers": workers, "pin_memory": device.type == "cuda",
          "batch_size": args.batch_size}
    sub = torch.utils.data.Subset
    return (DataLoader(sub(train.dataset, range(min(n, len(train.dataset)))), shuffle=True, **kw),
            DataLoader(sub(test.dataset, range(min(n, len(test.dataset)))), shuffle=False, **kw))


# ----------------------------------------------------------------------------- file names


def width_tag(width: float) -> str:
    return "" if width == 1.0 else f"_w{width:g}"


def bn_name(use_bn: bool) -> str:
    return "wBN" if use_bn else "woBN"


def ann_path(args) -> str:
    return (f"trained_params/ANN_{args.arch}_{bn_name(args.usebn)}_{args.dataset}"
            f"{width_tag(args.width)}_ckpt.pth")


def ann_command(args) -> str:
    extra = (" --usebn" if args.usebn else "") + (
        f" --width {args.width:g}" if args.width != 1.0 else "")
    return (f"python main_train_ann.py --dataset {args.dataset} --arch {args.arch} "
            f"--dpath {args.dpath}{extra}")


def require_ann(args) -> str:
    path = ann_path(args)
    if not os.path.isfile(path):
        hint = f"download it from {DRIVE}" if args.dataset != "DIGITS" else "create it"
        raise UserError(f"ANN checkpoint {path} not found: {hint} (or train it with: "
                        f"{ann_command(args)}) and place it at {os.path.abspath(path)}")
    return path


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def validate_model(test_loader, model: nn.Module, show: bool = False, desc: str = "test"
                   ) -> float:
    """Top-1 accuracy in % (printed like the reference)."""
    correct, total = 0, 0
    model.eval()
    device = next(model.parameters()).device
    for inputs, targets in progress(test_loader, desc, enabled=show):
        outputs = model(inputs.to(device))
        correct += int((outputs.argmax(1).cpu() == targets).sum())
        total += targets.size(0)
    acc = 100.0 * correct / max(total, 1)
    print(f"Test Accuracy of the model on the {total} test images: {acc:.3f}")
    return acc


@torch.no_grad()
def evaluate_ce(model: nn.Module, loader, device: torch.device, show: bool = False
                ) -> tuple[float, float]:
    """(per-sample mean cross-entropy, accuracy as a fraction)."""
    model.eval()
    loss, correct, n = 0.0, 0, 0
    for x, y in progress(loader, "test", enabled=show):
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        n += y.numel()
    if D.is_distributed():
        loss, correct, n = D.sum_over_ranks([loss, correct, n])
    return loss / max(n, 1), correct / max(n, 1)


# ----------------------------------------------------------------------------- conversion


def build_ann(args) -> VGG:
    return VGG(args.arch, num_class=NUM_CLASSES[args.dataset], use_bn=args.usebn,
               width=args.width)


def load_ann(args, path: str) -> VGG:
    """The ANN with the checkpoint at ``path`` (plain state dict, or one under net/model)."""
    from cbp.checkpoint import load_into

    ann = build_ann(args)
    try:
        load_into(ann, path)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (built {args.arch} {bn_name(args.usebn)} for "
                              f"{args.dataset}, width {args.width:g})") from None
    return ann


def set_thresholds(snn: SpikeModel, train_loader, calib: str, T: int) -> None:
    """Max activation (``none``) or the MSE threshold search (``light``/``advanced``), EMA over
    7 training batches."""
    get_maximum_activation(train_loader, model=snn, momentum=0.9, iters=5,
                           mse=calib != "none", percentile=None, sim_length=T,
                           channel_wise=False)


def calibrate(snn: SpikeModel, train_loader, calib: str, wc_iters: int = 5000,
              wc_samples: int = 1024, wc_lr: float = 1e-5, verbose: bool = True) -> None:
    if calib == "light":
        bias_corr_model(snn, train_loader, correct_mempot=False, verbose=verbose)
    elif calib == "advanced":
        weights_cali_model(snn, train_loader, learning_rate=wc_lr, optimize_iter=wc_iters,
                           num_cali_samples=wc_samples, verbose=verbose)
        bias_corr_model(snn, train_loader, correct_mempot=True, verbose=verbose)


def _theta(m) -> float:
    t = m.threshold
    return float(t) if t is not None else 1.0


@torch.no_grad()
def normalise_thresholds(snn: SpikeModel) -> None:
    """Rescale weights, biases and initial potentials so every threshold becomes 1.0.  Exact
    for the IF network (the classifier weight is multiplied by the last threshold)."""
    prev = None
    for _, m in snn.spike_modules():
        th = max(_theta(m), 1e-12)
        m.weight.data = m.weight.data / th if prev is None else m.weight.data * prev / th
        if m.bias is not None:
            if isinstance(m.bias, nn.Parameter):
                m.bias.data = m.bias.data / th
            else:
                m.bias = m.bias / th
        if not isinstance(m.mem_pot_init, (int, float)):
            m.mem_pot_init = m.mem_pot_init / th
        prev = th
        m.threshold = 1.0
    if prev is not None:
        classifier = snn.model.classifier
        classifier.weight.data = classifier.weight.data * prev


def pool_bias_dict(snn: SpikeModel) -> dict[str, torch.Tensor]:
    """Biases that calibration gave layers without a bias parameter (the pooling layers)."""
    return {n: m.bias.detach().cpu().clone() for n, m in snn.spike_modules()
            if m.bias is not None and not isinstance(m.bias, nn.Parameter)}


def mem_pot_dict(model) -> dict[str, torch.Tensor | int]:
    return {n: (m.mem_pot_init if isinstance(m.mem_pot_init, int)
                else m.mem_pot_init.detach().cpu().clone())
            for n, m in model.spike_modules()}


# ----------------------------------------------------------------------------- quantized SNN


def build_snn_q(args) -> SpikeModel_q:
    ann_q = VGG_q(args.arch, num_class=NUM_CLASSES[args.dataset], use_bn=args.usebn,
                  mode=args.quant, width=args.width)
    return SpikeModel_q(model=ann_q, sim_length=args.T)


def remap_snn_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float-SNN keys -> quantized-SNN keys: ``conv`` is inserted before the last component
    except for the classifier/fc and downsample layers."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) >= 3 and parts[-2] not in ("fc", "classifier") and parts[-3] != "downsample":
            key = ".".join(parts[:-1] + ["conv", parts[-1]])
        out[key] = value
    return out


def apply_extras(snn_q: SpikeModel_q, pool_bias: dict, mem_pot: dict, device) -> None:
    """Attach the calibration's pooling biases and initial potentials (not in the state dict)."""
    mods = dict(snn_q.spike_modules())
    for name, b in (pool_bias or {}).items():
        if name in mods:
            mods[name].extra_bias = b.to(device)
    for name, u in (mem_pot or {}).items():
        if name in mods:
            mods[name].mem_pot_init = u if isinstance(u, (int, float)) else u.to(device)


def freeze_fixed(snn_q: SpikeModel_q) -> None:
    """Pooling kernels (2x2 depthwise) and BN slots are not trained, as in the reference."""
    for m in snn_q.modules():
        if isinstance(m, nn.Conv2d) and m.weight.shape[-1] == 2:
            m.weight.requires_grad_(False)
        if isinstance(m, FoldedBatchNorm2d):
            for p in m.parameters():
                p.requires_grad_(False)


def load_cbp_checkpoint(args, path: str, device: torch.device) -> SpikeModel_q:
    """The spiking network of a saved CBP checkpoint (``--evaluate CKPT``), with its pooling
    biases and initial potentials; a missing file is one error line."""
    from cbp.checkpoint import load_file, load_into

    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    state = load_file(path)
    follow_checkpoint(args, state, path)
    extras = {k: state.get(k, {}) if isinstance(state, dict) else {}
              for k in ("pool_bias_dict", "mem_pot_init_dict")}
    snn_q = load_calibrated_snn_q(args, {"net_snn": {}, **extras}, device)
    load_into(snn_q, state, nonfinite="warn")
    return snn_q


def follow_checkpoint(args, state, path: str) -> None:
    """Take the quantization mode and T a CBP checkpoint was trained with (its saved ``args``)
    unless the command gave them: ``args.given`` names the flags given.  A ``--quant`` other
    than the checkpoint's is an error (its weights were trained for those levels); a ``--T``
    other than its T evaluates at that T, with a note."""
    saved = state.get("args") if isinstance(state, dict) else None
    saved = saved if isinstance(saved, dict) else {}
    given = getattr(args, "given", set())
    quant, T = saved.get("quant"), saved.get("T")
    if quant is not None and quant != args.quant:
        if "quant" in given:
            raise UserError(f"{path} holds {quant} weights: evaluate it with --quant {quant} "
                            "(or without --quant)")
        args.quant = quant
    if T is not None and int(T) != args.T:
        if "T" in given:
            print(f"note: evaluating at T={args.T}; {path} was trained at T={int(T)}")
        else:
            args.T = int(T)


def load_calibrated_snn_q(args, calib_ckpt: dict, device: torch.device) -> SpikeModel_q:
    """Build ``SpikeModel_q`` and load the calibration checkpoint into it (thresholds 1,
    scales = mean|W| of the rescaled weights)."""
    snn_q = build_snn_q(args)
    own = snn_q.state_dict()
    revised = remap_snn_keys(extract_state_dict(calib_ckpt["net_snn"]))
    unknown = [k for k in revised if k not in own]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in revised.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if unknown or wrong:
        raise CheckpointError(f"calibrated SNN does not fit the quantized model: "
                              f"unexpected keys {unknown[:4]}, shape mismatch {wrong[:4]}")
    own.update(revised)
    snn_q.load_state_dict(own)
    for _, m in snn_q.spike_modules():
        m.threshold = 1.0
    for m in snn_q.modules():
        if hasattr(m, "init_scale"):
            m.init_scale()
    snn_q.to(device)
    apply_extras(snn_q, calib_ckpt.get("pool_bias_dict", {}),
                 calib_ckpt.get("mem_pot_init_dict", {}), device)
    freeze_fixed(snn_q)
    snn_q.set_spike_state(True)
    return snn_q


def convert(args, ann: VGG, train_loader, test_loader, device: torch.device, show: bool
            ) -> tuple[SpikeModel, float, float]:
    """Fold BN, convert, set thresholds, calibrate and evaluate; returns (snn, ann acc %,
    snn acc %), the SNN already threshold-normalised and in spike mode."""
    search_fold_and_remove_bn(ann)
    ann.to(device)
    # The pooling kernels are parameters the ANN training moved slightly off 1/4; the
    # reference converts them as loaded.  The ANN's own forward resets them to 1/4, so they
    # are put back after the ANN evaluation.
    pools = [m for m in ann.modules() if isinstance(m, AvgPoolConv)]
    if getattr(args, "reset_pool", False):
        for m in pools:
            m.set_weight_to_avg()
    loaded = [m.weight.detach().clone() for m in pools]
    print("ANN (BN folded):")
    ann_acc = validate_model(test_loader, ann, show, "ANN test")
    with torch.no_grad():
        for m, w in zip(pools, loaded):
            m.weight.copy_(w)
    snn = SpikeModel(model=ann, sim_length=args.T).to(device)
    set_thresholds(snn, train_loader, args.calib, args.T)
    calibrate(snn, train_loader, args.calib, args.wc_iters, args.wc_samples, args.wc_lr)
    snn.set_spike_state(True)
    print(f"SNN (T={args.T}, calib={args.calib}):")
    snn_acc = validate_model(test_loader, snn, show, "SNN test")
    normalise_thresholds(snn)
    snn.set_spike_state(True)
    return snn, ann_acc, snn_acc


class CETrainer(Trainer):
    """Cross-entropy training of the ANN or of the quantized SNN."""

    def __init__(self, model, optimizer, *, args, **kw) -> None:
        self.args = args
        super().__init__(model, optimizer, epochs=args.epochs, amp=args.amp,
                         compile=args.compile, show=not args.no_progress, **kw)

    def loss(self, output, target):
        return F.cross_entropy(output, target)
