"""The synthetic benchmark: measure any reward model on pairs whose scores are known.

``evaluate(source, seed=..., pairs=...)`` scores :func:`~zreward_fast.training.pairs.benchmark_pairs`
(two images of one prompt, a known gap on one dimension, the other three equal) and
:func:`~zreward_fast.training.pairs.conflict_pairs` (the first image better on one dimension and
worse on another) and returns (docs/evaluation.md):

- ``hpa``: overall pairwise accuracy on the benchmark pairs (a predicted tie counts half), with
  ``gaps`` (HPA per gap) and ``margin_hpa`` (pairs more than 0.5 apart);
- ``conflict_accuracy``: the share of conflict pairs ordered right on *both* dimensions (a tie
  counts half on its dimension; the two halves multiply). One scalar per image gets at most one
  of the two right, so a scalar reward model scores 0 here unless it ties;
- per dimension (``dimensions[d]``): ``hpa``, ``margin_hpa``, ``gaps``, ``plcc`` and ``srcc`` of the
  predicted means against the known scores of every image scored, and the calibration of the
  distributions: ``nll`` (mean -log q of the known level) and ``ece`` (expected calibration error
  of the most likely level, 10 confidence bins); NaN for sources without distributions;
- ``cost``: forward passes and generated tokens per image to score all four dimensions.

A source is a model or bundle directory, a :class:`~zreward_fast.ZRewardModel` (the student
format, or the teacher's with ``teacher=True``: it reasons, then scores), a ``TorchEngine``, a
runtime ``Scorer``, or anything with ``score(images, prompts, dimensions) -> [{dim: ScoreResult}]``.
"""
from __future__ import annotations

import functools
import math
import os
import time
from collections import defaultdict
from typing import Any, Sequence

import numpy as np

from .dimensions import DIMENSIONS
from .training.metrics import plcc, srcc
from .training.pairs import BenchmarkPair, benchmark_pairs, conflict_pairs
from .training.synthetic import GAPS

ECE_BINS = 10


class TeacherScorer:
    """A reasoning teacher behind the ``score`` interface: one reasoning per image and dimension,
    then the distribution at the query token after it. Counts the reasoning tokens it generates."""

    def __init__(self, rm: Any, engine: Any | None = None, num_samples: int = 1, max_new_tokens: int = 64,
                 temperature: float = 1.0, greedy: bool = True) -> None:
        from .training.teacher import default_engine

        self.rm = rm
        self.engine = engine or default_engine(rm, max_new_tokens, temperature, do_sample=not greedy)
        self.num_samples = num_samples
        self.scored = 0
        self.generated_tokens = 0.0

    def score(self, images: Sequence[Any], prompts: Sequence[str], dimensions: Sequence[str] | str | None = None,
              batch_size: int = 32) -> list[dict[str, Any]]:
        from .dimensions import resolve_dimensions
        from .scale import result_from_probs
        from .training.labelling import teacher_outputs

        dims = resolve_dimensions(dimensions, self.rm.dimensions)
        out: list[dict[str, Any]] = [{} for _ in images]
        for start in range(0, len(images), batch_size):
            imgs, prs = list(images[start : start + batch_size]), list(prompts[start : start + batch_size])
            for d in dims:
                probs, lengths = teacher_outputs(self.rm, imgs, prs, [d] * len(imgs), self.engine, self.num_samples)
                self.generated_tokens += float(lengths.sum())
                for i, p in enumerate(probs.tolist()):
                    out[start + i][d] = result_from_probs(p, self.rm.scale)
            self.scored += len(imgs) * len(dims)
        return out

    def cost(self) -> dict[str, float]:
        per_dim = self.generated_tokens / max(self.scored, 1)
        return {"forward_passes_per_image": float(len(DIMENSIONS)),
                "generated_tokens_per_image": per_dim * len(DIMENSIONS)}


def load_source(source: Any, teacher: bool = False, revision: str | None = None, local_files_only: bool = False,
                **kwargs: Any) -> Any:
    """Something with ``score(images, prompts, dimensions)`` for a directory or hub repo id (of a
    model or bundle; ``revision`` pins the repo, ``local_files_only`` reads the hub cache only), a
    model, a scorer or the URL of a running server (``kwargs`` go to the runtime ``Scorer`` of a
    bundle, e.g. ``backend="openvino", precision="bf16"``; to the ``TeacherScorer`` with
    ``teacher``; or to the ``HTTPScorer`` of a URL)."""
    from .hub import resolve
    from .modeling import ZRewardModel

    if isinstance(source, str) and source.startswith(("http://", "https://")):
        from .integrations.http_client import HTTPScorer

        return HTTPScorer(source, **kwargs)
    path = resolve(source, revision, local_files_only) if isinstance(source, (str, os.PathLike)) else None
    if path is not None and (path / "manifest.json").is_file():
        from .runtime import Scorer

        if teacher:
            raise ValueError(f"{path} is a bundle (a one-pass student); a reasoning teacher is a model directory")
        return Scorer(path, **kwargs)
    if kwargs and not teacher:
        raise TypeError(f"unexpected arguments {sorted(kwargs)} for a {type(source).__name__} source")
    if path is not None:
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is neither a model directory nor a bundle")
        source = ZRewardModel.from_pretrained(path)
    if isinstance(source, ZRewardModel):
        source.eval()
        return TeacherScorer(source, **kwargs) if teacher else source
    if not callable(getattr(source, "score", None)):
        raise TypeError(f"cannot evaluate a {type(source).__name__}: give a model or bundle directory, a "
                        "ZRewardModel, a TorchEngine, a Scorer or an object with score(images, prompts, dimensions)")
    return source


