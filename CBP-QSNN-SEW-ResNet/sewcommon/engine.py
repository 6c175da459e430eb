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
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import cbp
from cbp import distributed as D
from cbp import metrics
from cbp.checkpoint import CheckpointError, extract_state_dict, load_file, load_into, save_atomic
from cbp.export import pack_model, weight_memory_mbit
from cbp.run import Run
from cbp.runtime import CHECKPOINT_SOURCE as DRIVE  # noqa: F401 (used by the scripts)
from cbp.runtime import (
    Scalars,
    UserError,
    progress,
    require_file,
    seed_everything,
    select_device,
)

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
            distributed: bool, drop_last_train: bool = False, device: torch.device | None = None
            ) -> tuple[DataLoader, DataLoader, DistributedSampler | None]:
    """(train loader, test loader, train sampler or None)."""
    pin = device is not None and device.type == "cuda"
    if distributed:
        train_sampler = DistributedSampler(train_set)
        test_sampler = DistributedSampler(test_set, shuffle=False)
        train = DataLoader(train_set, batch_size=batch_size, sampler=train_sampler,
                           num_workers=workers, pin_memory=pin, drop_last=drop_last_train)
        test = DataLoader(test_set, batch_size=batch_size, sampler=test_sampler,
                          num_workers=workers, pin_memory=pin)
        return train, test, train_sampler
    train = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers,
                       pin_memory=pin, drop_last=drop_last_train)
    test = DataLoader(test_set, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=pin)
    return train, test, None


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
class Stats:
    epoch: int
    train_loss: float = 0.0
    train_acc1: float = 0.0
    train_acc5: float = 0.0
    test_loss: float = 0.0
    test_acc1: float = 0.0
    test_acc5: float = 0.0
    cfs: float = 0.0
    lagsum: float = 0.0
    lagsum_pre: float = 0.0


@dataclass
class Layout:
    """Where a pipeline writes and what its files contain (accuracies in Stats are %)."""

    ckpt_dir: str
    progress_file: str
    progress_row: Callable[[Stats], list[float]]
    keep_epoch: Callable[[int, int], bool]
    best_name: str
    model_key: str = "model"
    tb_train: str | None = None
    tb_test: str | None = None
    tb_scalars: Callable[[Stats], tuple[dict, dict]] | None = None
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
    rank_state_dir: str | None = None  # every rank writes rank<r>.pth there at the end


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


