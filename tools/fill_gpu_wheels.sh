#!/usr/bin/env bash
# Fill tools/gpu_wheels/ (git-ignored) with the pure-Python wheels that tools/gpu_check.sh
# installs on a GPU machine without network: spikingjelly and what its neuron, layer and
# surrogate modules import beyond torch, numpy, tqdm, matplotlib and scipy (loguru).  Run it
# here, with network, before the check; it downloads a few hundred kB for Python 3.12 on
# manylinux x86-64, never torch.
#
#   tools/fill_gpu_wheels.sh [folder]     # default tools/gpu_wheels
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-tools/gpu_wheels}
PY=${PYTHON:-python}
mkdir -p "$DEST"
SJ=$("$PY" -c "import importlib.metadata as m; print(m.version('spikingjelly'))" 2>/dev/null \
     || echo 2.0.0)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation py --abi none --platform any -d "$DEST" "spikingjelly==$SJ" "loguru>=0.7"
ls -l "$DEST"
