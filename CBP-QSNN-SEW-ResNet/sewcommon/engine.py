"""Training / evaluation engine shared by the three SEW-ResNet scripts.

One loop serves fp32 pre-training (``cbp=None``: cross-entropy, cosine learning rate) and CBP
quantization (Lagrangian = CE + sum(lambda * Y), element-wise gradient clip at 1, clamp of the
quantized weights, the epoch-end g / ucs / lambda schedule of ``cbp.CBP``).  It handles AMP,
``torch.distributed`` (DDP; lagsum is all-reduced and lambda broadcast inside ``cbp.CBP``),
tensorboard, progress bars, a full-state checkpoint every epoch and resume.  File names and
progress columns come from the per-dataset :class:`Layout`.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import cbp
from cbp import distributed as D
from cbp import methods, metrics
from cbp.checkpoint import CheckpointError, extract_state_dict, load_file, load_into
from cbp.export import pack_model, weight_memory_mbit
from cbp.run import Run
from cbp.runtime import CHECKPOINT_SOURCE as DRIVE  # noqa: F401 (used by the scripts)
from cbp.runtime import UserError, progress, require_file, seed_everything, select_device
from cbp.trainer import Epoch, Trainer

from .neurons import configure_backend, reset_net


# ----------------------------------------------------------------------------- set-up
def resolve_device(name: str | None) -> torch.device:
    """``None``/``auto``: cuda when available, else cpu.  Under torchrun each rank takes the
    GPU of its LOCAL_RANK."""
    if D.is_distributed() and torch.cuda.is_available() and (name is None or "cuda" in name):
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    else:
        dev = select_device(name)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
    configure_backend(dev)
    return dev


def loaders(train_set: Dataset, test_set: Dataset, batch_size: int, workers: int,
            drop_last_train: bool = False, device: torch.device | None = None
            ) -> tuple[DataLoader, DataLoader]:
    """(train loader, test loader); under torch.distributed each rank trains on its
    ``DistributedSampler`` share and tests on every world-size-th sample (no padding)."""
    pin = device is not None and device.type == "cuda"
    train = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers,
                       pin_memory=pin, drop_last=drop_last_train)
    test = DataLoader(test_set, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=pin)
    return D.split_loaders(train, test, seed=0)


# ----------------------------------------------------------------------------- checkpoints
def load_checkpoint_file(path: str):
    """Weights-only load that also accepts an ``argparse.Namespace`` inside (the upstream
    SEW-ResNet checkpoints store one)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return load_file(path)


def load_pretrained(model: nn.Module, path: str, hint: str) -> None:
    """Load fp32 weights (plain state dict or ``{'model': ...}``; old ``.module`` key layout
    accepted) into a quantized or fp32 model; the quantized layers' ``scale`` may be absent."""
    require_file(path, "pretrained fp32 checkpoint", hint)
    state = extract_state_dict(load_checkpoint_file(path))
    state = {k.replace(".module", ""): v for k, v in state.items()}
    try:
        load_into(model, state, allow_missing=(".scale",))
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def plain_args(args: argparse.Namespace) -> dict:
    """The arguments as a dict of plain values (loadable with weights_only)."""
    ok = (str, int, float, bool, type(None))
    return {k: (v if isinstance(v, ok) else str(v)) for k, v in vars(args).items()}




# ----------------------------------------------------------------------------- layout
@dataclass
class Layout:
    """Where a pipeline writes and what its files contain (accuracies in Stats are %)."""

    ckpt_dir: str
    progress_file: str
    progress_row: Callable[[Epoch], list[float]]
    keep_epoch: Callable[[int, int], bool]
    best_name: str
    model_key: str = "model"
    tb_train: str | None = None
    tb_test: str | None = None
    tb_scalars: Callable[[Epoch], tuple[dict, dict]] | None = None
    args_txt: str | None = None
    final_weights: str | None = None  # best weights as a plain state dict (what later runs load)
    final_wrap: bool = False  # store final_weights as {'model': state} (upstream style)
    identity: dict | None = None  # what the checkpoints belong to (compared on resume)
    lr_flag: str = "--lr"

    def outputs(self, epochs: int, quant: str | None) -> list[str]:
        """Every file a training run of ``epochs`` epochs writes (rank 0)."""
        files = [os.path.join(self.ckpt_dir, n) for n in ("checkpoint_latest.pth", self.best_name)]
        files += [os.path.join(self.ckpt_dir, f"checkpoint_{e}.pth")
                  for e in range(epochs) if self.keep_epoch(e, epochs)]
        files += [self.progress_file] + [f for f in (self.args_txt, self.final_weights) if f]
        if quant:
            files.append(os.path.join(self.ckpt_dir, f"packed_{quant}.pth"))
        return files


