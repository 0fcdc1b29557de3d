"""The Gated DeltaNet of Qwen3.5, in prefill: its projections, short causal convolution, gates and
the gated delta rule, in three back ends that compute the same thing (docs/architecture.md):

* ``"decomposed"``: standard torch ops only, the chunked (WY) form with a fixed chunk of 16, the
  chunk's unit-lower-triangular system inverted by a factored Neumann series and the state carried
  by ``torch._higher_order_ops.scan``: it traces to portable ONNX (a ``Scan``), for TensorRT;
* ``"contrib"``: two ``torch.library`` custom ops whose eager bodies are the decomposed math and
  which ``export/onnx_export.py`` translates to onnxruntime's ``com.microsoft::CausalConvWithState``
  and ``com.microsoft::GatedDeltaNet``;
* ``"fla"``: flash-linear-attention's Triton kernels (CUDA only), for the GPU engine.

:func:`naive_gated_delta_rule` is the step-by-step recurrence the chunked form is tested against,
as flash-linear-attention keeps ``naive.py`` beside ``chunk.py``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch._higher_order_ops.scan import scan  # traces to one ONNX Scan over a dynamic chunk count

from ..runtime.bundle import GDN_FORMS

CHUNK_SIZE = 16  # measured on CPU (onnxruntime): 16 and 32 tie, 64 takes twice as long
L2NORM_EPS = 1e-6  # HF / FLA: x * rsqrt(sum(x^2) + 1e-6)
GDN_BACKENDS = (*GDN_FORMS, "fla")  # the bundle's graph forms, and the GPU engine's kernels


def check_gdn_form(gdn: str) -> str:
    if gdn not in GDN_FORMS:
        raise ValueError(f"gdn must be one of {GDN_FORMS}, got {gdn!r}")
    return gdn


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gdn_gates(a: torch.Tensor, b: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3.5's decay and update rate: ``g = -exp(A_log) * softplus(a + dt_bias)``, ``beta = sigmoid(b)``."""
    g = -a_log.float().exp() * F.softplus(a.float() + dt_bias)
    return g, b.sigmoid()


def unit_lower_inverse(n: torch.Tensor) -> torch.Tensor:
    """``(I + n)^-1`` for strictly lower-triangular ``n [..., C, C]``.

    ``n`` is nilpotent (``n^C = 0``), so the Neumann series is finite and factors as
    ``prod_j (I + (-n)^(2^j))`` for ``2^j < C``: ceil(log2 C) factors, built by repeated squaring
    with plain batched matmuls of static shape, in every back end (no triangular solve op, no gathers).
    """
    c = n.shape[-1]
    p = -n
    inv = torch.eye(c, dtype=n.dtype, device=n.device) + p
    s = 2
    while s < c:
        p = p @ p
        inv = inv + inv @ p
        s *= 2
    return inv


