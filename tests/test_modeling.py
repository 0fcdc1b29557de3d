import numpy as np
import pytest
import torch
from PIL import Image

import zreward_fast as zf
from zreward_fast import ZRewardModel, add_score_tokens
from zreward_fast.testing import tiny_model, tiny_tokenizer

PROMPTS = ["a red circle", "two blue squares above a green tree at night", "a cat", "one yellow star on a dark sky"]


@pytest.fixture(scope="module")
def rm():
    model, processor = tiny_model(seed=0)
    return ZRewardModel(model, processor)


def _images(n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size + 7 * i, size, 3), dtype=np.uint8)) for i in range(n)]


def test_batched_equals_one_by_one(rm):
    imgs = _images(4)
    batch = rm.processor(imgs, PROMPTS)
    assert len(set(batch.attention_mask.sum(1).tolist())) > 1  # prompts of different lengths
    with torch.no_grad():
        together = rm.distributions(batch)
        alone = torch.cat([rm.distributions(rm.processor([im], [p])) for im, p in zip(imgs, PROMPTS)])
    assert together.shape == (4, 4, 9)
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=0)
    scored = rm.score(imgs, PROMPTS, batch_size=3)
    for i, (im, p) in enumerate(zip(imgs, PROMPTS)):
        (one,) = rm.score([im], [p])
        for d in zf.DIMENSIONS:
            assert abs(scored[i][d].mean - one[d].mean) < 1e-4
            np.testing.assert_allclose(scored[i][d].probs, one[d].probs, atol=1e-4)


def test_score_results_are_distributions_on_the_scale(rm):
    results = rm.score(_images(3), PROMPTS[:3])
    assert len(results) == 3
    for r in results:
        assert tuple(r) == zf.DIMENSIONS
        for s in r.values():
            assert len(s.probs) == 9
            assert abs(sum(s.probs) - 1.0) < 1e-5
            assert 0.0 <= s.mean <= 4.0 and s.std >= 0.0
            levels = np.array(zf.ScoreScale().levels)
            assert abs(s.mean - float(np.dot(s.probs, levels))) < 1e-5


def test_distributions_equal_full_vocab_softmax_renormalised(rm):
    # The restricted softmax over the K score rows equals the full-vocabulary softmax renormalised.
    batch = rm.processor(_images(2), PROMPTS[:2])
    with torch.no_grad():
        logp = rm.distributions(batch)
        hidden = rm.hidden_states(batch)
        rows = hidden.gather(1, batch.query_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        full = rm.model.lm_head(rows).float().softmax(-1)[..., rm.score_token_ids]
        want = (full / full.sum(-1, keepdim=True)).log()
    torch.testing.assert_close(logp, want, atol=1e-5, rtol=1e-5)


def test_never_computes_full_logits(rm):
    def fail(*_):
        raise AssertionError("the LM head was asked for full-vocabulary logits")

    handle = rm.model.lm_head.register_forward_hook(fail)
    try:
        rm.score(_images(2), PROMPTS[:2])
        rm.reward(torch.rand(1, 3, 64, 64), PROMPTS[:1])
    finally:
        handle.remove()


def test_reward_is_differentiable_wrt_pixels(rm):
    pixels = torch.rand(2, 3, 80, 96, requires_grad=True)
    r = rm.reward(pixels, PROMPTS[:2])
    assert r.shape == (2, 4)
    r[:, 1].sum().backward()
    g = pixels.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # the reward agrees with scoring the same (bucket-sized) pixels
    px = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        r1 = rm.reward(px, PROMPTS[:1])
    s1 = rm.score([px[0]], PROMPTS[:1])[0]
    assert abs(float(r1[0, 0]) - s1["alignment"].mean) < 1e-5


def test_single_dimension_and_subsets(rm):
    imgs = _images(2)
    one = rm.score(imgs, PROMPTS[:2], dimensions="plausibility")
    assert [tuple(r) for r in one] == [("plausibility",)] * 2
    logp = rm.distributions(rm.processor(imgs, PROMPTS[:2], dimensions=["realism", "alignment"]))
    assert logp.shape == (2, 2, 9)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2, 2))
    with pytest.raises(ValueError, match="unknown dimension"):
        rm.score(imgs, PROMPTS[:2], dimensions=["sharpness"])


