"""ONNX export of ``vision.onnx`` and ``decoder.onnx`` (interfaces in docs/bundle.md).

Both graphs go through the dynamo exporter (``torch.onnx.export(..., dynamo=True)``): it traces
the ``torch._higher_order_ops.scan`` of the decomposed Gated DeltaNet to an ONNX ``Scan`` and
lets the two GDN custom ops be translated to onnxruntime's ``com.microsoft`` kernels through a
``custom_translation_table``. The graphs are written with ``onnx_ir`` (inline weights, or one
``<name>.onnx.data`` file when the weights exceed the threshold) and checked with
``onnx.checker``.

Dynamic axes: vision ``batch``; decoder ``batch``, ``seq`` (any length: the decomposed GDN pads
to its chunk inside the graph) and ``dims`` (the number of query positions, 1 included). The image
feature count ``N`` is fixed by the bucket.
"""
from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from ..runtime.bundle import DECODER_INPUTS, DECODER_OUTPUTS, EXTERNAL_DATA_THRESHOLD, VISION_INPUTS, VISION_OUTPUTS
from .modules import CHUNK_SIZE, ExportDecoder, ExportVision, check_gdn_form, single_frame_patches


DECODER_AXES = {
    ("input_ids", 0): "batch", ("input_ids", 1): "seq", ("attention_mask", 0): "batch", ("attention_mask", 1): "seq",
    ("position_ids", 1): "batch", ("position_ids", 2): "seq", ("image_features", 0): "batch",
    ("query_positions", 0): "batch", ("query_positions", 1): "dims",
}


# --------------------------------------------------------------------------- contrib translations
def _contrib_translation_table() -> dict:
    """onnxscript translations of the GDN custom ops to onnxruntime's com.microsoft kernels.

    GatedDeltaNet takes the rank-4 spelling ``q, k [B, L, Hk, dk]``, ``v [B, L, Hv, dv]``,
    ``decay, beta [B, L, Hv]`` (value heads grouped over key heads as HF's repeat_interleave),
    fuses ``g = -exp(A_log) * softplus(a + dt_bias)`` (``gate_activation='softplus'``) and
    ``beta = sigmoid(b)``, and scales by ``1/sqrt(dk)`` by default. q and k arrive l2-normalised
    (``qk_l2_norm=0``: the op's own norm has another epsilon than HF's). Without
    ``cu_seqlens`` it reads the batch size from ``initial_state`` ``[B, Hv, dv, dk]`` (V-major),
    so a zero state is built from the input shapes. CausalConvWithState runs channels last
    (``[B, L, C]``) with the depthwise weight ``[C, 1, K]`` and a fused SiLU; with no past state
    it pads with zeros, which is the causal conv of a prefill.
    """
    from onnxscript import opset18 as op
    from onnxscript.values import Op, Opset

    msft = Opset("com.microsoft", 1)
    gdn_op = Op(msft, "GatedDeltaNet", _contrib_schema("GatedDeltaNet"))
    conv_op = Op(msft, "CausalConvWithState", _contrib_schema("CausalConvWithState"))

    def gated_delta_net(query, key, value, a, b, a_log, dt_bias):  # noqa: ANN001, ANN202
        batch = op.Shape(value, start=0, end=1)
        heads_dims = op.Shape(value, start=2, end=4)  # Hv, dv
        dk = op.Shape(query, start=3, end=4)
        state = op.ConstantOfShape(op.Concat(batch, heads_dims, dk, axis=0))  # float zeros
        out, _ = gdn_op(
            query, key, value, None, a, b, state, a_log, dt_bias,
            gate_activation="softplus", beta_activation="sigmoid", qk_l2_norm=0, update_rule="gated_delta",
        )
        return out

    def causal_conv(x, weight, bias=None):  # noqa: ANN001, ANN202
        out, _ = conv_op(x, weight, bias, activation="silu", channels_last=1, ndim=1)
        return out

    return {
        torch.ops.zreward_fast.gated_delta_net.default: gated_delta_net,
        torch.ops.zreward_fast.causal_conv1d_silu.default: causal_conv,
    }


