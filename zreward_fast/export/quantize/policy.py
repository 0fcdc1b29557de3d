"""Which MatMul/Gemm nodes of a Qwen3.5 reward graph may lose precision, and why the others may not.

Only MatMul/Gemm nodes whose weight (input B) is a constant are candidates; of those, the big linear
layers (q/k/v/o, ``in_proj_qkv``, ``in_proj_z``, the MLP, the vision qkv/proj/fc) are quantized and
everything that sets a scale or a decay stays in float: norms, the Gated DeltaNet gates
(``in_proj_a``/``in_proj_b``, ``A_log``, ``dt_bias``) and its state, the GDN conv and output
projection, the patch embedding and the score head. Activation x activation MatMuls (attention
scores, the decomposed GDN state updates) are never candidates, so the recurrent state stays in float.

Selection does not trust exporter naming. Both torch exporters rename weights (``onnx::MatMul_123``
with ``dynamo=False``, ``val_45`` with ``dynamo=True``), so a node's identity is read from every
source there is: the initializer's name (traced back through Transpose/Cast/Identity/Reshape to a
named parameter), the node name (``/layers.0/linear_attn/in_proj_a/MatMul``), and the dynamo
exporter's ``pkg.torch.onnx.name_scopes`` / ``namespace`` metadata. When none of those carries a
module path the shape and graph rules still hold (see :func:`select_quantizable_nodes`).
"""
from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import onnx
from onnx import TensorProto

from .graph import GraphIndex, attr

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


_LAYER_KEY = re.compile(r"(?:^|\.)(layers|blocks)\.(\d+)\.(?:.*\.)?([A-Za-z0-9_]+)$")
_MERGER_KEY = re.compile(r"(?:^|\.)merger\.(?:.*\.)?([A-Za-z0-9_]+)$")


def layer_key(module: str | None) -> tuple[str, int, str] | None:
    """A linear layer's identity that PyTorch and the exported graphs share: ``("layers", 3,
    "down_proj")`` for ``model.language_model.layers.3.mlp.down_proj`` and for the graph's
    ``layers.3.mlp.down_proj``; ``("blocks", 0, "qkv")`` for a vision block; ``("merger", -1,
    "linear_fc1")``. The path in between differs (``linear_attn`` is ``mixer.hf`` in the graph), the
    leaf names within one layer do not. None for anything else."""
    if not module:
        return None
    m = _LAYER_KEY.search(module)
    if m:
        return m.group(1), int(m.group(2)), m.group(3)
    m = _MERGER_KEY.search(module)
    return ("merger", -1, m.group(1)) if m else None


def excluded_by_name(module: str) -> str | None:
    """The name rule (:data:`EXCLUDE_PATTERNS`) that keeps a module path in float, or None."""
    comps = _components([module])
    return next((rule for rule, rx in _COMPILED.items() if any(rx.fullmatch(c) for c in comps)), None)


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
    keep: Mapping[tuple[str, int, str], str] | None = None,
) -> tuple[list[str], list[str], dict[str, Any]]:
    """Decide, for every MatMul/Gemm with a constant weight, whether to quantize it.

    Returns ``(nodes_to_quantize, nodes_to_exclude, report)``. Rules, in order (first hit wins):

    1. name rules (:data:`EXCLUDE_PATTERNS`) on every name the node carries -> ``name:<rule>``;
       then ``keep``: layers chosen to stay in float by measured sensitivity (:func:`layer_key` ->
       a reason; :func:`~zreward_fast.export.quantize.sensitivity.choose_fallback`) ->
       ``sensitivity:<reason>``;
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
    graph = _load_structure(model_path).graph
    index = GraphIndex.build(graph)
    producers, consumers = index.producers, index.consumers
    float_inputs = {
        i.name for i in graph.input if i.name not in index.inits and i.type.tensor_type.elem_type in _FLOAT_TYPES
    }

    quantize: list[str] = []
    exclude: list[str] = []
    nodes: list[dict[str, Any]] = []
    activation_matmuls = 0
    unnamed = 0
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        traced = index.trace_weight(node.input[1])
        if traced is None:
            activation_matmuls += 1
            continue
        if not node.name:
            unnamed += 1
            continue
        source, dims, chain = traced
        if node.op_type == "Gemm" and len(dims) == 2:
            out_features = dims[0] if attr(node, "transB", 0) else dims[1]
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
        if reason is None and keep and layer_key(module) in keep:
            reason = f"sensitivity:{keep[layer_key(module)]}"
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
