"""Scoring folders, manifests and tables: ``zreward-fast score --images DIR | --manifest FILE | --table FILE``.

One output row per image (JSONL, CSV or Parquet): its key (the image path relative to the
folder, manifest or table), prompt, and each dimension's mean, std and probabilities; an image that
cannot be read gets a row with its ``error`` and no scores, and the run goes on. ``resume`` skips
the keys already in the output (a run killed midway, rerun, scores every image exactly once: the
rows are appended and flushed batch by batch, a torn last line is dropped). Images are decoded by
``workers`` threads ahead of the scorer. Torch-free with a bundle (docs/integrations.md).
"""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .dimensions import DIMENSIONS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
OUTPUT_SUFFIXES = (".jsonl", ".csv", ".parquet")


@dataclass(frozen=True)
class Item:
    key: str  # the image's path relative to its folder, manifest or table: the output row's id
    path: str
    prompt: str


def _prompt_table(path: Path) -> dict[str, str]:
    """``{relative image path: prompt}`` from a ``prompts.jsonl`` or ``prompts.csv``."""
    rows: list[dict] = []
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{i}: not valid JSON: {e}") from None
    else:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    out = {}
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict) or not isinstance(r.get("image"), str) or not isinstance(r.get("prompt"), str):
            raise ValueError(f"{path}: row {i} needs string fields 'image' and 'prompt', got {str(r)[:120]}")
        out[Path(r["image"]).as_posix()] = r["prompt"]
    return out


def folder_items(directory: str | os.PathLike, prompt: str | None = None) -> list[Item]:
    """Every image under ``directory`` (recursively, sorted), with its prompt from ``prompt`` or
    from ``prompts.jsonl`` / ``prompts.csv`` in the directory (``{"image": relative path, "prompt": text}``)."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    prompts: dict[str, str] = {}
    if prompt is None:
        tables = [root / n for n in ("prompts.jsonl", "prompts.csv") if (root / n).is_file()]
        if not tables:
            raise ValueError(f"no prompts for {root}: give --prompt, or put prompts.jsonl or prompts.csv "
                             "(image, prompt) in the folder")
        prompts = _prompt_table(tables[0])
    items, missing = [], []
    for p in paths:
        key = p.relative_to(root).as_posix()
        text = prompt if prompt is not None else prompts.get(key)
        if text is None:
            missing.append(key)
        else:
            items.append(Item(key, str(p), text))
    if missing:
        raise ValueError(f"{len(missing)} image(s) have no prompt in the prompts file, e.g. {missing[:3]}")
    return items


def manifest_items(path: str | os.PathLike) -> tuple[list[Item], list[Any]]:
    """The images of a ``scored``, ``pairs`` or ``risd`` manifest (the kind is read off the rows),
    and the pair records (empty for the other kinds)."""
    from .training.data import read_manifest

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    first = _first_row(path)
    kind = "pairs" if "images" in first else "risd" if "targets" in first else "scored"
    records = read_manifest(path, kind, check_images=False)
    root = path.parent.resolve()
    items: dict[str, Item] = {}
    for r in records:
        for img in (r.images if kind == "pairs" else (r.image,)):
            key = _key(img, root)
            items.setdefault(key, Item(key, img, r.prompt))
    return list(items.values()), records if kind == "pairs" else []


def _first_row(path: Path) -> dict:
    from .training.data import _rows

    for _, row in _rows(path):
        return row
    raise ValueError(f"{path}: no records")


def _key(image: str, root: Path) -> str:
    p = Path(image).resolve()
    return p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)


def table_items(path: str | os.PathLike, image_column: str = "image", prompt_column: str = "prompt") -> list[Item]:
    """Rows of a CSV or Parquet table with an image path column (relative to the table) and a prompt column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table not found: {path}")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ValueError("reading Parquet needs pyarrow (pip install 'zreward-fast[data]')") from e
        rows = pq.read_table(path).to_pylist()
    else:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    if rows and (image_column not in rows[0] or prompt_column not in rows[0]):
        raise ValueError(f"{path} needs columns {image_column!r} and {prompt_column!r}; it has {sorted(rows[0])}")
    root = path.parent.resolve()
    items = []
    for i, r in enumerate(rows, 1):
        img, text = r[image_column], r[prompt_column]
        if not isinstance(img, str) or not img or not isinstance(text, str):
            raise ValueError(f"{path}: row {i} needs a string {image_column!r} and {prompt_column!r}")
        full = img if os.path.isabs(img) else str(root / img)
        items.append(Item(_key(full, root), full, text))
    return items


