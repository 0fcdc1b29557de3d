"""Export modules and ONNX graphs (vision.onnx, decoder.onnx) against the HF model, in torch and ORT.

Exports are slow on CPU, so each graph is exported once per module (module-scoped fixtures).
The contrib decoder is written with a tiny external-data threshold, so the same graph also covers
the ``.onnx.data`` path.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from zreward_fast.export.modules import ExportDecoder, ExportVision  # noqa: E402
from zreward_fast.models.gated_deltanet import (  # noqa: E402
    causal_conv1d_silu, chunk_gated_delta_rule, gdn_gates, unit_lower_inverse,
)
from zreward_fast.models.qwen3_5 import single_frame_patches  # noqa: E402
from zreward_fast.export.onnx_export import count_nodes, export_decoder, export_vision  # noqa: E402
from zreward_fast.modeling import ZRewardModel  # noqa: E402
from zreward_fast.runtime.bundle import GDN_FORMS  # noqa: E402
from zreward_fast.testing import tiny_model  # noqa: E402

PROMPTS = [
    "a red circle",
    "a photo of a cat on the house under the moon with noise and blur " * 4,  # > 2 GDN chunks
    "dog",
]
TINY_THRESHOLD = 1024


@pytest.fixture(scope="module")
def rm() -> ZRewardModel:
    model, processor = tiny_model(0)
    return ZRewardModel(model, processor).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def make_inputs(rm: ZRewardModel, images: torch.Tensor, n: int, dims=None):
    """A processor batch, its [B, P, D] patches and HF's own M-RoPE position ids."""
    batch = rm.processor(images[:n], PROMPTS[:n], dims)
    pixels = batch.pixel_values.reshape(n, -1, batch.pixel_values.shape[-1])
    pixels = single_frame_patches(pixels, 3, rm.processor.temporal_patch_size)
    positions, _ = rm.model.model.get_rope_index(
        batch.input_ids, batch.mm_token_type_ids, batch.image_grid_thw, attention_mask=batch.attention_mask
    )
    return batch, pixels, positions


def decoder_feed(batch, positions, features) -> dict[str, np.ndarray]:
    return {
        "input_ids": batch.input_ids.numpy(), "attention_mask": batch.attention_mask.numpy(),
        "position_ids": positions.numpy(), "image_features": np.asarray(features, dtype=np.float32),
        "query_positions": batch.query_positions.numpy(),
    }


