"""GPU scoring engine: the student in PyTorch with static shapes, CUDA graphs, fla kernels and fp8.

``make_scorer(path, backend)`` picks a back end behind one ``score`` API:

* ``"onnx"``: the torch-free :class:`zreward_fast.runtime.Scorer` on an export bundle (imported
  lazily, so choosing a torch back end never loads onnxruntime);
* ``"torch-cuda"`` / ``"torch-cpu"``: a :class:`TorchEngine` on a saved model directory.

All return ``list[dict[str, ScoreResult]]`` from ``score(images, prompts, dimensions=None)`` and
have ``warmup()``, ``dimensions`` and ``scale``. The CPU paths are tested on CPU; the CUDA path
(bf16, CUDA graphs, fla, fp8 ``_scaled_mm``) only by the GPU-marked tests and
``bench/bench_engine.py``.
"""
from __future__ import annotations

import os
from typing import Any

from .fp8 import Fp8Linear, QuantizeReport, quantize_linears
from .torch_engine import DEFAULT_BATCH_BUCKETS, DEFAULT_SEQ_BUCKETS, TorchEngine, load_fla, pick_bucket

BACKENDS = ("onnx", "torch-cuda", "torch-cpu")

__all__ = [
    "BACKENDS",
    "DEFAULT_BATCH_BUCKETS",
    "DEFAULT_SEQ_BUCKETS",
    "Fp8Linear",
    "QuantizeReport",
    "TorchEngine",
    "load_fla",
    "make_scorer",
    "pick_bucket",
    "quantize_linears",
]


def make_scorer(path: str | os.PathLike, backend: str = "onnx", **kwargs: Any) -> Any:
    """A scorer for ``path``: an export bundle (``backend="onnx"``) or a saved model directory
    (``"torch-cuda"``, ``"torch-cpu"``). ``kwargs`` go to ``Scorer`` or :class:`TorchEngine`."""
    if backend == "onnx":
        from ..runtime.scorer import Scorer

        return Scorer(path, **kwargs)
    if backend in ("torch-cuda", "torch-cpu"):
        if "device" in kwargs:
            raise TypeError(f"backend {backend!r} fixes the device; do not pass device=")
        return TorchEngine(path, device=backend.split("-", 1)[1], **kwargs)
    raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