# ---------------------------------------------------------------------------------------- output
def _row(item: Item, result: dict | None, error: str | None) -> dict:
    row: dict[str, Any] = {"image": item.key, "prompt": item.prompt}
    if error is not None:
        row["error"] = error
    for d, r in (result or {}).items():
        row[f"{d}_mean"], row[f"{d}_std"], row[f"{d}_probs"] = r.mean, r.std, list(r.probs)
    return row


def _done_keys(out: Path) -> set[str]:
    """Keys of the rows already in a JSONL or CSV output; a torn last line (a kill mid-write) is cut off."""
    if not out.is_file():
        return set()
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with out.open("r+b") as f:
            f.truncate(end)
    if out.suffix == ".csv":
        with out.open(encoding="utf-8", newline="") as f:
            return {r["image"] for r in csv.DictReader(f)}
    keys = set()
    for line in data[:end].decode("utf-8").splitlines():
        if line.strip():
            keys.add(json.loads(line)["image"])
    return keys


class _Writer:
    """Appends rows to JSONL or CSV, flushed and fsynced after each batch; Parquet is written from a
    JSONL beside it (``OUT.partial.jsonl``, the resumable part) when the run ends."""

    def __init__(self, out: Path, dims: Sequence[str], append: bool) -> None:
        self.out = out
        self.path = out.with_name(out.name + ".partial.jsonl") if out.suffix == ".parquet" else out
        self.csv_fields = ["image", "prompt", "error"] + [f"{d}_{k}" for d in dims for k in ("mean", "std", "probs")]
        new = not (append and self.path.is_file() and self.path.stat().st_size > 0)
        self.f = self.path.open("w" if new else "a", encoding="utf-8", newline="")
        self.csv = csv.DictWriter(self.f, self.csv_fields) if self.path.suffix == ".csv" else None
        if self.csv is not None and new:
            self.csv.writeheader()

    def write(self, rows: list[dict]) -> None:
        for r in rows:
            if self.csv is not None:
                self.csv.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
            else:
                self.f.write(json.dumps(r) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self, finished: bool = True) -> None:
        self.f.close()
        if self.out.suffix == ".parquet" and finished:
            import pyarrow as pa
            import pyarrow.parquet as pq

            rows = [json.loads(x) for x in self.path.read_text(encoding="utf-8").splitlines() if x.strip()]
            # every column of every row (from_pylist would take the first row's keys and drop a
            # later row's error), in the CSV's order
            names = [k for k in self.csv_fields if any(k in r for r in rows)]
            names += sorted({k for r in rows for k in r} - set(names))
            pq.write_table(pa.table({k: [r.get(k) for r in rows] for k in names}), self.out)
            self.path.unlink()


def read_rows(out: str | os.PathLike) -> list[dict]:
    """The rows of an output file (JSONL, CSV or Parquet), probabilities as lists; an error row has
    no score fields and a scored row no ``error`` whatever the format."""
    out = Path(out)
    if out.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [{k: v for k, v in r.items() if v is not None} for r in pq.read_table(out).to_pylist()]
    if out.suffix == ".csv":
        with out.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            for k, v in list(r.items()):
                if k.endswith("_probs") and v:
                    r[k] = json.loads(v)
                elif k.endswith(("_mean", "_std")) and v:
                    r[k] = float(v)
                elif v == "":
                    r.pop(k)
        return rows
    return [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines() if x.strip()]


