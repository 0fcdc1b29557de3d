"""ZRewardProcessor: a tokenizer plus the fixed-bucket image policy, in torch and numpy.

This is zreward-fast's own processor rather than transformers' Qwen-VL processor: those cannot be
built without torchvision in transformers 5.x, and they resize each image to its own grid, where a
reward model wants one fixed bucket (one vision shape for batching and export). The patch layout is
the Qwen2-VL image processor's (checked against ``Qwen2VLImageProcessorPil`` in the tests).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import imaging
from .dimensions import DIMENSIONS, query_token, resolve_dimensions
from .prompting import (CHAT_SPECIAL_TOKENS, IMAGE_PAD, PromptFormat, check_prompt, student_query_positions,
                        student_text, teacher_text)
from .scale import ScoreScale

PROCESSOR_CONFIG_NAME = "zreward_processor.json"
FORMAT_VERSION = 1


@dataclass
class ZRewardBatch:
    """Model inputs for one batch: right-padded text, bucket patches and the query positions."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    mm_token_type_ids: torch.Tensor  # [B, L]: 1 at image tokens
    pixel_values: torch.Tensor  # [B * patches, 3 * t * p * p]
    image_grid_thw: torch.Tensor  # [B, 3]
    query_positions: torch.Tensor  # [B, D]
    dimensions: tuple[str, ...]

    def to(self, device: torch.device | str) -> "ZRewardBatch":
        return ZRewardBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.mm_token_type_ids.to(device),
            self.pixel_values.to(device), self.image_grid_thw.to(device), self.query_positions.to(device),
            self.dimensions,
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids, "attention_mask": self.attention_mask,
            "mm_token_type_ids": self.mm_token_type_ids, "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
        }


