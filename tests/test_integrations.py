"""`zreward_fast.integrations`: the RL reward function over every source and input form, and the
HTTP client's batching, retries and errors (issue 14, part 1)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("httpx")

from zreward_fast.dimensions import DIMENSIONS  # noqa: E402
from zreward_fast.integrations import HTTPScorer, ServerError, reward_fn, to_images  # noqa: E402

PROMPTS = ["a red square", "two blue circles", "a green star above a cube"]


@pytest.fixture(scope="module")
def sources(tiny_sources):
    return tiny_sources


@pytest.fixture(scope="module")
def batch():
    """Three images of different sizes' worth of content, as the float tensor an RL trainer holds."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, 40, 56, generator=g)


@pytest.fixture(scope="module")
def reference(sources, batch):
    """What ``Scorer.score`` gives for the same images (the uint8 pixels a PNG of them holds)."""
    from zreward_fast.runtime import Scorer

    u8 = [np.ascontiguousarray(a) for a in (batch * 255).round().byte().permute(0, 2, 3, 1).numpy()]
    return Scorer(sources[1]).score(u8, PROMPTS)


def _expected(ref, weights=None, risk=0.0, dims=DIMENSIONS):
    w = np.ones(len(dims)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return np.array([sum(wi * (r[d].mean - risk * r[d].std) for wi, d in zip(w, dims)) for r in ref])


@pytest.fixture(scope="module")
def server_url(sources):
    from zreward_fast.runtime import Scorer
    from zreward_fast.runtime.server import ServerConfig, create_app
    from zreward_fast.runtime.testing import LiveServer

    cfg = ServerConfig(max_items=2, max_batch_size=4, warmup=False)
    with LiveServer(create_app(Scorer(sources[1]), cfg), **cfg.uvicorn_options()) as srv:
        yield srv.url


def test_tensor_array_and_pil_inputs_score_as_the_scorer_does(sources, batch, reference):
    fn = reward_fn(sources[1])
    want = _expected(reference)
    scores, info = fn(batch, PROMPTS, metadata={"step": 0})
    assert isinstance(scores, torch.Tensor) and scores.dtype == torch.float32 and scores.shape == (3,)
    np.testing.assert_allclose(scores.numpy(), want, atol=1e-5)
    for d, j in zip(DIMENSIONS, range(4)):
        np.testing.assert_allclose(info[f"{d}_mean"], [r[d].mean for r in reference], atol=1e-5)
        np.testing.assert_allclose(info[f"{d}_std"], [r[d].std for r in reference], atol=1e-5)
    arrays = np.stack(to_images(batch))  # uint8 [B, H, W, 3]
    assert arrays.dtype == np.uint8 and arrays.shape == (3, 40, 56, 3)
    s_arr, _ = fn(arrays, PROMPTS, None)
    assert isinstance(s_arr, np.ndarray) and s_arr.dtype == np.float32
    np.testing.assert_allclose(s_arr, want, atol=1e-5)
    s_pil, _ = fn([Image.fromarray(a) for a in arrays], PROMPTS, None)
    np.testing.assert_allclose(s_pil, want, atol=1e-5)


def test_local_model_agrees_with_the_bundle(sources, batch, reference):
    scores, _ = reward_fn(sources[0])(batch, PROMPTS, None)
    np.testing.assert_allclose(scores.numpy(), _expected(reference), atol=2e-4)


def test_url_of_a_live_server_scores_as_the_scorer_does(server_url, batch, reference):
    """Three images through a server taking 2 items a request: two requests, sent concurrently."""
    fn = reward_fn(server_url, max_items=2, concurrency=2)
    scores, info = fn(batch, PROMPTS, None)
    np.testing.assert_allclose(scores.numpy(), _expected(reference), atol=1e-5)
    assert set(info) == {f"{d}_{k}" for d in DIMENSIONS for k in ("mean", "std")}
    jpeg, _ = reward_fn(server_url, max_items=2, image_format="jpeg")(batch, PROMPTS, None)
    assert np.abs(jpeg.numpy() - scores.numpy()).max() < 0.5  # lossy, not the same bytes
    with pytest.raises(ServerError, match="too_many_items"):
        reward_fn(server_url, max_items=3)(batch, PROMPTS, None)  # the server takes 2


def test_weights_risk_and_dimensions(sources, batch, reference):
    w = {"alignment": 2.0, "realism": 1.0, "aesthetics": 0.0, "plausibility": 1.0}
    scores, _ = reward_fn(sources[1], weights=w, risk=0.5)(batch, PROMPTS, None)
    np.testing.assert_allclose(scores.numpy(), _expected(reference, [2, 1, 0, 1], risk=0.5), atol=1e-5)
    two = ("realism", "aesthetics")
    scores, info = reward_fn(sources[1], dimensions=two)(batch, PROMPTS, None)
    np.testing.assert_allclose(scores.numpy(), _expected(reference, dims=two), atol=1e-5)
    assert set(info) == {f"{d}_{k}" for d in two for k in ("mean", "std")}
    # risk lowers the reward by the weighted std, never raises it
    plain, _ = reward_fn(sources[1])(batch, PROMPTS, None)
    averse, _ = reward_fn(sources[1], risk=1.0)(batch, PROMPTS, None)
    assert (averse < plain).all()


def test_differentiable_reward_has_gradients_to_the_pixels(sources, batch, reference):
    pixels = batch.clone().requires_grad_(True)
    scores, info = reward_fn(sources[0], differentiable=True, risk=0.25)(pixels, PROMPTS)
    assert scores.requires_grad and scores.shape == (3,)
    scores.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0 and torch.isfinite(pixels.grad).all()
    # the float path skips the uint8 rounding: close to, not equal to, the bundle's scores
    np.testing.assert_allclose(scores.detach().numpy(), _expected(reference, risk=0.25), atol=0.05)
    with pytest.raises(TypeError, match="local PyTorch model"):
        reward_fn(sources[1], differentiable=True)
    with pytest.raises(TypeError, match="float tensor"):
        reward_fn(sources[0], differentiable=True)(to_images(batch), PROMPTS)


@pytest.mark.parametrize("bad, match", [
    (dict(weights={"beauty": 1.0}), "not scored"),
    (dict(weights=[1.0, 2.0]), "one value per dimension"),
    (dict(weights=[0, 0, 0, 0]), "not all zero"),
    (dict(risk=-1.0), "risk"),
    (dict(risk=float("nan")), "risk"),
    (dict(dimensions=["beauty"]), "unknown dimension"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_arguments_are_refused_when_built(sources, bad, match):
    with pytest.raises(ValueError, match=match):
        reward_fn(sources[1], **bad)


def test_bad_images_are_refused_with_a_clear_error(sources, batch):
    fn = reward_fn(sources[1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fn(batch * 2, PROMPTS)
    nan = batch.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fn(nan, PROMPTS)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        fn(batch[0], PROMPTS)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        fn(batch, PROMPTS[:2])
    with pytest.raises(TypeError, match="images must be"):
        fn(object(), PROMPTS)


class _Flaky:
    """An httpx transport answering from a script of (status, headers, body) before the real answer."""

    def __init__(self, script, final):
        import httpx

        self.script, self.final, self.calls, self.lock = list(script), final, [], threading.Lock()
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request):
        import httpx

        with self.lock:
            self.calls.append(request)
            status, headers, body = self.script.pop(0) if self.script else self.final(request)
        return httpx.Response(status, headers=headers, json=body)


def _answer(request):
    import json

    n = len(json.loads(request.content)["items"])
    scores = {d: {"mean": 2.0, "std": 0.5, "probs": [1 / 9] * 9} for d in DIMENSIONS}
    return 200, {}, {"results": [{"scores": scores}] * n}


def test_client_retries_429_and_503_honouring_retry_after(monkeypatch):
    import zreward_fast.integrations.http_client as hc

    slept = []
    monkeypatch.setattr(hc.time, "sleep", slept.append)
    busy = {"error": {"code": "queue_full", "message": "queue is full"}}
    flaky = _Flaky([(429, {"Retry-After": "3"}, busy), (503, {}, {"error": {"code": "not_ready", "message": "warming"}})],
                   _answer)
    client = HTTPScorer("http://test", backoff_s=0.01, transport=flaky.transport)
    out = client.score([np.zeros((8, 8, 3), np.uint8)], ["a"])
    assert out[0]["realism"].mean == 2.0 and len(flaky.calls) == 3
    assert slept[0] >= 3.0 and slept[1] < 1.0  # the first wait is the server's Retry-After


def test_client_gives_up_after_the_last_retry_and_never_retries_a_bad_request(monkeypatch):
    import zreward_fast.integrations.http_client as hc

    monkeypatch.setattr(hc.time, "sleep", lambda s: None)
    busy = (429, {}, {"error": {"code": "queue_full", "message": "queue is full"}})
    flaky = _Flaky([busy] * 10, _answer)
    client = HTTPScorer("http://test", retries=2, transport=flaky.transport)
    with pytest.raises(ServerError, match=r"queue_full \(HTTP 429\) after 3 attempt") as e:
        client.score([np.zeros((8, 8, 3), np.uint8)], ["a"])
    assert e.value.status == 429 and len(flaky.calls) == 3
    bad = _Flaky([(400, {}, {"error": {"code": "prompt_too_long", "message": "too long"}})], _answer)
    with pytest.raises(ServerError, match="prompt_too_long") as e:
        HTTPScorer("http://test", transport=bad.transport).score([np.zeros((8, 8, 3), np.uint8)], ["a"])
    assert len(bad.calls) == 1


def test_client_splits_batches_and_keeps_their_order():
    import json

    seen = []

    def answer(request):
        items = json.loads(request.content)["items"]
        seen.append(len(items))
        scores = [{d: {"mean": float(len(it["prompt"])), "std": 0.0, "probs": [1 / 9] * 9} for d in DIMENSIONS}
                  for it in items]
        return 200, {}, {"results": [{"scores": s} for s in scores]}

    flaky = _Flaky([], answer)
    client = HTTPScorer("http://test", max_items=3, concurrency=3, transport=flaky.transport)
    prompts = ["x" * (i + 1) for i in range(8)]
    out = client.score([np.zeros((8, 8, 3), np.uint8)] * 8, prompts)
    assert sorted(seen) == [2, 3, 3]
    assert [r["alignment"].mean for r in out] == [float(i + 1) for i in range(8)]
    with pytest.raises(ValueError, match="http"):
        HTTPScorer("ftp://x")


def test_reference_statistics_are_the_benchmark_images_scores(sources):
    from zreward_fast.evaluation import _benchmark
    from zreward_fast.integrations import reference_statistics
    from zreward_fast.runtime import Scorer
    from zreward_fast.training.synthetic import GAPS

    stats = reference_statistics(sources[1], seed=1, pairs=8, size=64)
    bench, _ = _benchmark(1, 8, 0, GAPS, 64)
    images = [im for p in bench for im in p.images]
    res = Scorer(sources[1]).score(images, [p.prompt for p in bench for _ in p.images])
    for d in DIMENSIONS:
        v = np.array([r[d].mean for r in res])
        assert stats[d]["images"] == 16
        assert abs(stats[d]["mean"] - v.mean()) < 1e-9 and abs(stats[d]["std"] - v.std()) < 1e-9
