"""Dataset formats: JSONL (or Parquet) manifests whose rows name image files.

Image paths are relative to the manifest's directory (absolute paths work too). Three kinds:

``scored`` -- an image with its prompt and annotated scores, one dimension or several::

    {"image": "img/0001.png", "prompt": "two red circles", "scores": {"alignment": 3.5, "realism": 4.0}}
    {"image": "img/0002.png", "prompt": "a cat", "dimension": "realism", "score": 2.0}

``pairs`` (GDSO) -- two images of one prompt, scored on one dimension::

    {"prompt": "two red circles", "dimension": "alignment", "images": ["a.png", "b.png"], "scores": [3.5, 1.0]}

``risd`` -- teacher distributions (K probabilities over the scale) per dimension, for distillation::

    {"image": "img/0001.png", "prompt": "two red circles", "targets": {"alignment": [0.0, ..., 0.7, 0.3], ...}}

Rows are validated on reading; an error names the file, the line and the field.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..dimensions import DIMENSIONS
from ..scale import ScoreScale

KINDS = ("scored", "pairs", "risd")


@dataclass
class ScoredRecord:
    image: str
    prompt: str
    scores: dict[str, float]

    def to_json(self) -> dict:
        return {"image": self.image, "prompt": self.prompt, "scores": self.scores}


@dataclass
class PairRecord:
    prompt: str
    dimension: str
    images: tuple[str, str]
    scores: tuple[float, float]

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "dimension": self.dimension, "images": list(self.images), "scores": list(self.scores)}


@dataclass
class RISDRecord:
    image: str
    prompt: str
    targets: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"image": self.image, "prompt": self.prompt, "targets": self.targets}


class ManifestError(ValueError):
    """A manifest row that does not follow its format."""


def _rows(path: Path) -> Iterable[tuple[int, dict]]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ManifestError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from e
        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield i, row
        return
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{path}:{i}: not valid JSON: {e}") from None
            if not isinstance(row, dict):
                raise ManifestError(f"{path}:{i}: each line must be a JSON object")
            yield i, row


def read_manifest(
    path: str | os.PathLike,
    kind: str,
    scale: ScoreScale | None = None,
    dimensions: Sequence[str] = DIMENSIONS,
    check_images: bool = True,
) -> list[Any]:
    """Read and validate a manifest; image paths come back absolute."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    scale = scale or ScoreScale()
    root = path.parent
    out = []
    for line, row in _rows(path):
        where = f"{path}:{line}"
        try:
            out.append(_parse(row, kind, scale, dimensions, root, check_images))
        except ManifestError as e:
            raise ManifestError(f"{where}: {e}") from None
    if not out:
        raise ManifestError(f"{path}: no records")
    return out


def _need(row: dict, key: str, typ: type | tuple) -> Any:
    if key not in row:
        raise ManifestError(f"missing field {key!r}")
    if not isinstance(row[key], typ):
        raise ManifestError(f"field {key!r} has the wrong type ({type(row[key]).__name__})")
    return row[key]


def _image(root: Path, rel: Any, check: bool) -> str:
    if not isinstance(rel, str) or not rel:
        raise ManifestError(f"an image path must be a non-empty string, got {rel!r}")
    p = Path(rel) if os.path.isabs(rel) else root / rel
    if check and not p.is_file():
        raise ManifestError(f"image file not found: {p}")
    return str(p)


