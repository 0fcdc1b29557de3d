"""Parity of an exported (possibly quantized) bundle against the fp32 PyTorch model.

Pure numpy on score distributions ``[N, D, K]`` (N items, D dimensions, K levels), so the same
functions judge ONNX, TensorRT or any other back end. What a reward model's user cares about is
its ranking and its mean score, so beyond |delta mu| and KL the report measures argmax agreement
and, above all, *pairwise preference agreement*: on held-out pairs (i, j), does the test model
prefer the same image as the reference? Every value is a plain float/int (JSON for the manifest).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

#: Acceptance thresholds per quantization mode. Upper bounds: ``mean_abs_dmu``, ``max_abs_dmu``,
#: ``mean_kl``, ``max_kl``; lower bounds: ``argmax_agreement``, ``pair_agreement``.
#:
#: * ``none`` (fp32 ONNX): the graph computes the same function, so every mean agrees within 1e-3
#:   (max |delta mu| <= 1e-3 on a 0..4 scale: float reassociation only).
#: * int8 (dynamic or static): mean |delta mu| <= 0.05 (1/10 of a scale step of 0.5; the design's
#:   CPU target) and >= 98% of all held-out preference pairs keep their order (pooled over the
#:   dimensions, each pair compared on the dimension it differs on): quantization noise may move
#:   scores a little but must not reorder the images it ranks. The per-dimension agreement is in
#:   the report too (``pair_agreement`` thresholds it per dimension when a caller asks for that).
#: * ``fp8`` (e4m3, 3 mantissa bits): the same bar as int8.
#: A held-out pair counts as a preference of the reference when its two means differ by more than
#: this (0..4 scale): a smaller margin is below any rating's resolution, and flips of such near-ties
#: are noise, not a reordering (a dimension the model has not learned is all near-ties). The gate's
#: reports record how many pairs were compared, so a model with no preferences cannot pass unseen.
PARITY_TIE_TOL = 0.01

#: The gate of every reduced-precision form: the quantized bundles, and a bundle computed at a
#: lower precision than it was exported in (OpenVINO's bf16, checked by the runtime ``Scorer``).
REDUCED_PRECISION_THRESHOLDS: dict[str, float] = {"mean_abs_dmu": 0.05, "pair_agreement_pooled": 0.98}

DEFAULT_THRESHOLDS: dict[str, dict[str, float]] = {
    "none": {"mean_abs_dmu": 1e-3, "max_abs_dmu": 1e-3},
    **{m: dict(REDUCED_PRECISION_THRESHOLDS) for m in ("int8-dynamic", "int8-static", "int8-weight",
                                                        "int4-weight", "fp8")},
}

#: The bundle file holding the fp32 PyTorch model's score distributions ``[2 * pairs, D, K]`` on
#: :func:`held_out_pairs` (float32 ``.npy``): the reference a runtime precision is checked against.
REFERENCE_NAME = "parity_reference.npy"
HELD_OUT_SEED, HELD_OUT_SIZE = 12345, 128

_UPPER = {"mean_abs_dmu": "mean |Δμ|", "max_abs_dmu": "max |Δμ|", "mean_kl": "mean KL", "max_kl": "max KL"}
_LOWER = {"argmax_agreement": "argmax agreement", "pair_agreement": "pairwise agreement",
          "pair_agreement_pooled": "pooled pairwise agreement"}
_OVERALL_ONLY = {"pair_agreement_pooled"}
_KL_EPS = 1e-12


def _as_probs(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 3:
        raise ValueError(f"{name} must be [N, D, K] probabilities, got shape {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError(f"{name} has negative or non-finite values: pass probabilities "
                         "(exp of the graph's log_probs), not log-probabilities")
    sums = a.sum(-1)
    if a.size and np.max(np.abs(sums - 1.0)) > 1e-3:
        worst = sums.flat[np.argmax(np.abs(sums - 1.0))]
        raise ValueError(f"{name} rows must sum to 1 over K (worst row sums to {worst:.6g}); "
                         "pass probabilities, not log-probabilities")
    return a


def held_out_pairs(num_pairs: int, seed: int = HELD_OUT_SEED, size: int = HELD_OUT_SIZE
                   ) -> tuple[list, list[str], dict[str, list]]:
    """Synthetic clean/degraded pairs, rotating over the dimensions: images, prompts, and per
    dimension the index pairs that differ on it (by 1, 2 or 3 points). Deterministic, and the
    first ``n`` pairs of a longer list are ``held_out_pairs(n)``. numpy and PIL only: the torch-free
    runtime draws them too."""
    from ..dimensions import DIMENSIONS
    from ..training.synthetic import degraded_pair

    images, prompts, pairs = [], [], {d: [] for d in DIMENSIONS}
    for i in range(num_pairs):
        dim = DIMENSIONS[i % len(DIMENSIONS)]
        clean, bad = degraded_pair(seed + i, dim, size, drop=1.0 + (i // len(DIMENSIONS)) % 3)
        pairs[dim].append((len(images), len(images) + 1))
        images += [clean.image, bad.image]
        prompts += [clean.prompt, bad.prompt]
    return images, prompts, pairs


def parity_report(
    ref_probs: Any,
    test_probs: Any,
    levels: Sequence[float] | np.ndarray,
    dimensions: Sequence[str],
    pairs: Sequence[tuple[int, int]] | Mapping[str, Sequence[tuple[int, int]]] = (),
    *,
    tie_tol: float = 0.0,
) -> dict[str, Any]:
    """Compare test distributions with reference ones, per dimension and overall (worst case).

    Per dimension: ``mean_abs_dmu``/``max_abs_dmu`` (|mu_ref - mu_test| with mu = sum_k p_k s_k),
    ``mean_kl``/``max_kl`` (KL(ref || test), 0 log 0 = 0, test clamped at 1e-12),
    ``argmax_agreement``, and on ``pairs`` of item indices: ``pair_agreement`` (share of pairs
    whose preference sign(mu[i] - mu[j]) is the same in both; pairs tied in the reference are
    left out), ``pairs_compared`` and ``pairs_tied``. ``pair_agreement`` is None when no untied
    pair was compared. ``tie_tol`` widens "tied" to |mu_ref[i] - mu_ref[j]| <= tie_tol: preferences
    the reference itself barely expresses are noise, not signal (an untrained model's are all
    near-ties). ``pairs`` may also map a dimension to its own pairs (held-out pairs that differ on
    that dimension). ``overall`` takes the worst value of each metric over dimensions, and adds
    ``pair_agreement_pooled`` over every comparison of every dimension.
    """
    ref = _as_probs(ref_probs, "ref_probs")
    test = _as_probs(test_probs, "test_probs")
    if ref.shape != test.shape:
        raise ValueError(f"ref_probs {ref.shape} and test_probs {test.shape} differ in shape")
    n, d, k = ref.shape
    lv = np.asarray(levels, dtype=np.float64).reshape(-1)
    if lv.shape != (k,):
        raise ValueError(f"levels has {lv.size} values, the distributions have K={k}")
    dims = [str(x) for x in dimensions]
    if len(dims) != d:
        raise ValueError(f"{len(dims)} dimension names for D={d} dimensions")
    if not tie_tol >= 0.0:
        raise ValueError(f"tie_tol must be >= 0, got {tie_tol}")
    if isinstance(pairs, Mapping):
        unknown = set(pairs) - set(dims)
        if unknown:
            raise ValueError(f"pairs name unknown dimensions {sorted(unknown)}")
        pair_sets = {name: _as_pairs(pairs.get(name, ()), n) for name in dims}
    else:
        shared = _as_pairs(pairs, n)
        pair_sets = {name: shared for name in dims}
    agreeing_total = compared_total = 0

    mu_ref, mu_test = ref @ lv, test @ lv  # [N, D]
    dmu = np.abs(mu_ref - mu_test)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(ref > 0, ref * (np.log(np.where(ref > 0, ref, 1.0)) - np.log(np.maximum(test, _KL_EPS))), 0.0)
    kl = np.maximum(terms.sum(-1), 0.0)  # [N, D]; clamp float noise below zero
    agree = ref.argmax(-1) == test.argmax(-1)

    per_dim: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(dims):
        block: dict[str, Any] = {
            "mean_abs_dmu": float(dmu[:, j].mean()) if n else 0.0,
            "max_abs_dmu": float(dmu[:, j].max()) if n else 0.0,
            "mean_kl": float(kl[:, j].mean()) if n else 0.0,
            "max_kl": float(kl[:, j].max()) if n else 0.0,
            "argmax_agreement": float(agree[:, j].mean()) if n else 1.0,
        }
        pr = pair_sets[name]
        if len(pr):
            d_ref = mu_ref[pr[:, 0], j] - mu_ref[pr[:, 1], j]
            s_ref = np.sign(d_ref)
            s_test = np.sign(mu_test[pr[:, 0], j] - mu_test[pr[:, 1], j])
            untied = (s_ref != 0) & (np.abs(d_ref) > tie_tol)
            compared = int(untied.sum())
            block["pair_agreement"] = float((s_ref[untied] == s_test[untied]).mean()) if compared else None
            block["pairs_compared"] = compared
            agreeing_total += int((s_ref[untied] == s_test[untied]).sum())
            compared_total += compared
            block["pairs_tied"] = int(len(pr) - compared)
        else:
            block.update(pair_agreement=None, pairs_compared=0, pairs_tied=0)
        per_dim[name] = block

    blocks = list(per_dim.values())
    pair_values = [b["pair_agreement"] for b in blocks if b["pair_agreement"] is not None]
    overall: dict[str, Any] = {
        "mean_abs_dmu": max((b["mean_abs_dmu"] for b in blocks), default=0.0),
        "max_abs_dmu": max((b["max_abs_dmu"] for b in blocks), default=0.0),
        "mean_kl": max((b["mean_kl"] for b in blocks), default=0.0),
        "max_kl": max((b["max_kl"] for b in blocks), default=0.0),
        "argmax_agreement": min((b["argmax_agreement"] for b in blocks), default=1.0),
        "pair_agreement": min(pair_values) if pair_values else None,
        "pairs_compared": min((b["pairs_compared"] for b in blocks), default=0),
        "pair_agreement_pooled": agreeing_total / compared_total if compared_total else None,
    }
    return {"items": int(n), "levels": [float(x) for x in lv], "tie_tol": float(tie_tol), "dimensions": per_dim,
            "overall": overall}


def _as_pairs(pairs: Sequence[tuple[int, int]], n: int) -> np.ndarray:
    pr = np.asarray(list(pairs), dtype=np.int64).reshape(-1, 2) if len(pairs) else np.zeros((0, 2), np.int64)
    if pr.size and (pr.min() < 0 or pr.max() >= n):
        raise ValueError(f"pair indices must be in [0, {n}), got range [{pr.min()}, {pr.max()}]")
    return pr


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def check_thresholds(report: Mapping[str, Any], thresholds: Mapping[str, float] | str) -> list[str]:
    """Human-readable failures of ``report`` against ``thresholds`` (empty when it passes).

    ``thresholds`` maps metric -> bound (see :data:`DEFAULT_THRESHOLDS`; a mode name looks its
    defaults up). Every dimension is checked, e.g. ``"realism: mean |Δμ| 0.071 > 0.05"``. A pair
    threshold with no untied pair compared fails: the bundle could not show it keeps rankings.
    """
    if isinstance(thresholds, str):
        if thresholds not in DEFAULT_THRESHOLDS:
            raise ValueError(f"unknown mode {thresholds!r}; known: {sorted(DEFAULT_THRESHOLDS)}")
        thresholds = DEFAULT_THRESHOLDS[thresholds]
    unknown = set(thresholds) - set(_UPPER) - set(_LOWER)
    if unknown:
        raise ValueError(f"unknown threshold metrics {sorted(unknown)}; known: {sorted({**_UPPER, **_LOWER})}")
    dims = report.get("dimensions")
    if not isinstance(dims, Mapping):
        raise ValueError("report has no 'dimensions' block: pass the output of parity_report")
    failures: list[str] = []
    for metric in _OVERALL_ONLY & set(thresholds):
        value, bound = report.get("overall", {}).get(metric), thresholds[metric]
        if value is None:
            failures.append(f"all dimensions: {_LOWER[metric]} not measured (no untied pairs)")
        elif value < bound:
            failures.append(f"all dimensions: {_LOWER[metric]} {_fmt(value)} < {_fmt(bound)}")
    for dim, block in dims.items():
        for metric, bound in thresholds.items():
            if metric in _OVERALL_ONLY:
                continue
            value = block.get(metric)
            label = _UPPER.get(metric) or _LOWER[metric]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                failures.append(f"{dim}: {label} not measured (no untied pairs)" if metric == "pair_agreement"
                                else f"{dim}: {label} not measured")
            elif metric in _UPPER and value > bound:
                failures.append(f"{dim}: {label} {_fmt(value)} > {_fmt(bound)}")
            elif metric in _LOWER and value < bound:
                failures.append(f"{dim}: {label} {_fmt(value)} < {_fmt(bound)}")
    return failures


__all__ = ["DEFAULT_THRESHOLDS", "check_thresholds", "parity_report"]