def chunk_gated_delta_rule(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    chunk_size: int = CHUNK_SIZE, qk_l2norm: bool = True,
) -> torch.Tensor:
    """The gated delta rule in chunked (WY) form, as HF's ``torch_chunk_gated_delta_rule`` with
    ``use_qk_l2norm_in_kernel=qk_l2norm`` and no initial state, but traceable with a dynamic length.

    query, key [B, L, Hk, dk]; value [B, L, Hv, dv]; g, beta [B, L, Hv] -> [B, L, Hv, dv].

    Laid out as ``[n, B, Hk, r, C, d]`` (n chunks first: the scan's own layout, so its inputs need
    no copy; r = Hv / Hk value heads per key head) so ``Q K^T`` and ``K K^T`` are computed once per
    key head, not once per value head. Small chunks (16) keep the intra-chunk products cheap: for
    scoring-length prefills onnxruntime runs this in about half the time of 64-step chunks.
    """
    dtype = query.dtype
    bsz, length, hk, dk = key.shape
    hv, dv = value.shape[-2:]
    if hv % hk:
        raise ValueError(f"value heads ({hv}) must be a multiple of key heads ({hk})")
    r = hv // hk
    c = chunk_size
    chunks = (length + c - 1) // c
    # Pad the length to a chunk multiple: append one zero chunk, then keep the first
    # ceil(L / C) * C steps with an index. Unlike F.pad by (-L) % C, nothing here lets the exporter
    # derive a guard that would specialise the length.
    keep = torch.arange(chunks * c, device=query.device)

    def pad(x: torch.Tensor) -> torch.Tensor:  # [B, L, ...] -> [B, n * C, ...]
        zeros = torch.zeros(x.shape[0], c, *x.shape[2:], dtype=x.dtype, device=x.device)
        return torch.cat([x, zeros], dim=1).index_select(1, keep)

    q, k = query.float(), key.float()
    if qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q * dk**-0.5
    q, k = (pad(x).reshape(bsz, chunks, c, hk, dk).permute(1, 0, 3, 2, 4) for x in (q, k))  # [n, B, Hk, C, dk]
    v = pad(value.float()).reshape(bsz, chunks, c, hk, r, dv).permute(1, 0, 3, 4, 2, 5)  # [n, B, Hk, r, C, dv]
    gates = pad(torch.stack([g.float(), beta.float()], -1)).reshape(bsz, chunks, c, hk, r, 2)
    gates = gates.permute(1, 0, 3, 4, 2, 5)
    g, beta = gates[..., 0], gates[..., 1]  # [n, B, Hk, r, C]

    kk = (k @ k.transpose(-1, -2)).unsqueeze(3)  # shared by the r value heads of a key head
    qk = (q @ k.transpose(-1, -2)).unsqueeze(3)
    cum = g.cumsum(-1)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    strict = torch.ones(c, c, dtype=torch.bool, device=q.device).tril(-1)
    decay = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()
    t_inv = unit_lower_inverse((kk * decay * beta.unsqueeze(-1)).masked_fill(~strict, 0.0))
    intra = qk * decay
    k = k.unsqueeze(3)
    new_values = t_inv @ (v * beta.unsqueeze(-1))
    k_cumdecay = t_inv @ (k * (beta * cum.exp()).unsqueeze(-1))
    q = q.unsqueeze(3) * cum.exp().unsqueeze(-1)
    k = k * (cum[..., -1:] - cum).exp().unsqueeze(-1)
    chunk_decay = cum[..., -1].exp()[..., None, None]  # [n, B, Hk, r, 1, 1]

    def step(state: torch.Tensor, xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        q_i, k_i, u_i, w_i, a_i, d_i = xs
        v_new = u_i - w_i @ state
        out = q_i @ state + a_i @ v_new
        return state * d_i + k_i.transpose(-1, -2) @ v_new, out

    state0 = torch.zeros(bsz, hk, r, dk, dv, dtype=torch.float32, device=q.device)
    _, out = scan(step, state0, [q, k, new_values, k_cumdecay, intra, chunk_decay])  # [n, B, Hk, r, C, dv]
    out = out.permute(1, 0, 4, 2, 3, 5).reshape(bsz, chunks * c, hv, dv)
    return out.index_select(1, torch.arange(length, device=q.device)).to(dtype)  # drop the padding


def gdn_projections(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A Qwen3.5 GatedDeltaNet's input projections of ``x [B, L, H]``: ``qkv`` (before the conv),
    ``z [B, L, Hv, dv]`` (the output gate), and the gate inputs ``a``, ``b [B, L, Hv]``."""
    bsz, length = x.shape[:2]
    z = m.in_proj_z(x).reshape(bsz, length, m.num_v_heads, m.head_v_dim)
    return m.in_proj_qkv(x), z, m.in_proj_a(x), m.in_proj_b(x)


def gdn_split_heads(m: nn.Module, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The convolved ``qkv [B, L, 2*Hk*dk + Hv*dv]`` -> q, k ``[B, L, Hk, dk]`` and v ``[B, L, Hv, dv]``."""
    bsz, length = qkv.shape[:2]
    q, k, v = torch.split(qkv, [m.key_dim, m.key_dim, m.value_dim], dim=-1)
    return (q.reshape(bsz, length, m.num_k_heads, m.head_k_dim), k.reshape(bsz, length, m.num_k_heads, m.head_k_dim),
            v.reshape(bsz, length, m.num_v_heads, m.head_v_dim))


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal conv + SiLU on channels-last ``x [B, L, C]`` with ``weight [C, 1, K]``.

    Left padding only, so the Conv yields exactly L steps (onnxruntime folds the Pad into the
    Conv's pads): no slice of a [B, C, L + K - 1] result.
    """
    y = F.conv1d(F.pad(x.transpose(1, 2), (weight.shape[-1] - 1, 0)), weight, bias, groups=weight.shape[0])
    return F.silu(y).transpose(1, 2)


def naive_gated_delta_rule(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    qk_l2norm: bool = True,
) -> torch.Tensor:
    """The gated delta rule one step at a time (float32), the definition the chunked form computes:
    ``S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T``, ``o_t = S_t^T q_t / sqrt(dk)``.

    Same shapes as :func:`chunk_gated_delta_rule`; value head j reads key head ``j // (Hv / Hk)``."""
    bsz, length, hk, dk = key.shape
    hv, dv = value.shape[-2:]
    r = hv // hk
    q, k = query.float(), key.float()
    if qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q, k = q.repeat_interleave(r, dim=2) * dk**-0.5, k.repeat_interleave(r, dim=2)  # [B, L, Hv, dk]
    v, g, beta = value.float(), g.float(), beta.float()
    state = torch.zeros(bsz, hv, dk, dv, dtype=torch.float32, device=value.device)
    out = []
    for t in range(length):
        state = state * g[:, t].exp()[..., None, None]
        error = v[:, t] - torch.einsum("bhkv,bhk->bhv", state, k[:, t])
        state = state + torch.einsum("bhk,bhv->bhkv", k[:, t], error * beta[:, t, :, None])
        out.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    return torch.stack(out, dim=1).to(value.dtype)


# --------------------------------------------------------------------------- contrib custom ops
# Opaque to torch.export; onnx_export.py translates them to com.microsoft ops. Their eager bodies
# are the decomposed math, so the torch module computes the same thing in either form.
@torch.library.custom_op("zreward_fast::gated_delta_net", mutates_args=())
def gated_delta_net_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    a_log: torch.Tensor, dt_bias: torch.Tensor,
) -> torch.Tensor:
    """GatedDeltaNet with fused gates (softplus decay, sigmoid beta) on l2-normalised q and k.

    The l2 norm stays outside the op: onnxruntime's fused ``qk_l2_norm`` uses another epsilon
    than HF's ``rsqrt(sum(x^2) + 1e-6)``, visible (~1e-2 relative) when the q/k norms are small.
    """
    g, beta = gdn_gates(a, b, a_log, dt_bias)
    return chunk_gated_delta_rule(query, key, value, g, beta, qk_l2norm=False).contiguous()


@gated_delta_net_op.register_fake
def _(query, key, value, a, b, a_log, dt_bias):  # noqa: ANN001, ANN202
    return torch.empty_like(value)


@torch.library.custom_op("zreward_fast::causal_conv1d_silu", mutates_args=())
def causal_conv1d_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """CausalConvWithState (channels last, SiLU, zero past state)."""
    return causal_conv1d_silu(x, weight, bias).contiguous()


@causal_conv1d_op.register_fake
def _(x, weight, bias=None):  # noqa: ANN001, ANN202
    return torch.empty_like(x)


# --------------------------------------------------------------------------- flash-linear-attention
class FlaKernels(NamedTuple):
    """flash-linear-attention's ``chunk_gated_delta_rule`` and ``causal_conv1d``."""

    gdn: Callable
    conv: Callable


def load_fla() -> FlaKernels | None:
    """flash-linear-attention's ``(chunk_gated_delta_rule, causal_conv1d)``, or None when ``fla``
    is not importable. Only used on CUDA: its Triton kernels do not run on the CPU."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gdn
    except Exception:  # noqa: BLE001 - any import failure (missing, broken triton) means "no fla"
        return None
    conv = None
    for mod in ("fla.modules.causal_conv1d", "fla.modules.convolution", "fla.modules"):
        try:
            conv = getattr(__import__(mod, fromlist=["causal_conv1d"]), "causal_conv1d")
            break
        except (ImportError, AttributeError):
            continue
    if conv is None:
        return None
    return FlaKernels(fla_gdn, conv)