def _pref(a: float, b: float) -> float:
    """1 if a > b, 0.5 on a tie, 0 otherwise."""
    return 0.5 if a == b else float(a > b)


def _calibration(probs: list[Sequence[float]], known: list[float], levels: Sequence[float]) -> tuple[float, float]:
    """Mean NLL of the known level and the expected calibration error of the most likely level."""
    if not probs or any(len(p) != len(levels) for p in probs):
        return float("nan"), float("nan")
    q = np.asarray(probs, np.float64)
    truth = np.array([int(np.argmin([abs(s - k) for s in levels])) for k in known])
    nll = float(-np.log(np.clip(q[np.arange(len(q)), truth], 1e-12, None)).mean())
    conf, pred = q.max(1), q.argmax(1)
    bins = np.minimum((conf * ECE_BINS).astype(int), ECE_BINS - 1)
    ece = 0.0
    for b in range(ECE_BINS):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(float((pred[m] == truth[m]).mean()) - float(conf[m].mean()))
    return nll, float(ece)


@functools.lru_cache(maxsize=1)
def _benchmark(seed: int, pairs: int, conflicts: int, gaps: tuple[float, ...], size: int) -> tuple[tuple, tuple]:
    """The benchmark and conflict pairs of one draw, kept for the next model evaluated on it (a
    ``reproduce`` run evaluates every model on the same draw; PIL images are never modified here)."""
    return (tuple(benchmark_pairs(seed, pairs, gaps, size=size)),
            tuple(conflict_pairs(seed, conflicts, gaps, size=size)))


def _score_items(scorer: Any, items: list[tuple[Any, str, str]], batch_size: int, progress: bool) -> list[Any]:
    """Score (image, prompt, dimension) items, one call per dimension."""
    from tqdm.auto import tqdm

    out: list[Any] = [None] * len(items)
    by_dim: dict[str, list[int]] = defaultdict(list)
    for i, (_, _, d) in enumerate(items):
        by_dim[d].append(i)
    bar = tqdm(total=len(items), desc="evaluate", disable=not progress)
    for d, idx in by_dim.items():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            res = scorer.score([items[i][0] for i in chunk], [items[i][1] for i in chunk], [d])
            for i, r in zip(chunk, res):
                out[i] = r[d]
            bar.update(len(chunk))
    bar.close()
    return out


def evaluate(
    source: Any,
    seed: int = 0,
    pairs: int = 128,
    conflicts: int | None = None,
    gaps: Sequence[float] = GAPS,
    teacher: bool = False,
    batch_size: int = 32,
    size: int = 128,
    progress: bool = False,
    **source_kwargs: Any,
) -> dict[str, Any]:
    """Benchmark ``source`` on ``pairs`` benchmark pairs and ``conflicts`` conflict pairs (default
    ``pairs // 4``) drawn with ``seed``; see the module docstring for what is returned.
    ``source_kwargs`` go to :func:`load_source` (e.g. ``backend="openvino", precision="bf16"`` for a
    bundle, ``max_new_tokens`` for a teacher)."""
    if pairs < len(DIMENSIONS):
        raise ValueError(f"pairs must be at least {len(DIMENSIONS)} (one per dimension), got {pairs}")
    conflicts = pairs // 4 if conflicts is None else conflicts
    scorer = load_source(source, teacher, **source_kwargs)
    t0 = time.perf_counter()
    bench, conf = _benchmark(seed, pairs, conflicts, tuple(gaps), size)
    items: list[tuple[Any, str, str]] = []
    for p in bench:
        items += [(p.images[0], p.prompt, p.dimension), (p.images[1], p.prompt, p.dimension)]
    for p in conf:
        for d in (p.dimension, p.other):
            items += [(p.images[0], p.prompt, d), (p.images[1], p.prompt, d)]
    results = _score_items(scorer, items, batch_size, progress)
    report = summarize(bench, conf, results, _levels(scorer))
    report.update(seed=seed, seconds=time.perf_counter() - t0)
    cost = getattr(scorer, "cost", None)
    report["cost"] = cost() if callable(cost) else {"forward_passes_per_image": 1.0, "generated_tokens_per_image": 0.0}
    return report


