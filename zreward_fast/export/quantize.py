"""Quantization of the bundle graphs: int8 dynamic (CPU), int8 static QDQ and fp8 e4m3 QDQ.

The quantizers themselves are onnxruntime's (``quantize_dynamic`` / ``quantize_static``) and, for
fp8 where it is installed, NVIDIA ModelOpt's ONNX quantizer. What this module adds is the part they
cannot know: *which* nodes of a Qwen3.5 reward graph may lose precision.

Only MatMul/Gemm nodes whose weight (input B) is a constant are candidates; of those, the big linear
layers (q/k/v/o, ``in_proj_qkv``, ``in_proj_z``, ``out_proj``, the MLP, the vision qkv/proj/fc) are
quantized and everything that sets a scale or a decay stays in float: norms, the Gated DeltaNet
gates (``in_proj_a``/``in_proj_b``, ``A_log``, ``dt_bias``) and its state, the GDN conv, the patch
embedding and the score head. Activation x activation MatMuls (attention scores, the decomposed GDN
state updates) are never candidates, so the recurrent state stays in float.

Selection does not trust exporter naming. Both torch exporters rename weights (``onnx::MatMul_123``
with ``dynamo=False``, ``val_45`` with ``dynamo=True``), so a node's identity is read from every
source there is: the initializer's name (traced back through Transpose/Cast/Identity/Reshape to a
named parameter), the node name (``/layers.0/linear_attn/in_proj_a/MatMul``), and the dynamo exporter's
``pkg.torch.onnx.name_scopes`` / ``namespace`` metadata. When none of those carries a module path
the shape and graph rules still hold (see :func:`select_quantizable_nodes`).
"""
from __future__ import annotations

import ast
import importlib
import inspect
import logging
import re
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from ..runtime.bundle import EXTERNAL_DATA_THRESHOLD, EXTERNAL_MIN_TENSOR_BYTES, QUANT_MODES

log = logging.getLogger(__name__)

QuantMode = Literal["int8-dynamic", "int8-static", "fp8"]
MODES: tuple[str, ...] = tuple(m for m in QUANT_MODES if m != "none")

#: Name rules. Every name attached to a candidate node (weight initializer, node name, dynamo
#: name-scope metadata) is split into components at ``.``, ``/``, ``:`` and whitespace; a node is
#: kept in float when a component *fully* matches one of these (case-insensitive) patterns, so
#: ``gate_proj`` is not mistaken for the MoE router ``gate``, nor ``in_proj_qkv`` for ``in_proj_a``.
EXCLUDE_PATTERNS: dict[str, str] = {
    # RMSNorm / LayerNorm weights and anything under a norm module (input_layernorm, q_norm, norm1).
    "norm": r"[a-z0-9_]*norm[a-z0-9_]*|ln|ln_[a-z0-9_]+",
    # Gated DeltaNet gate projections and decay parameters: errors there compound over the sequence
    # through the recurrent state (Qwen3-Next fuses a and b into in_proj_ba).
    "gdn_gate": r"in_proj_a|in_proj_b|in_proj_ba|a_log|dt_bias|dt_proj",
    # The GDN short causal convolution.
    "gdn_conv": r"conv1d",
    # The GDN output projection reads norm(core) * silu(z): the SiLU gate makes per-channel
    # outliers that per-tensor activation quantization crushes (measured on a random hidden-512
    # student: this one 512x512 layer alone moved the mean score by 0.14 of a 0..4 scale).
    "gdn_out": r"out_proj",
    # The vision patch embedding reads raw normalised pixels: the first layer, kept exact.
    "patch_embed": r"patch_embed|patch_embeds|patch_embedding|patch_embeddings",
    # The score head (K score rows of the LM head, or a separate head): it sets the distribution.
    "score_head": r"score|scores|score_head|score_proj|lm_head",
    # MoE routers (Qwen3.5 MoE variants): routing flips are discrete errors.
    "router": r"gate|router|shared_expert_gate",
}

