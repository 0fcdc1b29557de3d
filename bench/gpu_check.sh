#!/usr/bin/env bash
# GPU check for a lent H100/H200 machine: environment, the GPU-marked tests, the kernel and engine
# benchmarks, then a short summary table (printed last). Run from the repo root:
#     OUT=/some/dir bash bench/gpu_check.sh        # OUT defaults to ./gpu_out
#     bash bench/gpu_check.sh --dry-run            # every step's plumbing on this CPU machine
# Downloads nothing: the wheels the device image lacks (bench/gpu_wheels.sh fetches them into .whl/
# beforehand; carry .whl) are installed into "$OUT/site" first. Uses .venv/bin/python when it has a
# CUDA torch, else the system python3 (pytest is borrowed from .venv if the system python lacks it).
# Each step runs under `timeout`; a failing step does not stop the others, but the script exits
# non-zero. --dry-run (or DRY_RUN=1) needs no GPU: the same steps with the CPU python, the GPU tests
# collected and skipped, each benchmark at tiny CPU shapes, the engine with --cpu-smoke, the same
# output files: a typo or a missing import fails here, not in device time.
set -u
cd "$(dirname "$0")/.."
DRY_RUN="${DRY_RUN:-0}"
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
FAILED=()
BUDGET_S="${BUDGET_S:-560}"  # the whole script stays inside one 600 s device call
# Which steps to run, in order. The first H200 run (2026-11-30, bench/results/nvidia-h200/README.md)
# took: env 22 s, kernel tests ~150 s, the four kernel benchmarks 162 s, the engine benchmark ~150 s,
# the engine's GPU tests over 100 s (flash-linear-attention autotunes and compiles its kernels cold
# in every process). All of it does not fit one 600 s call, so a device session makes two, the
# second at once while the machine is warm (30 s):
#   STEPS=tests,engine_tests bash bench/gpu_check.sh           # correctness first
#   STEPS=score_head,gdso,risd,grpo,engine bash bench/gpu_check.sh   # then speed
STEPS="${STEPS:-tests,engine_tests,score_head,gdso,risd,grpo,engine}"
want() { [[ ",$STEPS," == *",$1,"* ]]; }
START_S=$SECONDS
step() {  # step NAME SECONDS CMD...: run with a timeout, record failure, keep going
    local name=$1 secs=$2; shift 2
    local left=$((BUDGET_S - (SECONDS - START_S)))
    if [ "$left" -lt 15 ]; then echo "=== [$name] skipped: time budget spent"; FAILED+=("$name(no time)"); return 0; fi
    [ "$secs" -gt "$left" ] && secs=$left
    echo "=== [$name] (timeout ${secs}s) $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$secs" "$@"
    local rc=$?
    echo "=== [$name] rc=$rc in $((SECONDS - t0))s"
    [ "$rc" -ne 0 ] && FAILED+=("$name(rc=$rc)")
    return 0
}

