"""The CBP controller: Algorithm 1's schedule as a state machine, lambda updates and state."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cbp
from cbp.controller import LAGSUM_INIT

LR = 0.1
LR_LAMBDA = 1e-2


def make(seed: int = 0, mode: str = "ter", out: int = 8, **kw):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), cbp.QLinear(8, out, bias=True, mode=mode), nn.Linear(out, 2))
    groups = cbp.param_groups(model)
    opt = torch.optim.SGD(
        [{"params": ps, "name": name} for name, ps in groups.items()], lr=LR, momentum=0.9
    )
    c = cbp.CBP(model, LR_LAMBDA, **kw)
    return model, opt, c


def feed(c, opt, *values):
    for v in values:
        c.accumulate(torch.tensor(v))
    return c.end_epoch(opt)


def lrs(opt):
    return [g["lr"] for g in opt.param_groups]


# ----------------------------------------------------------------------------- schedule


def test_g_sequence_ucs_and_single_lr_decay():
    _, opt, c = make(period_max=1000)
    c.start()
    assert (c.g, c.ucs) == (1, 0.0)
    expected_g = [2, 3, 4, 5, 6, 7, 8, 9, 10, 20, 30, 40]
    seen = []
    for k, g in enumerate(expected_g):
        d0 = feed(c, opt, 1.0)  # first epoch of a pair: lagsum 1 < 1e10 -> no update
        assert not d0.updated and d0.lagsum_pre == 1.0 and not d0.lr_decayed
        d = feed(c, opt, 1.0)  # equal lagsum -> update
        assert d.updated
        assert d.g == c.g == g
        assert d.ucs == c.ucs == 1.0 - 1.0 / g
        assert d.lagsum_pre == LAGSUM_INIT == c.lagsum_pre
        seen.append(d.lr_decayed)
        want_lr = LR * 0.1 if g >= 20 else LR
        assert lrs(opt) == [want_lr] * 3, (k, g)
    assert seen == [g == 20 for g in expected_g]
    assert c.lr_decayed
    assert c.num_updates == 1 + len(expected_g)
    assert c.ucs == pytest.approx(0.975)
    assert [cbp.next_g(g) for g in (1, 9, 10, 20, 90)] == [2, 10, 20, 30, 100]
    assert cbp.ucs_of(1) == 0.0 and cbp.ucs_of(4) == 0.75


def test_lagsum_trigger():
    _, opt, c = make(period_max=1000)
    c.start()
    for v, pre in [(5.0, 5.0), (4.0, 4.0), (3.0, 3.0)]:
        d = feed(c, opt, v)
        assert not d.updated and d.lagsum == v and d.lagsum_pre == pre == c.lagsum_pre
        assert c.g == 1
    d = feed(c, opt, 3.0)  # not a decrease: >= triggers
    assert d.updated and c.g == 2 and c.lagsum_pre == LAGSUM_INIT and c.period == 0
    d = feed(c, opt, 1e9)  # compared with 1e10: never triggers right after an update
    assert not d.updated and c.g == 2 and c.lagsum_pre == 1e9
    d = feed(c, opt, 1e9 + 128)  # increase triggers (float32 spacing at 1e9 is 64)
    assert d.updated and c.g == 3


def test_lagsum_sums_batches_and_resets():
    _, opt, c = make(period_max=1000)
    d = feed(c, opt, 1.5, 2.25, 0.125)
    assert d.lagsum == 3.875 and c.lagsum_pre == 3.875
    d = c.end_epoch(opt)  # no batches: lagsum 0
    assert d.lagsum == 0.0 and not d.updated
    c.accumulate(torch.tensor([0.5, 0.25]))  # a (1,)-shaped or batched loss is summed
    assert c.end_epoch(opt).lagsum == 0.75


def test_lagsum_is_float32_like_the_reference_so_ties_decide_alike():
    """Epoch 1's batches 1 and 1e-8 sum to 1.0 in float32 (1.00000001 in float64); epoch 2
    sums to 1.0.  The reference accumulates in float32, sees a tie (>=) and updates lambda; a
    float64 lagsum would see a decrease and not update."""
    _, opt, c = make(period_max=1000)
    c.start()
    d = feed(c, opt, 1.0, 1e-8)
    assert not d.updated and d.lagsum == 1.0
    d = feed(c, opt, 1.0)
    assert d.updated and d.compared_to == 1.0 and c.g == 2
    # a float16 / bfloat16 Lagrangian (AMP) is accumulated in float32
    c.accumulate(torch.tensor(2048.0, dtype=torch.float16))
    c.accumulate(torch.tensor(1.0, dtype=torch.bfloat16))
    assert c.end_epoch(opt).lagsum == 2049.0


@pytest.mark.parametrize("period_max", [3, 20])
def test_period_trigger(period_max):
    _, opt, c = make(period_max=period_max)
    assert c.period_max == period_max
    c.start()
    value = 1000.0
    for cycle in range(2):
        for p in range(1, period_max + 1):
            value -= 1.0  # strictly decreasing: only the period can trigger
            d = feed(c, opt, value)
            if p < period_max:
                assert not d.updated and c.period == p
            else:
                assert d.updated and c.period == 0 and c.lagsum_pre == LAGSUM_INIT
        assert c.g == 2 + cycle


def test_default_period_max_is_20():
    _, _, c = make()
    assert c.period_max == 20


def test_lagsum_update_resets_period():
    _, opt, c = make(period_max=3)
    feed(c, opt, 10.0)
    assert feed(c, opt, 10.0).updated and c.period == 0
    assert not feed(c, opt, 9.0).updated
    assert not feed(c, opt, 8.0).updated
    assert feed(c, opt, 7.0).updated  # third epoch after the reset


# ----------------------------------------------------------------------------- lambda


def set_hand_weights(model):
    q = model[1]
    with torch.no_grad():
        q.weight.fill_(0.25)  # inside [-s, s]: free at ucs = 0
        q.weight[0, 0] = 0.75  # Y = 0.5
        q.weight[0, 1] = -1.0  # Y = 1.0
        q.weight[0, 2] = 0.5  # on the top level: Y = 0
        q.weight[0, 3] = -0.5  # on the bottom level: Y = 0
        q.weight[0, 4] = 0.5 + 2.0**-10  # Y = 2**-9
        q.weight[3, 3] = -0.375  # interior, not on a level: masked at ucs = 0
        q.scale.fill_(0.5)


def test_initial_lambda_update_only_outside_range():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), cbp.QLinear(8, 8, bias=True, mode="ter"), nn.Linear(8, 2))
    set_hand_weights(model)
    c = cbp.CBP(model, LR_LAMBDA, init_scales=False)
    assert c.targets[0].scale.item() == 0.5
    lam = c.lambdas[0]
    assert lam.shape == model[1].weight.shape and torch.equal(lam, torch.zeros(8, 8))
    assert not c.started
    c.start()
    assert c.started and c.g == 1 and c.ucs == 0.0 and c.num_updates == 1
    changed = torch.zeros(8, 8, dtype=torch.bool)
    changed[0, 0] = changed[0, 1] = changed[0, 4] = True
    assert torch.equal(lam.detach() != 0, changed)
    # Adam's first step moves each element with Y > 0 by lr * Y / (|Y| + eps) ~ lr
    assert lam[0, 0].item() == pytest.approx(LR_LAMBDA, rel=1e-6)
    assert lam[0, 1].item() == pytest.approx(LR_LAMBDA, rel=1e-6)
    assert lam[0, 4].item() == pytest.approx(LR_LAMBDA, rel=1e-4)
    assert c.lambda_mean() == pytest.approx(3 * LR_LAMBDA / 64, rel=1e-4)
    snapshot = lam.detach().clone()
    c.start()  # second call is a no-op
    assert torch.equal(lam.detach(), snapshot)
    assert c.num_updates == 1
    assert int(c.optimizer.state[lam]["step"]) == 1


def test_constructor_sets_scales_to_mean_abs_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), cbp.QLinear(8, 8, mode="ter"), nn.Linear(8, 2))
    with torch.no_grad():
        model[1].weight.fill_(0.125)
        model[1].weight[:4] = -0.375  # mean |W| = (32 * 0.125 + 32 * 0.375) / 64 = 0.25
        model[1].scale.fill_(9.0)
    cbp.CBP(model, LR_LAMBDA)
    assert model[1].scale.item() == 0.25
    assert model[1].scale.requires_grad is False


def test_lambda_never_decreases_and_keeps_shape():
    model, opt, c = make(period_max=1, seed=3)
    c.start()
    lam = c.lambdas[0]
    gen = torch.Generator().manual_seed(5)
    s = c.targets[0].scale.item()
    grew = 0
    for _ in range(15):
        with torch.no_grad():
            model[1].weight.add_(torch.randn(model[1].weight.shape, generator=gen) * s)
        before = lam.detach().clone()
        assert feed(c, opt, 1.0).updated  # period_max = 1: every epoch updates
        assert lam.shape == model[1].weight.shape
        assert (lam.detach() >= before).all()
        grew += int((lam.detach() > before).any())
    assert grew == 15
    assert c.g == 70 and c.lambda_mean() > 0
    assert c.lambda_mean() == pytest.approx(float(lam.detach().double().sum()) / 64, rel=1e-12)


def test_cfs_hand_value():
    model = nn.Sequential(cbp.QLinear(2, 2, mode="ter"), cbp.QLinear(2, 1, mode="bin"))
    c = cbp.CBP(model, LR_LAMBDA, init_scales=False)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.125, -0.375], [0.75, 0.25]]))
        model[0].scale.fill_(0.5)
        model[1].weight.copy_(torch.tensor([[0.25, -1.0]]))
        model[1].scale.fill_(0.5)
    # ucs = 1: ter -> 0.25 + 0.25 + 0.5 + 0.5 = 1.5; bin -> 0.5 + 1.0 = 1.5; 6 weights
    assert c.param_size == 6
    assert c.cfs() == 0.5
    c.ucs = 0.0  # the metric ignores the current window
    assert c.cfs() == 0.5
    # equals the hand formula via constraint()
    manual = sum(float(cbp.constraint(m.weight.detach(), m.scale, m.mode, 1.0).sum()) for m in model) / 6
    assert c.cfs() == pytest.approx(manual)


def test_penalty_is_lambda_weighted_constraint():
    model, _, c = make(seed=1)
    with torch.no_grad():
        c.lambdas[0].copy_(torch.rand(8, 8))
    c.ucs = 0.5
    w = model[1].weight
    pen = c.penalty()
    want = (c.lambdas[0].detach() * cbp.constraint(w, model[1].scale, "ter", 0.5)).sum()
    assert pen.item() == pytest.approx(want.item(), rel=1e-5)
    pen.backward()
    assert w.grad is not None and c.lambdas[0].grad is None


def test_clamp_only_touches_quantized_weights():
    model, _, c = make()
    with torch.no_grad():
        model[1].weight[0, 0] = 3.0
        model[1].weight[0, 1] = -2.0
        model[0].weight[0, 0] = 5.0
    c.clamp_()
    assert model[1].weight[0, 0].item() == 1.0 and model[1].weight[0, 1].item() == -1.0
    assert model[0].weight[0, 0].item() == 5.0


def test_clip_gradients_clamps_each_element():
    p = nn.Parameter(torch.zeros(4))
    q = nn.Parameter(torch.zeros(2))  # no grad: skipped
    p.grad = torch.tensor([-3.0, -0.5, 0.25, 7.0])
    cbp.clip_gradients([p, q], 1.0)
    assert torch.equal(p.grad, torch.tensor([-1.0, -0.5, 0.25, 1.0]))
    assert q.grad is None


# ----------------------------------------------------------------------------- param groups


def test_param_groups():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), cbp.QLinear(8, 8, bias=True, mode="ter"), nn.Linear(8, 2)
    )
    groups = cbp.param_groups(model)
    assert set(groups) == {"qweight", "nqweight", "otherparam"}
    ids = {k: [id(p) for p in v] for k, v in groups.items()}
    assert ids["qweight"] == [id(model[2].weight)]
    assert ids["nqweight"] == [id(model[0].weight), id(model[3].weight)]
    assert ids["otherparam"] == [
        id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[2].bias), id(model[3].bias)
    ]
    everything = [i for v in ids.values() for i in v]
    assert id(model[2].scale) not in everything
    assert len(everything) == len(set(everything)) == sum(1 for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- state


def drive(model, opt, c, gen, steps):
    """Random weight moves between epochs; lagsums 2, 1, 2, 1, ... so updates happen."""
    for k in range(steps):
        with torch.no_grad():
            model[1].weight.add_(torch.randn(model[1].weight.shape, generator=gen) * 0.05)
        feed(c, opt, 1.0 if k % 2 else 2.0)


def test_state_dict_round_trip():
    model, opt, c = make(period_max=3, seed=0)
    c.start()
    gen = torch.Generator().manual_seed(0)
    drive(model, opt, c, gen, 20)
    while c.g < 20:
        feed(c, opt, 1.0)
    assert c.lr_decayed
    d = feed(c, opt, 5.0)  # leave a finite lagsum_pre and period 1
    assert not d.updated and c.period == 1 and c.lagsum_pre == 5.0

    buf = io.BytesIO()
    torch.save(c.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    model2, opt2, c2 = make(period_max=3, seed=1)
    model2.load_state_dict(model.state_dict())
    assert not c2.started and not c2.lr_decayed
    c2.load_state_dict(state)
    assert torch.equal(c2.lambdas[0].detach(), c.lambdas[0].detach())
    assert c2.lambdas[0].requires_grad
    for attr in ("g", "ucs", "period", "lagsum_pre", "lr_decayed", "started", "num_updates"):
        assert getattr(c2, attr) == getattr(c, attr), attr
    s1 = c.optimizer.state[c.lambdas[0]]
    s2 = c2.optimizer.state[c2.lambdas[0]]
    assert set(s1) == set(s2)
    for k in s1:
        assert torch.equal(torch.as_tensor(s1[k]), torch.as_tensor(s2[k])), k
    assert c2.optimizer.param_groups[0]["lr"] == c.optimizer.param_groups[0]["lr"]

    c2.start()  # already started: no-op
    assert torch.equal(c2.lambdas[0].detach(), c.lambdas[0].detach())
    # the same next update gives the same multipliers (optimizer moments were restored)
    d1, d2 = feed(c, opt, 6.0), feed(c2, opt2, 6.0)
    assert d1.updated and d2.updated
    assert torch.equal(c2.lambdas[0].detach(), c.lambdas[0].detach())
    assert d1 == d2


def test_load_state_dict_rejects_mismatch():
    _, _, c = make(out=8)
    _, _, other = make(out=4)
    with pytest.raises(ValueError):
        other.load_state_dict(c.state_dict())
    torch.manual_seed(0)
    two = nn.Sequential(cbp.QLinear(8, 8), cbp.QLinear(8, 8))
    with pytest.raises(ValueError):
        cbp.CBP(two, LR_LAMBDA).load_state_dict(c.state_dict())


# ----------------------------------------------------------------------------- resume


def build_run(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.Tanh(), cbp.QLinear(8, 8, bias=True, mode="ter"), nn.Tanh(), nn.Linear(8, 2)
    )
    groups = cbp.param_groups(model)
    opt = torch.optim.SGD([{"params": v} for v in groups.values()], lr=0.05, momentum=0.9)
    c = cbp.CBP(model, 0.05, period_max=2)
    return model, opt, c


def batches():
    gen = torch.Generator().manual_seed(42)
    return [
        (torch.randn(16, 4, generator=gen), torch.randint(0, 2, (16,), generator=gen))
        for _ in range(4)
    ]


def train(model, opt, c, epochs):
    decisions = []
    data = batches()
    for _ in range(epochs):
        for x, y in data:
            opt.zero_grad()
            lag = F.cross_entropy(model(x), y) + c.penalty()
            c.accumulate(lag)
            lag.backward()
            cbp.clip_gradients(model.parameters(), 1)
            opt.step()
            c.clamp_()
        decisions.append(c.end_epoch(opt))
    return decisions


def test_resume_equivalence(tmp_path):
    model, opt, c = build_run(0)
    c.start()
    full = train(model, opt, c, 6)
    assert sum(d.updated for d in full[3:]) >= 1 and c.g > 2

    model_a, opt_a, c_a = build_run(0)
    c_a.start()
    first = train(model_a, opt_a, c_a, 3)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model_a.state_dict(), "optimizer": opt_a.state_dict(), "cbp": c_a.state_dict()}, path)
    del model_a, opt_a, c_a

    model_b, opt_b, c_b = build_run(123)  # different init: everything must come from the file
    ckpt = torch.load(path, weights_only=True)
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["optimizer"])
    c_b.load_state_dict(ckpt["cbp"])
    c_b.start()  # no-op after resume
    second = train(model_b, opt_b, c_b, 3)

    assert first + second == full
    assert torch.equal(c_b.lambdas[0].detach(), c.lambdas[0].detach())
    assert (c_b.g, c_b.ucs, c_b.period, c_b.lagsum_pre) == (c.g, c.ucs, c.period, c.lagsum_pre)
    sd, sd_b = model.state_dict(), model_b.state_dict()
    assert sd.keys() == sd_b.keys()
    for k in sd:
        assert torch.equal(sd[k], sd_b[k]), k


# ----------------------------------------------------------------------------- options / errors


@pytest.mark.parametrize("name", ["adamw", "AdamW"])
def test_adamw_lambda_optimizer(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), cbp.QLinear(8, 8, mode="ter"), nn.Linear(8, 2))
    set_hand_weights(model)
    c = cbp.CBP(model, LR_LAMBDA, lambda_optimizer=name, init_scales=False)
    assert isinstance(c.optimizer, torch.optim.AdamW)
    assert c.optimizer.param_groups[0]["weight_decay"] == 0.01
    c.start()
    lam = c.lambdas[0].detach()
    assert lam[0, 0].item() == pytest.approx(LR_LAMBDA, rel=1e-6)
    assert int((lam != 0).sum()) == 3


def test_adam_is_default_without_weight_decay():
    _, _, c = make()
    assert type(c.optimizer) is torch.optim.Adam
    assert c.optimizer.param_groups[0]["weight_decay"] == 0.0
    assert c.optimizer.param_groups[0]["lr"] == LR_LAMBDA


def test_unknown_lambda_optimizer_raises():
    torch.manual_seed(0)
    model = nn.Sequential(cbp.QLinear(4, 4))
    with pytest.raises(ValueError, match="sgd"):
        cbp.CBP(model, LR_LAMBDA, lambda_optimizer="sgd")


def test_model_without_quantized_layers_raises():
    with pytest.raises(ValueError):
        cbp.CBP(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), LR_LAMBDA)


def test_penalty_takes_the_fused_kernel_for_a_large_network(monkeypatch):
    """Past 4 * FUSED_MIN_NUMEL quantized weights every layer asks for the compiled kernel
    (small layers of a large network included); below, the size rule decides per layer."""
    from cbp import controller as C

    seen = []

    def record(w, lam, s, mode, ucs, fused=None):
        seen.append((w.numel(), fused))
        return (w * 0).sum()

    monkeypatch.setattr(C, "lagrangian", record)
    n = 4 * C.FUSED_MIN_NUMEL
    big = torch.nn.Sequential(cbp.QLinear(n // 1024, 1024, mode="bin"), cbp.QLinear(4, 4))
    C.CBP(big, 1e-3).penalty()
    small = torch.nn.Sequential(cbp.QLinear(n // 1024 - 1, 1024, mode="bin"))
    C.CBP(small, 1e-3).penalty()
    assert seen == [(n, True), (16, True), (n - 1024, None)]