# ----------------------------------------------------------------------------- loops
def _autocast(device: torch.device, enabled: bool):
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def _topk_correct(output: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[int]:
    maxk = min(max(ks), output.shape[1])
    pred = output.topk(maxk, 1, True, True).indices
    hit = pred.eq(target.view(-1, 1))
    return [int(hit[:, : min(k, maxk)].any(1).sum()) for k in ks]


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    controller: cbp.CBP | None, scaler: torch.amp.GradScaler,
                    device: torch.device, s: Settings, epoch: int,
                    run: Run | None = None) -> tuple[float, float, float]:
    """One epoch; returns (mean CE loss, top-1 %, top-5 %) over all ranks.  With a CBP
    controller the loss that is minimised is the Lagrangian, and the epoch's lagsum is kept by
    the controller."""
    model.train()
    loss_sum, c1, c5, n = 0.0, 0, 0, 0
    t0 = time.time()
    bar = progress(loader, f"epoch {epoch}", enabled=s.show and D.is_main_process())
    for i, (x, y) in enumerate(bar):
        x, y = x.to(device, non_blocking=True).float(), y.to(device, non_blocking=True)
        if s.T_train and x.dim() == 5:
            idx = np.sort(np.random.choice(x.shape[1], s.T_train, replace=False))
            x = x[:, torch.as_tensor(idx, device=device)]
        with _autocast(device, s.amp):
            out = model(x)
            loss = F.cross_entropy(out, y)
        lag = controller.lagrangian(loss.float()) if controller is not None else loss
        if run is not None:
            run.check_loss(lag, epoch, i)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(lag).backward()
        if controller is not None:
            if s.amp and not s.amp_reference_clip:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            cbp.clip_gradients(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        if controller is not None:
            controller.clamp_()
        reset_net(model)
        bs = y.shape[0]
        a1, a5 = _topk_correct(out.detach().float(), y)
        loss_sum += float(loss.detach()) * bs
        c1, c5, n = c1 + a1, c5 + a5, n + bs
        if s.print_freq and (i + 1) % s.print_freq == 0:
            rate = n / max(time.time() - t0, 1e-9)
            print(f"Epoch: [{epoch}] [{i + 1}/{len(loader)}] loss: {loss_sum / n:.4f} "
                  f"acc1: {100 * c1 / n:.3f} acc5: {100 * c5 / n:.3f} "
                  f"lr: {optimizer.param_groups[0]['lr']:.6g} samples/s: {rate:.1f}")
    loss_sum, c1, c5, n = D.sum_over_ranks([loss_sum, c1, c5, n], device)
    n = max(n, 1)
    return loss_sum / n, 100.0 * c1 / n, 100.0 * c5 / n


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


# ----------------------------------------------------------------------------- driver
def run(model: nn.Module, train_loader: DataLoader, test_loader: DataLoader,
        train_sampler, device: torch.device, s: Settings, layout: Layout,
        args: argparse.Namespace, quant: str | None) -> dict:
    """Train for ``s.epochs`` epochs (CBP when ``quant`` is set, fp32 otherwise) and write the
    layout's files on rank 0 through :class:`cbp.run.Run`.  ``model`` already holds the starting
    weights.  Returns the final summary (max test acc etc.)."""
    identity = layout.identity or {"pipeline": "SEW-ResNet"}
    with Run(identity, layout.outputs(s.epochs, quant), lr_flag=layout.lr_flag) as r:
        return _run(model, train_loader, test_loader, train_sampler, device, s, layout, args,
                    quant, r)


def _run(model: nn.Module, train_loader: DataLoader, test_loader: DataLoader,
         train_sampler, device: torch.device, s: Settings, layout: Layout,
         args: argparse.Namespace, quant: str | None, r: Run) -> dict:
    distributed = D.is_distributed()
    main = D.is_main_process()
    optimizer = build_optimizer(model, s)
    controller = cbp.CBP(model, s.lr_lambda, period_max=s.period) if quant else None
    scheduler = None
    if controller is None:
        t_max = s.cos_lr_T or max(s.epochs, 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)
    scaler = torch.amp.GradScaler(device.type, enabled=s.amp)
    net = model
    if distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    rows: list[list[float]] = [layout.progress_row(Stats(0))]
    rows[0] = [0.0] * len(rows[0])
    best = {"max_test_acc1": -1.0, "test_acc5_at_max_test_acc1": 0.0}
    start_epoch = s.start_epoch
    if s.resume:
        latest = os.path.join(layout.ckpt_dir, "checkpoint_latest.pth")
        with D.collective():
            state = r.resume(s.resume, last_hint=f"resume from {latest}",
                             safe=(argparse.Namespace,), needs=("epoch", "progress"))
        load_into(model, extract_state_dict(state))
        optimizer.load_state_dict(state["optimizer1" if controller else "optimizer"])
        if controller is not None:
            controller.load_checkpoint_entries(state)
        if scheduler is not None and "lr_scheduler" in state:
            scheduler.load_state_dict(state["lr_scheduler"])
        if "scaler" in state and s.amp:
            scaler.load_state_dict(state["scaler"])
        if "rng" in state:
            r.restore_rng(state["rng"])
        rows = [list(map(float, r)) for r in torch.as_tensor(state["progress"]).tolist()]
        best["max_test_acc1"] = float(state.get("max_test_acc1", -1.0))
        best["test_acc5_at_max_test_acc1"] = float(state.get("test_acc5_at_max_test_acc1", 0.0))
        start_epoch = int(state["epoch"]) + 1
        print(f"resumed from {s.resume} at epoch {start_epoch}")
    elif controller is not None:
        controller.start()  # the initial lambda update at ucs = 0

    tb_train = Scalars(layout.tb_train if main else None)
    same = layout.tb_test == layout.tb_train
    tb_test = tb_train if same else Scalars(layout.tb_test if main else None)
    if layout.args_txt:
        r.write_text(layout.args_txt, str(args))

    last = None
    for epoch in range(start_epoch, s.epochs):
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        t0 = time.time()
        st = Stats(epoch)
        st.train_loss, st.train_acc1, st.train_acc5 = train_one_epoch(
            net, train_loader, optimizer, controller, scaler, device, s, epoch, r)
        if controller is not None:
            decision = controller.end_epoch(optimizer)
            st.lagsum = decision.lagsum
            print(f"epoch={epoch} lagsum_pre={decision.compared_to} lagsum={decision.lagsum}")
            if decision.updated:
                print(f"lambda update... g={controller.g} ucs={controller.ucs:.4f}"
                      + (" (weight lr x0.1)" if decision.lr_decayed else ""))
            st.lagsum_pre = controller.lagsum_pre
        else:
            scheduler.step()
        r.check_epoch(model, epoch, st.lagsum)
        st.test_loss, st.test_acc1, st.test_acc5 = evaluate(net, test_loader, device, s.show)
        st.cfs = controller.cfs() if controller is not None else cbp.cfs(model)
        print(f" * Acc@1 = {st.test_acc1:.3f}, Acc@5 = {st.test_acc5:.3f}, "
              f"loss = {st.test_loss:.5f}; train loss = {st.train_loss:.5f}; cfs = {st.cfs:.6g}; "
              f"{time.time() - t0:.1f}s")
        rows.append(layout.progress_row(st))
        improved = st.test_acc1 > best["max_test_acc1"]
        if improved:
            best["max_test_acc1"], best["test_acc5_at_max_test_acc1"] = st.test_acc1, st.test_acc5
        last = st
        rng = r.rng_state()  # every rank's (a collective)
        with r.writes():
            if main:
                _write_epoch(r, model, optimizer, controller, scheduler, scaler, s, layout, args,
                             quant, st, rows, best, improved, tb_train, tb_test, rng)
    tb_train.close()
    if not same:
        tb_test.close()
    if last is not None:
        print(f"max test acc1 {best['max_test_acc1']:.3f} "
              f"(acc5 {best['test_acc5_at_max_test_acc1']:.3f})")
    summary = dict(best)
    if controller is not None:
        summary.update(g=controller.g, ucs=controller.ucs)
    if s.rank_state_dir:
        dump = {"model": model.state_dict(), "g": summary.get("g"), "ucs": summary.get("ucs"),
                "lr": [g["lr"] for g in optimizer.param_groups],
                "lamb": [lam.detach().clone() for lam in controller.lambdas] if controller else []}
        save_atomic(dump, os.path.join(s.rank_state_dir, f"rank{D.rank()}.pth"))
    r.finish(model, controller)
    return summary


def _write_epoch(r: Run, model, optimizer, controller, scheduler, scaler, s: Settings,
                 layout: Layout, args, quant, st: Stats, rows, best, improved, tb_train,
                 tb_test, rng: dict) -> None:
    """The main process's files and scalars of a finished epoch."""
    epoch = st.epoch
    if layout.tb_scalars is not None:
        train_sc, test_sc = layout.tb_scalars(st)
        for k, v in train_sc.items():
            tb_train.add(k, v, epoch)
        for k, v in test_sc.items():
            tb_test.add(k, v, epoch)
        if controller is not None:
            for k, v in (("cbp/g", controller.g), ("cbp/ucs", controller.ucs),
                         ("cbp/lambda_mean", controller.lambda_mean()), ("cbp/cfs", st.cfs)):
                tb_train.add(k, v, epoch)
    state = {
        layout.model_key: model.state_dict(),
        "epoch": epoch,
        "progress": torch.tensor(rows, dtype=torch.float64),
        "args": plain_args(args),
        "scaler": scaler.state_dict(),
        "rng": rng,
        **best,
    }
    if controller is not None:
        state.update({"optimizer1": optimizer.state_dict(),
                      **controller.checkpoint_entries()})
    else:
        state.update({"optimizer": optimizer.state_dict(),
                      "lr_scheduler": scheduler.state_dict()})
    state = r.checkpoint(state)
    r.write_table(layout.progress_file, rows)
    if layout.keep_epoch(epoch, s.epochs):
        r.save(state, os.path.join(layout.ckpt_dir, f"checkpoint_{epoch}.pth"))
    if improved:
        r.save(state, os.path.join(layout.ckpt_dir, layout.best_name))
        if layout.final_weights:
            sd = model.state_dict()
            r.save({"model": sd} if layout.final_wrap else sd, layout.final_weights)
        if controller is not None:  # low-bit export of the best weights
            r.save(pack_model(model), os.path.join(layout.ckpt_dir, f"packed_{quant}.pth"))
    # the training state last: a run killed before it redoes this epoch on resume
    r.save(state, os.path.join(layout.ckpt_dir, "checkpoint_latest.pth"))


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
    distributed = D.init_from_env(device=p.device, init_method=p.dist_url)
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
        train_loader, test_loader, sampler = loaders(
            train_set, test_set, p.batch_size, p.workers, distributed, p.drop_last_train, device)
        mode = p.quant
        model = p.build_model(mode)
        if p.sync_bn and distributed:
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
                         "quant": mode or "fp32", "width": float(getattr(args, "width", 1.0)),
                         "T": getattr(args, "T", None)}
    if p.settings.resume == "auto":
        p.settings.resume = os.path.join(p.layout.ckpt_dir, "checkpoint_latest.pth")
    with D.collective():
        if mode and not p.settings.resume:
            load_pretrained(model, p.pretrained, p.pretrained_hint)
    return run(model, train_loader, test_loader, sampler, device, p.settings, p.layout, args,
               mode)
