"""Small helpers for running under ``torch.distributed`` (all no-ops in a single process)."""

from __future__ import annotations

import builtins
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .errors import RankError, UserError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks in place (returns ``t``)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Make every tensor equal to rank ``src``'s copy."""
    if is_distributed():
        for t in tensors:
            dist.broadcast(t, src=src)


def init_from_env(backend: str | None = None, device: torch.device | str | None = None,
                  init_method: str = "env://", quiet: bool = True) -> bool:
    """Join the process group that torchrun / ``torch.distributed.launch --use_env`` describe.

    Returns True when running distributed.  The backend defaults to NCCL when the run is on
    CUDA (``device`` if given, else CUDA availability; each rank then takes the GPU of its
    LOCAL_RANK) and gloo otherwise.  ``quiet``: only rank 0 prints to stdout.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if not dist.is_initialized():
        if backend is None:
            on_cuda = torch.cuda.is_available() and (
                device is None or torch.device(device).type == "cuda")
            backend = "nccl" if on_cuda else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend=backend, init_method=init_method)
    if quiet:
        quiet_other_ranks()
    return is_distributed()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def quiet_other_ranks() -> None:
    """Only rank 0 prints to stdout; every rank still prints to stderr (errors, warnings)."""
    if rank() == 0:
        return
    _print = builtins.print

    def _quiet(*a, **k):
        if k.get("file") is sys.stderr:
            _print(*a, **k)

    builtins.print = _quiet


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def agree(error: BaseException | None) -> None:
    """A collective check-point: every rank says whether it failed.  If one did, every rank
    stops: the failing rank re-raises its own error, the others raise :class:`RankError` with
    ``rank N: <its message>`` (instead of hanging at, or crashing in, the next collective).
    Single process: re-raises ``error`` if given."""
    if not is_distributed():
        if error is not None:
            raise error
        return
    mine = None
    if error is not None:
        mine = _line(error) if isinstance(error, UserError) else \
            f"{type(error).__name__}: {_line(error)}"
    messages: list[str | None] = [None] * world_size()
    try:
        dist.all_gather_object(messages, mine)
    except RuntimeError:  # a peer is already gone: its own line says why
        if error is not None:
            raise error from None
        raise RankError("another rank stopped (its error line says why)") from None
    first = next(r for r, text in enumerate(messages) if text is not None) \
        if any(m is not None for m in messages) else None
    if first is None:
        return
    # every rank prints its line now, before any of them exits (the launcher stops the others
    # as soon as one process ends)
    if error is not None and not isinstance(error, UserError):
        _report(error, None)  # a bug on this rank: its traceback is the report
        raise error
    exc = error if error is not None else RankError(f"rank {first}: {messages[first]}")
    _report(exc, _line(exc))
    raise exc


def _report(exc: BaseException, line: str | None) -> None:
    """Print ``error: line`` now (run_main will not print it again), then wait until every rank
    has printed."""
    if line is not None:
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), f"error: {line}\n".encode())  # one write: lines of
        exc.reported = True  # several processes sharing stderr do not interleave
    try:
        dist.barrier()
    except RuntimeError:
        pass


class collective:  # noqa: N801 - used as a context manager
    """``with collective(): ...`` runs the block on every rank, then :func:`agree` on whether
    it raised, so an error on one rank ends every rank with that rank's message."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is not None and not isinstance(exc, Exception):
            return False  # KeyboardInterrupt, SystemExit: not caught
        agree(exc)
        return False


def first_then_others(fn):
    """Run ``fn`` on rank 0 first (e.g. to build a cache), then on the other ranks; an error
    on either side ends every rank (see :func:`agree`)."""
    out, error = None, None
    if is_main_process():
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - handed to every rank
            error = exc
        agree(error)
        agree(None)
        return out
    agree(None)
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001
        error = exc
    agree(error)
    return out


def shard_indices(n: int) -> list[int]:
    """This rank's share of ``range(n)`` for evaluation (every sample once over all ranks, no
    padding, unlike ``DistributedSampler``)."""
    return list(range(rank(), n, world_size()))


def sum_over_ranks(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    all_reduce_sum(t)
    return t.tolist()


def start(choose_device, device_flag: str | None = None) -> torch.device:
    """A training script's first step: join the process group when started by torchrun, then
    ``choose_device()`` (an error on any rank ends every rank); under torchrun on CUDA each
    rank takes the GPU of its LOCAL_RANK."""
    init_from_env(device=device_flag if device_flag not in (None, "", "auto") else None)
    with collective():
        device = choose_device()
        if is_distributed() and device.type == "cuda":
            device = torch.device("cuda", local_rank())
    return device


def split_loaders(train, test, seed: int = 0):
    """Under torch.distributed: each rank trains on its ``DistributedSampler`` share and tests on
    every world-size-th sample (the loaders are returned unchanged otherwise)."""
    if not is_distributed():
        return train, test
    def kw(loader):
        return {"batch_size": loader.batch_size, "num_workers": loader.num_workers,
                "pin_memory": loader.pin_memory, "collate_fn": loader.collate_fn}

    train = DataLoader(train.dataset, sampler=DistributedSampler(train.dataset, seed=seed),
                       drop_last=train.drop_last, **kw(train))
    test = DataLoader(Subset(test.dataset, shard_indices(len(test.dataset))), shuffle=False,
                      **kw(test))
    return train, test


def set_epoch(loader, epoch: int) -> None:
    """Reshuffle a loader's ``DistributedSampler`` for ``epoch`` (no-op otherwise)."""
    if isinstance(getattr(loader, "sampler", None), DistributedSampler):
        loader.sampler.set_epoch(epoch)


def ddp(model: torch.nn.Module) -> torch.nn.Module:
    """The model as trained: DDP under torch.distributed, the model itself otherwise."""
    if not is_distributed():
        return model
    dev = next(model.parameters()).device
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[dev.index] if dev.type == "cuda" else None)
