"""The torch-free runtime: load a verified export bundle and score with onnxruntime.

Nothing here imports torch or transformers, directly or indirectly, so a serving process stays
small; onnxruntime and tokenizers are imported when a :class:`Scorer` or preprocessor is built.
"""
from __future__ import annotations

from .bundle import BundleError, load_manifest, sha256_file, verify_bundle, write_manifest
from .positions import mrope_position_ids
from .preprocess import RuntimePreprocessor
from .scorer import ParityError, Scorer

__all__ = [
    "BundleError",
    "ParityError",
    "RuntimePreprocessor",
    "Scorer",
    "load_manifest",
    "mrope_position_ids",
    "sha256_file",
    "verify_bundle",
    "write_manifest",
]
