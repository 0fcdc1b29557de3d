"""The labelling job: run the reasoning teacher over a dataset and write RISD targets.

For each image, prompt and dimension the teacher reasons (sampled or greedy), then its score
distribution is read at the query token after the reasoning; with ``num_samples > 1`` the
distributions of several reasonings are averaged.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from ..dimensions import resolve_dimensions
from ..kernels import score_head
from ..modeling import ZRewardModel
from .data import RISDRecord, write_manifest
from .rollouts import RolloutEngine
from .teacher import default_engine, forward_hidden, rollouts


@torch.no_grad()
def teacher_outputs(
    rm: ZRewardModel, images: Sequence[Any], prompts: Sequence[str], dims: Sequence[str],
    engine: RolloutEngine | None = None, num_samples: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[len(images), K] reasoning-conditioned probabilities (averaged over ``num_samples``) and
    [len(images)] mean number of reasoning tokens generated (the teacher's scoring cost)."""
    engine = engine or default_engine(rm)
    batch = rollouts(rm, images, prompts, dims, num_samples, engine)
    hidden = forward_hidden(rm.model, batch)
    rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch.query_positions.to(hidden.device)]
    head = rm.lm_head
    probs = score_head(rows, head.weight, rm.score_token_ids, rm.levels, getattr(head, "bias", None)).probs
    lengths = batch.reasoning_len.float().view(len(images), num_samples).mean(1)
    return probs.view(len(images), num_samples, -1).mean(1).cpu(), lengths


def teacher_distributions(
    rm: ZRewardModel, images: Sequence[Any], prompts: Sequence[str], dims: Sequence[str],
    engine: RolloutEngine | None = None, num_samples: int = 1,
) -> torch.Tensor:
    """[len(images), K] reasoning-conditioned probabilities (averaged over ``num_samples``)."""
    return teacher_outputs(rm, images, prompts, dims, engine, num_samples)[0]


def teacher_means(rm: ZRewardModel, images, prompts, dims, engine=None, num_samples: int = 1) -> list[float]:
    probs = teacher_distributions(rm, images, prompts, dims, engine, num_samples)
    return (probs * torch.tensor(rm.scale.levels)).sum(-1).tolist()


def label_risd_targets(
    teacher: ZRewardModel,
    records: Sequence[Any],
    out_manifest: str | os.PathLike,
    dimensions: Sequence[str] | None = None,
    engine: RolloutEngine | None = None,
    num_samples: int = 1,
    batch_size: int = 32,
) -> Path:
    """Write a ``risd`` manifest with the teacher's distributions for every record (anything with
    ``.image`` and ``.prompt``) on every dimension."""
    from tqdm.auto import tqdm

    dims = resolve_dimensions(dimensions, teacher.dimensions)
    engine = engine or default_engine(teacher)
    out = []
    for start in tqdm(range(0, len(records), batch_size), desc="labelling"):
        chunk = list(records[start : start + batch_size])
        targets: list[dict[str, list[float]]] = [{} for _ in chunk]
        for d in dims:
            probs = teacher_distributions(teacher, [r.image for r in chunk], [r.prompt for r in chunk],
                                          [d] * len(chunk), engine, num_samples)
            probs = probs / probs.sum(-1, keepdim=True)  # exact normalisation for the manifest check
            for t, p in zip(targets, probs.tolist()):
                t[d] = p
        out += [RISDRecord(r.image, r.prompt, t) for r, t in zip(chunk, targets)]
    return write_manifest(out_manifest, out)
