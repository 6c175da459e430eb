"""A stand-in for the parts of CuPy that a ``RawModule`` backend uses, running CUDA C kernels
on the CPU.

``RawModule(code=...)`` compiles the CUDA source as C++ (g++/c++) behind a small shim: CUDA
qualifiers vanish, ``__fadd_rn``-style intrinsics become plain float operations that are not
contracted, and ``blockIdx`` / ``blockDim`` / ``threadIdx`` / ``gridDim`` are globals that a
host loop sets for every thread of the launched grid.  Every launch is checked the way the GPU
would need it to be right:

* the argument count and each argument's C type against the kernel's parsed signature
  (``float*`` takes an array from ``from_dlpack``; ``long long`` / ``int`` / ``float`` take
  ``numpy.int64`` / ``numpy.int32`` / ``numpy.float32`` exactly);
* arrays are float32, C-contiguous and of the size the test declares for that parameter;
* no two pointer arguments overlap when either is written (``__restrict__``);
* the grid and block are within CUDA's limits and cover ``n_neurons`` threads;
* nothing is written outside an array: each one is passed inside guard bands of sentinel
  values that must be intact after the launch;
* the launch runs inside a CuPy stream made from torch's current stream (the non-deprecated
  ``Stream.from_external``), under the expected device.

Tensors stand in for device memory: ``from_dlpack`` wraps a CPU tensor; the kernel works on a
guarded copy that is copied back into every array it may write.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SHIM = r"""
#include <math.h>
struct fake_dim3 { unsigned int x, y, z; };
static fake_dim3 blockIdx, blockDim, threadIdx, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
static inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
static inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
static inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
"""

_SIGNATURE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', re.S)
_PARAM = re.compile(r"^(const\s+)?(float|int|long long|unsigned int)\s*(\*)?\s*"
                    r"(__restrict__\s+)?(const\s+)?(\w+)$")
GUARD = 4096  # elements of sentinel before and after every array passed to a kernel
SENTINEL = 0xDEADBEEF  # -6.3e18: a finite float, so reads of it do not stay NaN
_CTYPES = {"float": ctypes.c_float, "int": ctypes.c_int, "long long": ctypes.c_longlong,
           "unsigned int": ctypes.c_uint}
_NUMPY = {"float": np.float32, "int": np.int32, "long long": np.int64, "unsigned int": np.uint32}


@dataclass(frozen=True)
class Param:
    name: str
    ctype: str  # base type
    pointer: bool
    const: bool  # pointee is const (pointers) / value is const (scalars)
    restrict: bool


def parse_signatures(source: str) -> dict[str, list[Param]]:
    """``{kernel name: parameters}`` for every ``extern "C" __global__`` function."""
    out = {}
    for name, params in _SIGNATURE.findall(source):
        parsed = []
        for raw in params.split(","):
            m = _PARAM.match(" ".join(raw.split()))
            if m is None:
                raise ValueError(f"cannot parse parameter {raw.strip()!r} of {name}")
            const1, ctype, star, restrict, const2, pname = m.groups()
            parsed.append(Param(pname, ctype, bool(star), bool(const1 or const2), bool(restrict)))
        out[name] = parsed
    return out


def _launcher(name: str, params: list[Param]) -> str:
    decl = ", ".join(("const " if p.const and p.pointer else "") + p.ctype
                     + ("* " if p.pointer else " ") + p.name for p in params)
    call = ", ".join(p.name for p in params)
    return (f'extern "C" void launch_{name}(unsigned int gx, unsigned int bx, {decl}) {{\n'
            f"  gridDim.x = gx; blockDim.x = bx; gridDim.y = gridDim.z = 1;\n"
            f"  blockDim.y = blockDim.z = 1; blockIdx.y = blockIdx.z = 0;\n"
            f"  threadIdx.y = threadIdx.z = 0;\n"
            f"  for (unsigned int b = 0; b < gx; ++b) for (unsigned int t = 0; t < bx; ++t) {{\n"
            f"    blockIdx.x = b; threadIdx.x = t; {name}({call}); }}\n}}\n")


class CompileError(RuntimeError):
    """Raised like ``cupy.cuda.compiler.CompileException``."""


class LaunchError(RuntimeError):
    """Raised like ``cupy_backends.cuda.api.driver.CUDADriverError``."""


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


class FakeArray:
    """What ``from_dlpack`` returns: a view of a CPU tensor."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    @property
    def span(self) -> tuple[int, int]:
        t = self.tensor
        return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


