"""ZRewardModel: a Qwen3.5 vision-language model read as a four-dimension reward model.

The base model runs once for hidden states; the fused score head is applied only at the query
positions, reading the K score rows of the LM head. Full-vocabulary logits are never formed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .checks import pair_inputs
from .dimensions import resolve_dimensions
from .kernels import score_head
from .processing import ZRewardBatch, ZRewardProcessor
from .scale import ScoreResult, ScoreScale


class ZRewardModel(nn.Module):
    """Scores images against prompts on the reward dimensions, one forward pass per batch.

    Args:
        model: a ``Qwen3_5ForConditionalGeneration`` (or any model with the same ``.model`` /
            LM-head layout) whose tokenizer carries the score and dimension tokens.
        processor: the matching :class:`ZRewardProcessor`.
        scale: score levels; defaults to the processor's.
        dimensions: the dimensions this model scores; defaults to the processor's.
        temperature: softmax temperature of the score head.
    """

    def __init__(
        self,
        model: nn.Module,
        processor: ZRewardProcessor,
        scale: ScoreScale | None = None,
        dimensions: Sequence[str] | None = None,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.processor = processor
        self.scale = scale or processor.scale
        if self.scale.levels != processor.scale.levels:
            raise ValueError(f"scale {self.scale.levels} differs from the processor's {processor.scale.levels}")
        self.dimensions = resolve_dimensions(dimensions, processor.dimensions)
        self.temperature = float(temperature)
        head = model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise ValueError("the model has no LM head to read score rows from")
        vocab = head.weight.shape[0]
        bad = [i for i in processor.score_token_ids if i >= vocab]
        if bad:
            raise ValueError(f"score token ids {bad} are outside the LM head ({vocab} rows): resize the model")
        # on the head's device: a model built or moved to the GPU before it is wrapped must score there
        device = head.weight.device
        self.register_buffer("score_token_ids", torch.tensor(processor.score_token_ids, dtype=torch.long, device=device),
                             persistent=False)
        self.register_buffer("levels", torch.tensor(self.scale.levels, dtype=torch.float32, device=device), persistent=False)

    # ------------------------------------------------------------------ core
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def hidden_states(self, batch: ZRewardBatch) -> torch.Tensor:
        """Last hidden states [B, L, H] of the base model (no LM head)."""
        base = self.model.model
        inputs = batch.to(self.device).model_inputs()
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        out = base(**inputs, use_cache=False)
        return out.last_hidden_state

    def head(self, hidden: torch.Tensor):
        """The fused score head on hidden states [N, H]."""
        head = self.lm_head
        return score_head(
            hidden, head.weight, self.score_token_ids, self.levels, bias=getattr(head, "bias", None),
            temperature=self.temperature,
        )

    def distributions(self, batch: ZRewardBatch) -> torch.Tensor:
        """[B, D, K] log-probabilities over the levels at each query position (differentiable)."""
        return self._head_at_queries(batch).log_probs.view(batch.query_positions.shape[0], -1, self.scale.num_levels)

    def _head_at_queries(self, batch: ZRewardBatch):
        hidden = self.hidden_states(batch)
        pos = batch.query_positions.to(hidden.device)
        rows = hidden.gather(1, pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # [B, D, H]
        return self.head(rows.reshape(-1, hidden.shape[-1]))

    def forward(self, batch: ZRewardBatch) -> torch.Tensor:
        return self.distributions(batch)

    # ------------------------------------------------------------------ user-facing
    def reward(self, pixels: torch.Tensor, prompts: Sequence[str] | str, dimensions: Sequence[str] | None = None) -> torch.Tensor:
        """[B, D] expected scores; differentiable w.r.t. ``pixels`` ([B, 3, H, W] in [0, 1])."""
        return self.reward_stats(pixels, prompts, dimensions)[0]

    def reward_stats(
        self, pixels: torch.Tensor, prompts: Sequence[str] | str, dimensions: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, D] means and [B, D] stds of each dimension's distribution; differentiable w.r.t. pixels."""
        if not isinstance(pixels, torch.Tensor):
            raise TypeError(f"pixels must be a torch.Tensor [B, 3, H, W], got {type(pixels).__name__}")
        dims = resolve_dimensions(dimensions, self.dimensions)
        batch = self.processor(pixels, prompts, dims)
        out = self._head_at_queries(batch)
        shape = (len(batch.query_positions), len(dims))
        return out.mean.view(shape), out.var.clamp_min(0).sqrt().view(shape)

    @torch.no_grad()
    def score(
        self,
        images: Sequence[Any] | Any,
        prompts: Sequence[str] | str,
        dimensions: Sequence[str] | str | None = None,
        batch_size: int = 16,
    ) -> list[dict[str, ScoreResult]]:
        """Score images (PIL, paths, bytes, arrays or [3,H,W] tensors) against their prompts."""
        images, prompts = pair_inputs(images, prompts)
        dims = resolve_dimensions(dimensions, self.dimensions)
        results: list[dict[str, ScoreResult]] = []
        for start in range(0, len(images), batch_size):
            batch = self.processor(images[start : start + batch_size], prompts[start : start + batch_size], dims)
            out = self._head_at_queries(batch)
            n = len(batch.query_positions)
            probs = out.probs.view(n, len(dims), -1).float().cpu()
            mean = out.mean.view(n, len(dims)).float().cpu()
            std = out.var.clamp_min(0).sqrt().view(n, len(dims)).float().cpu()
            for i in range(n):
                results.append({
                    d: ScoreResult(float(mean[i, j]), float(std[i, j]), tuple(float(x) for x in probs[i, j]))
                    for j, d in enumerate(dims)
                })
        return results

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike, also_write: Callable[[Path], None] | None = None,
                        **kwargs: Any) -> None:
        """Model and processor; ``also_write(d)`` adds files of a wrapper (a value head). Staged and
        moved into place with ``config.json`` last: a crash leaves the old model, the new one or a
        directory ``from_pretrained`` refuses, never new weights under an old config
        (:mod:`zreward_fast.fileio`). Other contents of ``directory`` (checkpoints) are kept."""
        from .fileio import staged_directory

        with staged_directory(directory, marker="config.json") as tmp:
            self.model.save_pretrained(tmp, **kwargs)
            self.processor.save_pretrained(tmp)
            if also_write is not None:
                also_write(tmp)

    @classmethod
    def from_pretrained(
        cls, local_dir: str | os.PathLike, torch_dtype: torch.dtype | None = None, device: str | None = None,
        revision: str | None = None, local_files_only: bool = False, **kwargs: Any
    ) -> "ZRewardModel":
        """Load from a directory where ``model.save_pretrained`` and ``processor.save_pretrained`` wrote,
        or from a hub repo id of such a directory (``revision``: a branch, tag or commit;
        ``local_files_only``: from the hub cache, never the network; zreward_fast.hub)."""
        from transformers import AutoModelForImageTextToText

        from .hub import resolve

        path = resolve(local_dir, revision, local_files_only)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a saved model directory")
        processor = ZRewardProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(
            str(path), local_files_only=True, dtype=torch_dtype or torch.float32, use_safetensors=True,
            trust_remote_code=False,  # a model directory never runs its own code here
        )
        if device is not None:
            model = model.to(device)
        return cls(model.eval(), processor, **kwargs)

    @classmethod
    def from_base(
        cls, base: str | os.PathLike, image_size: int = 448, scale: ScoreScale | None = None,
        dimensions: Sequence[str] | None = None, torch_dtype: torch.dtype | None = None, revision: str | None = None,
    ) -> "ZRewardModel":
        """A Z-Reward model from a base Qwen3.5 checkpoint (a directory or hub repo id holding the
        model, its tokenizer and optionally its ``preprocessor_config.json``): the score and
        dimension-query tokens added, their rows initialised from the text they stand for
        (:func:`zreward_fast.tokens.add_score_tokens`), and the processor built from the base's
        vision settings. The first step of a real training run (``zreward-fast init``)."""
        import json

        from transformers import AutoModelForImageTextToText, AutoTokenizer

        from .dimensions import DIMENSIONS
        from .hub import resolve
        from .tokens import add_score_tokens

        path = resolve(base, revision)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a model checkpoint")
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(
            str(path), local_files_only=True, dtype=torch_dtype or torch.float32, use_safetensors=True,
            trust_remote_code=False,
        )
        scale = scale or ScoreScale()
        dims = resolve_dimensions(dimensions, DIMENSIONS) if dimensions is not None else DIMENSIONS
        add_score_tokens(tokenizer, model, scale=scale, dimensions=dims)
        vision = model.config.vision_config
        pre = path / "preprocessor_config.json"
        norm = json.loads(pre.read_text()) if pre.is_file() else {}
        processor = ZRewardProcessor(
            tokenizer, image_size=image_size, patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size, image_mean=norm.get("image_mean", (0.5, 0.5, 0.5)),
            image_std=norm.get("image_std", (0.5, 0.5, 0.5)), scale=scale, dimensions=dims,
        )
        return cls(model.eval(), processor)