def _contrib_schema(name: str) -> Any:
    """A local (unregistered) ``onnx.defs.OpSchema`` for the subset of a com.microsoft op we emit.

    onnxscript needs a schema to build a node; onnx does not ship the contrib schemas, and
    registering them globally would change ``onnx.checker`` for everyone in the process.
    """
    from onnx.defs import OpSchema

    single, optional = OpSchema.FormalParameterOption.Single, OpSchema.FormalParameterOption.Optional
    fp = OpSchema.FormalParameter
    s, i, f = OpSchema.AttrType.STRING, OpSchema.AttrType.INT, OpSchema.AttrType.FLOAT

    def attr(attr_name: str, kind: Any) -> Any:
        return OpSchema.Attribute(attr_name, kind, required=False)

    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    if name == "GatedDeltaNet":
        inputs = [fp("query", "T"), fp("key", "T", param_option=optional), fp("value", "T", param_option=optional),
                  fp("cu_seqlens", "TI", param_option=optional), fp("decay", "TG", param_option=optional),
                  fp("beta", "TG", param_option=optional), fp("initial_state", "TS", param_option=optional),
                  fp("a_log", "TS", param_option=optional), fp("dt_bias", "TS", param_option=optional)]
        outputs = [fp("output", "T"), fp("final_state", "TS", param_option=optional)]
        types = [("T", floats, ""), ("TG", floats, ""), ("TS", ["tensor(float)"], ""), ("TI", ["tensor(int32)"], "")]
        attrs = [attr("gate_activation", s), attr("beta_activation", s), attr("qk_l2_norm", i),
                 attr("update_rule", s), attr("scale", f), attr("chunk_size", i)]
    elif name == "CausalConvWithState":
        inputs = [fp("input", "T"), fp("weight", "T"), fp("bias", "T", param_option=optional),
                  fp("past_state", "T", param_option=optional)]
        outputs = [fp("output", "T", param_option=single), fp("present_state", "T")]
        types = [("T", floats, "")]
        attrs = [attr("activation", s), attr("channels_last", i), attr("ndim", i)]
    else:  # pragma: no cover - internal
        raise KeyError(name)
    return OpSchema(name, "com.microsoft", 1, inputs=inputs, outputs=outputs, type_constraints=types, attributes=attrs)


# --------------------------------------------------------------------------- helpers
def _check_model(rm: Any) -> None:
    dtype = next(rm.model.parameters()).dtype
    if dtype != torch.float32:
        raise ValueError(f"export needs a float32 model (the graphs' contract), got {dtype}: call rm.float() first")


def _example_batch(rm: Any) -> Any:
    """Two rows of different lengths, so batch and length are traced as symbols (not 0/1)."""
    proc = rm.processor
    pixels = torch.full((2, 3, proc.image_size, proc.image_size), 0.5)
    return proc(pixels, ["a photo", "a red circle above a blue square"], rm.dimensions)


def _decoder_example(rm: Any, hidden: int) -> tuple[torch.Tensor, ...]:
    """Example decoder inputs that keep every dynamic axis symbolic through the trace.

    A size of 1 is specialised by torch.export, so the example has batch 2, at least 2 query
    positions and at least two GDN chunks (extra right padding when the prompts are short): a
    single chunk would fold the chunk count (and with it the length) into a constant.
    """
    batch = _example_batch(rm)
    ids, mask = batch.input_ids, batch.attention_mask
    length = max(ids.shape[1], 2 * CHUNK_SIZE + 3)
    extra = length - ids.shape[1]
    ids = torch.cat([ids, torch.full((2, extra), rm.processor.pad_token_id, dtype=ids.dtype)], 1)
    mask = torch.cat([mask, torch.zeros(2, extra, dtype=mask.dtype)], 1)
    positions = torch.arange(length).view(1, 1, -1).expand(3, 2, length).contiguous()
    feats = torch.zeros(2, rm.processor.num_image_tokens, hidden)
    queries = batch.query_positions
    if queries.shape[1] < 2:
        queries = torch.cat([queries, queries], 1)
    return tuple(t.to(rm.device) for t in (ids, mask, positions, feats, queries))


