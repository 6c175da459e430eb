"""The CBP controller: Algorithm 1 of constrained backpropagation.

Owns one pseudo-Lagrange multiplier tensor per quantized weight, their optimizer, and the
schedule state (g, ucs, period, lagsum_pre).  :class:`cbp.trainer.Trainer` drives it; a
hand-written loop would use it as::

    cbp = CBP(model, lr_lambda=5e-4)          # scales := mean|W| of the pretrained weights
    cbp.start()                               # initial lambda update at ucs = 0
    for epoch ...:
        for batch ...:
            lag = cbp.lagrangian(task_loss)   # task_loss + sum(lambda * Y(W; ucs)), into lagsum
            lag.backward(); clip_gradients(model.parameters(), 1.0)
            optimizer.step(); cbp.clamp_()
        decision = cbp.end_epoch(optimizer)   # g / ucs / lr / lambda update
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import distributed as D
from .functional import FUSED_MIN_NUMEL, constraint_sum, constraint_values, lagrangian
from .nn import QuantMixin, quantized_modules

LAGSUM_INIT = 1e10


@dataclass
class QuantTarget:
    """One quantized weight: the latent parameter, its frozen scale and its mode."""

    name: str
    weight: nn.Parameter
    scale: Tensor
    mode: str


@dataclass
class EpochDecision:
    """What ``CBP.end_epoch`` decided."""

    updated: bool
    lagsum: float
    lagsum_pre: float  # after the decision (LAGSUM_INIT when lambda was updated)
    compared_to: float  # the previous lagsum_pre that this epoch's lagsum was compared with
    g: int
    ucs: float
    lr_decayed: bool


def next_g(g: int) -> int:
    """Schedule g: 1, 2, ..., 10, 20, 30, ..."""
    return g + 1 if g < 10 else g + 10


def ucs_of(g: int) -> float:
    return 1.0 - 1.0 / g


def clip_gradients(parameters: Iterable[Tensor], value: float = 1.0) -> None:
    """Clamp every gradient element to [-value, value] (the reference's clip_grad_value_)."""
    torch.nn.utils.clip_grad_value_([p for p in parameters if p.grad is not None], value)


def param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Split trainable parameters the way the reference does.

    ``qweight``: quantized weights; ``nqweight``: weights of other conv/linear layers;
    ``otherparam``: everything else that trains (biases, BN, neuron parameters).
    Frozen scales are in no group.
    """
    groups: dict[str, list[nn.Parameter]] = {"qweight": [], "nqweight": [], "otherparam": []}
    seen: set[int] = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if isinstance(module, QuantMixin) and pname == "weight":
                groups["qweight"].append(p)
            elif pname == "weight" and isinstance(
                module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
            ):
                groups["nqweight"].append(p)
            else:
                groups["otherparam"].append(p)
    return groups


def targets_of(model: nn.Module) -> list[QuantTarget]:
    return [QuantTarget(n, m.weight, m.scale, m.mode) for n, m in quantized_modules(model)]


def cfs(model_or_targets: nn.Module | list[QuantTarget]) -> float:
    """Constraint-function score sum Y(W; ucs=1) / number of quantized weights (0 if none)."""
    targets = (
        targets_of(model_or_targets)
        if isinstance(model_or_targets, nn.Module)
        else model_or_targets
    )
    n = sum(t.weight.numel() for t in targets)
    if n == 0:
        return 0.0
    total = None  # accumulated layer by layer in the weights' dtype, as the reference does
    for t in targets:
        v = constraint_sum(t.weight, float(t.scale.detach().reshape(-1)[0]), t.mode, 1.0)
        total = v if total is None else total + v.to(total.device)
    return float(total) / n


class CBP:
    """Pseudo-Lagrange multipliers and the CBP schedule for a set of quantized weights."""

    method = "cbp"  # see cbp.methods for the baselines built on this schedule

    def __init__(
        self,
        model_or_targets: nn.Module | list[QuantTarget],
        lr_lambda: float,
        *,
        lambda_optimizer: str = "adam",
        lambda_weight_decay: float | None = None,
        period_max: int = 20,
        lr_decay_g: int | None = 20,
        lr_decay_factor: float = 0.1,
        clamp: float | None = 1.0,
        init_scales: bool = True,
    ) -> None:
        if isinstance(model_or_targets, nn.Module):
            if init_scales:
                for _, m in quantized_modules(model_or_targets):
                    m.init_scale()
            self.targets = targets_of(model_or_targets)
        else:
            self.targets = list(model_or_targets)
            if init_scales:
                with torch.no_grad():
                    for t in self.targets:
                        t.scale.copy_(t.weight.detach().abs().mean().reshape(t.scale.shape))
        if not self.targets:
            raise ValueError("CBP needs at least one quantized weight (the model has none)")
        self.param_size = sum(t.weight.numel() for t in self.targets)
        self.lambdas = [torch.zeros_like(t.weight, requires_grad=True) for t in self.targets]
        kind = lambda_optimizer.lower()
        if kind == "adam":
            wd = 0.0 if lambda_weight_decay is None else lambda_weight_decay
            self.optimizer = torch.optim.Adam(self.lambdas, lr=lr_lambda, weight_decay=wd)
        elif kind == "adamw":
            wd = 0.01 if lambda_weight_decay is None else lambda_weight_decay
            self.optimizer = torch.optim.AdamW(self.lambdas, lr=lr_lambda, weight_decay=wd)
        else:
            raise ValueError(f"lambda_optimizer must be 'adam' or 'adamw', got {lambda_optimizer!r}")
        self.period_max = period_max
        self.lr_decay_g = lr_decay_g
        self.lr_decay_factor = lr_decay_factor
        self.clamp = clamp
        self.g = 1
        self.ucs = 0.0
        self.period = 0
        self.lagsum_pre = LAGSUM_INIT
        self.started = False
        self.lr_decayed = False
        self.num_updates = 0
        self._lagsum: Tensor | None = None
        self._scale_cache: tuple | None = None

    # ----------------------------------------------------------------- per batch
    def _scales(self) -> list[float]:
        """Scales as Python floats, read from the device only when a scale tensor changed."""
        key = tuple((t.scale._version, t.scale.data_ptr()) for t in self.targets)
        if self._scale_cache is None or self._scale_cache[0] != key:
            values = torch.cat([t.scale.detach().reshape(-1)[:1].float().cpu() for t in self.targets])
            self._scale_cache = (key, values.tolist())
        return self._scale_cache[1]

    def penalty(self) -> Tensor:
        """sum over layers of sum(lambda * Y(W; ucs)); gradients reach W only."""
        total = None
        # a network of many quantized weights takes the compiled kernel for every layer
        fused = True if self.param_size >= 4 * FUSED_MIN_NUMEL else None
        for t, lam, s in zip(self.targets, self.lambdas, self._scales()):
            term = lagrangian(t.weight, lam.detach(), s, t.mode, self.ucs, fused)
            total = term if total is None else total + term
        return total

    def lagrangian(self, loss: Tensor) -> Tensor:
        """The batch's Lagrangian ``loss + sum(lambda * Y(W; ucs))``, added to this epoch's
        lagsum: the one call a training step needs."""
        lag = loss + self.penalty()
        self.accumulate(lag)
        return lag

    def accumulate(self, lag: Tensor) -> None:
        """Add a batch's Lagrangian to this epoch's lagsum (no host sync).  The sum is kept in
        float32 (the Lagrangian's dtype, never less), as the reference accumulates it: its
        lambda-update decisions compare these float32 sums."""
        v = lag.detach().reshape(-1).sum()
        if v.dtype in (torch.float16, torch.bfloat16):
            v = v.float()
        self._lagsum = v if self._lagsum is None else self._lagsum + v.to(self._lagsum.device)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp latent quantized weights to [-clamp, clamp] (absolute, as the reference)."""
        if self.clamp is not None:
            for t in self.targets:
                t.weight.clamp_(-self.clamp, self.clamp)

    # ----------------------------------------------------------------- schedule
    def start(self) -> None:
        """The initial lambda update (ucs = 0); a no-op once done (e.g. after resume)."""
        if not self.started:
            self.update_lambda()
            self.started = True

    def update_lambda(self) -> None:
        """One ascent step on sum(lambda * Y(W.detach(); ucs)): lambda.grad = -Y."""
        self.optimizer.zero_grad(set_to_none=True)
        for t, lam, s in zip(self.targets, self.lambdas, self._scales()):
            lam.grad = constraint_values(t.weight, s, t.mode, self.ucs).neg_()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        D.broadcast_([lam.data for lam in self.lambdas])
        self.num_updates += 1

    def epoch_lagsum(self) -> float:
        """This epoch's lagsum summed over all ranks (and reset for the next epoch)."""
        if self._lagsum is None:
            dev = self.targets[0].weight.device
            self._lagsum = torch.zeros((), dtype=torch.float32, device=dev)
        total = self._lagsum.reshape(1).clone()
        D.all_reduce_sum(total)
        self._lagsum = None
        return float(total)

    def end_epoch(self, optimizer: torch.optim.Optimizer | None = None) -> EpochDecision:
        """After each epoch: maybe advance g/ucs, decay the weight lr once, update lambda."""
        lagsum = self.epoch_lagsum()
        compared_to = self.lagsum_pre
        self.period += 1
        decayed = False
        if lagsum >= self.lagsum_pre or self.period == self.period_max:
            self.g = next_g(self.g)
            self.ucs = ucs_of(self.g)
            if self.lr_decay_g is not None and self.g == self.lr_decay_g and not self.lr_decayed:
                if optimizer is not None:
                    for group in optimizer.param_groups:
                        group["lr"] *= self.lr_decay_factor
                self.lr_decayed = decayed = True
            self.update_lambda()
            self.lagsum_pre = LAGSUM_INIT
            self.period = 0
            updated = True
        else:
            self.lagsum_pre = lagsum
            updated = False
        return EpochDecision(updated, lagsum, self.lagsum_pre, compared_to, self.g, self.ucs, decayed)

    # ----------------------------------------------------------------- metrics
    def cfs(self) -> float:
        """Constraint-function score: sum Y(W; ucs=1) / number of quantized weights."""
        return cfs(self.targets)

    def lambda_mean(self) -> float:
        return float(sum(lam.detach().double().sum() for lam in self.lambdas) / self.param_size)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "lambdas": [lam.detach().clone() for lam in self.lambdas],
            "optimizer": self.optimizer.state_dict(),
            "g": self.g,
            "ucs": self.ucs,
            "period": self.period,
            "lagsum_pre": self.lagsum_pre,
            "started": self.started,
            "lr_decayed": self.lr_decayed,
            "num_updates": self.num_updates,
            "names": [t.name for t in self.targets],
        }

    @staticmethod
    def reference_entries(state: dict) -> dict:
        """The reference's checkpoint keys (``lamb``, ``optimizer2``, ``lagsum_pre``,
        ``period``, ``ucs``, ``g``) derived from a :meth:`state_dict` (tensors shared)."""
        return {"lamb": state["lambdas"], "optimizer2": state["optimizer"],
                "lagsum_pre": state["lagsum_pre"], "period": state["period"],
                "ucs": state["ucs"], "g": state["g"]}

    def checkpoint_entries(self) -> dict:
        """What a training checkpoint stores of the controller, each value once: the
        reference's keys (``lamb``, ``optimizer2``, ``lagsum_pre``, ``period``, ``ucs``, ``g``)
        plus the rest of the schedule under ``cbp``."""
        return {
            "lamb": [lam.detach().clone() for lam in self.lambdas],
            "optimizer2": self.optimizer.state_dict(),
            "lagsum_pre": self.lagsum_pre,
            "period": self.period,
            "ucs": self.ucs,
            "g": self.g,
            "cbp": {
                "started": self.started,
                "lr_decayed": self.lr_decayed,
                "num_updates": self.num_updates,
                "names": [t.name for t in self.targets],
            },
        }

    def load_checkpoint_entries(self, state: dict) -> None:
        """Restore from :meth:`checkpoint_entries` (or an older checkpoint holding the whole
        :meth:`state_dict` under ``cbp``, or the reference's keys alone)."""
        inner = state.get("cbp") or {}
        if "lambdas" in inner:
            self.load_state_dict(inner)
            return
        self.load_state_dict({
            "lambdas": state["lamb"], "optimizer": state["optimizer2"], "g": state["g"],
            "ucs": state["ucs"], "period": state["period"],
            "lagsum_pre": state.get("lagsum_pre", LAGSUM_INIT), "started": True, **inner})

    def load_state_dict(self, state: dict) -> None:
        lams = state["lambdas"]
        if len(lams) != len(self.lambdas):
            raise ValueError(f"CBP state has {len(lams)} multipliers, model has {len(self.lambdas)}")
        for lam, src, t in zip(self.lambdas, lams, self.targets):
            if lam.shape != src.shape:
                raise ValueError(
                    f"multiplier for {t.name}: shape {tuple(src.shape)} != {tuple(lam.shape)}"
                )
        with torch.no_grad():
            for lam, src in zip(self.lambdas, lams):
                lam.copy_(src)
        self.optimizer.load_state_dict(state["optimizer"])
        self.g = int(state["g"])
        self.ucs = float(state["ucs"])
        self.period = int(state["period"])
        self.lagsum_pre = float(state["lagsum_pre"])
        self.started = bool(state.get("started", True))
        self.lr_decayed = bool(state.get("lr_decayed", self.g >= (self.lr_decay_g or 10**9)))
        self.num_updates = int(state.get("num_updates", 0))
        self._lagsum = None
