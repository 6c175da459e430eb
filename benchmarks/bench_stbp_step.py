"""A full STBP CBP training step vs the same step written like the reference, side by side.

Both steps train the quantized 7Conv,3FC network (binary weights by default) from the same
weights on the same batch: forward, MSE on the one-hot label, Lagrangian sum(lambda * Y(W)),
backward, gradient clip, SGD step, latent clamp.  The baseline (``benchmarks/baseline.py``)
runs time-major, recomputes the input convolution and quantizes every weight at every step,
and evaluates the constraint with per-level masks; ours is ``Q_Conv_SNN`` + ``cbp.CBP``.
Repetitions alternate between the two, and the medians are compared.

    python benchmarks/bench_stbp_step.py                      # paper width, batch 4, T 4, CPU
    python benchmarks/bench_stbp_step.py --device cuda --batch 50 --T 8
    python benchmarks/bench_stbp_step.py --profile            # also print our step's top ops
    python benchmarks/bench_stbp_step.py --channels-last      # ours in channels_last format
    python benchmarks/bench_stbp_step.py --reference-dir ../CBP-QSNN/CBP-QSNNs/CBP-QSNN-STBP

``--reference-dir`` also times the authors' own training step, imported from a checkout of
their STBP folder (``q_model.py``, ``q_module.py``, ``functions.py``; paper width only), on the
same weights, multipliers and batch, so that the reference-style baseline can be checked
against it.  Their modules move every tensor to CUDA unconditionally; on a CPU run that move
returns the tensor itself while their code runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import os
import platform
import statistics
import sys
import time
from unittest import mock

import torch

import cbp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "CBP-QSNN-STBP"))
sys.path.insert(0, HERE)
import baseline  # noqa: E402


def build(width: float, T: int, mode: str, device: torch.device, channels_last: bool = False):
    """(our step, the reference-style step, our network, its controller): two copies of one
    quantized network (ours in ``channels_last`` memory format when asked)."""
    import engine
    from q_model import Q_Conv_SNN

    torch.manual_seed(0)
    ours = Q_Conv_SNN(10, 0.25, 0.5, 0.5, None, T, mode, width).to(device)
    ctl = cbp.CBP(ours, 5e-4)
    ctl.start()
    ctl.end_epoch()  # ucs = 0.5: the window is active
    with torch.no_grad():  # some multipliers > 0 everywhere, as after a few lambda updates
        for lam in ctl.lambdas:
            lam.uniform_(0.0, 1e-3)
    ref = copy.deepcopy(ours)
    if channels_last:
        ours.to(memory_format=torch.channels_last)
    lambdas = [lam.detach().clone() for lam in ctl.lambdas]
    groups = cbp.param_groups(ours)
    opt = torch.optim.SGD([{"params": v} for v in groups.values()], lr=5e-3, momentum=0.9)
    ref_groups = cbp.param_groups(ref)
    ref_opt = torch.optim.SGD([{"params": v} for v in ref_groups.values()], lr=5e-3,
                              momentum=0.9)

    def step_ours(x, y):
        opt.zero_grad()
        lag = ctl.lagrangian(engine.mse_onehot(ours(x), y, 10))
        lag.backward()
        cbp.clip_gradients(ours.parameters(), 1.0)
        opt.step()
        ctl.clamp_()

    def step_ref(x, y):
        baseline.stbp_reference_step(ref, ref_opt, lambdas, ctl.ucs, x, y, 10)

    step_ref.model = ref
    return step_ours, step_ref, ours, ctl


REFERENCE_MODULES = ("functions", "q_module", "q_model")


@contextlib.contextmanager
def _foreign_modules(folder: str):
    """Import modules from ``folder`` under names our STBP folder also uses (``functions``,
    ``q_model``): ours are set aside meanwhile and put back afterwards."""
    saved = {n: sys.modules.pop(n) for n in REFERENCE_MODULES if n in sys.modules}
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path.remove(folder)
        for n in REFERENCE_MODULES:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


def _itself(tensor, *args, **kwargs):
    return tensor


def _cuda_as_noop(active: bool):
    """While active, moving a tensor to CUDA returns the tensor itself: the reference's modules
    do that unconditionally, so on a CPU their code runs only with this in place."""
    if not active:
        return contextlib.nullcontext()
    return mock.patch.object(torch.Tensor, "cuda", _itself)


def reference_step(folder: str, ours, lambdas: list, ucs: float, batch: int, T: int, mode: str,
                   device: torch.device):
    """The authors' own STBP CBP training step (their model, quantizer and constraint from
    ``folder``), started from ``ours``' weights and the same multipliers and ``ucs``; their
    network is the returned function's ``model``."""
    missing = [f"{n}.py" for n in REFERENCE_MODULES
               if not os.path.isfile(os.path.join(folder, f"{n}.py"))]
    if missing:
        raise SystemExit(f"error: --reference-dir {folder} lacks {', '.join(missing)}: give the "
                         "reference's CBP-QSNN-STBP folder")
    on_cpu = device.type == "cpu"
    with _foreign_modules(os.path.abspath(folder)), _cuda_as_noop(on_cpu):
        rq = importlib.import_module("q_model")
        rm = importlib.import_module("q_module")
        model = rq.Q_Conv_SNN(ours.outs, ours.decay, ours.thresh, ours.lens, batch, T, mode)
    theirs = model.state_dict()
    try:
        model.load_state_dict({k: v for k, v in ours.state_dict().items() if k in theirs})
    except RuntimeError:
        raise SystemExit("error: --reference-dir runs the reference's paper-width network only: "
                         "use --width 1") from None
    model.to(device)
    qmods = [m for m in model.modules() if isinstance(m, (rm.QConv2d, rm.QLinear))]
    lams = [lam.detach().clone().to(device) for lam in lambdas]
    opt = torch.optim.SGD([{"params": [m.weight for m in qmods]},
                           {"params": [p for n, p in model.named_parameters()
                                       if not any(p is m.weight for m in qmods)]}],
                          lr=5e-3, momentum=0.9)
    mse = torch.nn.MSELoss()

    def step(x, y):
        with _cuda_as_noop(on_cpu):
            one_step(x, y)

    def one_step(x, y):
        opt.zero_grad()
        out = model(x)
        onehot = torch.zeros(batch, ours.outs).scatter_(1, y.view(-1, 1).cpu(), 1)
        const = sum((rm.constraint.apply(m.weight, m.scale, m.factor, m.b, ucs) * lam).sum()
                    for m, lam in zip(qmods, lams))
        lag = mse(out.cpu(), onehot) + const.cpu()
        lag.backward(retain_graph=True)
        torch.nn.utils.clip_grad_value_(model.parameters(), 1)
        opt.step()
        with torch.no_grad():
            for m in qmods:
                m.weight.clamp_(-1, 1)

    step.model = model
    return step


