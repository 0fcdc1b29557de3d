"""Tiny offline models for tests, benchmarks and the demo: nothing is downloaded.

``tiny_model(seed)`` builds a random Qwen3.5 vision-language model (hybrid Gated DeltaNet and
full attention, vision patch 16, merge 2) and a matching :class:`ZRewardProcessor` whose
tokenizer is a real ``Qwen3_5Tokenizer``: byte-level BPE trained here on a small built-in corpus,
with the chat special tokens, a chat template, and the score and dimension tokens.
"""
from __future__ import annotations

import json
from typing import Any

import torch

from .dimensions import DIMENSION_DESCRIPTIONS, DIMENSIONS
from .prompting import CHAT_SPECIAL_TOKENS, DEFAULT_SYSTEM, END_OF_TEXT, TEACHER_TEMPLATE
from .scale import ScoreScale

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS_WORDS = (
    "a photo of the image prompt score rate reason think then give system user assistant red green blue "
    "yellow purple orange white black one two three four five circle square triangle star cat dog car tree "
    "house sky sun moon shadow floating object noise blur artefact composition contrast colour color bright "
    "dark left right above below on under with and in is are not sharp clean real realistic beautiful ugly "
    "physical plausibility aesthetics alignment realism reward model rated generated against its it through "
    "0 1 2 3 4 5 6 7 8 9 0.0 0.5 1.0 1.5 2.0 2.5 3.0 3.5 4.0 4.5 5.0 . , : ; ! ? ' \" - ( )"
)


