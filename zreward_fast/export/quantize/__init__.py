"""Quantization of the bundle graphs: int8 dynamic (CPU), int8/int4 weight-only (CPU), int8 static
QDQ and fp8 e4m3 QDQ.

The quantizers themselves are onnxruntime's (``quantize_dynamic``'s ``ONNXQuantizer``, driven with
the weights held once by :mod:`.dynamic`; ``quantize_static``; ``MatMulNBitsQuantizer``) and, for
the QDQ modes where it is installed, NVIDIA ModelOpt's ONNX PTQ (:mod:`.modelopt_ptq`; fp8's
default, int8-static's on request). What this package adds is the part they
cannot know: *which* nodes of a Qwen3.5 reward graph may lose precision (:mod:`.policy`, with a
reason for every node kept in float), and the surgery that makes an exported graph digestible for
them (:mod:`.passes`, named passes over one :mod:`.graph` index). :mod:`.calibration` holds the
feeds, :mod:`.files` the bundle's file convention, and :data:`PIPELINES` maps a mode and a tool to
the quantizer call.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from ...runtime.bundle import EXTERNAL_DATA_THRESHOLD, MODELOPT_MODES, QUANT_MODES
from .calibration import (
    ArrayCalibrationReader,
    _ProgressReader,
    calibration_args,
    calibration_providers,
    check_reader_inputs,
)
from .dynamic import quantize_dynamic_lean
from .modelopt_ptq import modelopt_available, modelopt_quantize
from .files import finalize_output, graph_size_bytes, remove_graph, save_graph, tensor_bytes
from .passes import annotate_custom_op_types, prepare_for_quantization, raise_opset
from .policy import EXCLUDE_PATTERNS, GRAPH_RULES, MAX_HEAD_ROWS, MIN_QUANT_ELEMENTS, select_quantizable_nodes

log = logging.getLogger(__name__)

QuantMode = Literal["int8-dynamic", "int8-static", "fp8", "int8-weight", "int4-weight"]
#: weight-only modes: weights in blocks of this many input features share one scale (what
#: onnxruntime-genai uses for CPU LLMs); a per-block scale keeps an outlier weight local
WEIGHT_BLOCK_SIZE = 32
#: MatMulNBits ``accuracy_level``: 4 computes in int8 with the activations quantized per block of
#: WEIGHT_BLOCK_SIZE at run time (fast on CPU; a block-local scale, unlike int8-dynamic's one
#: scale per tensor, so an outlier channel only coarsens its own block)
WEIGHT_ACCURACY_LEVEL = 4
MODES: tuple[str, ...] = tuple(m for m in QUANT_MODES if m != "none")
#: modes whose activation ranges come from calibration images
CALIBRATED_MODES: tuple[str, ...] = ("int8-static", "fp8")
#: the quantizer ``tool="auto"`` uses per mode (ModelOpt falls back to onnxruntime where it is not
#: installed): fp8 follows TensorRT's own Q/DQ rules
AUTO_TOOL: dict[str, str] = {"fp8": "modelopt"}


@dataclass
class _Job:
    """One quantizer call: the prepared graph, where to write, the feeds and the node lists."""

    src: Path
    dst: Path
    reader: CalibrationDataReader | None
    nodes_q: list[str]
    nodes_x: list[str]
    tmp: Path
    external_data: bool
    per_channel: bool
    reduce_range: bool


def _int8_dynamic(job: _Job) -> None:
    # quantize_dynamic's own quantizer, its weights held once (:mod:`.dynamic`)
    quantize_dynamic_lean(job.src, job.dst, nodes_to_quantize=job.nodes_q, nodes_to_exclude=job.nodes_x,
                          per_channel=job.per_channel, reduce_range=job.reduce_range, external_data=job.external_data)


def _int8_static(job: _Job) -> None:
    reader, extra = calibration_args(job.src, job.reader, job.tmp, CalibrationMethod.MinMax)
    quantize_static(
        job.src, job.dst, reader, **extra, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=job.per_channel, reduce_range=job.reduce_range,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        nodes_to_quantize=job.nodes_q, nodes_to_exclude=job.nodes_x, use_external_data_format=job.external_data,
        calibrate_method=CalibrationMethod.MinMax, calibration_providers=calibration_providers(),
        # Symmetric int8 (zero point 0) everywhere: what TensorRT's explicit quantization needs.
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "MatMulConstBOnly": True,
                       # outputs stay float: the next op (norm, residual add, gate) is float
                       "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]},
    )


def _weight_only(job: _Job, bits: int) -> None:
    """Block-wise symmetric weight-only quantization into ``com.microsoft::MatMulNBits`` (RTN)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(job.src)), bits=bits, block_size=WEIGHT_BLOCK_SIZE,
                                     is_symmetric=True, accuracy_level=WEIGHT_ACCURACY_LEVEL,
                                     nodes_to_include=job.nodes_q, nodes_to_exclude=job.nodes_x,
                                     op_types_to_quantize=("MatMul",))
    # it logs a line at INFO for every node it skips (thousands in a decoder graph)
    qlog = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = qlog.level
    qlog.setLevel(logging.WARNING)
    try:
        quantizer.process()
    finally:
        qlog.setLevel(level)
    save_graph(quantizer.model.model, job.dst, job.external_data)