@dataclass
class Settings:
    epochs: int
    lr: float
    lr_lambda: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    adam: bool = False
    amp: bool = False
    amp_reference_clip: bool = False
    period: int = 20
    T_train: int | None = None
    print_freq: int = 0
    resume: str | None = None
    start_epoch: int = 0
    cos_lr_T: int | None = None
    show: bool = True
    compile: bool = False
    rank_state_dir: str | None = None  # every rank writes rank<r>.pth there at the end
    method: str = "cbp"  # cbp, ste or ptq (cbp.methods); used when quantizing


def build_optimizer(model: nn.Module, s: Settings) -> torch.optim.Optimizer:
    """SGD (momentum ``s.momentum``) or Adam over the reference's groups; weight decay on the
    conv/linear weights (quantized and not) only."""
    groups = cbp.param_groups(model)
    spec = [
        {"params": groups["qweight"], "weight_decay": s.weight_decay},
        {"params": groups["nqweight"], "weight_decay": s.weight_decay},
        {"params": groups["otherparam"], "weight_decay": 0.0},
    ]
    spec = [g for g in spec if g["params"]]
    if s.adam:
        return torch.optim.Adam(spec, lr=s.lr)
    return torch.optim.SGD(spec, lr=s.lr, momentum=s.momentum)


