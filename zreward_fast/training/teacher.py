"""The teacher's format: one dimension's prompt, sampled reasoning, then the query token.

Shared by the GDSO trainer (G rollouts per side) and the labelling job (RISD targets).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..dimensions import query_token
from ..modeling import ZRewardModel
from ..prompting import CHAT_SPECIAL_TOKENS, IM_END, teacher_scoring_suffix
from .rollouts import HFRolloutEngine, RolloutEngine


@dataclass
class TeacherBatch:
    """Right-padded sequences ``prompt + reasoning + suffix`` with their images."""

    inputs: dict[str, torch.Tensor]
    query_positions: torch.Tensor  # [B]: the last token, the dimension's query token
    reasoning_start: torch.Tensor  # [B]: first reasoning token
    reasoning_len: torch.Tensor  # [B]
    # [B] bool: the reasoning ended with the end-of-turn token (not cut at max_new_tokens). The
    # sequence continues with the scoring suffix instead, but the position after the reasoning
    # only sees its prefix, so log p(end of turn) is still read there: stopping is an action
    # the policy gradient (and the cold start) must train like any other token.
    stopped: torch.Tensor | None = None
    stop_token_id: int | None = None


def default_engine(rm: ZRewardModel, max_new_tokens: int = 64, temperature: float = 1.0, do_sample: bool = True) -> HFRolloutEngine:
    """Sampling that stops at the end of the turn and never emits image, score or query tokens."""
    p = rm.processor
    vocab = p.tokenizer.get_vocab()
    suppress = [vocab[t] for t in CHAT_SPECIAL_TOKENS if t != IM_END] + list(p.score_token_ids)
    suppress += [vocab[query_token(d)] for d in p.dimensions]
    return HFRolloutEngine(max_new_tokens=max_new_tokens, temperature=temperature, do_sample=do_sample,
                           stop_token_ids=[vocab[IM_END]], suppress_token_ids=suppress, pad_token_id=p.pad_token_id)


def prompt_inputs(rm: ZRewardModel, images: Sequence[Any], prompts: Sequence[str], dims: Sequence[str]) -> tuple[dict, torch.Tensor]:
    """Teacher prompts (one dimension per row), right-padded, with bucket pixels [B, 3, S, S]."""
    p = rm.processor
    pixels = p.to_pixels(list(images))
    ids = p.tokenize([p.teacher_text(pr, d) for pr, d in zip(prompts, dims)])
    input_ids, mask = p.pad(ids)
    inputs = {
        "input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": (input_ids == p.image_token_id).long(),
        "pixel_values": p.patchify(pixels), "image_grid_thw": torch.tensor([p.grid_thw] * len(ids)),
    }
    return inputs, pixels


def rollouts(
    rm: ZRewardModel, images: Sequence[Any], prompts: Sequence[str], dims: Sequence[str], num_rollouts: int,
    engine: RolloutEngine | None = None,
) -> TeacherBatch:
    """Sample ``num_rollouts`` reasonings per (image, prompt, dimension) row and build the scoring
    sequences; rows come out ordered row-major: row r's rollouts are r*G .. r*G+G-1."""
    p = rm.processor
    engine = engine or default_engine(rm)
    inputs, pixels = prompt_inputs(rm, images, prompts, dims)
    inputs_dev = {k: v.to(rm.device) for k, v in inputs.items()}
    inputs_dev["pixel_values"] = inputs_dev["pixel_values"].to(rm.model.dtype)
    samples = engine.generate(rm.model, inputs_dev, num_rollouts)
    max_new = getattr(engine, "max_new_tokens", None)
    seqs, starts, lens, pix, stopped = [], [], [], [], []
    for r, row in enumerate(samples):
        n = int(inputs["attention_mask"][r].sum())
        prompt_ids = inputs["input_ids"][r, :n].tolist()
        suffix = p.tokenize([teacher_scoring_suffix("", dims[r])])[0]
        for reasoning in row:
            seqs.append(prompt_ids + list(reasoning) + suffix)
            starts.append(n)
            lens.append(len(reasoning))
            pix.append(pixels[r])
            stopped.append(max_new is not None and len(reasoning) < max_new)
    return scoring_batch(rm, seqs, torch.stack(pix), starts, lens, stopped)


