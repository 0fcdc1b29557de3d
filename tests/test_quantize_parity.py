"""Parity metrics, quantization node selection and modes, and the TensorRT helpers (CPU only)."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from zreward_fast.export.parity import DEFAULT_THRESHOLDS, check_thresholds, parity_report

# ------------------------------------------------------------------------------------------------
# Parity (pure numpy)
# ------------------------------------------------------------------------------------------------

LEVELS = [0.0, 1.0, 2.0]


def test_parity_known_answers():
    # N=2 items, D=2 dimensions, K=3 levels.
    ref = np.array([[[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]],
                    [[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]]])
    test = np.array([[[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]],
                     [[0.0, 1.0, 0.0], [0.5, 0.3, 0.2]]])
    r = parity_report(ref, test, LEVELS, ["a", "b"], pairs=[(0, 1)])
    a, b = r["dimensions"]["a"], r["dimensions"]["b"]
    # a: mu_ref = [0, 1], mu_test = [0.5, 1] -> |dmu| = [0.5, 0]
    assert a["mean_abs_dmu"] == pytest.approx(0.25) and a["max_abs_dmu"] == pytest.approx(0.5)
    # KL(ref || test): item 0 = 1*log(1/0.5) = log 2 (zeros of ref contribute 0), item 1 = 0
    assert a["mean_kl"] == pytest.approx(math.log(2) / 2) and a["max_kl"] == pytest.approx(math.log(2))
    # argmax item 0: ref 0, test 0 (tie 0.5/0.5 -> first) ; item 1 agrees
    assert a["argmax_agreement"] == pytest.approx(1.0)
    # pair (0,1): ref 0 < 1, test 0.5 < 1 -> agree
    assert a["pair_agreement"] == 1.0 and a["pairs_compared"] == 1 and a["pairs_tied"] == 0
    # b: mu_ref = [1.5, 1.3], mu_test = [1.5, 0.7] -> |dmu| = [0, 0.6]; argmax item 1 flips (2 vs 0)
    assert b["mean_abs_dmu"] == pytest.approx(0.3) and b["max_abs_dmu"] == pytest.approx(0.6)
    assert b["mean_kl"] == pytest.approx((0.2 * math.log(0.2 / 0.5) + 0.5 * math.log(0.5 / 0.2)) / 2)
    assert b["argmax_agreement"] == pytest.approx(0.5)
    assert b["pair_agreement"] == 1.0  # 1.5 > 1.3 and 1.5 > 0.7
    ov = r["overall"]
    assert ov["mean_abs_dmu"] == pytest.approx(0.3) and ov["max_abs_dmu"] == pytest.approx(0.6)
    assert ov["argmax_agreement"] == pytest.approx(0.5) and ov["mean_kl"] == pytest.approx(a["mean_kl"])
    assert r["items"] == 2 and r["levels"] == LEVELS and r["tie_tol"] == 0.0
    # Plain JSON types all the way down.
    assert json.loads(json.dumps(r)) == r
    assert all(type(v) in (float, int, type(None)) for blk in r["dimensions"].values() for v in blk.values())


def test_parity_identical_is_perfect_and_zero_probs_are_finite():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(9), size=(5, 4))
    p[0, 0] = np.eye(9)[3]  # a one-hot row: zeros everywhere else
    r = parity_report(p, p.copy(), np.linspace(0, 4, 9), ["alignment", "realism", "aesthetics", "plausibility"],
                      pairs=[(0, 1), (2, 3), (1, 4)])
    ov = r["overall"]
    assert ov["mean_abs_dmu"] == 0.0 and ov["max_kl"] == pytest.approx(0.0, abs=1e-12)
    assert ov["argmax_agreement"] == 1.0 and ov["pair_agreement"] == 1.0
    # test mass 0 where ref has mass: KL is large but finite (eps-guarded)
    ref = np.array([[[0.5, 0.5, 0.0]]])
    test = np.array([[[1.0, 0.0, 0.0]]])
    kl = parity_report(ref, test, LEVELS, ["d"])["dimensions"]["d"]["mean_kl"]
    assert math.isfinite(kl) and kl > 10


def test_parity_pairs_with_ties_and_disagreement():
    # mu_ref = [1, 1, 2, 0]; mu_test = [1, 2, 1, 0]
    lv = [0.0, 1.0, 2.0]
    oh = np.eye(3)
    ref = np.stack([oh[1], oh[1], oh[2], oh[0]])[:, None, :]
    test = np.stack([oh[1], oh[2], oh[1], oh[0]])[:, None, :]
    pairs = [(0, 1), (0, 2), (1, 2), (2, 3), (3, 0)]
    d = parity_report(ref, test, lv, ["x"], pairs)["dimensions"]["x"]
    # (0,1) tied in the reference -> excluded; (0,2): ref <, test = -> disagree; (1,2): ref <, test > -> disagree;
    # (2,3): ref >, test > -> agree; (3,0): ref <, test < -> agree
    assert d["pairs_tied"] == 1 and d["pairs_compared"] == 4
    assert d["pair_agreement"] == pytest.approx(0.5)
    only_ties = parity_report(ref, test, lv, ["x"], [(0, 1)])["dimensions"]["x"]
    assert only_ties["pair_agreement"] is None and only_ties["pairs_compared"] == 0
    assert parity_report(ref, test, lv, ["x"])["overall"]["pair_agreement"] is None
    # tie_tol=1: reference differences of at most 1 count as ties: (0,1), (0,2), (1,2), (3,0);
    # only (2,3) with |2 - 0| = 2 is compared (and agrees)
    wide = parity_report(ref, test, lv, ["x"], pairs, tie_tol=1.0)["dimensions"]["x"]
    assert wide["pairs_compared"] == 1 and wide["pairs_tied"] == 4 and wide["pair_agreement"] == 1.0


def test_parity_validates_inputs():
    p = np.full((2, 1, 3), 1 / 3)
    with pytest.raises(ValueError, match="differ in shape"):
        parity_report(p, np.full((3, 1, 3), 1 / 3), LEVELS, ["d"])
    with pytest.raises(ValueError, match="log-probabilities"):
        parity_report(np.log(p), p, LEVELS, ["d"])
    with pytest.raises(ValueError, match="levels"):
        parity_report(p, p, [0.0, 1.0], ["d"])
    with pytest.raises(ValueError, match="dimension names"):
        parity_report(p, p, LEVELS, ["a", "b"])
    with pytest.raises(ValueError, match="pair indices"):
        parity_report(p, p, LEVELS, ["d"], [(0, 2)])
    with pytest.raises(ValueError, match=r"\[N, D, K\]"):
        parity_report(p[0], p[0], LEVELS, ["d"])


def test_check_thresholds_messages():
    ref = np.array([[[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]])
    test = np.array([[[0.0, 0.929, 0.071]], [[0.0, 0.0, 1.0]]])  # dmu 0.071 on item 0
    r = parity_report(ref, test, LEVELS, ["realism"], [(0, 1)])
    assert check_thresholds(r, {"max_abs_dmu": 0.05}) == ["realism: max |Δμ| 0.071 > 0.05"]
    assert check_thresholds(r, {"max_abs_dmu": 0.1, "pair_agreement": 0.98}) == []
    assert check_thresholds(r, "int8-dynamic") == []  # mean |dmu| 0.0355 <= 0.05
    fails = check_thresholds(r, "none")
    assert fails == ["realism: mean |Δμ| 0.0355 > 0.001", "realism: max |Δμ| 0.071 > 0.001"]
    worse = parity_report(ref, test[::-1], LEVELS, ["realism"], [(0, 1)])
    assert "all dimensions: pooled pairwise agreement 0 < 0.98" in check_thresholds(worse, DEFAULT_THRESHOLDS["int8-static"])
    assert "realism: pairwise agreement 0 < 0.98" in check_thresholds(worse, {"pair_agreement": 0.98})
    no_pairs = parity_report(ref, test, LEVELS, ["realism"])
    assert check_thresholds(no_pairs, "fp8") == ["all dimensions: pooled pairwise agreement not measured (no untied pairs)"]
    assert check_thresholds(no_pairs, {"pair_agreement": 0.98}) == ["realism: pairwise agreement not measured (no untied pairs)"]
    with pytest.raises(ValueError, match="unknown threshold"):
        check_thresholds(r, {"mean_dmu": 0.1})
    with pytest.raises(ValueError, match="unknown mode"):
        check_thresholds(r, "int4")


def test_default_thresholds_cover_every_mode():
    assert set(DEFAULT_THRESHOLDS) == {"none", "int8-dynamic", "int8-static", "fp8"}
    assert DEFAULT_THRESHOLDS["none"]["max_abs_dmu"] == 1e-3
    for mode in ("int8-dynamic", "int8-static", "fp8"):
        assert DEFAULT_THRESHOLDS[mode] == {"mean_abs_dmu": 0.05, "pair_agreement_pooled": 0.98}


# ------------------------------------------------------------------------------------------------
# Graphs: a module named like Qwen3.5 (GDN layers, MLP, norms, patch embedding, score head)
# ------------------------------------------------------------------------------------------------

import torch  # noqa: E402

nn = torch.nn
HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript"))
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="needs onnx, onnxruntime and onnxscript (the export extra)")
if HAVE_ONNX:  # the parity tests above run without them
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto

    from zreward_fast.export import quantize as zq
    from zreward_fast.export import tensorrt as ztrt

H, PATCH = 128, 48


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class GDN(nn.Module):
    """Projections named as in Qwen3.5's Gated DeltaNet; gates 48 wide so that only names exclude them."""

    def __init__(self, h, heads=48):
        super().__init__()
        self.in_proj_qkv = nn.Linear(h, 3 * h, bias=False)
        self.in_proj_z = nn.Linear(h, h, bias=False)
        self.in_proj_a = nn.Linear(h, heads, bias=False)
        self.in_proj_b = nn.Linear(h, heads, bias=False)
        self.A_log = nn.Parameter(torch.zeros(heads))
        self.dt_bias = nn.Parameter(torch.ones(heads))
        self.norm = RMSNorm(h)
        self.out_proj = nn.Linear(h, h, bias=False)

    def forward(self, x):
        q, k, v = self.in_proj_qkv(x).chunk(3, -1)
        g = -self.A_log.exp() * nn.functional.softplus(self.in_proj_a(x) + self.dt_bias)
        beta = torch.sigmoid(self.in_proj_b(x))
        state = (q * k).sum(-1, keepdim=True)  # stands in for the recurrence
        o = self.norm(v * torch.tanh(state)) * nn.functional.silu(self.in_proj_z(x))
        return self.out_proj(o) + (g * beta).mean(-1, keepdim=True)


