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
    """Sampling with ``model.generate``; special tokens of the score format are suppressed."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    do_sample: bool = True
    stop_token_ids: Sequence[int] = ()
    suppress_token_ids: Sequence[int] = ()
    pad_token_id: int | None = None

    @torch.no_grad()
    def generate(self, model: Any, inputs: dict[str, torch.Tensor], num_rollouts: int) -> list[list[list[int]]]:
        rows = inputs["input_ids"].shape[0]
        outs: list[list[list[int]]] = []
        was_training = model.training
        model.eval()
        try:
            # generate() wants left padding for a batch; rows are generated one prompt at a time
            # (each with its G samples), which needs none.
            for r in range(rows):
                n = int(inputs["attention_mask"][r].sum())
                row = {k: v[r : r + 1, :n] for k, v in inputs.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
                per_image = inputs["pixel_values"].shape[0] // rows
                row["pixel_values"] = inputs["pixel_values"][r * per_image : (r + 1) * per_image]
                row["image_grid_thw"] = inputs["image_grid_thw"][r : r + 1]
                gen = model.generate(
                    **row, do_sample=self.do_sample, temperature=self.temperature if self.do_sample else None,
                    top_p=self.top_p if self.do_sample else None, max_new_tokens=self.max_new_tokens,
                    num_return_sequences=num_rollouts, pad_token_id=self.pad_token_id,
                    eos_token_id=list(self.stop_token_ids) or None,
                    suppress_tokens=list(self.suppress_token_ids) or None,
                )
                outs.append([self._clean(seq[n:].tolist()) for seq in gen])
        finally:
            model.train(was_training)
        return outs

    def _clean(self, ids: list[int]) -> list[int]:
        stops = set(self.stop_token_ids) | ({self.pad_token_id} if self.pad_token_id is not None else set())
        for i, t in enumerate(ids):
            if t in stops:
                return ids[:i]
        return ids
