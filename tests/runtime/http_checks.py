"""What the HTTP server tests share: sample images, a live server around a fake scorer, and the
checks of the contract's answers (scores, JSON errors, Prometheus samples)."""
from __future__ import annotations

import base64
import time
from contextlib import contextmanager

import httpx
from prometheus_client.parser import text_string_to_metric_families

from zreward_fast.dimensions import DIMENSIONS
from zreward_fast.runtime.server import ServerConfig, create_app
from zreward_fast.runtime.testing import FakeScorer, LiveServer, make_image_bytes

PNG = make_image_bytes(0, (64, 64))
JPEG = make_image_bytes(1, (64, 64), "JPEG")
WEBP = make_image_bytes(2, (64, 64), "WEBP")
K = 9


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


GOOD = {"prompt": "a red cube on a table", "image": b64(PNG)}


def _wait_until(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


@contextmanager
def serving(scorer=None, **config):
    scorer = scorer if scorer is not None else FakeScorer()
    cfg = ServerConfig(**config)
    app = create_app(scorer, cfg)
    with LiveServer(app, **cfg.uvicorn_options()) as srv:  # the production protocol and limits
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            yield srv, client, app


def _ready(client):
    _wait_until(lambda: client.get("/readyz").status_code == 200)


def _metrics(client, **headers) -> dict:
    """{(name, labels...): value} of the samples in /metrics."""
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _requests_by_code(metrics: dict, endpoint="/v1/score") -> dict:
    return {
        dict(labels)["code"]: v
        for (name, labels), v in metrics.items()
        if name == "zreward_http_requests_total" and dict(labels).get("endpoint") == endpoint
    }


def _check_scores(scores: dict, dims=DIMENSIONS):
    assert list(scores) == list(dims)
    for d in dims:
        assert set(scores[d]) == {"mean", "std", "probs"}
        probs = scores[d]["probs"]
        assert len(probs) == K and all(isinstance(p, float) and 0 <= p <= 1 for p in probs)
        assert abs(sum(probs) - 1.0) < 1e-9
        assert 0.0 <= scores[d]["mean"] <= 4.0 and scores[d]["std"] >= 0.0


def _check_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["code"], str) and isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body

