"""Graph files in the bundle convention: one ``<name>.onnx`` and, for big weights, one
``<name>.onnx.data`` beside it (``runtime/bundle.py`` holds the thresholds)."""
from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

from ...runtime.bundle import EXTERNAL_MIN_TENSOR_BYTES


def save_graph(model: onnx.ModelProto, path: Path, external_data: bool, location: str | None = None) -> None:
    """Write ``model`` to ``path``; with ``external_data`` its tensors go to one ``location`` file
    (``<name>.data`` by default) except those under ``EXTERNAL_MIN_TENSOR_BYTES``."""
    if external_data:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location or path.name + ".data", size_threshold=EXTERNAL_MIN_TENSOR_BYTES)
    else:
        onnx.save_model(model, str(path))


def _external_locations(path: Path) -> list[Path]:
    model = onnx.load(str(path), load_external_data=False)
    locs = set()
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            for kv in t.external_data:
                if kv.key == "location":
                    locs.add(kv.value)
    return [path.parent / loc for loc in sorted(locs)]


def graph_size_bytes(path: str | Path) -> int:
    """Bytes of an ONNX graph file plus the external data files it references."""
    path = Path(path)
    return path.stat().st_size + sum(p.stat().st_size for p in _external_locations(path) if p.is_file())


def tensor_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def remove_graph(path: Path) -> None:
    """Remove a graph and its ``.data`` file: onnx appends to an existing external data file."""
    for p in (path, path.with_name(path.name + ".data")):
        if p.exists():
            p.unlink()


def finalize_output(dst: Path, external_data: bool) -> None:
    """Make ``dst`` follow the bundle convention (one ``<name>.onnx.data``) and check it loads."""
    want = dst.name + ".data"
    locs = _external_locations(dst)
    if (external_data and [p.name for p in locs] != [want]) or (not external_data and locs):
        model = onnx.load(str(dst))
        for p in locs:
            p.unlink(missing_ok=True)
        dst.unlink()
        save_graph(model, dst, external_data)
    missing = [str(p) for p in _external_locations(dst) if not p.is_file()]
    if missing:
        raise RuntimeError(f"quantized graph {dst} references missing external data: {missing}")
