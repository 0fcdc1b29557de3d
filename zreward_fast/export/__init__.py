"""Export: the RISD student to ONNX graphs (and TensorRT engines), quantized, as a verified bundle.

``export_bundle`` (in :mod:`zreward_fast.export.api`) is the entry point; the bundle format is
documented in ``docs/bundle.md``.
"""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("export_bundle", "ExportParityError", "ExportResult"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
