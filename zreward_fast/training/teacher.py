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
    seqs, starts, lens, pix = [], [], [], []
    for r, row in enumerate(samples):
        n = int(inputs["attention_mask"][r].sum())
        prompt_ids = inputs["input_ids"][r, :n].tolist()
        suffix = p.tokenize([teacher_scoring_suffix("", dims[r])])[0]
        for reasoning in row:
            seqs.append(prompt_ids + list(reasoning) + suffix)
            starts.append(n)
            lens.append(len(reasoning))
            pix.append(pixels[r])
    return scoring_batch(rm, seqs, torch.stack(pix), starts, lens)


def scoring_batch(rm: ZRewardModel, seqs: list[list[int]], pixels: torch.Tensor, starts: list[int], lens: list[int]) -> TeacherBatch:
    p = rm.processor
    input_ids, mask = p.pad(seqs)
    inputs = {
        "input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": (input_ids == p.image_token_id).long(),
        "pixel_values": p.patchify(pixels), "image_grid_thw": torch.tensor([p.grid_thw] * len(seqs)),
    }
    return TeacherBatch(inputs, mask.sum(1) - 1, torch.tensor(starts), torch.tensor(lens))


def forward_hidden(model: Any, batch: TeacherBatch) -> torch.Tensor:
    """Last hidden states [B, L, H] of the base model (never full-vocabulary logits)."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return model.model(**inputs, use_cache=False).last_hidden_state


def reasoning_slices(hidden: torch.Tensor, batch: TeacherBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states that predict each reasoning token (position t-1 for token t), the tokens and
    their mask: [B, T, H], [B, T], [B, T] with T the longest reasoning (at least 1)."""
    B = hidden.shape[0]
    T = max(int(batch.reasoning_len.max()), 1)
    o_t = torch.arange(T)
    pos = batch.reasoning_start[:, None] + o_t[None, :]  # token positions
    mask = (o_t[None, :] < batch.reasoning_len[:, None]).long()
    pos = torch.where(mask.bool(), pos, batch.reasoning_start[:, None])  # padded slots point at a real token
    tokens = batch.inputs["input_ids"].gather(1, pos)
    src = (pos - 1).to(hidden.device)
    h = hidden.gather(1, src[..., None].expand(B, T, hidden.shape[-1]))
    return h, tokens.to(hidden.device), mask.to(hidden.device)
