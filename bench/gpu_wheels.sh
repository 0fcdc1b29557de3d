#!/usr/bin/env bash
# Fetch, on this machine (PyPI reachable), the wheels bench/gpu_check.sh needs that the GPU device
# image lacks, into .whl/ (git-ignored). The image (read 2026-11: Python 3.12, torch 2.11 + CUDA 13,
# triton 3.6, transformers 5.17, onnx, onnxruntime, accelerate, pytest) has everything else the GPU
# tests and benchmarks import. A device call then carries .whl (`carry: [".whl"]`) and gpu_check.sh
# installs them into a private target with --no-index --no-deps first:
#     bash bench/gpu_wheels.sh && bash bench/gpu_check.sh --dry-run     # here
#     run(command="bash bench/gpu_check.sh", carry=[".whl"])            # there
# Pure-Python wheels, pinned to versions whose needs the image meets (fla 0.6: transformers >= 5.6.2,
# einops; liger-kernel: torch, triton); a second version of one package would break the install.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${DEST:-.whl}"
PY="${PY:-$(command -v .venv/bin/python || command -v python3)}"
WHEELS=(
    "fla-core==0.6.0"                # flash-linear-attention's kernels: the engine's Gated DeltaNet
    "flash-linear-attention==0.6.0"  # its package front (imports fla-core)
    "liger-kernel==0.8.5"            # the GRPO benchmark's Liger row
)
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${WHEELS[@]}"
ls -l "$DEST"
du -sh "$DEST"
