"""Calibration feeds for the static modes and the way they reach onnxruntime's calibrator."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, quantize_static


class ArrayCalibrationReader(CalibrationDataReader):
    """Calibration feeds held in memory: one ``{input_name: array}`` dict per calibration batch.

    The exporter builds them from real images with the runtime preprocessor (``pixel_values`` for
    the vision graph; the decoder's inputs with ``image_features`` from the fp32 vision graph), so
    activation ranges are those the bundle will see. ``rewind()`` allows reuse.
    """

    def __init__(self, feeds: Sequence[Mapping[str, Any]]):
        if isinstance(feeds, Mapping) or not len(feeds):
            raise ValueError("ArrayCalibrationReader needs a non-empty list of {input_name: array} dicts")
        items: list[dict[str, np.ndarray]] = []
        keys = None
        for i, feed in enumerate(feeds):
            if not isinstance(feed, Mapping) or not feed:
                raise ValueError(f"calibration feed {i} is not a non-empty dict of input name -> array")
            item = {str(k): np.asarray(v) for k, v in feed.items()}
            if keys is None:
                keys = set(item)
            elif set(item) != keys:
                raise ValueError(f"calibration feed {i} has inputs {sorted(item)}, feed 0 has {sorted(keys)}")
            items.append(item)
        self._feeds = items
        self._start, self._end = 0, len(items)
        self._pos = 0

    @property
    def input_names(self) -> list[str]:
        return sorted(self._feeds[0])

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._start + self._pos >= self._end:
            return None
        item = self._feeds[self._start + self._pos]
        self._pos += 1
        return item

    def rewind(self) -> None:
        self._pos = 0

    def get_first(self) -> dict[str, np.ndarray]:
        """The first feed, without moving on (ModelOpt's reader protocol: its trial run)."""
        return self._feeds[self._start]

    def __len__(self) -> int:
        return self._end - self._start

    def set_range(self, start_index: int, end_index: int) -> None:
        """Restrict to feeds[start:end] (onnxruntime's ``CalibStridedMinMax`` calls this)."""
        self._start, self._end = max(0, start_index), min(len(self._feeds), end_index)
        self._pos = 0


class _ProgressReader(CalibrationDataReader):
    """Wraps a reader with a tqdm bar: calibrating a 9B decoder takes minutes."""

    def __init__(self, reader: CalibrationDataReader, desc: str, enabled: bool):
        from tqdm.auto import tqdm

        self._reader = reader
        try:
            total = len(reader)
        except (TypeError, NotImplementedError):
            total = None
        self._bar = tqdm(total=total, desc=desc, unit="batch", disable=not enabled, leave=False)

    def get_next(self) -> dict | None:
        item = self._reader.get_next()
        if item is None:
            self._bar.close()
        else:
            self._bar.update(1)
        return item

    def get_first(self) -> dict | None:
        return self._reader.get_first()

    def rewind(self) -> None:  # ModelOpt reads the feeds more than once (a trial run, then calibration)
        self._reader.rewind()
        self._bar.reset()

    def __len__(self) -> int:
        return len(self._reader)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._reader.set_range(start_index, end_index)


def calibration_providers() -> list[str]:
    """Calibrate on the GPU when onnxruntime has CUDA (a 9B decoder is slow on CPU), else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class _OneFeed(CalibrationDataReader):
    def __init__(self, feed: dict):
        self._feed: dict | None = feed

    def get_next(self) -> dict | None:
        feed, self._feed = self._feed, None
        return feed


def calibration_args(
    model: Path, reader: CalibrationDataReader, tmp: Path, method: CalibrationMethod
) -> tuple[CalibrationDataReader | None, dict[str, Any]]:
    """Calibrate with onnxruntime's own calibrator, one batch at a time; ranges go in as a cache.

    Handing the whole reader to ``quantize_static`` makes the calibrator keep every batch's
    activations (all of a 9B decoder's, for every batch) and, for the Distribution method fp8
    requires, stack them with ``np.asarray``, which fails for batches of different sequence
    lengths (decoder prompts). Fed one batch per ``collect_data`` call, the same calibrator merges
    its ranges/histograms as it goes. onnxruntime builds without ``calibration_cache_path`` get
    the reader as before.
    """
    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        return reader, {}
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    calibrator = create_calibrator(
        model, ["MatMul", "Gemm"], augmented_model_path=str(tmp / "augmented.onnx"), calibrate_method=method,
        use_external_data_format=True, providers=calibration_providers(),
    )
    batches = 0
    while (feed := reader.get_next()) is not None:
        calibrator.collect_data(_OneFeed(feed))
        batches += 1
    if not batches:
        raise ValueError("the calibration reader gave no data")
    cache = tmp / "calibration_ranges.json"
    save_tensors_data(calibrator.compute_data(), cache)
    del calibrator
    return None, {"calibration_cache_path": cache}


def check_reader_inputs(reader: CalibrationDataReader, model: onnx.ModelProto) -> None:
    if not isinstance(reader, ArrayCalibrationReader):
        return
    init_names = {t.name for t in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input if i.name not in init_names}
    feed = set(reader.input_names)
    if feed != graph_inputs:
        raise ValueError(
            f"calibration feeds have inputs {sorted(feed)} but the graph takes {sorted(graph_inputs)} "
            f"(missing {sorted(graph_inputs - feed)}, unexpected {sorted(feed - graph_inputs)})"
        )
