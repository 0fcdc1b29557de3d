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

__all__ = ["GDSOOutput", "ScoreHeadOutput", "gdso_loss", "grpo_token_loss", "risd_loss", "score_head", "nearest_level"]


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


class GDSOOutput(NamedTuple):
    """GDSO group losses over P instances (2 sides x G rollouts each)."""

    loss: torch.Tensor  # [] alpha_pt * loss_pt + alpha_pw * loss_pw
    loss_pt: torch.Tensor  # [] mean over instances of L_pt
    loss_pw: torch.Tensor  # [] mean over instances of L_pw
    rewards: torch.Tensor  # [P, 2, G] lambda_pt r_pt + lambda_pw r_pw (no gradient)
    advantages: torch.Tensor  # [P, 2, G] group-normalised rewards (no gradient)
    mean: torch.Tensor  # [P, 2, G] expectation mu of each rollout's distribution (no gradient)


def nearest_level(targets: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the level nearest to each target; a tie goes to the lower level (argmin's first)."""
    return (targets.float()[..., None] - levels.float()).abs().argmin(-1)


def gdso_loss(
    score_logits: torch.Tensor,
    targets: torch.Tensor,
    levels: torch.Tensor,
    alpha_pt: float = 1.0,
    alpha_pw: float = 1.0,
    lambda_pt: float = 0.5,
    lambda_pw: float = 0.5,
    eps: float = 1e-4,
) -> GDSOOutput:
    """GDSO pointwise and pairwise losses, rewards and advantages (docs/architecture.md, Losses).

    score_logits [P, 2, G, K]: logits at the score position of rollout i of side j of instance p;
    targets [P, 2]: the annotated scores s_0, s_1; levels [K]. G >= 2 (unbiased std).
    """
    s = levels.to(device=score_logits.device, dtype=torch.float32)
    R = s[-1] - s[0]
    G = score_logits.shape[2]
    logp = torch.log_softmax(score_logits.float(), dim=-1)  # [P, 2, G, K]
    mu = (logp.exp() * s).sum(-1)  # [P, 2, G]
    t = targets.float()  # [P, 2]
    # d[p, j, i, k] = (mu[j, i] - mu[jb, k]) - (s_j - s_jb), jb the other side
    d = (mu[:, :, :, None] - mu.flip(1)[:, :, None, :]) - (t - t.flip(1))[:, :, None, None]
    absd = d.abs()
    with torch.no_grad():
        r_pt = 1.0 - (mu - t[:, :, None]).abs() / R
        r_pw = 1.0 - absd.sum(-1) / (G * R)
        rewards = lambda_pt * r_pt + lambda_pw * r_pw
        advantages = (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + eps)
    bins = nearest_level(t, s)  # [P, 2]
    picked = logp.gather(-1, bins[:, :, None, None].expand(-1, -1, G, 1)).squeeze(-1)  # [P, 2, G]
    l_pt = -picked.sum((1, 2)) / (2 * G)
    l_pw = absd.sum((1, 2, 3)) / (2 * G * G * R)
    loss_pt, loss_pw = l_pt.mean(), l_pw.mean()
    return GDSOOutput(alpha_pt * loss_pt + alpha_pw * loss_pw, loss_pt, loss_pw, rewards, advantages, mu.detach())


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO clipped-ratio loss with the k3 KL estimator over the reasoning tokens.

    hidden [B, T, H], weight [V, H] (LM head), token_ids [B, T] (the sampled tokens o_t), mask
    [B, T], advantages [B]. Returns (loss [], token_logprobs [B, T] fp32, no gradient). Rows whose
    mask is empty add 0 to the mean over B. This reference forms the full [B*T, V] logits; the
    fused kernel never does.
    """
    logits = (hidden.float() @ weight.float().T) / temperature  # [B, T, V]
    lp = torch.log_softmax(logits, dim=-1).gather(-1, token_ids[..., None].long()).squeeze(-1)  # [B, T]
    return grpo_loss_from_logprobs(lp, mask, advantages, old_logprobs, ref_logprobs, clip_eps, beta), lp.detach()


def grpo_loss_from_logprobs(lp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                            old_logprobs: torch.Tensor | None = None, ref_logprobs: torch.Tensor | None = None,
                            clip_eps: float = 0.2, beta: float = 0.04) -> torch.Tensor:
    """The GRPO loss of :func:`grpo_token_loss` given the sampled tokens' log-probs ``lp [B, T]``."""
    lp_old = lp.detach() if old_logprobs is None else old_logprobs.float()
    ratio = torch.exp(lp - lp_old)
    A = advantages.float()[:, None]
    per_token = -torch.minimum(ratio * A, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * A)
    if ref_logprobs is not None and beta != 0.0:
        delta = ref_logprobs.float() - lp
        per_token = per_token + beta * (torch.exp(delta) - delta - 1.0)
    m = mask.float()
    per_row = (per_token * m).sum(-1) / m.sum(-1).clamp_min(1.0)
    return per_row.mean()


def risd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    teacher_probs: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """RISD distillation: KL(q_teacher || q_student) over the K score levels, 0 log 0 = 0.

    hidden [N, H] at the student's query positions, weight [V, H] (or just the K score rows with
    token_ids = arange(K)), teacher_probs [N, K]. reduction: "mean" over N, "sum", or "none" [N].
    """
    # The student's distribution is the score head's (levels do not enter the KL).
    log_qs = score_head(hidden, weight, token_ids, torch.zeros(token_ids.shape[0], device=hidden.device), bias,
                        temperature).log_probs
    qt = teacher_probs.float()
    kl = torch.where(qt > 0, qt * (torch.log(qt.clamp_min(1e-38)) - log_qs), torch.zeros_like(log_qs)).sum(-1)
    if reduction == "mean":
        return kl.mean()
    if reduction == "sum":
        return kl.sum()
    return kl
