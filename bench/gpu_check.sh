#!/usr/bin/env bash
# GPU check for a lent H100/H200 machine: environment, the GPU-marked tests, the score-head
# benchmark, then a short summary table (printed last). Run from the repo root:
#     OUT=/some/dir bash bench/gpu_check.sh        # OUT defaults to ./gpu_out
# Downloads nothing. Uses .venv/bin/python when it has a CUDA torch, else the system python3
# (pytest is borrowed from .venv if the system python lacks it). Each step runs under
# `timeout`; a failing step does not stop the others, but the script exits non-zero.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
FAILED=()
step() {  # step NAME SECONDS CMD...: run with a timeout, record failure, keep going
    local name=$1 secs=$2; shift 2
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
for cand in .venv/bin/python python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && has_cuda_torch "$cand"; then PY=$(command -v "$cand"); break; fi
done
echo "=== nvidia-smi"; timeout 30 nvidia-smi || FAILED+=("nvidia-smi")
if [ -z "$PY" ]; then
    echo "no python with a CUDA torch found (.venv/bin/python, python3, python)"
    for cand in .venv/bin/python python3; do
        command -v "$cand" >/dev/null 2>&1 && timeout 120 "$cand" -c \
            "import sys, torch; print(sys.executable, torch.__version__, 'cuda', torch.cuda.is_available())"
    done
    exit 1
fi

# pytest for a system python that lacks it: expose only pytest and its pure-python deps from
# .venv (not the whole site-packages, whose CPU torch would shadow the CUDA one).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
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
import sys, platform, torch
print('python', sys.version.split()[0], sys.executable, platform.platform())
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
try:
    import triton; print('triton', triton.__version__)
except Exception as e:
    print('triton: not importable:', e)
try:
    import pytest; print('pytest', pytest.__version__)
except Exception as e:
    print('pytest: not importable:', e)
"

# The kernels dispatch to the interpreter only for TRITON_INTERPRET == "1"; conftest uses
# setdefault, so exporting 0 here keeps the compiled GPU kernels.
export TRITON_INTERPRET=0
step gpu_tests 240 bash -o pipefail -c "'$PY' -m pytest -m gpu tests -q -rs 2>&1 | tee '$OUT/gpu_tests.txt'"

step bench_score_head 300 "$PY" bench/bench_score_head.py --device cuda --N 4096 --H 4096 --V 248320 \
    --K 9 --dtype bf16 --out-dir "$OUT"

echo "=== summary ($OUT/score_head.csv)"
if [ -f "$OUT/score_head.csv" ]; then
    "$PY" - "$OUT/score_head.csv" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
if rows:
    r0 = rows[0]
    print(f"score head fwd+bwd N={r0['N']} H={r0['H']} V={r0['V']} K={r0['K']} {r0['dtype']} on {r0['device']}")
print(f"{'impl':18s} {'W grad':6s} {'ms':>9s} {'peak MB':>9s} {'speedup':>8s}  note")
for r in rows:
    sp = f"{float(r['speedup_vs_gathered_eager']):.2f}x" if r["speedup_vs_gathered_eager"] else ""
    print(f"{r['impl']:18s} {r['weight_grad']:6s} {r['ms_median'] or '-':>9s} {r['peak_mem_mb'] or '-':>9s} "
          f"{sp:>8s}  {r['note'][:70]}")
EOF
else
    echo "no CSV produced"; FAILED+=("csv")
fi
if [ ${#FAILED[@]} -ne 0 ]; then
    echo "FAILED steps: ${FAILED[*]}"
    exit 1
fi
echo "all steps passed"