class ZRewardProcessor:
    """Tokenizer and image preprocessing for the student and teacher formats.

    Args:
        tokenizer: a Hugging Face tokenizer that carries the chat special tokens and the score and
            dimension tokens (see :func:`zreward_fast.tokens.add_score_tokens`).
        image_size: side of the square bucket every image is resized to; a multiple of
            ``patch_size * merge_size`` (32 for Qwen3.5).
        scale, dimensions: the score levels and the dimensions this model scores.
    """

    def __init__(
        self,
        tokenizer: Any,
        image_size: int = 448,
        patch_size: int = 16,
        merge_size: int = 2,
        temporal_patch_size: int = 2,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        scale: ScoreScale | None = None,
        dimensions: Sequence[str] | None = None,
        prompt_format: PromptFormat | None = None,
        max_prompt_chars: int = 4096,
        max_image_pixels: int = imaging.DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        factor = patch_size * merge_size
        if not isinstance(image_size, int) or image_size <= 0 or image_size % factor:
            raise ValueError(f"image_size must be a positive multiple of patch_size*merge_size={factor}, got {image_size}")
        if len(image_mean) != 3 or len(image_std) != 3 or any(s <= 0 for s in image_std):
            raise ValueError(f"image_mean/image_std need 3 values (std > 0), got {image_mean}, {image_std}")
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.patch_size = patch_size
        self.merge_size = merge_size
        self.temporal_patch_size = temporal_patch_size
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        self.scale = scale or ScoreScale()
        self.dimensions = resolve_dimensions(dimensions)
        self.prompt_format = prompt_format or PromptFormat()
        self.max_prompt_chars = max_prompt_chars
        self.max_image_pixels = max_image_pixels
        self._check_tokenizer()

    # ------------------------------------------------------------------ tokens
    def _check_tokenizer(self) -> None:
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in CHAT_SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks the chat special tokens {missing}")
        needed = list(self.scale.tokens) + [query_token(d) for d in self.dimensions]
        missing = [t for t in needed if t not in vocab]
        if missing:
            raise ValueError(
                f"tokenizer has no score/dimension tokens {missing[:4]}{'...' if len(missing) > 4 else ''}; "
                "add them with zreward_fast.add_score_tokens(tokenizer, model)"
            )
        self.score_token_ids = tuple(vocab[t] for t in self.scale.tokens)
        self.query_token_ids = {d: vocab[query_token(d)] for d in self.dimensions}
        self.image_token_id = vocab[IMAGE_PAD]
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else vocab[CHAT_SPECIAL_TOKENS[0]]

    @property
    def num_image_tokens(self) -> int:
        side = self.image_size // (self.patch_size * self.merge_size)
        return side * side

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        side = self.image_size // self.patch_size
        return (1, side, side)

    # ------------------------------------------------------------------ images
    def load_images(self, images: Sequence[Any]) -> np.ndarray:
        """PIL images, paths, bytes or arrays -> float32 [B, 3, S, S] in [0, 1] (bucket policy)."""
        return imaging.load_bucket_array(images, self.image_size, self.max_image_pixels)

    def to_pixels(self, images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
        """Anything image-like -> float [B, 3, S, S] in [0, 1]; tensors keep their autograd graph."""
        if isinstance(images, torch.Tensor):
            return self.resize_pixels(images)
        images = list(images)
        if images and all(isinstance(x, torch.Tensor) for x in images):
            return torch.cat([self.resize_pixels(x if x.dim() == 4 else x.unsqueeze(0)) for x in images])
        return torch.from_numpy(self.load_images(images))

    def resize_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> the bucket, differentiably (bicubic with antialiasing)."""
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be [B, 3, H, W], got {tuple(pixels.shape)}")
        if not pixels.is_floating_point():
            raise TypeError(f"pixels must be a float tensor in [0, 1], got {pixels.dtype}")
        if pixels.shape[0] == 0 or pixels.shape[2] == 0 or pixels.shape[3] == 0:
            raise ValueError(f"pixels has an empty axis: {tuple(pixels.shape)}")
        if not torch.isfinite(pixels).all():
            raise ValueError("pixels contain NaN or infinite values")
        if pixels.shape[-2:] == (self.image_size, self.image_size):
            return pixels
        return F.interpolate(
            pixels, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False, antialias=True
        ).clamp(0.0, 1.0)

    def patchify(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1] -> normalised patches [B * S/p * S/p, 3 * t * p * p] (differentiable)."""
        b, c, h, w = pixels.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        mean = torch.tensor(self.image_mean, dtype=pixels.dtype, device=pixels.device)[:, None, None]
        std = torch.tensor(self.image_std, dtype=pixels.dtype, device=pixels.device)[:, None, None]
        x = (pixels - mean) / std
        gh, gw = h // p, w // p
        x = x.reshape(b, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(*x.shape[:6], t, p, p)
        return x.reshape(b * gh * gw, c * t * p * p)

    def patchify_numpy(self, pixels: np.ndarray) -> np.ndarray:
        return imaging.patchify_numpy(
            pixels, self.image_mean, self.image_std, self.patch_size, self.merge_size, self.temporal_patch_size
        )

    # ------------------------------------------------------------------ text
    def student_text(self, prompt: str, dimensions: Sequence[str] | None = None) -> str:
        dims = resolve_dimensions(dimensions, self.dimensions)
        return student_text(check_prompt(prompt, self.max_prompt_chars), dims, self.num_image_tokens, self.prompt_format)

    def teacher_text(self, prompt: str, dimension: str) -> str:
        (dim,) = resolve_dimensions([dimension], self.dimensions)
        return teacher_text(check_prompt(prompt, self.max_prompt_chars), dim, self.num_image_tokens, self.prompt_format)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def pad(self, ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right padding: the model is causal, so positions before the padding never see it."""
        length = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        return input_ids, mask

    # ------------------------------------------------------------------ batches
    def __call__(
        self,
        images: Sequence[Any] | torch.Tensor,
        prompts: Sequence[str] | str,
        dimensions: Sequence[str] | str | None = None,
    ) -> ZRewardBatch:
        """Student batch: one image and one prompt per row, one query token per dimension."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        pixels = self.to_pixels(images)
        if pixels.shape[0] != len(prompts):
            raise ValueError(f"got {pixels.shape[0]} images but {len(prompts)} prompts")
        if not prompts:
            raise ValueError("empty batch: give at least one image and prompt")
        dims = resolve_dimensions(dimensions, self.dimensions)
        ids = self.tokenize([self.student_text(p, dims) for p in prompts])
        return self._batch(ids, pixels, dims)

    def _batch(self, ids: list[list[int]], pixels: torch.Tensor, dims: tuple[str, ...]) -> ZRewardBatch:
        positions = student_query_positions(ids, dims, self.query_token_ids, self.image_token_id, self.num_image_tokens)
        input_ids, mask = self.pad(ids)
        grid = torch.tensor([self.grid_thw] * len(ids), dtype=torch.long)
        return ZRewardBatch(
            input_ids=input_ids,
            attention_mask=mask,
            mm_token_type_ids=(input_ids == self.image_token_id).long(),
            pixel_values=self.patchify(pixels),
            image_grid_thw=grid,
            query_positions=torch.tensor(positions, dtype=torch.long).reshape(len(ids), len(dims)),
            dimensions=dims,
        )

    # ------------------------------------------------------------------ persistence
    def config_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "processor_class": "ZRewardProcessor",
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "merge_size": self.merge_size,
            "temporal_patch_size": self.temporal_patch_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "resample": "bicubic",
            "scale": self.scale.to_dict(),
            "dimensions": list(self.dimensions),
            "prompt_format": self.prompt_format.to_dict(),
            "max_prompt_chars": self.max_prompt_chars,
            "max_image_pixels": self.max_image_pixels,
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        (path / PROCESSOR_CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **overrides: Any) -> "ZRewardProcessor":
        """Load from a directory written by :meth:`save_pretrained`, or from a Qwen3.5 checkpoint
        (its tokenizer and ``preprocessor_config.json``; the bucket then defaults to 448)."""
        from transformers import AutoTokenizer

        path = Path(directory)
        if not path.is_dir():
            raise FileNotFoundError(f"no such directory: {path}")
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        kwargs: dict[str, Any] = {}
        cfg_file = path / PROCESSOR_CONFIG_NAME
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
            if cfg.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{cfg_file}: unknown format_version {cfg.get('format_version')!r} (expected {FORMAT_VERSION})")
            for key in ("image_size", "patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std",
                        "max_prompt_chars", "max_image_pixels"):
                if key in cfg:
                    kwargs[key] = cfg[key]
            kwargs["scale"] = ScoreScale.from_dict(cfg["scale"])
            kwargs["dimensions"] = cfg.get("dimensions", list(DIMENSIONS))
            if "prompt_format" in cfg:
                kwargs["prompt_format"] = PromptFormat.from_dict(cfg["prompt_format"])
        else:
            pre = path / "preprocessor_config.json"
            if pre.is_file():
                pcfg = json.loads(pre.read_text())
                for key in ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std"):
                    if key in pcfg:
                        kwargs[key] = pcfg[key]
        kwargs.update(overrides)
        return cls(tokenizer, **kwargs)
