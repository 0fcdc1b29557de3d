"""The Qwen3.5 student outside transformers, in prefill: the vision tower for one fixed bucket, the
hybrid decoder (full attention and Gated DeltaNet layers) and the score head on the K score rows.

The Hugging Face modules are written for training and generation: packed vision sequences split by
``cu_seqlens``, masked scatters with data-dependent sizes, grids read with ``.tolist()``, caches,
and a Gated DeltaNet whose chunk loop is a Python loop over a data-dependent count. None of that
traces to a graph with a dynamic batch and length, nor captures in a CUDA graph. These modules hold
references to the HF Linear / Norm / MLP submodules (the weights are shared, not copied) and
re-implement only the parts that do not trace:

* vision: the patch embedding as a matmul (Conv3d with kernel == stride is one), the position
  embeddings and the rotary cos/sin of the one bucket grid as buffers, and each image as its own
  batch row of plain attention over its P patches (no ``cu_seqlens``);
* decoder: the image-feature merge by gather, the M-RoPE cos/sin from ``position_ids``, the
  causal + padding mask from ``attention_mask``, the Gated DeltaNet layers (:mod:`.gated_deltanet`),
  and the score head on the K score rows of the LM head at ``query_positions``.

Back ends: attention ``"matmul"`` (explicit softmax with an additive mask: what the ONNX graphs
hold) or ``"sdpa"`` (``scaled_dot_product_attention``, causal, no padding mask: the GPU engine pads
on the right only, so causality alone keeps real tokens from seeing padding); Gated DeltaNet
``"decomposed"``, ``"contrib"`` or ``"fla"`` (:data:`.gated_deltanet.GDN_BACKENDS`).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .gated_deltanet import (
    GDN_BACKENDS,
    FlaKernels,
    causal_conv1d_silu,
    chunk_gated_delta_rule,
    gdn_gates,
    gdn_projections,
    gdn_split_heads,
    l2norm,
)

ATTENTION_BACKENDS = ("matmul", "sdpa")
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)  # enable_gqa=


def _check(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {tuple(allowed)}, got {value!r}")
    return value


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x [B, L, ...]`` at ``rows [B, D]`` -> ``[B, D, ...]`` (a gather along the sequence)."""
    idx = rows.reshape(*rows.shape, *([1] * (x.dim() - 2))).expand(*rows.shape, *x.shape[2:])
    return torch.gather(x, 1, idx)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def single_frame_patches(pixel_values: torch.Tensor, channels: int, temporal_patch_size: int) -> torch.Tensor:
    """Processor patches ``[..., C * t * p * p]`` -> the first frame's ``[..., C * p * p]``.

    A still image fills all t frames of a patch with the same pixels, so one frame carries all of it.
    """
    lead, dim = pixel_values.shape[:-1], pixel_values.shape[-1]
    frames = pixel_values.reshape(*lead, channels, temporal_patch_size, dim // (channels * temporal_patch_size))
    return frames[..., 0, :].reshape(*lead, -1)


def rotate_partial(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the first ``cos.shape[-1]`` channels of ``x [B, h, L, hd]`` (Qwen3.5's
    partial rotary); ``cos``, ``sin [B, L, rd]``."""
    rd = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat([x[..., :rd] * cos + rotate_half(x[..., :rd]) * sin, x[..., rd:]], dim=-1)


# --------------------------------------------------------------------------- vision
class Vision(nn.Module):
    """The vision tower for one fixed bucket: ``pixel_values [B, P, C*p*p] -> image_features [B, N, H]``.

    The bucket grid is baked in: the interpolated position embeddings and the rotary cos/sin
    are buffers computed here from the tower's current weights (build this module after any
    weight update). The input is one frame per patch (:func:`single_frame_patches`): a still
    image repeats its frame t times, so the patch embedding's t temporal slices are summed into
    one (exact) and the graph reads and multiplies 1/t of the processor's patch vector.
    """

    def __init__(self, rm: Any, attention: str = "matmul") -> None:
        super().__init__()
        self.attention = _check(attention, ATTENTION_BACKENDS, "attention")
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
        q = (q.float() * self.rope_cos + rotate_half(q.float()) * self.rope_sin).to(dtype)
        k = (k.float() * self.rope_cos + rotate_half(k.float()) * self.rope_sin).to(dtype)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))  # [B, h, P, hd]
        if self.attention == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling)
        else:
            scores = (q @ k.transpose(-1, -2)) * attn.scaling
            out = torch.softmax(scores.float(), dim=-1).to(dtype) @ v
        return attn.proj(out.transpose(1, 2).reshape(bsz, p, e))

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
class GatedDeltaNet(nn.Module):
    """Qwen3_5GatedDeltaNet in prefill without a cache, in one of :data:`GDN_BACKENDS`."""

    def __init__(self, hf: nn.Module, gdn: str, fla: FlaKernels | None = None) -> None:
        super().__init__()
        if hf.activation not in ("silu", "swish"):
            raise ValueError(f"GatedDeltaNet conv activation {hf.activation!r} is not supported (silu only)")
        if (gdn == "fla") != (fla is not None):
            raise ValueError("gdn='fla' needs flash-linear-attention's kernels (load_fla), and only it takes them")
        self.hf = hf
        self.gdn = _check(gdn, GDN_BACKENDS, "gdn")
        self.fla = fla

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``mask [B, L, 1]``: padded positions are zeroed first, as HF does (None: no padding, or
        right padding only, which the forward recurrence never reads back). ``rows [B, D]``: return
        only those positions (the recurrence still reads every step)."""
        m = self.hf
        qkv, z, a, b = gdn_projections(m, x if mask is None else x * mask)
        if self.fla is not None:
            out = self.fla.conv(qkv, m.conv1d.weight.squeeze(1), m.conv1d.bias, activation="silu")
            qkv = out[0] if isinstance(out, tuple) else out  # (y, final_state) in fla >= 0.2
        else:
            conv = torch.ops.zreward_fast.causal_conv1d_silu if self.gdn == "contrib" else causal_conv1d_silu
            qkv = conv(qkv, m.conv1d.weight, m.conv1d.bias)
        q, k, v = gdn_split_heads(m, qkv)
        if self.fla is not None:
            g, beta = gdn_gates(a, b, m.A_log, m.dt_bias)
            # Fewer q/k heads than v heads is passed as is (fla's grouped value attention), as
            # transformers does; use_qk_l2norm_in_kernel is HF's l2 norm (eps 1e-6).
            out, _ = self.fla.gdn(q.contiguous(), k.contiguous(), v.contiguous(), g=g, beta=beta,
                                  use_qk_l2norm_in_kernel=True)
        elif self.gdn == "contrib":
            q, k = l2norm(q.float()).to(q.dtype), l2norm(k.float()).to(k.dtype)
            out = torch.ops.zreward_fast.gated_delta_net(q, k, v, a, b, m.A_log, m.dt_bias)
        else:
            g, beta = gdn_gates(a, b, m.A_log, m.dt_bias)
            out = chunk_gated_delta_rule(q, k, v, g, beta)
        if rows is not None:
            out, z = take_rows(out, rows), take_rows(z, rows)
        out = m.norm(out, z)  # gated RMSNorm over each value head
        return m.out_proj(out.reshape(*out.shape[:2], -1))


class Attention(nn.Module):
    """Qwen3_5Attention (gated output, q/k norm, partial rotary): ``"matmul"`` with an explicit
    additive mask, or ``"sdpa"``, causal and unmasked (right padding only)."""

    def __init__(self, hf: nn.Module, attention: str = "matmul") -> None:
        super().__init__()
        self.hf = hf
        self.attention = _check(attention, ATTENTION_BACKENDS, "attention")
        self.num_heads = hf.config.num_attention_heads
        self.num_kv_heads = hf.config.num_key_value_heads

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``bias [B, 1, L, L]``: the additive mask (matmul only). ``rows [B, D]``: queries (and the
        output) only at those positions; keys and values at all (matmul only)."""
        m = self.hf
        bsz, length = x.shape[:2]
        hd = m.head_dim
        xq, cos_q, sin_q = (x, cos, sin) if rows is None else (take_rows(t, rows) for t in (x, cos, sin))
        q, gate = torch.chunk(m.q_proj(xq).reshape(*xq.shape[:2], self.num_heads, 2 * hd), 2, dim=-1)
        gate = gate.reshape(*xq.shape[:2], -1)
        q = rotate_partial(m.q_norm(q).transpose(1, 2), cos_q, sin_q)  # [B, h, Lq, hd]
        k = m.k_norm(m.k_proj(x).reshape(bsz, length, self.num_kv_heads, hd)).transpose(1, 2)
        k = rotate_partial(k, cos, sin)
        v = m.v_proj(x).reshape(bsz, length, self.num_kv_heads, hd).transpose(1, 2)
        rep = self.num_heads // self.num_kv_heads
        if self.attention == "sdpa":
            if bias is not None or rows is not None:
                raise ValueError("sdpa attention is causal and unmasked: no bias or rows")
            if rep > 1 and not _SDPA_GQA:  # torch < 2.5: expand the KV heads (head j serves j*rep ...)
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            gqa = {"enable_gqa": True} if rep > 1 and _SDPA_GQA else {}
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=m.scaling, **gqa)
        else:
            if rows is not None:
                bias = take_rows(bias.transpose(1, 2), rows).transpose(1, 2)  # [B, 1, D, L]
            if rep > 1:
                k = k.unsqueeze(2).expand(bsz, self.num_kv_heads, rep, length, hd).reshape(bsz, self.num_heads, length, hd)
                v = v.unsqueeze(2).expand(bsz, self.num_kv_heads, rep, length, hd).reshape(bsz, self.num_heads, length, hd)
            scores = (q @ k.transpose(-1, -2)) * m.scaling + bias
            out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
        out = out.transpose(1, 2).reshape(*gate.shape)
        return m.o_proj(out * torch.sigmoid(gate))


class DecoderLayer(nn.Module):
    def __init__(self, hf: nn.Module, gdn: str, attention: str = "matmul", fla: FlaKernels | None = None) -> None:
        super().__init__()
        self.linear = hf.block_type == "linear_attention"
        self.mixer = GatedDeltaNet(hf.linear_attn, gdn, fla) if self.linear else Attention(hf.self_attn, attention)
        self.input_layernorm = hf.input_layernorm
        self.post_attention_layernorm = hf.post_attention_layernorm
        self.mlp = hf.mlp

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor | None = None,
        mask: torch.Tensor | None = None, rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``rows [B, D]``: compute the layer's output only at those positions (``[B, D, H]``)."""
        h = self.input_layernorm(x)
        h = self.mixer(h, mask, rows) if self.linear else self.mixer(h, cos, sin, bias, rows)
        x = (x if rows is None else take_rows(x, rows)) + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Prefill decoder plus score head, the ``decoder.onnx`` interface of docs/bundle.md.

    ``forward(input_ids [B, L], attention_mask [B, L], position_ids [3, B, L],
    image_features [B, N, H], query_positions [B, D]) -> (log_probs [B, D, K], means [B, D])``.
    Batch, length and D are free; the K score rows of the LM head (and bias) are copied into
    buffers, so the full LM head is not part of the graph. ``forward`` needs the ``"matmul"``
    attention (it masks padding); the engine runs the layers itself with ``"sdpa"``.
    """

    def __init__(self, rm: Any, gdn: str = "decomposed", attention: str = "matmul", fla: FlaKernels | None = None) -> None:
        super().__init__()
        self.gdn = _check(gdn, GDN_BACKENDS, "gdn")
        self.attention = _check(attention, ATTENTION_BACKENDS, "attention")
        lm = rm.model.model.language_model
        cfg = lm.config
        self.embed_tokens = lm.embed_tokens
        self.layers = nn.ModuleList([DecoderLayer(layer, gdn, attention, fla) for layer in lm.layers[: cfg.num_hidden_layers]])
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
        if self.attention != "matmul":
            raise ValueError("Decoder.forward masks padding: build it with attention='matmul'")
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
