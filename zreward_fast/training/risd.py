"""RISD: distil the teacher's reasoning-conditioned score distributions into a one-pass student.

The student reads all four dimensions from one forward pass (the multi-query format) and is
trained with ``risd_loss`` = mean KL(q_teacher || q_student). The LM head's K score rows are
trained as their own small parameter (``score_rows``) and written back into the head on save, so
the rest of the LM head (about 1B parameters for the 9B student) has no gradient and no
optimizer state. Multi-GPU through accelerate (DDP, FSDP2: ``accelerate launch`` or torchrun).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..dimensions import resolve_dimensions
from ..kernels import risd_loss
from ..modeling import ZRewardModel
from .common import TrainConfig, TrainerBase, full_state_dict
from .data import RISDRecord, ScoredRecord, read_manifest
from .metrics import evaluate_pairs

logger = logging.getLogger("zreward_fast.training.risd")


@dataclass
class RISDConfig(TrainConfig):
    learning_rate: float = 1e-4
    max_steps: int = 100
    train_manifest: str = ""
    output_dir: str = "risd-out"
    model_dir: str | None = None  # a saved ZRewardModel; None builds the tiny test model
    eval_manifest: str | None = None
    tiny_seed: int = 0
    batch_size: int = 8
    temperature: float = 1.0
    save_every: int = 0
    eval_every: int = 0
    dimensions: list[str] | None = None


class RISDStudent(nn.Module):
    """The student model with its K score rows as a separate trainable parameter."""

    def __init__(self, reward_model: ZRewardModel, train_vision: bool = False) -> None:
        super().__init__()
        self.reward_model = reward_model
        head = reward_model.lm_head
        ids = reward_model.score_token_ids
        self.score_rows = nn.Parameter(head.weight.detach()[ids].clone().float())
        bias = getattr(head, "bias", None)
        self.score_bias = nn.Parameter(bias.detach()[ids].clone().float()) if bias is not None else None
        head.weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)
        visual = getattr(reward_model.model.model, "visual", None)
        if visual is not None and not train_vision:
            visual.requires_grad_(False)

    def forward(self, batch, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        rm = self.reward_model
        hidden = rm.hidden_states(batch)
        pos = batch.query_positions.to(hidden.device)
        rows = hidden.gather(1, pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])).reshape(-1, hidden.shape[-1])
        ids = torch.arange(self.score_rows.shape[0], device=rows.device)
        return risd_loss(rows, self.score_rows, ids, teacher.reshape(-1, teacher.shape[-1]).to(rows.device),
                         bias=self.score_bias, temperature=temperature)

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the trained score rows into the LM head (before saving or scoring)."""
        head = self.reward_model.lm_head
        ids = self.reward_model.score_token_ids
        head.weight[ids] = self.score_rows.to(head.weight.dtype)
        if self.score_bias is not None:
            head.bias[ids] = self.score_bias.to(head.bias.dtype)