# ----------------------------------------------------------------------------- loop
def _topk_correct(output: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[int]:
    maxk = min(max(ks), output.shape[1])
    pred = output.topk(maxk, 1, True, True).indices
    hit = pred.eq(target.view(-1, 1))
    return [int(hit[:, : min(k, maxk)].any(1).sum()) for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device,
             show: bool = True) -> tuple[float, float, float]:
    """(mean CE loss, top-1 %, top-5 %) in fp32 with BN running statistics, over all ranks."""
    model.eval()
    loss_sum, c1, c5, n = 0.0, 0, 0, 0
    for x, y in progress(loader, "test", enabled=show and D.is_main_process()):
        x, y = x.to(device).float(), y.to(device)
        out = model(x)
        reset_net(model)
        bs = y.shape[0]
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        a1, a5 = _topk_correct(out, y)
        c1, c5, n = c1 + a1, c5 + a5, n + bs
    loss_sum, c1, c5, n = D.sum_over_ranks([loss_sum, c1, c5, n], device)
    n = max(n, 1)
    return loss_sum / n, 100.0 * c1 / n, 100.0 * c5 / n


class SEWTrainer(Trainer):
    """fp32 pre-training (cross-entropy, cosine learning rate) or CBP (gradients clipped to ±1
    after AMP unscaling, latent weights clamped); the neurons are reset after every step.
    File names and progress columns come from the per-dataset :class:`Layout`."""

    best_init = -1.0  # the first epoch is always the best so far

    def __init__(self, model: nn.Module, optimizer, *, settings: Settings, layout: Layout,
                 args: argparse.Namespace, quant: str | None, **kw) -> None:
        s = self.settings = settings
        self.layout, self.args, self.quant = layout, args, quant
        self.clip = "value" if kw.get("controller") is not None else None
        self.rank_state_dir = s.rank_state_dir
        same = layout.tb_test == layout.tb_train
        logdirs = {"train": layout.tb_train, **({} if same else {"te": layout.tb_test})}
        super().__init__(model, optimizer, epochs=s.epochs, amp=s.amp,
                         amp_reference_clip=s.amp_reference_clip, compile=s.compile,
                         show=s.show, logdirs=logdirs, **kw)
        self.best["acc5"] = 0.0
        self.start_epoch = s.start_epoch

    def inputs(self, batch):
        x, y = batch
        x = x.to(self.device, non_blocking=True).float()
        y = y.to(self.device, non_blocking=True)
        T = self.settings.T_train
        if T and x.dim() == 5:  # random temporal crop
            idx = np.sort(np.random.choice(x.shape[1], T, replace=False))
            x = x[:, torch.as_tensor(idx, device=self.device)]
        return x, y

    def loss(self, output, target):
        return F.cross_entropy(output, target)

    def after_step(self) -> None:
        super().after_step()
        reset_net(self.model)

    def before_epoch(self, st: Epoch) -> None:
        self._t0 = time.time()

    def batch_totals(self, output, target, loss):
        bs = target.shape[0]
        a1, a5 = _topk_correct(output.detach().float(), target)
        return {"loss": float(loss.detach()) * bs, "c1": a1, "c5": a5, "n": bs}

    def train_summary(self, st: Epoch) -> None:
        n = max(st.totals["n"], 1)
        st.train_loss = st.totals["loss"] / n
        st.train_acc, st.train_acc5 = 100.0 * st.totals["c1"] / n, 100.0 * st.totals["c5"] / n

    def on_batch(self, index: int, st: Epoch) -> None:
        f = self.settings.print_freq
        if f and (index + 1) % f == 0:
            t, n = st.totals, st.totals["n"]
            rate = n / max(time.time() - self._t0, 1e-9)
            print(f"Epoch: [{st.epoch}] [{index + 1}/{len(self.train_loader)}] loss: "
                  f"{t['loss'] / n:.4f} acc1: {100 * t['c1'] / n:.3f} acc5: "
                  f"{100 * t['c5'] / n:.3f} lr: {self.optimizer.param_groups[0]['lr']:.6g} "
                  f"samples/s: {rate:.1f}")

    def on_decision(self, st: Epoch) -> None:
        c, d = self.controller, st.decision
        if c is None:
            return
        print(f"epoch={st.epoch} lagsum_pre={d.compared_to} lagsum={d.lagsum}")
        if d.updated:
            print(f"lambda update... g={c.g} ucs={c.ucs:.4f}"
                  + (" (weight lr x0.1)" if d.lr_decayed else ""))

    def evaluate(self, st: Epoch) -> None:
        st.test_loss, st.test_acc, st.test_acc5 = evaluate(self.model, self.test_loader,
                                                           self.device, self.show)

    def update_best(self, st: Epoch) -> None:
        if st.improved:
            self.best.update(acc=st.test_acc, acc5=st.test_acc5, epoch=st.epoch)

    def report(self, st: Epoch) -> None:
        print(f" * Acc@1 = {st.test_acc:.3f}, Acc@5 = {st.test_acc5:.3f}, "
              f"loss = {st.test_loss:.5f}; train loss = {st.train_loss:.5f}; cfs = {st.cfs:.6g}; "
              f"{time.time() - self._t0:.1f}s")

    def initial_row(self):
        return [0.0] * len(self.layout.progress_row(Epoch(0)))

    def row(self, st: Epoch):
        return self.layout.progress_row(st)

    def scalars(self, st: Epoch):
        if self.layout.tb_scalars is None:
            return {}
        train, test = self.layout.tb_scalars(st)
        train = dict(train)
        c = self.controller
        if c is not None:
            train.update({"cbp/g": c.g, "cbp/ucs": c.ucs, "cbp/lambda_mean": c.lambda_mean(),
                          "cbp/cfs": st.cfs})
        if "te" not in self.logdirs:
            return {"train": {**train, **test}}
        return {"train": train, "te": test}

    def reference_state(self, st: Epoch, state: dict) -> dict:
        ref = {self.layout.model_key: state["model"], "epoch": st.epoch,
               "progress": state["progress"], "args": plain_args(self.args),
               "max_test_acc1": self.best["acc"],
               "test_acc5_at_max_test_acc1": self.best["acc5"]}
        if self.controller is not None:
            ref.update({"optimizer1": state["optimizer"],
                        **cbp.CBP.reference_entries(state["cbp"])})
        else:
            ref.update({"optimizer": state["optimizer"], "lr_scheduler": state["scheduler"]})
        return ref

    def write(self, st: Epoch, full: dict) -> None:
        r, layout = self.run, self.layout
        r.write_table(layout.progress_file, self.rows)
        if layout.keep_epoch(st.epoch, self.epochs):
            r.save(full, os.path.join(layout.ckpt_dir, f"checkpoint_{st.epoch}.pth"))
        if st.improved:
            r.save(full, os.path.join(layout.ckpt_dir, layout.best_name))
            if layout.final_weights:
                sd = full["trainer"]["model"]
                r.save({"model": sd} if layout.final_wrap else sd, layout.final_weights)
            if self.controller is not None:  # low-bit export of the best weights
                r.save(pack_model(self.model),
                       os.path.join(layout.ckpt_dir, f"packed_{self.quant}.pth"))

    def last_path(self) -> str:
        return os.path.join(self.layout.ckpt_dir, "checkpoint_latest.pth")

    def fit(self, train_loader, test_loader):
        if self.layout.args_txt:
            self.run.write_text(self.layout.args_txt, str(self.args))
        last = super().fit(train_loader, test_loader)
        if last is not None:
            print(f"max test acc1 {self.best['acc']:.3f} (acc5 {self.best['acc5']:.3f})")
        return last


def step_trainer(model: nn.Module, optimizer: torch.optim.Optimizer,
                 controller: cbp.CBP | None, device: torch.device, s: Settings) -> SEWTrainer:
    """A trainer that writes nothing, for stepping the SEW loop by hand (``train_one_epoch``):
    benchmarks and tests."""
    layout = Layout(ckpt_dir="", progress_file="", progress_row=lambda st: [],
                    keep_epoch=lambda e, n: False, best_name="")
    return SEWTrainer(model, optimizer, run=Run({}, []), device=device, controller=controller,
                      settings=s, layout=layout, args=argparse.Namespace(), quant=None)


def run(model: nn.Module, train_loader: DataLoader, test_loader: DataLoader,
        device: torch.device, s: Settings, layout: Layout, args: argparse.Namespace,
        quant: str | None) -> dict:
    """Train for ``s.epochs`` epochs (CBP when ``quant`` is set, fp32 otherwise) and write the
    layout's files on rank 0.  ``model`` already holds the starting weights.  Returns the
    best test accuracies (and the controller's final g / ucs)."""
    identity = layout.identity or {"pipeline": "SEW-ResNet"}
    optimizer = build_optimizer(model, s)
    controller = (methods.controller(s.method, model, s.lr_lambda, period_max=s.period)
                  if quant else None)
    scheduler = None
    if controller is None:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=s.cos_lr_T or max(s.epochs, 1))
    with Run(identity, layout.outputs(s.epochs, quant), lr_flag=layout.lr_flag) as r:
        trainer = SEWTrainer(model, optimizer, run=r, device=device, controller=controller,
                             scheduler=scheduler, settings=s, layout=layout, args=args,
                             quant=quant)
        trainer.resume_from(s.resume, safe=(argparse.Namespace,))
        trainer.fit(train_loader, test_loader)
    summary = {"max_test_acc1": trainer.best["acc"],
               "test_acc5_at_max_test_acc1": trainer.best["acc5"]}
    if controller is not None:
        summary.update(g=controller.g, ucs=controller.ucs)
    return summary


