"""Fused RISD distillation loss: Triton kernels, drivers and the autograd Function in one file.

For hidden states h [N, H] at the student's query positions, the K score rows w_k (and bias b_k)
of an LM head [V, H] and teacher distributions qT [N, K]:
    z = (h . w_k + b_k) / T,  log qS = log_softmax(z),
    KL[n] = sum_k qT (log qT - log qS)     with 0 log 0 = 0,
reduced by "mean" over N, "sum", or "none" ([N]). The spec is `zreward_fast.reference.risd_loss`.

The forward kernel gathers the K rows through `token_ids` itself (the [N, V] logits are never
formed), and, while the row's distribution is in registers, also writes the per-row gradient
    d_raw = dKL/d(h . w + b) = (qS * sum_k qT - qT) / T         [N, K] fp32
(sum_k qT is 1 for a valid teacher; keeping it makes the gradient exact for any teacher row).
Backward only scales d_raw by the upstream grad (per row for "none", g/N for "mean", g for
"sum") and does the two small matmuls, as the score head does:
    grad_hidden = d @ W_K             (kernel below, same row blocks as the forward)
    grad W_K = d^T @ hidden, grad b_K = sum_n d
(`_score_head_bwd_dw_kernel` from score_head.py: grid over H blocks and N splits; the splits are
summed in a fixed order by `_risd_scatter_rows_kernel`, which also writes them into the K score
rows of the [V, H] / [V] gradients: deterministic, no atomics, every other row exactly zero).
The teacher probabilities get no gradient.

Naming follows flash-linear-attention: `b_` block values, `p_` pointers, `o_` offsets, `m_` masks.
All math is fp32; loaded blocks are cast to fp32 (the interpreter has no bf16 arithmetic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .score_rows import (
    ScoreRowsLaunchConfig, row_tile, score_row_log_softmax, store_grad_hidden, weight_grad_partials,
)
from .utils import INTERPRET, block_k, dot_precision, interp_cast

__all__ = ["RISDLossFunction", "risd_fwd", "risd_bwd", "INTERPRET"]

# Smallest normal fp32: log() of it is finite even where the GPU flushes denormals to zero.
_FLT_MIN = 1.1754943508222875e-38


@triton.jit
def _risd_fwd_kernel(
    hidden, weight, token_ids, bias, teacher,
    kl, d_raw,
    N, H, K,
    stride_hn, stride_hh, stride_wv, stride_wh, stride_tn, stride_tk,
    temperature,
    FLT_MIN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    o_n, o_k, m_n, m_k, o_nk, m_nk = row_tile(N, K, BLOCK_N, BLOCK_K)
    # The student's log-softmax over the score rows.
    _, b_logqs, b_qs = score_row_log_softmax(hidden, weight, bias, token_ids, o_n, o_k, m_n, m_k, H, stride_hn,
                                             stride_hh, stride_wv, stride_wh, temperature, HAS_BIAS, DOT_PRECISION,
                                             BLOCK_N, BLOCK_K, BLOCK_H)

    # Teacher: padded/out-of-range entries load 0, and 0 log 0 = 0 by the where(). Padded
    # columns use log qS = 0 instead of -inf, so no branch ever forms 0 * inf.
    p_t = teacher + o_n[:, None].to(tl.int64) * stride_tn + o_k[None, :] * stride_tk
    b_qt = tl.load(p_t, mask=m_nk, other=0.0).to(tl.float32)
    b_lr = tl.log(tl.maximum(b_qt, FLT_MIN)) - tl.where(m_k[None, :], b_logqs, 0.0)
    b_terms = tl.where(b_qt > 0, b_qt * b_lr, 0.0)
    b_kl = tl.sum(b_terms, axis=1)

    # dKL/dz = qS * sum(qT) - qT; z is divided by T, so is its gradient w.r.t. h . w + b.
    b_d = (b_qs * tl.sum(b_qt, axis=1)[:, None] - b_qt) / temperature
    tl.store(d_raw + o_nk, b_d, mask=m_nk)
    tl.store(kl + o_n, b_kl, mask=m_n)


@triton.jit
def _risd_bwd_dh_kernel(
    weight, token_ids, d_raw, g_out, d_scaled, grad_hidden,
    N, H, K,
    stride_wv, stride_wh, stride_g,
    g_scale,
    COMPUTE_DH: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    o_n, o_k, m_n, m_k, o_nk, m_nk = row_tile(N, K, BLOCK_N, BLOCK_K)

    # Upstream grad: per row ("none", stride 1) or one scalar for all rows (stride 0), times
    # g_scale (1/N for "mean"). Padded entries load 0, so the matmul below ignores them.
    b_g = tl.load(g_out + o_n.to(tl.int64) * stride_g, mask=m_n, other=0.0).to(tl.float32) * g_scale
    b_d = tl.load(d_raw + o_nk, mask=m_nk, other=0.0) * b_g[:, None]
    tl.store(d_scaled + o_nk, b_d, mask=m_nk)

    if COMPUTE_DH:
        b_ids = tl.load(token_ids + o_k, mask=m_k, other=0).to(tl.int64)
        store_grad_hidden(b_d, weight, b_ids, grad_hidden, o_n, m_n, m_k, H, stride_wv, stride_wh,
                          DOT_PRECISION, BLOCK_H)


@triton.jit
def _risd_scatter_rows_kernel(
    w_part, b_part, token_ids, grad_w, grad_b,
    H, K, SPLITS,
    stride_gv, stride_gh, stride_gb,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # Program (i_k, i_h) sums the N-split partials of row k, columns of block i_h, in split
    # order (deterministic), and writes them into row token_ids[k] of the full gradient.
    i_k, i_h = tl.program_id(0), tl.program_id(1)
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_h = o_h < H
    b_row = tl.load(token_ids + i_k).to(tl.int64)
    if HAS_W:
        b_dw = tl.zeros([BLOCK_H], dtype=tl.float32)
        for i_s in range(0, SPLITS):
            p_part = w_part + (i_s * K + i_k).to(tl.int64) * H + o_h
            b_dw += tl.load(p_part, mask=m_h, other=0.0)
        p_gw = grad_w + b_row * stride_gv + o_h * stride_gh
        tl.store(p_gw, b_dw.to(grad_w.dtype.element_ty), mask=m_h)
    if HAS_B:
        if i_h == 0:
            # Lane 0 carries the bias sum (a [BLOCK_H] vector keeps the loop-carried type simple).
            m_0 = tl.arange(0, BLOCK_H) < 1
            b_db = tl.zeros([BLOCK_H], dtype=tl.float32)
            for i_s in range(0, SPLITS):
                b_db += tl.load(b_part + i_s * K + i_k + 0 * o_h, mask=m_0, other=0.0)
            tl.store(grad_b + b_row * stride_gb + 0 * o_h, b_db.to(grad_b.dtype.element_ty), mask=m_0)


_SCATTER_BLOCK_H = 1024


def risd_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    teacher_probs: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    cfg: ScoreRowsLaunchConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: (KL per row [N] fp32, d_raw [N, K] fp32). Inputs validated."""
    hidden, weight = interp_cast(hidden), interp_cast(weight)
    bias, teacher_probs = interp_cast(bias), interp_cast(teacher_probs)
    n, h = hidden.shape
    k = token_ids.shape[0]
    dev = hidden.device
    kl = torch.empty(n, device=dev, dtype=torch.float32)
    d_raw = torch.empty(n, k, device=dev, dtype=torch.float32)
    if n == 0:
        return kl, d_raw
    ids = token_ids.contiguous()
    _risd_fwd_kernel[(triton.cdiv(n, cfg.block_n),)](
        hidden, weight, ids, bias if bias is not None else kl, teacher_probs,
        kl, d_raw,
        n, h, k,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        teacher_probs.stride(0), teacher_probs.stride(1),
        float(temperature),
        FLT_MIN=_FLT_MIN,
        HAS_BIAS=bias is not None,
        DOT_PRECISION=dot_precision(hidden, weight),
        BLOCK_N=cfg.block_n, BLOCK_K=block_k(k), BLOCK_H=cfg.block_h,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return kl, d_raw


def risd_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    d_raw: torch.Tensor,
    grad_out: torch.Tensor,
    g_scale: float,
    bias_meta: tuple[torch.Size, torch.dtype] | None,
    cfg: ScoreRowsLaunchConfig,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Returns (grad_hidden [N, H], grad weight [V, H], grad bias [V]), each in its input's dtype.

    grad_out is the upstream grad: 0-d (times g_scale) for "mean"/"sum", [N] for "none".
    Rows of the weight/bias grads outside token_ids are exactly zero.
    """
    hidden_dtype, weight_dtype = hidden.dtype, weight.dtype
    hidden, weight = interp_cast(hidden), interp_cast(weight)
    n, h = hidden.shape
    v = weight.shape[0]
    k = token_ids.shape[0]
    dev = hidden.device
    # The interpreter cannot store 16-bit values: it writes fp32 buffers, cast afterwards.
    kdt = (lambda dt: torch.float32) if INTERPRET else (lambda dt: dt)  # noqa: E731
    grad_h = torch.empty(n, h, device=dev, dtype=kdt(hidden_dtype)) if need_hidden else None
    # Every row is written when the K ids cover the head (the K-score-rows parameter, V == K).
    alloc = torch.empty if k == v else torch.zeros
    grad_w = alloc((v, h), device=dev, dtype=kdt(weight_dtype)) if need_weight else None
    grad_b = alloc(bias_meta[0], device=dev, dtype=kdt(bias_meta[1])) if need_bias else None
    if n == 0:
        for t in (grad_w, grad_b):
            if t is not None:
                t.zero_()
    else:
        ids = token_ids.contiguous()
        prec = dot_precision(hidden, weight)
        bk = block_k(k)
        g = grad_out if grad_out.dtype == torch.float32 else grad_out.float()
        stride_g = 0 if g.dim() == 0 else g.stride(0)
        d = torch.empty(n, k, device=dev, dtype=torch.float32)
        _risd_bwd_dh_kernel[(triton.cdiv(n, cfg.block_n),)](
            weight, ids, d_raw, g, d, grad_h if grad_h is not None else d,
            n, h, k,
            weight.stride(0), weight.stride(1), stride_g,
            float(g_scale),
            COMPUTE_DH=need_hidden,
            DOT_PRECISION=prec,
            BLOCK_N=cfg.block_n, BLOCK_K=bk, BLOCK_H=cfg.block_h,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if need_weight or need_bias:
            w_part, b_part, splits = weight_grad_partials(hidden, d, cfg, need_bias, prec, bk)
            _risd_scatter_rows_kernel[(k, triton.cdiv(h, _SCATTER_BLOCK_H))](
                w_part, b_part, ids,
                grad_w if grad_w is not None else w_part, grad_b if grad_b is not None else b_part,
                h, k, splits,
                grad_w.stride(0) if grad_w is not None else 0, grad_w.stride(1) if grad_w is not None else 0,
                grad_b.stride(0) if grad_b is not None else 0,
                HAS_W=need_weight, HAS_B=need_bias,
                BLOCK_H=_SCATTER_BLOCK_H,
            )
    if INTERPRET:
        grad_h = None if grad_h is None else grad_h.to(hidden_dtype)
        grad_w = None if grad_w is None else grad_w.to(weight_dtype)
        grad_b = None if grad_b is None else grad_b.to(bias_meta[1])
    return grad_h, grad_w, grad_b


class RISDLossFunction(torch.autograd.Function):
    """The op behind `zreward_fast.kernels.risd_loss`, which validates its inputs: the fp32 loss ([]
    for "mean" / "sum", [N] for "none"), differentiable w.r.t. hidden, weight and bias (not the
    teacher); ``cfg`` None: the device's default launch parameters."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, hidden, weight, token_ids, teacher_probs, bias, temperature, reduction, cfg,
    ):
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        cfg = cfg or ScoreRowsLaunchConfig.default(hidden.device)
        kl, d_raw = risd_fwd(hidden, weight, token_ids, teacher_probs, bias, temperature, cfg)
        ctx.save_for_backward(hidden, weight, token_ids, d_raw)
        ctx.reduction = reduction
        ctx.cfg = cfg
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        if reduction == "mean":
            return kl.mean()
        if reduction == "sum":
            return kl.sum()
        return kl

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, token_ids, d_raw = ctx.saved_tensors
        need_h, need_w, _, _, need_b = ctx.needs_input_grad[:5]
        if grad_out is None or not (need_h or need_w or need_b):
            return None, None, None, None, None, None, None, None
        n = hidden.shape[0]
        g_scale = 1.0 / n if ctx.reduction == "mean" and n > 0 else 1.0
        grad_h, grad_w, grad_b = risd_bwd(
            hidden, weight, token_ids, d_raw, grad_out, g_scale, ctx.bias_meta, ctx.cfg, need_h, need_w, need_b,
        )
        # The teacher probabilities get no gradient.
        return grad_h, grad_w, None, None, grad_b, None, None, None
