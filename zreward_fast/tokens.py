"""Adding the score and dimension-query tokens to a tokenizer and a model.

Initialisation of the new rows (input embeddings and LM head alike): each new token's row is the
mean of the existing rows of the tokens its text spells, ``" 2.5"`` for ``<|score_2.5|>`` and
``" alignment"`` for ``<|dim_alignment|>``. A pretrained model then starts with score tokens that
sit where it already puts those numbers, so the score distribution is ordered before any training;
if the text yields no token, the row is the mean of all existing rows. No random noise: the same
model always gets the same rows.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .dimensions import DIMENSIONS, query_token, resolve_dimensions
from .scale import ScoreScale


def score_and_query_tokens(scale: ScoreScale, dimensions: Sequence[str]) -> dict[str, str]:
    """Each new special token with the plain text its row is initialised from."""
    texts = {tok: f" {level:g}" for tok, level in zip(scale.tokens, scale.levels)}
    texts.update({query_token(d): f" {d}" for d in dimensions})
    return texts


def add_score_tokens(
    tokenizer: Any,
    model: Any | None = None,
    scale: ScoreScale | None = None,
    dimensions: Sequence[str] | None = None,
) -> dict[str, int]:
    """Add ``<|score_x|>`` and ``<|dim_d|>`` special tokens; resize and initialise ``model``.

    Idempotent: tokens the tokenizer already has keep their ids and rows. Returns token -> id.
    """
    scale = scale or ScoreScale()
    dims = resolve_dimensions(dimensions, DIMENSIONS)
    texts = score_and_query_tokens(scale, dims)
    vocab = tokenizer.get_vocab()
    new = [t for t in texts if t not in vocab]
    # Ids of the source text, read with the tokenizer before the new tokens exist.
    source_ids = {t: tokenizer(texts[t], add_special_tokens=False)["input_ids"] for t in new}
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    vocab = tokenizer.get_vocab()
    ids = {t: vocab[t] for t in texts}
    if len(set(ids.values())) != len(ids):
        raise ValueError("score/dimension tokens do not map to distinct ids")
    if model is not None:
        _resize_and_init(model, len(tokenizer), {ids[t]: source_ids[t] for t in new})
    return ids


@torch.no_grad()
def _resize_and_init(model: Any, vocab_size: int, sources: dict[int, list[int]]) -> None:
    old_in = model.get_input_embeddings().weight
    old_rows = old_in.shape[0]
    if vocab_size > old_rows:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.data_ptr()
    mats = [emb] if (head is None or tied) else [emb, head.weight]
    for w in mats:
        fallback = w[: min(old_rows, w.shape[0])].float().mean(0)
        for new_id, src in sources.items():
            src = [i for i in src if i < old_rows and i not in sources]
            row = w[src].float().mean(0) if src else fallback
            w[new_id] = row.to(w.dtype)
    if head is not None and getattr(head, "bias", None) is not None:
        for new_id in sources:
            head.bias[new_id] = 0.0
    # Keep the configs' vocab size in step with the matrices.
    for cfg in (getattr(model, "config", None), getattr(getattr(model, "config", None), "text_config", None)):
        if cfg is not None and hasattr(cfg, "vocab_size"):
            cfg.vocab_size = emb.shape[0]
