"""Teacher cold start: supervised fine-tuning in the reason-then-score format before GDSO.

Each record is an image, its prompt, one dimension, a reasoning text and the annotated score. The
loss is the next-token cross-entropy of the reasoning (and of the end-of-turn token after it, so
sampled reasonings stop) plus the KL from a distribution peaked at the score (``soft_targets``) to
the teacher's distribution at the query token after the reasoning (``risd_loss``, K rows only).
GDSO then starts from a teacher that already writes reasonings and reads scores from them.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..kernels import risd_loss
from ..modeling import ZRewardModel
from .common import TrainConfig, TrainerBase
from .data import soft_targets
from .gdso import GDSOPolicy
from .teacher import forced_batch, reasoning_slices


@dataclass
class ReasoningRecord:
    """One cold-start example: the teacher should write ``reasoning``, then score ``score``."""

    image: Any
    prompt: str
    dimension: str
    reasoning: str
    score: float

    def to_json(self) -> dict:
        return {"image": self.image, "prompt": self.prompt, "dimension": self.dimension,
                "reasoning": self.reasoning, "score": self.score}


@dataclass
class ColdStartConfig(TrainConfig):
    batch_size: int = 8
    score_weight: float = 1.0  # weight of the score KL beside the reasoning cross-entropy
    target_sharpness: float = 4.0  # soft_targets sharpness of the score distribution
    # train_vision stays False (TrainConfig), as in GDSO and RISD: trained on the reasoning loss, a
    # tiny model's vision tower drifted to one large constant that carried nothing of the image
    # (docs/reproduce.md)


class ColdStartTrainer(TrainerBase):
    """Supervised reason-then-score training of a :class:`ZRewardModel` teacher."""

    name = "cold start"

    def __init__(self, model: ZRewardModel, config: ColdStartConfig, records: Sequence[ReasoningRecord],
                 accelerator: Any | None = None) -> None:
        self._setup_accelerator(config, accelerator)
        self.train_records = list(records)
        for i, r in enumerate(self.train_records):
            if r.dimension not in model.dimensions:
                raise ValueError(f"record {i}: dimension {r.dimension!r} is not one of the model's {model.dimensions}")
        policy = GDSOPolicy(model, config.train_vision)
        self._prepare(policy, config, config.batch_size)

    @property
    def reward_model(self) -> ZRewardModel:
        return self.accelerator.unwrap_model(self.module).reward_model

    def check_records(self, records: list) -> str | None:
        return None if all(math.isfinite(r.score) for r in records) else "scores contain NaN or inf"

    def compute_loss(self, records: list) -> tuple[torch.Tensor, dict[str, float]]:
        rm = self.reward_model
        batch = forced_batch(rm, [r.image for r in records], [r.prompt for r in records],
                             [r.dimension for r in records], [r.reasoning for r in records])
        hidden = self.module(batch)  # [B, L, H]
        device = hidden.device
        h, tokens, mask = reasoning_slices(hidden, batch)  # the reasoning, then the end of turn
        logits = rm.lm_head(h).float()  # [B, T, V]: full rows, fine at the tiny vocabularies cold start runs on
        ce = F.cross_entropy(logits[mask.bool()], tokens[mask.bool()])
        rows = hidden[torch.arange(hidden.shape[0], device=device), batch.query_positions.to(device)]
        soft = torch.tensor([soft_targets(r.score, rm.scale, self.config.target_sharpness) for r in records])
        head = rm.lm_head
        kl = risd_loss(rows, head.weight, rm.score_token_ids, soft.to(device), bias=getattr(head, "bias", None))
        return ce + self.config.score_weight * kl, {"loss_reasoning": float(ce.detach()), "loss_score": float(kl.detach())}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self.reward_model.save_pretrained(directory)
