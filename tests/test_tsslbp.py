"""TSSL-BP neuron (CBP-QSNN-TSSL-BP/functions): forward and backward against hand-worked values
and against a per-timestep implementation written like the reference, the PSP kernel, the
losses, backend selection, and the CUDA kernels (NVRTC compile, and CuPy-vs-torch on a GPU when
there is one; the CPU build of the kernels is in test_tsslbp_kernels.py)."""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

TSSL_DIR = Path(__file__).resolve().parents[1] / "CBP-QSNN-TSSL-BP"
LOCAL_NAMES = ("functions", "layers", "engine", "cnns", "global_v", "network_parser",
               "main_quantize_cbp", "main_train_fp32")
_MODULES: dict = {}


def tssl_modules() -> dict:
    """Import the TSSL-BP directory's modules without disturbing same-named modules of other
    pipelines (e.g. STBP's ``functions`` and ``engine``): they are imported under a clean slate
    and the previous ``sys.modules`` entries are put back afterwards."""
    if _MODULES:
        return _MODULES
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in LOCAL_NAMES}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(TSSL_DIR))
    try:
        for name in ("global_v", "functions.tsslbp_cuda", "functions.tsslbp", "functions.loss_f",
                     "layers.conv", "layers.linear", "layers.pooling", "layers.dropout", "cnns",
                     "network_parser", "engine", "main_quantize_cbp", "main_train_fp32"):
            _MODULES[name] = importlib.import_module(name)
    finally:
        sys.path.remove(str(TSSL_DIR))
        for k in [k for k in sys.modules if k.split(".")[0] in LOCAL_NAMES]:
            del sys.modules[k]
        sys.modules.update(saved)
    return _MODULES


M = tssl_modules()
tsslbp = M["functions.tsslbp"]
tsslbp_cuda = M["functions.tsslbp_cuda"]
loss_f = M["functions.loss_f"]
glv = M["global_v"]
TSSLBP = tsslbp.TSSLBP

NET = {"tau_m": 5, "tau_s": 3, "n_steps": 5, "n_class": 3, "desired_count": 5,
       "undesired_count": 1}
LAYER = {"threshold": 1}
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def torch_backend():
    before = tsslbp.get_backend()
    yield
    tsslbp.set_backend(before)


# --------------------------------------------------------------------------- reference loops


def loop_forward(inputs, tau_m, tau_s, vth):
    """Per-timestep forward as the reference writes it: (a, u, du, o) stacked on the last axis."""
    shape = inputs.shape
    theta_m, theta_s = 1 / tau_m, 1 / tau_s
    mem = torch.zeros(shape[:-1], dtype=inputs.dtype)
    syn = torch.zeros(shape[:-1], dtype=inputs.dtype)
    a, u, du, o = [], [], [], []
    for t in range(shape[-1]):
        mem_update = (-theta_m) * mem + inputs[..., t]
        mem = mem + mem_update
        out = (mem > vth).to(inputs.dtype)
        u.append(mem)
        du.append(mem_update)
        o.append(out)
        mem = mem * (1 - out)
        syn = syn + (out - syn) * theta_s
        a.append(syn)
    return tuple(torch.stack(x, dim=-1) for x in (a, u, du, o))