#: Shape rules: weights with fewer elements than this are not worth quantizing (no size or speed
#: gain, only error).
MIN_QUANT_ELEMENTS = 4096
#: Shape rules: a weight with this many output features or fewer is a score head ([K, H], K = 9) or
#: a per-head gate projection ([H, num_heads]); both stay in float even when their names are lost.
MAX_HEAD_ROWS = 32

#: Graph rules (independent of names), applied after the name and shape rules:
#:   * ``reads_graph_input``: the activation comes from a float graph input through layout ops only
#:     -> the input embedding (``patch_embed`` on ``pixel_values``);
#:   * ``feeds_gdn_gate``: the output reaches a ``Softplus`` (the GDN ``dt`` path) or the
#:     ``decay``/``beta`` input of ``com.microsoft::GatedDeltaNet`` / ``LinearAttention`` through
#:     elementwise/layout ops only;
#:   * ``feeds_softmax``: the output reaches a ``Softmax``/``LogSoftmax`` through elementwise/layout
#:     ops only -> a score head or a router.
GRAPH_RULES: tuple[str, ...] = ("reads_graph_input", "feeds_gdn_gate", "feeds_softmax")

_WEIGHT_PASSTHROUGH = frozenset({"Transpose", "Cast", "Identity", "Reshape"})
_LAYOUT_OPS = frozenset({"Reshape", "Cast", "Transpose", "Flatten", "Unsqueeze", "Squeeze", "Identity", "Slice"})
_FORWARD_PASSTHROUGH = _LAYOUT_OPS | frozenset(
    {"Add", "Sub", "Mul", "Div", "Neg", "Split", "Sigmoid", "Exp", "Concat", "Expand", "Gather", "Clip"}
)
_GATE_PORTS = {"GatedDeltaNet": (4, 5), "LinearAttention": (4, 5)}  # decay, beta
_FORWARD_DEPTH = 6
_GENERATED_NAME = re.compile(
    r"^(onnx::|val_\d|_val_\d|const(ant)?(_|\d|$)|initializer|tensor_?\d|arg\d|_v_\d|\d+$)|::", re.IGNORECASE
)
_COMPILED = {k: re.compile(rf"(?:{v})", re.IGNORECASE) for k, v in EXCLUDE_PATTERNS.items()}
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


# ----------------------------------------------------------------------------------------------
# Calibration readers
# ----------------------------------------------------------------------------------------------


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

    def __len__(self) -> int:
        return len(self._reader)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._reader.set_range(start_index, end_index)


