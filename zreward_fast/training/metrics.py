"""The paper's evaluation metrics: HPA, margin HPA, PLCC and SRCC.

HPA (human preference accuracy): over pairs of images of the same prompt whose labels differ, the
share whose predicted means order them the same way (a predicted tie counts as half). Margin HPA
counts only pairs whose labels differ by more than ``margin`` (0.5).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
from scipy import stats


def _pairs(prompts: Sequence[str], labels: Sequence[float], preds: Sequence[float], margin: float):
    groups: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[p].append(i)
    for idx in groups.values():
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                i, j = idx[a], idx[b]
                if abs(labels[i] - labels[j]) > margin:
                    yield i, j


def hpa(prompts: Sequence[str], labels: Sequence[float], preds: Sequence[float], margin: float = 0.0) -> float:
    """Pairwise preference accuracy over same-prompt pairs with labels more than ``margin`` apart."""
    if not (len(prompts) == len(labels) == len(preds)):
        raise ValueError("prompts, labels and preds must have the same length")
    hits, total = 0.0, 0
    for i, j in _pairs(prompts, labels, preds, margin):
        total += 1
        dl, dp = labels[i] - labels[j], preds[i] - preds[j]
        hits += 0.5 if dp == 0 else float((dl > 0) == (dp > 0))
    return hits / total if total else float("nan")


def plcc(labels: Sequence[float], preds: Sequence[float]) -> float:
    if len(labels) < 2 or np.std(labels) == 0 or np.std(preds) == 0:
        return float("nan")
    return float(stats.pearsonr(labels, preds).statistic)


def srcc(labels: Sequence[float], preds: Sequence[float]) -> float:
    if len(labels) < 2 or np.std(labels) == 0 or np.std(preds) == 0:
        return float("nan")
    return float(stats.spearmanr(labels, preds).statistic)


def evaluate_pairs(prompts: Sequence[str], labels: Sequence[float], preds: Sequence[float]) -> dict[str, float]:
    """All four metrics for one dimension."""
    return {
        "hpa": hpa(prompts, labels, preds, 0.0),
        "margin_hpa": hpa(prompts, labels, preds, 0.5),
        "plcc": plcc(labels, preds),
        "srcc": srcc(labels, preds),
        "n": float(len(labels)),
    }

