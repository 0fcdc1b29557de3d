"""The export's Qwen3.5 modules (see docs/bundle.md): the student of ``models/qwen3_5.py`` with the
back ends that trace to ONNX graphs with a dynamic batch and length.

* ``vision.onnx``: :class:`ExportVision`, attention as an explicit softmax;
* ``decoder.onnx``: :class:`ExportDecoder`, masked matmul attention and the Gated DeltaNet in one
  of the bundle's two forms (``gdn=``): ``"decomposed"`` (standard ops, a ``Scan`` over chunks:
  the portable path, for TensorRT) or ``"contrib"`` (onnxruntime's ``com.microsoft`` GDN ops,
  whose translations live in ``onnx_export.py``). ``models/gated_deltanet.py`` has the math.
"""
from __future__ import annotations

from typing import Any

from ..models.gated_deltanet import CHUNK_SIZE, check_gdn_form
from ..models.qwen3_5 import Decoder, Vision, single_frame_patches


class ExportVision(Vision):
    """The vision tower for one fixed bucket, as ``vision.onnx`` holds it."""

    def __init__(self, rm: Any) -> None:
        super().__init__(rm, attention="matmul")


class ExportDecoder(Decoder):
    """Prefill decoder plus score head, the ``decoder.onnx`` interface of docs/bundle.md."""

    def __init__(self, rm: Any, gdn: str = "decomposed") -> None:
        super().__init__(rm, gdn=check_gdn_form(gdn), attention="matmul")


__all__ = ["CHUNK_SIZE", "ExportDecoder", "ExportVision", "check_gdn_form", "single_frame_patches"]
