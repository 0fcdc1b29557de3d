"""The HTTP server against a fake scorer, over a real loopback socket (uvicorn in a thread).

Covers the HTTP contract of ``runtime.http_schema`` (shapes, codes), probes, metrics, the API key,
timeouts, back-pressure and graceful shutdown; `test_server_abuse.py` has bad input, load and
hostile clients.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

# The serving stack is the "serve" extra: without it these tests skip (with the reason) rather
# than fail collection.
for _mod in ("fastapi", "uvicorn", "httpx", "prometheus_client"):
    pytest.importorskip(_mod, reason=f"{_mod} is not installed (pip install -e '.[serve]')")

import httpx  # noqa: E402
from http_checks import (  # noqa: E402
    PNG, JPEG, WEBP, GOOD, b64, serving, _wait_until, _ready, _metrics, _requests_by_code, _check_scores, _check_error,
)

from zreward_fast.dimensions import DIMENSIONS  # noqa: E402
from zreward_fast.runtime.server import ServerConfig, create_app, run_server  # noqa: E402
from zreward_fast.runtime.testing import FakeScorer, LiveServer  # noqa: E402

# ------------------------------------------------------------------------------- contract
def test_single_and_batched_contract():
    with serving() as (_, client, app):
        _ready(client)
        r = client.post("/v1/score", json=GOOD)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        body = r.json()
        assert set(body) == {"scores"}
        _check_scores(body["scores"])
        expected = FakeScorer().score([PNG], [GOOD["prompt"]])[0]
        for d in DIMENSIONS:
            assert body["scores"][d] == expected[d].to_dict()  # floats survive JSON exactly

        items = [{"prompt": f"prompt {i}", "image": b64(img)} for i, img in enumerate((PNG, JPEG, WEBP))]
        r = client.post("/v1/score", json={"items": items, "dimensions": ["realism", "alignment"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"results"} and len(body["results"]) == 3
        for res, it, img in zip(body["results"], items, (PNG, JPEG, WEBP)):
            assert set(res) == {"scores"}
            _check_scores(res["scores"], ("realism", "alignment"))
            exp = FakeScorer().score([img], [it["prompt"]], ["realism"])[0]["realism"]
            assert res["scores"]["realism"]["mean"] == pytest.approx(exp.mean)

        # a data URL and line-wrapped base64 are accepted too
        wrapped = "\n".join(GOOD["image"][i : i + 76] for i in range(0, len(GOOD["image"]), 76))
        for image in ("data:image/png;base64," + GOOD["image"], wrapped):
            r = client.post("/v1/score", json={"prompt": GOOD["prompt"], "image": image, "dimensions": ["aesthetics"]})
            assert r.status_code == 200, r.text
            _check_scores(r.json()["scores"], ("aesthetics",))


def test_health_and_readiness_follow_warmup():
    gate = threading.Event()
    with serving(FakeScorer(warmup_gate=gate)) as (_, client, _app):
        assert client.get("/healthz").json() == {"status": "ok"}
        _check_error(client.get("/readyz"), 503, "not_ready")
        _check_error(client.post("/v1/score", json=GOOD), 503, "not_ready")
        assert _metrics(client)[("zreward_ready", ())] == 0.0
        gate.set()
        _ready(client)
        assert client.get("/readyz").json() == {"status": "ready"}
        assert client.post("/v1/score", json=GOOD).status_code == 200
        assert _metrics(client)[("zreward_ready", ())] == 1.0


def test_failed_warmup_stays_not_ready():
    class Broken(FakeScorer):
        def warmup(self):
            raise RuntimeError("no GPU")

    with serving(Broken()) as (_, client, _app):
        time.sleep(0.2)
        body = _check_error(client.get("/readyz"), 503, "not_ready")
        assert "warm-up failed" in body["error"]["message"]
        assert "no GPU" not in body["error"]["message"]  # details (paths...) go to the log, not to clients
        assert client.get("/healthz").status_code == 200


def test_a_scorer_base_exception_fails_its_batch_not_the_server():
    """Issue 12: a BaseException in the scorer killed the only batcher worker (every later request
    504, /readyz still ready). The batch fails, the worker goes on, /readyz checks the workers."""

    class Fatal(BaseException):
        pass

    class Flaky(FakeScorer):
        calls = 0

        def score(self, images, prompts, dimensions=None):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise Fatal("scorer crashed")
            return super().score(images, prompts, dimensions)

    with serving(Flaky(), num_workers=1, max_wait_ms=1) as (_, client, app):
        _ready(client)
        first = client.post("/v1/score", json=GOOD)
        assert first.status_code >= 500 and "error" in first.json()
        assert client.post("/v1/score", json=GOOD).status_code == 200  # the same worker scores again
        assert client.get("/readyz").json() == {"status": "ready"}
        state = app.state.zreward
        state.batcher.close()  # workers gone: not ready any more
        _check_error(client.get("/readyz"), 503, "not_ready")


def test_metrics():
    with serving(FakeScorer(latency_s=0.02), max_wait_ms=20) as (_, client, _app):
        _ready(client)
        with ThreadPoolExecutor(8) as ex:
            codes = list(ex.map(lambda _: client.post("/v1/score", json=GOOD).status_code, range(8)))
        assert codes == [200] * 8
        client.post("/v1/score", json={"prompt": 1, "image": "x"})
        m = _metrics(client)
        assert _requests_by_code(m) == {"200": 8.0, "400": 1.0}
        assert ("zreward_queue_depth", ()) in m
        assert m[("zreward_batch_size_count", ())] >= 1
        assert m[("zreward_batch_size_sum", ())] == 8.0
        for stage in ("decode", "queue_wait", "inference", "total"):
            assert m[("zreward_stage_latency_seconds_count", (("stage", stage),))] >= 1, stage
        assert m[("zreward_stage_latency_seconds_count", (("stage", "queue_wait"),))] == 8
        assert m[("zreward_stage_latency_seconds_count", (("stage", "total"),))] == 9


def test_two_apps_in_one_process_have_separate_metrics():
    a, b = create_app(FakeScorer()), create_app(FakeScorer())
    assert a.state.zreward.metrics.registry is not b.state.zreward.metrics.registry


def test_api_key():
    with serving(api_key="s3cret") as (_, client, _app):
        _ready(client)
        _check_error(client.post("/v1/score", json=GOOD), 401, "unauthorized")
        r = client.post("/v1/score", json=GOOD, headers={"Authorization": "Bearer wrong"})
        _check_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
        _check_error(client.post("/v1/score", json=GOOD, headers={"X-API-Key": "s3cre"}), 401)
        _check_error(client.post("/v1/score", json=GOOD, headers={"Authorization": "Basic s3cret"}), 401)
        assert client.post("/v1/score", json=GOOD, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.post("/v1/score", json=GOOD, headers={"X-API-Key": "s3cret"}).status_code == 200
        _check_error(client.get("/metrics"), 401, "unauthorized")
        _metrics(client, authorization="Bearer s3cret")
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_timeout_is_504():
    with serving(FakeScorer(latency_s=1.0), request_timeout_s=0.2, max_wait_ms=0) as (_, client, _app):
        _ready(client)
        t = time.perf_counter()
        _check_error(client.post("/v1/score", json=GOOD), 504, "timeout")
        assert time.perf_counter() - t < 0.9


class _GatedScorer(FakeScorer):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.gate = threading.Event()

    def score(self, images, prompts, dimensions=None):
        assert self.gate.wait(20)
        return super().score(images, prompts, dimensions)


def test_full_queue_is_429_at_once():
    scorer = _GatedScorer()
    with serving(scorer, max_batch_size=1, max_queue=1, max_items=1, max_wait_ms=0) as (srv, client, app):
        _ready(client)
        batcher = app.state.zreward.batcher
        with ThreadPoolExecutor(2) as ex:
            first = ex.submit(httpx.post, srv.url + "/v1/score", json=GOOD, timeout=30)
            _wait_until(lambda: batcher.stats().in_flight == 1)
            second = ex.submit(httpx.post, srv.url + "/v1/score", json=GOOD, timeout=30)
            _wait_until(lambda: batcher.queue_depth == 1)
            t = time.perf_counter()
            r = client.post("/v1/score", json=GOOD)
            assert time.perf_counter() - t < 0.5
            _check_error(r, 429, "queue_full")
            assert r.headers["retry-after"] == "1"
            scorer.gate.set()
            assert first.result(10).status_code == 200 and second.result(10).status_code == 200


def test_broken_model_is_a_500_json_error():
    with serving(FakeScorer(error=RuntimeError("model exploded: secret detail"))) as (_, client, _app):
        _ready(client)
        body = _check_error(client.post("/v1/score", json=GOOD), 500, "internal_error")
        assert "secret" not in body["error"]["message"]


def test_graceful_shutdown_finishes_requests_in_flight():
    scorer = FakeScorer(latency_s=0.8)
    app = create_app(scorer, ServerConfig(max_batch_size=1, max_wait_ms=0))
    srv = LiveServer(app).start()
    url = srv.url + "/v1/score"
    try:
        _wait_until(lambda: httpx.get(srv.url + "/readyz").status_code == 200)
        batcher = app.state.zreward.batcher
        with ThreadPoolExecutor(2) as ex:
            running = ex.submit(httpx.post, url, json=GOOD, timeout=30)
            _wait_until(lambda: batcher.stats().in_flight == 1)
            queued = ex.submit(httpx.post, url, json=GOOD, timeout=30)
            _wait_until(lambda: batcher.queue_depth == 1)
            srv.request_stop()
            for fut in (running, queued):
                r = fut.result(20)
                assert r.status_code == 200, r.text
                _check_scores(r.json()["scores"])
    finally:
        srv.stop()
    assert batcher.closed
    with pytest.raises(httpx.ConnectError):
        httpx.post(url, json=GOOD, timeout=5)


def test_run_server_builds_scorer_and_serves_on_loopback(monkeypatch):
    import uvicorn

    import zreward_fast.runtime as runtime

    seen = {}

    def fake_scorer(bundle_dir, providers=None, parallel_runs=1, backend="onnxruntime", precision="f32",
                    check_parity=None):
        seen.update(runs=parallel_runs, backend=backend, precision=precision, check_parity=check_parity)
        return seen.setdefault("scorer", FakeScorer())

    monkeypatch.setattr(runtime, "Scorer", fake_scorer)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setenv("ZREWARD_API_KEY", "from-env")
    run_server("bundle-dir", port=8123, max_items=3, parallel_runs=2, backend="openvino", precision="bf16",
               check_parity=False)
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123 and seen["runs"] == 2
    assert seen["backend"] == "openvino" and seen["precision"] == "bf16" and seen["check_parity"] is False
    state = seen["app"].state.zreward
    assert state.scorer is seen["scorer"] and state.config.max_items == 3 and state.config.api_key == "from-env"


@pytest.mark.parametrize(
    "kwargs", [{"max_items": 0}, {"max_body_bytes": -1}, {"max_items": 300, "max_queue": 256},
               {"request_timeout_s": 0}, {"max_wait_ms": -1}, {"api_key": ""}, {"decode_threads": 0}],
)
def test_server_config_validates(kwargs):
    with pytest.raises(ValueError):
        ServerConfig(**kwargs)


def test_runtime_serving_modules_import_no_torch():
    code = (
        "import sys\n"
        "import zreward_fast.runtime.batcher, zreward_fast.runtime.http_schema, zreward_fast.runtime.server\n"
        "import zreward_fast.runtime.testing, zreward_fast.runtime.ray_serve\n"
        "bad = [m for m in ('torch', 'transformers', 'ray') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