def tiny_tokenizer(vocab_size: int = 512) -> Any:
    """A small byte-level BPE ``Qwen3_5Tokenizer`` with the Qwen chat special tokens."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX, Qwen3_5Tokenizer
    from tokenizers import Regex

    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    corpus = [_CORPUS_WORDS, DEFAULT_SYSTEM, TEACHER_TEMPLATE, *DIMENSION_DESCRIPTIONS.values()]
    corpus += [" ".join(_CORPUS_WORDS.split()[i::7]) for i in range(7)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen3_5Tokenizer(vocab=model["vocab"], merges=merges)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [t for t in CHAT_SPECIAL_TOKENS if t != END_OF_TEXT]},
        replace_extra_special_tokens=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(vocab_size: int, special_ids: dict[str, int], **overrides: Any) -> Any:
    from transformers import Qwen3_5Config

    text = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,  # three Gated DeltaNet layers, then one full-attention layer
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1], "mrope_interleaved": True,
        },
        pad_token_id=special_ids["<|endoftext|>"],
        eos_token_id=special_ids["<|im_end|>"],
        tie_word_embeddings=False,
    )
    text.update(overrides.pop("text", {}))
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=text["hidden_size"], num_position_embeddings=64,
    )
    vision.update(overrides.pop("vision", {}))
    return Qwen3_5Config(
        text_config=text,
        vision_config=vision,
        image_token_id=special_ids["<|image_pad|>"],
        video_token_id=special_ids["<|video_pad|>"],
        vision_start_token_id=special_ids["<|vision_start|>"],
        vision_end_token_id=special_ids["<|vision_end|>"],
        tie_word_embeddings=False,
        **overrides,
    )


def spread_score_rows(model: Any, hidden: int) -> None:
    """Random LM-head rows of std 4 / sqrt(hidden), in place."""
    # Larger-than-default random output rows so an untrained model gives spread-out scores; the std
    # scales with 1/sqrt(hidden) so score logits have std ~4 at any width (sharper would make an
    # untrained model's distributions one-hot, and any perturbation flip them). With tied
    # embeddings (the small Qwen3.5 sizes) this is the input embedding too.
    model.lm_head.weight.data.normal_(0.0, 4.0 / hidden**0.5)


def tiny_model(
    seed: int = 0,
    image_size: int = 64,
    scale: ScoreScale | None = None,
    dtype: torch.dtype = torch.float32,
    **config_overrides: Any,
) -> tuple[Any, Any]:
    """A tiny random Qwen3.5 VLM with score tokens and its processor; deterministic in ``seed``.

    The image bucket defaults to 64x64 (4 image tokens) to keep CPU tests fast; any multiple of
    32 works. ``config_overrides`` may hold ``text={...}`` and ``vision={...}`` dicts.
    """
    from transformers import Qwen3_5ForConditionalGeneration

    from .processing import ZRewardProcessor
    from .tokens import add_score_tokens

    scale = scale or ScoreScale()
    tokenizer = tiny_tokenizer()
    vocab = tokenizer.get_vocab()
    config = tiny_config(len(tokenizer), {t: vocab[t] for t in CHAT_SPECIAL_TOKENS}, **config_overrides)
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = Qwen3_5ForConditionalGeneration(config)
        spread_score_rows(model, config.text_config.hidden_size)
    add_score_tokens(tokenizer, model, scale=scale, dimensions=DIMENSIONS)
    model = model.to(dtype).eval()
    processor = ZRewardProcessor(tokenizer, image_size=image_size, scale=scale, dimensions=DIMENSIONS)
    return model, processor


def small_model(seed: int = 0, image_size: int = 224, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """A small random student for CPU benchmarks: hidden 512, 8 layers (6 Gated DeltaNet + 2
    attention), vision depth 4 (hidden 256), a 224x224 bucket (49 image tokens)."""
    text = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=2, head_dim=64, linear_key_head_dim=64, linear_value_head_dim=64,
                linear_num_key_heads=4, linear_num_value_heads=8,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                 "mrope_section": [4, 2, 2], "mrope_interleaved": True})
    vision = dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, out_hidden_size=512,
                  num_position_embeddings=256)
    return tiny_model(seed, image_size=image_size, dtype=dtype, text=text, vision=vision)


def real_config(name: str, layers: int | None = None, vision_depth: int | None = None,
                vocab_size: int | None = None, special_ids: dict[str, int] | None = None) -> Any:
    """The ``Qwen3_5Config`` of a published Qwen3.5 size ("0.8B", "2B", "4B", "9B", "27B"; see
    :mod:`zreward_fast.qwen3_5_sizes` for the numbers and where they were read), at its real widths.

    ``layers`` cuts the text depth (the layer pattern is kept: ``layers=4`` is three Gated DeltaNet
    layers and one attention layer) and ``vision_depth`` the vision tower's, so real widths fit a
    CPU. ``vocab_size`` (default the real 248,320) and ``special_ids`` (default the real token ids)
    let a small tokenizer drive the model.
    """
    from transformers import Qwen3_5Config

    from .qwen3_5_sizes import layer_types, size_spec

    spec = size_spec(name)
    text, vision = spec["text"], spec["vision"]
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        text.update(num_hidden_layers=layers, layer_types=layer_types(layers))
    if vision_depth is not None:
        if vision_depth < 1:
            raise ValueError(f"vision_depth must be >= 1, got {vision_depth}")
        vision["depth"] = vision_depth
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    ids = spec["token_ids"]
    if special_ids is not None:
        ids = {"image_token_id": special_ids["<|image_pad|>"], "video_token_id": special_ids["<|video_pad|>"],
               "vision_start_token_id": special_ids["<|vision_start|>"],
               "vision_end_token_id": special_ids["<|vision_end|>"]}
        text.update(pad_token_id=special_ids["<|endoftext|>"], eos_token_id=special_ids["<|im_end|>"])
    return Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=spec["tie_word_embeddings"], **ids)


def real_model(name: str, layers: int = 4, vision_depth: int = 2, image_size: int = 448, seed: int = 0,
               vocab_size: int | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """A random model at a published Qwen3.5 size's real widths (reduced depth) and its processor.

    The tokenizer is the tiny one (:func:`tiny_tokenizer`): its ids sit at the bottom of the real
    248,320-row embedding (``vocab_size`` shrinks it where memory matters), so every width, head
    count, rotary section and the tied or untied embedding are the real ones.
    """
    from transformers import Qwen3_5ForConditionalGeneration

    from .processing import ZRewardProcessor
    from .tokens import add_score_tokens

    scale = ScoreScale()
    tokenizer = tiny_tokenizer()
    vocab = tokenizer.get_vocab()
    config = real_config(name, layers, vision_depth, vocab_size, {t: vocab[t] for t in CHAT_SPECIAL_TOKENS})
    if config.text_config.vocab_size < len(tokenizer) + len(DIMENSIONS) + len(scale.levels):
        raise ValueError(f"vocab_size {config.text_config.vocab_size} is smaller than the tokenizer needs")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen3_5ForConditionalGeneration(config)
        spread_score_rows(model, config.text_config.hidden_size)
    add_score_tokens(tokenizer, model, scale=scale, dimensions=DIMENSIONS)
    model = model.to(dtype).eval()
    return model, ZRewardProcessor(tokenizer, image_size=image_size, scale=scale, dimensions=DIMENSIONS)


#: the decoder-layer norms whose gains :func:`add_outlier_channels` raises: their outputs are the
#: inputs of every large projection (q/k/v/gate, in_proj_qkv/z, the MLP's gate/up)
OUTLIER_NORMS = ("input_layernorm", "post_attention_layernorm")


@torch.no_grad()
def add_outlier_channels(model: Any, count: int = 4, gain: float = 30.0, seed: int = 0) -> list[int]:
    """Give a random model the outlier features of real LLM checkpoints, in place; returns the channels.

    Trained Qwen-family models carry a few hidden channels whose activations are tens of times larger
    than the rest (LLM.int8(), Dettmers et al. 2022; "massive activations", Sun et al. 2024), and they
    enter the projections through the decoder norms. Here the effective gain of ``count`` hidden
    channels (the same ones in every layer, drawn with ``seed``) of every decoder layer's
    :data:`OUTLIER_NORMS` is multiplied by ``gain``, so those channels of the projections' inputs are
    ``gain`` times larger; weights and everything else are unchanged. Works for Qwen3.5's zero-centred
    ``(1 + w)`` norms and for plain ``w`` norms alike.
    """
    if count < 1 or not gain > 1.0:
        raise ValueError(f"count must be >= 1 and gain > 1, got {count} and {gain}")
    layers = model.model.language_model.layers
    hidden = model.config.text_config.hidden_size
    channels = torch.randperm(hidden, generator=torch.Generator().manual_seed(seed))[:count].sort().values.tolist()
    for layer in layers:
        for name in OUTLIER_NORMS:
            norm = getattr(layer, name)
            # the gain each channel applies now: the norm of an all-ones row is exactly it
            current = norm(torch.ones(1, hidden, dtype=norm.weight.dtype))[0]
            norm.weight[channels] += current[channels] * (gain - 1.0)
    return channels


def train_briefly(rm: Any, steps: int, batch: int = 4, lr: float = 1e-4, seed: int = 90_000) -> dict[str, Any]:
    """Train a :class:`~zreward_fast.ZRewardModel` in place for ``steps`` RISD steps on soft targets
    at the known scores of fresh synthetic images (``RISDTrainer``: decoder and score rows; vision
    and embeddings frozen), then put it in eval mode. A stand-in for a trained checkpoint where
    random weights mislead: a random network's scores are fragile and its held-out pairs near ties
    (README, "Quantization at real width"). Returns the first and last losses and the held-out PLCC
    of the means against the known scores (16 images)."""
    import tempfile

    import numpy as np

    from .training.data import RISDRecord, soft_targets
    from .training.risd import RISDConfig, RISDTrainer
    from .training.synthetic import make_sample

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    size = rm.processor.image_size
    drawn = [make_sample(seed + i, size) for i in range(steps * batch)]
    records = [RISDRecord(s.image, s.prompt, {d: soft_targets(v, rm.scale) for d, v in s.scores.items()})
               for s in drawn]
    with tempfile.TemporaryDirectory(prefix="zreward-train-") as out:
        trainer = RISDTrainer(rm.train(), RISDConfig(learning_rate=lr, max_steps=steps, batch_size=batch,
                                                     warmup_ratio=0.1, output_dir=out), train_records=records)
        losses = [h["loss"] for h in trainer.train().history if "loss" in h]
        trainer._unwrapped().write_back()
    del trainer  # its optimizer state goes before the held-out scoring (GBs at 9B width)
    rm.eval()
    held = [make_sample(seed - 1 - i, size) for i in range(16)]
    with torch.no_grad():
        res = rm.score([s.image for s in held], [s.prompt for s in held], batch_size=batch)
    mu = np.array([r[d].mean for r in res for d in rm.dimensions])
    known = np.array([s.scores[d] for s in held for d in rm.dimensions])
    return {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "held_out_plcc": float(np.corrcoef(mu, known)[0, 1])}


def demo_model(seed: int = 0, image_size: int = 128) -> tuple[Any, Any]:
    """The demo's student: tiny (hidden 128, 4 layers, vision depth 2) on a 128x128 bucket
    (16 image tokens), big enough to learn the synthetic dimensions in a few CPU minutes."""
    text = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, head_dim=32)
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128)
    return tiny_model(seed, image_size=image_size, text=text, vision=vision)