def forced_batch(rm: ZRewardModel, images: Sequence[Any], prompts: Sequence[str], dims: Sequence[str],
                 reasonings: Sequence[str]) -> TeacherBatch:
    """Scoring sequences with the given reasoning texts in place of sampled ones (teacher forcing:
    the cold start's training input); every reasoning ends with the end of turn."""
    p = rm.processor
    inputs, pixels = prompt_inputs(rm, images, prompts, dims)
    seqs, starts, lens = [], [], []
    for i, (text, d) in enumerate(zip(reasonings, dims)):
        prompt_ids = inputs["input_ids"][i, : int(inputs["attention_mask"][i].sum())].tolist()
        reasoning = p.tokenize([text])[0]
        seqs.append(prompt_ids + reasoning + p.tokenize([teacher_scoring_suffix("", d)])[0])
        starts.append(len(prompt_ids))
        lens.append(len(reasoning))
    return scoring_batch(rm, seqs, pixels, starts, lens, stopped=[True] * len(seqs))


def scoring_batch(rm: ZRewardModel, seqs: list[list[int]], pixels: torch.Tensor, starts: list[int], lens: list[int],
                  stopped: list[bool] | None = None) -> TeacherBatch:
    """``stopped[i]``: row i's reasoning ended with the end-of-turn token (see :class:`TeacherBatch`)."""
    p = rm.processor
    input_ids, mask = p.pad(seqs)
    inputs = {
        "input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": (input_ids == p.image_token_id).long(),
        "pixel_values": p.patchify(pixels), "image_grid_thw": torch.tensor([p.grid_thw] * len(seqs)),
    }
    stop = torch.tensor(stopped if stopped is not None else [False] * len(seqs), dtype=torch.bool)
    return TeacherBatch(inputs, mask.sum(1) - 1, torch.tensor(starts), torch.tensor(lens), stop,
                        p.tokenizer.convert_tokens_to_ids(IM_END))


def forward_hidden(model: Any, batch: TeacherBatch) -> torch.Tensor:
    """Last hidden states [B, L, H] of the base model (never full-vocabulary logits)."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return model.model(**inputs, use_cache=False).last_hidden_state


def reasoning_slices(hidden: torch.Tensor, batch: TeacherBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states that predict each reasoning token (position t-1 for token t), the tokens and
    their mask: [B, T, H], [B, T], [B, T] with T the longest reasoning (at least 1). A reasoning
    that stopped gets one more token, the end of turn, predicted from its last position."""
    B = hidden.shape[0]
    stop = batch.stopped if batch.stopped is not None else torch.zeros(B, dtype=torch.bool)
    n = batch.reasoning_len + stop.long()  # actions per row
    T = max(int(n.max()), 1)
    o_t = torch.arange(T)
    pos = batch.reasoning_start[:, None] + o_t[None, :]  # token positions
    mask = (o_t[None, :] < n[:, None]).long()
    in_text = o_t[None, :] < batch.reasoning_len[:, None]
    tokens = batch.inputs["input_ids"].gather(1, torch.where(in_text, pos, batch.reasoning_start[:, None]))
    is_stop = stop[:, None] & (o_t[None, :] == batch.reasoning_len[:, None])
    if batch.stop_token_id is not None:
        tokens = torch.where(is_stop, batch.stop_token_id, tokens)
    src = torch.where(mask.bool(), pos, batch.reasoning_start[:, None]) - 1  # padded slots read a real position
    h = hidden.gather(1, src.to(hidden.device)[..., None].expand(B, T, hidden.shape[-1]))
    return h, tokens.to(hidden.device), mask.to(hidden.device)
