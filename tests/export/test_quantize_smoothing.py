"""SmoothQuant-style MLP scaling before int8 (export/quantize/smoothing.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx_graphs import HAVE_ONNX, needs_onnx

from zreward_fast import ZRewardModel
from zreward_fast.testing import add_outlier_channels, tiny_model

if HAVE_ONNX:
    from zreward_fast.export.quantize.sensitivity import candidate_linears, fake_quantized
    from zreward_fast.export.quantize.smoothing import gated_mlps, norm_readers, smoothed, smoothing_scales

OUTLIER_MLP = "model.language_model.layers.1.mlp"


def _outlier_student() -> ZRewardModel:
    """The tiny student with one channel of layer 1's MLP product 300x the rest (as in the fallback
    tests): the outlier per-tensor int8 activation scales handle worst."""
    model, processor = tiny_model(0)
    with torch.no_grad():
        model.model.language_model.layers[1].mlp.up_proj.weight[5] *= 300.0
    return ZRewardModel(model, processor).eval()


def _data(n=6, seed=0):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(n)]
    return images, ["a red circle left of a blue square"] * n


def _means(rm, images, prompts):
    return np.array([[r[d].mean for d in rm.dimensions] for r in rm.score(images, prompts, batch_size=3)])


@needs_onnx
def test_smoothing_keeps_the_float_model_and_gives_the_weights_back():
    rm = _outlier_student()
    mlps, readers = gated_mlps(rm.model), norm_readers(rm.model)
    assert [name for name, _, _ in mlps] == [f"model.language_model.layers.{i}.mlp" for i in range(len(mlps))]
    assert len(readers) == 2 * len(mlps)  # each decoder layer's two norms
    attn_in = [lin for name, _, lin in readers if name.endswith("input_layernorm")]
    assert {len(lin) for lin in attn_in} == {3, 4}  # q/k/v, or the Gated DeltaNet's four input projections
    before = {k: v.clone() for k, v in rm.model.state_dict().items()}
    images, prompts = _data()
    ref = _means(rm, images, prompts)
    mlp_only = smoothing_scales(rm, *_data(seed=1))
    s = mlp_only.scales[OUTLIER_MLP]
    assert torch.equal(s, torch.exp2(torch.log2(s).round()))  # powers of two
    assert s[5] == s.max() and s[5] >= 8 * s.median()  # the outlier channel moves most
    assert not mlp_only.norm_scales
    with smoothed(rm.model, mlp_only):
        up = dict(rm.model.named_modules())[OUTLIER_MLP + ".up_proj"]
        assert not torch.equal(up.weight, before[OUTLIER_MLP + ".up_proj.weight"])
        assert np.array_equal(_means(rm, images, prompts), ref)  # bit-identical outputs
    assert all(torch.equal(v, before[k]) for k, v in rm.model.state_dict().items())
    both = smoothing_scales(rm, *_data(seed=1), norms=True)
    assert set(both.norm_scales) == {name for name, _, _ in readers}
    with smoothed(rm.model, both):
        norm = dict(rm.model.named_modules())[readers[0][0]]
        assert not torch.equal(norm.weight, before[readers[0][0] + ".weight"])
        np.testing.assert_allclose(_means(rm, images, prompts), ref, atol=1e-5, rtol=0)  # the gains rounded once
    assert all(torch.equal(v, before[k]) for k, v in rm.model.state_dict().items())
    report = both.report()
    assert report["mlps"] == len(mlps) and report["norms"] == len(readers) and report["alpha"] == 0.5
    assert report["images"] == 6


def _outlier_channels_student() -> ZRewardModel:
    """The tiny student with the outlier hidden channels of real checkpoints (testing.add_outlier_channels:
    four channels of every decoder norm's gain 30x)."""
    model, processor = tiny_model(0)
    add_outlier_channels(model)
    return ZRewardModel(model, processor).eval()


READERS = ("q_proj", "k_proj", "v_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "gate_proj", "up_proj")


@needs_onnx
@pytest.mark.parametrize("student, layers", [(_outlier_student, ("down_proj",)), (_outlier_channels_student, READERS)],
                         ids=["mlp_outlier", "norm_outliers"])
def test_smoothing_lowers_the_emulated_int8_error_where_the_outliers_are(student, layers):
    """Emulated int8-dynamic on the layers whose inputs carry the outliers: the MLPs' down_proj for an
    outlier in the MLP product, the layers reading the norms for outlier hidden channels."""
    rm = student()
    images, prompts = _data()
    ref = _means(rm, images, prompts)
    linears = [m for n, m in candidate_linears(rm.model) if n.endswith(layers)]
    assert linears

    def emulated() -> float:
        with fake_quantized(linears):
            return float(np.abs(_means(rm, images, prompts) - ref).mean())

    plain = emulated()
    with smoothed(rm.model, smoothing_scales(rm, *_data(seed=1), norms=layers == READERS)):
        smooth = emulated()
    print(f"emulated int8-dynamic mean |dmu| ({len(linears)} layers): {plain:.4f} plain, {smooth:.4f} smoothed")
    assert smooth < 0.6 * plain