class MLP(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.gate_proj = nn.Linear(h, 2 * h, bias=False)
        self.up_proj = nn.Linear(h, 2 * h, bias=False)
        self.down_proj = nn.Linear(2 * h, h, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.input_layernorm = RMSNorm(h)
        self.linear_attn = GDN(h)
        self.post_attention_layernorm = RMSNorm(h)
        self.mlp = MLP(h)

    def forward(self, x):
        x = x + self.linear_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class PatchEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(PATCH, H)

    def forward(self, x):
        return self.proj(x)


class Mimic(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = PatchEmbed()
        self.layers = nn.ModuleList([Layer(H), Layer(H)])
        self.norm = RMSNorm(H)
        self.score = nn.Linear(H, 9, bias=False)

    def forward(self, x):
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return torch.log_softmax(self.score(self.norm(x)), -1)


QUANTIZED = {f"layers.{i}.{m}" for i in (0, 1) for m in (
    "linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
EXCLUDED = {"patch_embed.proj": "name:patch_embed", "score": "name:score_head"} | {
    f"layers.{i}.linear_attn.in_proj_{g}": "name:gdn_gate" for i in (0, 1) for g in ("a", "b")} | {
    f"layers.{i}.linear_attn.out_proj": "name:gdn_out" for i in (0, 1)}


def _export(module, args, path: Path, dynamo: bool, names=("x",), dyn_axes=None, **kw) -> Path:
    import warnings

    module = module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(module, args, str(path), dynamo=True, input_names=list(names), opset_version=18,
                              dynamic_shapes=dyn_axes, verbose=False, **kw)
        else:
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=list(names), opset_version=18,
                              dynamic_axes=dyn_axes, **kw)
    return path


@pytest.fixture(scope="module")
def mimic_graphs(tmp_path_factory):
    torch.manual_seed(0)
    m = Mimic()
    x = torch.randn(2, 5, PATCH)
    d = tmp_path_factory.mktemp("mimic")
    b, s = torch.export.Dim("batch"), torch.export.Dim("seq")
    return {
        True: _export(m, (x,), d / "dynamo.onnx", True, dyn_axes={"x": {0: b, 1: s}}),
        False: _export(m, (x,), d / "torchscript.onnx", False, dyn_axes={"x": {0: "batch", 1: "seq"}}),
    }


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

    path = _export(Head(), (torch.randn(2, 3, 64),), tmp_path / "raw.onnx", True, optimize=False)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Transpose" in ops  # unoptimised dynamo export: MatMul(x, Transpose(mlp.gate_proj.weight))
    q, x, report = zq.select_quantizable_nodes(path)
    by_module = {n["module"]: n for n in report["nodes"]}
    assert {n["module"] for n in report["nodes"] if n["quantize"]} == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert by_module["mlp.gate_proj"]["shape"] == [64, 128]  # as the MatMul sees it, not [128, 64]
    assert [n["reason"] for n in report["nodes"] if not n["quantize"]] == ["shape:narrow"]  # [512, 9] score rows


# ------------------------------------------------------------------------------------------------
# quantize_bundle_graph on a small MLP-like graph
# ------------------------------------------------------------------------------------------------


class Block(nn.Module):
    """RMSNorm + LayerNorm, a GDN-style gate projection, an MLP and a 2-D Linear (a Gemm)."""

    def __init__(self, h=64):
        super().__init__()
        self.input_layernorm = RMSNorm(h)
        self.mlp = MLP(h)
        self.linear_attn = nn.Module()
        self.linear_attn.in_proj_a = nn.Linear(h, 96, bias=False)
        self.post_norm = nn.LayerNorm(h)
        self.pool = nn.Linear(h, h)  # applied to a 2-D tensor: exported as Gemm
        self.score = nn.Linear(h, 9, bias=False)

    def forward(self, x):
        y = self.input_layernorm(x)
        gate = torch.sigmoid(self.linear_attn.in_proj_a(y)).mean(-1, keepdim=True)
        x = x + self.mlp(y) * gate
        x = x + self.pool(x.mean(1)).unsqueeze(1)
        return torch.log_softmax(self.score(self.post_norm(x)), -1)


@pytest.fixture(scope="module")
def block_graph(tmp_path_factory):
    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("block")
    m = Block()
    path = _export(m, (torch.randn(2, 6, 64),), d / "block.onnx", False, dyn_axes={"x": {0: "batch", 1: "seq"}})
    assert "Gemm" in {n.op_type for n in onnx.load(str(path)).graph.node}
    rng = np.random.default_rng(0)
    # different sequence lengths per batch, as decoder prompts have
    calib = [{"x": rng.standard_normal((4, 5 + i % 3, 64)).astype(np.float32)} for i in range(8)]
    test_x = rng.standard_normal((3, 6, 64)).astype(np.float32)
    ref = _run(path, test_x)
    with torch.no_grad():
        np.testing.assert_allclose(ref, m(torch.from_numpy(test_x)).numpy(), atol=1e-5)
    return {"path": path, "calib": calib, "x": test_x, "ref": ref}


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _weight_dtypes(model) -> dict[str, int]:
    return {t.name: t.data_type for t in model.graph.initializer}


@needs_onnx
@pytest.mark.parametrize("mode", ["int8-dynamic", "int8-static", "fp8"])
def test_quantize_modes(block_graph, tmp_path, mode):
    src = block_graph["path"]
    reader = None if mode == "int8-dynamic" else zq.ArrayCalibrationReader(block_graph["calib"])
    dst = tmp_path / f"{mode}.onnx"
    report = zq.quantize_bundle_graph(src, dst, mode, reader, show_progress=False)
    assert report["mode"] == mode and report["tool"] == "onnxruntime" and report["external_data"] is False
    # mlp gate/up/down and the Gemm are quantized; the gate projection and the score head are not.
    modules = {v["module"]: v["reason"] for v in report["excluded_reasons"].values()}
    # TorchScript drops the scope of a bare nn.Module container: "/in_proj_a/MatMul"
    assert modules == {"in_proj_a": "name:gdn_gate", "score": "name:score_head"}
    assert report["quantized"] == 4
    assert report["size_bytes"]["after"] < report["size_bytes"]["before"]
    assert json.loads(json.dumps(report)) == report
    assert sorted(p.name for p in tmp_path.iterdir()) == [dst.name]  # no stray temporary files

    out = _run(dst, block_graph["x"])
    ref = block_graph["ref"]
    dmu = np.abs(np.exp(out) @ np.arange(9.0) * 0.5 - np.exp(ref) @ np.arange(9.0) * 0.5)
    assert np.abs(np.exp(out) - np.exp(ref)).max() < 0.03 and dmu.mean() < 0.02, (mode, dmu.mean())

    model = onnx.load(str(dst))
    g = model.graph
    dtypes = _weight_dtypes(model)
    producers = {o: n for n in g.node for o in n.output}
    dq_inputs = {n.input[0] for n in g.node if n.op_type == "DequantizeLinear"}
    for name in report["excluded"]:
        node = next(n for n in g.node if n.name == name)
        w = node.input[1]
        assert dtypes.get(w) == TensorProto.FLOAT, (name, w)  # float32 initializer, used directly
        assert w not in producers and w not in dq_inputs
    ops = {n.op_type for n in g.node}
    if mode == "int8-dynamic":
        assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops and "Gemm" not in ops
        b_inputs = [n.input[1] for n in g.node if n.op_type == "MatMulInteger"]
        assert len(b_inputs) == 4 and all(dtypes[b] == TensorProto.INT8 for b in b_inputs)
    else:
        qtype = TensorProto.INT8 if mode == "int8-static" else TensorProto.FLOAT8E4M3FN
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        for name in report["quantized_nodes"]:
            node = next(n for n in g.node if n.name == name)
            dq = producers[node.input[1]]
            assert dq.op_type == "DequantizeLinear" and dtypes[dq.input[0]] == qtype  # weight
            assert dtypes[dq.input[2]] == qtype  # zero point
            act = producers[node.input[0]]
            assert act.op_type == "DequantizeLinear"  # activation Q/DQ pair, calibrated
            assert dtypes[act.input[2]] == qtype
            assert producers[act.input[0]].op_type == "QuantizeLinear"
        if mode == "fp8":
            assert report["opset"] == 19


def _handmade_graph(path: Path) -> Path:
    """Weights as a Constant, a Cast of fp16, an Identity(Transpose) and a Gemm with alpha/beta; no node names."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((64, 128)) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((128, 64)) * 0.1).astype(np.float16)
    w3 = (rng.standard_normal((64, 64)) * 0.1).astype(np.float32)
    w4 = (rng.standard_normal((96, 64)) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("LayerNormalization", ["x", "ln_w", "ln_b"], ["xn"], axis=-1),
        helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1, "w1v")),
        helper.make_node("MatMul", ["xn", "w1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Cast", ["w2_fp16"], ["w2"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"]),
        helper.make_node("Transpose", ["w3"], ["w3t"], perm=[1, 0]),
        helper.make_node("Identity", ["w3t"], ["w3ti"]),
        helper.make_node("MatMul", ["h2", "w3ti"], ["h3"]),
        helper.make_node("Gemm", ["h3", "w4", "c4"], ["y"], transB=1, alpha=0.5, beta=2.0),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("ln_w", np.ones(64, np.float32)), ("ln_b", np.zeros(64, np.float32)), ("w2_fp16", w2), ("w3", w3),
        ("w4", w4), ("c4", rng.standard_normal(96).astype(np.float32))]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 96])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@needs_onnx
@pytest.mark.parametrize("mode,tol", [("int8-dynamic", 0.02), ("int8-static", 0.02), ("fp8", 0.15)])
def test_quantize_prepares_constant_cast_transposed_and_gemm_weights(tmp_path, mode, tol):
    src = _handmade_graph(tmp_path / "hand.onnx")
    q, _, sel = zq.select_quantizable_nodes(src)
    assert q == [] and sel["unnamed"] == 4  # quantize_bundle_graph names them
    rng = np.random.default_rng(1)
    reader = zq.ArrayCalibrationReader([{"x": rng.standard_normal((8, 64)).astype(np.float32)} for _ in range(4)])
    dst = tmp_path / "q.onnx"
    report = zq.quantize_bundle_graph(src, dst, mode, None if mode == "int8-dynamic" else reader, show_progress=False)
    assert report["quantized"] == 4 and report["excluded"] == []
    assert report["prepared"]["folded_weights"] == 3 and report["prepared"]["gemm_scales_folded"] == 1
    x = rng.standard_normal((5, 64)).astype(np.float32)
    ref = _run(src, x)
    out = _run(dst, x)
    assert np.abs(out - ref).max() / np.abs(ref).max() < tol
    ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert ("MatMulInteger" in ops) if mode == "int8-dynamic" else ("DequantizeLinear" in ops)


@needs_onnx
def test_static_quantizes_activations_after_contrib_ops(tmp_path):
    """Contrib ops (the GDN kernels) are untyped for ONNX shape inference: their outputs get typed."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["xn"], axis=-1, name="ln"),
        helper.make_node("MatMul", ["xn", "w1"], ["h"], name="/mlp/up_proj/MatMul"),
        helper.make_node("FastGelu", ["h"], ["a"], domain="com.microsoft", name="gelu"),
        helper.make_node("Relu", ["a"], ["a2"], name="relu"),
        helper.make_node("MatMul", ["a2", "w2"], ["y"], name="/mlp/down_proj/MatMul"),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w1", (rng.standard_normal((64, 128)) * 0.1).astype(np.float32)),
        ("w2", (rng.standard_normal((128, 64)) * 0.1).astype(np.float32)),
        ("g", np.ones(64, np.float32)), ("b", np.zeros(64, np.float32))]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 64])], inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    src = tmp_path / "contrib.onnx"
    onnx.save(model, str(src))
    reader = zq.ArrayCalibrationReader([{"x": rng.standard_normal((2, 5, 64)).astype(np.float32)} for _ in range(3)])
    report = zq.quantize_bundle_graph(src, tmp_path / "q.onnx", "int8-static", reader, show_progress=False)
    assert report["prepared"]["typed_custom_outputs"] == 1 and report["quantized"] == 2
    g = onnx.load(str(tmp_path / "q.onnx")).graph
    producers = {o: n for n in g.node for o in n.output}
    down = next(n for n in g.node if n.name == "/mlp/down_proj/MatMul")
    assert producers[down.input[0]].op_type == "DequantizeLinear"  # its activation is quantized too
    x = rng.standard_normal((1, 4, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(tmp_path / "q.onnx", x), _run(src, x), atol=0.05)


@needs_onnx
def test_fp8_uses_modelopt_when_installed(block_graph, tmp_path, monkeypatch):
    """The ModelOpt glue (names as anchored regexes, fp32 high precision) against a stand-in module."""
    import sys
    import types

    calls = {}

    def fake_quantize(onnx_path, quantize_mode="int8", calibration_data_reader=None, calibration_method=None,
                      calibration_eps=None, op_types_to_quantize=None, nodes_to_quantize=None,
                      nodes_to_exclude=None, use_external_data_format=False, output_path=None,
                      high_precision_dtype="fp16"):
        calls.update(locals())
        calls["feeds"] = len(list(iter(calibration_data_reader.get_next, None)))
        onnx.save(onnx.load(onnx_path), output_path)

    mods = {name: types.ModuleType(name) for name in ("modelopt", "modelopt.onnx", "modelopt.onnx.quantization")}
    mods["modelopt.onnx.quantization"].quantize = fake_quantize
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    assert zq.modelopt_available()
    report = zq.quantize_bundle_graph(block_graph["path"], tmp_path / "f.onnx", "fp8",
                                      zq.ArrayCalibrationReader(block_graph["calib"]), show_progress=False)
    assert report["tool"] == "modelopt"
    assert calls["quantize_mode"] == "fp8" and calls["high_precision_dtype"] == "fp32"
    assert calls["feeds"] == len(block_graph["calib"])
    assert calls["nodes_to_quantize"] == ["^" + __import__("re").escape(n) + "$" for n in report["quantized_nodes"]]
    assert len(calls["nodes_to_exclude"]) == 2 and calls["calibration_eps"] == ["cpu"]


@needs_onnx
def test_quantize_external_data(block_graph, tmp_path):
    src = tmp_path / "src" / "block.onnx"
    src.parent.mkdir()
    onnx.save_model(onnx.load(str(block_graph["path"])), str(src), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="block.onnx.data", size_threshold=0)
    assert (src.parent / "block.onnx.data").is_file()
    out = tmp_path / "out"
    for mode in ("int8-dynamic", "int8-static"):
        reader = zq.ArrayCalibrationReader(block_graph["calib"]) if mode == "int8-static" else None
        dst = out / f"{mode}.onnx"
        report = zq.quantize_bundle_graph(src, dst, mode, reader, external_data=True, show_progress=False)
        assert report["external_data"] is True
        assert (out / f"{mode}.onnx.data").is_file()
        assert report["size_bytes"]["after"] == dst.stat().st_size + (out / f"{mode}.onnx.data").stat().st_size
        np.testing.assert_allclose(np.exp(_run(dst, block_graph["x"])), np.exp(block_graph["ref"]), atol=0.03)
    # From external data back to one self-contained file; rerunning replaces the old output cleanly.
    for _ in range(2):
        dst = out / "single.onnx"
        report = zq.quantize_bundle_graph(src, dst, "int8-dynamic", show_progress=False)
        assert report["external_data"] is False and not (out / "single.onnx.data").exists()
        onnx.load(str(dst)).graph  # loads alone
        assert _run(dst, block_graph["x"]).shape == (3, 6, 9)


@needs_onnx
def test_quantize_errors_and_nothing_to_quantize(block_graph, tmp_path):
    src = block_graph["path"]
    with pytest.raises(ValueError, match="mode must be one of"):
        zq.quantize_bundle_graph(src, tmp_path / "a.onnx", "int4")
    with pytest.raises(ValueError, match="calibration_reader"):
        zq.quantize_bundle_graph(src, tmp_path / "a.onnx", "int8-static")
    with pytest.raises(ValueError, match="missing"):
        bad = zq.ArrayCalibrationReader([{"pixel_values": np.zeros((1, 2), np.float32)}])
        zq.quantize_bundle_graph(src, tmp_path / "a.onnx", "int8-static", bad)
    with pytest.raises(FileNotFoundError):
        zq.quantize_bundle_graph(tmp_path / "nope.onnx", tmp_path / "a.onnx", "int8-dynamic")
    with pytest.raises(ValueError):
        zq.ArrayCalibrationReader([])
    if not zq.modelopt_available():
        with pytest.raises(ImportError, match="ModelOpt"):
            zq.quantize_bundle_graph(src, tmp_path / "a.onnx", "fp8", zq.ArrayCalibrationReader(block_graph["calib"]),
                                     fp8_tool="modelopt")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x).relu()

    tiny = _export(Tiny(), (torch.randn(2, 3, 8),), tmp_path / "tiny.onnx", False)
    report = zq.quantize_bundle_graph(tiny, tmp_path / "tiny_q.onnx", "int8-dynamic", show_progress=False)
    assert report["tool"] == "none" and report["quantized"] == 0 and report["excluded"]
    assert _run(tmp_path / "tiny_q.onnx", np.ones((2, 3, 8), np.float32)).shape == (2, 3, 8)


