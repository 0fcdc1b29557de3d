"""Fused GDSO group losses: Triton kernels, drivers and the autograd Function in one file.

Per instance p (two sides j in {0, 1}, G rollouts each, K score levels s, R = s_max - s_min),
with z[j, i] the logits at the score position of rollout i of side j and t_j the targets:

    q[j, i] = softmax(z[j, i]),  mu[j, i] = sum_k q[j, i, k] s_k
    d[j, i, k] = (mu[j, i] - mu[jb, k]) - (t_j - t_jb)            jb = 1 - j, k over rollouts
    r_pt = 1 - |mu - t_j| / R,   r_pw[j, i] = 1 - sum_k |d[j, i, k]| / (G R)
    rewards = lambda_pt r_pt + lambda_pw r_pw
    advantages[j, i] = (r[j, i] - mean_i r[j]) / (std_i r[j] + eps)   (unbiased std, per side)
    L_pt = -(1/(2G)) sum_{j,i} log q[j, i, bin(t_j)]     bin = nearest level, ties to the lower
    L_pw = (1/(2 G^2 R)) sum_{j,i,k} |d[j, i, k]|
and loss_pt, loss_pw are the means of L_pt, L_pw over the P instances. The spec is
`zreward_fast.reference.gdso_loss`.

Gradients (rewards, advantages and mean carry none), per instance:
    dL_pt/dz[j, i]  = -(1/(2G)) (onehot(bin(t_j)) - q[j, i])
    dL_pw/dmu[j, i] = c (sum_k sign d[j, i, k] - sum_k sign d[jb, k, i]),   c = 1/(2 G^2 R)
                    = 2c sum_k sign d[j, i, k]
      (d[jb, k, i] = -d[j, i, k] holds exactly in floating point: a - b = -(b - a) is exact),
      with sign(0) = 0 like torch's abs backward, so exact ties (identical rollouts on both sides,
      equal targets) give the same gradient as autograd of the reference;
    dL_pw/dz[j, i, k] = dL_pw/dmu[j, i] q[j, i, k] (s_k - mu[j, i]).

Launches: forward = `_gdso_fwd_kernel` (one program per instance holds its 2 x G x K logits
padded to powers of two, computes every output above AND the two per-instance gradients
dL_pt/dz, dL_pw/dz) + `_gdso_reduce_kernel` (one program: fixed-order means over P, so the
result is deterministic, no atomics). Backward = `_gdso_bwd_kernel`, one elementwise launch:
    grad z = w_pt dL_pt/dz + w_pw dL_pw/dz,   w_pt = (g_loss alpha_pt + g_loss_pt) / P,
                                              w_pw = (g_loss alpha_pw + g_loss_pw) / P,
with the upstream grads read from device memory (no host sync) and the result stored in the
logits' dtype. The per-instance gradients are [P, 2, G, K] fp32 each: tiny for GDSO shapes.

Naming follows flash-linear-attention: `b_` block values, `p_` pointers, `o_` offsets, `m_` masks.
All math is fp32; loaded blocks are cast to fp32 (the interpreter has no bf16 arithmetic).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import reference
from ..reference import GDSOOutput
from .score_rows import masked_log_softmax
from .utils import INTERPRET, block_k, interp_cast

__all__ = ["GDSOLaunchConfig", "GDSOFunction", "gdso_fwd", "gdso_bwd", "gdso_loss_triton", "INTERPRET", "MAX_G"]

# One program holds a [BLOCK_G, BLOCK_G] pairwise tile per side in registers; past this G the
# tile no longer fits and the driver falls back to the torch reference (same results).
MAX_G = 256


@triton.jit
def _gdso_side(
    b_logp, b_p, b_mu, b_mu_other, b_t, b_t_other, b_s,
    m_g, m_gk, m_gg, o_k,
    G, K, b_R, lambda_pt, lambda_pw, eps,
    BLOCK_K: tl.constexpr,
):
    """Everything one side needs, given both sides' means.

    Returns rewards, advantages [BLOCK_G], the side's sums of log q[bin] and of |d|, and the
    per-instance gradients dL_pt/dz, dL_pw/dz [BLOCK_G, BLOCK_K] (zero on padding).
    """
    # d[i, k] = (mu_i - mu_other_k) - (t - t_other); padded pairs contribute nothing.
    b_d = (b_mu[:, None] - b_mu_other[None, :]) - (b_t - b_t_other)
    b_absd = tl.where(m_gg, tl.abs(b_d), 0.0)
    b_sgn = tl.where(m_gg, tl.where(b_d > 0, 1.0, tl.where(b_d < 0, -1.0, 0.0)), 0.0)

    b_rpt = 1.0 - tl.abs(b_mu - b_t) / b_R
    b_rpw = 1.0 - tl.sum(b_absd, axis=1) / (G * b_R)
    b_r = lambda_pt * b_rpt + lambda_pw * b_rpw
    # Group statistics over the G real rollouts of this side (unbiased std, as torch.std).
    b_rmean = tl.sum(tl.where(m_g, b_r, 0.0), axis=0) / G
    b_dev = tl.where(m_g, b_r - b_rmean, 0.0)
    b_std = tl.sqrt_rn(tl.sum(b_dev * b_dev, axis=0) / (G - 1))  # IEEE sqrt, as torch.std
    b_adv = b_dev / (b_std + eps)

    # Nearest level to the target, the lower one on an exact tie (reference.nearest_level: the
    # first argmin). Spelled out as the smallest index at the minimum rather than tl.argmin, whose
    # tie-breaking the interpreter does not reproduce (it is always leftmost there).
    b_dist = tl.where(o_k < K, tl.abs(b_t - b_s), float("inf"))
    b_bin = tl.min(tl.where(b_dist == tl.min(b_dist, axis=0), o_k, BLOCK_K), axis=0)
    m_bin = o_k[None, :] == b_bin
    # where(), not onehot * logp: padded columns hold logp = -inf and 0 * -inf = nan.
    b_picked = tl.sum(tl.sum(tl.where(m_gk & m_bin, b_logp, 0.0), axis=1), axis=0)

    inv_2g = 1.0 / (2 * G)
    b_dpt = tl.where(m_gk, -inv_2g * (tl.where(m_bin, 1.0, 0.0) - b_p), 0.0)
    # dL_pw/dmu_i = 2c sum_k sign(d_ik): own rows (+) and the other side's rows (-) agree exactly.
    b_dmu = tl.sum(b_sgn, axis=1) * (2.0 / (2 * G * G * b_R))
    b_dpw = tl.where(m_gk, b_dmu[:, None] * b_p * (b_s[None, :] - b_mu[:, None]), 0.0)
    return b_r, b_adv, b_picked, tl.sum(tl.sum(b_absd, axis=1), axis=0), b_dpt, b_dpw


@triton.jit
def _gdso_fwd_kernel(
    logits, targets, levels,
    mean, rewards, advantages, l_pt, l_pw, d_pt, d_pw,
    G, K,
    stride_zp, stride_zj, stride_zg, stride_zk,
    stride_tp, stride_tj,
    lambda_pt, lambda_pw, eps,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    i_p = tl.program_id(0).to(tl.int64)
    o_g = tl.arange(0, BLOCK_G)
    o_k = tl.arange(0, BLOCK_K)
    m_g = o_g < G
    m_k = o_k < K
    m_gk = m_g[:, None] & m_k[None, :]
    m_gg = m_g[:, None] & m_g[None, :]

    b_s = tl.load(levels + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_R = tl.load(levels + K - 1).to(tl.float32) - tl.load(levels).to(tl.float32)
    b_t0 = tl.load(targets + i_p * stride_tp).to(tl.float32)
    b_t1 = tl.load(targets + i_p * stride_tp + stride_tj).to(tl.float32)

    # Padded rollouts read 0 (a finite uniform row, masked out of every sum below); padded
    # levels become -inf inside the softmax, i.e. zero probability.
    p_z0 = logits + i_p * stride_zp + o_g[:, None] * stride_zg + o_k[None, :] * stride_zk
    b_z0 = tl.load(p_z0, mask=m_gk, other=0.0).to(tl.float32)
    b_z1 = tl.load(p_z0 + stride_zj, mask=m_gk, other=0.0).to(tl.float32)
    b_logp0, b_p0 = masked_log_softmax(b_z0, m_k)
    b_logp1, b_p1 = masked_log_softmax(b_z1, m_k)
    b_mu0 = tl.sum(b_p0 * b_s[None, :], axis=1)
    b_mu1 = tl.sum(b_p1 * b_s[None, :], axis=1)

    b_r0, b_adv0, b_pick0, b_abs0, b_dpt0, b_dpw0 = _gdso_side(
        b_logp0, b_p0, b_mu0, b_mu1, b_t0, b_t1, b_s, m_g, m_gk, m_gg, o_k,
        G, K, b_R, lambda_pt, lambda_pw, eps, BLOCK_K)
    b_r1, b_adv1, b_pick1, b_abs1, b_dpt1, b_dpw1 = _gdso_side(
        b_logp1, b_p1, b_mu1, b_mu0, b_t1, b_t0, b_s, m_g, m_gk, m_gg, o_k,
        G, K, b_R, lambda_pt, lambda_pw, eps, BLOCK_K)

    # [P, 2, G] outputs, contiguous.
    o_pg0 = i_p * 2 * G + o_g
    o_pg1 = o_pg0 + G
    tl.store(mean + o_pg0, b_mu0, mask=m_g)
    tl.store(mean + o_pg1, b_mu1, mask=m_g)
    tl.store(rewards + o_pg0, b_r0, mask=m_g)
    tl.store(rewards + o_pg1, b_r1, mask=m_g)
    tl.store(advantages + o_pg0, b_adv0, mask=m_g)
    tl.store(advantages + o_pg1, b_adv1, mask=m_g)
    tl.store(l_pt + i_p, -(b_pick0 + b_pick1) / (2 * G))
    tl.store(l_pw + i_p, (b_abs0 + b_abs1) / (2 * G * G * b_R))

    if COMPUTE_GRAD:
        # [P, 2, G, K] per-instance gradients, contiguous.
        o_gk0 = i_p * 2 * G * K + o_g[:, None] * K + o_k[None, :]
        o_gk1 = o_gk0 + G * K
        tl.store(d_pt + o_gk0, b_dpt0, mask=m_gk)
        tl.store(d_pt + o_gk1, b_dpt1, mask=m_gk)
        tl.store(d_pw + o_gk0, b_dpw0, mask=m_gk)
        tl.store(d_pw + o_gk1, b_dpw1, mask=m_gk)


@triton.jit
def _gdso_reduce_kernel(
    l_pt, l_pw, loss, loss_pt, loss_pw,
    P,
    alpha_pt, alpha_pw,
    BLOCK_P: tl.constexpr,
):
    # One program, fixed summation order: deterministic means over the P instances.
    b_pt = tl.zeros([BLOCK_P], dtype=tl.float32)
    b_pw = tl.zeros([BLOCK_P], dtype=tl.float32)
    for i_b in range(0, tl.cdiv(P, BLOCK_P)):
        o_p = i_b * BLOCK_P + tl.arange(0, BLOCK_P)
        m_p = o_p < P
        b_pt += tl.load(l_pt + o_p, mask=m_p, other=0.0)
        b_pw += tl.load(l_pw + o_p, mask=m_p, other=0.0)
    b_mpt = tl.sum(b_pt, axis=0) / P
    b_mpw = tl.sum(b_pw, axis=0) / P
    tl.store(loss_pt, b_mpt)
    tl.store(loss_pw, b_mpw)
    tl.store(loss, alpha_pt * b_mpt + alpha_pw * b_mpw)


@triton.jit
def _gdso_bwd_kernel(
    d_pt, d_pw, g_loss, g_loss_pt, g_loss_pw, grad_logits,
    N, P,
    alpha_pt, alpha_pw,
    HAS_G_LOSS: tl.constexpr,
    HAS_G_PT: tl.constexpr,
    HAS_G_PW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_n = i_b * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < N
    # Scalar weights from the upstream grads (device memory: no host sync).
    b_wpt = 0.0
    b_wpw = 0.0
    if HAS_G_LOSS:
        b_gl = tl.load(g_loss).to(tl.float32)
        b_wpt += b_gl * alpha_pt
        b_wpw += b_gl * alpha_pw
    if HAS_G_PT:
        b_wpt += tl.load(g_loss_pt).to(tl.float32)
    if HAS_G_PW:
        b_wpw += tl.load(g_loss_pw).to(tl.float32)
    b_dpt = tl.load(d_pt + o_n, mask=m_n, other=0.0)
    b_dpw = tl.load(d_pw + o_n, mask=m_n, other=0.0)
    b_g = (b_wpt / P) * b_dpt + (b_wpw / P) * b_dpw
    tl.store(grad_logits + o_n, b_g.to(grad_logits.dtype.element_ty), mask=m_n)


@dataclass(frozen=True)
class GDSOLaunchConfig:
    """Launch parameters; None: picked from the tile sizes."""

    num_warps: int | None = None  # forward kernel
    block_p: int = 1024  # instances per step of the reduction
    bwd_block: int = 1024  # elements per program of the backward kernel
    bwd_num_warps: int = 4


def _fwd_num_warps(block_g: int, block_k: int) -> int:
    # Largest tile: [BLOCK_G, max(BLOCK_G, BLOCK_K)] per side. ~4-8 fp32 values per thread.
    tile = block_g * max(block_g, block_k)
    return 1 if tile <= 256 else 2 if tile <= 1024 else 4 if tile <= 4096 else 8


def gdso_fwd(z: torch.Tensor, t: torch.Tensor, levels: torch.Tensor, alpha_pt: float, alpha_pw: float,
             lambda_pt: float, lambda_pw: float, eps: float, cfg: GDSOLaunchConfig, need_grad: bool,
             ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    """Launch the forward and reduction kernels: ((loss, loss_pt, loss_pw, rewards, advantages,
    mean), d_pt, d_pw), the last two the per-instance gradients w.r.t. the logits ([0] unless
    need_grad). Inputs validated, fp32 (or cast for the interpreter)."""
    P, _, G, K = z.shape
    f32 = dict(device=z.device, dtype=torch.float32)
    mean, rewards, advantages = (torch.empty(P, 2, G, **f32) for _ in range(3))
    l_pt, l_pw = torch.empty(P, **f32), torch.empty(P, **f32)
    # Per-instance gradients only when a backward can follow (not for rewards-only calls).
    gshape = (P, 2, G, K) if need_grad else (0,)
    d_pt, d_pw = torch.empty(gshape, **f32), torch.empty(gshape, **f32)
    loss, loss_pt, loss_pw = (torch.empty((), **f32) for _ in range(3))
    block_g = max(2, triton.next_power_of_2(G))
    bk = block_k(K)
    _gdso_fwd_kernel[(P,)](
        z, t, levels,
        mean, rewards, advantages, l_pt, l_pw, d_pt, d_pw,
        G, K,
        *z.stride(), *t.stride(),
        float(lambda_pt), float(lambda_pw), float(eps),
        COMPUTE_GRAD=need_grad,
        BLOCK_G=block_g, BLOCK_K=bk,
        num_warps=cfg.num_warps or _fwd_num_warps(block_g, bk),
    )
    _gdso_reduce_kernel[(1,)](
        l_pt, l_pw, loss, loss_pt, loss_pw,
        P,
        float(alpha_pt), float(alpha_pw),
        BLOCK_P=min(cfg.block_p, max(16, triton.next_power_of_2(P))),
        num_warps=4,
    )
    return (loss, loss_pt, loss_pw, rewards, advantages, mean), d_pt, d_pw


def gdso_bwd(d_pt: torch.Tensor, d_pw: torch.Tensor, grads: tuple[torch.Tensor | None, ...],
             alphas: tuple[float, float], out_dtype: torch.dtype, cfg: GDSOLaunchConfig) -> torch.Tensor:
    """Launch the backward kernel: grad of the logits [P, 2, G, K] in out_dtype from the upstream
    grads of (loss, loss_pt, loss_pw), any of them None."""
    P = d_pt.shape[0]
    n = d_pt.numel()
    grad = torch.empty(d_pt.shape, device=d_pt.device, dtype=torch.float32 if INTERPRET else out_dtype)
    gs = [None if g is None else g.to(torch.float32) for g in grads]
    _gdso_bwd_kernel[(triton.cdiv(n, cfg.bwd_block),)](
        d_pt, d_pw, *(g if g is not None else d_pt for g in gs), grad,
        n, P,
        *alphas,
        *(g is not None for g in gs),
        BLOCK=cfg.bwd_block,
        num_warps=cfg.bwd_num_warps,
    )
    return grad if grad.dtype == out_dtype else grad.to(out_dtype)  # interpreter only: it computed in fp32


class GDSOFunction(torch.autograd.Function):
    """Autograd wrapper; inputs must already be validated (see `zreward_fast.kernels`)."""

    @staticmethod
    def forward(ctx, score_logits, targets, levels, alpha_pt, alpha_pw, lambda_pt, lambda_pw, eps, cfg, need_grad):  # type: ignore[override]
        out, d_pt, d_pw = gdso_fwd(interp_cast(score_logits), interp_cast(targets), levels, alpha_pt, alpha_pw,
                                   lambda_pt, lambda_pw, eps, cfg, need_grad)
        ctx.save_for_backward(d_pt, d_pw)
        ctx.alphas = (float(alpha_pt), float(alpha_pw))
        ctx.in_dtype = score_logits.dtype
        ctx.cfg = cfg
        ctx.mark_non_differentiable(*out[3:])  # rewards, advantages, mean
        ctx.set_materialize_grads(False)  # absent grads stay None: the kernel skips their terms
        return out

    @staticmethod
    def backward(ctx, g_loss, g_loss_pt, g_loss_pw, *_):  # type: ignore[override]
        none = (None,) * 9
        if not ctx.needs_input_grad[0] or ctx.saved_tensors[0].numel() == 0 or all(g is None for g in (g_loss, g_loss_pt, g_loss_pw)):
            return (None,) + none
        d_pt, d_pw = ctx.saved_tensors
        return (gdso_bwd(d_pt, d_pw, (g_loss, g_loss_pt, g_loss_pw), ctx.alphas, ctx.in_dtype, ctx.cfg),) + none


def gdso_loss_triton(score_logits: torch.Tensor, targets: torch.Tensor, levels: torch.Tensor, hp: dict[str, float],
                     cfg: GDSOLaunchConfig | None = None) -> GDSOOutput:
    """The Triton path of `zreward_fast.kernels.gdso_loss`, which validates its inputs; ``hp`` holds
    alpha_pt, alpha_pw, lambda_pt, lambda_pw and eps. Returns fp32 outputs; the gradient w.r.t.
    score_logits comes back in score_logits' dtype."""
    lv = levels.to(device=score_logits.device, dtype=torch.float32).contiguous()
    if score_logits.shape[2] > MAX_G:
        # The per-instance pairwise tile would not fit in one program's registers.
        return reference.gdso_loss(score_logits, targets, lv, **hp)
    need_grad = score_logits.requires_grad and torch.is_grad_enabled()
    out = GDSOFunction.apply(score_logits, targets, lv, hp["alpha_pt"], hp["alpha_pw"], hp["lambda_pt"], hp["lambda_pw"],
                             hp["eps"], cfg or GDSOLaunchConfig(), need_grad)
    return GDSOOutput(*out)