class FakeStream:
    def __init__(self, fake: FakeCupy, handle: int) -> None:
        self.fake, self.ptr = fake, handle

    def __enter__(self):
        self.fake.stream_stack.append(self)
        return self

    def __exit__(self, *exc) -> None:
        self.fake.stream_stack.pop()


class FakeDevice:
    def __init__(self, fake: FakeCupy, index: int | None) -> None:
        self.fake, self.index = fake, index

    def __enter__(self):
        if self.index is not None and not isinstance(self.index, int):
            raise TypeError(f"device index must be an int, got {self.index!r}")
        self.fake.device_stack.append(0 if self.index is None else self.index)
        return self

    def __exit__(self, *exc) -> None:
        self.fake.device_stack.pop()


class TorchStream:
    """What the patched ``torch.cuda.current_stream`` returns."""

    def __init__(self, handle: int) -> None:
        self.cuda_stream = handle


@dataclass
class Launch:
    kernel: str
    grid: tuple
    block: tuple
    stream: int
    device: int


class FakeKernel:
    def __init__(self, fake: FakeCupy, name: str, params: list[Param], fn) -> None:
        self.fake, self.name, self.params, self.fn = fake, name, params, fn

    def __call__(self, grid, block, args, **kwargs) -> None:
        fake = self.fake
        where = f"launch of {self.name}"
        if fake.launch_error is not None:
            raise LaunchError(fake.launch_error)
        assert not kwargs.get("stream"), f"{where}: pass the stream by context, not argument"
        assert fake.stream_stack, f"{where}: not inside a stream context"
        stream = fake.stream_stack[-1].ptr
        assert stream == fake.torch_stream.cuda_stream, (
            f"{where}: on stream {stream:#x}, torch's current stream is "
            f"{fake.torch_stream.cuda_stream:#x}")
        assert fake.device_stack, f"{where}: no current device"
        assert isinstance(args, tuple), f"{where}: args must be a tuple"
        assert len(args) == len(self.params), (
            f"{where}: {len(args)} arguments for {len(self.params)} parameters")
        grid, block = tuple(grid), tuple(block)
        assert 1 <= len(grid) <= 3 and 1 <= len(block) <= 3, f"{where}: grid/block rank"
        assert all(isinstance(g, int) and g >= 1 for g in grid + block), f"{where}: bad dims"
        assert grid[0] <= 2**31 - 1 and all(g <= 65535 for g in grid[1:]), f"{where}: grid"
        assert block[0] <= 1024 and int(np.prod(block)) <= 1024, f"{where}: block {block}"
        assert len(grid) == 1 and len(block) == 1, f"{where}: the launcher is 1-D"

        scalars, arrays, cargs, guarded = {}, {}, [], []
        for p, a in zip(self.params, args):
            if p.pointer:
                assert isinstance(a, FakeArray), f"{where}: {p.name} must be an array, got {a!r}"
                t = a.tensor
                assert t.dtype == torch.float32, f"{where}: {p.name} is {t.dtype}"
                assert t.is_contiguous(), f"{where}: {p.name} is not contiguous"
                arrays[p.name] = (p, a)
                buf = np.full(t.numel() + 2 * GUARD, SENTINEL, dtype=np.uint32).view(np.float32)
                buf[GUARD:GUARD + t.numel()] = t.reshape(-1).numpy()
                guarded.append((p, t, buf))
                cargs.append(ctypes.c_void_p(buf.ctypes.data + 4 * GUARD))
            else:
                want = _NUMPY[p.ctype]
                assert type(a) is want, (
                    f"{where}: {p.name} must be {want.__name__} for C {p.ctype}, got {type(a)}")
                scalars[p.name] = a.item()
                cargs.append(_CTYPES[p.ctype](a.item()))
        for name, (_p, a) in arrays.items():
            rule = fake.sizes.get((self.name, name), fake.sizes.get(name, fake.default_size))
            want = int(rule(scalars))
            assert a.tensor.numel() == want, (
                f"{where}: {name} has {a.tensor.numel()} elements, needs {want}")
        items = list(arrays.values())
        for i, (p, a) in enumerate(items):
            for q, b in items[i + 1:]:
                (s1, e1), (s2, e2) = a.span, b.span
                if s1 < e2 and s2 < e1 and not (p.const and q.const):
                    raise AssertionError(f"{where}: {p.name} and {q.name} overlap "
                                         "(__restrict__ pointers, one written)")
        if "n_neurons" in scalars:
            assert grid[0] * block[0] >= scalars["n_neurons"], f"{where}: grid too small"
        fake.launches.append(Launch(self.name, grid, block, stream, fake.device_stack[-1]))
        self.fn(ctypes.c_uint(grid[0]), ctypes.c_uint(block[0]), *cargs)
        for p, t, buf in guarded:  # out-of-bounds writes land in the guard bands
            bits = buf.view(np.uint32)
            bad = np.flatnonzero(np.concatenate([bits[:GUARD], bits[-GUARD:]]) != SENTINEL)
            assert bad.size == 0, f"{where}: wrote outside {p.name} ({bad.size} elements)"
            if not p.const:
                t.copy_(torch.from_numpy(buf[GUARD:GUARD + t.numel()].copy()).view(t.shape))


