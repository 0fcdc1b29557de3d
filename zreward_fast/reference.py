"""Pure-torch reference of every fused kernel in :mod:`zreward_fast.kernels`: the spec in code.

Each function here defines the exact semantics its Triton kernel must reproduce (outputs and,
through torch autograd, every gradient). The kernel tests compare against these functions, and
the dispatcher falls back to them when no GPU and no Triton interpreter is available, so they
must stay simple, readable and numerically plain (fp32 math, no fusion tricks).

Inputs are assumed to be already validated (see ``zreward_fast.kernels._validate``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["ScoreHeadOutput", "score_head"]


class ScoreHeadOutput(NamedTuple):
    """Distribution over the K score levels at N positions (all fields fp32)."""

    logits: torch.Tensor  # [N, K] z = (h . w_k + b_k) / T
    log_probs: torch.Tensor  # [N, K] log_softmax(z)
    probs: torch.Tensor  # [N, K] softmax(z)
    mean: torch.Tensor  # [N] sum_k p_k s_k
    var: torch.Tensor  # [N] sum_k p_k (s_k - mean)^2
    entropy: torch.Tensor  # [N] -sum_k p_k log p_k


def score_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    levels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> ScoreHeadOutput:
    """Score-token head restricted to the K score rows of the LM head.

    hidden [N, H], weight [V, H], token_ids [K] (unique, in [0, V)), levels [K] (increasing),
    bias [V] or None. A softmax over the K rows equals the full-vocabulary softmax
    renormalised over them, so the [N, V] logits are never formed.
    """
    # Gather before the matmul: only K rows of the (possibly 1B-parameter) head are touched.
    w = weight[token_ids].float()  # [K, H]
    z = hidden.float() @ w.T  # [N, K]
    if bias is not None:
        z = z + bias[token_ids].float()
    z = z / temperature
    log_probs = torch.log_softmax(z, dim=-1)
    probs = log_probs.exp()
    s = levels.to(device=z.device, dtype=torch.float32)
    mean = (probs * s).sum(-1)
    var = (probs * (s - mean[:, None]).square()).sum(-1)
    entropy = -(probs * log_probs).sum(-1)
    return ScoreHeadOutput(z, log_probs, probs, mean, var, entropy)