class RISDTrainer(TrainerBase):
    """Trains a :class:`ZRewardModel` student on teacher distributions (``risd`` manifests)."""

    name = "RISD"

    def __init__(
        self,
        model: ZRewardModel,
        config: RISDConfig,
        train_records: Sequence[RISDRecord] | None = None,
        eval_records: Sequence[Any] | None = None,
        accelerator: Any | None = None,
    ) -> None:
        self._setup_accelerator(config, accelerator)
        self.dimensions = resolve_dimensions(config.dimensions, model.dimensions)
        scale = model.scale
        if train_records is None:
            if not config.train_manifest:
                raise ValueError("RISDConfig.train_manifest is empty and no train_records were given")
            train_records = read_manifest(config.train_manifest, "risd", scale)
        if eval_records is None and config.eval_manifest:
            eval_records = read_manifest(config.eval_manifest, "scored", scale)
        self.train_records = list(train_records)
        self.eval_records = list(eval_records or [])
        for i, r in enumerate(self.train_records):
            missing = [d for d in self.dimensions if d not in r.targets]
            if missing:
                raise ValueError(f"train record {i} has no teacher targets for {missing}")
        self.processor = model.processor
        student = RISDStudent(model, config.train_vision)
        self._prepare(student, config, config.batch_size)

    # ------------------------------------------------------------------ steps
    def _unwrapped(self) -> RISDStudent:
        return self.accelerator.unwrap_model(self.module)

    def make_batch(self, records: Sequence[RISDRecord]):
        batch = self.processor([r.image for r in records], [r.prompt for r in records], self.dimensions)
        teacher = torch.tensor([[r.targets[d] for d in self.dimensions] for r in records], dtype=torch.float32)
        return batch, teacher

    def check_records(self, records: list) -> str | None:
        # plain floats: no tensor is built here, make_batch builds the one the step uses
        ok = all(math.isfinite(p) for r in records for d in self.dimensions for p in r.targets[d])
        return None if ok else "teacher targets contain NaN or inf"

    def compute_loss(self, records: list) -> tuple[torch.Tensor, dict[str, float]]:
        batch, teacher = self.make_batch(records)
        return self.module(batch, teacher, self.config.temperature), {}

    def after_step(self) -> None:
        c, step = self.config, self.state.step
        if c.save_every and step % c.save_every == 0:
            self.save_checkpoint(Path(c.output_dir) / f"checkpoint-{step}")
        if c.eval_every and self.eval_records and step % c.eval_every == 0:
            logger.info("RISD step %d eval %s", step, self.evaluate())

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self, records: Sequence[Any] | None = None, batch_size: int = 16) -> dict[str, dict[str, float]]:
        """HPA, margin HPA, PLCC and SRCC per dimension on scored (or RISD) records."""
        records = list(records if records is not None else self.eval_records)
        student = self._unwrapped()
        rm = student.reward_model
        saved = rm.lm_head.weight.detach()[rm.score_token_ids].clone()
        student.write_back()
        rm.eval()
        try:
            scores = rm.score([r.image for r in records], [r.prompt for r in records], self.dimensions, batch_size)
        finally:
            rm.lm_head.weight.data[rm.score_token_ids] = saved  # evaluation leaves the head as it was
        out = {}
        levels = torch.tensor(rm.scale.levels)
        for d in self.dimensions:
            idx = [i for i, r in enumerate(records) if _label(r, d, levels) is not None]
            out[d] = evaluate_pairs([records[i].prompt for i in idx], [_label(records[i], d, levels) for i in idx],
                                    [scores[i][d].mean for i in idx])
        return out

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """The student with its trained score rows written back into the LM head.

        The state dict is gathered through accelerate, so this works the same unwrapped, under
        DDP and under FSDP2 (sharded parameters are gathered to the main process).
        """
        self.accelerator.wait_for_everyone()
        state = full_state_dict(self.accelerator, self.module)
        if self.accelerator.is_main_process:
            rm = self._unwrapped().reward_model
            prefix = "reward_model.model."
            sd = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            head_key = next(k for k in sd if k.endswith("lm_head.weight"))
            head = sd[head_key].clone()
            head[rm.score_token_ids.cpu()] = state["score_rows"].to(head.dtype).cpu()
            sd[head_key] = head
            if state.get("score_bias") is not None:
                bias_key = head_key[: -len("weight")] + "bias"
                bias = sd[bias_key].clone()
                bias[rm.score_token_ids.cpu()] = state["score_bias"].to(bias.dtype).cpu()
                sd[bias_key] = bias
            rm.save_pretrained(directory, state_dict=sd)
        self.accelerator.wait_for_everyone()


def _label(record: Any, dim: str, levels: torch.Tensor) -> float | None:
    if isinstance(record, ScoredRecord):
        return record.scores.get(dim)
    if isinstance(record, RISDRecord) and dim in record.targets:
        return float((torch.tensor(record.targets[dim]) * levels).sum())
    return None