def _score(x: Any, scale: ScoreScale, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ManifestError(f"{what} must be a finite number, got {x!r}")
    if not scale.min <= x <= scale.max:
        raise ManifestError(f"{what} = {x} lies outside the scale [{scale.min}, {scale.max}]")
    return float(x)


def _dim(d: Any, dimensions: Sequence[str]) -> str:
    if d not in dimensions:
        raise ManifestError(f"unknown dimension {d!r}; known: {list(dimensions)}")
    return d


def _parse(row: dict, kind: str, scale: ScoreScale, dims: Sequence[str], root: Path, check: bool) -> Any:
    prompt = _need(row, "prompt", str)
    if kind == "scored":
        image = _image(root, _need(row, "image", str), check)
        if "scores" in row:
            raw = _need(row, "scores", dict)
            scores = {_dim(d, dims): _score(v, scale, f"scores[{d!r}]") for d, v in raw.items()}
        else:
            scores = {_dim(_need(row, "dimension", str), dims): _score(row.get("score"), scale, "score")}
        if not scores:
            raise ManifestError("no scores")
        return ScoredRecord(image, prompt, scores)
    if kind == "pairs":
        images = _need(row, "images", list)
        scores = _need(row, "scores", list)
        if len(images) != 2 or len(scores) != 2:
            raise ManifestError("a pair needs exactly two images and two scores")
        return PairRecord(
            prompt, _dim(_need(row, "dimension", str), dims),
            (_image(root, images[0], check), _image(root, images[1], check)),
            (_score(scores[0], scale, "scores[0]"), _score(scores[1], scale, "scores[1]")),
        )
    image = _image(root, _need(row, "image", str), check)
    raw = _need(row, "targets", dict)
    targets = {}
    for d, probs in raw.items():
        _dim(d, dims)
        if not isinstance(probs, list) or len(probs) != scale.num_levels:
            raise ManifestError(f"targets[{d!r}] must be a list of {scale.num_levels} probabilities")
        if any(isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p < 0 for p in probs):
            raise ManifestError(f"targets[{d!r}] must hold finite probabilities >= 0")
        if abs(sum(probs) - 1.0) > 1e-3:
            raise ManifestError(f"targets[{d!r}] sums to {sum(probs):.4f}, not 1")
        targets[d] = [float(p) for p in probs]
    if not targets:
        raise ManifestError("no targets")
    return RISDRecord(image, prompt, targets)


def write_manifest(path: str | os.PathLike, records: Iterable[Any], relative_to: str | os.PathLike | None = None) -> Path:
    """Write records as JSONL; image paths are made relative to the manifest's directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = Path(relative_to or path.parent).resolve()

    def rel(p: str) -> str:
        try:
            return str(Path(p).resolve().relative_to(root))
        except ValueError:
            return str(Path(p).resolve())

    with path.open("w", encoding="utf-8") as f:
        for r in records:
            row = r.to_json()
            if "image" in row:
                row["image"] = rel(row["image"])
            if "images" in row:
                row["images"] = [rel(p) for p in row["images"]]
            f.write(json.dumps(row) + "\n")
    return path


def soft_targets(score: float, scale: ScoreScale, sharpness: float = 4.0) -> list[float]:
    """A distribution peaked at ``score``: softmax of ``-sharpness * |s_k - score|``.

    Stands in for teacher distributions where no trained teacher is at hand (tests, the demo).
    """
    logits = [-sharpness * abs(s - score) for s in scale.levels]
    m = max(logits)
    e = [math.exp(x - m) for x in logits]
    z = sum(e)
    return [x / z for x in e]


def save_images(directory: str | os.PathLike, images: Sequence[Any], stem: str = "") -> list[str]:
    """Write PIL images as ``directory/<stem><index:05d>.png``; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        paths.append(str(directory / f"{stem}{i:05d}.png"))
        img.save(paths[-1])
    return paths


def write_synthetic_dataset(
    out_dir: str | os.PathLike,
    n: int,
    seed: int = 0,
    size: int = 128,
    kinds: Sequence[str] = KINDS,
    scale: ScoreScale | None = None,
) -> dict[str, Path]:
    """Draw ``n`` synthetic images with known scores and write the requested manifests.

    ``pairs`` are two renderings of one prompt (a clean one and one degraded on the pair's
    dimension); ``risd`` targets are :func:`soft_targets` of the known scores.
    """
    from .synthetic import degraded_pair, make_sample

    scale = scale or ScoreScale()
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    drawn = [make_sample(seed * 1_000_003 + i, size) for i in range(n)]
    samples = list(zip(save_images(out / "images", [s.image for s in drawn]), drawn))
    if "scored" in kinds:
        paths["scored"] = write_manifest(out / "scored.jsonl", [ScoredRecord(p, s.prompt, s.scores) for p, s in samples])
    if "risd" in kinds:
        paths["risd"] = write_manifest(out / "risd.jsonl", [
            RISDRecord(p, s.prompt, {d: soft_targets(v, scale) for d, v in s.scores.items()}) for p, s in samples
        ])
    if "pairs" in kinds:
        pairs = []
        for i in range(n):
            dim = DIMENSIONS[i % len(DIMENSIONS)]
            drop = 1.0 + (i // len(DIMENSIONS)) % 3  # 1, 2 or 3 points
            clean, bad = degraded_pair(seed * 1_000_003 + 500_000 + i, dim, size, drop)
            a, b = out / "images" / f"pair{i:05d}_a.png", out / "images" / f"pair{i:05d}_b.png"
            clean.image.save(a)
            bad.image.save(b)
            pairs.append(PairRecord(clean.prompt, dim, (str(a), str(b)), (clean.scores[dim], bad.scores[dim])))
        paths["pairs"] = write_manifest(out / "pairs.jsonl", pairs)
    return paths