# ----------------------------------------------------------------------------------------------
# Node selection
# ----------------------------------------------------------------------------------------------


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _constants(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    """Outputs of ``Constant`` nodes that hold a tensor, by name."""
    out = {}
    for n in graph.node:
        if n.op_type == "Constant" and n.output:
            value = _attr(n, "value")
            if isinstance(value, TensorProto):
                out[n.output[0]] = value
    return out


def _reshape_target(node: onnx.NodeProto, dims: list[int], consts: Mapping[str, TensorProto]) -> list[int] | None:
    """The output dims of a Reshape of a constant (ONNX semantics: 0 copies, -1 infers), or None."""
    if len(node.input) < 2 or node.input[1] not in consts:
        return None
    try:
        shape = [int(v) for v in numpy_helper.to_array(consts[node.input[1]]).reshape(-1)]
    except Exception:  # noqa: BLE001 - shape stored as external data we did not load
        return None
    allowzero = _attr(node, "allowzero", 0)
    out = [dims[i] if v == 0 and not allowzero and i < len(dims) else v for i, v in enumerate(shape)]
    if out.count(-1) == 1:
        known = int(np.prod([v for v in out if v != -1])) or 1
        out[out.index(-1)] = int(np.prod(dims)) // known
    return out if int(np.prod(out)) == int(np.prod(dims)) else None


def _trace_weight(
    name: str, producers: Mapping[str, onnx.NodeProto], consts: Mapping[str, TensorProto]
) -> tuple[str, list[int], list[onnx.NodeProto]] | None:
    """(source tensor name, dims as seen by the consumer, passthrough chain) or None if not constant.

    Follows Transpose/Cast/Identity/Reshape back to an initializer or Constant: the exporters
    write ``Transpose(linear.weight)`` (dynamo, unoptimised) and ``Transpose(Reshape(conv.weight))``
    (a patch embedding as a MatMul).
    """
    chain: list[onnx.NodeProto] = []
    while name not in consts:
        node = producers.get(name)
        if node is None or node.op_type not in _WEIGHT_PASSTHROUGH or not node.input:
            return None
        chain.append(node)
        name = node.input[0]
    dims = list(consts[name].dims)
    for node in reversed(chain):  # from the constant towards the consumer
        if node.op_type == "Transpose":
            perm = _attr(node, "perm") or list(reversed(range(len(dims))))
            dims = [dims[p] for p in perm]
        elif node.op_type == "Reshape":
            target = _reshape_target(node, dims, consts)
            if target is None:
                return None
            dims = target
    return name, dims, chain


def _module_from_param(name: str) -> str | None:
    if not name or _GENERATED_NAME.search(name) or "." not in name:
        return None
    parts = name.split(".")
    if parts[-1].lower() in ("weight", "bias", "t", "weight_t"):
        parts = parts[:-1]
    return ".".join(parts) or None


def _module_from_node_name(name: str) -> str | None:
    parts = [p for p in name.split("/") if p]  # TorchScript: /layers.0/mlp/gate_proj/MatMul
    if len(parts) < 2:
        return None
    return ".".join(parts[:-1])


def _module_from_metadata(node: onnx.NodeProto) -> str | None:
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = meta.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            items = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            items = None
        if isinstance(items, (list, tuple)):
            paths = [str(s) for s in items[:-1] if s]  # the last entry is the op call itself
            if paths:
                return paths[-1]
    namespace = meta.get("namespace")
    if namespace:
        paths = [seg.split(":")[0].strip() for seg in namespace.split("/")[:-1]]
        paths = [p for p in paths if p]
        if paths:
            return paths[-1]
    return None


def _components(texts: Iterable[str | None]) -> set[str]:
    out: set[str] = set()
    for t in texts:
        if t:
            out.update(c.lower() for c in re.split(r"[./:\s]+", t) if c)
    return out


def _reaches(
    start: str,
    consumers: Mapping[str, list[onnx.NodeProto]],
    target_ops: frozenset[str],
    ports: Mapping[str, tuple[int, ...]] | None = None,
) -> bool:
    """Whether ``start`` flows into a ``target_ops`` node (or a listed input port) via passthrough ops."""
    frontier, seen = [(start, 0)], {start}
    while frontier:
        tensor, depth = frontier.pop()
        for node in consumers.get(tensor, ()):
            if node.op_type in target_ops:
                return True
            if ports and node.op_type in ports:
                if any(i < len(node.input) and node.input[i] == tensor for i in ports[node.op_type]):
                    return True
            if node.op_type in _FORWARD_PASSTHROUGH and depth + 1 < _FORWARD_DEPTH:
                for out in node.output:
                    if out and out not in seen:
                        seen.add(out)
                        frontier.append((out, depth + 1))
    return False


def _reads_graph_input(
    name: str, producers: Mapping[str, onnx.NodeProto], float_inputs: set[str], depth: int = 0
) -> bool:
    if name in float_inputs:
        return True
    node = producers.get(name)
    if node is None or node.op_type not in _LAYOUT_OPS or not node.input or depth > _FORWARD_DEPTH:
        return False
    return _reads_graph_input(node.input[0], producers, float_inputs, depth + 1)


def _load_structure(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX graph not found: {path}")
    return onnx.load(str(path), load_external_data=False)  # names and dims only: cheap for big graphs


def select_quantizable_nodes(
    model_path: str | Path | onnx.ModelProto,
) -> tuple[list[str], list[str], dict[str, Any]]:
    """Decide, for every MatMul/Gemm with a constant weight, whether to quantize it.

    Returns ``(nodes_to_quantize, nodes_to_exclude, report)``. Rules, in order (first hit wins):

    1. name rules (:data:`EXCLUDE_PATTERNS`) on every name the node carries -> ``name:<rule>``;
    2. shape rules: a weight that is not 2-D -> ``shape:not_2d``; fewer than
       :data:`MIN_QUANT_ELEMENTS` elements -> ``shape:tiny``; at most :data:`MAX_HEAD_ROWS` output
       features -> ``shape:narrow`` (score head ``[K, H]``, per-head gates);
    3. graph rules (:data:`GRAPH_RULES`) -> ``graph:<rule>``, for graphs whose names are lost.

    The weight may be an initializer, a ``Constant``, or a Transpose/Cast/Identity of one (the
    dynamo exporter's unoptimised ``Transpose(linear.weight)``); shapes are read as the consumer
    sees them. Node names must be unique; unnamed candidates are reported under ``unnamed`` (run
    :func:`quantize_bundle_graph`, which names them, instead of calling the quantizers directly).
    The report is JSON-serialisable.
    """
    model = _load_structure(model_path)
    graph = model.graph
    consts: dict[str, TensorProto] = {t.name: t for t in graph.initializer}
    consts.update(_constants(graph))
    producers = {o: n for n in graph.node for o in n.output if o}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            if i:
                consumers[i].append(n)
    init_names = {t.name for t in graph.initializer}
    float_inputs = {
        i.name for i in graph.input if i.name not in init_names and i.type.tensor_type.elem_type in _FLOAT_TYPES
    }

    quantize: list[str] = []
    exclude: list[str] = []
    nodes: list[dict[str, Any]] = []
    activation_matmuls = 0
    unnamed = 0
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        traced = _trace_weight(node.input[1], producers, consts)
        if traced is None:
            activation_matmuls += 1
            continue
        if not node.name:
            unnamed += 1
            continue
        source, dims, chain = traced
        if node.op_type == "Gemm" and len(dims) == 2:
            out_features = dims[0] if _attr(node, "transB", 0) else dims[1]
        else:
            out_features = dims[-1] if dims else 0
        module = (
            _module_from_param(source)
            or _module_from_metadata(node)
            or _module_from_node_name(node.name)
            or next((m for m in (_module_from_param(c.input[0]) for c in chain) if m), None)
        )
        texts = [source, node.name, module, _module_from_metadata(node), _module_from_node_name(node.name)]
        texts += [c.input[0] for c in chain]
        comps = _components(texts)
        reason = next((f"name:{rule}" for rule, rx in _COMPILED.items() if any(rx.fullmatch(c) for c in comps)), None)
        if reason is None:
            numel = int(np.prod(dims)) if dims else 0
            if len(dims) != 2:
                reason = "shape:not_2d"
            elif numel < MIN_QUANT_ELEMENTS:
                reason = "shape:tiny"
            elif out_features <= MAX_HEAD_ROWS:
                reason = "shape:narrow"
        if reason is None:
            if _reads_graph_input(node.input[0], producers, float_inputs):
                reason = "graph:reads_graph_input"
            elif _reaches(node.output[0], consumers, frozenset({"Softplus"}), _GATE_PORTS):
                reason = "graph:feeds_gdn_gate"
            elif _reaches(node.output[0], consumers, frozenset({"Softmax", "LogSoftmax"})):
                reason = "graph:feeds_softmax"
        (exclude if reason else quantize).append(node.name)
        nodes.append({
            "node": node.name, "op": node.op_type, "module": module, "weight": source,
            "shape": [int(d) for d in dims], "quantize": reason is None, "reason": reason,
        })
    by_reason = Counter(n["reason"] for n in nodes if n["reason"])
    report = {
        "candidates": len(nodes),
        "quantized": len(quantize),
        "excluded": len(exclude),
        "excluded_by_reason": dict(sorted(by_reason.items())),
        "excluded_nodes": {n["node"]: n["reason"] for n in nodes if n["reason"]},
        "activation_matmuls": activation_matmuls,
        "unnamed": unnamed,
        "nodes": nodes,
    }
    return quantize, exclude, report


# ----------------------------------------------------------------------------------------------
# Graph preparation (so that onnxruntime sees initializer weights on named nodes)
# ----------------------------------------------------------------------------------------------


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


def _prepare_for_quantization(model: onnx.ModelProto, split_gemm: bool) -> dict[str, int]:
    """Make the graph digestible for onnxruntime's quantizers, in place; returns what changed.

    * unnamed nodes get names (``nodes_to_quantize`` is by name);
    * a MatMul/Gemm weight that is a Constant, or a Transpose/Cast/Identity/Reshape of a constant, is
      folded into a plain initializer (the quantizers only quantize initializer weights);
    * with ``split_gemm`` (dynamic mode: ``quantize_dynamic`` has no Gemm support) a Gemm with a
      constant weight becomes MatMul (+ Add of the bias), keeping the Gemm's node name.
    """
    graph = model.graph
    stats = {"named_nodes": 0, "folded_weights": 0, "gemm_scales_folded": 0, "split_gemms": 0}
    taken_nodes = {n.name for n in graph.node if n.name}
    for i, n in enumerate(graph.node):
        if not n.name:
            n.name = _unique(f"{n.op_type}_{i}", taken_nodes)
            stats["named_nodes"] += 1

    inits = {t.name: t for t in graph.initializer}
    consts = dict(inits)
    consts.update(_constants(graph))
    producers = {o: n for n in graph.node for o in n.output if o}
    taken = set(inits) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    folded: dict[str, str] = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] in inits:
            continue
        w = node.input[1]
        if w not in folded:
            traced = _trace_weight(w, producers, consts)
            if traced is None:
                continue
            source, _, chain = traced
            arr = numpy_helper.to_array(consts[source])
            for c in reversed(chain):
                if c.op_type == "Transpose":
                    arr = arr.transpose(_attr(c, "perm") or None)
                elif c.op_type == "Reshape":
                    arr = arr.reshape(_reshape_target(c, list(arr.shape), consts))
                elif c.op_type == "Cast":
                    arr = arr.astype(helper.tensor_dtype_to_np_dtype(_attr(c, "to")))
            reshaped = any(c.op_type in ("Transpose", "Reshape") for c in chain)
            suffix = "_t" if reshaped else ("_c" if chain else "_const")
            new = _unique(source + suffix, taken)
            t = numpy_helper.from_array(np.ascontiguousarray(arr), new)
            graph.initializer.append(t)
            inits[new] = t
            folded[w] = new
            stats["folded_weights"] += 1
        node.input[1] = folded[w]

    # Fold Gemm's alpha/beta into its constant weight/bias: onnxruntime's QDQ Gemm quantizes the
    # bias with scale input_scale * weight_scale, which is wrong once alpha != 1.
    for node in graph.node:
        c = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if node.op_type != "Gemm" or node.input[1] not in inits or (c is not None and c not in inits):
            continue
        alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
        if alpha == 1.0 and (beta == 1.0 or c is None):
            continue
        if alpha != 1.0:
            w = numpy_helper.to_array(inits[node.input[1]])
            name = _unique(node.input[1] + "_alpha", taken)
            inits[name] = numpy_helper.from_array(w * np.asarray(alpha, dtype=w.dtype), name)
            graph.initializer.append(inits[name])
            node.input[1] = name
        if c is not None and beta != 1.0:
            b = numpy_helper.to_array(inits[c])
            name = _unique(c + "_beta", taken)
            inits[name] = numpy_helper.from_array(b * np.asarray(beta, dtype=b.dtype), name)
            graph.initializer.append(inits[name])
            node.input[2] = name
        kept = [a for a in node.attribute if a.name not in ("alpha", "beta")]
        del node.attribute[:]
        node.attribute.extend(kept)
        stats["gemm_scales_folded"] += 1

    if split_gemm:
        new_nodes: list[onnx.NodeProto] = []
        for node in graph.node:
            c = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if (
                node.op_type != "Gemm"
                or _attr(node, "transA", 0)
                or node.input[1] not in inits
                or (c is not None and c not in inits)
            ):
                new_nodes.append(node)
                continue
            w = numpy_helper.to_array(inits[node.input[1]])
            w = w.T if _attr(node, "transB", 0) else w
            w_name = _unique(node.input[1] + "_mm", taken)
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), w_name))
            out = node.output[0]
            mm_out = _unique(out + "_matmul", taken) if c else out
            mm = helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=node.name)
            mm.metadata_props.extend(node.metadata_props)
            new_nodes.append(mm)
            if c:
                add = helper.make_node("Add", [mm_out, c], [out], name=_unique(node.name + "/bias_add", taken_nodes))
                new_nodes.append(add)
            stats["split_gemms"] += 1
        del graph.node[:]
        graph.node.extend(new_nodes)

    # Drop the weight Transpose/Cast/Identity/Constant nodes and initializers the folding orphaned.
    removable = _WEIGHT_PASSTHROUGH | {"Constant"}
    while True:
        used = _used_names(graph)
        dead = [n for n in graph.node if n.op_type in removable and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
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
    return stats


def _raise_opset(model: onnx.ModelProto, version: int) -> None:
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


def _annotate_custom_op_types(path: Path, max_rounds: int = 8) -> int:
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
            types = {t.name: t.data_type for t in inf.graph.initializer}
            for vi in [*inf.graph.input, *inf.graph.value_info, *inf.graph.output]:
                if vi.type.tensor_type.elem_type:
                    types[vi.name] = vi.type.tensor_type.elem_type
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


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


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


def _tensor_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def _remove_graph(path: Path) -> None:
    """Remove a graph and its ``.data`` file: onnx appends to an existing external data file."""
    for p in (path, path.with_name(path.name + ".data")):
        if p.exists():
            p.unlink()


def _finalize_output(dst: Path, external_data: bool) -> None:
    """Make ``dst`` follow the bundle convention (one ``<name>.onnx.data``) and check it loads."""
    want = dst.name + ".data"
    locs = _external_locations(dst)
    if (external_data and [p.name for p in locs] != [want]) or (not external_data and locs):
        model = onnx.load(str(dst))
        for p in locs:
            p.unlink(missing_ok=True)
        dst.unlink()
        if external_data:
            onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=want, size_threshold=EXTERNAL_MIN_TENSOR_BYTES)
        else:
            onnx.save_model(model, str(dst))
    missing = [str(p) for p in _external_locations(dst) if not p.is_file()]
    if missing:
        raise RuntimeError(f"quantized graph {dst} references missing external data: {missing}")