def measure(steps: dict, x, y, repeat: int, sync) -> dict[str, float]:
    """Median seconds per step of each of ``steps`` (name -> step) over ``repeat`` alternating
    repetitions after one warm-up each."""
    for fn in steps.values():
        fn(x, y)
    sync()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeat):
        for k, fn in steps.items():
            t = time.perf_counter()
            fn(x, y)
            sync()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--mode", default="bin", choices=["bin", "ter"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--profile", action="store_true", help="print our step's top operators")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's default)")
    p.add_argument("--reference-dir", default=None, metavar="DIR",
                   help="also time the authors' own step from their CBP-QSNN-STBP folder")
    p.add_argument("--channels-last", action="store_true",
                   help="run our network and its input in channels_last memory format")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda requested but CUDA is not available")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
               f"threads, torch {torch.__version__}")
    if device.type == "cuda":
        machine += f", {torch.cuda.get_device_name(device)}"
    step_ours, step_ref, ours_model, ctl = build(args.width, args.T, args.mode, device,
                                                 args.channels_last)
    steps = {"baseline": step_ref, "ours": step_ours}
    if args.reference_dir:
        steps["reference"] = reference_step(args.reference_dir, ours_model, ctl.lambdas,
                                            ctl.ucs, args.batch, args.T, args.mode, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    med = measure(steps, x, y, args.repeat, sync)
    base, ours = med["baseline"], med["ours"]
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            step_ours(x, y)
            sync()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(f"machine: {machine}")
    print("| benchmark | baseline (s) | ours (s) | ratio |")
    print("|---|---|---|---|")
    name = (f"STBP CBP train step width {args.width:g}, batch {args.batch}, T {args.T}, "
            f"{args.mode}, {device.type}: reference-style vs ours")
    print(f"| {name} | {base:.3f} | {ours:.3f} | {base / ours:.1f}x faster |")
    if "reference" in med:
        ref = med["reference"]
        print(f"| {name.replace('reference-style', 'the reference')} | {ref:.3f} | {ours:.3f} "
              f"| {ref / ours:.1f}x faster |")
        print(f"| {name.replace('reference-style vs ours', 'the reference vs reference-style')}"
              f" | {ref:.3f} | {base:.3f} | {ref / base:.2f}x |")


if __name__ == "__main__":
    main()