# --------------------------------------------------------------------------------------- scoring
def _load(item: Item) -> tuple[Item, Any, str | None]:
    """(item, RGB image, None), or (item, None, why) for an image that cannot be read."""
    from .imaging import ImageError, load_image

    try:
        return item, load_image(item.path), None
    except (ImageError, OSError) as e:
        return item, None, str(e)


def _decoded(items: Sequence[Item], batch_size: int, workers: int) -> Iterator[list[tuple[Item, Any, str | None]]]:
    """Batches of (item, RGB image or None, error), decoded by ``workers`` threads a batch ahead."""
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="zreward-decode") as pool:
        pending = [pool.map(_load, b) for b in batches[:2]]
        for i in range(len(batches)):
            yield list(pending[i])
            if i + 2 < len(batches):
                pending.append(pool.map(_load, batches[i + 2]))


def score_items(scorer: Any, items: Sequence[Item], out: str | os.PathLike, resume: bool = False,
                batch_size: int = 16, workers: int = 4, dimensions: Sequence[str] | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Score ``items`` into ``out`` (``.jsonl``, ``.csv`` or ``.parquet``); returns the run's counts.

    With ``resume`` the keys already in ``out`` are skipped; without it ``out`` must not exist."""
    out, todo = _todo(out, items, resume, batch_size)
    dims = list(dimensions or getattr(scorer, "dimensions", None) or DIMENSIONS)
    batches = (_score_batch(scorer, b, dims) for b in _decoded(todo, batch_size, workers))
    return _write_batches(out, dims, resume, batches, len(items), len(todo), progress)


def _todo(out: str | os.PathLike, items: Sequence[Item], resume: bool, batch_size: int) -> tuple[Path, list[Item]]:
    """The output path, checked, and the items it does not hold yet."""
    from .checks import positive_int

    out = Path(out)
    if out.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out must end in one of {OUTPUT_SUFFIXES}, got {out.name}")
    positive_int("batch_size", batch_size)
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        raise ValueError("two items share an image key; each image is scored once")
    writer_path = out.with_name(out.name + ".partial.jsonl") if out.suffix == ".parquet" else out
    if out.suffix == ".parquet" and out.is_file():
        raise FileExistsError(f"{out} is complete; remove it to score again")
    if not resume and writer_path.exists():
        raise FileExistsError(f"{writer_path} exists: pass --resume to continue it, or remove it")
    done = _done_keys(writer_path) if resume else set()
    return out, [it for it in items if it.key not in done]


def _write_batches(out: Path, dims: Sequence[str], resume: bool, batches: Iterator[list[dict]], total: int,
                   todo: int, progress: bool) -> dict[str, Any]:
    """Append each batch of rows to ``out`` as it arrives; the run's counts."""
    from tqdm.auto import tqdm

    writer = _Writer(out, dims, append=resume)
    counts = {"total": total, "skipped": total - todo, "scored": 0, "errors": 0}
    bar = tqdm(total=todo, desc="scoring", unit="img", disable=not progress)
    finished = False
    try:
        for rows in batches:
            writer.write(rows)
            errors = sum("error" in r for r in rows)
            counts["scored"] += len(rows) - errors
            counts["errors"] += errors
            bar.update(len(rows))
        finished = True
    finally:
        bar.close()
        writer.close(finished)
    return counts


class _RayScorer:
    """A Ray Data worker: one scorer, loaded once, turning batches of items into output rows
    (one JSON string a row, so every batch has the same schema whatever its errors)."""

    def __init__(self, source: str, dims: Sequence[str]) -> None:
        from .evaluation import load_source

        self.scorer, self.dims = load_source(source), list(dims)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        items = [Item(str(k), str(p), str(t)) for k, p, t in zip(batch["key"], batch["path"], batch["prompt"])]
        rows = _score_batch(self.scorer, [_load(it) for it in items], self.dims)
        return {"row": [json.dumps(r) for r in rows]}


def score_items_ray(source: str, items: Sequence[Item], out: str | os.PathLike, address: str = "local",
                    resume: bool = False, batch_size: int = 16, workers: int = 2,
                    dimensions: Sequence[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """:func:`score_items` on Ray Data: ``workers`` actors each hold one scorer of ``source`` (a
    model or bundle directory, hub id or server URL: workers load it themselves), batches stream
    from the item table to ``out`` as they finish. ``address``: ``"local"`` starts a Ray on this
    machine, anything else is passed to ``ray.init``."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise ImportError("--ray needs Ray Data: pip install 'zreward-fast[ray]'") from e
    if not isinstance(source, str):
        raise TypeError("with Ray the source must be a path, hub id or URL that every worker can load")
    out, todo = _todo(out, items, resume, batch_size)
    dims = list(dimensions or DIMENSIONS)
    if not todo:
        return _write_batches(out, dims, resume, iter(()), len(items), 0, progress)
    started = not ray.is_initialized()
    if started:
        ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.from_items([{"key": it.key, "path": it.path, "prompt": it.prompt} for it in todo])
        ds = ds.map_batches(_RayScorer, fn_constructor_kwargs={"source": source, "dims": dims}, batch_size=batch_size,
                            concurrency=workers, batch_format="numpy")
        batches = ([json.loads(r) for r in b["row"]] for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"))
        return _write_batches(out, dims, resume, batches, len(items), len(todo), progress)
    finally:
        if started:
            ray.shutdown()


def _score_batch(scorer: Any, batch: list[tuple[Item, Any, str | None]], dims: list[str]) -> list[dict]:
    """Rows of one batch; when the scorer refuses the batch (a bad prompt), each item alone, so one
    bad item costs only its own row."""
    ok = [(it, img) for it, img, err in batch if err is None]
    errors = {it.key: err for it, _, err in batch if err is not None}
    results: dict[str, Any] = {}
    try:
        scored = scorer.score([img for _, img in ok], [it.prompt for it, _ in ok], dims) if ok else []
        results = {it.key: r for (it, _), r in zip(ok, scored)}
    except (ValueError, TypeError):
        for it, img in ok:
            try:
                results[it.key] = scorer.score([img], [it.prompt], dims)[0]
            except (ValueError, TypeError) as e:
                errors[it.key] = str(e)
    return [_row(it, results.get(it.key), errors.get(it.key)) for it, _, _ in batch]


def summarize(rows: Sequence[dict], dims: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per dimension: the mean and std over images of the predicted means, and the image count."""
    import numpy as np

    out = {}
    for d in dims:
        v = np.array([r[f"{d}_mean"] for r in rows if f"{d}_mean" in r], dtype=np.float64)
        if v.size:
            out[d] = {"mean": float(v.mean()), "std": float(v.std()), "images": int(v.size)}
    return out


def pair_hpa(rows: Sequence[dict], pairs: Sequence[Any], root: Path) -> dict[str, float]:
    """HPA of the scored rows on a pairs manifest's labels (a tie counts half), per dimension and overall."""
    means = {r["image"]: r for r in rows}
    hits: dict[str, list[float]] = {}
    for p in pairs:
        a, b = (means.get(_key(img, root)) for img in p.images)
        key = f"{p.dimension}_mean"
        if a is None or b is None or key not in a or key not in b or p.scores[0] == p.scores[1]:
            continue
        da, db = a[key], b[key]
        h = 0.5 if da == db else float((da > db) == (p.scores[0] > p.scores[1]))
        hits.setdefault(p.dimension, []).append(h)
    out = {d: sum(h) / len(h) for d, h in hits.items()}
    flat = [x for h in hits.values() for x in h]
    if flat:
        out["overall"] = sum(flat) / len(flat)
    return out


def plot_histograms(rows: Sequence[dict], dims: Sequence[str], path: str | os.PathLike) -> None:
    """One histogram of the predicted means per dimension, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(dims), figsize=(3.2 * len(dims), 3), squeeze=False)
    for ax, d in zip(axes[0], dims):
        ax.hist([r[f"{d}_mean"] for r in rows if f"{d}_mean" in r], bins=20, color="tab:blue")
        ax.set_title(d)
        ax.set_xlabel("predicted mean")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
