#!/usr/bin/env bash
# GPU check in one call: every `gpu`-marked test plus the GPU benchmarks (TSSL-BP neuron at the
# CIFAR-10 conv shapes: CuPy vs torch backend vs the reference-style loop; the CBP constraint
# and an STBP step on the GPU; the full STBP CBP step at paper width vs a reference-style step;
# a SEW-ResNet step with and without AMP), then a short report.
#
#   tools/gpu_check.sh                 # on a CUDA machine (about 5 minutes on one H100)
#   tools/gpu_check.sh --require-gpu   # exit 1 when no CUDA device is visible
#   tools/gpu_check.sh --no-bench      # the tests only
#
# Needs no network and no install: `cbp` is imported from the checkout through PYTHONPATH, and
# pure-Python packages missing from the interpreter (spikingjelly, loguru) are installed from
# tools/gpu_wheels/ (filled beforehand by tools/fill_gpu_wheels.sh) into a temporary folder
# with `pip install --no-index --no-deps --target`.  Without CUDA the GPU tests skip and the
# benchmarks run small on the CPU, so the script can be tried anywhere.
#
# Environment: PYTHON (default python3), OUT (a folder for the logs and report.md; default a
# temporary folder), GPU_CHECK_WHEELS (default tools/gpu_wheels).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
REQUIRE_GPU=0
BENCH=1
for arg in "$@"; do
    case "$arg" in
        --require-gpu) REQUIRE_GPU=1 ;;
        --no-bench) BENCH=0 ;;
        *) echo "error: unknown option $arg (options: --require-gpu, --no-bench)" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "error: $PY not found (set PYTHON)" >&2
    exit 2
fi
LOGS=${OUT:-$(mktemp -d)}
mkdir -p "$LOGS" || { echo "error: cannot create $LOGS" >&2; exit 2; }
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
WHEELS=${GPU_CHECK_WHEELS:-tools/gpu_wheels}
export CBP_NO_PROGRESS=1
export PYTHONPATH="$ROOT/common:$SITE${PYTHONPATH:+:$PYTHONPATH}"

echo "== packages"
missing=()
for mod in torch numpy yaml pytest; do
    "$PY" -c "import $mod" >/dev/null 2>&1 || missing+=("$mod")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "error: $PY lacks ${missing[*]}; these are not pure-Python wheels this script carries" >&2
    exit 2
fi
to_install=()
shopt -s nullglob
for whl in "$WHEELS"/*.whl; do
    base=$(basename "$whl")
    mod=$(echo "${base%%-*}" | tr 'A-Z-' 'a-z_')
    if "$PY" -c "import $mod" >/dev/null 2>&1; then
        echo "have $mod"
    else
        to_install+=("$whl")
        echo "installing $base"
    fi
done
if [ ${#to_install[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${to_install[@]}" \
        || { echo "error: installing ${to_install[*]} failed" >&2; exit 2; }
fi
"$PY" -c "import spikingjelly" >/dev/null 2>&1 \
    || echo "note: no spikingjelly (fill $WHEELS with tools/fill_gpu_wheels.sh); SEW tests skip"

echo "== environment"
"$PY" - <<'EOF' | tee "$LOGS/env.txt"
import platform, torch, cbp
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("cbp from", cbp.__file__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU only)")
import importlib.metadata as md
for name, dist in (("cupy", None), ("spikingjelly", "spikingjelly")):
    try:
        mod = __import__(name)
        version = md.version(dist) if dist else mod.__version__
        extra = f", {mod.cuda.runtime.getDeviceCount()} device(s)" if name == "cupy" else ""
        print(f"{name} {version}{extra}")
    except Exception as exc:
        print(name, "unavailable:", type(exc).__name__, exc)
EOF
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    GPU=1
else
    GPU=0
    if [ "$REQUIRE_GPU" -eq 1 ]; then
        echo "error: no CUDA device visible to torch" >&2
        exit 1
    fi
fi

echo "== gpu-marked tests"
# the project's pytest options need pytest-xdist, which a bare image may lack: override them
"$PY" -m pytest -q -o addopts="" -p no:cacheprovider -m gpu -rs tests 2>&1 | tee "$LOGS/tests.txt"
test_rc=${PIPESTATUS[0]}

echo "== benchmarks"
bench_rc=0
run_bench() {  # name, then the command
    local name=$1
    shift
    echo "-- $name"
    "$PY" "$@" 2>&1 | tee "$LOGS/$name.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || bench_rc=$rc
}
if [ "$BENCH" -eq 0 ]; then
    echo "(skipped: --no-bench)"
elif [ "$GPU" -eq 1 ]; then
    run_bench bench_tsslbp benchmarks/bench_tsslbp.py --device cuda --conv-shapes --repeat 10
    run_bench bench_tsslbp_cpu benchmarks/bench_tsslbp.py --device cpu --repeat 3
    run_bench bench_cbp benchmarks/bench_cbp.py --device cuda --width 1.0 --repeat 5
    run_bench bench_stbp_step benchmarks/bench_stbp_step.py --device cuda --batch 50 --T 8 --repeat 5
    run_bench bench_sew benchmarks/bench_sew.py --device cuda --repeat 5
else
    run_bench bench_tsslbp_cpu benchmarks/bench_tsslbp.py --device cpu --small --repeat 1
    run_bench bench_cbp benchmarks/bench_cbp.py --modes bin --width 0.0625 --batch 4 --repeat 1
    run_bench bench_stbp_step benchmarks/bench_stbp_step.py --width 0.0625 --repeat 1
    run_bench bench_sew benchmarks/bench_sew.py --device cpu --repeat 1
fi

echo
echo "== report"
"$PY" - "$LOGS" "$GPU" "$test_rc" "$bench_rc" <<'EOF' | tee "$LOGS/report.md"
import glob, os, re, sys
logs, gpu, test_rc, bench_rc = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
env = open(os.path.join(logs, "env.txt")).read().strip().splitlines()
tests = open(os.path.join(logs, "tests.txt")).read().strip().splitlines()
print("# GPU check")
print()
for line in env:
    print(f"- {line}")
print(f"- gpu-marked tests: {tests[-1] if tests else '?'} (exit {test_rc})")
if gpu and " passed" not in (tests[-1] if tests else ""):
    print("- WARNING: no gpu test passed")
if not gpu:
    print("- no CUDA device: GPU tests skipped, benchmarks ran small on the CPU")
# goals at the CIFAR-10 conv_2 shape (small shapes are dominated by per-call costs)
goals = {"(50, 256, 32, 32, 5), cuda: cupy backend vs reference loop": 20.0,
         "(50, 256, 32, 32, 5), cpu: torch backend vs reference loop": 2.0}
print()
print("| benchmark | baseline (s) | ours (s) | ratio | goal |")
print("|---|---|---|---|---|")
for path in sorted(glob.glob(os.path.join(logs, "bench_*.txt"))):
    for ln in open(path):
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if not ln.startswith("|") or len(cells) != 4 or cells[0] in ("benchmark", "---"):
            continue
        goal = next((g for k, g in goals.items() if k in cells[0]), None)
        verdict = ""
        if goal is not None:
            ratio = float(re.sub(r"x.*", "", cells[3]))
            verdict = f">= {goal:g}x: " + ("ok" if ratio >= goal else "BELOW GOAL")
        print(f"| {' | '.join(cells)} | {verdict} |")
print()
print(f"benchmarks exit {bench_rc}; logs in {logs}")
EOF
[ "$test_rc" -eq 0 ] || [ "$test_rc" -eq 5 ] || exit 1
[ "$bench_rc" -eq 0 ] || exit 1
exit 0
