"""NVIDIA ModelOpt's ONNX PTQ as a quantizer of the QDQ modes (int8-static, fp8).

ModelOpt calibrates through onnxruntime's calibrators after patching them in place
(``modelopt.onnx.quantization.ort_patching.patch_ort_modules``: ``calibrate.create_calibrator``,
the calibrator classes' methods, ``QDQQuantizer``...) and never restores them; onnxruntime's own
``quantize_static`` then fails in the same process (``create_calibrator`` no longer takes
``providers``). :func:`modelopt_quantize` puts every ``onnxruntime.quantization`` attribute back as
it found it.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from .calibration import calibration_providers

#: the onnxruntime modules ModelOpt patches (imported first, so that their state can be recorded)
_ORT_MODULES = ("onnxruntime.quantization.calibrate", "onnxruntime.quantization.base_quantizer",
                "onnxruntime.quantization.qdq_quantizer", "onnxruntime.quantization.onnx_quantizer",
                "onnxruntime.quantization.quantize", "onnxruntime.quantization.quant_utils")


def modelopt_available() -> bool:
    """Whether NVIDIA ModelOpt's ONNX quantizer imports here."""
    try:
        importlib.import_module("modelopt.onnx.quantization")
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return False
    return True


@contextlib.contextmanager
def ort_quantization_restored() -> Iterator[None]:
    """Record the attributes of onnxruntime's quantization modules and of the classes they define;
    put back afterwards whatever changed (and remove what was added)."""
    for name in _ORT_MODULES:
        importlib.import_module(name)
    modules = [m for n, m in list(sys.modules.items()) if n.startswith("onnxruntime.quantization") and m is not None]
    saved_modules = [(m, dict(vars(m))) for m in modules]
    classes = {id(c): c for m in modules for c in vars(m).values()
               if isinstance(c, type) and getattr(c, "__module__", "").startswith("onnxruntime.quantization")}
    saved_classes = [(c, dict(vars(c))) for c in classes.values()]
    try:
        yield
    finally:
        for m, before in saved_modules:
            for k, v in before.items():
                if vars(m).get(k) is not v:
                    setattr(m, k, v)
        for c, before in saved_classes:
            for k in [k for k in vars(c) if k not in before]:
                delattr(c, k)
            for k, v in before.items():
                if k not in ("__dict__", "__weakref__") and vars(c).get(k) is not v:
                    setattr(c, k, v)


def modelopt_quantize(src: Path, dst: Path, quantize_mode: str, reader: CalibrationDataReader | None,
                      nodes_to_quantize: Sequence[str], nodes_to_exclude: Sequence[str], external_data: bool) -> None:
    """int8 or fp8 QDQ of ``src`` into ``dst`` with ModelOpt (TensorRT's own rules for Q/DQ
    placement), on the given node selection; written to its documented ``quantize`` API."""
    from modelopt.onnx.quantization import quantize as mo_quantize

    params = inspect.signature(mo_quantize).parameters
    eps = ["cuda:0", "cpu"] if "CUDAExecutionProvider" in calibration_providers() else ["cpu"]
    kwargs: dict[str, Any] = {
        "quantize_mode": quantize_mode,
        "calibration_method": "max",
        "calibration_eps": eps,
        "op_types_to_quantize": ["MatMul", "Gemm"],
        # ModelOpt reads these as regular expressions: anchor and escape the exact names.
        "nodes_to_quantize": [f"^{re.escape(n)}$" for n in nodes_to_quantize],
        "nodes_to_exclude": [f"^{re.escape(n)}$" for n in nodes_to_exclude],
        "use_external_data_format": external_data,
        "output_path": str(dst),
        "high_precision_dtype": "fp32",  # keep everything not quantized in fp32, as the other modes
        "dq_only": True,  # weights stored quantized (DequantizeLinear only), not float behind a QuantizeLinear
    }
    if "calibration_data_reader" in params:
        kwargs["calibration_data_reader"] = reader
    else:  # older ModelOpt: a dict of arrays stacked along the batch axis
        feeds = list(reader)
        kwargs["calibration_data"] = {k: np.concatenate([f[k] for f in feeds], axis=0) for k in feeds[0]}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in kwargs.items() if accepts_any or k in params}
    with ort_quantization_restored():
        mo_quantize(str(src), **kwargs)