# ----------------------------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------------------------


def modelopt_available() -> bool:
    """Whether NVIDIA ModelOpt's ONNX quantizer imports here (it is the preferred fp8 tool)."""
    try:
        importlib.import_module("modelopt.onnx.quantization")
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return False
    return True


def _calibration_providers() -> list[str]:
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


def _calibration_args(
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
        use_external_data_format=True, providers=_calibration_providers(),
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


def _check_reader_inputs(reader: CalibrationDataReader, model: onnx.ModelProto) -> None:
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


def _run_modelopt_fp8(
    src: Path, dst: Path, reader: CalibrationDataReader, nodes_q: list[str], nodes_x: list[str], external: bool
) -> None:
    """fp8 QDQ with ModelOpt (TensorRT's own rules for Q/DQ placement); written to the documented API."""
    from modelopt.onnx.quantization import quantize as mo_quantize

    params = inspect.signature(mo_quantize).parameters
    eps = ["cuda:0", "cpu"] if "CUDAExecutionProvider" in _calibration_providers() else ["cpu"]
    kwargs: dict[str, Any] = {
        "quantize_mode": "fp8",
        "calibration_method": "max",
        "calibration_eps": eps,
        "op_types_to_quantize": ["MatMul", "Gemm"],
        # ModelOpt reads these as regular expressions: anchor and escape the exact names.
        "nodes_to_quantize": [f"^{re.escape(n)}$" for n in nodes_q],
        "nodes_to_exclude": [f"^{re.escape(n)}$" for n in nodes_x],
        "use_external_data_format": external,
        "output_path": str(dst),
        "high_precision_dtype": "fp32",  # keep everything not quantized in fp32, as the other modes
    }
    if "calibration_data_reader" in params:
        kwargs["calibration_data_reader"] = reader
    else:  # older ModelOpt: a dict of arrays stacked along the batch axis
        feeds = list(reader)
        kwargs["calibration_data"] = {k: np.concatenate([f[k] for f in feeds], axis=0) for k in feeds[0]}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in kwargs.items() if accepts_any or k in params}
    mo_quantize(str(src), **kwargs)


