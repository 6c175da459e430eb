"""benchmarks/bench_stbp_step.py: timing the reference's own step from a checkout of its folder.

The checkout is stood in for by three small modules with the reference's module names and
interfaces (``Q_Conv_SNN(outs, decay, thresh, lens, batch_size, timesteps, mode)``, ``QConv2d`` /
``QLinear`` with ``scale``/``factor``/``b``, ``constraint.apply(w, scale, factor, b, ucs)``),
calling ``.cuda()`` as the reference does; their maths is the reference-style baseline's, so one
step of each from the same start must give the same weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from pipelines import pipeline_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench():
    """benchmarks/bench_stbp_step.py with the STBP folder's modules (its ``engine``,
    ``q_model``, ``functions``) importable, other pipelines' same-named modules set aside."""
    path = list(sys.path)
    with pipeline_path(ROOT / "CBP-QSNN-STBP"), pipeline_path(ROOT / "benchmarks"):
        import bench_stbp_step

        yield bench_stbp_step
        sys.modules.pop("bench_stbp_step", None)
    sys.path[:] = path  # the script puts its folders first on import


FAKE = {
    "functions.py": "MARK = 'theirs'\n",
    "q_module.py": '''
import torch
from torch import nn
import baseline

class _Q:
    def _setup(self, mode):
        self.scale = nn.Parameter(torch.ones(1).cuda())
        self.mode = mode
        self.factor, self.b = ([-1, 1], [0.0]) if mode == "bin" else ([-1, 0, 1], [-0.5, 0.5])

class QConv2d(nn.Conv2d, _Q):
    def __init__(self, *a, mode="bin", **k):
        super().__init__(*a, **k)
        self._setup(mode)

class QLinear(nn.Linear, _Q):
    def __init__(self, *a, mode="bin"):
        super().__init__(*a)
        self._setup(mode)

class constraint:
    @staticmethod
    def apply(w, scale, factor, b, ucs):
        torch.zeros(1).cuda()
        return baseline._RefConstraint.apply(w, scale, "bin" if len(b) == 1 else "ter", ucs)
''',
    "q_model.py": '''
from torch import nn
import baseline
from q_module import QConv2d, QLinear

class Q_Conv_SNN(nn.Module):
    def __init__(self, outs, decay, thresh, lens, batch_size, timesteps, mode):
        super().__init__()
        self.decay, self.thresh, self.lens, self.T = decay, thresh, lens, timesteps
        c = [8, 16, 16, 32, 32, 64, 128]
        self.conv1 = nn.Conv2d(3, c[0], 3, 1, 1)
        for name, i, o, s in (("pool1", 0, 1, 2), ("conv2", 1, 2, 1), ("pool2", 2, 3, 2),
                              ("conv3", 3, 4, 1), ("conv4", 4, 5, 1), ("pool3", 5, 6, 2)):
            setattr(self, name, QConv2d(c[i], c[o], 3, s, 1, mode=mode))
        self.fc1 = QLinear(2048, 64, mode=mode)
        self.fc2 = QLinear(64, 32, mode=mode)
        self.fc3 = nn.Linear(32, outs)

    def forward(self, x):
        return baseline.stbp_reference_forward(self, x)
''',
}


@pytest.fixture
def checkout(tmp_path):
    for name, text in FAKE.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_reference_step_is_their_code_from_our_start_and_leaves_our_modules(bench, checkout):
    import functions
    import q_model

    ours_step, base_step, ours, ctl = bench.build(0.0625, 2, "bin", torch.device("cpu"))
    start = {k: v.clone() for k, v in ours.state_dict().items()}
    ref_step = bench.reference_step(str(checkout), ours, ctl.lambdas, ctl.ucs, 3, 2, "bin",
                                    torch.device("cpu"))
    assert sys.modules["q_model"] is q_model and sys.modules["functions"] is functions
    assert str(checkout) not in sys.path
    with pytest.raises((AssertionError, RuntimeError)):  # .cuda() is itself again
        torch.zeros(1).cuda()

    model = ref_step.model
    assert type(model).__module__ == "q_model" and type(model) is not q_model.Q_Conv_SNN
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(3, 3, 32, 32, generator=g), torch.randint(0, 10, (3,), generator=g)
    for _ in range(2):  # the second step also checks the momentum
        ref_step(x, y)
    for _ in range(2):
        base_step(x, y)
    theirs, base = model.state_dict(), base_step.model.state_dict()
    moved = [k for k in base if not torch.equal(base[k], start[k])]
    assert "fc1.weight" in moved and "pool1.weight" in moved
    for k in base:
        torch.testing.assert_close(theirs[k], base[k], rtol=0, atol=1e-6, msg=k)


def test_reference_dir_refusals(bench, checkout, tmp_path):
    _, _, ours, ctl = bench.build(0.0625, 1, "bin", torch.device("cpu"))
    with pytest.raises(SystemExit, match=r"lacks functions\.py, q_module\.py, q_model\.py"):
        bench.reference_step(str(tmp_path / "nowhere"), ours, ctl.lambdas, ctl.ucs, 1, 1, "bin",
                             torch.device("cpu"))
    _, _, wide, wctl = bench.build(0.125, 1, "bin", torch.device("cpu"))
    with pytest.raises(SystemExit, match="paper-width network only: use --width 1"):
        bench.reference_step(str(checkout), wide, wctl.lambdas, wctl.ucs, 1, 1, "bin",
                             torch.device("cpu"))