def _name_dims(model: Any, axes: dict[tuple[str, int], str]) -> None:
    """Rename the exporter's symbolic dims (``s43``...) to ``batch``, ``seq``, ``dims`` in the graph."""
    import onnx_ir as ir

    inputs = {v.name: v for v in model.graph.inputs}
    rename = {}
    for (name, axis), label in axes.items():
        dim = inputs[name].shape[axis]
        if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
            rename[dim.value] = label
    values = list(model.graph.inputs) + list(model.graph.outputs)
    values += [out for node in model.graph for out in node.outputs]
    for value in values:
        if value.shape is None:
            continue
        dims = [ir.SymbolicDim(rename[d.value]) if isinstance(d, ir.SymbolicDim) and d.value in rename else d
                for d in value.shape]
        value.shape = ir.Shape(dims)


KEPT_METADATA = ("pkg.torch.onnx.name_scopes",)


def _strip_metadata(model: Any) -> None:
    """Drop the exporter's per-node metadata (FX node text, source stack traces with local file
    paths): about 1 KB a node that no runtime reads. The module path of each node
    (``name_scopes``) stays: quantization decides by it which layers keep full precision."""
    import onnx_ir as ir

    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        kept = {k: v for k, v in node.metadata_props.items() if k in KEPT_METADATA}
        node.metadata_props.clear()
        node.metadata_props.update(kept)
        for value in node.outputs:
            value.metadata_props.clear()
    for value in list(model.graph.inputs) + list(model.graph.initializers.values()):
        value.metadata_props.clear()


def _save(program: Any, path: Path, threshold: int) -> list[Path]:
    """Write the graph (and ``<name>.data`` when over ``threshold`` bytes); check it; list the files."""
    import onnx
    import onnx_ir as ir

    model = program.model
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()  # never leave a stale weights file beside a graph that no longer uses it
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if size > threshold:
        ir.save(model, path, external_data=data.name)
    else:
        ir.save(model, path)
    onnx.checker.check_model(str(path))
    return [path] + ([data] if data.exists() else [])


def _release(module: torch.nn.Module) -> None:
    """torch.export's module-stack tracer keeps the traced root module alive after the export (a
    proxy class per trace holds it): detach the model's submodules, parameters and buffers from the
    wrapper so that they are freed with the model (export_bundle's peak RAM, issue 13). The
    exporter's graphs still reference the parameters (onnxscript's pattern matchers keep the last
    graph they matched): see :func:`free_weights` for a model the caller no longer needs."""
    module._modules.clear()
    module._parameters.clear()
    module._buffers.clear()


class _TransposedLinear(torch.nn.Module):
    """``nn.Linear`` whose weight is exported as ``[in, out]``: it traces to ``MatMul(x, W^T)`` on
    an initializer. ``nn.Linear`` traces to ``MatMul(x, Transpose(W))``, which the exporter's
    optimizer folded into a second, transposed copy of every weight while the model still held the
    first (export peak RAM, issue 13). ``weight_t`` is a view of the linear's weight, not a copy:
    the exporter writes it to the file one tensor at a time."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.weight_t = torch.nn.Parameter(linear.weight.detach().t(), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


@contextlib.contextmanager
def transposed_linears(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block every ``nn.Linear`` under ``module`` is a :class:`_TransposedLinear` over
    its weight; on exit the linears are back in place (their weights were never copied or changed)
    and the views are emptied, so that nothing the exporter keeps holds the weights."""
    swapped: dict[torch.nn.Linear, _TransposedLinear] = {}
    places = []
    try:
        for parent in list(module.modules()):
            for name, child in list(parent._modules.items()):
                if type(child) is torch.nn.Linear:
                    parent._modules[name] = swapped.setdefault(child, _TransposedLinear(child))
                    places.append((parent, name, child))
        yield module
    finally:
        for parent, name, child in places:
            parent._modules[name] = child
        for t in swapped.values():  # the exporter's caches keep the view (and the storage) alive
            t.weight_t.data = torch.empty(0, dtype=t.weight_t.dtype)