class FakeModule:
    def __init__(self, fake: FakeCupy, code: str, options: tuple) -> None:
        self.fake = fake
        fake.compiles.append(options)
        if fake.compile_error is not None:
            raise CompileError(fake.compile_error)
        self.signatures = parse_signatures(code)
        src = SHIM + code + "".join(_launcher(n, p) for n, p in self.signatures.items())
        digest = hashlib.sha256(src.encode()).hexdigest()[:16]
        lib = fake.build_dir / f"k_{digest}.so"
        if not lib.exists():
            cpp = fake.build_dir / f"k_{digest}.cpp"
            cpp.write_text(src)
            tmp = lib.with_suffix(".tmp.so")
            res = subprocess.run([fake.cxx, "-O2", "-ffp-contract=off", "-fno-fast-math",
                                  "-shared", "-fPIC", "-o", str(tmp), str(cpp)],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                raise CompileError(res.stderr)
            tmp.rename(lib)
        self.lib = ctypes.CDLL(str(lib))

    def get_function(self, name: str) -> FakeKernel:
        params = self.signatures[name]
        fn = getattr(self.lib, f"launch_{name}")
        fn.restype = None
        return FakeKernel(self.fake, name, params, fn)


class FakeCupy:
    """Build with a folder for compiled kernels; ``module`` goes into ``sys.modules['cupy']``.

    ``sizes`` maps a parameter name (or ``(kernel, name)``) to a function of the launch's
    scalar arguments giving the element count its array must have; ``default_size`` covers
    the rest.  Set ``compile_error`` / ``launch_error`` to a message to make them fail.
    """

    def __init__(self, build_dir: Path, default_size: Callable[[dict], int],
                 sizes: dict | None = None, cxx: str | None = None) -> None:
        self.build_dir = Path(build_dir)
        self.default_size = default_size
        self.sizes = dict(sizes or {})
        self.cxx = cxx or compiler()
        self.compile_error: str | None = None
        self.launch_error: str | None = None
        self.cuda_version: int | None = None  # runtimeGetVersion(); default: torch's CUDA
        self.launches: list[Launch] = []
        self.compiles: list[tuple] = []
        self.stream_stack: list[FakeStream] = []
        self.device_stack: list[int] = []
        self.torch_stream = TorchStream(0x5EED)
        self.module = self._build_module()

    def current_stream(self, device=None) -> TorchStream:
        """Stand-in for ``torch.cuda.current_stream``."""
        return self.torch_stream

    def _build_module(self) -> types.ModuleType:
        fake = self
        cp = types.ModuleType("cupy")
        cp.__version__ = "14.0.0-fake"
        cuda = types.SimpleNamespace()

        class Stream:
            @classmethod
            def from_external(cls, obj):
                version, handle = obj.__cuda_stream__()
                assert version == 0 and isinstance(handle, int)
                return FakeStream(fake, handle)

        def external_stream(ptr, device_id=-1):
            raise AssertionError("cupy.cuda.ExternalStream is deprecated in CuPy 14; "
                                 "use Stream.from_external")

        cuda.Stream = Stream
        cuda.ExternalStream = external_stream
        cuda.Device = lambda index=None: FakeDevice(fake, index)
        major = int(torch.version.cuda.split(".")[0]) if torch.version.cuda else 13
        cuda.runtime = types.SimpleNamespace(getDeviceCount=lambda: 1,
                                             runtimeGetVersion=lambda: fake.cuda_version
                                             or major * 1000)
        cp.cuda = cuda
        cp.RawModule = lambda code, options=(), **kw: FakeModule(fake, code, tuple(options))

        def from_dlpack(x):
            assert isinstance(x, torch.Tensor), f"from_dlpack got {type(x)}"
            assert not x.requires_grad, "from_dlpack of a tensor that requires grad"
            return FakeArray(x)

        cp.from_dlpack = from_dlpack
        return cp