def loop_backward(grad, a, u, du, o, tau_m, tau_s, vth):
    """Per-timestep backward as the reference writes it (repeated kernels, clamped partial_u)."""
    shape = grad.shape
    T = shape[-1]
    theta_m = 1 / tau_m
    kappa = torch.zeros(T, dtype=grad.dtype)
    s = 1.0
    for k in range(T):
        kappa[k] = s / tau_s
        s = s - s / tau_s
    syn_a = kappa.view(1, 1, 1, 1, T).repeat(*shape[:-1], 1)
    partial_a = (kappa / (-tau_s)).view(1, 1, 1, 1, T).repeat(*shape[:-1], 1)
    out_grad = torch.zeros_like(grad)
    theta = torch.zeros(shape[:-1], dtype=grad.dtype)
    for t in range(T - 1, -1, -1):
        n = T - t
        out = o[..., t]
        partial_u = torch.clamp(-1 / du[..., t], -8, 0) * out
        pap = partial_u.unsqueeze(-1).repeat(1, 1, 1, 1, n) * partial_a[..., :n]
        g = torch.sum(pap * grad[..., t:] * tau_s, dim=4)
        if t != T - 1:
            g = g + theta * u[..., t] * (-1) * theta_m * partial_u
            g = g + theta * (1 - theta_m) * (1 - out)
        theta = g * out + theta * (1 - out) * (1 - theta_m)
        ga = torch.sum(syn_a[..., :n] * grad[..., t:], dim=-1)
        f = torch.clamp((-1 * u[..., t] + vth) / 0.2, -8, 8).exp()
        ga = ga * (f / ((1 + f) * (1 + f) * 0.2))
        quiet = a[..., t] < 1 / (4 * tau_s)
        g[quiet] = ga[quiet]
        out_grad[..., t] = g
    return out_grad


def run_neuron(x, grad, net=NET, layer=LAYER):
    x = x.clone().requires_grad_()
    a = TSSLBP.apply(x, net, layer)
    a.backward(grad)
    return a.detach(), x.grad


def random_case(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=dtype) * 1.2 + 0.5)
    grad = torch.randn(shape, generator=g, dtype=dtype)
    return x, grad


# --------------------------------------------------------------------------- hand-worked


def test_single_neuron_forward_hand_worked():
    """tau_m 5, tau_s 3, V_th 1, constant current 0.6: spikes at t = 1 and 3 (u = 1.08)."""
    tsslbp.set_backend("torch")
    x = torch.full((1, 1, 1, 1, 5), 0.6)
    a, _ = run_neuron(x, torch.zeros_like(x))
    want = [0.0, 1 / 3, 2 / 9, 13 / 27, 26 / 81]
    assert a.flatten().tolist() == pytest.approx(want, abs=1e-7)


def test_single_neuron_backward_hand_worked():
    """dL/da = (0, 0, 0, 0, 1).  kappa = (1/3, 2/9, 4/27, 8/81, 16/243), so S_t = kappa_{4-t};
    pi = 1/0.48 = 25/12 at the spikes (t = 1, 3)."""
    tsslbp.set_backend("torch")
    x = torch.full((1, 1, 1, 1, 5), 0.6)
    grad = torch.tensor([0.0, 0, 0, 0, 1]).view(1, 1, 1, 1, 5)
    _, gx = run_neuron(x, grad)
    pi = Fraction(25, 12)
    g4 = 0  # no spike, a_4 = 26/81 >= 1/12: spike-timing branch, Theta_5 = 0
    g3 = pi * Fraction(2, 9)  # spike: pi S_3
    theta3 = g3
    g2 = theta3 * Fraction(4, 5)  # no spike: Theta (1 - theta_m)
    theta2 = g2
    g1 = pi * Fraction(8, 81) + theta2 * Fraction(108, 100) * Fraction(1, 5) * pi
    z = (1 - 0.6) / 0.2  # t = 0: a_0 = 0 < 1/12, surrogate branch at u = 0.6
    sig = math.exp(z) / ((1 + math.exp(z)) ** 2 * 0.2)
    g0 = 16 / 243 * sig
    want = [g0, float(g1), float(g2), float(g3), g4]
    assert gx.flatten().tolist() == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert want[3] == pytest.approx(25 / 54) and want[2] == pytest.approx(10 / 27)


