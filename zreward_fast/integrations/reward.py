"""The reward function RL trainers of diffusion and flow models call (flow_grpo, DiffusionNFT,
DDPO-style trainers): ``fn(images, prompts, metadata) -> (scores, info)``.

Aggregation (docs/integrations.md): each dimension's reward is ``mean - risk * std`` of its score
distribution (``risk=0``: the plain expectation; ``risk>0`` penalises what the model is unsure of,
which resists reward hacking), and the scalar reward is their weighted average with ``weights``
normalised to sum to 1 (default: equal weights over ``dimensions``).
"""
from __future__ import annotations

import math
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from ..dimensions import DIMENSIONS


def _weights(dims: Sequence[str], weights: Mapping[str, float] | Sequence[float] | None) -> np.ndarray:
    if weights is None:
        w = np.ones(len(dims))
    elif isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(dims))
        if unknown:
            raise ValueError(f"weights name dimension(s) {unknown} not scored; the dimensions are {list(dims)}")
        w = np.array([float(weights.get(d, 0.0)) for d in dims])
    else:
        w = np.asarray(list(weights), dtype=np.float64)
        if w.shape != (len(dims),):
            raise ValueError(f"weights must have one value per dimension {list(dims)}, got {len(w)}")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {w.tolist()}")
    return w / w.sum()


