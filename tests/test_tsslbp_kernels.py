"""The TSSL-BP CUDA kernels without a GPU: ``tsslbp_cuda.SOURCE`` compiled as C++ on the CPU
behind a fake ``cupy`` (tests/fake_cupy.py) that checks every launch, driven through the real
host code (``tsslbp_cuda.forward`` / ``backward`` and the cupy branch of the autograd
function) and compared with the torch backend.  Also the backend's failure modes: compile and
launch errors, unknown backend names, NaN, double backward.  Planted kernel bugs must make the
comparison fail (``test_planted_kernel_bugs_are_caught``)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import fake_cupy
import numpy as np
import pytest
import torch
from test_tsslbp import TSSL_DIR, random_case, tsslbp, tsslbp_cuda

pytestmark = pytest.mark.skipif(fake_cupy.compiler() is None, reason="no C++ compiler")

TSSLBP = tsslbp.TSSLBP
CONSTANTS = [  # (tau_m, tau_s, threshold)
    (5.0, 3.0, 1.0),
    (4.0, 2.0, 0.5),
    (8.0, 5.0, 1.5),
]


def per_neuron(scalars: dict) -> int:
    return scalars["n_neurons"] * scalars["T"]


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kernels")


@pytest.fixture
def fake(monkeypatch, build_dir):
    """CuPy replaced by the CPU fake; CPU float32 tensors count as device tensors."""
    f = fake_cupy.FakeCupy(build_dir, default_size=per_neuron,
                           sizes={"kappa": lambda s: s["T"]})
    monkeypatch.setitem(sys.modules, "cupy", f.module)
    monkeypatch.setattr(tsslbp_cuda, "supports", lambda x: x.dtype == torch.float32)
    monkeypatch.setattr(torch.cuda, "current_stream", f.current_stream)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(tsslbp, "_cupy_failure", None)
    monkeypatch.setattr(tsslbp, "_announced", set())
    before = tsslbp.get_backend()
    tsslbp_cuda.reset()
    yield f
    tsslbp_cuda.reset()
    tsslbp.set_backend(before)


def both(x, grad, net, layer, backend="cupy"):
    """(a, dL/dx) from the torch backend and from ``backend``."""
    out = []
    for name in ("torch", backend):
        tsslbp.set_backend(name)
        xi = x.clone().requires_grad_()
        a = TSSLBP.apply(xi, net, layer)
        a.backward(grad)
        out.append((a.detach(), xi.grad))
    return out


def cfg(consts):
    tau_m, tau_s, vth = consts
    return {"tau_m": tau_m, "tau_s": tau_s}, {"threshold": vth}


def assert_grads_close(g_kernel, g_torch, rtol=1e-5):
    """|difference| <= rtol (|g| + max |g|): 1e-5 relative, with entries that cancel to near
    zero measured against the largest gradient (summation order differs between backends)."""
    scale = g_torch.abs().max().clamp(min=1e-30)
    err = ((g_kernel - g_torch).abs() / (g_torch.abs() + scale)).max()
    assert err.item() <= rtol, f"gradient relative error {err.item():.2e}"


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("consts", CONSTANTS)
@pytest.mark.parametrize("T", [5, 8])
@pytest.mark.parametrize("shape", [(3, 4, 5, 7), (1, 1, 1, 1), (2, 300, 1, 1)])
def test_kernels_match_torch_backend(fake, shape, T, consts):
    net, layer = cfg(consts)
    x, grad = random_case(shape + (T,), seed=T * 31 + shape[1])
    (a_t, g_t), (a_k, g_k) = both(x, grad, net, layer)
    assert torch.equal(a_k, a_t)  # bit-identical PSP traces, hence spikes
    assert_grads_close(g_k, g_t)
    assert [launch.kernel for launch in fake.launches] == ["tsslbp_forward", "tsslbp_backward"]
    n = x.numel() // T
    assert fake.launches[0].grid == ((n + 255) // 256,) and fake.launches[0].block == (256,)
    # the neuron fires somewhere and stays quiet elsewhere, so both gradient branches ran
    spikes = (a_t[..., 1:] > a_t[..., :-1]).float().mean()
    assert 0.05 < spikes.item() < 0.95 or x.numel() == T


@pytest.mark.parametrize("consts", CONSTANTS)
@pytest.mark.parametrize("T", [5, 8])
def test_forward_membranes_bit_identical(fake, T, consts):
    tau_m, tau_s, vth = consts
    x, _ = random_case((4, 3, 6, 5, T), seed=T)
    a_k, u_k, du_k = tsslbp_cuda.forward(x, 1.0 / tau_m, tau_s, vth)
    a_t, u_t, du_t = tsslbp.torch_forward(x, 1.0 / tau_m, tau_s, vth)
    for k, t in ((a_k, a_t), (u_k, u_t), (du_k, du_t)):
        assert torch.equal(k.reshape(-1, T).t(), t)
    assert torch.equal(u_k > vth, (u_t > vth).t().reshape(x.shape))


def test_non_contiguous_and_stride_zero_gradients(fake):
    net, layer = cfg(CONSTANTS[0])
    x, grad = random_case((2, 3, 4, 5, 6), seed=5)
    base = torch.randn(6, 5, 4, 3, 2, generator=torch.Generator().manual_seed(1))
    for g in (base.permute(4, 3, 2, 1, 0),  # non-contiguous
              torch.randn(6).expand(2, 3, 4, 5, 6),  # stride 0 everywhere but time
              torch.tensor(0.5).expand(2, 3, 4, 5, 6)):  # stride 0 everywhere
        assert not g.is_contiguous()
        (a_t, g_t), (a_k, g_k) = both(x, g, net, layer)
        assert torch.equal(a_k, a_t)
        assert_grads_close(g_k, g_t)


def test_side_stream_is_followed(fake):
    net, layer = cfg(CONSTANTS[0])
    x, grad = random_case((2, 3, 4, 5, 5), seed=2)
    tsslbp.set_backend("cupy")
    fake.torch_stream = fake_cupy.TorchStream(0xABCDEF)
    xi = x.clone().requires_grad_()
    TSSLBP.apply(xi, net, layer).backward(grad)
    assert {launch.stream for launch in fake.launches} == {0xABCDEF}


def test_empty_batch_launches_nothing(fake):
    net, layer = cfg(CONSTANTS[0])
    tsslbp.set_backend("cupy")
    x = torch.zeros(0, 3, 4, 4, 5, requires_grad=True)
    TSSLBP.apply(x, net, layer).sum().backward()
    assert x.grad.shape == x.shape and fake.launches == []


@pytest.mark.slow
def test_full_size_conv_shape(fake):
    """CIFAR-10 AlexNet conv_1 output at batch 50: (50, 256, 32, 32, 5)."""
    torch.manual_seed(0)
    x = torch.randn(50, 256, 32, 32, 5) * 1.2 + 0.5
    grad = torch.randn_like(x)
    net, layer = cfg(CONSTANTS[0])
    (a_t, g_t), (a_k, g_k) = both(x, grad, net, layer)
    assert torch.equal(a_k, a_t)
    assert_grads_close(g_k, g_t)
    assert fake.launches[0].grid == (50 * 256 * 32 * 32 // 256,)


# --------------------------------------------------------------------------- the fake's checks


def _args(n=4, T=5, **override):
    x = torch.randn(n, T)
    bufs = [x, torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)]
    args = [*bufs, np.int64(n), np.int32(T), np.float32(0.2), np.float32(1 / 3), np.float32(1)]
    for i, v in override.items():
        args[int(i[1:])] = v(bufs) if callable(v) else v
    return tuple(tsslbp_cuda._view(a) if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("override,message", [
    ({"a4": 4}, "must be int64 for C long long"),
    ({"a5": np.int64(5)}, "must be int32 for C int"),
    ({"a6": np.float64(0.2)}, "must be float32"),
    ({"a1": lambda b: torch.empty(4, 4)}, "has 16 elements, needs 20"),
    ({"a1": lambda b: torch.empty(5, 4).t()}, "not contiguous"),
    ({"a1": lambda b: torch.empty(4, 5, dtype=torch.float64)}, "torch.float64"),
    ({"a2": lambda b: b[1]}, "overlap"),
    ({"a3": lambda b: b[0]}, "overlap"),
])
def test_fake_rejects_bad_launches(fake, override, message):
    fwd, _ = tsslbp_cuda._kernels(0)
    with pytest.raises(AssertionError, match=message):
        tsslbp_cuda._launch(fwd, 4, torch.device("cpu"), _args(**override))


def test_fake_rejects_wrong_stream_grid_and_arity(fake):
    fwd, _ = tsslbp_cuda._kernels(0)
    with pytest.raises(AssertionError, match="not inside a stream"):
        with fake.module.cuda.Device(0):
            fwd((1,), (256,), _args())
    stream = fake.module.cuda.Stream.from_external(tsslbp_cuda._TorchStream(fake_cupy.TorchStream(0x1)))
    with fake.module.cuda.Device(0), stream, pytest.raises(AssertionError, match="on stream"):
        fwd((1,), (256,), _args())
    with pytest.raises(AssertionError, match="grid too small"):
        tsslbp_cuda._launch(fwd, 1, torch.device("cpu"), _args(n=300))
    with pytest.raises(AssertionError, match="8 arguments for 9"):
        tsslbp_cuda._launch(fwd, 4, torch.device("cpu"), _args()[:-1])
    with pytest.raises(AssertionError, match="deprecated"):
        fake.module.cuda.ExternalStream(1, 0)


def test_signatures_are_parsed():
    sig = fake_cupy.parse_signatures(tsslbp_cuda.SOURCE)
    assert list(sig) == ["tsslbp_forward", "tsslbp_backward"]
    fwd = sig["tsslbp_forward"]
    assert [p.name for p in fwd] == ["inputs", "a_out", "u_out", "du_out", "n_neurons", "T",
                                     "theta_m", "theta_s", "vth"]
    assert fwd[0].pointer and fwd[0].const and fwd[0].restrict
    assert fwd[1].pointer and not fwd[1].const
    assert fwd[4].ctype == "long long" and not fwd[4].pointer


MUTANTS = [
    # (description, original, replacement)
    ("leak sign", "__fmul_rn(-theta_m, mem)", "__fmul_rn(theta_m, mem)"),
    ("no reset", "mem = __fmul_rn(u, 1.0f - o);", "mem = u;"),
    ("spike at threshold", "(u > vth) ? 1.0f : 0.0f;\n        du_out",
     "(u >= vth) ? 1.0f : 0.0f;\n        du_out"),
    ("PSP window one short", "for (int k = 0; k < T - t; ++k)", "for (int k = 0; k < T - t - 1; ++k)"),
    ("pi not capped", "clamp_nan(1.0f / du_in[i], 0.0f, pi_max)", "fmaxf(1.0f / du_in[i], 0.0f)"),
    ("wrong surrogate switch", "if (a[i] < switch_th)", "if (a[i] <= switch_th * 2.0f)"),
    ("off-by-one thread guard", "if (n >= n_neurons) return;\n    const long long base = n * (long "
     "long)T;\n    float theta", "if (n > n_neurons) return;\n    const long long base = n * "
     "(long long)T;\n    float theta"),
]


@pytest.mark.parametrize("name,old,new", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_planted_kernel_bugs_are_caught(fake, monkeypatch, name, old, new):
    """Each planted bug breaks the comparison (or a launch check) the tests above make."""
    assert tsslbp_cuda.SOURCE.count(old) == 1, name
    monkeypatch.setattr(tsslbp_cuda, "SOURCE", tsslbp_cuda.SOURCE.replace(old, new))
    net, layer = cfg(CONSTANTS[0])
    x, grad = random_case((3, 4, 5, 7, 5), seed=8)
    x[0, 0, 0, 0] = torch.tensor([1.5, 0.0, 0.0, 0.0, 0.0])  # tiny du right after a spike
    x[0, 0, 0, 1] = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])  # u exactly at threshold: no spike
    try:
        (a_t, g_t), (a_k, g_k) = both(x, grad, net, layer)
        assert torch.equal(a_k, a_t)
        assert_grads_close(g_k, g_t)
    except AssertionError:
        return
    except tsslbp.BackendError as exc:  # a launch check of the fake failed
        assert isinstance(exc.__cause__, AssertionError)
        return
    pytest.fail(f"planted bug {name!r} went unnoticed")


# --------------------------------------------------------------------------- failure modes


def test_auto_falls_back_once_on_compile_error(fake, capsys):
    fake.compile_error = "nvrtc: error: identifier 'foo' is undefined"
    net, layer = cfg(CONSTANTS[0])
    x, grad = random_case((2, 3, 4, 4, 5), seed=3)
    tsslbp.set_backend("auto")
    assert tsslbp.resolve_backend(x) == "cupy"
    with pytest.warns(RuntimeWarning, match="TSSLBP_BACKEND") as rec:
        (a_t, g_t), (a_k, g_k) = both(x, grad, net, layer, backend="auto")
        both(x, grad, net, layer, backend="auto")
    assert len(rec) == 1 and "identifier 'foo'" in str(rec[0].message)
    assert torch.equal(a_k, a_t) and torch.equal(g_k, g_t)
    assert tsslbp.resolve_backend(x) == "torch"
    out = capsys.readouterr().out
    assert out.count("TSSL-BP neuron: torch backend") == 1


def test_auto_falls_back_on_launch_error_in_backward(fake):
    net, layer = cfg(CONSTANTS[0])
    x, grad = random_case((2, 3, 4, 4, 5), seed=4)
    (a_t, g_t), = [both(x, grad, net, layer, backend="torch")[0]]
    tsslbp.set_backend("auto")
    xi = x.clone().requires_grad_()
    a = TSSLBP.apply(xi, net, layer)  # forward on the kernels
    fake.launch_error = "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"
    with pytest.warns(RuntimeWarning, match="LAUNCH_OUT_OF_RESOURCES"):
        a.backward(grad)
    assert torch.equal(a.detach(), a_t)
    assert torch.allclose(xi.grad, g_t, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("which", ["compile", "launch"])
def test_explicit_cupy_failure_is_one_clear_error(fake, which):
    setattr(fake, f"{which}_error", "boom\nsecond line")
    tsslbp.set_backend("cupy")
    x = torch.ones(1, 1, 1, 1, 5, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(tsslbp.BackendError) as err:
            TSSLBP.apply(x, *cfg(CONSTANTS[0]))
    msg = str(err.value)
    assert "\n" not in msg and "boom second line" in msg and "TSSLBP_BACKEND=torch" in msg


def test_cupy_for_another_cuda_major_is_not_used(fake):
    fake.cuda_version = 11080
    x = torch.ones(1, 1, 1, 1, 5)
    tsslbp.set_backend("auto")
    assert tsslbp.resolve_backend(x) == "torch"
    tsslbp.set_backend("cupy")
    with pytest.raises(tsslbp.BackendError, match=r"CuPy is built for CUDA 11 but torch for CUDA "
                       r"\d+; install cupy-cuda\d+x"):
        tsslbp.resolve_backend(x)


def test_backend_announced_once(fake, capsys):
    net, layer = cfg(CONSTANTS[0])
    tsslbp.set_backend("auto")
    for _ in range(3):
        TSSLBP.apply(torch.ones(1, 1, 1, 1, 5), net, layer)
    assert capsys.readouterr().out == "TSSL-BP neuron: cupy backend (CuPy CUDA kernels)\n"


def test_nan_propagates_like_torch_backend(fake):
    net, layer = cfg(CONSTANTS[0])
    x, grad = random_case((2, 3, 4, 4, 5), seed=6)
    x[0, 0, 0, 0, 2] = float("nan")
    x[1, 2, 3, 3, 0] = float("nan")
    grad[0, 1, 1, 1, 4] = float("nan")
    (a_t, g_t), (a_k, g_k) = both(x, grad, net, layer)
    assert torch.equal(a_k.isnan(), a_t.isnan()) and torch.equal(g_k.isnan(), g_t.isnan())
    assert g_t.isnan().any()
    ok = ~g_t.isnan()
    assert_grads_close(g_k[ok], g_t[ok])


@pytest.mark.parametrize("backend", ["torch", "cupy"])
def test_double_backward_raises(fake, backend):
    tsslbp.set_backend(backend)
    x = (torch.rand(2, 3, 1, 1, 5) * 2).requires_grad_()
    a = TSSLBP.apply(x, *cfg(CONSTANTS[0]))
    (g,) = torch.autograd.grad(a.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()


def test_unknown_backend_is_an_error_in_the_pipeline(tmp_path):
    """A mistyped TSSLBP_BACKEND stops the script with one line before any work."""
    env = dict(os.environ, TSSLBP_BACKEND="cuppy", CBP_NO_PROGRESS="1")
    res = subprocess.run([sys.executable, str(TSSL_DIR / "main_train_fp32.py"), "-config",
                          str(TSSL_DIR / "Networks" / "DIGITS_bin.yaml"), "-device", "cpu"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert res.stderr.strip().splitlines() == [
        "error: TSSLBP_BACKEND='cuppy' is not a TSSL-BP backend; choose one of auto, torch, cupy"]
