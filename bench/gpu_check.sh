#!/usr/bin/env bash
# One short check of psa's GPU paths on a card (H100/H200, torch + Triton preinstalled, psa not
# installed): at most PSA_CHECK_SECONDS (360) seconds, every step under its own timeout, a failed
# step does not stop the next. Logs go to $OUT (default: a new temporary folder); the last thing printed is
# gpu_study's table.
#
#   bash bench/gpu_check.sh                         # on the GPU machine, from the repository root
#   PSA_CHECK_CPU=1 PY=.venv/bin/python bash bench/gpu_check.sh   # a dry run on a CPU, tiny sizes
#
# Steps: nvidia-smi; versions; the kernel tests and the engine-path tests (compiled kernels,
# graph against eager, GPU against CPU); a small concurrent `psa study` (short epochs, streams,
# precompiled kernels); bench/gpu_study.py on a few representative architectures.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d -t psa-gpu-check.XXXXXX)}"
mkdir -p "$OUT"
PY="${PY:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
CPU="${PSA_CHECK_CPU:-0}"
# the whole check ends by this many seconds (each step's limit is cut to what is left, less what
# the later steps are promised)
DEADLINE="${PSA_CHECK_SECONDS:-360}"
declare -a SUMMARY=()

step() {  # step NAME LIMIT RESERVE COMMAND...: under `timeout` (at most LIMIT s, and RESERVE s left
          # for the later steps), log to $OUT/NAME.log, note the outcome
    local name="$1" limit="$2" reserve="$3"
    shift 3
    local left=$((DEADLINE - SECONDS - reserve))
    [ "$left" -lt "$limit" ] && limit=$left
    local t0=$SECONDS
    if [ "$limit" -lt 10 ]; then
        SUMMARY+=("$(printf '%-10s %-28s %4ds' "$name" "SKIPPED (no time left)" 0)")
        return
    fi
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 12 "$OUT/$name.log"
    local what="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        what="TIMED OUT after ${limit}s"
    elif [ "$rc" -ne 0 ]; then
        what="FAILED (exit $rc)"
    fi
    SUMMARY+=("$(printf '%-10s %-28s %4ds' "$name" "$what" $((SECONDS - t0)))")
}

if [ "$CPU" = "1" ]; then
    DEVICE=cpu
    TEST_SELECT=(-k "narrow_stack_rounds or warm_up or out_of_memory_frees or kernel_launches_foresee")
    ARCHS=("1*8" "4*2")
    STEPS=2
else
    DEVICE=cuda
    TEST_SELECT=()
    # wide (tensor cores), deep narrow (stack kernels' per-layer latency), mid, deep wide (cuBLAS
    # per layer under kernels=auto)
    ARCHS=("1*2048" "2048*1" "632*4" "8*8" "32*32" "115*115")
    STEPS=16
fi
TIMEOUT_ARGS=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    TIMEOUT_ARGS=(--timeout=100)
fi

step nvidia-smi 15 320 nvidia-smi
step versions 40 300 "$PY" -c "
import sys, torch
print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda)
try:
    import triton; print('triton', triton.__version__)
except ImportError as e: print('triton missing:', e)
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f'cuda:{i}', p.name, f'{p.total_memory / 2**30:.1f} GiB', f'sm_{p.major}{p.minor}')
else: print('no CUDA device')
from psa.core.kernels import triton_stack; print('psa kernels available:', triton_stack.available())
"
# the engine first (graphs against eager, GPU against CPU, the fixes' tests; ResMLP, the variants and
# the torch.func population too), then the kernels
# compiled (many variants: compile-bound); separate runs, so that -x in one hides nothing of
# the other
step engine 110 250 "$PY" -m pytest -x -q -p no:cacheprovider --durations=8 "${TIMEOUT_ARGS[@]}" \
    "${TEST_SELECT[@]}" tests/test_engine_paths.py tests/test_gpu_paths.py
step kernels 130 150 "$PY" -m pytest -x -q -p no:cacheprovider --durations=8 "${TIMEOUT_ARGS[@]}" \
    "${TEST_SELECT[@]}" tests/test_kernels.py
# 700 images: two batches and a tail (the graph warm-up's short-epoch case); three populations in
# flight on their slots' streams, their kernels compiled up front
step study 45 100 "$PY" -m psa study --arch "3*4" --arch "2*8" --arch "1*20" --trials 2 --meta-loops 3 \
    --train-subset 700 --population-size 6 --concurrency 3 --device "$DEVICE" --name gpucheck --db "$OUT/check.sqlite" --quiet
step status 10 90 "$PY" -m psa status --db "$OUT/check.sqlite"
step gpu_study 120 0 "$PY" bench/gpu_study.py --device "$DEVICE" --arch "${ARCHS[@]}" --steps "$STEPS" --loops 1 \
    --out "$OUT/gpu_study.json"

echo
echo "== summary (logs in $OUT)"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
echo
echo "== gpu_study"
# the table and its total, last
sed -n '/gpu_study on/,$p' "$OUT/gpu_study.log" | tail -n 30
