"""GDSO: train the reasoning teacher with GRPO over its reasoning plus pointwise and pairwise
supervision of its score distributions (docs/architecture.md, Losses).

One step, for P pair instances (two images of one prompt, one dimension, annotated scores):
1. G reasonings are sampled per side with the rollout engine (policy in eval mode, no grad);
2. the policy scores each rollout at the query token after its reasoning (fused score head,
   K rows only) -> score logits [P, 2, G, K];
3. ``gdso_loss`` gives L_pt, L_pw, the rewards and the group-normalised advantages;
4. ``grpo_token_loss`` (fused with the LM head, never [B*T, V] logits) gives L_grpo over the
   reasoning tokens against a frozen reference model;
5. L_GDSO = L_grpo + alpha_pt L_pt + alpha_pw L_pw, one optimizer step.
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..kernels import gdso_loss, grpo_token_loss, score_head
from ..modeling import ZRewardModel
from .common import TrainConfig, TrainerBase, full_state_dict
from .data import PairRecord, read_manifest
from .metrics import evaluate_pairs
from .rollouts import RolloutEngine
from .teacher import default_engine, forward_hidden, reasoning_slices, rollouts

logger = logging.getLogger("zreward_fast.training.gdso")


@dataclass
class GDSOConfig(TrainConfig):
    learning_rate: float = 1e-6
    max_steps: int = 100
    train_manifest: str = ""
    output_dir: str = "gdso-out"
    model_dir: str | None = None  # a saved ZRewardModel (the teacher); None builds the tiny test model
    eval_manifest: str | None = None
    tiny_seed: int = 0
    num_rollouts: int = 8  # G per side
    pairs_per_step: int = 2  # P
    max_new_tokens: int = 256
    rollout_temperature: float = 1.0
    alpha_pt: float = 1.0
    alpha_pw: float = 1.0
    grpo_weight: float = 1.0  # 0 drops the GRPO term over the reasoning (an ablation)
    lambda_pt: float = 0.5
    lambda_pw: float = 0.5
    eps: float = 1e-4
    clip_eps: float = 0.2
    beta: float = 0.04
    save_every: int = 0
    eval_every: int = 0

    def __post_init__(self) -> None:
        if self.num_rollouts < 2:
            raise ValueError(f"num_rollouts (G) must be >= 2: the advantage uses the unbiased std, got {self.num_rollouts}")
        if self.pairs_per_step < 1:
            raise ValueError(f"pairs_per_step must be >= 1, got {self.pairs_per_step}")


class GDSOPolicy(nn.Module):
    """The teacher under training (a module, so accelerate can wrap it for DDP/FSDP)."""

    def __init__(self, reward_model: ZRewardModel, train_vision: bool = False) -> None:
        super().__init__()
        self.reward_model = reward_model
        visual = getattr(reward_model.model.model, "visual", None)
        if visual is not None and not train_vision:
            visual.requires_grad_(False)

    def forward(self, batch) -> torch.Tensor:
        return forward_hidden(self.reward_model.model, batch)


class GDSOTrainer(TrainerBase):
    """Trains a reasoning teacher (a :class:`ZRewardModel` in the teacher format) with GDSO."""

    name = "GDSO"

    def __init__(
        self,
        model: ZRewardModel,
        config: GDSOConfig,
        train_records: Sequence[PairRecord] | None = None,
        eval_records: Sequence[PairRecord] | None = None,
        engine: RolloutEngine | None = None,
        ref_model: nn.Module | None = None,
        accelerator: Any | None = None,
    ) -> None:
        self._setup_accelerator(config, accelerator)
        if train_records is None:
            if not config.train_manifest:
                raise ValueError("GDSOConfig.train_manifest is empty and no train_records were given")
            train_records = read_manifest(config.train_manifest, "pairs", model.scale)
        if eval_records is None and config.eval_manifest:
            eval_records = read_manifest(config.eval_manifest, "pairs", model.scale)
        self.train_records = list(train_records)
        self.eval_records = list(eval_records or [])
        for r in self.train_records:
            if r.dimension not in model.dimensions:
                raise ValueError(f"pair dimension {r.dimension!r} is not one of the model's {model.dimensions}")
        self.engine = engine or default_engine(model, config.max_new_tokens, config.rollout_temperature)
        # The frozen reference for the KL term: a copy of the starting policy.
        if ref_model is None and config.beta > 0:
            ref_model = copy.deepcopy(model.model).eval().requires_grad_(False)
        self.ref_model = ref_model.to(self.accelerator.device) if ref_model is not None else None
        policy = GDSOPolicy(model, config.train_vision)
        self._prepare(policy, config, config.pairs_per_step)

    @property
    def reward_model(self) -> ZRewardModel:
        return self.accelerator.unwrap_model(self.module).reward_model

    def check_records(self, records: list) -> str | None:
        import math

        for r in records:
            if not all(math.isfinite(s) for s in r.scores):
                return f"pair scores contain NaN or inf: {r.scores}"
        return None

    def compute_loss(self, records: list) -> tuple[torch.Tensor, dict[str, float]]:
        c, rm = self.config, self.reward_model
        G = c.num_rollouts
        images = [img for r in records for img in r.images]
        prompts = [r.prompt for r in records for _ in range(2)]
        dims = [r.dimension for r in records for _ in range(2)]
        batch = rollouts(rm, images, prompts, dims, G, self.engine)  # rows (p, j, i)
        hidden = self.module(batch)  # [P*2*G, L, H]
        P = len(records)
        device = hidden.device
        head = rm.lm_head
        rows = hidden[torch.arange(hidden.shape[0], device=device), batch.query_positions.to(device)]
        logits = score_head(rows, head.weight, rm.score_token_ids, rm.levels, getattr(head, "bias", None)).logits
        targets = torch.tensor([r.scores for r in records], dtype=torch.float32, device=device)
        g = gdso_loss(logits.view(P, 2, G, -1), targets, rm.levels, c.alpha_pt, c.alpha_pw, c.lambda_pt,
                      c.lambda_pw, c.eps)
        h_r, tokens, mask = reasoning_slices(hidden, batch)
        logs = {"loss_pt": float(g.loss_pt.detach()), "loss_pw": float(g.loss_pw.detach()),
                "reward": float(g.rewards.mean()), "reasoning_tokens": float(mask.sum())}
        if c.grpo_weight == 0:
            return g.loss, logs
        ref_lp = None
        if self.ref_model is not None and c.beta > 0:
            with torch.no_grad():
                ref_hidden = forward_hidden(self.ref_model, batch)
                ref_h, _, _ = reasoning_slices(ref_hidden, batch)
                ref_head = self.ref_model.get_output_embeddings().weight
                adv0 = torch.zeros(tokens.shape[0], device=device)
                _, ref_lp = grpo_token_loss(ref_h, ref_head, tokens, mask, adv0, beta=0.0)
        l_grpo, _ = grpo_token_loss(h_r, head.weight, tokens, mask, g.advantages.reshape(-1),
                                    ref_logprobs=ref_lp, clip_eps=c.clip_eps, beta=c.beta)
        logs["loss_grpo"] = float(l_grpo.detach())
        return c.grpo_weight * l_grpo + g.loss, logs

    def after_step(self) -> None:
        c, step = self.config, self.state.step
        if c.save_every and step % c.save_every == 0:
            self.save_checkpoint(Path(c.output_dir) / f"checkpoint-{step}")
        if c.eval_every and self.eval_records and step % c.eval_every == 0:
            logger.info("GDSO step %d eval %s", step, self.evaluate())

    @torch.no_grad()
    def evaluate(self, records: Sequence[PairRecord] | None = None, num_samples: int = 1) -> dict[str, dict[str, float]]:
        """Per-dimension HPA (and margin HPA, PLCC, SRCC) of the reasoning-conditioned means."""
        from .labelling import teacher_means

        records = list(records if records is not None else self.eval_records)
        rm = self.reward_model
        rm.eval()
        by_dim: dict[str, tuple[list, list, list]] = {}
        images = [img for r in records for img in r.images]
        prompts = [r.prompt for r in records for _ in range(2)]
        dims = [r.dimension for r in records for _ in range(2)]
        means = teacher_means(rm, images, prompts, dims, self.engine, num_samples)
        for k, r in enumerate(records):
            ps, ls, ms = by_dim.setdefault(r.dimension, ([], [], []))
            for j in range(2):
                ps.append(f"{k}:{r.prompt}")
                ls.append(r.scores[j])
                ms.append(means[2 * k + j])
        return {d: evaluate_pairs(*v) for d, v in by_dim.items()}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """The trained teacher; the state dict is gathered through accelerate (DDP, FSDP2)."""
        self.accelerator.wait_for_everyone()
        state = full_state_dict(self.accelerator, self.module)
        if self.accelerator.is_main_process:
            prefix = "reward_model.model."
            sd = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            self.reward_model.save_pretrained(directory, state_dict=sd)
        self.accelerator.wait_for_everyone()
