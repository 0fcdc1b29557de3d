"""Fused kernels with validation and dispatch.

One file per op (`score_head.py`, ...), each holding its Triton kernels, drivers and autograd
Function. The public functions here validate at the boundary, then run the Triton path when the
tensors are on a CUDA device or when `TRITON_INTERPRET=1` (CPU tests), and the torch reference
(`zreward_fast.reference`) otherwise. Without Triton the package still imports (reference only).

The kernel modules are imported here, before the public functions are defined: importing a
submodule sets the package attribute of the same name, and `score_head` must stay the function.
Reach the module with `from zreward_fast.kernels.score_head import ...` (or sys.modules); an
`import zreward_fast.kernels.score_head as m` resolves to the function.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .. import reference
from ..reference import ScoreHeadOutput
from ._validate import validate_score_head

__all__ = ["ScoreHeadOutput", "score_head", "use_triton"]

try:
    # triton.jit fixes interpreter-or-GPU mode here, at first import of the kernel module.
    from . import score_head as _score_head_kernels
except ImportError:  # no triton: the torch reference serves everything
    _score_head_kernels = None
_HAS_TRITON = _score_head_kernels is not None


def use_triton(device: torch.device | str) -> bool:
    """Whether the Triton kernels serve tensors on `device`."""
    if not _HAS_TRITON:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return True
    # CPU tensors only run under the interpreter, and only if the kernels were built for it.
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and _score_head_kernels.INTERPRET


def score_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    levels: torch.Tensor | Sequence[float],
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> ScoreHeadOutput:
    """Distribution over K score levels from the K score rows of an LM head.

    hidden [N, H]; weight [V, H] (the LM head) and bias [V] or None, indexed by token_ids [K]
    (unique); levels [K] increasing (tensor or floats). Returns fp32 logits, log_probs, probs
    [N, K] and mean, var, entropy [N]; differentiable w.r.t. hidden, weight and bias.
    """
    lv, t = validate_score_head(hidden, weight, token_ids, levels, bias, temperature)
    if use_triton(hidden.device):
        return _score_head_kernels.score_head_triton(hidden, weight, token_ids, lv, bias, t)
    return reference.score_head(hidden, weight, token_ids, lv, bias, t)
