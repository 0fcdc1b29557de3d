import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from zreward_fast import ZRewardProcessor, add_score_tokens
from zreward_fast.imaging import ImageError, load_image
from zreward_fast.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def processor():
    return tiny_model(seed=0)[1]


def _rand_image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [64, 448])
def test_patches_match_transformers_qwen2vl_pil(size):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = tiny_tokenizer()
    add_score_tokens(tok)
    proc = ZRewardProcessor(tok, image_size=size)
    ref = Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"shortest_edge": size * size, "longest_edge": size * size},
    )
    imgs = [_rand_image(size, size, s) for s in range(2)]
    want = ref(imgs, return_tensors="np")
    got = proc(imgs, ["a", "b"])
    assert got.image_grid_thw.tolist() == want["image_grid_thw"].tolist()
    assert got.pixel_values.shape == want["pixel_values"].shape
    np.testing.assert_allclose(got.pixel_values.numpy(), want["pixel_values"], atol=1e-5)
    # the numpy path (the runtime's) gives the same patches
    np.testing.assert_allclose(proc.patchify_numpy(proc.load_images(imgs)), want["pixel_values"], atol=1e-5)


def test_bucket_policy_resizes_any_input(processor):
    s = processor.image_size
    imgs = [_rand_image(100, 37), _rand_image(s, s).convert("L"), np.zeros((20, 30, 4), np.uint8),
            np.full((10, 10, 3), 0.5, np.float32)]
    px = processor.load_images(imgs)
    assert px.shape == (4, 3, s, s) and px.dtype == np.float32
    assert px.min() >= 0.0 and px.max() <= 1.0
    # PIL bicubic is the policy for decoded images
    want = np.asarray(imgs[0].resize((s, s), Image.Resampling.BICUBIC), np.float32).transpose(2, 0, 1) / 255
    np.testing.assert_allclose(px[0], want, atol=1e-6)


def test_tensor_pixels_are_resized_differentiably(processor):
    px = torch.rand(2, 3, 50, 70, requires_grad=True)
    out = processor.resize_pixels(px)
    assert out.shape == (2, 3, processor.image_size, processor.image_size)
    out.sum().backward()
    assert px.grad is not None and torch.isfinite(px.grad).all() and px.grad.abs().sum() > 0


def test_batch_fields_and_query_positions(processor):
    b = processor([_rand_image(64, 64), _rand_image(64, 64, 1)], ["a red circle", "two blue squares on a tree"])
    assert b.input_ids.shape == b.attention_mask.shape == b.mm_token_type_ids.shape
    assert b.query_positions.shape == (2, 4)
    lengths = b.attention_mask.sum(1)
    assert lengths[0] < lengths[1]  # different prompt lengths, right padding
    for i in range(2):
        row = b.input_ids[i]
        assert row[b.query_positions[i]].tolist() == [processor.query_token_ids[d] for d in processor.dimensions]
        assert int(b.query_positions[i, -1]) == int(lengths[i]) - 1  # queries close the sequence
        assert int(b.mm_token_type_ids[i].sum()) == processor.num_image_tokens
    single = processor([_rand_image(64, 64)], ["x"], dimensions="aesthetics")
    assert single.query_positions.shape == (1, 1) and single.dimensions == ("aesthetics",)


def test_bad_inputs(processor, tmp_path):
    img = _rand_image(64, 64)
    with pytest.raises(ValueError, match="unknown dimension"):
        processor([img], ["x"], dimensions=["beauty"])
    with pytest.raises(ValueError, match="2 prompts"):
        processor([img], ["x", "y"])
    with pytest.raises(ValueError, match="special-token"):
        processor([img], ["<|dim_realism|>"])
    text = tmp_path / "not_an_image.png"
    text.write_text("hello, I am text")
    with pytest.raises(ImageError, match="not a readable image"):
        processor([str(text)], ["x"])
    buf = io.BytesIO()
    _rand_image(64, 64).save(buf, format="PNG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="unsupported image type"):
        load_image(3.5)
    with pytest.raises(ImageError, match="limit"):
        load_image(np.zeros((200, 200, 3), np.uint8), max_pixels=1000)
    with pytest.raises(ImageError, match="in \\[0, 1\\]"):
        load_image(np.full((4, 4, 3), 2.0, np.float32))
    with pytest.raises(ImageError, match="NaN"):
        load_image(np.full((4, 4, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        processor(torch.full((1, 3, 64, 64), float("nan")), ["x"])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        processor(torch.rand(1, 4, 64, 64), ["x"])


def test_huge_image_header_is_refused_before_decoding(tmp_path):
    # A 20000x20000 PNG header; only the header is read before refusing.
    img = Image.new("1", (20000, 20000))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    with pytest.raises(ImageError, match="limit"):
        load_image(buf.getvalue())


def test_tokenizer_without_score_tokens_is_refused():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="add_score_tokens"):
        ZRewardProcessor(tok, image_size=64)


def test_image_size_must_fit_the_patch_grid():
    tok = tiny_tokenizer()
    add_score_tokens(tok)
    with pytest.raises(ValueError, match="multiple of"):
        ZRewardProcessor(tok, image_size=100)


def test_save_and_load_roundtrip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    again = ZRewardProcessor.from_pretrained(tmp_path)
    assert again.config_dict() == processor.config_dict()
    img = _rand_image(64, 64)
    a, b = processor([img], ["a cat"]), again([img], ["a cat"])
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)

    cfg = json.loads((tmp_path / "zreward_processor.json").read_text())
    cfg["format_version"] = 99
    (tmp_path / "zreward_processor.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version"):
        ZRewardProcessor.from_pretrained(tmp_path)


def test_reads_a_checkpoints_tokenizer_and_preprocessor_config(tmp_path):
    # A Qwen3.5-style checkpoint directory: tokenizer files and preprocessor_config.json only.
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2, "image_mean": [0.4, 0.5, 0.6],
         "image_std": [0.2, 0.3, 0.4], "image_processor_type": "Qwen2VLImageProcessor"}))
    with pytest.raises(ValueError, match="add_score_tokens"):
        ZRewardProcessor.from_pretrained(tmp_path)
    add_score_tokens(tok)
    tok.save_pretrained(tmp_path)
    proc = ZRewardProcessor.from_pretrained(tmp_path)
    assert proc.image_mean == (0.4, 0.5, 0.6) and proc.image_std == (0.2, 0.3, 0.4)
    assert proc.image_size == 448 and proc.num_image_tokens == 196
