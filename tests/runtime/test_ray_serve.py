"""The Ray Serve deployment on a local Ray (2 CPUs): HTTP contract through the Serve proxy, and
Ray's own batching forming batches > 1 under concurrent requests. Slow: Ray takes ~10 s to start.
"""
from __future__ import annotations

import base64
import functools
from concurrent.futures import ThreadPoolExecutor

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'ray[serve]')")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")

from zreward_fast.dimensions import DIMENSIONS  # noqa: E402
from zreward_fast.runtime.ray_serve import build_app  # noqa: E402
from zreward_fast.runtime.testing import FakeScorer, free_port, make_image_bytes  # noqa: E402

pytestmark = pytest.mark.slow

PNG = make_image_bytes(0, (48, 48))
GOOD = {"prompt": "a red cube", "image": base64.b64encode(PNG).decode()}


@pytest.fixture(scope="module")
def serve_app():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(
            scorer_factory=functools.partial(FakeScorer, latency_s=0.1),
            max_batch_size=8,
            batch_wait_timeout_s=0.05,
            max_items=4,
            max_body_bytes=64 * 1024,
        )
        handle = serve.run(app, name="zreward", route_prefix="/")
        keyed = build_app(scorer_factory=FakeScorer, api_key="s3cret", ray_actor_options={"num_cpus": 0.5})
        serve.run(keyed, name="keyed", route_prefix="/keyed")
        yield f"http://127.0.0.1:{port}", handle
    finally:
        serve.shutdown()
        ray.shutdown()


def _check_scores(scores, dims=DIMENSIONS):
    assert list(scores) == list(dims)
    for d in dims:
        assert set(scores[d]) == {"mean", "std", "probs"}
        assert len(scores[d]["probs"]) == 9 and abs(sum(scores[d]["probs"]) - 1) < 1e-9


def test_http_contract(serve_app):
    url, _ = serve_app
    with httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json() == {"status": "ready"}
        r = c.post("/v1/score", json=GOOD)
        assert r.status_code == 200, r.text
        assert set(r.json()) == {"scores"}
        _check_scores(r.json()["scores"])
        expected = FakeScorer().score([PNG], [GOOD["prompt"]])[0]
        assert r.json()["scores"]["alignment"] == expected["alignment"].to_dict()  # same answer as the server

        r = c.post("/v1/score", json={"items": [GOOD, {**GOOD, "prompt": "x"}], "dimensions": ["realism"]})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert len(results) == 2 and all(set(x) == {"scores"} for x in results)
        _check_scores(results[0]["scores"], ("realism",))

        for body, status, code in [
            ({"prompt": "p", "image": "!!"}, 400, "invalid_base64"),
            ({**GOOD, "dimensions": ["beauty"]}, 400, "unknown_dimension"),
            ({"items": [GOOD] * 5}, 400, "too_many_items"),
            ({"items": [GOOD, {**GOOD, "prompt": "__fail__"}]}, 400, "invalid_input"),
            ({"prompt": "p", "image": "A" * 70_000}, 413, "body_too_large"),
        ]:
            r = c.post("/v1/score", json=body)
            assert r.status_code == status and r.json()["error"]["code"] == code, r.text
        r = c.post("/v1/score", content=b"\xff", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_encoding"


def test_api_key(serve_app):
    url, _ = serve_app
    with httpx.Client(base_url=url + "/keyed", timeout=60) as c:
        r = c.post("/v1/score", json=GOOD)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert c.post("/v1/score", json=GOOD, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/v1/score", json=GOOD, headers={"X-API-Key": "s3cret"}).status_code == 200


def test_ray_batching_forms_batches(serve_app):
    url, handle = serve_app
    with ThreadPoolExecutor(16) as ex:
        codes = list(ex.map(lambda i: httpx.post(url + "/v1/score", json={**GOOD, "prompt": f"p{i}"}, timeout=60).status_code,
                            range(16)))
    assert codes == [200] * 16
    # the deployment handle works too, through the same batch queue
    ok, result = handle.score_one.remote(PNG, "via handle").result()
    assert ok and set(result) == set(DIMENSIONS)
    sizes = handle.stats.remote().result()["batch_size_counts"]
    assert max(sizes) > 1 and max(sizes) <= 8, sizes
