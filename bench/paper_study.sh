#!/usr/bin/env bash
# The paper's study on a lent card, one device call at a time (bench/paper_study.py; docs/gpu.md,
# "The paper's whole study on a card"). What the call must bring back goes to $OUT: the slices'
# trials and meta-loops (CSV.gz), their timings (JSON lines), the Ray check's JSON, and one log.
#
#   bash bench/paper_study.sh [STEP...] [ARGS]   # the steps in the order given, default `run`:
#     run    the next slices (tf32, psa's default) within what is left of PSA_PAPER_SECONDS (550)
#     fp32   the architectures whose cells or regime disagree with the published ones in the
#            slices exported so far (committed and in $OUT), rerun in fp32 (`--arch A B` names others)
#     ray    --backend ray on a local Ray instance against local (at most PSA_RAY_SECONDS, 180)
#     profile  bench/gpu_profile.py: where a loop's time goes in each class of net, and what
#            populations in flight buy (at most PSA_PROFILE_SECONDS, 150; one file, gpu-profile.json)
#     sweep  bench/stack_sweep.py: the stack kernels' launch settings timed on deep squares and
#            deep narrow nets (at most PSA_SWEEP_SECONDS, 100; one file, stack-sweep.json)
#     selftest  `psa selftest --quick` (at most PSA_SELFTEST_SECONDS, 90; into the log): the fast
#            paths against the plain ones on this card. If it fails, the steps after it are skipped:
#            their numbers would not be the engine's arithmetic
#   bash bench/paper_study.sh ray-pack           # HERE, not on the card: Ray for the card, in .ray/
#   PSA_PAPER_CPU=1 PY=.venv/bin/python bash bench/paper_study.sh run   # the same on a CPU, tiny sizes
#
# ARGS go to every `bench/paper_study.py run` (e.g. `--slice s03`, `--concurrency 4`,
# `--no-dry-run`); PSA_RAY_ARGS to `bench/paper_study.py ray`. All steps share one deadline,
# PSA_PAPER_SECONDS from the script's start; the device call's timeout_s must exceed it (590 for
# 550): a slice starts only if it is predicted to end in time and `timeout` stops one that does
# not, so every slice that finished is in $OUT even then. $OUT gets at most 8 files (the device
# tool's limit): per precision run, a trials CSV.gz, a meta-loops CSV.gz and a JSON-lines file;
# the Ray JSON; paper_study.log. Exit 0 when every step succeeded, 2 for a usage error.
set -u -o pipefail
cd "$(dirname "$0")/.."
STEPS=()
while [ $# -gt 0 ] && [[ "$1" != -* ]]; do
    STEPS+=("$1")
    shift
done
[ ${#STEPS[@]} -eq 0 ] && STEPS=(run)
PY="${PY:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
DEADLINE="${PSA_PAPER_SECONDS:-550}"
RAY_SECONDS="${PSA_RAY_SECONDS:-180}"
PROFILE_SECONDS="${PSA_PROFILE_SECONDS:-150}"
SELFTEST_SECONDS="${PSA_SELFTEST_SECONDS:-90}"
SWEEP_SECONDS="${PSA_SWEEP_SECONDS:-100}"
RESERVE=10  # seconds kept for the last lines of the log
SIZE=()
PROFILE_SIZE=()
SWEEP_SIZE=()
SWEEP_ENV=()
SELFTEST_DEVICE=()
if [ "${PSA_PAPER_CPU:-0}" = "1" ]; then
    SIZE=(--tiny --device cpu)
    SELFTEST_DEVICE=(--device cpu)
    PROFILE_SIZE=(--device cpu --arch 1*8 --small 1*2 --k 1 2 --steps 2 --members 2 --loops 1)
    SWEEP_SIZE=(--device cpu --arch 3*40 --members 2 --rows 16 --reps 1 --quick)
    SWEEP_ENV=(env TRITON_INTERPRET=1)  # on a CPU the kernels run in Triton's interpreter
fi
read -r -a RAY_ARGS <<<"${PSA_RAY_ARGS:-}"

versions() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "
import sys, torch
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')
try:
    import triton; print('triton', triton.__version__)
except ImportError as e: print('triton missing:', e)
"
}

left() {  # seconds left before the deadline, less the reserve
    echo $((DEADLINE - SECONDS - RESERVE))
}

timed() {  # timed LIMIT COMMAND...: under `timeout`, at most LIMIT s and never past the deadline
    local limit="$1"
    shift
    [ "$(left)" -lt "$limit" ] && limit=$(left)
    if [ "$limit" -lt 30 ]; then
        echo "no time left ($limit s) for: $*"
        return 124
    fi
    timeout --kill-after=5 "$limit" "$@"
}

slices() {  # slices auto|fp32 ARGS...: the next slices of that precision within the time left
    local flag="$1"
    shift
    date -u +"== $flag: start %Y-%m-%dT%H:%M:%SZ"
    # slices are started only if predicted to end inside the budget; `timeout` ends one that overruns
    timed "$(left)" "$PY" bench/paper_study.py run --out "$OUT" --budget $(($(left) - 5)) \
        --precision "$flag" "${SIZE[@]}" "$@"
    local st=$?
    echo "== $flag: exit $st after $SECONDS s"
    return $st
}

ray_check() {
    echo "== ray"
    if ! "$PY" -c "import ray" 2>/dev/null; then
        if [ -f .ray/ray.tar.xz ]; then
            # carried by the call (carry: [".ray"]), made by `ray-pack` on the session's machine
            mkdir -p /tmp/raysite && tar -xJf .ray/ray.tar.xz -C /tmp/raysite
            export PYTHONPATH="$PYTHONPATH:/tmp/raysite"
        else
            echo "no Ray here and no .ray/ray.tar.xz carried: run 'bash bench/paper_study.sh ray-pack' first"
        fi
    fi
    timed "$RAY_SECONDS" "$PY" bench/paper_study.py ray --out "$OUT" "${SIZE[@]}" "${RAY_ARGS[@]}"
    local st=$?
    echo "== ray: exit $st after $SECONDS s"
    return $st
}

profile_check() {
    echo "== profile"
    timed "$PROFILE_SECONDS" "$PY" bench/gpu_profile.py --out "$OUT/gpu-profile.json" "${PROFILE_SIZE[@]}"
    local st=$?
    echo "== profile: exit $st after $SECONDS s"
    return $st
}

sweep_check() {
    echo "== sweep"
    # it stops timing new settings 15 s before its limit (timed's), and writes what it has after each case
    local limit="$SWEEP_SECONDS"
    [ "$(left)" -lt "$limit" ] && limit=$(left)
    timed "$limit" "${SWEEP_ENV[@]}" "$PY" bench/stack_sweep.py --out "$OUT/stack-sweep.json" \
        --seconds $((limit - 15)) "${SWEEP_SIZE[@]}"
    local st=$?
    echo "== sweep: exit $st after $SECONDS s"
    return $st
}

selftest_check() {
    echo "== selftest"
    timed "$SELFTEST_SECONDS" "$PY" -m psa selftest --quick "${SELFTEST_DEVICE[@]}"
    local st=$?
    echo "== selftest: exit $st after $SECONDS s"
    return $st
}

out_check() {  # what the device tool brings back: at most 8 files of at most 16 MiB
    local n big
    n=$(find "$OUT" -type f | wc -l)
    big=$(find "$OUT" -type f -size +16M)
    ls -l "$OUT"
    echo "$n files in \$OUT (the device tool brings back 8 at most)${big:+; over 16 MiB, left behind: $big}"
    [ "$n" -le 8 ] && [ -z "$big" ]
}

ray_pack() {
    # The card's image has no Ray, and its wheel (80 MB) is larger than a call may carry (64 MiB
    # with the working tree). So: Ray's wheel and the packages it needs that the image lacks
    # (jsonschema and its own) for the card's Python (3.12, x86-64), unpacked, without what a
    # local instance never loads (Java jars, RLlib, Data, Serve, Tune, Train, the dashboard's web
    # client), its programs stripped, in one xz archive (gcs_server, raylet and _raylet.so share
    # most of their code, which a solid archive stores once).
    local pyv="${RAY_PY:-312}" rayv="${RAY_VERSION:-2.60.0}" dl
    dl="$(mktemp -d -t psa-ray-pack.XXXXXX)"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyv" --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        -d "$dl" "ray==$rayv" jsonschema jsonschema-specifications referencing rpds-py || return 1
    # unpacked keeping the wheels' executable bits (Ray's gcs_server and raylet are programs)
    "$PY" - "$dl/site" "$dl"/*.whl <<'EOF'
import os, sys, zipfile
for wheel in sys.argv[2:]:
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            path = z.extract(info, sys.argv[1])
            if (info.external_attr >> 16) & 0o111:
                os.chmod(path, 0o755)
EOF
    (cd "$dl/site/ray" && rm -rf jars rllib data serve tune train llm dashboard/client/build) || return 1
    find "$dl/site" -name '*.js.map' -delete
    strip "$dl/site/ray/core/src/ray/gcs/gcs_server" "$dl/site/ray/core/src/ray/raylet/raylet"
    strip --strip-unneeded "$dl/site/ray/_raylet.so"
    mkdir -p .ray  # ignored (.gitignore): it travels only when a call names it in carry
    tar -C "$dl/site" -cf - . | xz "-${RAY_XZ_LEVEL:-9e}" -T1 >.ray/ray.tar.xz
    rm -rf "$dl"
    local tree pack
    tree=$(git ls-files -z | xargs -0 stat -c %s | awk '{s += $1} END {print s}')
    pack=$(stat -c %s .ray/ray.tar.xz)
    echo ".ray/ray.tar.xz: $((pack / 1048576)) MiB; tracked files $((tree / 1048576)) MiB;" \
        "together $(((tree + pack) / 1048576)) MiB of the 64 MiB a call carries"
    [ $((tree + pack)) -lt $((64 * 1048576)) ] || { echo "too large to carry"; return 1; }
}

for step in "${STEPS[@]}"; do
    case "$step" in
    run | fp32 | ray | profile | sweep | selftest) ;;
    ray-pack)
        [ ${#STEPS[@]} -eq 1 ] || { echo "ray-pack runs here, on its own, not on the card" >&2; exit 2; }
        ray_pack
        exit $?
        ;;
    *)
        echo "usage: bash bench/paper_study.sh [run|fp32|ray|profile|sweep|selftest]... [ARGS] | ray-pack" >&2
        exit 2
        ;;
    esac
done
usage_error() {
    echo "bench/paper_study.sh: $*" >&2
    exit 2
}
[ -n "${OUT:-}" ] || usage_error "set OUT: the folder the device tool brings back"
[[ "$DEADLINE" =~ ^[0-9]+$ ]] || usage_error "PSA_PAPER_SECONDS must be whole seconds, not '$DEADLINE'"
[[ "$RAY_SECONDS" =~ ^[0-9]+$ ]] || usage_error "PSA_RAY_SECONDS must be whole seconds, not '$RAY_SECONDS'"
[[ "$PROFILE_SECONDS" =~ ^[0-9]+$ ]] || usage_error "PSA_PROFILE_SECONDS must be whole seconds, not '$PROFILE_SECONDS'"
[[ "$SELFTEST_SECONDS" =~ ^[0-9]+$ ]] ||
    usage_error "PSA_SELFTEST_SECONDS must be whole seconds, not '$SELFTEST_SECONDS'"
[[ "$SWEEP_SECONDS" =~ ^[0-9]+$ ]] || usage_error "PSA_SWEEP_SECONDS must be whole seconds, not '$SWEEP_SECONDS'"
mkdir -p "$OUT" || usage_error "cannot make OUT=$OUT"
# One log for the whole call, whatever its steps: with a pack of three files per precision and
# the Ray check's JSON, `run fp32 ray` brings back 8 files, the device tool's most.
exec > >(tee -a "$OUT/paper_study.log") 2>&1
TEE=$!
date -u +"start %Y-%m-%dT%H:%M:%SZ; steps: ${STEPS[*]}; deadline ${DEADLINE} s"
versions
rc=0
for step in "${STEPS[@]}"; do
    case "$step" in
    run) slices auto "$@" || rc=1 ;;
    fp32) slices fp32 "$@" || rc=1 ;;
    ray) ray_check || rc=1 ;;
    profile) profile_check || rc=1 ;;
    sweep) sweep_check || rc=1 ;;
    selftest)
        if ! selftest_check; then
            rc=1
            echo "the selftest failed: the steps after it are skipped"
            break
        fi
        ;;
    esac
done
out_check || rc=1
echo "exit $rc after $SECONDS s"
exec >&- 2>&-  # tee ends at the end of its input: wait for it, so the log is whole when the call returns
wait "$TEE" 2>/dev/null
exit $rc
