"""onnxruntime's dynamic int8 quantizer, driven so that the graph's weights are held once.

``quantize_dynamic`` loads the graph with its weights, then ``ONNXQuantizer`` re-runs shape
inference through ``save_and_reload_model_with_shape_infer``: a deep copy of the model, written
out and loaded back, while the caller still holds the first. At 9B width (3.6 GB of decoder
weights) that put three copies in memory at once (10.2 GB peak) and two for the whole quantization
(README, "Export memory"). The quantization itself (``ONNXQuantizer.quantize_model``) is
onnxruntime's, unchanged; what differs is only how shapes are inferred: on a skeleton of the graph
whose large weights are typed graph inputs instead of initializers (shape inference needs their
types and shapes, never their values), the inferred ``value_info`` copied back into the one model.
The output is the same graph ``quantize_dynamic`` writes (tested, node for node and weight for
weight).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx
from onnx import helper
from onnxruntime.quantization import QuantType
from onnxruntime.quantization import onnx_quantizer
from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
from onnxruntime.quantization.quant_utils import QuantizationMode, add_infer_metadata, update_opset_version

#: initializers at least this large become typed inputs of the skeleton; smaller ones (shape
#: vectors, scalars) keep their values, which shape inference may read (Reshape, Expand)
SKELETON_MIN_BYTES = 1 << 16


def _nbytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor from its dims and type (``t.raw_data`` would copy it)."""
    return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def infer_shapes_in_place(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace ``model``'s ``value_info`` with ONNX shape inference's, without copying its weights;
    returns ``model`` (marked as inferred, as onnxruntime's quantizers expect)."""
    g = model.graph
    small, typed = [], []
    for t in g.initializer:
        if _nbytes(t) >= SKELETON_MIN_BYTES:
            typed.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            small.append(t)
    skeleton_graph = helper.make_graph(list(g.node), g.name, list(g.input) + typed, list(g.output),
                                       initializer=small, value_info=list(g.value_info))
    skeleton = helper.make_model(skeleton_graph, opset_imports=list(model.opset_import),
                                 ir_version=model.ir_version)
    skeleton.functions.extend(model.functions)
    inferred = onnx.shape_inference.infer_shapes(skeleton)
    g.ClearField("value_info")
    g.value_info.extend(inferred.graph.value_info)
    add_infer_metadata(model)
    return model


@contextlib.contextmanager
def _lean_reinference() -> Iterator[None]:
    """``ONNXQuantizer``'s re-inference (a deep copy, saved and reloaded) done in place instead."""
    original = onnx_quantizer.save_and_reload_model_with_shape_infer
    onnx_quantizer.save_and_reload_model_with_shape_infer = infer_shapes_in_place
    try:
        yield
    finally:
        onnx_quantizer.save_and_reload_model_with_shape_infer = original


def quantize_dynamic_lean(
    src: str | Path, dst: str | Path, *, nodes_to_quantize: Sequence[str], nodes_to_exclude: Sequence[str],
    per_channel: bool, reduce_range: bool, external_data: bool, op_types: Sequence[str] = ("MatMul",),
) -> None:
    """``onnxruntime.quantization.quantize_dynamic(src, dst, ...)`` with int8 weights and
    ``MatMulConstBOnly``, the graph's weights held once (plus the int8 ones it adds)."""
    model = update_opset_version(infer_shapes_in_place(onnx.load(str(src))), QuantType.QInt8)
    with _lean_reinference():
        quantizer = ONNXQuantizer(
            model, per_channel, reduce_range, QuantizationMode.IntegerOps, False, QuantType.QInt8,
            QuantType.QUInt8, None, list(nodes_to_quantize), list(nodes_to_exclude), list(op_types),
            {"MatMulConstBOnly": True},
        )
    del model  # the quantizer holds it
    quantizer.quantize_model()
    quantizer.model.save_model_to_file(str(dst), external_data)