def _export(module: torch.nn.Module, args: tuple, path: Path, opset: int, input_names: list[str],
            output_names: list[str], axes: dict[tuple[str, int], str], threshold: int,
            table: dict | None = None) -> list[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Every named axis is traced as a symbol (Dim.DYNAMIC: the exporter keeps guards it cannot
    # prove, such as "two chunks or more", to itself; the ONNX graph has no guards).
    dynamic_shapes = tuple(
        {axis: torch.export.Dim.DYNAMIC for (name, axis) in axes if name == input_name} for input_name in input_names
    )
    # The exporter prints progress and warns about torchvision and axis renaming; keep it quiet.
    # no_grad: with parameters requiring grad, the scan of the decomposed GDN is traced through
    # autograd, which the decomposition step cannot handle.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    try:
        quiet.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=opset, input_names=input_names, output_names=output_names,
                dynamic_shapes=dynamic_shapes, custom_translation_table=table, optimize=True, verbose=False,
            )
    finally:
        quiet.setLevel(level)
    _name_dims(program.model, axes)
    _strip_metadata(program.model)
    return _save(program, path, threshold)


# --------------------------------------------------------------------------- public API
def export_vision(
    rm: Any, path: str | os.PathLike, opset: int = 18,
    external_data_threshold_bytes: int = EXTERNAL_DATA_THRESHOLD,
) -> list[Path]:
    """Export the vision tower for the processor's bucket: ``pixel_values [B, P, C*p*p] -> image_features [B, N, H]``
    (one frame per patch: the bundle's manifest says ``temporal_patch_size`` 1).

    Returns the files written (the graph, then ``<name>.data`` if the weights went external).
    """
    _check_model(rm)
    module = ExportVision(rm).eval()
    batch = _example_batch(rm)
    pixels = batch.pixel_values.reshape(2, module.num_patches, -1).to(rm.device)
    pixels = single_frame_patches(pixels, module.channels, module.temporal_patch_size)
    axes = {("pixel_values", 0): "batch"}
    try:
        with transposed_linears(module):
            return _export(module, (pixels,), Path(path), opset, VISION_INPUTS, VISION_OUTPUTS, axes,
                           external_data_threshold_bytes)
    finally:
        _release(module)


def export_decoder(
    rm: Any, path: str | os.PathLike, gdn: str = "decomposed", opset: int = 18,
    external_data_threshold_bytes: int = EXTERNAL_DATA_THRESHOLD,
) -> list[Path]:
    """Export the prefill decoder with the score head (see docs/bundle.md for the interface).

    ``gdn="contrib"`` uses onnxruntime's com.microsoft GatedDeltaNet / CausalConvWithState
    kernels; ``gdn="decomposed"`` uses standard ONNX ops only (for TensorRT and other back ends).
    Batch, sequence length and the number of query positions are dynamic.
    """
    check_gdn_form(gdn)
    _check_model(rm)
    module = ExportDecoder(rm, gdn=gdn).eval()
    args = _decoder_example(rm, module.embed_tokens.embedding_dim)
    table = _contrib_translation_table() if gdn == "contrib" else None
    try:
        with transposed_linears(module):
            return _export(module, args, Path(path), opset, DECODER_INPUTS, DECODER_OUTPUTS, DECODER_AXES,
                           external_data_threshold_bytes, table)
    finally:
        _release(module)


def free_weights(model: torch.nn.Module) -> None:
    """Empty every parameter and buffer of ``model`` in place, so their memory is returned even
    while the exporter's caches still reference the tensor objects. The model is unusable after."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = torch.empty(0, dtype=t.dtype)


def count_nodes(path: str | os.PathLike, subgraphs: bool = True) -> dict[str, int]:
    """``{op_type: count}`` of a graph (``domain::op`` outside the default domain), with the nodes
    inside Scan / Loop / If bodies counted when ``subgraphs`` is set."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: collections.Counter[str] = collections.Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
            if subgraphs:
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.GRAPH:
                        walk(attr.g)
                    for g in attr.graphs:
                        walk(g)

    walk(model.graph)
    for fn in model.functions:
        for node in fn.node:
            counts[f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
    return dict(counts)
