"""zreward-fast: fused kernels, export and a torch-free runtime for Z-Reward-style reward models.

Torch-free names (scale, dimensions, prompts) import eagerly; the torch-backed ones load on first
use, so ``import zreward_fast.runtime`` never pulls torch into a serving process.
"""
from __future__ import annotations

import importlib
from typing import Any

from .dimensions import DIMENSIONS, query_token
from .prompting import PromptFormat
from .scale import ScoreResult, ScoreScale

__version__ = "0.1.0"

_LAZY = {
    "ZRewardModel": "zreward_fast.modeling",
    "ZRewardProcessor": "zreward_fast.processing",
    "ZRewardBatch": "zreward_fast.processing",
    "add_score_tokens": "zreward_fast.tokens",
    "testing": "zreward_fast.testing",
    "kernels": "zreward_fast.kernels",
    "reference": "zreward_fast.reference",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = module if module.__name__.endswith("." + name) else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'zreward_fast' has no attribute {name!r}")


__all__ = ["DIMENSIONS", "PromptFormat", "ScoreResult", "ScoreScale", "query_token", *_LAZY]