def _levels(scorer: Any) -> tuple[float, ...]:
    scale = getattr(scorer, "scale", None) or getattr(getattr(scorer, "rm", None), "scale", None)
    if scale is None:
        from .scale import ScoreScale

        scale = ScoreScale()
    return tuple(scale.levels)


def summarize(bench: Sequence[BenchmarkPair], conf: Sequence[BenchmarkPair], results: Sequence[Any],
              levels: Sequence[float]) -> dict[str, Any]:
    """Metrics from the results of :func:`evaluate`'s item order (each pair's two images on its
    dimension; then each conflict pair's two images on its first, then its other dimension)."""
    k = 0
    per_dim: dict[str, dict[str, list]] = {d: defaultdict(list) for d in DIMENSIONS}

    def take(p: BenchmarkPair, d: str) -> tuple[float, float]:
        nonlocal k
        ra, rb = results[k], results[k + 1]
        k += 2
        for r, s in ((ra, p.scores[0][d]), (rb, p.scores[1][d])):
            per_dim[d]["known"].append(s)
            per_dim[d]["mean"].append(float(r.mean))
            per_dim[d]["probs"].append(tuple(getattr(r, "probs", ()) or ()))
        return float(ra.mean), float(rb.mean)

    hits_all, by_gap = [], defaultdict(list)
    for p in bench:
        a, b = take(p, p.dimension)
        better_first = p.scores[0][p.dimension] > p.scores[1][p.dimension]
        h = _pref(a, b) if better_first else _pref(b, a)
        hits_all.append((p.gap, h))
        by_gap[p.gap].append(h)
        per_dim[p.dimension]["hits"].append((p.gap, h))
    conflict_hits = []
    for p in conf:
        ax, bx = take(p, p.dimension)
        ay, by = take(p, p.other)
        conflict_hits.append(_pref(ax, bx) * _pref(by, ay))

    def hpa(hits: list[tuple[float, float]], margin: float = 0.0) -> float:
        kept = [h for g, h in hits if g > margin]
        return float(np.mean(kept)) if kept else float("nan")

    dims_out = {}
    for d, v in per_dim.items():
        if not v["known"]:
            continue
        nll, ece = _calibration(v["probs"], v["known"], levels)
        dims_out[d] = {
            "hpa": hpa(v["hits"]), "margin_hpa": hpa(v["hits"], 0.5),
            "gaps": {str(g): hpa([(x, h) for x, h in v["hits"] if x == g]) for g in sorted({g for g, _ in v["hits"]})},
            "plcc": plcc(v["known"], v["mean"]), "srcc": srcc(v["known"], v["mean"]),
            "nll": nll, "ece": ece, "n_images": len(v["known"]),
        }

    def avg(key: str) -> float:
        vals = [x[key] for x in dims_out.values() if not math.isnan(x[key])]
        return float(np.mean(vals)) if vals else float("nan")

    return {
        "hpa": hpa(hits_all), "margin_hpa": hpa(hits_all, 0.5),
        "gaps": {str(g): float(np.mean(h)) for g, h in sorted(by_gap.items())},
        "conflict_accuracy": float(np.mean(conflict_hits)) if conflict_hits else float("nan"),
        "plcc": avg("plcc"), "srcc": avg("srcc"), "nll": avg("nll"), "ece": avg("ece"),
        "dimensions": dims_out, "pairs": len(bench), "conflicts": len(conf),
    }


def _fmt(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}" if isinstance(x, float) else str(x)


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """A markdown table in the form of the paper's Table 2: one row per model."""
    gaps = sorted({g for r in rows.values() for g in r.get("gaps", {})}, key=float)
    head = ["model", "HPA"] + [f"HPA gap {g}" for g in gaps] + ["conflict", "PLCC", "SRCC", "NLL", "ECE",
                                                                "passes/img", "gen. tokens/img"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r in rows.items():
        c = r.get("cost", {})
        cells = [name, _fmt(r["hpa"])] + [_fmt(r["gaps"].get(g)) for g in gaps] + [
            _fmt(r["conflict_accuracy"]), _fmt(r["plcc"]), _fmt(r["srcc"]), _fmt(r["nll"]), _fmt(r["ece"]),
            _fmt(c.get("forward_passes_per_image")), _fmt(c.get("generated_tokens_per_image"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_dimensions(report: dict[str, Any]) -> str:
    """Per-dimension lines of one report."""
    lines = [f"{'dimension':<13} {'HPA':>5} {'mHPA':>5} {'PLCC':>5} {'SRCC':>5} {'NLL':>5} {'ECE':>5}"]
    for d, v in report["dimensions"].items():
        lines.append(f"{d:<13} " + " ".join(f"{_fmt(v[k]):>5}" for k in ("hpa", "margin_hpa", "plcc", "srcc", "nll", "ece")))
    return "\n".join(lines)
