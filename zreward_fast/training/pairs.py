"""Pairs of synthetic images with known scores: the benchmark (:func:`benchmark_pairs`,
:func:`conflict_pairs`) and pairwise training data (:func:`training_pairs`); docs/synthetic.md.

Every pair is drawn from a seed stream of its own (a tag, the seed, the pair's index), apart from
the integer seeds of :func:`~.synthetic.make_sample`, so a held-out benchmark seed is truly unseen.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

from ..dimensions import DIMENSIONS, resolve_dimensions
from .synthetic import GAPS, MAX_SCORE, Scene, degrade, random_scene, render

# Seed streams: a benchmark pair i of seed s comes from default_rng([_BENCHMARK, s, i]); training
# samples from default_rng(int). An int seed's entropy never equals a 3-word list led by a tag.
_BENCHMARK, _CONFLICT, _TRAIN_PAIRS = 0x5EED_BE7C, 0x5EED_C0F1, 0x5EED_7A15


@dataclass
class BenchmarkPair:
    """Two images of one prompt with their known scores.

    A benchmark pair differs by ``gap`` on ``dimension`` only. A conflict pair's first image is
    better by ``gap`` on ``dimension`` and worse by ``other_gap`` on ``other``.
    """

    images: tuple[Image.Image, Image.Image]
    prompt: str
    dimension: str
    gap: float
    scores: tuple[dict[str, float], dict[str, float]]
    other: str | None = None
    other_gap: float = 0.0
    scenes: tuple[Scene, Scene] | None = field(default=None, repr=False)


def _pair_scenes(rng: np.random.Generator, dim: str, gap: float, other: str | None = None,
                 other_gap: float = 0.0) -> tuple[Scene, Scene]:
    """(better on ``dim`` by ``gap``, worse) sharing one prompt; with ``other``, the first is also
    worse on ``other`` by ``other_gap``. The base scores are random, so neither image is clean."""
    for _ in range(1000):
        target = {d: float(rng.integers(0, 9)) / 2.0 for d in DIMENSIONS}
        target[dim] = float(rng.integers(int(gap * 2), 9)) / 2.0
        if other is not None:
            target[other] = float(rng.integers(int(other_gap * 2), 9)) / 2.0
        base = random_scene(rng, target)
        worse = degrade(rng, base, dim, gap)
        if worse is None:
            continue
        if other is None:
            return base, worse
        better = degrade(rng, base, other, other_gap)
        if better is not None:
            return better, worse
    raise RuntimeError(f"could not draw a pair on {dim} with gap {gap}")


def _check_gaps(gaps: Sequence[float]) -> tuple[float, ...]:
    gaps = tuple(float(g) for g in gaps)
    if not gaps or any(g <= 0 or g > MAX_SCORE or g * 2 != int(g * 2) for g in gaps):
        raise ValueError(f"gaps must be positive multiples of 0.5 up to {MAX_SCORE}, got {gaps}")
    return gaps


def benchmark_pairs(
    seed: int, n: int, gaps: Sequence[float] = GAPS, dimensions: Sequence[str] = DIMENSIONS, size: int = 128,
) -> list[BenchmarkPair]:
    """``n`` pairs of one prompt that differ by a known gap on one dimension, the other three equal;
    spread evenly over the dimensions, then the gaps. Which image is better is random."""
    dims, gaps = resolve_dimensions(dimensions), _check_gaps(gaps)
    out = []
    for i in range(n):
        rng = np.random.default_rng([_BENCHMARK, seed, i])
        dim, gap = dims[i % len(dims)], gaps[(i // len(dims)) % len(gaps)]
        a, b = _pair_scenes(rng, dim, gap)
        if rng.random() < 0.5:
            a, b = b, a
        out.append(BenchmarkPair((render(a, size), render(b, size)), a.prompt(), dim, gap,
                                 (a.scores(), b.scores()), scenes=(a, b)))
    return out


def training_pairs(seed: int, n: int, gaps: Sequence[float] = GAPS, size: int = 128,
                   vary_others: bool = True) -> list[BenchmarkPair]:
    """Pairs drawn like :func:`benchmark_pairs` (random bases, every gap, labelled on one
    dimension) from a stream of their own: training data for pairwise methods (GDSO,
    Bradley-Terry) that no benchmark seed repeats.

    With ``vary_others`` (the default) each other dimension differs between the two images with
    probability 1/2 (one side, drawn at random, worse by a random gap), as two generations for one
    prompt do in annotated preference data. Held equal (``False``, the benchmark's pairs), every
    pair is won by whichever image is less degraded on any dimension, and a model trained on them
    learns one overall quality: the reproduce GDSO teacher's conflict accuracy fell from 0.50 to
    0.06 (docs/synthetic.md)."""
    gaps = _check_gaps(gaps)
    out = []
    for i in range(n):
        rng = np.random.default_rng([_TRAIN_PAIRS, seed, i])
        dim, gap = DIMENSIONS[i % len(DIMENSIONS)], gaps[(i // len(DIMENSIONS)) % len(gaps)]
        a, b = _pair_scenes(rng, dim, gap)
        if vary_others:
            a, b = _vary_others(rng, a, b, dim, gaps)
        out.append(BenchmarkPair((render(a, size), render(b, size)), a.prompt(), dim, gap,
                                 (a.scores(), b.scores()), scenes=(a, b)))
    return out


def _vary_others(rng: np.random.Generator, a: Scene, b: Scene, dim: str, gaps: tuple[float, ...]) -> tuple[Scene, Scene]:
    """``a`` and ``b`` with each dimension but ``dim`` degraded on one random side with probability
    1/2 (a side with no room for the drawn gap keeps its level)."""
    for other in DIMENSIONS:
        if other == dim or rng.random() < 0.5:
            continue
        gap = float(rng.choice(gaps))
        if rng.random() < 0.5:
            a = degrade(rng, a, other, gap) or a
        else:
            b = degrade(rng, b, other, gap) or b
    return a, b


def conflict_pairs(seed: int, n: int, gaps: Sequence[float] = GAPS, size: int = 128) -> list[BenchmarkPair]:
    """``n`` pairs where the first image is better on one dimension and worse on another, by known
    gaps (a scalar reward must get one of the two wrong). Spread over the 12 ordered pairs of
    dimensions."""
    gaps = _check_gaps(gaps)
    combos = [(x, y) for x in DIMENSIONS for y in DIMENSIONS if x != y]
    out = []
    for i in range(n):
        rng = np.random.default_rng([_CONFLICT, seed, i])
        dim, other = combos[i % len(combos)]
        gap, other_gap = (float(rng.choice(gaps)) for _ in range(2))
        a, b = _pair_scenes(rng, dim, gap, other, other_gap)
        out.append(BenchmarkPair((render(a, size), render(b, size)), a.prompt(), dim, gap,
                                 (a.scores(), b.scores()), other, other_gap, scenes=(a, b)))
    return out
