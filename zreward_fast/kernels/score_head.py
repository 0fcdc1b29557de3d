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

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..reference import ScoreHeadOutput

__all__ = ["ScoreHeadConfig", "ScoreHeadFunction", "score_head_triton", "INTERPRET"]

# triton.jit picks the interpreter at decoration time, i.e. when this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


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
    i_n = tl.program_id(0)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, BLOCK_K)
    m_n = o_n < N
    m_k = o_k < K
    # Row index of each score token in the LM head; padded columns read row 0, masked anyway.
    b_ids = tl.load(token_ids + o_k, mask=m_k, other=0).to(tl.int64)

    b_z = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for i_h in range(0, tl.cdiv(H, BLOCK_H)):
        o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
        m_h = o_h < H
        p_h = hidden + o_n[:, None].to(tl.int64) * stride_hn + o_h[None, :] * stride_hh
        b_h = tl.load(p_h, mask=m_n[:, None] & m_h[None, :], other=0.0).to(tl.float32)
        # W_K^T block [BLOCK_H, BLOCK_K], gathered straight from the full head.
        p_w = weight + b_ids[None, :] * stride_wv + o_h[:, None] * stride_wh
        b_w = tl.load(p_w, mask=m_k[None, :] & m_h[:, None], other=0.0).to(tl.float32)
        b_z += tl.dot(b_h, b_w, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        b_b = tl.load(bias + b_ids, mask=m_k, other=0.0).to(tl.float32)
        b_z += b_b[None, :]
    b_z = b_z / temperature

    # Padded columns get -inf so they carry no probability mass.
    b_zm = tl.where(m_k[None, :], b_z, float("-inf"))
    b_max = tl.max(b_zm, axis=1)
    b_e = tl.exp(b_zm - b_max[:, None])
    b_sum = tl.sum(b_e, axis=1)
    b_logp = b_zm - b_max[:, None] - tl.log(b_sum)[:, None]
    b_p = b_e / b_sum[:, None]

    b_s = tl.load(levels + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_mean = tl.sum(b_p * b_s[None, :], axis=1)
    b_d = b_s[None, :] - b_mean[:, None]
    b_var = tl.sum(b_p * b_d * b_d, axis=1)
    # where(): padded columns would give 0 * -inf = nan.
    b_ent = -tl.sum(b_p * tl.where(m_k[None, :], b_logp, 0.0), axis=1)

    o_nk = o_n[:, None].to(tl.int64) * K + o_k[None, :]
    m_nk = m_n[:, None] & m_k[None, :]
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
    i_n = tl.program_id(0)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, BLOCK_K)
    m_n = o_n < N
    m_k = o_k < K
    m_nk = m_n[:, None] & m_k[None, :]
    o_nk = o_n[:, None].to(tl.int64) * K + o_k[None, :]

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
        for i_h in range(0, tl.cdiv(H, BLOCK_H)):
            o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
            m_h = o_h < H
            p_w = weight + b_ids[:, None] * stride_wv + o_h[None, :] * stride_wh
            b_w = tl.load(p_w, mask=m_k[:, None] & m_h[None, :], other=0.0).to(tl.float32)
            b_dh = tl.dot(b_draw, b_w, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_H]
            p_dh = grad_hidden + o_n[:, None].to(tl.int64) * H + o_h[None, :]
            tl.store(p_dh, b_dh.to(grad_hidden.dtype.element_ty), mask=m_n[:, None] & m_h[None, :])


@triton.jit
def _score_head_bwd_dw_kernel(
    hidden, d_raw, grad_w_part, grad_b_part,
    N, H, K,
    stride_hn, stride_hh,
    ROWS_PER_SPLIT,
    COMPUTE_DB: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # Program (i_h, i_s) owns columns [i_h*BLOCK_H, ...) of W_K's grad for rows of split i_s:
    # each output element is written by exactly one program, in a fixed order.
    i_h, i_s = tl.program_id(0), tl.program_id(1)
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    o_k = tl.arange(0, BLOCK_K)
    m_h = o_h < H
    m_k = o_k < K
    n_start = i_s * ROWS_PER_SPLIT
    b_dw = tl.zeros([BLOCK_K, BLOCK_H], dtype=tl.float32)
    b_db = tl.zeros([BLOCK_K], dtype=tl.float32)
    for i_n in range(0, tl.cdiv(ROWS_PER_SPLIT, BLOCK_N)):
        o_n = n_start + i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = (o_n < N) & (o_n < n_start + ROWS_PER_SPLIT)
        # d_raw^T block [BLOCK_K, BLOCK_N], read transposed through the pointers.
        p_dt = d_raw + o_n[None, :].to(tl.int64) * K + o_k[:, None]
        b_dt = tl.load(p_dt, mask=m_k[:, None] & m_n[None, :], other=0.0)
        p_h = hidden + o_n[:, None].to(tl.int64) * stride_hn + o_h[None, :] * stride_hh
        b_h = tl.load(p_h, mask=m_n[:, None] & m_h[None, :], other=0.0).to(tl.float32)
        b_dw += tl.dot(b_dt, b_h, input_precision=DOT_PRECISION)
        if COMPUTE_DB:
            b_db += tl.sum(b_dt, axis=1)
    o_part = i_s.to(tl.int64) * K * H
    p_dw = grad_w_part + o_part + o_k[:, None] * H + o_h[None, :]
    tl.store(p_dw, b_dw, mask=m_k[:, None] & m_h[None, :])
    if COMPUTE_DB:
        # Every H block computes the same bias sums; only the first one stores them.
        if i_h == 0:
            tl.store(grad_b_part + i_s * K + o_k, b_db, mask=m_k)


@dataclass(frozen=True)
class ScoreHeadConfig:
    """Launch parameters. Defaults: GPU-sized blocks; smaller in the interpreter (tests)."""

    block_n: int = 32  # rows per program (tl.dot needs >= 16)
    block_h: int = 64  # hidden chunk per loop step (>= 16)
    dw_block_n: int = 64  # rows per loop step of the weight-grad kernel
    dw_block_h: int = 64  # hidden columns per weight-grad program
    n_split: int | None = None  # N splits of the weight-grad reduction; None: fill the GPU
    num_warps: int = 4
    num_stages: int = 3

    @staticmethod
    def default(device: torch.device) -> "ScoreHeadConfig":
        if INTERPRET or device.type != "cuda":
            return ScoreHeadConfig(block_n=32, block_h=64, dw_block_n=32, dw_block_h=64, n_split=2)
        return ScoreHeadConfig()


def _block_k(k: int) -> int:
    # tl.dot needs every side >= 16; the softmax masks the padding.
    return max(16, triton.next_power_of_2(k))


def _dot_precision(*tensors: torch.Tensor | None) -> str:
    # fp32 inputs keep full fp32 products; bf16/fp16 values are exact in tf32, so tensor cores
    # give the same products with fp32 accumulation.
    return "ieee" if any(t is not None and t.dtype == torch.float32 for t in tensors) else "tf32"


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _n_split(cfg: ScoreHeadConfig, n: int, h: int, device: torch.device) -> int:
    # Split N so that the weight-grad grid (H blocks x splits) covers ~2 programs per SM.
    n_blocks = triton.cdiv(n, cfg.dw_block_n)
    if cfg.n_split is not None:
        return max(1, min(cfg.n_split, n_blocks))
    h_blocks = triton.cdiv(h, cfg.dw_block_h)
    return max(1, min(n_blocks, triton.cdiv(2 * _num_sms(device), h_blocks)))


def _interp_cast(t: torch.Tensor | None) -> torch.Tensor | None:
    # The interpreter cannot do bf16/fp16 arithmetic: feed it fp32 copies (CPU tests only).
    if INTERPRET and t is not None and t.dtype != torch.float32:
        return t.float()
    return t


def score_head_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    levels: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    cfg: ScoreHeadConfig,
) -> ScoreHeadOutput:
    """Launch the forward kernel. Inputs validated; levels fp32 [K] on the same device."""
    hidden, weight, bias = _interp_cast(hidden), _interp_cast(weight), _interp_cast(bias)
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
        DOT_PRECISION=_dot_precision(hidden, weight),
        BLOCK_N=cfg.block_n, BLOCK_K=_block_k(k), BLOCK_H=cfg.block_h,
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
    cfg: ScoreHeadConfig,
    need_hidden: bool,
    need_weight_rows: bool,
    need_bias_rows: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Returns (grad_hidden [N,H] in hidden's dtype, grad W_K [K,H] fp32, grad b_K [K] fp32)."""
    hidden_dtype = hidden.dtype
    hidden, weight = _interp_cast(hidden), _interp_cast(weight)
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
    prec = _dot_precision(hidden, weight)
    block_k = _block_k(k)
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
        BLOCK_N=cfg.block_n, BLOCK_K=block_k, BLOCK_H=cfg.block_h,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if grad_hidden is not None and grad_hidden_k is not grad_hidden:
        grad_hidden.copy_(grad_hidden_k)

    grad_w = grad_b = None
    if need_weight_rows or need_bias_rows:
        splits = _n_split(cfg, n, h, dev)
        rows = triton.cdiv(triton.cdiv(n, splits), cfg.dw_block_n) * cfg.dw_block_n
        splits = triton.cdiv(n, rows)  # no empty splits
        w_part = torch.empty(splits, k, h, device=dev, dtype=torch.float32)
        b_part = torch.empty(splits, k, device=dev, dtype=torch.float32)
        _score_head_bwd_dw_kernel[(triton.cdiv(h, cfg.dw_block_h), splits)](
            hidden, d_raw, w_part, b_part,
            n, h, k,
            hidden.stride(0), hidden.stride(1),
            rows,
            COMPUTE_DB=need_bias_rows,
            DOT_PRECISION=prec,
            BLOCK_N=cfg.dw_block_n, BLOCK_K=block_k, BLOCK_H=cfg.dw_block_h,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        # Fixed-order sum over splits: deterministic.
        grad_w = w_part[0] if splits == 1 else w_part.sum(0)
        grad_b = (b_part[0] if splits == 1 else b_part.sum(0)) if need_bias_rows else None
        grad_w = grad_w if need_weight_rows else None
    return grad_hidden, grad_w, grad_b


class ScoreHeadFunction(torch.autograd.Function):
    """Autograd wrapper; inputs must already be validated (see `zreward_fast.kernels`)."""

    @staticmethod
    def forward(ctx, hidden, weight, token_ids, levels, bias, temperature, cfg):  # type: ignore[override]
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


def score_head_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    levels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    cfg: ScoreHeadConfig | None = None,
) -> ScoreHeadOutput:
    """Triton path, no validation (the public `zreward_fast.kernels.score_head` validates)."""
    cfg = cfg or ScoreHeadConfig.default(hidden.device)
    lv = levels.to(device=hidden.device, dtype=torch.float32).contiguous()
    return ScoreHeadOutput(*ScoreHeadFunction.apply(hidden, weight, token_ids, lv, bias, temperature, cfg))
