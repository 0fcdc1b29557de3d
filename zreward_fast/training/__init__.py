"""Training: data formats, synthetic data and benchmark pairs, the teacher cold start, the GDSO
teacher and RISD student trainers, the scalar Bradley-Terry baseline, metrics.

Heavy modules (trainers) import torch/transformers/accelerate; import them directly
(``from zreward_fast.training.risd import RISDTrainer``) or through the lazy names here.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ScoredRecord": "data", "PairRecord": "data", "RISDRecord": "data", "read_manifest": "data",
    "write_manifest": "data", "write_synthetic_dataset": "data",
    "evaluate_pairs": "metrics", "hpa": "metrics", "plcc": "metrics", "srcc": "metrics",
    "RISDTrainer": "risd", "RISDConfig": "risd",
    "GDSOTrainer": "gdso", "GDSOConfig": "gdso", "HFRolloutEngine": "rollouts", "RolloutEngine": "rollouts",
    "label_risd_targets": "labelling",
    "ColdStartTrainer": "coldstart", "ColdStartConfig": "coldstart", "ReasoningRecord": "coldstart",
    "ScalarRewardModel": "scalar", "ScalarTrainer": "scalar", "ScalarConfig": "scalar",
    "benchmark_pairs": "synthetic", "conflict_pairs": "synthetic", "training_pairs": "synthetic",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