def test_pi_cap_and_no_gradient_through_silent_steps():
    """A spike with dU < 1/8 uses pi = 8; a neuron that never fires only gets the surrogate."""
    tsslbp.set_backend("torch")
    # u_0 = 0.95 (no spike), dU_1 = 0.1 - 0.19 ... choose a step that crosses with a tiny dU:
    x = torch.tensor([0.98, 0.22, 0.0, 0.0, 0.0]).view(1, 1, 1, 1, 5)
    # u_1 = 0.98 + (0.22 - 0.196) = 1.004 > 1 with dU_1 = 0.024 -> pi = 8
    grad = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 1, 5)
    a, gx = run_neuron(x, grad)
    assert a[..., 1].item() == pytest.approx(1 / 3)
    assert gx[..., 1].item() == pytest.approx(8 * (1 / 3), rel=1e-6)  # pi S_1, S_1 = kappa_0
    silent = torch.full((1, 1, 1, 1, 5), 0.1)
    a, gx = run_neuron(silent, torch.ones_like(silent))
    assert a.abs().max() == 0
    _, u, _, _ = loop_forward(silent, 5, 3, 1.0)
    kappa = glv.psp_kernel(5, 3)
    S = torch.tensor([kappa[: 5 - t].sum() for t in range(5)])
    z = ((1 - u.flatten()) / 0.2).clamp(-8, 8)
    sig = z.exp() / ((1 + z.exp()) ** 2 * 0.2)
    assert torch.allclose(gx.flatten(), S * sig, rtol=1e-5)


# --------------------------------------------------------------------------- vs reference loops


@pytest.mark.parametrize("T", [5, 8, 16])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 7, 5, 3), (1, 11, 1, 1)])
def test_matches_reference_loops(shape, T):
    tsslbp.set_backend("torch")
    x, grad = random_case(shape + (T,), seed=T * 100 + shape[1])
    a, gx = run_neuron(x, grad)
    ra, ru, rdu, ro = loop_forward(x, 5, 3, 1.0)
    assert torch.equal(a, ra)  # same operations in the same order: bit-identical
    assert 0.05 < ro.mean() < 0.8  # both branches of the backward are exercised
    rg = loop_backward(grad, ra, ru, rdu, ro, 5, 3, 1.0)
    assert torch.allclose(gx, rg, rtol=1e-5, atol=1e-5)
    assert (a.flatten(0, -2) < 1 / 12).any() and (a.flatten(0, -2) >= 1 / 12).any()


@pytest.mark.parametrize("tau_m,tau_s,vth", [(8, 4, 0.5), (2.5, 1.5, 1.3)])
def test_other_constants_and_float64(tau_m, tau_s, vth):
    tsslbp.set_backend("torch")
    net = {"tau_m": tau_m, "tau_s": tau_s}
    x, grad = random_case((2, 4, 3, 3, 7), seed=7, dtype=torch.float64)
    a, gx = run_neuron(x, grad, net, {"threshold": vth})
    assert a.dtype == gx.dtype == torch.float64
    ra, ru, rdu, ro = loop_forward(x, tau_m, tau_s, vth)
    assert torch.equal(a, ra)
    rg = loop_backward(grad, ra, ru, rdu, ro, tau_m, tau_s, vth)
    assert torch.allclose(gx, rg, rtol=1e-10, atol=1e-12)


