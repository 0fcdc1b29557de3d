"""int8-dynamic's per-layer fallback by measured sensitivity (export/quantize/sensitivity.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx_graphs import HAVE_ONNX, needs_onnx

from zreward_fast import ZRewardModel
from zreward_fast.testing import tiny_model

if HAVE_ONNX:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from zreward_fast.export.quantize import policy
    from zreward_fast.export.quantize.sensitivity import (
        REACHABLE_SLACK, candidate_linears, choose_fallback, fake_quant_activation, fake_quant_weight, fake_quantized,
        fewest_to_keep,
    )

OUTLIER_LAYER = "model.language_model.layers.1.mlp.down_proj"


def _outlier_student():
    """The tiny student with one channel of layer 1's MLP product 300x the rest: that ``down_proj``'s
    input has the outlier that per-tensor activation scales handle worst (emulated int8-dynamic moves
    its means by 0.068, and by 0.004 with that one layer in float)."""
    model, processor = tiny_model(0)
    with torch.no_grad():
        model.model.language_model.layers[1].mlp.up_proj.weight[5] *= 300.0
    return ZRewardModel(model, processor).eval()


def _data(n=6):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(n)]
    return images, ["a red circle left of a blue square"] * n


@needs_onnx
def test_fake_quant_activation_is_onnxruntimes_dynamic_quantize_linear():
    # the emulation against onnxruntime itself: DynamicQuantizeLinear then DequantizeLinear
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])
    graph = helper.make_graph([
        helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ], "dql", [x], [y])
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    g = torch.Generator().manual_seed(0)
    for data in (torch.randn(7, 33, generator=g) * 3 + 1, torch.rand(5, 9, generator=g) + 0.5,  # all positive
                 -torch.rand(4, 4, generator=g), torch.randn(6, 64, generator=g) * torch.linspace(0.1, 40, 64)):
        want = sess.run(None, {"x": data.numpy()})[0]
        assert np.allclose(fake_quant_activation(data).numpy(), want, rtol=0, atol=1e-6 * float(data.abs().max()))


@needs_onnx
def test_fake_quant_weight_is_per_row_symmetric_int8():
    w = torch.randn(6, 50) * torch.linspace(0.01, 5, 6)[:, None]
    q = fake_quant_weight(w)
    scale = w.abs().amax(1, keepdim=True) / 127
    codes = q / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 127 + 1e-4
    assert torch.allclose(q.abs().amax(1), w.abs().amax(1))  # each row's largest weight is exact
    assert ((q - w).abs() <= scale / 2 + 1e-7).all()


@needs_onnx
def test_layer_key_is_shared_by_pytorch_and_graph_names():
    assert policy.layer_key("model.language_model.layers.3.mlp.down_proj") == ("layers", 3, "down_proj")
    assert policy.layer_key("layers.3.mlp.down_proj") == ("layers", 3, "down_proj")
    assert (policy.layer_key("model.language_model.layers.0.linear_attn.in_proj_qkv")
            == policy.layer_key("layers.0.mixer.hf.in_proj_qkv") == ("layers", 0, "in_proj_qkv"))
    assert policy.layer_key("model.visual.blocks.12.attn.qkv") == policy.layer_key("blocks.12.attn.qkv")
    assert policy.layer_key("model.visual.merger.linear_fc1") == ("merger", -1, "linear_fc1")
    assert policy.layer_key("lm_head") is None and policy.layer_key("") is None


@needs_onnx
def test_candidates_follow_the_policy():
    rm = ZRewardModel(*tiny_model(0))
    names = {n for n, _ in candidate_linears(rm.model)}
    assert OUTLIER_LAYER in names and "model.language_model.layers.3.self_attn.q_proj" in names
    # gates, the GDN output projection, the head and the (tiny) vision blocks stay out, as in the graph
    assert not any(k in n for n in names for k in ("in_proj_a", "in_proj_b", "out_proj", "lm_head", "blocks."))


@needs_onnx
@pytest.mark.parametrize("limit", [1, 5, 16, 37])
def test_fewest_to_keep_finds_the_smallest_count_that_meets_the_target(limit):
    for need in range(0, limit + 3):  # need > limit: unreachable
        calls = []

        def error(k):
            calls.append(k)
            return 1.0 if k < need else 0.1

        got = fewest_to_keep(error, 0.5, limit)
        assert got == (need if need <= limit else limit), (need, limit)
        assert all(0 <= k <= limit for k in calls) and len(set(calls)) <= 2 * limit.bit_length() + 2


@needs_onnx
def test_fallback_ranks_the_layer_with_the_outlier_input_first():
    rm = _outlier_student()
    before = {n: m.weight.detach().clone() for n, m in candidate_linears(rm.model)}
    images, prompts = _data()
    choice = choose_fallback(rm, images, prompts, target=0.01)
    ranking = [n for n, _ in choice.ranking]
    assert ranking[0] == OUTLIER_LAYER
    # that one layer in float takes the emulated error under the target: it alone is kept
    assert choice.keep == {("layers", 1, "down_proj"): f"{choice.ranking[0][1]:.4f}"}
    assert choice.searched[0] > 0.05 and choice.searched[1] <= 0.01
    for n, m in candidate_linears(rm.model):  # the fake quantization left every weight as it was
        assert torch.equal(m.weight, before[n])
    report = choice.report()
    assert list(report["kept"]) == [OUTLIER_LAYER] and len(report["ranking"]) == len(ranking)
    assert report["emulated_chosen"] == round(choice.searched[1], 5) < report["emulated_all_quantized"]
    # an unreachable target: the fewest layers within REACHABLE_SLACK of the best any count tried reached
    best = choose_fallback(rm, images, prompts, target=0.0)
    limit, kept = len(ranking) // 2, len(best.keep)
    floor = min(best.searched.values())
    assert set(best.searched) >= {0, limit, kept} and 1 <= kept <= limit
    assert best.searched[kept] <= REACHABLE_SLACK * floor <= REACHABLE_SLACK * best.searched[limit]
    assert all(best.searched[k] > REACHABLE_SLACK * floor for k in best.searched if k < kept)
    assert set(best.keep) == {policy.layer_key(n) for n in ranking[:kept]}
    # nothing to keep when the whole graph already meets the target (one emulated pass)
    none = choose_fallback(rm, images, prompts, target=1e9)
    assert none.keep == {} and list(none.searched) == [0]


@needs_onnx
def test_fake_quantized_restores_weights_after_an_error():
    rm = ZRewardModel(*tiny_model(0))
    mods = [m for _, m in candidate_linears(rm.model)]
    saved = [m.weight.detach().clone() for m in mods]
    with pytest.raises(RuntimeError):
        with fake_quantized(mods):
            x = torch.randn(2, mods[0].in_features)
            out = mods[0](x)  # the fake-quantized weight swapped in for the call, and back
            assert not torch.allclose(out, torch.nn.functional.linear(x, saved[0], mods[0].bias), rtol=0, atol=1e-7)
            assert torch.equal(mods[0].weight, saved[0])
            mods[1](torch.randn(2, mods[1].in_features + 1))  # fails inside, its weight still swapped
    assert all(torch.equal(m.weight, w) for m, w in zip(mods, saved))


@needs_onnx
def test_int8_export_leaves_the_sensitive_layer_in_float(tmp_path):
    from zreward_fast.export import export_bundle

    rm = _outlier_student()
    # a gate of 0.025 aims the fallback at 0.01, which the outlier layer alone in float reaches (without
    # the MLP smoothing, which handles this outlier itself: test_quantize_smoothing.py)
    strict = {"int8-dynamic": {"mean_abs_dmu": 0.025, "pair_agreement_pooled": 0.98}}
    res = export_bundle(rm, tmp_path / "b", quantize="int8", num_pairs=16, progress=False, force=True, thresholds=strict,
                        smooth="none")
    assert res.manifest["quantization"]["fallback"]["target_mean_abs_dmu"] == pytest.approx(0.01)
    q = res.manifest["quantization"]
    assert list(q["fallback"]["kept"]) == [OUTLIER_LAYER]
    decoder = q["graphs"]["decoder"]
    kept = {v["module"]: v["reason"] for v in decoder["excluded_reasons"].values() if v["reason"].startswith("sensitivity:")}
    chosen = {policy.layer_key(k) for k in q["fallback"]["kept"]}
    assert {policy.layer_key(m) for m in kept} == {k for k in chosen if k[0] == "layers"}  # the decoder's share
    assert list(kept) == ["layers.1.mlp.down_proj"]
    # in the written graph that MatMul reads fp32 weights; the other MLP projections are integer
    graph = onnx.load(str(tmp_path / "b" / "decoder.onnx"), load_external_data=False).graph
    integer = [n for n in graph.node if n.op_type == "MatMulInteger"]
    assert integer and len(integer) == decoder["quantized"]
    assert not any("layers.1.mlp.down_proj" in i for n in integer for i in n.input)
    # --fallback none quantizes it
    plain = export_bundle(rm, tmp_path / "n", quantize="int8", num_pairs=16, progress=False, force=True, fallback="none",
                          smooth="none")
    assert "fallback" not in plain.manifest["quantization"]
    assert plain.manifest["quantization"]["graphs"]["decoder"]["quantized"] == decoder["quantized"] + len(kept)
    # and onnxruntime's graphs bear the emulation out on the held-out parity pairs
    fell, full = res.parity["overall"]["mean_abs_dmu"], plain.parity["overall"]["mean_abs_dmu"]
    print(f"int8 parity mean |dmu|: fallback {fell:.4f}, every layer quantized {full:.4f}")
    assert fell < 0.5 * full
    with pytest.raises(ValueError, match="fallback must be one of"):
        export_bundle(rm, tmp_path / "x", quantize="int8", fallback="some")


@needs_onnx
def test_int8_export_smooths_the_mlps_by_default_and_leaves_the_callers_model_alone(tmp_path):
    """The MLP smoothing (export/quantize/smoothing.py, tested there) in the export, against the
    same student quantized plainly: the outlier that the fallback above keeps in float is handled."""
    from zreward_fast.export import export_bundle
    from zreward_fast.export.quantize.smoothing import gated_mlps

    rm = _outlier_student()
    before = {k: v.clone() for k, v in rm.model.state_dict().items()}
    res = export_bundle(rm, tmp_path / "s", quantize="int8", num_pairs=16, progress=False, force=True, fallback="none")
    assert all(torch.equal(v, before[k]) for k, v in rm.model.state_dict().items())
    q = res.manifest["quantization"]
    assert q["smoothing"]["mlps"] == len(gated_mlps(rm.model)) and q["smoothing"]["images"] == 8
    assert q["smoothing"]["norms"] == 0  # the MLPs only (smoothing_scales explains why)
    # the plain int8 bundle of this student misses by 0.159 (the test above); smoothed, by a seventh of it
    print(f"int8 parity mean |dmu|, smoothed: {res.parity['overall']['mean_abs_dmu']:.4f}")
    assert res.parity["overall"]["mean_abs_dmu"] < 0.05
    with pytest.raises(ValueError, match="smooth must be one of"):
        export_bundle(rm, tmp_path / "x", quantize="int8", smooth="yes")


@needs_onnx
@pytest.mark.parametrize("k", [100, 256])
def test_int8_weight_emulation_is_onnxruntimes_matmul_nbits(k):
    """int8-weight's emulation against onnxruntime's own MatMulNBitsQuantizer and kernel, at a K that
    fills its blocks of 32 and one that pads the last: the weights alone (accuracy level 0), and
    the weights with the activations' int8 blocks (level 4, what the export writes)."""
    from onnx import numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from zreward_fast.export.quantize import WEIGHT_ACCURACY_LEVEL, WEIGHT_BLOCK_SIZE
    from zreward_fast.export.quantize.sensitivity import SCHEMES, fake_quant_weight_blocks

    g = torch.Generator().manual_seed(k)
    n = 48
    w = torch.randn(n, k, generator=g) * torch.linspace(0.1, 3, k)  # nn.Linear layout [out, in]
    w[3, 7] = 40.0  # one large weight: its block alone gets a coarse scale
    x = torch.randn(5, k, generator=g) * torch.linspace(0.5, 20, k)
    fq_weight, fq_act = SCHEMES["int8-weight"]
    exact = torch.nn.functional.linear(x, w)
    scale = float(exact.abs().max())
    for level, want in ((0, torch.nn.functional.linear(x, fq_weight(w))),
                        (WEIGHT_ACCURACY_LEVEL, torch.nn.functional.linear(fq_act(x), fq_weight(w)))):
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
            [numpy_helper.from_array(w.T.contiguous().numpy(), "w")])
        quantizer = MatMulNBitsQuantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), bits=8,
                                         block_size=WEIGHT_BLOCK_SIZE, is_symmetric=True, accuracy_level=level,
                                         op_types_to_quantize=("MatMul",))
        quantizer.process()
        assert [node.op_type for node in quantizer.model.model.graph.node] == ["MatMulNBits"]
        sess = ort.InferenceSession(quantizer.model.model.SerializeToString(), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
        # the emulation is onnxruntime's rounding to within float summation order; fp32 is far from both
        assert float((got - exact).abs().max()) > 1e-3 * scale, level
        assert float((got - want).abs().max()) <= 2e-6 * scale, (level, float((got - want).abs().max()) / scale)
    q = fake_quant_weight_blocks(w)
    assert q[3, 7] == w[3, 7] and torch.equal(q[3, 32:], fake_quant_weight_blocks(w[3:4, 32:])[0])  # blocks are local
    assert torch.equal(fake_quant_weight_blocks(torch.zeros(2, k)), torch.zeros(2, k))
    assert torch.equal(fq_act(torch.zeros(2, k)), torch.zeros(2, k))


def _weight_outlier_student():
    """The tiny student with one input column of layer 1's ``down_proj`` 300x its largest weight and
    the activation it reads 1000x smaller (the float model barely changes): every weight block
    holding that column rounds to a coarse scale, so int8-weight's error comes from that layer."""
    model, processor = tiny_model(0)
    with torch.no_grad():
        mlp = model.model.language_model.layers[1].mlp
        mlp.down_proj.weight[:, 5] = 300.0 * mlp.down_proj.weight.abs().max()
        mlp.up_proj.weight[5] *= 1e-3
    return ZRewardModel(model, processor).eval()


@needs_onnx
def test_weight_only_fallback_keeps_the_layer_whose_blocks_round_worst(tmp_path):
    from zreward_fast.export import export_bundle

    rm = _weight_outlier_student()
    images, prompts = _data()
    choice = choose_fallback(rm, images, prompts, target=0.01, mode="int8-weight")
    assert choice.ranking[0][0] == OUTLIER_LAYER and list(choice.keep) == [("layers", 1, "down_proj")]
    assert choice.searched[0] > 0.03 and choice.searched[1] <= 0.01, choice.searched
    assert choice.report()["method"].startswith("int8-weight emulated")
    with pytest.raises(ValueError, match="the fallback emulates"):
        choose_fallback(rm, images, prompts, target=0.01, mode="int4-weight")
    # the export: that MatMul stays fp32, the others are MatMulNBits, and onnxruntime bears it out
    strict = {"int8-weight": {"mean_abs_dmu": 0.025, "pair_agreement_pooled": 0.98}}
    res = export_bundle(rm, tmp_path / "b", quantize="int8-weight", num_pairs=8, progress=False, force=True,
                        thresholds=strict)
    q = res.manifest["quantization"]
    assert list(q["fallback"]["kept"]) == [OUTLIER_LAYER] and "smoothing" not in q
    graph = onnx.load(str(tmp_path / "b" / "decoder.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert nbits and len(nbits) == q["graphs"]["decoder"]["quantized"]
    assert not any("layers.1.mlp.down_proj" in i for n in nbits for i in n.input)
    plain = export_bundle(rm, tmp_path / "n", quantize="int8-weight", num_pairs=8, progress=False, force=True,
                          fallback="none", thresholds=strict)
    assert plain.manifest["quantization"]["graphs"]["decoder"]["quantized"] == len(nbits) + 1
    fell, full = res.parity["overall"]["mean_abs_dmu"], plain.parity["overall"]["mean_abs_dmu"]
    print(f"int8-weight parity mean |dmu|: fallback {fell:.4f}, every layer quantized {full:.4f}")
    assert fell < 0.5 * full


@needs_onnx
def test_every_fallback_mode_has_an_emulation():
    # runtime/bundle.py names the modes without importing torch; sensitivity.SCHEMES emulates them
    from zreward_fast.export.quantize.sensitivity import SCHEMES
    from zreward_fast.runtime.bundle import FALLBACK_MODES

    assert set(FALLBACK_MODES) == set(SCHEMES)
