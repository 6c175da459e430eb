"""Two-process (gloo) CBP training: lagsum is all-reduced and lambda stays identical."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import cbp

WORLD = 2
EPOCHS = 6
BATCHES = 3


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same model on every rank
        model = nn.Sequential(
            nn.Linear(4, 8), nn.Tanh(), cbp.QLinear(8, 8, bias=True, mode="ter"), nn.Tanh(),
            nn.Linear(8, 2),
        )
        ddp = DDP(model)
        opt = torch.optim.SGD(
            [{"params": v} for v in cbp.param_groups(model).values()], lr=0.05, momentum=0.9
        )
        c = cbp.CBP(ddp, 0.05, period_max=2)
        c.start()
        gen = torch.Generator().manual_seed(1000 + rank)  # different data on each rank
        decisions, local_sums = [], []
        for _ in range(EPOCHS):
            local = torch.zeros((), dtype=torch.float32)
            for _ in range(BATCHES):
                x = torch.randn(16, 4, generator=gen) * (1 + rank)
                y = torch.randint(0, 2, (16,), generator=gen)
                opt.zero_grad()
                lag = F.cross_entropy(ddp(x), y) + c.penalty()
                c.accumulate(lag)
                local += lag.detach().reshape(-1).sum()  # float32, as the controller
                lag.backward()
                cbp.clip_gradients(model.parameters(), 1)
                opt.step()
                c.clamp_()
            d = c.end_epoch(opt)
            decisions.append((d.updated, d.lagsum, d.lagsum_pre, d.g, d.ucs, d.lr_decayed))
            local_sums.append(float(local))
        final_lambdas = [lam.detach().clone() for lam in c.lambdas]
        final_weights = {k: v.clone() for k, v in model.state_dict().items()}
        # Make the ranks' weights differ on purpose: one more multiplier update must still
        # leave every rank with the same multipliers.
        with torch.no_grad():
            model[2].weight.add_(0.3 * rank)
        c.update_lambda()
        torch.save(
            {
                "lambdas": final_lambdas,
                "lambdas_after_divergence": [lam.detach().clone() for lam in c.lambdas],
                "qweight_after_divergence": model[2].weight.detach().clone(),
                "g": c.g,
                "ucs": c.ucs,
                "num_updates": c.num_updates,
                "decisions": decisions,
                "local_sums": local_sums,
                "weights": final_weights,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_two_rank_training_stays_in_sync(tmp_path):
    init_file = str(tmp_path / "rendezvous")
    mp.spawn(_worker, args=(WORLD, init_file, str(tmp_path)), nprocs=WORLD, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)

    # the ranks really saw different data
    assert all(a != b for a, b in zip(r0["local_sums"], r1["local_sums"]))

    # one schedule, decided on the global lagsum
    assert r0["decisions"] == r1["decisions"]
    for (_, lagsum, *_), a, b in zip(r0["decisions"], r0["local_sums"], r1["local_sums"]):
        assert lagsum == float(torch.tensor(a) + torch.tensor(b))  # float32 all-reduce

    assert r0["g"] == r1["g"] and r0["ucs"] == r1["ucs"]
    assert r0["num_updates"] == r1["num_updates"] >= 2  # start() plus at least one update
    assert r0["g"] > 1 and any(d[0] for d in r0["decisions"])

    assert len(r0["lambdas"]) == len(r1["lambdas"]) == 1
    for a, b in zip(r0["lambdas"], r1["lambdas"]):
        assert torch.equal(a, b)
        assert (a > 0).any()
    assert r0["weights"].keys() == r1["weights"].keys()
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k

    # lambda is kept identical across ranks even when their weights disagree
    assert not torch.equal(r0["qweight_after_divergence"], r1["qweight_after_divergence"])
    for a, b, before in zip(
        r0["lambdas_after_divergence"], r1["lambdas_after_divergence"], r0["lambdas"]
    ):
        assert torch.equal(a, b)
        assert not torch.equal(a, before)


def test_run_main_leaves_the_process_group_on_every_exit(tmp_path):
    """Success, a user error and a bug: the process group is destroyed each time (a rank that
    exits with its group alive can abort in the collective library's threads)."""
    from cbp.errors import UserError
    from cbp.runtime import run_main

    def fail_with(exc):
        def main():
            raise exc
        return main

    outcomes = []
    for n, main in enumerate((lambda: None, fail_with(UserError("x")), fail_with(KeyError("k")))):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init{n}", rank=0,
                                world_size=1)
        try:
            run_main(main)
            outcomes.append("ok")
        except SystemExit as exc:
            outcomes.append(exc.code)
        except KeyError:
            outcomes.append("bug")
        outcomes.append(dist.is_initialized())
    assert outcomes == ["ok", False, 1, False, "bug", False]