@needs_onnx
def test_array_calibration_reader():
    feeds = [{"x": np.full((1, 2), i, np.float32)} for i in range(5)]
    r = zq.ArrayCalibrationReader(feeds)
    assert len(r) == 5 and [f["x"][0, 0] for f in r] == [0, 1, 2, 3, 4]
    assert r.get_next() is None
    r.rewind()
    r.set_range(1, 3)
    assert [f["x"][0, 0] for f in iter(r.get_next, None)] == [1, 2]
    with pytest.raises(ValueError, match="feed 1"):
        zq.ArrayCalibrationReader([{"x": np.zeros(1)}, {"y": np.zeros(1)}])


# ------------------------------------------------------------------------------------------------
# TensorRT helpers
# ------------------------------------------------------------------------------------------------


class DecoderLike(nn.Module):
    """Inputs shaped like decoder.onnx: [B, L] ids, [3, B, L] positions, [B, N, H] features, [B, D] queries."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 16)

    def forward(self, input_ids, position_ids, image_features, query_positions):
        h = self.embed(input_ids) + position_ids.sum(0, keepdim=False).unsqueeze(-1).float()
        h = self.fc(h) + image_features.mean(1, keepdim=True)
        return torch.gather(h.sum(-1), 1, query_positions)


@pytest.fixture(scope="module")
def decoder_like(tmp_path_factory):
    d = tmp_path_factory.mktemp("trt")
    args = (torch.randint(0, 50, (2, 7)), torch.randint(0, 7, (3, 2, 7)), torch.randn(2, 4, 16),
            torch.tensor([[5, 6], [5, 6]]))
    names = ("input_ids", "position_ids", "image_features", "query_positions")
    axes = {"input_ids": {0: "batch", 1: "seq"}, "position_ids": {1: "batch", 2: "seq"},
            # as the dynamo exporter may do: the batch under another symbol in one input
            "image_features": {0: "s28"}, "query_positions": {0: "batch", 1: "queries"}}
    return _export(DecoderLike(), args, d / "decoder.onnx", False, names=names, dyn_axes=axes)


@needs_onnx
def test_profile_shapes(decoder_like):
    shapes = ztrt.profile_shapes(decoder_like, 1, 4, 16, seq_len=(8, 64, 256), other_dims={"queries": (1, 4, 4)})
    assert shapes == {
        "input_ids": ((1, 8), (4, 64), (16, 256)),
        "position_ids": ((3, 1, 8), (3, 4, 64), (3, 16, 256)),
        "image_features": ((1, 4, 16), (4, 4, 16), (16, 4, 16)),
        "query_positions": ((1, 1), (4, 4), (16, 4)),
    }
    with pytest.raises(ValueError, match="query_positions:1 \\(queries\\)"):
        ztrt.profile_shapes(decoder_like, seq_len=(8, 64, 256))
    with pytest.raises(ValueError, match="seq_len"):
        ztrt.profile_shapes(decoder_like, other_dims={"query_positions:1": (1, 4, 4)})
    with pytest.raises(ValueError, match="min <= opt <= max"):
        ztrt.profile_shapes(decoder_like, 8, 4, 16, seq_len=(8, 64, 256), other_dims={"queries": (1, 4, 4)})


@needs_onnx
def test_profile_shapes_vision_like(mimic_graphs):
    # dynamo-exported graph: symbols come from torch.export.Dim names
    shapes = ztrt.profile_shapes(mimic_graphs[True], 1, 8, 32, seq_len=(16, 256, 1024))
    assert shapes == {"x": ((1, 16, PATCH), (8, 256, PATCH), (32, 1024, PATCH))}


@needs_onnx
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_build_engine_without_tensorrt(mimic_graphs, tmp_path):
    with pytest.raises(ImportError, match="TensorRT is not installed"):
        ztrt.build_engine(mimic_graphs[False], tmp_path / "x.engine", seq_len=(1, 8, 16))
    assert issubclass(ztrt.TensorRTNotInstalledError, ImportError)


@needs_onnx
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs TensorRT (a GPU machine)")
def test_build_engine_with_tensorrt(mimic_graphs, tmp_path):
    import tensorrt as trt

    engine = ztrt.build_engine(mimic_graphs[False], tmp_path / "mimic.engine", 1, 2, 4, seq_len=(1, 8, 16),
                               workspace_gb=1.0)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    assert runtime.deserialize_cuda_engine(engine.read_bytes()) is not None


def test_parity_pairs_per_dimension_and_pooled():
    levels = np.linspace(0.0, 4.0, 9)
    ref = np.zeros((4, 2, 9))
    # item means on dim a: 4, 0, 4, 0 ; on dim b: 0, 4, 0, 4 (one-hot distributions)
    ref[[0, 2], 0, 8] = ref[[1, 3], 0, 0] = 1.0
    ref[[0, 2], 1, 0] = ref[[1, 3], 1, 8] = 1.0
    test = ref.copy()
    test[1] = test[0]  # item 1 now looks like item 0: the (0, 1) preference is lost on both dims
    rep = parity_report(ref, test, levels, ["a", "b"], {"a": [(0, 1), (2, 3)], "b": [(2, 3)]})
    assert rep["dimensions"]["a"]["pairs_compared"] == 2 and rep["dimensions"]["a"]["pair_agreement"] == 0.5
    assert rep["dimensions"]["b"]["pairs_compared"] == 1 and rep["dimensions"]["b"]["pair_agreement"] == 1.0
    assert rep["overall"]["pair_agreement"] == 0.5
    assert rep["overall"]["pair_agreement_pooled"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unknown dimensions"):
        parity_report(ref, test, levels, ["a", "b"], {"c": [(0, 1)]})