def test_gradcheck_of_surrogate_branch_is_linear_in_grad():
    """The backward is linear in dL/da: doubling the incoming gradient doubles the result."""
    tsslbp.set_backend("torch")
    x, grad = random_case((2, 3, 2, 2, 6), seed=3)
    _, g1 = run_neuron(x, grad)
    _, g2 = run_neuron(x, 2 * grad)
    assert torch.allclose(g2, 2 * g1, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- kernel and losses


def test_psp_kernel_values():
    k = glv.psp_kernel(5, 3)
    assert k.tolist() == pytest.approx([0.33333, 0.22222, 0.14815, 0.09877, 0.06584], abs=1e-5)
    glv.init(5, 3)
    assert glv.syn_a.shape == (1, 1, 1, 1, 5) and torch.equal(glv.syn_a.flatten(), k)
    mat = tsslbp.kernel_matrix(4, 3.0, torch.float32, "cpu")
    assert mat[0].tolist() == pytest.approx(k[:4].tolist())
    assert mat[2].tolist() == pytest.approx([0, 0, k[0].item(), k[1].item()])


def test_psp_filter_of_constant_input():
    x = torch.ones(1, 1, 1, 1, 5)
    y = loss_f.psp(x, NET).flatten()
    assert y.tolist() == pytest.approx([0.3333, 0.5556, 0.7037, 0.8025, 0.8683], abs=1e-4)
    assert y.tolist() == pytest.approx([1 - (2 / 3) ** (t + 1) for t in range(5)], abs=1e-6)


def test_kernel_loss_target_and_gradient():
    assert loss_f.desired_spikes(5).tolist() == [0, 1, 1, 1, 1]
    assert loss_f.desired_spikes(10).tolist() == [0, 1] * 5
    assert loss_f.desired_spikes(7).tolist() == [0, 1, 1, 1, 1, 0, 1]  # reference crashes here
    labels = torch.tensor([2, 0])
    tgt = loss_f.kernel_targets(labels, NET)
    assert tgt.shape == (2, 3, 1, 1, 5)
    assert tgt[0, 2].flatten().tolist() == pytest.approx([0, 0.33333, 0.55556, 0.70370, 0.80247],
                                                         abs=1e-5)
    assert tgt[0, :2].abs().sum() == 0 and tgt[1, 1:].abs().sum() == 0
    double = loss_f.psp(tgt, NET)
    assert double[1, 0].flatten().tolist() == pytest.approx(
        [0, 0.11111, 0.25926, 0.40741, 0.53909], abs=1e-5)
    out = torch.rand(2, 3, 1, 1, 5, requires_grad=True)
    loss = loss_f.SpikeLoss(dict(NET, loss="kernel"))(out, labels)
    delta = out.detach() - double
    assert loss.item() == pytest.approx(0.5 * (delta**2).sum().item(), rel=1e-6)
    loss.backward()
    assert torch.allclose(out.grad, delta)


def test_count_loss_is_one_sided_and_passes_delta():
    cfg = dict(NET, loss="count")
    out = torch.zeros(1, 3, 1, 1, 5)
    out[0, 0] = 0.2  # label neuron: count 1 < 5 -> delta (1 - 5)/5 = -0.8
    out[0, 1] = 0.4  # count 2 > 1 -> delta +0.2
    out[0, 2] = 0.1  # count 0.5 < 1 -> too few but not the label: ignored
    out.requires_grad_()
    loss = loss_f.SpikeLoss(cfg)(out, torch.tensor([0]))
    assert loss.item() == pytest.approx(0.5 * 5 * (0.8**2 + 0.2**2), rel=1e-6)
    loss.backward()
    assert out.grad[0, :, 0, 0, 0].tolist() == pytest.approx([-0.8, 0.2, 0.0], abs=1e-6)
    out2 = torch.full((1, 3, 1, 1, 5), 1.2)  # label count 6 >= 5 is fine, others 6 > 1
    loss2 = loss_f.SpikeLoss(cfg)(out2, torch.tensor([1]))
    assert loss2.item() == pytest.approx(0.5 * 5 * 2 * 1.0, rel=1e-6)


def test_softmax_loss_and_prediction():
    out = torch.zeros(2, 3, 1, 1, 5)
    out[0, 1] = 1.0
    out[1, :] = 0.5  # tie: lowest index
    assert loss_f.predict(out).tolist() == [1, 0]
    loss = loss_f.SpikeLoss(dict(NET, loss="softmax"))(out, torch.tensor([1, 2]))
    logits = out.sum(-1).flatten(1)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.tensor(
        [1, 2])).item(), rel=1e-6)


# --------------------------------------------------------------------------- backends


def test_backend_selection_on_cpu(monkeypatch):
    x = torch.zeros(1, 1, 1, 1, 5)
    tsslbp.set_backend("auto")
    assert tsslbp.resolve_backend(x) == "torch"
    tsslbp.set_backend("cupy")
    with pytest.raises(tsslbp.BackendError, match="needs float32 CUDA tensors"):
        TSSLBP.apply(x, NET, LAYER)
    with pytest.raises(tsslbp.BackendError, match="unknown TSSL-BP backend"):
        tsslbp.set_backend("numba")
    monkeypatch.setattr(tsslbp, "_backend", "cuda")  # as read from TSSLBP_BACKEND
    with pytest.raises(tsslbp.BackendError, match="TSSLBP_BACKEND='cuda' is not a TSSL-BP"):
        tsslbp.resolve_backend(x)