def test_distributions_have_gradients_for_training(rm):
    batch = rm.processor(_images(2), PROMPTS[:2])
    rm.model.zero_grad()
    rm.distributions(batch)[:, :, 4].sum().backward()
    head = rm.model.lm_head.weight.grad
    ids = rm.score_token_ids
    assert head[ids].abs().sum() > 0
    others = torch.ones(head.shape[0], dtype=torch.bool)
    others[ids] = False
    assert torch.count_nonzero(head[others]) == 0  # only the score rows of the LM head get gradient
    emb = rm.model.get_input_embeddings().weight.grad
    assert emb is not None and emb.abs().sum() > 0
    rm.model.zero_grad()


def test_save_and_from_pretrained(rm, tmp_path):
    rm.save_pretrained(tmp_path)
    again = ZRewardModel.from_pretrained(tmp_path)
    imgs = _images(2)
    a, b = rm.score(imgs, PROMPTS[:2]), again.score(imgs, PROMPTS[:2])
    for x, y in zip(a, b):
        for d in zf.DIMENSIONS:
            assert abs(x[d].mean - y[d].mean) < 1e-6
    with pytest.raises(FileNotFoundError, match="nope not found"):  # neither a directory nor a hub repo id
        ZRewardModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        ZRewardModel.from_pretrained(tmp_path / "empty")


def test_bad_inputs(rm):
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        rm.score(_images(2), PROMPTS[:1])
    with pytest.raises(TypeError, match="list or tuple of images"):  # a batched tensor is not split silently
        rm.score(torch.rand(2, 3, 64, 64), PROMPTS[:2])
    with pytest.raises(TypeError, match="torch.Tensor"):
        rm.reward(np.zeros((1, 3, 64, 64), np.float32), PROMPTS[:1])
    with pytest.raises(TypeError, match="float"):
        rm.reward(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), PROMPTS[:1])
    with pytest.raises(ValueError, match="scale"):
        ZRewardModel(rm.model, rm.processor, scale=zf.ScoreScale.paper())


def test_model_without_score_rows_is_refused():
    # the processor's tokenizer has the score tokens, but this model's LM head stops short of them
    small, processor = tiny_model(seed=1)
    small.resize_token_embeddings(100)
    with pytest.raises(ValueError, match="outside the LM head"):
        ZRewardModel(small, processor)


def test_add_score_tokens_initialises_rows_from_their_text():
    model, processor = tiny_model(seed=2)
    tok = processor.tokenizer
    ids = add_score_tokens(tok, model)  # idempotent: nothing new
    assert len(tok) == model.get_input_embeddings().weight.shape[0]
    fresh = tiny_tokenizer()
    source = fresh(" 2.5", add_special_tokens=False)["input_ids"]
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(emb[ids["<|score_2.5|>"]], emb[source].mean(0))
    torch.testing.assert_close(model.lm_head.weight[ids["<|score_2.5|>"]], model.lm_head.weight[source].mean(0))


def test_score_buffers_live_on_the_device_of_a_model_moved_before_wrapping(rm, tmp_path):
    # from_pretrained(device=...) moves the HF model, then wraps it: the score rows' ids and levels
    # must be made where the LM head is, or every GPU score fails ("token_ids is on cpu"). The meta
    # device stands in for CUDA on a machine without one.
    rm.save_pretrained(tmp_path)
    loaded = ZRewardModel.from_pretrained(tmp_path, device="meta")
    assert loaded.lm_head.weight.device.type == "meta"
    assert loaded.score_token_ids.device.type == "meta" and loaded.levels.device.type == "meta"
    model, processor = tiny_model(0)
    wrapped = ZRewardModel(model.to("meta"), processor)
    assert wrapped.score_token_ids.device.type == "meta" and wrapped.levels.device.type == "meta"
