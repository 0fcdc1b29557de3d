"""The score-row pieces the score head and RISD share: gathering the K score rows of the LM head and
their dot with the hidden states, the masked softmax over the K levels, grad_hidden = d @ W_K, and
the deterministic weight-gradient kernel (grid over H blocks and N splits, summed in a fixed order:
no atomics), with the launch parameters of all of them.

Naming follows flash-linear-attention: `b_` block values, `p_` pointers, `o_` offsets, `m_` masks.
All math is fp32; loaded blocks are cast to fp32 (the interpreter has no bf16 arithmetic).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .utils import INTERPRET, num_sms

__all__ = ["ScoreRowsLaunchConfig", "row_tile", "score_row_log_softmax", "masked_log_softmax", "store_grad_hidden", "weight_grad_partials"]


@dataclass(frozen=True)
class ScoreRowsLaunchConfig:
    """Launch parameters of the score head and RISD kernels. Defaults: GPU-sized blocks; smaller in
    the interpreter (tests)."""

    block_n: int = 32  # rows per program (tl.dot needs >= 16)
    block_h: int = 64  # hidden chunk per loop step (>= 16)
    dw_block_n: int = 64  # rows per loop step of the weight-grad kernel
    dw_block_h: int = 64  # hidden columns per weight-grad program
    n_split: int | None = None  # N splits of the weight-grad reduction; None: fill the GPU
    num_warps: int = 4
    num_stages: int = 3

    @staticmethod
    def default(device: torch.device) -> "ScoreRowsLaunchConfig":
        if INTERPRET or device.type != "cuda":
            return ScoreRowsLaunchConfig(block_n=32, block_h=64, dw_block_n=32, dw_block_h=64, n_split=2)
        return ScoreRowsLaunchConfig()

    def weight_grad_splits(self, n: int, h: int, device: torch.device) -> int:
        """N splits so that the weight-grad grid (H blocks x splits) covers ~2 programs per SM."""
        n_blocks = triton.cdiv(n, self.dw_block_n)
        if self.n_split is not None:
            return max(1, min(self.n_split, n_blocks))
        h_blocks = triton.cdiv(h, self.dw_block_h)
        return max(1, min(n_blocks, triton.cdiv(2 * num_sms(device), h_blocks)))


@triton.jit
def row_tile(N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's tile of a row-major [N, K] tensor: row offsets ``o_n`` (BLOCK_N rows from
    program_id 0) and column offsets ``o_k``, their masks, and the tile's flat offsets and mask."""
    o_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, BLOCK_K)
    m_n = o_n < N
    m_k = o_k < K
    return o_n, o_k, m_n, m_k, o_n[:, None].to(tl.int64) * K + o_k[None, :], m_n[:, None] & m_k[None, :]


@triton.jit
def score_row_log_softmax(
    hidden, weight, bias, token_ids, o_n, o_k, m_n, m_k, H,
    stride_hn, stride_hh, stride_wv, stride_wh,
    temperature,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """The forward both ops start with, for rows o_n: z [BLOCK_N, BLOCK_K] = (h . w_k + b_k) / T over
    the score rows ``token_ids`` of the head, gathered there, and its masked log-softmax.
    Returns (z, log p, p)."""
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
    # Padded columns carry no probability mass.
    b_logp, b_p = masked_log_softmax(b_z, m_k)
    return b_z, b_logp, b_p


@triton.jit
def masked_log_softmax(b_z, m_k):
    """(log p, p) over the K valid columns; padded columns get log p = -inf and p = 0.

    p = exp(log p), as the reference computes it: means then match it to the last bits, which
    matters for GDSO's advantages (a reward error is divided by the group's std)."""
    b_zm = tl.where(m_k[None, :], b_z, float("-inf"))
    b_max = tl.max(b_zm, axis=1)
    b_logp = b_zm - b_max[:, None] - tl.log(tl.sum(tl.exp(b_zm - b_max[:, None]), axis=1))[:, None]
    return b_logp, tl.exp(b_logp)


@triton.jit
def store_grad_hidden(
    b_d, weight, b_ids, grad_hidden, o_n, m_n, m_k, H,
    stride_wv, stride_wh,
    DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """grad_hidden[o_n] = d [BLOCK_N, BLOCK_K] @ W_K, one H block at a time."""
    for i_h in range(0, tl.cdiv(H, BLOCK_H)):
        o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
        m_h = o_h < H
        p_w = weight + b_ids[:, None] * stride_wv + o_h[None, :] * stride_wh
        b_w = tl.load(p_w, mask=m_k[:, None] & m_h[None, :], other=0.0).to(tl.float32)
        b_dh = tl.dot(b_d, b_w, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_H]
        p_dh = grad_hidden + o_n[:, None].to(tl.int64) * H + o_h[None, :]
        tl.store(p_dh, b_dh.to(grad_hidden.dtype.element_ty), mask=m_n[:, None] & m_h[None, :])


@triton.jit
def _weight_grad_kernel(
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


def weight_grad_partials(
    hidden: torch.Tensor, d_raw: torch.Tensor, cfg: ScoreRowsLaunchConfig, need_bias: bool, precision: str, block_k: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-split partial sums of grad W_K = d^T @ hidden [splits, K, H] and grad b_K [splits, K]
    (fp32), and the number of splits; summing them in split order is deterministic."""
    n, h = hidden.shape
    k = d_raw.shape[1]
    splits = cfg.weight_grad_splits(n, h, hidden.device)
    rows = triton.cdiv(triton.cdiv(n, splits), cfg.dw_block_n) * cfg.dw_block_n
    splits = triton.cdiv(n, rows)  # no empty splits
    w_part = torch.empty(splits, k, h, device=hidden.device, dtype=torch.float32)
    b_part = torch.empty(splits, k, device=hidden.device, dtype=torch.float32)
    _weight_grad_kernel[(triton.cdiv(h, cfg.dw_block_h), splits)](
        hidden, d_raw, w_part, b_part,
        n, h, k,
        hidden.stride(0), hidden.stride(1),
        rows,
        COMPUTE_DB=need_bias,
        DOT_PRECISION=precision,
        BLOCK_N=cfg.dw_block_n, BLOCK_K=block_k, BLOCK_H=cfg.dw_block_h,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return w_part, b_part, splits
