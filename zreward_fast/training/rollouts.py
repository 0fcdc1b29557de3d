"""Rollout engines: where the teacher's reasoning comes from.

``RolloutEngine`` is the interface a faster engine (vLLM, SGLang) can implement; the default,
:class:`HFRolloutEngine`, samples with transformers' ``generate``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch


class RolloutEngine(Protocol):
    def generate(self, model: Any, inputs: dict[str, torch.Tensor], num_rollouts: int) -> list[list[list[int]]]:
        """Sample ``num_rollouts`` continuations for each row of ``inputs`` (right-padded prompts).

        Returns, per row, ``num_rollouts`` lists of generated token ids (no prompt, no padding,
        no end-of-turn token).
        """
        ...


@dataclass
class HFRolloutEngine:
    """Sampling with ``model.generate``; special tokens of the score format are suppressed.

    Prompts are generated ``batch_size`` at a time, left-padded (what ``generate`` needs for a
    batch; the Gated DeltaNet layers zero padded positions, so a padded prompt decodes exactly as
    it does alone: greedy outputs are identical, tested). One call per prompt was 3.5x slower on
    the reproduce teacher (README, issue 10)."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    do_sample: bool = True
    stop_token_ids: Sequence[int] = ()
    suppress_token_ids: Sequence[int] = ()
    pad_token_id: int | None = None
    batch_size: int = 16  # prompts per generate call (each with its num_rollouts samples)

    @torch.no_grad()
    def generate(self, model: Any, inputs: dict[str, torch.Tensor], num_rollouts: int) -> list[list[list[int]]]:
        rows = inputs["input_ids"].shape[0]
        per_image = inputs["pixel_values"].shape[0] // rows
        outs: list[list[list[int]]] = []
        was_training = model.training
        model.eval()
        try:
            for r0 in range(0, rows, self.batch_size):
                r1 = min(rows, r0 + self.batch_size)
                chunk = left_pad({k: inputs[k][r0:r1] for k in ("input_ids", "attention_mask", "mm_token_type_ids")
                                  if k in inputs}, self.pad_token_id if self.pad_token_id is not None else 0)
                chunk["pixel_values"] = inputs["pixel_values"][r0 * per_image : r1 * per_image]
                chunk["image_grid_thw"] = inputs["image_grid_thw"][r0:r1]
                gen = model.generate(
                    **chunk, do_sample=self.do_sample, temperature=self.temperature if self.do_sample else None,
                    top_p=self.top_p if self.do_sample else None, max_new_tokens=self.max_new_tokens,
                    num_return_sequences=num_rollouts, pad_token_id=self.pad_token_id,
                    eos_token_id=list(self.stop_token_ids) or None,
                    suppress_tokens=list(self.suppress_token_ids) or None,
                )
                width = chunk["input_ids"].shape[1]
                new = [self._clean(seq[width:].tolist()) for seq in gen]  # rows repeated row-major
                outs.extend(new[i * num_rollouts : (i + 1) * num_rollouts] for i in range(r1 - r0))
        finally:
            model.train(was_training)
        return outs

    def _clean(self, ids: list[int]) -> list[int]:
        stops = set(self.stop_token_ids) | ({self.pad_token_id} if self.pad_token_id is not None else set())
        for i, t in enumerate(ids):
            if t in stops:
                return ids[:i]
        return ids


def left_pad(inputs: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``[B, L]`` row tensors (``input_ids``, ``mm_token_type_ids``, ...) moved to the
    right edge by their ``attention_mask`` (left padding): ``input_ids`` pad with ``pad_id``, the
    others with 0."""
    mask = inputs["attention_mask"]
    n = mask.sum(1)
    width = int(n.max())
    # row r's token j (j < n_r) goes to column width - n_r + j
    o_col = torch.arange(width)[None, :] - (width - n)[:, None]
    valid = o_col >= 0
    src = o_col.clamp(min=0)
    out = {k: torch.where(valid, v[:, :width].gather(1, src), pad_id if k == "input_ids" else 0)
           for k, v in inputs.items() if k != "attention_mask"}
    out["attention_mask"] = valid.to(mask.dtype)
    return out
