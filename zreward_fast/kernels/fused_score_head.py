"""Fused score-token head: Triton kernels, drivers and the autograd Function in one file.

For hidden states h [N, H] and the K score rows w_k (and bias b_k) of an LM head [V, H]:
z = (h . w_k + b_k) / T, p = softmax(z), and the mean, variance and entropy of p over the
levels s. The forward kernel gathers the K rows through `token_ids` itself, so the [N, V]
full-vocabulary logits are never formed and the rest of the head is never read. The spec is
`zreward_fast.reference.score_head`.

Backward, with upstream grads g of all six outputs (any may be absent), per row:
    dz_k = g_logits_k + g_logp_k - p_k sum_j g_logp_j + p_k (g_p_k - <p, g_p>)
         + g_mean p_k (s_k - mu) + g_var p_k ((s_k - mu)^2 - var) - g_ent p_k (logp_k + ent)
    d_raw = dz / T
then grad_hidden = d_raw @ W_K (kernel 1, same row blocks) and grad W_K = d_raw^T @ hidden,
grad b_K = sum_n d_raw (kernel 2, grid over H blocks and N splits; the splits are summed in a
fixed order afterwards, so the result is deterministic: no atomics).

Naming follows flash-linear-attention: `b_` block values, `p_` pointers, `o_` offsets, `m_` masks.
All math is fp32; loaded blocks are cast to fp32 (the interpreter has no bf16 arithmetic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import ScoreHeadOutput
from .score_rows import (
    ScoreRowsLaunchConfig, row_tile, score_row_log_softmax, store_grad_hidden, weight_grad_partials,
)
from .utils import INTERPRET, block_k, dot_precision, interp_cast

__all__ = ["ScoreHeadFunction", "score_head_fwd", "score_head_bwd", "INTERPRET"]


@triton.jit
def _score_head_fwd_kernel(
    hidden, weight, token_ids, bias, levels,
    logits, log_probs, probs, mean, var, entropy,
    N, H, K,
    stride_hn, stride_hh, stride_wv, stride_wh,
    temperature,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    o_n, o_k, m_n, m_k, o_nk, m_nk = row_tile(N, K, BLOCK_N, BLOCK_K)
    b_z, b_logp, b_p = score_row_log_softmax(hidden, weight, bias, token_ids, o_n, o_k, m_n, m_k, H, stride_hn, stride_hh,
                                             stride_wv, stride_wh, temperature, HAS_BIAS, DOT_PRECISION, BLOCK_N,
                                             BLOCK_K, BLOCK_H)

    b_s = tl.load(levels + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_mean = tl.sum(b_p * b_s[None, :], axis=1)
    b_d = b_s[None, :] - b_mean[:, None]
    b_var = tl.sum(b_p * b_d * b_d, axis=1)
    # where(): padded columns would give 0 * -inf = nan.
    b_ent = -tl.sum(b_p * tl.where(m_k[None, :], b_logp, 0.0), axis=1)

    tl.store(logits + o_nk, b_z, mask=m_nk)
    tl.store(log_probs + o_nk, b_logp, mask=m_nk)
    tl.store(probs + o_nk, b_p, mask=m_nk)
    tl.store(mean + o_n, b_mean, mask=m_n)
    tl.store(var + o_n, b_var, mask=m_n)
    tl.store(entropy + o_n, b_ent, mask=m_n)


@triton.jit
def _score_head_bwd_dz_dh_kernel(
    weight, token_ids, levels,
    log_probs, probs, mean, var, entropy,
    g_logits, g_log_probs, g_probs, g_mean, g_var, g_entropy,
    d_raw, grad_hidden,
    N, H, K,
    stride_wv, stride_wh,
    temperature,
    HAS_G_LOGITS: tl.constexpr,
    HAS_G_LOGP: tl.constexpr,
    HAS_G_PROBS: tl.constexpr,
    HAS_G_MEAN: tl.constexpr,
    HAS_G_VAR: tl.constexpr,
    HAS_G_ENT: tl.constexpr,
    COMPUTE_DH: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    o_n, o_k, m_n, m_k, o_nk, m_nk = row_tile(N, K, BLOCK_N, BLOCK_K)

    # Padded/out-of-range entries load p = 0, so every term below vanishes there.
    b_p = tl.load(probs + o_nk, mask=m_nk, other=0.0)
    b_dz = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if HAS_G_LOGITS:
        b_dz += tl.load(g_logits + o_nk, mask=m_nk, other=0.0)
    if HAS_G_LOGP:
        b_glp = tl.load(g_log_probs + o_nk, mask=m_nk, other=0.0)
        b_dz += b_glp - b_p * tl.sum(b_glp, axis=1)[:, None]
    if HAS_G_PROBS:
        b_gp = tl.load(g_probs + o_nk, mask=m_nk, other=0.0)
        b_dz += b_p * (b_gp - tl.sum(b_p * b_gp, axis=1)[:, None])
    if HAS_G_MEAN or HAS_G_VAR:
        b_s = tl.load(levels + o_k, mask=m_k, other=0.0)
        b_mu = tl.load(mean + o_n, mask=m_n, other=0.0)
        b_d = b_s[None, :] - b_mu[:, None]
        if HAS_G_MEAN:
            b_gm = tl.load(g_mean + o_n, mask=m_n, other=0.0)
            b_dz += b_gm[:, None] * b_p * b_d
        if HAS_G_VAR:
            b_v = tl.load(var + o_n, mask=m_n, other=0.0)
            b_gv = tl.load(g_var + o_n, mask=m_n, other=0.0)
            b_dz += b_gv[:, None] * b_p * (b_d * b_d - b_v[:, None])
    if HAS_G_ENT:
        b_logp = tl.load(log_probs + o_nk, mask=m_nk, other=0.0)
        b_ent = tl.load(entropy + o_n, mask=m_n, other=0.0)
        b_ge = tl.load(g_entropy + o_n, mask=m_n, other=0.0)
        b_dz -= b_ge[:, None] * b_p * (b_logp + b_ent[:, None])
    # Logits are divided by T, so is their gradient w.r.t. the raw h . w + b.
    b_draw = tl.where(m_nk, b_dz / temperature, 0.0)
    tl.store(d_raw + o_nk, b_draw, mask=m_nk)

    if COMPUTE_DH:
        b_ids = tl.load(token_ids + o_k, mask=m_k, other=0).to(tl.int64)
        store_grad_hidden(b_draw, weight, b_ids, grad_hidden, o_n, m_n, m_k, H, stride_wv, stride_wh,
                          DOT_PRECISION, BLOCK_H)


def score_head_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    levels: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    cfg: ScoreRowsLaunchConfig,
) -> ScoreHeadOutput:
    """Launch the forward kernel. Inputs validated; levels fp32 [K] on the same device."""
    hidden, weight, bias = interp_cast(hidden), interp_cast(weight), interp_cast(bias)
    n, h = hidden.shape
    k = token_ids.shape[0]
    dev = hidden.device
    out = ScoreHeadOutput(
        *(torch.empty(n, k, device=dev, dtype=torch.float32) for _ in range(3)),
        *(torch.empty(n, device=dev, dtype=torch.float32) for _ in range(3)),
    )
    if n == 0:
        return out
    ids = token_ids.contiguous()
    lv = levels.contiguous()
    grid = (triton.cdiv(n, cfg.block_n),)
    _score_head_fwd_kernel[grid](
        hidden, weight, ids, bias if bias is not None else lv, lv,
        *out,
        n, h, k,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        float(temperature),
        HAS_BIAS=bias is not None,
        DOT_PRECISION=dot_precision(hidden, weight),
        BLOCK_N=cfg.block_n, BLOCK_K=block_k(k), BLOCK_H=cfg.block_h,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def score_head_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    levels: torch.Tensor,
    out: ScoreHeadOutput,
    grads: tuple[torch.Tensor | None, ...],
    temperature: float,
    cfg: ScoreRowsLaunchConfig,
    need_hidden: bool,
    need_weight_rows: bool,
    need_bias_rows: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Returns (grad_hidden [N,H] in hidden's dtype, grad W_K [K,H] fp32, grad b_K [K] fp32)."""
    hidden_dtype = hidden.dtype
    hidden, weight = interp_cast(hidden), interp_cast(weight)
    n, h = hidden.shape
    k = token_ids.shape[0]
    dev = hidden.device
    g = [None if t is None else t.to(torch.float32).contiguous() for t in grads]
    grad_hidden = torch.empty(n, h, device=dev, dtype=hidden_dtype) if need_hidden else None
    if n == 0:
        z = lambda *s: torch.zeros(*s, device=dev, dtype=torch.float32)  # noqa: E731
        return grad_hidden, z(k, h) if need_weight_rows else None, z(k) if need_bias_rows else None
    if INTERPRET and grad_hidden is not None and grad_hidden.dtype != torch.float32:
        grad_hidden_k = torch.empty(n, h, device=dev, dtype=torch.float32)
    else:
        grad_hidden_k = grad_hidden
    ids = token_ids.contiguous()
    prec = dot_precision(hidden, weight)
    bk = block_k(k)
    d_raw = torch.empty(n, k, device=dev, dtype=torch.float32)
    dummy = out.probs  # any fp32 tensor for absent grads; never read (constexpr flags)
    _score_head_bwd_dz_dh_kernel[(triton.cdiv(n, cfg.block_n),)](
        weight, ids, levels,
        out.log_probs, out.probs, out.mean, out.var, out.entropy,
        *(t if t is not None else dummy for t in g),
        d_raw, grad_hidden_k if grad_hidden_k is not None else d_raw,
        n, h, k,
        weight.stride(0), weight.stride(1),
        float(temperature),
        *(t is not None for t in g),
        COMPUTE_DH=need_hidden,
        DOT_PRECISION=prec,
        BLOCK_N=cfg.block_n, BLOCK_K=bk, BLOCK_H=cfg.block_h,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if grad_hidden is not None and grad_hidden_k is not grad_hidden:
        grad_hidden.copy_(grad_hidden_k)

    grad_w = grad_b = None
    if need_weight_rows or need_bias_rows:
        w_part, b_part, splits = weight_grad_partials(hidden, d_raw, cfg, need_bias_rows, prec, bk)
        # Fixed-order sum over splits: deterministic.
        grad_w = w_part[0] if splits == 1 else w_part.sum(0)
        grad_b = (b_part[0] if splits == 1 else b_part.sum(0)) if need_bias_rows else None
        grad_w = grad_w if need_weight_rows else None
    return grad_hidden, grad_w, grad_b


class ScoreHeadFunction(torch.autograd.Function):
    """The op behind `zreward_fast.kernels.score_head`, which validates its inputs; ``cfg`` None: the
    device's default launch parameters."""

    @staticmethod
    def forward(ctx, hidden, weight, token_ids, levels, bias, temperature, cfg):  # type: ignore[override]
        cfg = cfg or ScoreRowsLaunchConfig.default(hidden.device)
        levels = levels.to(device=hidden.device, dtype=torch.float32).contiguous()
        out = score_head_fwd(hidden, weight, token_ids, levels, bias, temperature, cfg)
        ctx.save_for_backward(hidden, weight, token_ids, levels, *out)
        ctx.temperature = temperature
        ctx.cfg = cfg
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        ctx.set_materialize_grads(False)  # absent grads stay None: the kernel skips their terms
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        hidden, weight, token_ids, levels, *out = ctx.saved_tensors
        out = ScoreHeadOutput(*out)
        need_h, need_w, _, _, need_b = ctx.needs_input_grad[:5]
        if all(g is None for g in grads) or not (need_h or need_w or need_b):
            return None, None, None, None, None, None, None
        grad_h, grad_wk, grad_bk = score_head_bwd(
            hidden, weight, token_ids, levels, out, grads, ctx.temperature, ctx.cfg,
            need_h, need_w, need_b,
        )
        ids = token_ids.long()
        grad_w = grad_b = None
        if need_w:
            # Only the K score rows get gradient; the rest of the head is exactly zero.
            grad_w = torch.zeros_like(weight).index_copy_(0, ids, grad_wk.to(weight.dtype))
        if need_b:
            shape, dtype = ctx.bias_meta
            grad_b = torch.zeros(shape, device=weight.device, dtype=dtype)
            grad_b.index_copy_(0, ids, grad_bk.to(dtype))
        return grad_h, grad_w, None, None, grad_b, None, None
