#!/usr/bin/env bash
# GPU check for the TSSL-BP neuron: on a CUDA machine, run every `gpu`-marked test and the GPU
# benchmarks, then print a short report.  Works from a bare checkout (installs what is missing).
#
#   tools/gpu_check.sh            # all gpu tests + full-size benchmark (CIFAR-10 conv_2 shape)
#   tools/gpu_check.sh --small    # smaller benchmark shape
set -uo pipefail
cd "$(dirname "$0")/.."
BENCH_ARGS=("$@")
export CBP_NO_PROGRESS=1
OUT="${GPU_CHECK_OUT:-$(mktemp -d)}"
mkdir -p "$OUT"

# The GPU machine may have no network: install from wheels carried in the checkout when they
# exist (./wheels, filled beforehand with `pip download -d wheels -r requirements-dev.txt`),
# otherwise from the package index.
PIP=(python -m pip install -q)
if [ -d wheels ] && ls wheels/*.whl >/dev/null 2>&1; then
    PIP+=(--no-index --find-links wheels)
fi
if ! python -c "import torch, yaml, sklearn, cbp" >/dev/null 2>&1; then
    echo "== installing requirements (${PIP[*]:4})"
    "${PIP[@]}" -r requirements.txt || exit 2
    python -m pip install -q --no-deps -e . || exit 2
fi
python -c "import pytest, hypothesis" >/dev/null 2>&1 || "${PIP[@]}" pytest hypothesis || exit 2
if ! python -c "import cupy" >/dev/null 2>&1; then
    echo "== installing cupy"
    "${PIP[@]}" cupy-cuda13x || "${PIP[@]}" cupy-cuda12x || true
fi

echo "== environment"
python - <<'EOF' | tee "$OUT/env.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name())
try:
    import cupy
    print("cupy", cupy.__version__, "devices", cupy.cuda.runtime.getDeviceCount())
except Exception as exc:
    print("cupy unavailable:", exc)
EOF
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device visible to torch; nothing to check" >&2
    exit 1
fi

echo "== gpu-marked tests"
python -m pytest -q -m gpu -rs tests 2>&1 | tee "$OUT/tests.txt"
test_rc=${PIPESTATUS[0]}

echo "== benchmarks"
python benchmarks/bench_tsslbp.py --repeat 5 "${BENCH_ARGS[@]}" 2>&1 | tee "$OUT/bench.txt"
bench_rc=${PIPESTATUS[0]}

echo
echo "== report"
echo "tests: $(tail -n 1 "$OUT/tests.txt") (exit $test_rc)"
if grep -q " skipped" "$OUT/tests.txt" && ! grep -q " passed" "$OUT/tests.txt"; then
    echo "WARNING: every gpu test was skipped"
fi
python - "$OUT/bench.txt" <<'EOF'
import re, sys
rows = [ln for ln in open(sys.argv[1]) if ln.startswith("| neuron")]
for ln in rows:
    cells = [c.strip() for c in ln.strip().strip("|").split("|")]
    name, ratio = cells[0], float(re.sub(r"x.*", "", cells[3]))
    goal = None
    if "cupy backend vs reference loop" in name:
        goal = 20.0
    elif "cpu: torch backend vs reference loop" in name:
        goal = 2.0
    verdict = "" if goal is None else ("ok" if ratio >= goal else f"BELOW GOAL {goal:g}x")
    print(f"{name}: {ratio:.1f}x (goal {goal:g}x) {verdict}" if goal else f"{name}: {ratio:.1f}x")
EOF
echo "bench exit $bench_rc; logs in $OUT"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
