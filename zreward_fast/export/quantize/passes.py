"""Graph surgery before quantization, as named passes over one :class:`GraphIndex`.

onnxruntime's quantizers select nodes by name and quantize only initializer weights of MatMul (and
Gemm in QDQ mode); the exporters write unnamed nodes, ``Transpose(weight)`` chains, Gemm scales and
custom-op outputs with no declared type. :func:`prepare_for_quantization` runs the passes of
:data:`PREPARE_PASSES` in order; :func:`raise_opset` and :func:`annotate_custom_op_types` are the
two passes a mode or a file needs on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import WEIGHT_PASSTHROUGH, GraphIndex, attr, typed_values


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 1
    while out in taken:
        out, i = f"{name}_{i}", i + 1
    taken.add(out)
    return out


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Tensor names read by the graph's nodes, its outputs and any subgraph (If/Loop bodies)."""
    used = {o.name for o in graph.output}
    for n in graph.node:
        used.update(i for i in n.input if i)
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                used |= _used_names(sub)
    return used


@dataclass
class _Pass:
    """The graph, its index and the names taken so far, shared by the passes of one preparation."""

    index: GraphIndex
    split_gemm: bool
    taken: set[str] = field(default_factory=set)  # tensor names
    taken_nodes: set[str] = field(default_factory=set)
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def graph(self) -> onnx.GraphProto:
        return self.index.graph

    def add_initializer(self, array: np.ndarray, base: str) -> str:
        name = _unique(base, self.taken)
        t = numpy_helper.from_array(np.ascontiguousarray(array), name)
        self.graph.initializer.append(t)
        self.index.inits[name] = t
        return name


def name_nodes(p: _Pass) -> int:
    """Unnamed nodes get names: ``nodes_to_quantize`` is by name."""
    count = 0
    for i, n in enumerate(p.graph.node):
        if not n.name:
            n.name = _unique(f"{n.op_type}_{i}", p.taken_nodes)
            count += 1
    return count


def fold_constant_weights(p: _Pass) -> int:
    """A MatMul/Gemm weight that is a Constant, or a Transpose/Cast/Identity/Reshape of a constant,
    becomes a plain initializer (the quantizers only quantize initializer weights)."""
    folded: dict[str, str] = {}
    for node in p.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] in p.index.inits:
            continue
        w = node.input[1]
        if w not in folded:
            traced = p.index.trace_weight(w)
            if traced is None:
                continue
            source, _, chain = traced
            reshaped = any(c.op_type in ("Transpose", "Reshape") for c in chain)
            suffix = "_t" if reshaped else ("_c" if chain else "_const")
            folded[w] = p.add_initializer(p.index.weight_array(source, chain), source + suffix)
        node.input[1] = folded[w]
    return len(folded)


def fold_gemm_scales(p: _Pass) -> int:
    """Gemm's alpha/beta go into its constant weight/bias: onnxruntime's QDQ Gemm quantizes the
    bias with scale input_scale * weight_scale, which is wrong once alpha != 1."""
    inits, count = p.index.inits, 0
    for node in p.graph.node:
        c = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if node.op_type != "Gemm" or node.input[1] not in inits or (c is not None and c not in inits):
            continue
        alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
        if alpha == 1.0 and (beta == 1.0 or c is None):
            continue
        if alpha != 1.0:
            w = numpy_helper.to_array(inits[node.input[1]])
            node.input[1] = p.add_initializer(w * np.asarray(alpha, dtype=w.dtype), node.input[1] + "_alpha")
        if c is not None and beta != 1.0:
            b = numpy_helper.to_array(inits[c])
            node.input[2] = p.add_initializer(b * np.asarray(beta, dtype=b.dtype), c + "_beta")
        kept = [a for a in node.attribute if a.name not in ("alpha", "beta")]
        del node.attribute[:]
        node.attribute.extend(kept)
        count += 1
    return count


def split_gemms(p: _Pass) -> int:
    """Modes without calibration (``quantize_dynamic`` and the weight-only MatMulNBits quantizer take
    MatMul only): a Gemm with a constant weight becomes MatMul (+ Add of the bias), keeping the
    Gemm's node name."""
    if not p.split_gemm:
        return 0
    inits, count = p.index.inits, 0
    new_nodes: list[onnx.NodeProto] = []
    for node in p.graph.node:
        c = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if node.op_type != "Gemm" or attr(node, "transA", 0) or node.input[1] not in inits or (c is not None and c not in inits):
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        w_name = p.add_initializer(w.T if attr(node, "transB", 0) else w, node.input[1] + "_mm")
        out = node.output[0]
        mm_out = _unique(out + "_matmul", p.taken) if c else out
        mm = helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=node.name)
        mm.metadata_props.extend(node.metadata_props)
        new_nodes.append(mm)
        if c:
            new_nodes.append(helper.make_node("Add", [mm_out, c], [out], name=_unique(node.name + "/bias_add", p.taken_nodes)))
        count += 1
    del p.graph.node[:]
    p.graph.node.extend(new_nodes)
    return count