def _is_tensor(x: Any) -> bool:
    """A torch tensor, without importing torch (the runtime is torch-free: if torch was never
    imported, nothing is a tensor)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def to_images(images: Any) -> list[Any]:
    """An RL trainer's batch as a list the scorers take: a float tensor ``[B, 3, H, W]`` in [0, 1]
    (any device) becomes uint8 HWC arrays (what a PNG of it holds), a uint8 or float array
    ``[B, H, W, 3]`` its rows; a list of PIL images, arrays or paths is kept."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
            raise ValueError(f"an image array batch must be [B, H, W, 3], got shape {images.shape}")
        return list(images)
    if _is_tensor(images):
        import torch

        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"an image tensor batch must be [B, 3, H, W], got shape {tuple(images.shape)}")
        x = images.detach().float()
        if not torch.isfinite(x).all():
            raise ValueError("the image tensor has NaN or infinite values")
        if x.numel() and (x.min() < 0.0 or x.max() > 1.0):
            raise ValueError(f"an image tensor must lie in [0, 1], got [{x.min().item():.3g}, {x.max().item():.3g}]")
        u8 = (x * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return list(u8)
    raise TypeError(f"images must be a tensor [B, 3, H, W], an array [B, H, W, 3] or a list of images, "
                    f"got {type(images).__name__}")


def _prompts(prompts: Sequence[str] | str, n: int) -> list[str]:
    if isinstance(prompts, str):
        return [prompts] * n
    prompts = list(prompts)
    if len(prompts) != n:
        raise ValueError(f"got {n} images but {len(prompts)} prompts")
    return prompts


class RewardFunction:
    """``fn(images, prompts, metadata=None) -> (scores [B], info)``; built by :func:`reward_fn`.

    ``scores`` is a float32 tensor on the images' device when the images came as a tensor, else a
    float32 numpy array; ``info`` holds ``"{dimension}_mean"`` and ``"{dimension}_std"`` arrays
    ``[B]`` for logging. With ``differentiable=True`` the scores are a torch tensor with gradients
    to the pixels.
    """

    def __init__(self, scorer: Any, dimensions: Sequence[str], weights: np.ndarray, risk: float, batch_size: int,
                 differentiable: bool, scored: Sequence[str]) -> None:
        self.scorer, self.dimensions, self.weights = scorer, tuple(dimensions), weights
        self.scored = tuple(scored)  # every dimension of the model, asked in one pass (see reward_fn)
        self.risk, self.batch_size, self.differentiable = risk, batch_size, differentiable

    def __repr__(self) -> str:
        w = dict(zip(self.dimensions, np.round(self.weights, 4).tolist()))
        return f"RewardFunction({type(self.scorer).__name__}, weights={w}, risk={self.risk}, differentiable={self.differentiable})"

    def __call__(self, images: Any, prompts: Sequence[str] | str, metadata: Any = None) -> tuple[Any, dict[str, Any]]:
        if self.differentiable:
            return self._differentiable(images, prompts)
        imgs = to_images(images)
        results = self.scorer.score(imgs, _prompts(prompts, len(imgs)), list(self.scored), batch_size=self.batch_size)
        means = np.array([[r[d].mean for d in self.dimensions] for r in results], dtype=np.float64).reshape(len(imgs), -1)
        stds = np.array([[r[d].std for d in self.dimensions] for r in results], dtype=np.float64).reshape(len(imgs), -1)
        scores = ((means - self.risk * stds) @ self.weights).astype(np.float32)
        info = self._info(means, stds)
        if _is_tensor(images):
            import torch

            return torch.from_numpy(scores).to(images.device), info
        return scores, info

    def _differentiable(self, pixels: Any, prompts: Sequence[str] | str) -> tuple[Any, dict[str, Any]]:
        import torch

        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4:
            raise TypeError("differentiable=True takes the images as a float tensor [B, 3, H, W] in [0, 1]")
        means, stds = self.scorer.reward_stats(pixels, _prompts(prompts, pixels.shape[0]), list(self.scored))
        keep = [self.scored.index(d) for d in self.dimensions]
        means, stds = means[:, keep], stds[:, keep]
        w = torch.as_tensor(self.weights, dtype=means.dtype, device=means.device)
        scores = (means - self.risk * stds) @ w
        return scores, self._info(means.detach().double().cpu().numpy(), stds.detach().double().cpu().numpy())

    def _info(self, means: np.ndarray, stds: np.ndarray) -> dict[str, Any]:
        info: dict[str, Any] = {}
        for j, d in enumerate(self.dimensions):
            info[f"{d}_mean"] = means[:, j].astype(np.float32)
            info[f"{d}_std"] = stds[:, j].astype(np.float32)
        return info


def reward_fn(source: Any, weights: Mapping[str, float] | Sequence[float] | None = None, risk: float = 0.0,
              dimensions: Sequence[str] | None = None, batch_size: int = 16, differentiable: bool = False,
              **http_kwargs: Any) -> RewardFunction:
    """The reward function of ``source``: a model directory, a bundle directory, a runtime
    ``Scorer``, a ``ZRewardModel``, a ``TorchEngine`` or the URL of a running ``zreward-fast serve``
    (``http_kwargs`` go to :class:`~zreward_fast.integrations.HTTPScorer`: ``api_key``,
    ``max_items``, ``concurrency``, ``image_format``, ``retries``, ...).

    ``differentiable=True`` needs a local PyTorch model (a model directory or a ``ZRewardModel``)
    and returns rewards with gradients to the pixels (ReFL/DRaFT-style training).

    Every dimension of the model is scored (one pass either way) and ``dimensions`` picks those
    aggregated: the multi-query student reads each dimension at its own query token after the
    earlier ones, so asking for fewer dimensions is a different prompt with slightly different
    scores than the model was trained on.
    """
    from ..checks import positive_int
    from ..evaluation import load_source

    if isinstance(risk, bool) or not isinstance(risk, (int, float)) or not math.isfinite(risk) or risk < 0:
        raise ValueError(f"risk must be a finite number >= 0, got {risk!r}")
    positive_int("batch_size", batch_size)
    scorer = load_source(source, **http_kwargs)
    if differentiable and not callable(getattr(scorer, "reward_stats", None)):
        raise TypeError(f"differentiable=True needs a local PyTorch model (a model directory or a ZRewardModel); "
                        f"{type(scorer).__name__} gives no gradients to the pixels")
    known = tuple(getattr(scorer, "dimensions", None) or DIMENSIONS)
    dims = tuple(dimensions) if dimensions is not None else known
    unknown = [d for d in dims if d not in known]
    if unknown or not dims:
        raise ValueError(f"unknown dimension(s) {unknown}; this model scores {list(known)}")
    return RewardFunction(scorer, dims, _weights(dims, weights), float(risk), batch_size, differentiable, known)


def reference_statistics(source: Any, seed: int = 0, pairs: int = 128, size: int = 128,
                         batch_size: int = 16) -> dict[str, dict[str, float]]:
    """Mean and std over the synthetic benchmark's images of each dimension's predicted mean, for
    users who normalise rewards across several reward models (``(reward - mean) / std``).

    The images are both sides of ``pairs`` benchmark pairs of ``seed`` (zreward_fast.evaluation):
    every dimension at every gap, so the statistics cover the whole score range."""
    from ..evaluation import _benchmark, load_source
    from ..training.synthetic import GAPS

    scorer = load_source(source)
    bench, _ = _benchmark(seed, pairs, 0, GAPS, size)
    images = [im for p in bench for im in p.images]
    prompts = [p.prompt for p in bench for _ in p.images]
    results = scorer.score(images, prompts, None, batch_size=batch_size)
    dims = list(results[0]) if results else []
    out = {}
    for d in dims:
        v = np.array([r[d].mean for r in results], dtype=np.float64)
        out[d] = {"mean": float(v.mean()), "std": float(v.std()), "images": int(v.size)}
    return out