@dataclass
class Pipeline:
    """What a script hands to :func:`execute`."""

    build_model: Callable[[str | None], nn.Module]  # mode (None = fp32) -> model on CPU
    datasets: Callable[[], tuple[Dataset, Dataset]]
    layout: Layout
    settings: Settings
    quant: str | None  # None: fp32 training
    seed: int
    device: str | None
    batch_size: int
    workers: int
    test_only: bool = False
    pretrained: str | None = None  # fp32 weights CBP starts from
    pretrained_hint: str = ""
    prequantized: str | None = None  # what test-only evaluates
    prequantized_hint: str = ""
    drop_last_train: bool = False
    sync_bn: bool = False
    dist_url: str = "env://"
    world_size: int | None = None  # --world-size: must match the launcher's when given
    test_only_report: Callable[[float, float, float], None] | None = None
    dataset: str = ""


def execute(p: Pipeline, args: argparse.Namespace) -> dict | None:
    """The whole script: distributed set-up, seed, data, model, then test-only or training.
    Under torchrun an error on one rank ends every rank with that rank's line."""
    D.init_from_env(device=p.device, init_method=p.dist_url)
    with D.collective():
        if p.world_size is not None and p.world_size != D.world_size():
            raise UserError(f"--world-size {p.world_size}, but {D.world_size()} process(es) "
                            "were started (the launcher sets the world size: torchrun "
                            "--nproc_per_node N; leave --world-size out)")
        device = resolve_device(p.device)
    seed_everything(p.seed, deterministic=True)
    print(args)
    train_set, test_set = D.first_then_others(p.datasets)
    with D.collective():
        train_loader, test_loader = loaders(train_set, test_set, p.batch_size, p.workers,
                                            p.drop_last_train, device)
        mode = p.quant
        model = p.build_model(mode)
        if p.sync_bn and D.is_distributed():
            if device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                print("note: --sync-bn needs CUDA; keeping per-process BatchNorm on CPU")
        model.to(device)
        if p.test_only:
            path = p.prequantized if mode else p.pretrained
            hint = p.prequantized_hint if mode else p.pretrained_hint
            require_file(path, "checkpoint", hint)
            load_into(model, load_checkpoint_file(path), nonfinite="warn")
    if p.test_only:
        (loss, acc1, acc5), _ = metrics.profiled(
            model, lambda: evaluate(model, test_loader, device, p.settings.show))
        if p.test_only_report is not None:
            p.test_only_report(loss, acc1, acc5)
        else:
            print(f" * Acc@1 = {acc1:.3f}, Acc@5 = {acc5:.3f}, loss = {loss:.5f}")
        if mode:
            print(f"cfs = {cbp.cfs(model):.6g}; weight memory "
                  f"{weight_memory_mbit(model):.4f} Mbit ({mode})")
        return {"test_loss": loss, "test_acc1": acc1, "test_acc5": acc5}
    connect = getattr(args, "connect_f", None) or getattr(args, "cnf", None)
    p.layout.identity = {"pipeline": "SEW-ResNet", "dataset": p.dataset,
                         "model": type(model).__name__, "connect_f": connect,
                         "quant": mode or "fp32", "method": p.settings.method if mode else None,
                         "width": float(getattr(args, "width", 1.0)),
                         "T": getattr(args, "T", None)}
    with D.collective():
        if mode and not p.settings.resume:
            load_pretrained(model, p.pretrained, p.pretrained_hint)
    return run(model, train_loader, test_loader, device, p.settings, p.layout, args, mode)
