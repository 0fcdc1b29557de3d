"""The processor's part of a bundle manifest (``docs/bundle.md``), written by the exporter.

It only reads processor attributes, so the runtime rebuilds the processor's inputs from the
manifest alone. The exporter adds what depends on the graphs: ``graphs``, ``gdn``, ``opset``,
``quantization`` and ``parity``, then ``files`` through :func:`zreward_fast.runtime.write_manifest`.
"""
from __future__ import annotations

from typing import Any

from .. import __version__
from ..runtime.bundle import FORMAT_NAME, FORMAT_VERSION


def manifest_from_processor(processor: Any) -> dict:
    """A :class:`~zreward_fast.ZRewardProcessor` -> manifest dict, without the export-side sections."""
    dims = list(processor.dimensions)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_by": f"zreward-fast {__version__}",
        "scale": processor.scale.to_dict(),
        "dimensions": dims,
        "image": {
            "size": int(processor.image_size),
            "patch_size": int(processor.patch_size),
            "merge_size": int(processor.merge_size),
            # vision.onnx reads one frame per patch: a still image repeats it, and the exporter
            # sums the patch embedding's temporal slices (ExportVision).
            "temporal_patch_size": 1,
            "image_mean": [float(x) for x in processor.image_mean],
            "image_std": [float(x) for x in processor.image_std],
            "resample": "bicubic",
            "max_image_pixels": int(processor.max_image_pixels),
        },
        "prompt": {"format": processor.prompt_format.to_dict(), "max_prompt_chars": processor.max_prompt_chars},
        "tokens": {
            "image_token_id": int(processor.image_token_id),
            "pad_token_id": int(processor.pad_token_id),
            "query_token_ids": {d: int(processor.query_token_ids[d]) for d in dims},
            "score_token_ids": [int(i) for i in processor.score_token_ids],
        },
    }