@pytest.fixture(scope="module")
def graphs(rm, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("graphs")
    return {
        "vision": export_vision(rm, out / "vision.onnx"),
        "contrib": export_decoder(rm, out / "contrib" / "decoder.onnx", gdn="contrib",
                                  external_data_threshold_bytes=TINY_THRESHOLD),
        "decomposed": export_decoder(rm, out / "decomposed" / "decoder.onnx", gdn="decomposed"),
    }


@pytest.fixture(scope="module")
def sessions(graphs) -> dict:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return {k: ort.InferenceSession(str(v[0]), opts, providers=["CPUExecutionProvider"]) for k, v in graphs.items()}


# --------------------------------------------------------------------------- the GDN math
@pytest.mark.parametrize("length", [1, 15, 16, 17, 37, 64, 65, 130])
@pytest.mark.parametrize("heads", [(2, 4), (2, 2)])
def test_chunk_rule_matches_hf(length, heads):
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    hk, hv = heads
    g = torch.Generator().manual_seed(length)
    q, k = torch.randn(2, length, hk, 16, generator=g), torch.randn(2, length, hk, 16, generator=g)
    v = torch.randn(2, length, hv, 8, generator=g)
    a, b = torch.randn(2, length, hv, generator=g), torch.randn(2, length, hv, generator=g)
    decay, beta = gdn_gates(a, b, torch.randn(hv, generator=g), torch.randn(hv, generator=g))
    ref, _ = torch_chunk_gated_delta_rule(q, k, v, g=decay, beta=beta, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(chunk_gated_delta_rule(q, k, v, decay, beta), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("length", [1, 3, 4, 37])
def test_causal_conv_matches_a_loop(length):
    gen = torch.Generator().manual_seed(length)
    x, w, b = torch.randn(2, length, 6, generator=gen), torch.randn(6, 1, 4, generator=gen), torch.randn(6, generator=gen)
    expected = torch.zeros(2, length, 6)
    for t in range(length):
        for j in range(4):  # tap j reads step t - 3 + j; steps before 0 are zero
            if t - 3 + j >= 0:
                expected[:, t] += w[:, 0, j] * x[:, t - 3 + j]
    torch.testing.assert_close(causal_conv1d_silu(x, w, b), F.silu(expected + b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [16, 23, 64])
def test_unit_lower_inverse(size):
    gen = torch.Generator().manual_seed(size)
    # GDN's system has |entries| <= 1 (beta <= 1, unit-norm keys, decay <= 1); a random one here.
    n = (torch.rand(3, size, size, generator=gen) * 2 - 1).tril(-1) * (0.9 if size <= 23 else 0.3)
    eye = torch.eye(size).expand(3, size, size)
    expected = torch.linalg.solve_triangular(eye + n, eye, upper=False, unitriangular=True)
    inv = unit_lower_inverse(n)
    torch.testing.assert_close(inv, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(inv @ (eye + n), eye, atol=1e-4, rtol=0)


def test_unknown_gdn_form(rm, tmp_path):
    with pytest.raises(ValueError, match="contrib.*decomposed"):
        ExportDecoder(rm, gdn="triton")
    with pytest.raises(ValueError, match="contrib.*decomposed"):
        export_decoder(rm, tmp_path / "d.onnx", gdn="loop")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- torch modules vs HF
@torch.no_grad()
def test_vision_matches_hf(rm, images):
    batch, pixels, _ = make_inputs(rm, images, 3)
    ref = rm.model.model.get_image_features(batch.pixel_values, batch.image_grid_thw).pooler_output
    ref = torch.stack(list(ref))  # [B, N, H]
    out = ExportVision(rm)(pixels)
    assert out.shape == (3, rm.processor.num_image_tokens, rm.model.config.text_config.hidden_size)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("gdn", GDN_FORMS)
@pytest.mark.parametrize("dims", [None, ["realism"]], ids=["4dims", "1dim"])
@torch.no_grad()
def test_decoder_matches_hf(rm, images, gdn, dims):
    batch, pixels, positions = make_inputs(rm, images, 3, dims)
    assert len(set(batch.attention_mask.sum(1).tolist())) == 3  # three lengths, right padded
    ref = rm.distributions(batch)
    feats = ExportVision(rm)(pixels)
    log_probs, means = ExportDecoder(rm, gdn=gdn)(
        batch.input_ids, batch.attention_mask, positions, feats, batch.query_positions
    )
    assert log_probs.shape == ref.shape == (3, len(dims or rm.dimensions), rm.scale.num_levels)
    torch.testing.assert_close(log_probs, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(means, (ref.exp() * rm.levels).sum(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("gdn", GDN_FORMS)
@torch.no_grad()
def test_decoder_with_a_gdn_last_layer(images, gdn):
    """The last layer runs only at the query rows; a Gated DeltaNet last layer still reads every step."""
    types = ["linear_attention", "full_attention", "linear_attention"]
    model, processor = tiny_model(1, text=dict(num_hidden_layers=3, layer_types=types))
    rm = ZRewardModel(model, processor).eval()
    assert [layer.block_type for layer in rm.model.model.language_model.layers] == ["linear_attention",
                                                                                    "full_attention",
                                                                                    "linear_attention"]
    batch, pixels, positions = make_inputs(rm, images, 3)
    log_probs, _ = ExportDecoder(rm, gdn=gdn)(
        batch.input_ids, batch.attention_mask, positions, ExportVision(rm)(pixels), batch.query_positions
    )
    torch.testing.assert_close(log_probs, rm.distributions(batch), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- ONNX graphs
def test_graph_interfaces(sessions, rm):
    vis = sessions["vision"]
    assert [i.name for i in vis.get_inputs()] == ["pixel_values"]
    assert vis.get_inputs()[0].shape[0] == "batch"
    assert [o.name for o in vis.get_outputs()] == ["image_features"]
    for gdn in GDN_FORMS:
        s = sessions[gdn]
        inputs = {i.name: (i.shape, i.type) for i in s.get_inputs()}
        assert list(inputs) == ["input_ids", "attention_mask", "position_ids", "image_features", "query_positions"]
        assert inputs["input_ids"] == (["batch", "seq"], "tensor(int64)")
        assert inputs["position_ids"] == ([3, "batch", "seq"], "tensor(int64)")
        assert inputs["image_features"][0] == ["batch", rm.processor.num_image_tokens, 64]
        assert inputs["query_positions"] == (["batch", "dims"], "tensor(int64)")
        outputs = {o.name: o.shape for o in s.get_outputs()}
        assert outputs == {"log_probs": ["batch", "dims", rm.scale.num_levels], "means": ["batch", "dims"]}


def test_graph_ops(graphs):
    decomposed = count_nodes(graphs["decomposed"][0])
    assert not [op for op in decomposed if op.startswith("com.microsoft")], decomposed
    assert decomposed.get("Scan") == 3  # one per GDN layer
    contrib = count_nodes(graphs["contrib"][0])
    assert contrib.get("com.microsoft::GatedDeltaNet") == 3
    assert contrib.get("com.microsoft::CausalConvWithState") == 3
    assert "Scan" not in contrib


def test_linear_weights_are_stored_once(rm, graphs):
    """Issue 13 (export memory): every linear layer's weight is an initializer named after its
    parameter (``<module>.weight_t``, ``[in, out]``) that MatMul reads as it is, not a transposed
    copy the exporter's optimizer folded (``val_N``) while the model still held the original; and
    the model gets its weights back, equal to the bit, after each export."""
    import onnx

    for key in ("vision", "decomposed"):
        model = onnx.load(str(graphs[key][0]), load_external_data=False)
        dims = {i.name: tuple(i.dims) for i in model.graph.initializer}
        matmul_weights = [n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in dims]
        assert sum(w.endswith(".weight_t") for w in matmul_weights) >= 8, matmul_weights
        # the one other: the K score rows of the head, a [H, K] buffer
        others = [dims[w] for w in matmul_weights if not w.endswith(".weight_t")]
        assert all(rm.scale.num_levels in shape for shape in others), others
    fresh = ZRewardModel(*tiny_model(0)).model.state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in rm.model.state_dict().items())
    assert not [m for m in rm.model.modules() if "Transposed" in type(m).__name__]  # the linears are back


@pytest.mark.parametrize("n", [1, 3])
@torch.no_grad()
def test_onnx_matches_torch(rm, images, sessions, n):
    batch, pixels, positions = make_inputs(rm, images, n)
    feats = ExportVision(rm)(pixels)
    (ort_feats,) = sessions["vision"].run(None, {"pixel_values": pixels.numpy()})
    np.testing.assert_allclose(ort_feats, feats.numpy(), atol=1e-4, rtol=0)
    for gdn in GDN_FORMS:
        log_probs, means = ExportDecoder(rm, gdn=gdn)(
            batch.input_ids, batch.attention_mask, positions, feats, batch.query_positions
        )
        ort_lp, ort_means = sessions[gdn].run(None, decoder_feed(batch, positions, ort_feats))
        np.testing.assert_allclose(ort_lp, log_probs.numpy(), atol=1e-4, rtol=0, err_msg=gdn)
        np.testing.assert_allclose(ort_means, means.numpy(), atol=1e-4, rtol=0, err_msg=gdn)


@pytest.mark.parametrize("dims", [None, ["plausibility"], ["realism", "alignment"]], ids=["4dims", "1dim", "2dims"])
@pytest.mark.parametrize("n", [1, 3])
def test_gdn_forms_agree_in_ort(rm, images, sessions, dims, n):
    batch, pixels, positions = make_inputs(rm, images, n, dims)
    (feats,) = sessions["vision"].run(None, {"pixel_values": pixels.numpy()})
    feed = decoder_feed(batch, positions, feats)
    lp_c, means_c = sessions["contrib"].run(None, feed)
    lp_d, means_d = sessions["decomposed"].run(None, feed)
    assert lp_c.shape == (n, len(dims or rm.dimensions), rm.scale.num_levels)
    np.testing.assert_allclose(lp_c, lp_d, atol=1e-4, rtol=0)
    np.testing.assert_allclose(means_c, means_d, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.exp(lp_c).sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("gdn", GDN_FORMS)
def test_extra_right_padding_is_ignored(rm, images, sessions, gdn):
    """A runtime may pad to a bucketed length: the scores at the query positions do not move."""
    batch, pixels, positions = make_inputs(rm, images, 2)
    (feats,) = sessions["vision"].run(None, {"pixel_values": pixels.numpy()})
    base = sessions[gdn].run(None, decoder_feed(batch, positions, feats))
    extra = 70  # crosses a GDN chunk boundary
    batch.input_ids = torch.nn.functional.pad(batch.input_ids, (0, extra), value=rm.processor.pad_token_id)
    batch.attention_mask = torch.nn.functional.pad(batch.attention_mask, (0, extra))
    padded = sessions[gdn].run(None, decoder_feed(batch, torch.nn.functional.pad(positions, (0, extra)), feats))
    for a, b in zip(base, padded):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_external_data(graphs, sessions, rm, images, tmp_path):
    assert [p.name for p in graphs["vision"]] == ["vision.onnx"]
    assert [p.name for p in graphs["decomposed"]] == ["decoder.onnx"]
    contrib = graphs["contrib"]  # exported with the tiny threshold; run by the tests above
    assert [p.name for p in contrib] == ["decoder.onnx", "decoder.onnx.data"]
    assert sorted(p.name for p in contrib[0].parent.iterdir()) == ["decoder.onnx", "decoder.onnx.data"]
    assert contrib[1].stat().st_size > contrib[0].stat().st_size

    target = tmp_path / "vision.onnx"
    graph, data = export_vision(rm, target, external_data_threshold_bytes=TINY_THRESHOLD)
    assert graph == target and data == tmp_path / "vision.onnx.data" and data.is_file()
    _, pixels, _ = make_inputs(rm, images, 2)
    (a,) = sessions["vision"].run(None, {"pixel_values": pixels.numpy()})
    (b,) = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": pixels.numpy()})
    np.testing.assert_array_equal(a, b)

    # Re-exporting inline over an external export leaves no stale weights file behind.
    assert export_vision(rm, target) == [target]
    assert [p.name for p in tmp_path.iterdir()] == ["vision.onnx"]
