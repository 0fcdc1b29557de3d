"""The score scale: the K levels a distribution is read over, and the per-dimension result.

Torch-free on purpose: the runtime imports it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class ScoreScale:
    """Levels of the score distribution, strictly increasing.

    The default is Z-Reward's 9 half-point levels ``0.0, 0.5, ..., 4.0``; :meth:`paper` gives the
    paper's ``1.0 ... 5.0``.
    """

    levels: tuple[float, ...] = tuple(i * 0.5 for i in range(9))

    def __post_init__(self) -> None:
        try:
            levels = tuple(float(x) for x in self.levels)
        except (TypeError, ValueError) as e:
            raise ValueError(f"ScoreScale levels must be numbers, got {self.levels!r}") from e
        if len(levels) < 2:
            raise ValueError(f"ScoreScale needs at least 2 levels, got {len(levels)}")
        if not all(math.isfinite(x) for x in levels):
            raise ValueError(f"ScoreScale levels must be finite, got {levels}")
        for a, b in zip(levels, levels[1:]):
            if not b > a:
                raise ValueError(f"ScoreScale levels must be strictly increasing, got {levels}")
        object.__setattr__(self, "levels", levels)

    @classmethod
    def paper(cls) -> "ScoreScale":
        """The paper's scale: 1.0 to 5.0 in half points."""
        return cls(tuple(1.0 + i * 0.5 for i in range(9)))

    @classmethod
    def uniform(cls, low: float, high: float, num: int) -> "ScoreScale":
        if num < 2:
            raise ValueError(f"a scale needs at least 2 levels, got {num}")
        step = (high - low) / (num - 1)
        return cls(tuple(low + i * step for i in range(num)))

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def min(self) -> float:
        return self.levels[0]

    @property
    def max(self) -> float:
        return self.levels[-1]

    @property
    def range(self) -> float:
        """``R = S_max - S_min``: the normaliser of the GDSO rewards."""
        return self.levels[-1] - self.levels[0]

    def token(self, level: float) -> str:
        """The special token of one level, e.g. ``<|score_2.5|>``."""
        return f"<|score_{float(level)!r}|>"  # 2.0 -> "2.0", 2.25 -> "2.25": stable names

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(self.token(x) for x in self.levels)

    def nearest(self, score: float) -> int:
        """Index of the level nearest to ``score`` (ties go to the lower level)."""
        if not math.isfinite(score):
            raise ValueError(f"score must be finite, got {score}")
        return min(range(len(self.levels)), key=lambda k: (abs(self.levels[k] - score), k))

    def to_dict(self) -> dict:
        return {"levels": list(self.levels)}

    @classmethod
    def from_dict(cls, d: dict) -> "ScoreScale":
        if not isinstance(d, dict) or "levels" not in d:
            raise ValueError(f"a scale is stored as {{'levels': [...]}}, got {d!r}")
        return cls(tuple(d["levels"]))


@dataclass(frozen=True)
class ScoreResult:
    """One dimension's score: the distribution's mean, standard deviation and probabilities."""

    mean: float
    std: float
    probs: tuple[float, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "probs": list(self.probs)}


def result_from_probs(probs: Sequence[float], scale: ScoreScale) -> ScoreResult:
    """Mean and std of a distribution over the scale's levels."""
    if len(probs) != scale.num_levels:
        raise ValueError(f"expected {scale.num_levels} probabilities, got {len(probs)}")
    mean = sum(p * s for p, s in zip(probs, scale.levels))
    var = sum(p * (s - mean) ** 2 for p, s in zip(probs, scale.levels))
    return ScoreResult(float(mean), float(math.sqrt(max(var, 0.0))), tuple(float(p) for p in probs))
