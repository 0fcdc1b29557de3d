"""Fused LM head + GRPO token loss: Triton kernel, chunked driver and the autograd Function.

Spec: `zreward_fast.reference.grpo_token_loss` (docs/architecture.md, Losses). For N = B*T tokens with
hidden states h_n, the LM head W [V, H], sampled tokens o_n, mask m_n, advantage A_b of the
token's row, and optional old / reference log-probs:

    z_n   = W h_n / tau                          (the [V] logits of token n)
    lp_n  = z_n[o_n] - logsumexp(z_n)
    r_n   = exp(lp_n - lp_old_n)                 (lp_old = lp, i.e. r = 1, when not given)
    pg_n  = -min(r_n A, clip(r_n, 1-eps, 1+eps) A)
    kl_n  = exp(d_n) - d_n - 1,  d_n = lp_ref_n - lp_n      (only with lp_ref and beta > 0)
    l_n   = pg_n + beta kl_n
    L     = sum_n w_n l_n,  w_n = m_n / (B max(sum_t m_bt, 1))  (= mean_b of the masked row means)

Gradient. dL/dlp_n = c_n = w_n dl_n/dlp_n with, exactly as torch autograd differentiates the
reference (torch.minimum gives half the gradient to each side on a tie, clamp passes it on the
closed interval [1-eps, 1+eps]), x = r A and y = clip(r) A:

    g_x     = 1 if x < y, 1/2 if x == y, 0 if x > y;   g_y = 1 - g_x
    dpg/dlp = -(g_x A + g_y A [1-eps <= r <= 1+eps]) r       (dr/dlp = r, also when r = 1)
    dkl/dlp = 1 - exp(d_n)

so inside the clip range (x == y) it is -A r, and it is 0 where the clipped branch is the min
and r lies outside the range. With p_n = softmax(z_n), the gradient w.r.t. the raw logits
W h_n is c_n (onehot(o_n) - p_n) / tau, and

    grad_h = dlogits @ W        grad_W = dlogits^T @ h.

Design (Liger-Kernel's fused linear cross-entropy, with the GRPO loss). The tokens are walked in
chunks of C rows; per chunk:
  1. logits [C, V] fp32 = h_chunk @ W^T (cuBLAS; 16-bit inputs with an fp32 output, so the
     log-softmax sees unrounded logits);
  2. one Triton program per row streams the row over V in blocks: online max / sum-exp, the
     chosen token's logit, lp, the loss term and c_n; a second pass writes dlogits (fp32 in place
     over the logits for fp32 inputs, else into a [C, V] buffer in the input dtype). Rows with
     c_n = 0 (masked tokens) only write zeros;
  3. grad_h[chunk] = dlogits @ W and grad_W += dlogits^T @ h_chunk (cuBLAS, fp32 accumulation
     inside each GEMM; grad_W is accumulated across chunks in the weight's dtype by default, in
     fp32 with `GRPOLaunchConfig(fp32_weight_grad=True)`).
The gradients are therefore computed in the forward; backward only scales them by the upstream
grad of the loss. Nothing of shape [B*T, V] is ever allocated, only [C, V]. token_logprobs
(all positions, masked ones too) carry no gradient.

Naming follows flash-linear-attention: `b_` block values, `p_` pointers, `o_` offsets, `m_` masks.
All math is fp32; loaded blocks are cast to fp32 (the interpreter has no bf16 arithmetic).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .utils import INTERPRET, interp_cast

__all__ = ["GRPOLaunchConfig", "GRPOTokenLossFunction", "INTERPRET"]


@triton.jit
def _grpo_chunk_kernel(
    logits, dlogits, token_ids, weights, advantages, old_logprobs, ref_logprobs,
    token_logprobs, token_loss,
    row_start, V, NUM_V_BLOCKS,
    stride_z, stride_d,
    temperature, clip_lo, clip_hi, beta,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # One program per token row of the chunk; i_n is the token's index in the flat [N] arrays.
    i_r = tl.program_id(0).to(tl.int64)
    i_n = row_start + i_r
    p_z = logits + i_r * stride_z
    b_o = tl.load(token_ids + i_n).to(tl.int64)

    # Pass 1: online max and sum of exp over the vocabulary.
    b_m = float("-inf")
    b_d = 0.0
    for i_v in range(0, NUM_V_BLOCKS):
        o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_z = tl.load(p_z + o_v, mask=m_v, other=float("-inf")).to(tl.float32) / temperature
        b_mnew = tl.maximum(b_m, tl.max(b_z, axis=0))
        b_d = b_d * tl.exp(b_m - b_mnew) + tl.sum(tl.exp(b_z - b_mnew), axis=0)
        b_m = b_mnew
    b_lse = b_m + tl.log(b_d)
    b_lp = tl.load(p_z + b_o).to(tl.float32) / temperature - b_lse

    # Clipped policy-gradient term and its derivative w.r.t. lp (autograd's tie rules).
    b_w = tl.load(weights + i_n)
    b_a = tl.load(advantages + i_n)
    if HAS_OLD:
        b_r = tl.exp(b_lp - tl.load(old_logprobs + i_n))
    else:
        b_r = tl.exp(b_lp - b_lp)  # exp(lp - lp.detach()) = 1, its gradient still r
    b_x = b_r * b_a
    b_y = tl.minimum(tl.maximum(b_r, clip_lo), clip_hi) * b_a
    b_l = -tl.minimum(b_x, b_y)
    b_gx = tl.where(b_x < b_y, 1.0, tl.where(b_x == b_y, 0.5, 0.0))
    b_in = (b_r >= clip_lo) & (b_r <= clip_hi)
    b_dl = -(b_gx * b_a + (1.0 - b_gx) * tl.where(b_in, b_a, 0.0)) * b_r
    if HAS_REF:
        # k3 estimator of KL(pi || pi_ref)
        b_delta = tl.load(ref_logprobs + i_n) - b_lp
        b_ed = tl.exp(b_delta)
        b_l += beta * (b_ed - b_delta - 1.0)
        b_dl += beta * (1.0 - b_ed)

    # Masked tokens add exactly nothing (even if their old/ref log-probs are extreme).
    b_keep = b_w != 0.0
    tl.store(token_logprobs + i_n, b_lp)
    tl.store(token_loss + i_n, tl.where(b_keep, b_w * b_l, 0.0))

    if COMPUTE_GRAD:
        # Pass 2: dlogits_raw = c (onehot - p) / tau, c = dL/dlp.
        b_c = tl.where(b_keep, b_w * b_dl, 0.0) / temperature
        p_d = dlogits + i_r * stride_d
        if b_c == 0.0:
            for i_v in range(0, NUM_V_BLOCKS):
                o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
                tl.store(p_d + o_v, tl.zeros([BLOCK_V], dtype=tl.float32).to(dlogits.dtype.element_ty),
                         mask=o_v < V)
        else:
            for i_v in range(0, NUM_V_BLOCKS):
                o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
                m_v = o_v < V
                b_z = tl.load(p_z + o_v, mask=m_v, other=0.0).to(tl.float32) / temperature
                b_p = tl.exp(b_z - b_lse)
                b_g = b_c * (tl.where(o_v == b_o, 1.0, 0.0) - b_p)
                # Same element, same thread as the load above: safe in place for fp32.
                tl.store(p_d + o_v, b_g.to(dlogits.dtype.element_ty), mask=m_v)


@dataclass(frozen=True)
class GRPOLaunchConfig:
    """Chunking and launch parameters. Defaults: GPU-sized; small in the interpreter (tests).

    chunk_rows: tokens per chunk C (None: the most that keep the fp32 [C, V] logits block within
    max_chunk_bytes, a multiple of 128, balanced over the chunks). 16-bit inputs need a second
    [C, V] block in the input dtype for dlogits, so a chunk holds C*V*6 bytes in all.
    fp32_weight_grad: accumulate grad_W over chunks in an fp32 [V, H] buffer (one rounding at the
    end, 2x the weight's bytes more memory for 16-bit weights) instead of in the weight's dtype
    (one rounding per chunk).
    """

    chunk_rows: int | None = None
    max_chunk_bytes: int = 1 << 30
    block_v: int = 8192
    num_warps: int = 16
    fp32_weight_grad: bool = False

    @staticmethod
    def default(device: torch.device) -> "GRPOLaunchConfig":
        if INTERPRET or device.type != "cuda":
            return GRPOLaunchConfig(chunk_rows=32, block_v=512, num_warps=4)
        return GRPOLaunchConfig()

    def rows(self, n: int, v: int) -> int:
        """Chunk size C for N tokens and a vocabulary of V."""
        if self.chunk_rows is not None:
            return max(1, min(int(self.chunk_rows), n))
        c_max = max(1, self.max_chunk_bytes // (4 * v))
        if c_max >= 128:
            c_max -= c_max % 128
        n_chunks = triton.cdiv(n, c_max)
        c = triton.cdiv(n, n_chunks)
        if c_max >= 128:
            c = min(c_max, triton.cdiv(c, 128) * 128)  # GEMM-friendly M, same number of chunks
        return max(1, min(c, n))


# Whether cuBLAS gives fp32 output for 16-bit inputs (aten::mm.dtype_out, torch >= 2.8 on CUDA).
# None: not tried yet. If it fails, the logits are computed in the input dtype, then upcast.
FP32_OUT_GEMM: bool | None = None


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out (fp32) = a @ b, accumulated in fp32 and not rounded to a's 16-bit dtype."""
    global FP32_OUT_GEMM
    if a.dtype == torch.float32:
        torch.mm(a, b, out=out)
        return
    if FP32_OUT_GEMM is not False:
        try:
            torch.ops.aten.mm.dtype_out(a, b, torch.float32, out=out)
            FP32_OUT_GEMM = True
            return
        except (RuntimeError, NotImplementedError, AttributeError):
            if FP32_OUT_GEMM:  # it worked before: a real error
                raise
            FP32_OUT_GEMM = False
    out.copy_(torch.mm(a, b))  # fallback: logits rounded to the 16-bit dtype


def _addmm_fp32_acc(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """acc (fp32) (+)= a @ b for 16-bit a, b, without rounding the products to 16 bits."""
    if FP32_OUT_GEMM is not False:
        try:
            if first:
                torch.ops.aten.mm.dtype_out(a, b, torch.float32, out=acc)
            else:
                torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
            return
        except (RuntimeError, NotImplementedError, AttributeError):
            pass
    prod = torch.mm(a.float(), b.float())  # fallback: fp32 copies of the operands
    acc.copy_(prod) if first else acc.add_(prod)


def grpo_fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    clip_eps: float,
    beta: float,
    temperature: float,
    cfg: GRPOLaunchConfig,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Loss, token log-probs and (if asked) grad_hidden [B,T,H] and grad_W [V,H] of the loss.

    Inputs validated. The grads come back in hidden's and weight's dtypes.
    """
    B, T, H = hidden.shape
    V = weight.shape[0]
    N = B * T
    dev = hidden.device
    h_dtype, w_dtype = hidden.dtype, weight.dtype
    lp = torch.empty(N, device=dev, dtype=torch.float32)
    if N == 0:
        # As the reference: the mean over B rows is nan for B = 0 and 0 for empty rows.
        loss = torch.full((), float("nan") if B == 0 else 0.0, device=dev)
        gh = torch.zeros_like(hidden) if need_hidden else None
        gw = torch.zeros_like(weight) if need_weight else None
        return loss, lp.view(B, T), gh, gw

    h2 = interp_cast(hidden.reshape(N, H))
    w = interp_cast(weight)
    cd = torch.promote_types(h2.dtype, w.dtype)  # GEMM dtype (cuBLAS wants one dtype)
    h2, w = h2.to(cd), w.to(cd)

    # Per-token fp32 side inputs: loss weight w_n = m / (B * max(row count, 1)), A of the row.
    m = mask.detach().to(device=dev, dtype=torch.float32)
    wts = (m / (m.sum(-1, keepdim=True).clamp_min(1.0) * B)).reshape(N).contiguous()
    adv = advantages.detach().float()[:, None].expand(B, T).reshape(N).contiguous()
    ids = token_ids.detach().reshape(N).contiguous()
    has_old = old_logprobs is not None
    has_ref = ref_logprobs is not None and beta != 0.0
    old = old_logprobs.detach().float().reshape(N).contiguous() if has_old else lp
    ref = ref_logprobs.detach().float().reshape(N).contiguous() if has_ref else lp
    tok_loss = torch.empty(N, device=dev, dtype=torch.float32)

    C = cfg.rows(N, V)
    need_grad = need_hidden or need_weight
    logits = torch.empty(C, V, device=dev, dtype=torch.float32)
    # dlogits: in place over the fp32 logits (same element, same thread), else its own block.
    dlogits = logits if (cd == torch.float32 or not need_grad) else torch.empty(C, V, device=dev, dtype=cd)
    grad_h = torch.empty(N, H, device=dev, dtype=cd) if need_hidden else None
    gw_dtype = torch.float32 if cfg.fp32_weight_grad else cd
    grad_w = torch.empty(V, H, device=dev, dtype=gw_dtype) if need_weight else None
    block_v = min(cfg.block_v, triton.next_power_of_2(V))
    lo, hi = 1.0 - clip_eps, 1.0 + clip_eps

    for s in range(0, N, C):
        e = min(s + C, N)
        h_c = h2[s:e]
        z = logits[: e - s]
        _mm_fp32_out(h_c, w.t(), z)
        _grpo_chunk_kernel[(e - s,)](
            z, dlogits, ids, wts, adv, old, ref,
            lp, tok_loss,
            s, V, triton.cdiv(V, block_v),
            logits.stride(0), dlogits.stride(0),
            float(temperature), lo, hi, float(beta),
            HAS_OLD=has_old, HAS_REF=has_ref, COMPUTE_GRAD=need_grad,
            BLOCK_V=block_v, num_warps=cfg.num_warps,
        )
        if not need_grad:
            continue
        d = dlogits[: e - s]
        if need_hidden:
            torch.mm(d, w, out=grad_h[s:e])
        if need_weight:
            if gw_dtype == cd:
                if s == 0:
                    torch.mm(d.t(), h_c, out=grad_w)
                else:
                    grad_w.addmm_(d.t(), h_c)
            else:  # 16-bit operands, fp32 accumulator
                _addmm_fp32_acc(grad_w, d.t(), h_c, first=s == 0)

    loss = tok_loss.sum()
    gh = grad_h.view(B, T, H).to(h_dtype) if need_hidden else None
    gw = grad_w.to(w_dtype) if need_weight else None
    return loss, lp.view(B, T), gh, gw


class GRPOTokenLossFunction(torch.autograd.Function):
    """The op behind `zreward_fast.kernels.grpo_token_loss`, which validates its inputs: returns
    (loss [] fp32, token_logprobs [B, T] fp32, no gradient); ``cfg`` None: the device's default.

    The forward computes the loss and its gradients (``grad_enabled``: torch's grad mode at the
    call); backward scales them by the upstream grad.
    """

    @staticmethod
    def forward(ctx, hidden, weight, token_ids, mask, advantages, old_logprobs, ref_logprobs,  # type: ignore[override]
                clip_eps, beta, temperature, cfg, grad_enabled):
        cfg = cfg or GRPOLaunchConfig.default(hidden.device)
        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]
        loss, lp, gh, gw = grpo_fused(
            hidden, weight, token_ids, mask, advantages, old_logprobs, ref_logprobs,
            clip_eps, beta, temperature, cfg, need_h, need_w,
        )
        ctx.save_for_backward(gh, gw)
        ctx.mark_non_differentiable(lp)
        return loss, lp

    @staticmethod
    def backward(ctx, grad_loss, grad_lp):  # type: ignore[override]
        gh, gw = ctx.saved_tensors
        if grad_loss is None:
            gh = gw = None
        elif not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            # Scale only when needed: grad_W is as large as the LM head.
            gh = None if gh is None else gh * grad_loss.to(gh.dtype)
            gw = None if gw is None else gw * grad_loss.to(gw.dtype)
        return gh, gw, None, None, None, None, None, None, None, None, None, None
