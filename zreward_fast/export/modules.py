"""Export-friendly torch modules for ``vision.onnx`` and ``decoder.onnx`` (see docs/bundle.md).

The Hugging Face Qwen3.5 modules are written for training and generation: packed vision
sequences split by ``cu_seqlens``, masked scatters with data-dependent sizes, grids read with
``.tolist()``, caches, and a Gated DeltaNet whose chunk loop is a Python loop over a
data-dependent count. None of that traces to a graph with a dynamic batch and length. These
modules hold references to the HF Linear / Norm / MLP submodules (the weights are shared, not
copied) and re-implement only the parts that do not trace:

* vision: the patch embedding as a matmul (Conv3d with kernel == stride is one), the position
  embeddings and the rotary cos/sin of the one bucket grid as buffers, and each image as its own
  batch row of plain attention over its P patches (no ``cu_seqlens``);
* decoder: the image-feature merge by gather, the M-RoPE cos/sin from ``position_ids``, the
  causal + padding mask from ``attention_mask``, the Gated DeltaNet layers, and the score head
  on the K score rows of the LM head at ``query_positions``.

Gated DeltaNet comes in two forms (``gdn=``):

* ``"decomposed"``: standard ops only (the portable path, for TensorRT). The chunked (WY) form of
  the gated delta rule with a fixed chunk of 16: the length is padded to a chunk multiple inside
  the graph, the unit-lower-triangular UT system of each chunk is inverted by a factored Neumann
  series of log2(16) = 4 steps (batched matmuls, no triangular solve op), and the state is carried
  across the dynamic number of chunks by ``torch._higher_order_ops.scan`` (an ONNX ``Scan``).
* ``"contrib"``: onnxruntime's ``com.microsoft::CausalConvWithState`` and
  ``com.microsoft::GatedDeltaNet``, emitted through two ``torch.library`` custom ops whose eager
  implementations are the decomposed math (the ONNX translations live in ``onnx_export.py``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._higher_order_ops.scan import scan  # traces to one ONNX Scan over a dynamic chunk count

from ..runtime.bundle import GDN_FORMS

CHUNK_SIZE = 16  # measured on CPU (onnxruntime): 16 and 32 tie, 64 takes twice as long
L2NORM_EPS = 1e-6  # HF / FLA: x * rsqrt(sum(x^2) + 1e-6)


def check_gdn_form(gdn: str) -> str:
    if gdn not in GDN_FORMS:
        raise ValueError(f"gdn must be one of {GDN_FORMS}, got {gdn!r}")
    return gdn


# --------------------------------------------------------------------------- gated delta rule
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


# --------------------------------------------------------------------------- vision
def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x [B, L, ...]`` at ``rows [B, D]`` -> ``[B, D, ...]`` (a gather along the sequence)."""
    idx = rows.reshape(*rows.shape, *([1] * (x.dim() - 2))).expand(*rows.shape, *x.shape[2:])
    return torch.gather(x, 1, idx)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def single_frame_patches(pixel_values: torch.Tensor, channels: int, temporal_patch_size: int) -> torch.Tensor:
    """Processor patches ``[..., C * t * p * p]`` -> the first frame's ``[..., C * p * p]``.

    A still image fills all t frames of a patch with the same pixels, so one frame carries all of it.
    """
    lead, dim = pixel_values.shape[:-1], pixel_values.shape[-1]
    frames = pixel_values.reshape(*lead, channels, temporal_patch_size, dim // (channels * temporal_patch_size))
    return frames[..., 0, :].reshape(*lead, -1)


class ExportVision(nn.Module):
    """The vision tower for one fixed bucket: ``pixel_values [B, P, C*p*p] -> image_features [B, N, H]``.

    The bucket grid is baked in: the interpolated position embeddings and the rotary cos/sin
    are buffers computed here from the tower's current weights (build this module after any
    weight update). The input is one frame per patch (:func:`single_frame_patches`): a still
    image repeats its frame t times, so the patch embedding's t temporal slices are summed into
    one (exact) and the graph reads and multiplies 1/t of the processor's patch vector.
    """

    def __init__(self, rm: Any) -> None:
        super().__init__()
        visual = rm.model.model.visual
        proc = rm.processor
        cfg = visual.config
        t, gh, gw = proc.grid_thw
        if (cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size) != (
            proc.patch_size, proc.merge_size, proc.temporal_patch_size
        ):
            raise ValueError("the processor's patch/merge/temporal sizes differ from the vision config's")
        self.num_patches = t * gh * gw
        self.merge_unit = cfg.spatial_merge_size**2
        self.num_heads = cfg.num_heads
        self.channels, self.temporal_patch_size = cfg.in_channels, cfg.temporal_patch_size
        self.patch_dim = cfg.in_channels * cfg.patch_size**2  # one frame
        self.proj = visual.patch_embed.proj  # Conv3d, kernel == stride: applied as a matmul
        self.blocks = visual.blocks
        self.merger = visual.merger
        if self.merger.use_postshuffle_norm:
            raise ValueError("post-shuffle merger norm is not supported")
        grid = torch.tensor([[t, gh, gw]], dtype=torch.long, device=visual.pos_embed.weight.device)
        with torch.no_grad():
            from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

            idx, w = get_vision_interpolation_indices_and_weights(
                grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
                align_corners=visual.interpolation_align_corners, spatial_merge_size=cfg.spatial_merge_size,
            )
            pos = (visual.pos_embed(idx) * w[:, :, None]).sum(1)
            cos, sin = visual.rotary_pos_emb(pos, get_vision_position_ids(grid, visual.spatial_merge_size))
        self.register_buffer("pos_embeds", pos.detach().clone(), persistent=False)  # [P, E]
        self.register_buffer("rope_cos", cos.float().unsqueeze(1).contiguous(), persistent=False)  # [P, 1, hd]
        self.register_buffer("rope_sin", sin.float().unsqueeze(1).contiguous(), persistent=False)

    def _attention(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        bsz, p, e = x.shape
        qkv = attn.qkv(x).reshape(bsz, p, 3, self.num_heads, -1)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, P, h, hd]
        dtype = q.dtype
        q = (q.float() * self.rope_cos + _rotate_half(q.float()) * self.rope_sin).to(dtype)
        k = (k.float() * self.rope_cos + _rotate_half(k.float()) * self.rope_sin).to(dtype)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))  # [B, h, P, hd]
        scores = (q @ k.transpose(-1, -2)) * attn.scaling
        probs = torch.softmax(scores.float(), dim=-1).to(dtype)
        out = (probs @ v).transpose(1, 2).reshape(bsz, p, e)
        return attn.proj(out)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.sum(2).reshape(self.proj.weight.shape[0], -1)  # [E, C, t, p, p]: frames summed
        x = F.linear(pixel_values.to(weight.dtype), weight, self.proj.bias)  # [B, P, E]
        x = x + self.pos_embeds.to(x.dtype)
        for blk in self.blocks:
            x = x + self._attention(blk.attn, blk.norm1(x))
            x = x + blk.mlp(blk.norm2(x))
        m = self.merger
        x = m.norm(x)
        x = x.reshape(x.shape[0], self.num_patches // self.merge_unit, -1)
        return m.linear_fc2(m.act_fn(m.linear_fc1(x)))


# --------------------------------------------------------------------------- decoder
class _GatedDeltaNet(nn.Module):
    """Qwen3_5GatedDeltaNet in prefill without a cache, in one of the two GDN forms."""

    def __init__(self, hf: nn.Module, gdn: str) -> None:
        super().__init__()
        if hf.activation not in ("silu", "swish"):
            raise ValueError(f"GatedDeltaNet conv activation {hf.activation!r} is not supported (silu only)")
        self.hf = hf
        self.gdn = check_gdn_form(gdn)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``rows [B, D]``: return only those positions (the recurrence still reads every step)."""
        m = self.hf
        qkv, z, a, b = gdn_projections(m, x * mask)  # HF zeroes padded positions before the token mixer
        conv = torch.ops.zreward_fast.causal_conv1d_silu if self.gdn == "contrib" else causal_conv1d_silu
        q, k, v = gdn_split_heads(m, conv(qkv, m.conv1d.weight, m.conv1d.bias))
        if self.gdn == "contrib":
            q, k = l2norm(q.float()).to(q.dtype), l2norm(k.float()).to(k.dtype)
            out = torch.ops.zreward_fast.gated_delta_net(q, k, v, a, b, m.A_log, m.dt_bias)
        else:
            g, beta = gdn_gates(a, b, m.A_log, m.dt_bias)
            out = chunk_gated_delta_rule(q, k, v, g, beta)
        if rows is not None:
            out, z = take_rows(out, rows), take_rows(z, rows)
        out = m.norm(out, z)  # gated RMSNorm over each value head
        return m.out_proj(out.reshape(*out.shape[:2], -1))


class _Attention(nn.Module):
    """Qwen3_5Attention (gated output, q/k norm, partial rotary) with an explicit additive mask."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf
        self.num_heads = hf.config.num_attention_heads
        self.num_kv_heads = hf.config.num_key_value_heads

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor, rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``rows [B, D]``: queries (and the output) only at those positions; keys and values at all."""
        m = self.hf
        bsz, length = x.shape[:2]
        hd = m.head_dim
        xq, cos_q, sin_q = (x, cos, sin) if rows is None else (take_rows(t, rows) for t in (x, cos, sin))
        if rows is not None:
            bias = take_rows(bias.transpose(1, 2), rows).transpose(1, 2)  # [B, 1, D, L]
        q, gate = torch.chunk(m.q_proj(xq).reshape(*xq.shape[:2], self.num_heads, 2 * hd), 2, dim=-1)
        gate = gate.reshape(*xq.shape[:2], -1)
        q = m.q_norm(q).transpose(1, 2)  # [B, h, Lq, hd]
        k = m.k_norm(m.k_proj(x).reshape(bsz, length, self.num_kv_heads, hd)).transpose(1, 2)
        v = m.v_proj(x).reshape(bsz, length, self.num_kv_heads, hd).transpose(1, 2)
        rd = cos.shape[-1]
        q = torch.cat([q[..., :rd] * cos_q.unsqueeze(1) + _rotate_half(q[..., :rd]) * sin_q.unsqueeze(1), q[..., rd:]], dim=-1)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        k = torch.cat([k[..., :rd] * cos + _rotate_half(k[..., :rd]) * sin, k[..., rd:]], dim=-1)
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k = k.unsqueeze(2).expand(bsz, self.num_kv_heads, rep, length, hd).reshape(bsz, self.num_heads, length, hd)
            v = v.unsqueeze(2).expand(bsz, self.num_kv_heads, rep, length, hd).reshape(bsz, self.num_heads, length, hd)
        scores = (q @ k.transpose(-1, -2)) * m.scaling + bias
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(*gate.shape)
        return m.o_proj(out * torch.sigmoid(gate))


class _DecoderLayer(nn.Module):
    def __init__(self, hf: nn.Module, gdn: str) -> None:
        super().__init__()
        self.linear = hf.block_type == "linear_attention"
        self.mixer = _GatedDeltaNet(hf.linear_attn, gdn) if self.linear else _Attention(hf.self_attn)
        self.input_layernorm = hf.input_layernorm
        self.post_attention_layernorm = hf.post_attention_layernorm
        self.mlp = hf.mlp

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``rows [B, D]``: compute the layer's output only at those positions (``[B, D, H]``)."""
        h = self.input_layernorm(x)
        h = self.mixer(h, mask, rows) if self.linear else self.mixer(h, cos, sin, bias, rows)
        x = (x if rows is None else take_rows(x, rows)) + h
        return x + self.mlp(self.post_attention_layernorm(x))


class ExportDecoder(nn.Module):
    """Prefill decoder plus score head, the ``decoder.onnx`` interface of docs/bundle.md.

    ``forward(input_ids [B, L], attention_mask [B, L], position_ids [3, B, L],
    image_features [B, N, H], query_positions [B, D]) -> (log_probs [B, D, K], means [B, D])``.
    Batch, length and D are free; the K score rows of the LM head (and bias) are copied into
    buffers, so the full LM head is not part of the graph.
    """

    def __init__(self, rm: Any, gdn: str = "decomposed") -> None:
        super().__init__()
        self.gdn = check_gdn_form(gdn)
        lm = rm.model.model.language_model
        cfg = lm.config
        self.embed_tokens = lm.embed_tokens
        self.layers = nn.ModuleList([_DecoderLayer(layer, gdn) for layer in lm.layers[: cfg.num_hidden_layers]])
        self.norm = lm.norm
        self.image_token_id = int(rm.processor.image_token_id)
        self.temperature = float(rm.temperature)
        rotary = lm.rotary_emb
        self.attention_scaling = float(rotary.attention_scaling)
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)
        # Interleaved M-RoPE: frequency j reads the T, H or W position (HF recomposition_frequencies).
        n = rotary.inv_freq.shape[0]
        axis = torch.zeros(n, dtype=torch.long)
        for dim, offset in ((1, 1), (2, 2)):
            axis[slice(offset, rotary.mrope_section[dim] * 3, 3)] = dim
        self.register_buffer("mrope_select", F.one_hot(axis, 3).T.float().reshape(3, 1, 1, n), persistent=False)
        head = rm.lm_head
        ids = rm.score_token_ids.to(head.weight.device)
        self.register_buffer("score_weight", head.weight.detach()[ids].clone(), persistent=False)  # [K, H]
        bias = getattr(head, "bias", None)
        self.register_buffer("score_bias", None if bias is None else bias.detach()[ids].clone(), persistent=False)
        self.register_buffer("levels", rm.levels.detach().float().clone(), persistent=False)

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, L, rotary_dim] from M-RoPE ``position_ids [3, B, L]``."""
        pos = (position_ids.float().unsqueeze(-1) * self.mrope_select).sum(0)  # [B, L, n]: exact select
        freqs = pos * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)

    def merge_image_features(self, input_ids: torch.Tensor, embeds: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Replace row b's image-token embeddings, in order, by ``image_features[b]`` (a gather)."""
        is_image = input_ids == self.image_token_id
        idx = (torch.cumsum(is_image.long(), dim=1) - 1).clamp(0, image_features.shape[1] - 1)
        feats = torch.gather(image_features.to(embeds.dtype), 1, idx.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
        return torch.where(is_image.unsqueeze(-1), feats, embeds)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
        image_features: torch.Tensor, query_positions: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.merge_image_features(input_ids, self.embed_tokens(input_ids), image_features)
        cos, sin = self.rotary(position_ids, x.dtype)
        length = input_ids.shape[1]
        steps = torch.arange(length, device=input_ids.device)
        keep = attention_mask.bool()
        allowed = (steps.unsqueeze(0) <= steps.unsqueeze(1)).unsqueeze(0) & keep.unsqueeze(1)  # [B, L, L]
        bias = torch.where(allowed, 0.0, torch.finfo(x.dtype).min).to(x.dtype).unsqueeze(1)  # [B, 1, L, L]
        mask = keep.to(x.dtype).unsqueeze(-1)
        for layer in self.layers[:-1]:
            x = layer(x, cos, sin, bias, mask)
        # Only the query positions are scored: the last layer's queries, output projection and
        # MLP run on those D rows alone (its keys/values, or its recurrence, still see every step).
        rows = self.norm(self.layers[-1](x, cos, sin, bias, mask, rows=query_positions))  # [B, D, H]
        z = rows.float() @ self.score_weight.float().T
        if self.score_bias is not None:
            z = z + self.score_bias.float()
        log_probs = torch.log_softmax(z / self.temperature, dim=-1)
        means = (log_probs.exp() * self.levels).sum(-1)
        return log_probs, means
