"""The scalar reward model the paper argues against: one number per image, Bradley-Terry on pairs.

The same backbone and the student's prompt; a linear value head on the hidden state at the last
query token gives one scalar per image, trained with ``-log sigmoid(r_better - r_worse)`` on the
same pairs as GDSO (whatever dimension each pair was annotated on). It has no distribution, and a
single scalar cannot order both dimensions of a conflict pair, which is what the benchmark's
conflict accuracy measures. ``score`` reports the scalar as every dimension's mean.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import pair_inputs
from ..dimensions import resolve_dimensions
from ..modeling import ZRewardModel
from ..scale import ScoreResult
from .common import TrainConfig, TrainerBase
from .data import PairRecord

VALUE_HEAD_FILE = "value_head.pt"


class ScalarRewardModel(nn.Module):
    """A :class:`ZRewardModel` backbone with a scalar value head at the last query token."""

    def __init__(self, reward_model: ZRewardModel, train_vision: bool = True, seed: int = 0) -> None:
        super().__init__()
        self.reward_model = reward_model
        with torch.random.fork_rng():  # the head's initial weights depend on ``seed`` alone
            torch.manual_seed(seed)
            self.value = nn.Linear(reward_model.model.config.text_config.hidden_size, 1)
        visual = getattr(reward_model.model.model, "visual", None)
        if visual is not None and not train_vision:
            visual.requires_grad_(False)
        reward_model.lm_head.requires_grad_(False)  # the value head replaces the LM head

    @property
    def scale(self):
        return self.reward_model.scale

    def forward(self, images: Sequence[Any], prompts: Sequence[str]) -> torch.Tensor:
        """[B] scalar rewards."""
        rm = self.reward_model
        batch = rm.processor(list(images), list(prompts), rm.dimensions)
        hidden = rm.hidden_states(batch)
        last = batch.query_positions[:, -1].to(hidden.device)
        rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.value(rows.float()).squeeze(-1)

    @torch.no_grad()
    def score(self, images: Sequence[Any], prompts: Sequence[str] | str, dimensions: Sequence[str] | str | None = None,
              batch_size: int = 16) -> list[dict[str, ScoreResult]]:
        images, prompts = pair_inputs(images, prompts)
        dims = resolve_dimensions(dimensions, self.reward_model.dimensions)
        self.eval()
        out = []
        for start in range(0, len(images), batch_size):
            r = self(images[start : start + batch_size], prompts[start : start + batch_size])
            out += [{d: ScoreResult(float(v), 0.0, ()) for d in dims} for v in r.tolist()]
        return out

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self.reward_model.save_pretrained(directory, also_write=lambda d: torch.save(self.value.state_dict(), d / VALUE_HEAD_FILE))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ScalarRewardModel":
        model = cls(ZRewardModel.from_pretrained(directory))
        model.value.load_state_dict(torch.load(Path(directory) / VALUE_HEAD_FILE, weights_only=True))
        return model.eval()


@dataclass
class ScalarConfig(TrainConfig):
    train_vision: bool = True
    pairs_per_step: int = 8


class ScalarTrainer(TrainerBase):
    """Bradley-Terry training of a :class:`ScalarRewardModel` on ``pairs`` records."""

    name = "scalar BT"

    def __init__(self, model: ScalarRewardModel, config: ScalarConfig, train_records: Sequence[PairRecord],
                 accelerator: Any | None = None) -> None:
        self._setup_accelerator(config, accelerator)
        self.train_records = [r for r in train_records if r.scores[0] != r.scores[1]]
        if not self.train_records:
            raise ValueError("no training pair has two different scores")
        self._prepare(model, config, config.pairs_per_step)

    def check_records(self, records: list) -> str | None:
        return None if all(math.isfinite(s) for r in records for s in r.scores) else "pair scores contain NaN or inf"

    def compute_loss(self, records: list) -> tuple[torch.Tensor, dict[str, float]]:
        better = [r.images[0] if r.scores[0] > r.scores[1] else r.images[1] for r in records]
        worse = [r.images[1] if r.scores[0] > r.scores[1] else r.images[0] for r in records]
        prompts = [r.prompt for r in records]
        rewards = self.module(better + worse, prompts + prompts)
        margin = rewards[: len(records)] - rewards[len(records) :]
        return -F.logsigmoid(margin).mean(), {"accuracy": float((margin > 0).float().mean())}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self.accelerator.unwrap_model(self.module).save_pretrained(directory)