has_cuda_torch() { timeout 120 "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

PY=""
if [ "$DRY_RUN" = 1 ]; then
    for cand in .venv/bin/python python3; do
        if command -v "$cand" >/dev/null 2>&1; then PY=$(command -v "$cand"); break; fi
    done
    echo "=== dry run: $PY, no GPU"
else
    for cand in .venv/bin/python python3 python; do
        if command -v "$cand" >/dev/null 2>&1 && has_cuda_torch "$cand"; then PY=$(command -v "$cand"); break; fi
    done
    echo "=== nvidia-smi"; timeout 30 nvidia-smi || FAILED+=("nvidia-smi")
fi
if [ -z "$PY" ]; then
    echo "no python with a CUDA torch found (.venv/bin/python, python3, python)"
    for cand in .venv/bin/python python3; do
        command -v "$cand" >/dev/null 2>&1 && timeout 120 "$cand" -c \
            "import sys, torch; print(sys.executable, torch.__version__, 'cuda', torch.cuda.is_available())"
    done
    exit 1
fi

# The wheels the device image lacks (fla, liger-kernel: bench/gpu_wheels.sh), into a private target
# that goes first on the path; --no-deps: their needs are in the image.
SITE=""
if compgen -G ".whl/*.whl" >/dev/null; then
    SITE="${TMPDIR:-/tmp}/zreward_fast_gpu_site"  # outside $OUT: only a few files come back from a device call
    echo "=== installing $(ls .whl/*.whl | wc -l) wheels from .whl into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || FAILED+=("wheels")
fi

# pytest for a system python that lacks it: expose only pytest and its pure-python deps from
# .venv (not the whole site-packages, whose CPU torch would shadow the CUDA one).
export PYTHONPATH="${SITE:+$SITE:}$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import pytest" 2>/dev/null; then
    SP=$(ls -d .venv/lib/python3*/site-packages 2>/dev/null | head -1)
    if [ -n "$SP" ]; then
        SHIM="$OUT/.pytest_shim"; mkdir -p "$SHIM"
        for m in pytest _pytest pluggy iniconfig packaging py.py pygments; do
            [ -e "$SP/$m" ] && ln -sfn "$PWD/$SP/$m" "$SHIM/$m"
        done
        export PYTHONPATH="$PYTHONPATH:$PWD/$SHIM"
    fi
fi

step env 120 "$PY" -c "
import importlib, sys, platform, torch
print('python', sys.version.split()[0], sys.executable, platform.platform())
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ('triton', 'pytest', 'transformers', 'fla', 'liger_kernel'):
    try:
        print(name, getattr(importlib.import_module(name), '__version__', 'importable'))
    except Exception as e:
        print(name + ': not importable:', e)
"

# The shapes of docs/architecture.md's performance targets (bf16), side by side in one run; a dry
# run uses the CPU and tiny shapes (the Triton rows under the interpreter, as tests/test_bench_scripts.py).
if [ "$DRY_RUN" = 1 ]; then
    DEV=(--device cpu --repeats 1 --warmup 0)
    SCORE_ARGS=(--interpret --impls eager-gathered,triton --N 32 --H 64 --V 256)
    GDSO_ARGS=(--impls eager,triton --P 4 --G 4 --K 9)
    RISD_ARGS=(--interpret --impls eager-gathered,triton --N 32 --H 64 --V 256)
    GRPO_ARGS=(--impls eager,triton --B 2 --T 8 --H 32 --V 256)
    ENGINE_ARGS=(--quick --cpu-smoke --profile)
else
    # The kernels dispatch to the interpreter only for TRITON_INTERPRET == "1"; conftest uses
    # setdefault, so exporting 0 here keeps the compiled GPU kernels.
    export TRITON_INTERPRET=0
    DEV=(--device cuda --dtype bf16)
    SCORE_ARGS=(--N 4096 --H 4096 --V 248320 --K 9)
    GDSO_ARGS=(--P 64 --G 8 --K 9)
    RISD_ARGS=(--N 4096 --H 4096 --V 248320 --K 9)
    GRPO_ARGS=(--B 16 --T 768 --H 4096 --V 248320 --impls eager,eager-native,compile-native,liger,triton
               --chunk auto,512,2048 --repeats 5 --warmup 1 --max-seconds 10)
    ENGINE_ARGS=(--quick --profile)
fi
# only the packages that hold GPU tests: a module that cannot import elsewhere costs no device time.
# -v names each test as it ends and a per-test timeout (pytest-timeout, in the image) fails a stuck
# one, so a step cut short still says which passed and which failed.
PYTEST=("$PY" -m pytest -m gpu -v -rfEs --tb=short -p no:cacheprovider)
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 150)
want tests && step gpu_tests 240 bash -o pipefail -c "$(printf '%q ' "${PYTEST[@]}") tests/kernels 2>&1 | tee '$OUT/gpu_tests.txt'"
want engine_tests && step gpu_engine_tests 300 bash -o pipefail -c "$(printf '%q ' "${PYTEST[@]}") tests/engine 2>&1 | tee '$OUT/gpu_engine_tests.txt'"
want score_head && step bench_score_head 90 "$PY" bench/bench_score_head.py "${DEV[@]}" "${SCORE_ARGS[@]}" --out-dir "$OUT"
want gdso && step bench_gdso_loss 60 "$PY" bench/bench_gdso_loss.py "${DEV[@]}" "${GDSO_ARGS[@]}" --out-dir "$OUT"
want risd && step bench_risd_loss 90 "$PY" bench/bench_risd_loss.py "${DEV[@]}" "${RISD_ARGS[@]}" --out-dir "$OUT"
want grpo && step bench_grpo_loss 180 "$PY" bench/bench_grpo_loss.py "${DEV[@]}" "${GRPO_ARGS[@]}" --out-dir "$OUT"
want engine && step bench_engine 300 "$PY" bench/bench_engine.py "${ENGINE_ARGS[@]}" --out-dir "$OUT"

echo "=== summary ($OUT/summary.csv)"
"$PY" bench/summarize.py "$OUT" || FAILED+=("summary")
# One archive of everything written (a device call brings back at most 8 files):
#   ARCHIVE=$OUT/gpu_check.tgz OUT=/tmp/gpu_out bash bench/gpu_check.sh
if [ -n "${ARCHIVE:-}" ]; then
    tar czf "$ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")" && echo "=== archived $OUT into $ARCHIVE" || FAILED+=("archive")
fi
if [ ${#FAILED[@]} -ne 0 ]; then
    echo "FAILED steps: ${FAILED[*]}"
    exit 1
fi
echo "all steps passed"