def test_module_imports_without_touching_cupy():
    code = (f"import sys; sys.path.insert(0, {str(TSSL_DIR)!r});"
            "import functions.tsslbp as t, torch;"
            "x = torch.ones(1, 1, 1, 1, 5, requires_grad=True);"
            "t.TSSLBP.apply(x, {'tau_m': 5, 'tau_s': 3}, {'threshold': 1}).sum().backward();"
            "print('cupy' in sys.modules)")
    env = dict(os.environ, TSSLBP_BACKEND="auto", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
        return nvrtc
    except Exception:
        return None


@pytest.mark.skipif(_nvrtc() is None, reason="NVRTC not available")
def test_cuda_source_compiles_with_nvrtc():
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(tsslbp_cuda.SOURCE, "tsslbp.cu", [], [])
    try:
        nvrtc.compileProgram(prog, ["--gpu-architecture=compute_80", "--std=c++14"])
    except Exception:  # pragma: no cover - shows the compiler log
        pytest.fail(nvrtc.getProgramLog(prog))
    ptx = nvrtc.getPTX(prog)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    assert ".entry tsslbp_forward" in ptx and ".entry tsslbp_backward" in ptx


# --------------------------------------------------------------------------- GPU


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def _both_backends(x, grad, net=NET, layer=LAYER):
    tsslbp.set_backend("torch")
    a_t, g_t = run_neuron(x, grad, net, layer)
    tsslbp.set_backend("cupy")
    a_c, g_c = run_neuron(x, grad, net, layer)
    return a_t, g_t, a_c, g_c


@gpu
@needs_cuda
@pytest.mark.parametrize("T", [5, 8, 16])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 7, 5, 3), (1, 1, 1, 1), (5, 13, 11, 9),
                                   (50, 31, 1, 1)])
def test_cupy_matches_torch(shape, T):
    x, grad = random_case(shape + (T,), seed=T + shape[1])
    x, grad = x.cuda(), grad.cuda()
    a_t, g_t, a_c, g_c = _both_backends(x, grad)
    assert torch.equal(a_c, a_t)
    assert torch.allclose(g_c, g_t, rtol=1e-5, atol=1e-5)
    ra, ru, rdu, ro = loop_forward(x.cpu(), 5, 3, 1.0)
    assert torch.equal(a_c.cpu(), ra)
    rg = loop_backward(grad.cpu(), ra, ru, rdu, ro, 5, 3, 1.0)
    assert torch.allclose(g_c.cpu(), rg, rtol=1e-5, atol=1e-5)


@gpu
@needs_cuda
def test_cupy_auto_selected_and_on_side_stream():
    x, grad = random_case((4, 6, 5, 5, 5), seed=11)
    x, grad = x.cuda(), grad.cuda()
    tsslbp.set_backend("auto")
    assert tsslbp.resolve_backend(x) == "cupy"
    tsslbp.set_backend("torch")
    a_t, g_t = run_neuron(x, grad)
    tsslbp.set_backend("cupy")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        a_c, g_c = run_neuron(x, grad, {"tau_m": 5, "tau_s": 3}, LAYER)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(a_c, a_t)
    assert torch.allclose(g_c, g_t, rtol=1e-5, atol=1e-5)


@gpu
@needs_cuda
def test_cupy_non_contiguous_input_and_other_constants():
    base = torch.randn(6, 5, 4, 3, 8, device="cuda") + 0.4
    x = base.transpose(1, 2)  # non-contiguous
    grad = torch.randn_like(x)
    net, layer = {"tau_m": 8, "tau_s": 4}, {"threshold": 0.5}
    a_t, g_t, a_c, g_c = _both_backends(x, grad, net, layer)
    assert torch.equal(a_c, a_t)
    assert torch.allclose(g_c, g_t, rtol=1e-5, atol=1e-5)
