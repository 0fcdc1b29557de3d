"""Writing directories so that a crash leaves the old one, the new one or a clear error, never a
mix (models, checkpoints, bundles). Torch-free.

Everything is written into a hidden sibling of the destination (same filesystem, so renames are
atomic), flushed to disk, then moved into place:

* a whole directory (a checkpoint, a bundle) replaces the old one by two renames: the old one aside,
  the new one in (the old one renamed back if that fails). Only a process killed between the two
  renames leaves no directory at the destination (a clear "not found" on load, the old one beside
  it), never half of each;
* files merged into a directory that holds other things too (a model saved into a training output
  directory beside its checkpoints) go in with the *marker* last: the old marker is removed first, so
  a crash in between leaves a directory its loader refuses (no ``config.json``) instead of new
  weights under an old config.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

# Weight files a new save may not overwrite by name (a sharded save after a single-file one, or the
# reverse): removed from the destination before the new files move in.
_WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
                    "pytorch_model*.bin", "pytorch_model.bin.index.json")


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` and the directories themselves to disk."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a platform without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``path`` holds either its old content or ``text``, whatever happens during the write."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def sibling_temp(dest: str | os.PathLike, tag: str = "tmp") -> Path:
    dest = Path(dest)
    return dest.parent / f".{dest.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def replace_directory(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Move the finished directory ``src`` to ``dest`` (same filesystem), replacing any ``dest``."""
    src, dest = Path(src), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if dest.exists():
        old = sibling_temp(dest, "old")
        os.rename(dest, old)
    try:
        os.rename(src, dest)
    except BaseException:
        if old is not None and not dest.exists():
            os.rename(old, dest)  # roll back: the old directory stays the current one
        raise
    _fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def merge_files(src: str | os.PathLike, dest: str | os.PathLike, marker: str) -> None:
    """Move the files of ``src`` into the existing ``dest``, ``marker`` last (module docstring)."""
    src, dest = Path(src), Path(dest)
    (dest / marker).unlink(missing_ok=True)
    _fsync_dir(dest)
    new = {p.name for p in src.iterdir()}
    for pattern in _WEIGHT_PATTERNS:
        for stale in dest.glob(pattern):
            if stale.name not in new and stale.is_file():
                stale.unlink()
    for p in sorted(src.iterdir()):
        if p.name != marker:
            target = dest / p.name
            if target.is_dir() and not p.is_dir():
                shutil.rmtree(target)
            os.replace(p, target)
    if (src / marker).exists():
        os.replace(src / marker, dest / marker)
    _fsync_dir(dest)


@contextlib.contextmanager
def staged_directory(dest: str | os.PathLike, marker: str | None = None) -> Iterator[Path]:
    """Yield an empty directory to write into; on success it becomes ``dest``.

    With ``marker`` (a file name every loader requires) and a ``dest`` that already exists, the
    files are merged into it, the marker last; otherwise the whole directory replaces ``dest``. On
    an exception nothing at ``dest`` changes and the staging directory is removed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling_temp(dest)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if marker is not None and dest.is_dir():
            merge_files(tmp, dest, marker)
        else:
            replace_directory(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
