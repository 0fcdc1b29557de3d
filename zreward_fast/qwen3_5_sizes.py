"""The published Qwen3.5 vision-language sizes, as data: text and vision widths, depths and token ids.

No Qwen3.5 weights or hub access are needed to test at real width: ``zreward_fast.testing.real_config``
builds a ``Qwen3_5Config`` from these numbers (optionally at reduced depth), and
``zreward_fast.testing.real_model`` a random model from it. Where each size's numbers were read is
kept beside them (``SOURCES``): no verbatim upstream ``config.json`` was readable from this project's
machines (no hub access), so each size was cross-checked across independent copies (training
framework model scripts, serving projects' tests, re-uploads), which agree on every field kept here.
"""
from __future__ import annotations

from typing import Any

# Shared by every dense size: Gated DeltaNet with 16 key heads of 128, attention heads of 256 with
# an output gate, partial rotary (a quarter of each head) with interleaved M-RoPE sections, one
# full-attention layer after every three Gated DeltaNet layers, the 248,320-token vocabulary.
_COMMON_TEXT: dict[str, Any] = dict(
    vocab_size=248_320, head_dim=256, linear_num_key_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_conv_kernel_dim=4, rms_norm_eps=1e-6, hidden_act="silu", max_position_embeddings=262_144,
    attention_bias=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                     "mrope_section": [11, 11, 10], "mrope_interleaved": True},
)
FULL_ATTENTION_INTERVAL = 4
_COMMON_VISION: dict[str, Any] = dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                                      num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh")
TOKEN_IDS = {"image_token_id": 248_056, "video_token_id": 248_057, "vision_start_token_id": 248_053,
             "vision_end_token_id": 248_054}

_TEXT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "linear_num_value_heads")
_VISION_FIELDS = ("depth", "hidden_size", "intermediate_size", "num_heads")
# name: text (hidden, MLP, layers, attention heads, KV heads, GDN value heads), vision (depth, hidden,
# MLP, heads; the merger projects to the text width), tied embeddings
_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...], bool]] = {
    "0.8B": ((1024, 3584, 24, 8, 2, 16), (12, 768, 3072, 12), True),
    "2B": ((2048, 6144, 24, 8, 2, 16), (24, 1024, 4096, 16), True),
    "4B": ((2560, 9216, 32, 16, 4, 32), (24, 1024, 4096, 16), True),
    "9B": ((4096, 12288, 32, 16, 4, 32), (27, 1152, 4304, 16), False),
    "27B": ((5120, 17408, 64, 24, 4, 48), (27, 1152, 4304, 16), False),
}
SIZES = tuple(_SIZES)

SOURCES: dict[str, list[str]] = {
    "0.8B": ["THUDM/slime scripts/models/qwen3.5-0.8B.sh @624b824a",
             "p-doom/omegalax omegalax/models/qwen3_5/config.py @6f3854e1",
             "test copies of Qwen/Qwen3.5-0.8B config.json (rev 2fc06364, text and vision, token ids)",
             "vllm-ascend benchmark dimensions 'from official config.json'"],
    "2B": ["config.json of the mlx-community/Qwen3.5-2B-mxfp4 re-upload (full, quoted in a test)",
           "p-doom/omegalax omegalax/models/qwen3_5/config.py @6f3854e1",
           "a reduced test copy of Qwen/Qwen3.5-2B config.json (rev 15852e8c)"],
    "4B": ["config.json of the unsloth/Qwen3.5-4B MLX re-upload (full, quoted in a test)",
           "THUDM/slime scripts/models/qwen3.5-4B.sh @624b824a",
           "p-doom/omegalax omegalax/models/qwen3_5/config.py @6f3854e1"],
    "9B": ["huggingface.co/Qwen/Qwen3.5-9B/resolve/main/config.json (first 50 lines, quoted)",
           "a Qwen3.5-9B finetune's full config.json (unsloth base)",
           "vllm-ascend GDN benchmark QWEN35_9B_CONFIG 'from official config.json'",
           "THUDM/slime scripts/models/qwen3.5-9B.sh @624b824a; transformers' Qwen3_5Config defaults (text)"],
    "27B": ["NVIDIA-NeMo/Megatron-Bridge src/megatron/bridge/models/qwen_vl/qwen35_vl_provider.py @067f987d",
            "THUDM/slime scripts/models/qwen3.5-27B.sh @624b824a",
            "p-doom/omegalax omegalax/models/qwen3_5/config.py @6f3854e1",
            "huggingface.co/Qwen/Qwen3.5-27B model card (commit 3b29628: hidden 5120)"],
}


def layer_types(layers: int) -> list[str]:
    """Three Gated DeltaNet layers, then one full-attention layer, repeated (cut at ``layers``)."""
    return ["full_attention" if (i + 1) % FULL_ATTENTION_INTERVAL == 0 else "linear_attention" for i in range(layers)]


def size_spec(name: str) -> dict[str, Any]:
    """``{"text": ..., "vision": ..., "tie_word_embeddings": ..., "sources": ...}`` of a published size."""
    if name not in _SIZES:
        raise ValueError(f"unknown Qwen3.5 size {name!r}; known: {', '.join(SIZES)}")
    text_widths, vision_widths, tied = _SIZES[name]
    text = dict(_COMMON_TEXT, **dict(zip(_TEXT_FIELDS, text_widths)), tie_word_embeddings=tied)
    vision = dict(_COMMON_VISION, **dict(zip(_VISION_FIELDS, vision_widths)), out_hidden_size=text["hidden_size"])
    text["rope_parameters"] = dict(text["rope_parameters"])
    text["layer_types"] = layer_types(text["num_hidden_layers"])
    return {"text": text, "vision": vision, "tie_word_embeddings": tied,
            "token_ids": dict(TOKEN_IDS), "sources": list(SOURCES[name])}


def parameter_count(name: str, layers: int | None = None, vision_depth: int | None = None,
                    vocab_size: int | None = None) -> int:
    """Parameters of ``Qwen3_5ForConditionalGeneration`` at this size (no MTP head; the model is
    built on the meta device, so nothing is allocated): what the README's memory figures use."""
    import torch
    from transformers import Qwen3_5ForConditionalGeneration

    from .testing import real_config

    config = real_config(name, layers=layers, vision_depth=vision_depth, vocab_size=vocab_size)
    with torch.device("meta"):
        model = Qwen3_5ForConditionalGeneration(config)
    seen = {id(p): p.numel() for p in model.parameters()}  # tied embeddings count once
    return sum(seen.values())
