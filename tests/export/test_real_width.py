"""Real Qwen3.5 widths (issue 13): the published sizes as data, and the student at 0.8B and 9B width.

At reduced depth (three Gated DeltaNet layers and one attention layer, vision depth 2) and the real
448x448 bucket (196 image tokens), a random student at real width is scored by ``ZRewardModel``,
by the fp32 bundle through the torch-free runtime (both ONNX forms of the Gated DeltaNet) and by
the ``TorchEngine`` CPU path; they must agree. The 0.8B width runs with the real 248,320-row tied
embedding; the 9B width (0.95B parameters at this depth with an 8,192-row vocabulary, 3.8 GB) takes
4.7 minutes and 9.7 GB peak on the 2-core machine, so it is marked heavy (``make test-heavy``, CI's
second step).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from zreward_fast import DIMENSIONS, ZRewardModel
from zreward_fast.qwen3_5_sizes import SIZES, layer_types, parameter_count, size_spec
from zreward_fast.testing import real_config, real_model

# what each size is published as (Qwen's model cards: total parameters, with the vision tower)
NOMINAL = {"0.8B": (0.8e9, 0.95e9), "2B": (2.0e9, 2.4e9), "4B": (4.3e9, 4.8e9), "9B": (9.0e9, 9.8e9),
           "27B": (26.5e9, 28.0e9)}


def test_every_size_is_known_with_its_sources():
    assert SIZES == ("0.8B", "2B", "4B", "9B", "27B")
    for name in SIZES:
        spec = size_spec(name)
        t = spec["text"]
        assert t["vocab_size"] == 248_320 and t["head_dim"] == 256 and spec["sources"]
        assert t["linear_num_value_heads"] % t["linear_num_key_heads"] == 0  # GQA in the Gated DeltaNet
        assert spec["vision"]["out_hidden_size"] == t["hidden_size"]
        assert spec["tie_word_embeddings"] == (name in ("0.8B", "2B", "4B"))
    with pytest.raises(ValueError, match="unknown Qwen3.5 size '7B'"):
        size_spec("7B")


@pytest.mark.parametrize("name", SIZES)
def test_parameter_counts_match_the_published_sizes(name):
    low, high = NOMINAL[name]
    assert low <= parameter_count(name) <= high, parameter_count(name)


def test_reduced_depth_keeps_the_layer_pattern():
    assert layer_types(4) == ["linear_attention"] * 3 + ["full_attention"]
    cfg = real_config("9B", layers=8, vision_depth=2)
    assert cfg.text_config.layer_types == layer_types(8) and cfg.text_config.num_hidden_layers == 8
    assert cfg.vision_config.depth == 2 and cfg.vision_config.hidden_size == 1152
    rope = cfg.text_config.rope_parameters
    assert rope["mrope_section"] == [11, 11, 10] and rope["mrope_interleaved"] and rope["partial_rotary_factor"] == 0.25
    assert cfg.image_token_id == 248_056 and not cfg.tie_word_embeddings
    assert real_config("0.8B").tie_word_embeddings
    with pytest.raises(ValueError, match="layers must be >= 1"):
        real_config("0.8B", layers=0)


def _score_three_ways(rm: ZRewardModel, tmp_path, n: int = 4) -> dict[str, np.ndarray]:
    """Means and probabilities of ``n`` synthetic images from the model, the fp32 bundle (both GDN
    forms, through the runtime) and the TorchEngine."""
    from zreward_fast.engine import TorchEngine
    from zreward_fast.export import export_bundle
    from zreward_fast.export.api import held_out_pairs
    from zreward_fast.runtime import Scorer

    images, prompts, _ = held_out_pairs((n + 1) // 2, seed=3)
    images, prompts = images[:n], prompts[:n]

    def probs(results):
        return np.array([[r[d].probs for d in DIMENSIONS] for r in results])

    out = {"model": probs(rm.score(images, prompts, DIMENSIONS))}
    for gdn in ("decomposed", "contrib"):
        export_bundle(rm, tmp_path / gdn, gdn=gdn, num_pairs=2, progress=False)
        out[f"bundle-{gdn}"] = probs(Scorer(tmp_path / gdn).score(images, prompts, DIMENSIONS))
    rm.save_pretrained(tmp_path / "model")
    engine = TorchEngine(tmp_path / "model", device="cpu")
    out["engine"] = probs(engine.score(images, prompts, DIMENSIONS))
    return out


def _check_agreement(scores: dict[str, np.ndarray], levels: np.ndarray) -> None:
    ref = scores.pop("model")
    assert np.isfinite(ref).all() and np.allclose(ref.sum(-1), 1.0, atol=1e-5)
    # a random model still spreads its distributions: parity on one-hot outputs would prove little
    assert ref.max() < 0.999, ref.max()
    for name, p in scores.items():
        assert p.shape == ref.shape, name
        dmu = np.abs(p @ levels - ref @ levels).max()
        assert dmu < 1e-3, (name, dmu)
        assert np.abs(p - ref).max() < 1e-3, (name, np.abs(p - ref).max())


@pytest.mark.slow
def test_0_8b_width_student_agrees_across_model_bundle_and_engine(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model, processor = real_model("0.8B", layers=4, vision_depth=2, image_size=448)
        rm = ZRewardModel(model, processor).eval()
        assert model.get_input_embeddings().weight.shape == (248_320, 1024)
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied
        assert processor.image_size == 448
        _check_agreement(_score_three_ways(rm, tmp_path), np.array(rm.scale.levels))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.heavy
def test_9b_width_student_agrees_across_model_bundle_and_engine(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model, processor = real_model("9B", layers=4, vision_depth=2, image_size=448, vocab_size=8192)
        rm = ZRewardModel(model, processor).eval()
        assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()  # untied
        _check_agreement(_score_three_ways(rm, tmp_path), np.array(rm.scale.levels))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.heavy
def test_weight_only_int8_survives_outlier_channels_at_0_8b_width(tmp_path):
    """Issue 13: at 0.8B width, with the outlier features of real checkpoints (a few hidden channels
    30x larger at every projection's input, ``add_outlier_channels``), per-tensor dynamic int8 loses
    the model (mean |dmu| 0.27 measured) while weight-only int8 with block-wise scales keeps it
    (0.05). Random weights: the gate's pairwise agreement has few untied pairs to count, so the test
    holds the means."""
    from zreward_fast.export import export_bundle
    from zreward_fast.testing import OUTLIER_NORMS, add_outlier_channels

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model, processor = real_model("0.8B", layers=4, vision_depth=2, image_size=448)
        channels = add_outlier_channels(model, count=4, gain=30.0)
        assert len(channels) == 4 and OUTLIER_NORMS == ("input_layernorm", "post_attention_layernorm")
        rm = ZRewardModel(model, processor).eval()
        dmu = {}
        for mode in ("int8-dynamic", "int8-weight"):
            res = export_bundle(rm, tmp_path / mode, quantize=mode, num_pairs=12, progress=False, force=True)
            dmu[mode] = res.parity["overall"]["mean_abs_dmu"]
        assert dmu["int8-weight"] <= 0.06 and dmu["int8-weight"] <= dmu["int8-dynamic"] / 3, dmu
    finally:
        torch.set_num_threads(threads)


@pytest.mark.heavy
def test_default_int8_passes_the_gate_on_a_briefly_trained_0_8b_width_student(tmp_path):
    """Issue 13's goal at 0.8B width, on the stand-in for a trained checkpoint: the student trained
    40 RISD steps (``train_briefly``, about 3.5 minutes here) is exported with the default ``int8``
    (smoothing + per-layer fallback) and ``export_bundle`` must not refuse it: mean |dmu| <= 0.05 and
    >= 98% of the held-out pairs kept in order, with enough untied pairs compared to mean it (the
    random model fails the same gate: README, "Quantization at real width"). Where OpenVINO is
    installed, the same student's fp32 bundle computed by OpenVINO in bf16 must pass the check the
    ``Scorer`` runs at load (on a CPU without bf16 arithmetic OpenVINO computes in f32)."""
    from zreward_fast.export import export_bundle
    from zreward_fast.runtime import Scorer
    from zreward_fast.runtime.openvino_backend import openvino_available
    from zreward_fast.testing import train_briefly

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model, processor = real_model("0.8B", layers=4, vision_depth=2, image_size=448)
        rm = ZRewardModel(model, processor)
        trained = train_briefly(rm, steps=40)
        assert trained["held_out_plcc"] > 0.1, trained  # it learned something of the known scores
        res = export_bundle(rm, tmp_path / "int8", quantize="int8", num_pairs=16, progress=False)
        assert res.failures == [] and res.manifest["quantization"]["mode"] == "int8-dynamic"
        overall = res.parity["overall"]
        compared = sum(b["pairs_compared"] for b in res.parity["dimensions"].values())
        assert compared >= 8, res.parity["dimensions"]
        assert overall["mean_abs_dmu"] <= 0.05 and overall["pair_agreement_pooled"] >= 0.98, overall
        if not openvino_available():
            return
        # OpenVINO computing the fp32 bundle in bf16 (the fastest CPU row): the load check must pass it
        fp32 = export_bundle(rm, tmp_path / "fp32", num_pairs=16, progress=False)
        bf16 = Scorer(fp32.path, copy=False, backend="openvino", precision="bf16")
        assert bf16.parity["pairs"] == 16 and bf16.parity["failures"] == [], bf16.parity
    finally:
        torch.set_num_threads(threads)
