"""Shared code of the two TSSL-BP scripts: flags, config checks, data, train/test loops,
logging and file names (all paths relative to the working directory)."""

from __future__ import annotations

import argparse
import logging
import os

import global_v as glv
import torch
from cnns import Network
from layers.conv import ConvLayer
from layers.linear import LinearLayer
from layers.pooling import PoolLayer
from network_parser import parse
from torch.utils.data import DataLoader

from cbp import MODES, metrics
from cbp import data as cbp_data
from cbp import distributed as D
from cbp.data import CIFAR_MEAN, CIFAR_STD
from cbp.runtime import CHECKPOINT_SOURCE as DRIVE  # noqa: F401
from cbp.runtime import (  # noqa: F401 (used by the scripts)
    UserError,
    nonneg_int,
    positive_float,
    progress,
    require_file,
)
from cbp.trainer import Trainer, add_speed_flags

from functions import loss_f, tsslbp

DATASETS = ("CIFAR10", "DIGITS")
REQUIRED_NETWORK_KEYS = ("epochs", "batch_size", "n_steps", "dataset", "lr", "loss", "n_class",
                         "tau_m", "tau_s")
# Network keys with a numeric value: (kind, lower bound, bound inclusive)
NUMERIC_KEYS = {
    "epochs": (int, 0, True), "epochs_fp32": (int, 0, True), "batch_size": (int, 1, True),
    "n_steps": (int, 1, True), "n_class": (int, 1, True), "image_size": (int, 1, True),
    "period_max": (int, 1, True), "desired_count": (int, 0, True),
    "undesired_count": (int, 0, True), "lr": (float, 0, False), "lr_fp32": (float, 0, False),
    "lr_lambda": (float, 0, False), "tau_m": (float, 0, False), "tau_s": (float, 0, False),
}


