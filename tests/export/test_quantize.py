"""quantize_bundle_graph in every mode on small graphs: the preparation passes, calibration,
external data, errors (export/quantize/)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx_graphs import HAVE_ONNX, MLP, RMSNorm, export_graph, needs_onnx

nn = torch.nn
if HAVE_ONNX:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto

    from zreward_fast.export import quantize as zq

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
    path = export_graph(m, (torch.randn(2, 6, 64),), d / "block.onnx", False, dyn_axes={"x": {0: "batch", 1: "seq"}})
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


MODES_AND_TOOLS = [("int8-dynamic", "onnxruntime"), ("int8-static", "onnxruntime"), ("fp8", "onnxruntime"),
                   ("int8-weight", "onnxruntime"), ("int4-weight", "onnxruntime"),
                   # NVIDIA ModelOpt's ONNX PTQ, run for real where it is installed (make install's dev extra)
                   ("int8-static", "modelopt"), ("fp8", "modelopt")]


@needs_onnx
@pytest.mark.parametrize("mode,tool", MODES_AND_TOOLS)
def test_quantize_modes(block_graph, tmp_path, mode, tool):
    if tool == "modelopt" and not zq.modelopt_available():
        pytest.skip("NVIDIA ModelOpt is not installed (pip install -e '.[modelopt]')")
    src = block_graph["path"]
    reader = zq.ArrayCalibrationReader(block_graph["calib"]) if mode in zq.CALIBRATED_MODES else None
    dst = tmp_path / f"{mode}.onnx"
    report = zq.quantize_bundle_graph(src, dst, mode, reader, show_progress=False, tool=tool)
    assert report["mode"] == mode and report["tool"] == tool and report["external_data"] is False
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
    elif mode.endswith("-weight"):
        # weight-only: packed block-wise weights, the activations stay float (no Q/DQ, no MatMulInteger)
        nbits = [n for n in g.node if n.op_type == "MatMulNBits"]
        assert len(nbits) == 4 and not ops & {"QuantizeLinear", "DequantizeLinear", "MatMulInteger", "Gemm"}
        for n in nbits:
            a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
            assert a["bits"] == int(mode[3]) and a["block_size"] == zq.WEIGHT_BLOCK_SIZE
            assert a["accuracy_level"] == zq.WEIGHT_ACCURACY_LEVEL and dtypes[n.input[1]] == TensorProto.UINT8
        assert sorted(n.name for n in nbits) == sorted(f"{q}_Q{mode[3]}" for q in report["quantized_nodes"])
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
@pytest.mark.parametrize("mode,tol", [("int8-dynamic", 0.02), ("int8-static", 0.02), ("fp8", 0.15),
                                      ("int8-weight", 0.02), ("int4-weight", 0.15)])
def test_quantize_prepares_constant_cast_transposed_and_gemm_weights(tmp_path, mode, tol):
    src = _handmade_graph(tmp_path / "hand.onnx")
    q, _, sel = zq.select_quantizable_nodes(src)
    assert q == [] and sel["unnamed"] == 4  # quantize_bundle_graph names them
    rng = np.random.default_rng(1)
    reader = zq.ArrayCalibrationReader([{"x": rng.standard_normal((8, 64)).astype(np.float32)} for _ in range(4)])
    dst = tmp_path / "q.onnx"
    report = zq.quantize_bundle_graph(src, dst, mode, reader if mode in zq.CALIBRATED_MODES else None,
                                      show_progress=False)
    assert report["quantized"] == 4 and report["excluded"] == []
    assert report["prepared"]["folded_weights"] == 3 and report["prepared"]["gemm_scales_folded"] == 1
    x = rng.standard_normal((5, 64)).astype(np.float32)
    ref = _run(src, x)
    out = _run(dst, x)
    assert np.abs(out - ref).max() / np.abs(ref).max() < tol
    ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    expected = {"int8-dynamic": "MatMulInteger", "int8-weight": "MatMulNBits", "int4-weight": "MatMulNBits"}
    assert expected.get(mode, "DequantizeLinear") in ops


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
def test_modelopt_leaves_onnxruntimes_quantizers_as_it_found_them(block_graph, tmp_path):
    """ModelOpt patches onnxruntime's calibrators in place and never restores them (its
    `patch_ort_modules`); after a ModelOpt run, onnxruntime's int8-static works in the same process."""
    if not zq.modelopt_available():
        pytest.skip("NVIDIA ModelOpt is not installed (pip install -e '.[modelopt]')")
    from onnxruntime.quantization import calibrate

    before = calibrate.create_calibrator, dict(vars(calibrate.MinMaxCalibrater))
    reader = zq.ArrayCalibrationReader(block_graph["calib"])
    zq.quantize_bundle_graph(block_graph["path"], tmp_path / "mo.onnx", "int8-static", reader, show_progress=False,
                             tool="modelopt")
    assert calibrate.create_calibrator is before[0] and dict(vars(calibrate.MinMaxCalibrater)) == before[1]
    reader.rewind()
    report = zq.quantize_bundle_graph(block_graph["path"], tmp_path / "ort.onnx", "int8-static", reader,
                                      show_progress=False, tool="onnxruntime")
    assert report["tool"] == "onnxruntime" and report["quantized"] == 4


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
@pytest.mark.parametrize("external", [False, True])
def test_int8_dynamic_writes_what_quantize_dynamic_writes(tiny_sources, tmp_path, monkeypatch, external):
    """The weights-held-once driver (export/quantize/dynamic.py) against onnxruntime's own
    `quantize_dynamic` on a real decoder graph: the same nodes and the same weights, bit for bit."""
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def ort_quantize_dynamic(job):
        quantize_dynamic(job.src, job.dst, op_types_to_quantize=["MatMul"], per_channel=job.per_channel,
                         reduce_range=job.reduce_range, weight_type=QuantType.QInt8, nodes_to_quantize=job.nodes_q,
                         nodes_to_exclude=job.nodes_x, use_external_data_format=job.external_data,
                         extra_options={"MatMulConstBOnly": True})

    src = tiny_sources[1] / "decoder.onnx"
    ours = zq.quantize_bundle_graph(src, tmp_path / "ours" / "d.onnx", "int8-dynamic", external_data=external,
                                    show_progress=False)
    monkeypatch.setitem(zq.PIPELINES, ("int8-dynamic", "onnxruntime"), ort_quantize_dynamic)
    theirs = zq.quantize_bundle_graph(src, tmp_path / "ort" / "d.onnx", "int8-dynamic", external_data=external,
                                      show_progress=False)
    assert ours["quantized"] == theirs["quantized"] > 0
    a, b = (onnx.load(str(tmp_path / d / "d.onnx")) for d in ("ours", "ort"))
    assert [(n.op_type, list(n.input), list(n.output)) for n in a.graph.node] == \
           [(n.op_type, list(n.input), list(n.output)) for n in b.graph.node]
    assert {v.name for v in a.graph.value_info} == {v.name for v in b.graph.value_info}
    wa = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    wb = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert wa.keys() == wb.keys() and any(w.dtype == np.int8 for w in wa.values())
    for name in wa:
        assert wa[name].dtype == wb[name].dtype and np.array_equal(wa[name], wb[name]), name


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
    with pytest.raises(ValueError, match="tool must be"):
        zq.quantize_bundle_graph(src, tmp_path / "a.onnx", "int8-dynamic", tool="tensorrt")
    with pytest.raises(ValueError, match="not 'int8-dynamic'"):
        zq.quantize_bundle_graph(src, tmp_path / "a.onnx", "int8-dynamic", tool="modelopt")
    if not zq.modelopt_available():
        with pytest.raises(ImportError, match="ModelOpt"):
            zq.quantize_bundle_graph(src, tmp_path / "a.onnx", "fp8", zq.ArrayCalibrationReader(block_graph["calib"]),
                                     tool="modelopt")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x).relu()

    tiny = export_graph(Tiny(), (torch.randn(2, 3, 8),), tmp_path / "tiny.onnx", False)
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