def drop_orphans(p: _Pass) -> int:
    """Drop the weight Transpose/Cast/Identity/Constant nodes and the initializers the folding
    orphaned, and the value infos of tensors no longer produced."""
    graph, removable, dropped = p.graph, WEIGHT_PASSTHROUGH | {"Constant"}, 0
    while True:
        used = _used_names(graph)
        dead = [n for n in graph.node if n.op_type in removable and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
        dropped += len(dead)
    used = _used_names(graph)
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
    produced = {o for n in graph.node for o in n.output}
    produced |= {i.name for i in graph.input} | {t.name for t in graph.initializer}
    vi = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(vi)
    return dropped


#: the preparation, in order: (the count it reports, the pass)
PREPARE_PASSES: tuple[tuple[str, Callable[[_Pass], int]], ...] = (
    ("named_nodes", name_nodes),
    ("folded_weights", fold_constant_weights),
    ("gemm_scales_folded", fold_gemm_scales),
    ("split_gemms", split_gemms),
    ("orphans_dropped", drop_orphans),
)


def prepare_for_quantization(model: onnx.ModelProto, split_gemm: bool) -> dict[str, int]:
    """Run :data:`PREPARE_PASSES` on ``model`` in place; returns what each changed."""
    graph = model.graph
    p = _Pass(GraphIndex.build(graph), split_gemm)
    p.taken_nodes = {n.name for n in graph.node if n.name}
    p.taken = set(p.index.inits) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    for name, run in PREPARE_PASSES:
        p.stats[name] = run(p)
    return p.stats


def raise_opset(model: onnx.ModelProto, version: int) -> None:
    """Relabel the default-domain opset to ``version`` (float8 Q/DQ needs 19).

    From 18 to 19 no operator changes meaning for float graphs (Cast's new ``saturate`` only
    concerns float8; the rest widen type constraints), so relabelling is exact; onnxruntime would
    otherwise run the version converter, which does not know the ``com.microsoft`` GDN ops.
    """
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version < version:
            if o.version < 18:
                from onnx import version_converter

                model.CopyFrom(version_converter.convert_version(model, version))
                return
            o.version = version


_TYPE_STRS = {f"tensor({name.lower()})": value for name, value in TensorProto.DataType.items()}


def _custom_schemas() -> dict[tuple[str, str], Any]:
    try:
        from onnxruntime.capi._pybind_state import get_all_operator_schema
    except ImportError:  # a build without schemas: nothing to annotate from
        return {}
    return {(s.domain, s.name): s for s in get_all_operator_schema() if s.domain not in ("", "ai.onnx")}


def _schema_output_type(schema: Any, index: int, node: onnx.NodeProto, types: Mapping[str, int]) -> int | None:
    type_str = schema.outputs[index].typeStr
    constraints = {c.type_param_str: list(c.allowed_type_strs) for c in schema.type_constraints}
    if type_str not in constraints:
        return _TYPE_STRS.get(type_str)
    allowed = constraints[type_str]
    if len(allowed) == 1:
        return _TYPE_STRS.get(allowed[0])
    for j, formal in enumerate(schema.inputs):
        if formal.typeStr == type_str and j < len(node.input) and node.input[j] in types:
            return types[node.input[j]]
    return None


def annotate_custom_op_types(path: Path, max_rounds: int = 8) -> int:
    """Give the outputs of ``com.microsoft`` ops (the GDN kernels) their element types, in place.

    ONNX shape inference does not know onnxruntime's contrib ops, so everything downstream of a
    ``GatedDeltaNet`` is untyped and onnxruntime's static quantizer then skips those activations
    ("failed to infer the type of tensor"): ``out_proj`` would get a float input. The types follow
    from onnxruntime's own operator schemas (output type parameter = that of an input).
    """
    model = onnx.load(str(path), load_external_data=False)
    custom = [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    if not custom:
        return 0
    schemas = _custom_schemas()
    inferred = path.with_name(path.stem + ".inferred.onnx")
    added = 0
    try:
        for _ in range(max_rounds):
            onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
            inf = onnx.load(str(inferred), load_external_data=False)
            types = typed_values(inf)
            new = []
            for node in custom:
                schema = schemas.get((node.domain, node.op_type))
                for i, out in enumerate(node.output):
                    if schema is None or not out or out in types or i >= len(schema.outputs):
                        continue
                    elem = _schema_output_type(schema, i, node, types)
                    if elem:
                        new.append(helper.make_tensor_value_info(out, elem, None))
                        types[out] = elem
            if not new:
                break
            model.graph.value_info.extend(new)
            added += len(new)
            onnx.save_model(model, str(path))  # structure only: the external data file is untouched
    finally:
        inferred.unlink(missing_ok=True)
    return added