def check_numbers(net: dict, path: str) -> list[str]:
    """One message per Network key whose value is not a number in its range."""
    bad = []
    for key, (kind, low, inclusive) in NUMERIC_KEYS.items():
        if key not in net:
            continue
        v = net[key]
        ok_type = isinstance(v, (int, float)) and not isinstance(v, bool)
        if kind is int:
            ok_type = ok_type and float(v).is_integer()
        ok = ok_type and (v >= low if inclusive else v > low) and v == v and v != float("inf")
        if not ok:
            what = ("an integer" if kind is int else "a number") + \
                (f" >= {low}" if inclusive else f" > {low}")
            bad.append(f"{path}: Network.{key} must be {what}, got {v!r}")
    return bad


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
    add_speed_flags(p, "-")
    p.add_argument("-resume", "--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="train: resume (default: this run's ./checkpoint/<name>_last.pth)")


def resume_path(args, last_path: str) -> str | None:
    """The checkpoint a training run resumes from: ``-resume [PATH]`` or the reference's
    ``-checkpoint PATH``."""
    if args.resume:
        return last_path if args.resume == "auto" else args.resume
    return args.checkpoint or None


def identity(params: parse, script: str, dataset: str) -> dict:
    """What this run's checkpoints belong to (compared on resume)."""
    net = params["Network"]
    return {"pipeline": "TSSL-BP", "script": script, "dataset": dataset,
            "quant": net.get("mode") if script != "fp32" else "fp32",
            "n_steps": int(net["n_steps"])}


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
    bad = check_numbers(net, path)
    if bad:
        raise UserError("\nerror: ".join(bad))
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
    log = logging.getLogger(f"tsslbp.{os.path.abspath(path)}")
    log.setLevel(logging.INFO)
    log.propagate = False
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 logs
        log.addHandler(logging.NullHandler())
        return log
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if not log.handlers:
        handler = logging.FileHandler(path, mode="a")
        handler.setFormatter(logging.Formatter("%(levelname)s:%(message)s"))
        log.addHandler(handler)
    return log


def setup_device(args) -> torch.device:
    """Join the process group when started by torchrun, then pick the device (``-device``, else
    ``-gpu``, else cuda if available; each rank takes the GPU of its LOCAL_RANK)."""
    from cbp.runtime import gpu_to_device

    device = D.start(lambda: gpu_to_device(str(args.gpu), args.device), args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.enabled = True
    # an unknown TSSLBP_BACKEND is reported here, before any data is loaded
    tsslbp.set_backend(args.backend if args.backend is not None else tsslbp.get_backend())
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
        train_ds = cbp_data.cifar("CIFAR10", root, True, train_tf, download, "-download")
        test_ds = cbp_data.cifar("CIFAR10", root, False, test_tf, download, "-download")
        workers = 8 if workers is None else workers
    train_dl = DataLoader(train_ds, batch_size=bs, shuffle=True, num_workers=workers)
    test_dl = DataLoader(test_ds, batch_size=bs, shuffle=False, num_workers=workers)
    return D.split_loaders(train_dl, test_dl)


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


class TSSLTrainer(Trainer):
    """The loop of both TSSL-BP scripts: the spike-count loss of ``Network.loss``, the
    gradient norm of every weight clipped to 1, ``weight_clipper`` after each step (it also
    keeps the latent quantized weights in range, so the CBP controller clamps nothing)."""

    clip = "norm"
    resume_flag = "-resume"

    def __init__(self, net: Network, optimizer, *, args, loss_fn: loss_f.SpikeLoss, log,
                 **kw) -> None:
        self.loss_fn, self.log = loss_fn, log
        self.T = int(net.network_config["n_steps"])
        super().__init__(net, optimizer, amp=args.amp, compile=args.compile,
                         show=not args.no_progress, **kw)

    def inputs(self, batch):
        images, labels = batch
        return repeat_time(images.to(self.device, torch.float32), self.T), labels.to(self.device)

    def forward(self, net, x):
        return net(x, self.epoch, True)

    def loss(self, output, target):
        return self.loss_fn(output, target)

    def batch_totals(self, output, target, loss):
        return {"loss": float(loss.detach()), "n": target.numel(),
                "correct": int((loss_f.predict(output) == target).sum())}

    def clip_parameters(self):
        return list(self.model.my_parameters)

    def after_step(self) -> None:
        self.model.weight_clipper()

    def improved(self, st) -> bool:
        return st.test_acc >= self.best["acc"]  # ties save too (the reference's early stop)

    def update_best(self, st) -> None:
        if st.test_acc > self.best["acc"]:
            self.best.update(acc=st.test_acc, epoch=st.epoch)

    def evaluate(self, st) -> None:
        st.test_acc = test(self.model, self.test_loader, self.device, self.show)

    def scalars(self, st):
        out = dict(super().scalars(st)["main"], **{"accuracy/train": st.train_acc})
        return {"main": out}

    def final_report(self, weights: str) -> None:
        """The best epoch, in the log and on stdout, and where its weights are."""
        best_acc, best_epoch = self.best["acc"], self.best["epoch"]
        self.log.info("Best Accuracy: %.3f, at epoch: %d \n", best_acc, best_epoch)
        print(f"Best Accuracy: {best_acc:.3f} at epoch {best_epoch}; weights in {weights}")


@torch.no_grad()
def test(net: Network, loader: DataLoader, device: torch.device, show: bool = True) -> float:
    """Test accuracy in % (argmax of the summed output PSP, no dropout)."""
    net.eval()
    T = int(net.network_config["n_steps"])
    correct, total = 0, 0
    for images, labels in progress(loader, "test", enabled=show and D.is_main_process()):
        x = repeat_time(images.to(device, torch.float32), T)
        labels = labels.to(device)
        correct += int((loss_f.predict(net(x, None, False)) == labels).sum())
        total += labels.numel()
    net.train()
    if D.is_distributed():
        correct, total = D.sum_over_ranks([correct, total])
    return 100.0 * correct / max(total, 1)


# ------------------------------------------------------------------ spike metrics


def echo(log: logging.Logger):
    """A line printer that also writes the line to ``log``."""
    def out(line: str) -> None:
        log.info(line)
        print(line)
    return out


class _Rules:
    """op_counter rules for the TSSL-BP layers of ``net``: a layer's synaptic events are the
    spikes behind its PSP input (the convolution commutes with the PSP filter), or after a
    sum-pooling layer of weight theta, theta x the spike count of each window."""

    def __init__(self, net: Network) -> None:
        self.tau_s = float(net.network_config["tau_s"])
        self.thetas = sorted({lay.theta for lay in net.layers if isinstance(lay, PoolLayer)})

    def events(self, x: torch.Tensor) -> torch.Tensor:
        e = loss_f.psp_inverse(x, self.tau_s)
        if metrics.spike_counts(e) is None:
            for theta in self.thetas:
                k = metrics.spike_counts(e, amplitude=theta)
                if k is not None:
                    return k
        return e  # spikes, or the first layer's analog input

    def conv(self, layer: ConvLayer, args, kwargs, out) -> tuple[int, int]:
        return metrics.conv_ops(self.events(args[0]), layer.weight, layer.stride,
                                layer.padding, layer.dilation, out=out)

    def linear(self, layer: LinearLayer, args, kwargs, out) -> tuple[int, int]:
        e = self.events(args[0])
        n, T = e.shape[0], e.shape[-1]
        return metrics.linear_ops(e.reshape(n, -1, T).transpose(1, 2).reshape(n * T, -1),
                                  layer.weight)

    def spikes(self, neuron: tsslbp.Neuron, args, kwargs, out) -> torch.Tensor:
        return loss_f.psp_inverse(out, self.tau_s)


def test_with_metrics(net: Network, loader: DataLoader, device: torch.device,
                      show: bool = True, log=print) -> tuple[float, metrics.SpikeReport]:
    """``test`` under the spike profiler; prints (with ``log``) the firing rate of every
    layer, SynOps, MACs and the energy estimate (see ``_Rules``); pooling (fixed weights, no
    neuron) is folded into the next layer and not counted."""
    rules = _Rules(net)
    return metrics.profiled(
        net, lambda: test(net, loader, device, show), log=log,
        neurons={tsslbp.Neuron: rules.spikes},
        layers={ConvLayer: rules.conv, LinearLayer: rules.linear}, ignore=[PoolLayer],
        scope=torch.nn.ModuleDict({lay.name: lay for lay in net.layers}))


# ------------------------------------------------------------------ files


def pretrained_path(dataset: str) -> str:
    return f"./trained_params/TSSL_BP_{dataset}_fp32_pretrained.pth"


def prequantized_path(dataset: str, mode: str) -> str:
    return f"./trained_params/TSSL_BP_{dataset}_{mode}_cbp_prequantized.pth"


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







def fp32_hint(args) -> str:
    """How to get the pretrained fp32 checkpoint of ``args.config``."""
    return f"download it from {DRIVE} or create it with: " \
           f"python main_train_fp32.py -config {args.config}"


def load_fp32_scales(net: Network, path: str, hint: str) -> None:
    """Load the fp32 weights and set every scale to mean |W_fp32| (the reference's start-up)."""
    from cbp.checkpoint import check_finite, extract_state_dict, load_file

    require_file(path, "pretrained fp32 checkpoint", hint)
    state = extract_state_dict(load_file(path))
    check_finite(state, path)
    load_weights(net, state, path)
    net.set_scales(None)


def load_prequantized(net: Network, args, params: parse, dataset: str) -> str:
    """Load the weights and scales ``main_quantize_cbp.py -mode eval`` evaluates
    (``-checkpoint``, else the prequantized file of the config's mode and ``-method``) into
    ``net``; returns the path.  A missing file is one error line."""
    from cbp import methods
    from cbp.checkpoint import check_finite, extract_state_dict, load_file

    mode = params["Network"]["mode"]
    method = getattr(args, "method", "cbp")
    path = args.checkpoint or methods.tagged(
        prequantized_path(params["Network"]["dataset"], mode), method)
    cmd = (f"python main_quantize_cbp.py -config {args.config} -mode train"
           + methods.flag(method, "-"))
    require_file(path, "prequantized checkpoint",
                 f"download it from {DRIVE} or produce it with: {cmd}")
    obj = load_file(path)
    state = extract_state_dict(obj)
    check_finite(state, path, "warn")
    _, scales = split_state(state)
    if not scales and isinstance(obj, dict) and isinstance(obj.get("scales"), dict):
        scales = dict(obj["scales"])  # a full training checkpoint (_last.pth, progress/*.pth)
    if not scales:  # authors' files: scales come from the fp32 weights, as in the reference
        load_fp32_scales(net, pretrained_path(dataset),
                         f"{path} stores no scales, so they are recomputed from the fp32 "
                         f"weights; {fp32_hint(args)}")
    load_weights(net, state, path)
    if scales:
        net.set_scales(scales)
    return path


def load_pretrained(net: Network, args, dataset: str) -> str:
    """Load the fp32 weights ``main_train_fp32.py -mode eval`` evaluates (``-checkpoint``, else
    the pretrained file) into ``net``; returns the path.  A missing file is one error line."""
    from cbp.checkpoint import check_finite, extract_state_dict, load_file

    path = args.checkpoint or pretrained_path(dataset)
    require_file(path, "fp32 checkpoint",
                 f"create it with: python main_train_fp32.py -config {args.config}")
    state = extract_state_dict(load_file(path))
    check_finite(state, path, "warn")
    load_weights(net, state, path)
    return path
