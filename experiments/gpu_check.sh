#!/usr/bin/env bash
# Every GPU figure the README quotes, from one command on a GPU machine, into one report file:
#
#   BNJAX_DATA_DIR=/path/to/fashion-mnist bash experiments/gpu_check.sh OUTDIR
#
# Needs no network and no pip: jax (CUDA), flax, optax, numpy, matplotlib, tqdm, torch (CUDA), pytest
# (pytest-xdist if present) as installed there; tensorflow-datasets is not needed. BNJAX_DATA_DIR names
# a directory with the four Fashion-MNIST IDX .gz files (default: the Debian package's directory).
# Steps, each logged to OUTDIR/report.txt with its wall time: the device, the test suite, the main job
# cold (empty compilation cache) and warm, its program count, each --precision, the NNX API, the
# training-loop and BN-op benchmark, and the chapter's PyTorch code on the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash experiments/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
REPORT="$OUT/report.txt"
PY=${PYTHON:-python3}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
DATA=(--data-dir "${BNJAX_DATA_DIR:-/usr/share/datasets/fashion-mnist}")
: >"$REPORT"

step() {  # step NAME COMMAND...: runs it, appends its output and wall time to the report
  local name=$1
  shift
  echo "=== $name: $*" | tee -a "$REPORT"
  local t0=$EPOCHREALTIME
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local t1=$EPOCHREALTIME
  tail -n 25 "$OUT/$name.log" >>"$REPORT"
  awk -v n="$name" -v rc="$rc" -v a="$t0" -v b="$t1" 'BEGIN { printf "--- %s: rc %d, %.1f s wall\n\n", n, rc, b - a }' |
    tee -a "$REPORT"
}

step device "$PY" -c "import jax, flax, torch; print(jax.devices(), jax.__version__, flax.__version__, torch.__version__, torch.cuda.is_available())"
workers=()
"$PY" -c "import xdist" 2>/dev/null && workers=(-n 6)
step tests "$PY" -m pytest -q -p no:cacheprovider "${workers[@]}" tests bnjax
CACHE="$OUT/xla-cache"
rm -rf "$CACHE"
step main_cold "$PY" -m experiments.lenet_fmnist "${DATA[@]}" --no-progress --out "$OUT/runs" --overwrite --compile-cache "$CACHE"
step main_warm "$PY" -m experiments.lenet_fmnist "${DATA[@]}" --no-progress --out "$OUT/runs" --overwrite --compile-cache "$CACHE"
step programs env JAX_LOG_COMPILES=1 "$PY" -m experiments.lenet_fmnist "${DATA[@]}" --no-progress --epochs 2 \
  --out "$OUT/runs-log" --overwrite --no-compile-cache
grep -c "Finished XLA compilation" "$OUT/programs.log" | sed 's/^/compiled programs (2 epochs): /' | tee -a "$REPORT"
for precision in default high highest; do
  step "precision_$precision" "$PY" -m experiments.lenet_fmnist "${DATA[@]}" --no-progress --precision "$precision" \
    --out "$OUT/runs-$precision" --overwrite --compile-cache "$CACHE"
done
step nnx "$PY" -m experiments.lenet_fmnist "${DATA[@]}" --no-progress --api nnx --out "$OUT/runs-nnx" --overwrite \
  --compile-cache "$CACHE"
step bench "$PY" -m experiments.bench --out "$OUT/bench.json"
step torch_chapter "$PY" -m experiments.torch_lenet "${DATA[@]}" --device cuda
echo "report: $REPORT"