def quantize_bundle_graph(
    src: str | Path,
    dst: str | Path,
    mode: QuantMode,
    calibration_reader: CalibrationDataReader | None = None,
    external_data: bool = False,
    *,
    per_channel: bool = True,
    reduce_range: bool = False,
    fp8_tool: Literal["auto", "modelopt", "onnxruntime"] = "auto",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Quantize one bundle graph ``src`` into ``dst`` and return a JSON-serialisable report.

    Modes:

    * ``"int8-dynamic"``: ``quantize_dynamic``, per-channel int8 weights, activations quantized at
      run time (``DynamicQuantizeLinear`` + ``MatMulInteger``): the CPU mode, no calibration.
    * ``"int8-static"``: ``quantize_static`` in QDQ format, symmetric int8 weights (per channel) and
      activations (MinMax ranges from ``calibration_reader``): for GPU back ends and TensorRT.
    * ``"fp8"``: float8 e4m3fn QDQ. ModelOpt's quantizer when installed (``fp8_tool="auto"``),
      else onnxruntime's (``QFLOAT8E4M3FN``, Distribution calibration, opset raised to 19).
      onnxruntime's CPU EP runs it with dequantized fp32 arithmetic; the speed-up is TensorRT's.

    Only the nodes chosen by :func:`select_quantizable_nodes` are quantized. Calibration runs
    onnxruntime's calibrator one reader batch at a time (batches may differ in sequence length);
    a tqdm bar shows it unless ``show_progress=False``. ``external_data``
    writes the weights to ``<dst>.data`` (bundle convention); it is switched on automatically when
    the weights are near the 2 GB protobuf limit. ``src`` may itself use external data.
    """
    src, dst = Path(src), Path(dst)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if fp8_tool not in ("auto", "modelopt", "onnxruntime"):
        raise ValueError(f"fp8_tool must be 'auto', 'modelopt' or 'onnxruntime', got {fp8_tool!r}")
    if not src.is_file():
        raise FileNotFoundError(f"ONNX graph not found: {src}")
    if src.resolve() == dst.resolve():
        raise ValueError("dst must differ from src")
    if mode != "int8-dynamic" and calibration_reader is None:
        raise ValueError(f"mode {mode!r} is calibrated: pass a calibration_reader (e.g. ArrayCalibrationReader)")
    tool = "onnxruntime"
    if mode == "fp8" and fp8_tool != "onnxruntime":
        if modelopt_available():
            tool = "modelopt"
        elif fp8_tool == "modelopt":
            raise ImportError(
                "fp8_tool='modelopt' but NVIDIA ModelOpt is not installed (pip install nvidia-modelopt[onnx])"
            )

    size_before = graph_size_bytes(src)
    model = onnx.load(str(src))
    if calibration_reader is not None:
        _check_reader_inputs(calibration_reader, model)
    if not external_data and _tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        log.warning("%s: weights near the 2 GB protobuf limit; writing %s with external data", src.name, dst.name)
        external_data = True
    prep = _prepare_for_quantization(model, split_gemm=(mode == "int8-dynamic"))
    if mode == "fp8" and tool == "onnxruntime":
        _raise_opset(model, 19)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_graph(dst)

    with tempfile.TemporaryDirectory(prefix=".quant-", dir=dst.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        onnx.save_model(model, str(prepared), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="prepared.onnx.data", size_threshold=EXTERNAL_MIN_TENSOR_BYTES)
        del model
        prep["typed_custom_outputs"] = _annotate_custom_op_types(prepared)
        nodes_q, nodes_x, selection = select_quantizable_nodes(prepared)
        reader = None
        if calibration_reader is not None:
            reader = _ProgressReader(calibration_reader, f"calibrating {src.name} ({mode})", show_progress)

        if not nodes_q:
            # The quantizers read an empty allow-list as "everything": copy the graph instead.
            log.warning("%s: no node qualifies for quantization; writing it unchanged", src.name)
            tool = "none"
            m = onnx.load(str(prepared))
            if external_data:
                onnx.save_model(m, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=dst.name + ".data", size_threshold=EXTERNAL_MIN_TENSOR_BYTES)
            else:
                onnx.save_model(m, str(dst))
        elif mode == "int8-dynamic":
            quantize_dynamic(
                prepared, dst, op_types_to_quantize=["MatMul"], per_channel=per_channel, reduce_range=reduce_range,
                weight_type=QuantType.QInt8, nodes_to_quantize=nodes_q, nodes_to_exclude=nodes_x,
                use_external_data_format=external_data, extra_options={"MatMulConstBOnly": True},
            )
        elif mode == "int8-static":
            reader, extra = _calibration_args(prepared, reader, Path(tmp), CalibrationMethod.MinMax)
            quantize_static(
                prepared, dst, reader, **extra, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"],
                per_channel=per_channel, reduce_range=reduce_range,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                nodes_to_quantize=nodes_q, nodes_to_exclude=nodes_x, use_external_data_format=external_data,
                calibrate_method=CalibrationMethod.MinMax, calibration_providers=_calibration_providers(),
                # Symmetric int8 (zero point 0) everywhere: what TensorRT's explicit quantization needs.
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "MatMulConstBOnly": True,
                               # outputs stay float: the next op (norm, residual add, gate) is float
                               "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]},
            )
        elif tool == "modelopt":
            _run_modelopt_fp8(prepared, dst, reader, nodes_q, nodes_x, external_data)
        else:
            reader, extra = _calibration_args(prepared, reader, Path(tmp), CalibrationMethod.Distribution)
            quantize_static(
                prepared, dst, reader, **extra, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"],
                per_channel=per_channel, activation_type=QuantType.QFLOAT8E4M3FN,
                weight_type=QuantType.QFLOAT8E4M3FN, nodes_to_quantize=nodes_q, nodes_to_exclude=nodes_x,
                use_external_data_format=external_data,
                calibrate_method=CalibrationMethod.Distribution,  # the only method onnxruntime allows for fp8
                calibration_providers=_calibration_providers(),
                # onnxruntime would store a Gemm bias in fp8 with scale 1: keep biases in float.
                extra_options={"MatMulConstBOnly": True, "QuantizeBias": False,
                               "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]},
            )
    if not dst.is_file():
        raise RuntimeError(f"{tool} did not write {dst}")
    _finalize_output(dst, external_data)
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
    "MODES",
    "ArrayCalibrationReader",
    "graph_size_bytes",
    "modelopt_available",
    "quantize_bundle_graph",
    "select_quantizable_nodes",
]
