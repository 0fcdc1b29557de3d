"""Which nodes of a Qwen3.5 graph the quantizer keeps in float, and why (export/quantize/policy.py)."""
from __future__ import annotations

import json

import pytest
import torch
from onnx_graphs import HAVE_ONNX, MLP, RMSNorm, export_graph, needs_onnx

nn = torch.nn
if HAVE_ONNX:
    import onnx

    from zreward_fast.export import quantize as zq

QUANTIZED = {f"layers.{i}.{m}" for i in (0, 1) for m in (
    "linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
EXCLUDED = {"patch_embed.proj": "name:patch_embed", "score": "name:score_head"} | {
    f"layers.{i}.linear_attn.in_proj_{g}": "name:gdn_gate" for i in (0, 1) for g in ("a", "b")} | {
    f"layers.{i}.linear_attn.out_proj": "name:gdn_out" for i in (0, 1)}


@needs_onnx
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_selection_on_both_exporters(mimic_graphs, dynamo):
    path = mimic_graphs[dynamo]
    inits = [t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer]
    assert not any("gate_proj" in n for n in inits), "exporter kept names: the test would not cover renaming"
    q, x, report = zq.select_quantizable_nodes(path)
    modules = {n["node"]: n["module"] for n in report["nodes"]}
    assert {modules[n] for n in q} == QUANTIZED
    assert {modules[n]: report["excluded_nodes"][n] for n in x} == EXCLUDED
    assert report["candidates"] == 18 and report["quantized"] == 10 and report["excluded"] == 8
    assert report["excluded_by_reason"] == {"name:gdn_gate": 4, "name:gdn_out": 2, "name:patch_embed": 1,
                                            "name:score_head": 1}
    assert json.loads(json.dumps(report)) == report


@needs_onnx
def test_selection_falls_back_to_shape_and_graph_rules_without_names(mimic_graphs, tmp_path):
    model = onnx.load(str(mimic_graphs[False]))
    renames = {t.name: f"w{i}" for i, t in enumerate(model.graph.initializer)}
    for t in model.graph.initializer:
        t.name = renames[t.name]
    for i, n in enumerate(model.graph.node):
        n.name = f"n{i}"
        n.input[:] = [renames.get(v, v) for v in n.input]
        del n.metadata_props[:]
    path = tmp_path / "anonymous.onnx"
    onnx.save(model, str(path))
    q, x, report = zq.select_quantizable_nodes(path)
    shapes = {n["node"]: (tuple(n["shape"]), n["reason"]) for n in report["nodes"]}
    assert all(n["module"] is None for n in report["nodes"])
    reasons = sorted(r for _, r in shapes.values() if r)
    # patch embedding: reads the graph input; in_proj_a: feeds Softplus; score [128, 9]: tiny.
    assert reasons == ["graph:feeds_gdn_gate"] * 2 + ["graph:reads_graph_input", "shape:tiny"]
    # in_proj_b (48 wide, sigmoid) is only recognisable by name: quantized once names are gone.
    assert len(q) == 14


@needs_onnx
def test_selection_traces_transposed_weights(tmp_path):
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = RMSNorm(64)
            self.mlp = MLP(64)
            self.register_buffer("score_rows", torch.randn(9, 512))

        def forward(self, x):
            return self.mlp(self.norm(x)).repeat(1, 1, 8) @ self.score_rows.T

    path = export_graph(Head(), (torch.randn(2, 3, 64),), tmp_path / "raw.onnx", True, optimize=False)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Transpose" in ops  # unoptimised dynamo export: MatMul(x, Transpose(mlp.gate_proj.weight))
    q, x, report = zq.select_quantizable_nodes(path)
    by_module = {n["module"]: n for n in report["nodes"]}
    assert {n["module"] for n in report["nodes"] if n["quantize"]} == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert by_module["mlp.gate_proj"]["shape"] == [64, 128]  # as the MatMul sees it, not [128, 64]
    assert [n["reason"] for n in report["nodes"] if not n["quantize"]] == ["shape:narrow"]  # [512, 9] score rows
