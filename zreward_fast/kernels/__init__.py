"""Fused kernels with validation and dispatch.

One file per op (`fused_score_head.py`, `gdso.py`, `grpo.py`, `risd.py`), each holding its Triton
kernels, forward and backward drivers and autograd Function; `score_rows.py` holds what the score
head and RISD share, `utils.py` what all of them do. The public functions here validate at the
boundary, then run the Triton path when the tensors are on a CUDA device or when
`TRITON_INTERPRET=1` (CPU tests), and the torch reference (`zreward_fast.reference`) otherwise.
Without Triton the package still imports (reference only). No kernel module is named like a public
function, so importing one never replaces the function on the package.

Every op takes two keyword-only arguments beside its math: ``validate=False`` skips the boundary
checks, including the ones that read tensor values back to the host (one sync each), for callers
that checked their arguments once (the engine) or capture the op in a CUDA graph; levels must then
be an fp32 tensor on the device, and bad input is the caller's to rule out. ``launch_config``
overrides the Triton launch parameters of the op (its module's ``*LaunchConfig``; None: the
defaults for the device), for tuning and for tests that need several programs at small shapes.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from .. import reference
from ..reference import GDSOOutput, ScoreHeadOutput
from ._validate import validate_gdso, validate_grpo, validate_risd, validate_score_head

__all__ = ["GDSOOutput", "ScoreHeadOutput", "gdso_loss", "grpo_token_loss", "risd_loss", "score_head", "use_triton"]

try:
    # triton.jit fixes interpreter-or-GPU mode here, at first import of the kernel module.
    from . import fused_score_head as _score_head_kernels
except ImportError:  # no triton: the torch reference serves everything
    _score_head_kernels = None
_HAS_TRITON = _score_head_kernels is not None


def _kernel_module(name: str):
    """The op's kernel module, or None when Triton (or the module) is not installed."""
    if not _HAS_TRITON:
        return None
    import importlib

    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name in (f"{__name__}.{name}", "triton"):
            return None
        raise


_gdso_kernels = _kernel_module("gdso")
_grpo_kernels = _kernel_module("grpo")
_risd_kernels = _kernel_module("risd")


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
    *,
    validate: bool = True,
    launch_config: Any = None,
) -> ScoreHeadOutput:
    """Distribution over K score levels from the K score rows of an LM head.

    hidden [N, H]; weight [V, H] (the LM head) and bias [V] or None, indexed by token_ids [K]
    (unique); levels [K] increasing (tensor or floats). Returns fp32 logits, log_probs, probs
    [N, K] and mean, var, entropy [N]; differentiable w.r.t. hidden, weight and bias.
    ``validate=False`` trusts the arguments (see the module docstring); ``launch_config`` (a
    ``ScoreRowsLaunchConfig``) overrides the Triton launch parameters.
    """
    if validate:
        levels, temperature = validate_score_head(hidden, weight, token_ids, levels, bias, temperature)
    if use_triton(hidden.device):
        return ScoreHeadOutput(*_score_head_kernels.ScoreHeadFunction.apply(
            hidden, weight, token_ids, levels, bias, temperature, launch_config))
    return reference.score_head(hidden, weight, token_ids, torch.as_tensor(levels), bias, temperature)


def gdso_loss(
    score_logits: torch.Tensor,
    targets: torch.Tensor,
    levels: torch.Tensor | Sequence[float],
    alpha_pt: float = 1.0,
    alpha_pw: float = 1.0,
    lambda_pt: float = 0.5,
    lambda_pw: float = 0.5,
    eps: float = 1e-4,
    *,
    validate: bool = True,
    launch_config: Any = None,
) -> GDSOOutput:
    """GDSO group losses: score_logits [P, 2, G, K], targets [P, 2], levels [K]; G >= 2.

    Returns loss, loss_pt, loss_pw (differentiable w.r.t. score_logits) and rewards, advantages,
    mean [P, 2, G] (no gradient). Formulas: docs/architecture.md (Losses) and `reference.gdso_loss`.
    ``validate`` and ``launch_config`` (a ``GDSOLaunchConfig``) as for :func:`score_head`.
    """
    hp = dict(alpha_pt=alpha_pt, alpha_pw=alpha_pw, lambda_pt=lambda_pt, lambda_pw=lambda_pw, eps=eps)
    if validate:
        levels, hp = validate_gdso(score_logits, targets, levels, **hp)
    if _gdso_kernels is not None and use_triton(score_logits.device):
        return _gdso_kernels.gdso_loss_triton(score_logits, targets, levels, hp, launch_config)
    return reference.gdso_loss(score_logits, targets, torch.as_tensor(levels), **hp)


def grpo_token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    beta: float = 0.04,
    temperature: float = 1.0,
    *,
    validate: bool = True,
    launch_config: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO token loss fused with the LM head: returns (loss, token_logprobs [B, T]).

    The Triton path walks the tokens in chunks and never forms the [B*T, V] logits. ``validate``
    and ``launch_config`` (a ``GRPOLaunchConfig``) as for :func:`score_head`.
    """
    tensors = (hidden, weight, token_ids, mask, advantages, old_logprobs, ref_logprobs)
    hp = dict(clip_eps=clip_eps, beta=beta, temperature=temperature)
    if validate:
        hp = validate_grpo(*tensors, **hp)
    if _grpo_kernels is not None and use_triton(hidden.device):
        return _grpo_kernels.GRPOTokenLossFunction.apply(
            *tensors, float(hp["clip_eps"]), float(hp["beta"]), float(hp["temperature"]), launch_config,
            torch.is_grad_enabled())
    return reference.grpo_token_loss(*tensors, **hp)


def risd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    teacher_probs: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    *,
    validate: bool = True,
    launch_config: Any = None,
) -> torch.Tensor:
    """RISD loss: KL(teacher || student) over the K score rows of the LM head, fused with the head.

    ``validate`` and ``launch_config`` (a ``ScoreRowsLaunchConfig``) as for :func:`score_head`.
    """
    if validate:
        temperature = validate_risd(hidden, weight, token_ids, teacher_probs, bias, temperature, reduction)
    if _risd_kernels is not None and use_triton(hidden.device):
        return _risd_kernels.RISDLossFunction.apply(
            hidden, weight, token_ids, teacher_probs, bias, float(temperature), reduction, launch_config)
    return reference.risd_loss(hidden, weight, token_ids, teacher_probs, bias, temperature, reduction)