def _fp8_onnxruntime(job: _Job) -> None:
    reader, extra = calibration_args(job.src, job.reader, job.tmp, CalibrationMethod.Distribution)
    quantize_static(
        job.src, job.dst, reader, **extra, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=job.per_channel, activation_type=QuantType.QFLOAT8E4M3FN,
        weight_type=QuantType.QFLOAT8E4M3FN, nodes_to_quantize=job.nodes_q, nodes_to_exclude=job.nodes_x,
        use_external_data_format=job.external_data,
        calibrate_method=CalibrationMethod.Distribution,  # the only method onnxruntime allows for fp8
        calibration_providers=calibration_providers(),
        # onnxruntime would store a Gemm bias in fp8 with scale 1: keep biases in float.
        extra_options={"MatMulConstBOnly": True, "QuantizeBias": False,
                       "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]},
    )


def _modelopt(job: _Job, quantize_mode: str) -> None:
    modelopt_quantize(job.src, job.dst, quantize_mode, job.reader, job.nodes_q, job.nodes_x, job.external_data)


#: (mode, tool) -> the quantizer call that writes ``job.dst``
PIPELINES: dict[tuple[str, str], Callable[[_Job], None]] = {
    ("int8-dynamic", "onnxruntime"): _int8_dynamic,
    ("int8-static", "onnxruntime"): _int8_static,
    ("fp8", "onnxruntime"): _fp8_onnxruntime,
    ("fp8", "modelopt"): lambda job: _modelopt(job, "fp8"),
    ("int8-static", "modelopt"): lambda job: _modelopt(job, "int8"),
    ("int8-weight", "onnxruntime"): lambda job: _weight_only(job, 8),
    ("int4-weight", "onnxruntime"): lambda job: _weight_only(job, 4),
}


def quantize_bundle_graph(
    src: str | Path,
    dst: str | Path,
    mode: QuantMode,
    calibration_reader: CalibrationDataReader | None = None,
    external_data: bool = False,
    *,
    per_channel: bool = True,
    reduce_range: bool = False,
    tool: Literal["auto", "modelopt", "onnxruntime"] = "auto",
    show_progress: bool = True,
    keep: Mapping[tuple[str, int, str], str] | None = None,
) -> dict[str, Any]:
    """Quantize one bundle graph ``src`` into ``dst`` and return a JSON-serialisable report.

    Modes:

    * ``"int8-dynamic"``: ``quantize_dynamic``, per-channel int8 weights, activations quantized at
      run time (``DynamicQuantizeLinear`` + ``MatMulInteger``): the CPU mode, no calibration.
    * ``"int8-weight"`` / ``"int4-weight"``: weight-only, ``MatMulNBitsQuantizer`` (round to
      nearest, symmetric, one scale per WEIGHT_BLOCK_SIZE input features), computed with int8
      activations quantized per block at run time (WEIGHT_ACCURACY_LEVEL): at real widths 2-5x
      closer to fp32 than int8-dynamic's one scale per activation tensor, and unbroken by outlier
      channels (README, "Quantization at real width"); onnxruntime runs them at about fp32 speed
      on CPU, OpenVINO as fast as int8-dynamic.
    * ``"int8-static"``: ``quantize_static`` in QDQ format, symmetric int8 weights (per channel) and
      activations (MinMax ranges from ``calibration_reader``): for GPU back ends and TensorRT.
    * ``"fp8"``: float8 e4m3fn QDQ. ModelOpt's quantizer when installed (``tool="auto"``),
      else onnxruntime's (``QFLOAT8E4M3FN``, Distribution calibration, opset raised to 19).
      onnxruntime's CPU EP runs it with dequantized fp32 arithmetic; the speed-up is TensorRT's.

    ``tool`` picks the quantizer of the QDQ modes (:data:`MODELOPT_MODES`): ``"modelopt"`` (NVIDIA
    ModelOpt's ONNX PTQ, max calibration, on the same node selection), ``"onnxruntime"``, or
    ``"auto"``: the one :data:`AUTO_TOOL` names for the mode, ModelOpt only where it is installed.

    Only the nodes chosen by :func:`select_quantizable_nodes` are quantized (``keep``: layers it
    leaves in float besides, by measured sensitivity; :mod:`.sensitivity`). Calibration runs
    onnxruntime's calibrator one reader batch at a time (batches may differ in sequence length);
    a tqdm bar shows it unless ``show_progress=False``. ``external_data``
    writes the weights to ``<dst>.data`` (bundle convention); it is switched on automatically when
    the weights are near the 2 GB protobuf limit. ``src`` may itself use external data.
    """
    src, dst = Path(src), Path(dst)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if tool not in ("auto", "modelopt", "onnxruntime"):
        raise ValueError(f"tool must be 'auto', 'modelopt' or 'onnxruntime', got {tool!r}")
    if tool == "modelopt" and mode not in MODELOPT_MODES:
        raise ValueError(f"tool='modelopt' quantizes {MODELOPT_MODES}, not {mode!r}")
    if not src.is_file():
        raise FileNotFoundError(f"ONNX graph not found: {src}")
    if src.resolve() == dst.resolve():
        raise ValueError("dst must differ from src")
    if mode in CALIBRATED_MODES and calibration_reader is None:
        raise ValueError(f"mode {mode!r} is calibrated: pass a calibration_reader (e.g. ArrayCalibrationReader)")
    if tool == "auto":
        tool = AUTO_TOOL.get(mode, "onnxruntime")
        if tool == "modelopt" and not modelopt_available():
            tool = "onnxruntime"
    elif tool == "modelopt" and not modelopt_available():
        raise ImportError("tool='modelopt' but NVIDIA ModelOpt is not installed (pip install nvidia-modelopt[onnx])")

    size_before = graph_size_bytes(src)
    model = onnx.load(str(src))
    if calibration_reader is not None:
        check_reader_inputs(calibration_reader, model)
    if not external_data and tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        log.warning("%s: weights near the 2 GB protobuf limit; writing %s with external data", src.name, dst.name)
        external_data = True
    prep = prepare_for_quantization(model, split_gemm=mode not in CALIBRATED_MODES)
    if mode == "fp8" and tool == "onnxruntime":
        raise_opset(model, 19)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_graph(dst)

    with tempfile.TemporaryDirectory(prefix=".quant-", dir=dst.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        save_graph(model, prepared, external_data=True)
        del model
        prep["typed_custom_outputs"] = annotate_custom_op_types(prepared)
        nodes_q, nodes_x, selection = select_quantizable_nodes(prepared, keep)
        reader = None
        if calibration_reader is not None:
            reader = _ProgressReader(calibration_reader, f"calibrating {src.name} ({mode})", show_progress)

        if not nodes_q:
            # The quantizers read an empty allow-list as "everything": copy the graph instead.
            log.warning("%s: no node qualifies for quantization; writing it unchanged", src.name)
            tool = "none"
            save_graph(onnx.load(str(prepared)), dst, external_data)
        else:
            job = _Job(prepared, dst, reader, nodes_q, nodes_x, Path(tmp), external_data, per_channel, reduce_range)
            PIPELINES[(mode, tool)](job)
    if not dst.is_file():
        raise RuntimeError(f"{tool} did not write {dst}")
    finalize_output(dst, external_data)
    out_model = onnx.load(str(dst), load_external_data=False)
    opset = next((o.version for o in out_model.opset_import if o.domain in ("", "ai.onnx")), None)
    size_after = graph_size_bytes(dst)
    return {
        "mode": mode,
        "tool": tool,
        "src": src.name,
        "dst": dst.name,
        "external_data": bool(external_data),
        "opset": opset,
        "per_channel": per_channel,
        "quantized": len(nodes_q),
        "excluded": sorted(nodes_x),
        "excluded_reasons": {
            n["node"]: {"reason": n["reason"], "module": n["module"]} for n in selection["nodes"] if n["reason"]
        },
        "excluded_by_reason": selection["excluded_by_reason"],
        "quantized_nodes": list(nodes_q),
        "activation_matmuls": selection["activation_matmuls"],
        "prepared": prep,
        "size_bytes": {"before": size_before, "after": size_after},
        "size_ratio": round(size_after / size_before, 4) if size_before else None,
    }


__all__ = [
    "EXCLUDE_PATTERNS",
    "GRAPH_RULES",
    "MAX_HEAD_ROWS",
    "MIN_QUANT_ELEMENTS",
    "AUTO_TOOL",
    "CALIBRATED_MODES",
    "MODELOPT_MODES",
    "MODES",
    "PIPELINES",
    "WEIGHT_ACCURACY_LEVEL",
    "WEIGHT_BLOCK_SIZE",
    "ArrayCalibrationReader",
    "graph_size_bytes",
    "modelopt_available",
    "quantize_bundle_graph",
    "select_quantizable_nodes",
]
