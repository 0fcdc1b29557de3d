"""A Ray Serve deployment of the scorer, for scale-out over replicas and machines.

It speaks the same HTTP contract as :mod:`zreward_fast.runtime.server` (the parsing, validation,
response and error code come from :mod:`zreward_fast.runtime.http_schema`, so the two cannot
drift), but batches with Ray Serve's own ``@serve.batch`` instead of our
:class:`DynamicBatcher`: Serve already queues per replica, and a second queue inside would only
add latency. Routes: ``POST /v1/score``, ``GET /healthz``, ``GET /readyz`` (relative to the
application's route prefix); metrics come from Ray's own Prometheus exporter.

Ray is imported only inside these functions, so the rest of the runtime works without it::

    from ray import serve
    from zreward_fast.runtime.ray_serve import build_app
    serve.run(build_app("bundle_dir", num_replicas=2), route_prefix="/")

Each replica builds its scorer once (from the bundle, or from ``scorer_factory``, e.g. a
``functools.partial`` of :class:`~zreward_fast.runtime.testing.FakeScorer` in tests) and warms it
up before taking traffic. A batch mixes dimension selections; it is split by selection, and a
failing group is retried item by item so one bad input fails only its own request.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from typing import Any, Callable

from ..checks import positive_int
from .batcher import score_isolating
from .http_schema import (
    HTTPError, RequestLimits, check_api_key, check_content_type, decode_request, error_body, read_body, render_outcomes,
    response_headers, scorer_bucket,
)

logger = logging.getLogger(__name__)


def _log_internal_error(exc: BaseException) -> None:
    logger.error("scoring failed", exc_info=exc)


def _make_deployment(max_batch_size: int, batch_wait_timeout_s: float) -> Any:
    from ray import serve
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse

    class ZRewardScorer:
        """One replica: a scorer behind ``@serve.batch``."""

        def __init__(self, bundle_dir: str | None, scorer_factory: Callable[[], Any] | None, limits: dict,
                     api_key: str | None = None) -> None:
            self.api_key = api_key
            if scorer_factory is not None:
                self.scorer = scorer_factory()
            else:
                from zreward_fast.runtime import Scorer

                self.scorer = Scorer(bundle_dir)
            self.limits = RequestLimits(**limits)
            self.dimensions = tuple(self.scorer.dimensions)
            self.bucket = scorer_bucket(self.scorer)
            if hasattr(self.scorer, "warmup"):
                self.scorer.warmup()
            self.batch_sizes: collections.Counter[int] = collections.Counter()

        # ------------------------------------------------------------ batching
        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
        async def score_batch(self, items: list[tuple[Any, str, Any]]) -> list[tuple[bool, Any]]:
            """Score ``(image, prompt, dimensions)`` items; each answer is ``(ok, result or exception)``."""
            self.batch_sizes[len(items)] += 1
            return await asyncio.to_thread(self._score_items, items)

        def _score_items(self, items: list[tuple[Any, str, Any]]) -> list[tuple[bool, Any]]:
            out: list[tuple[bool, Any]] = [(False, None)] * len(items)
            groups: dict[Any, list[int]] = collections.defaultdict(list)
            for i, (_, _, dims) in enumerate(items):
                groups[dims].append(i)
            for dims, idx in groups.items():
                outcomes, _ = score_isolating(self.scorer.score, [items[i][0] for i in idx],
                                              [items[i][1] for i in idx], dims)
                for i, (res, exc) in zip(idx, outcomes):
                    out[i] = (True, res) if exc is None else (False, exc)
            return out

        async def score_one(self, image: Any, prompt: str, dimensions: Any = None) -> tuple[bool, Any]:
            """Score one pair through the batch queue (also callable through a deployment handle)."""
            return await self.score_batch((image, prompt, dimensions))

        def stats(self) -> dict:
            """Batch sizes seen by this replica: ``{"batch_size_counts": {size: count}}``."""
            return {"batch_size_counts": dict(self.batch_sizes)}

        # ------------------------------------------------------------ HTTP
        async def __call__(self, request: Request) -> JSONResponse:
            path = request.url.path.rstrip("/")
            try:
                if path.endswith("/healthz"):
                    return JSONResponse({"status": "ok"})
                if path.endswith("/readyz"):
                    return JSONResponse({"status": "ready"})  # a replica takes traffic only once warmed up
                if not path.endswith("/v1/score"):
                    raise HTTPError(404, "not_found", f"no route {request.url.path}")
                if request.method != "POST":
                    raise HTTPError(405, "method_not_allowed", "use POST /v1/score")
                check_api_key(request.headers, self.api_key)
                return await self._score_http(request)
            except HTTPError as e:
                return JSONResponse(e.body(), status_code=e.status, headers=response_headers(e))
            except Exception:  # a bug or a broken model, never bad input
                logger.exception("unexpected error while scoring")
                return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)

        async def _score_http(self, request: Request) -> JSONResponse:
            check_content_type(request.headers.get("content-type"))
            body = await read_body(request.headers, request.stream(), self.limits.max_body_bytes, ClientDisconnect)
            req = await asyncio.to_thread(decode_request, body, self.limits, self.dimensions, self.bucket)
            answers = await asyncio.gather(*(self.score_one(im, p, req.dimensions) for im, p in zip(req.images, req.prompts)))
            outcomes = [value for _, value in answers]  # a failed item's value is its exception
            return JSONResponse(render_outcomes(outcomes, req.batched, _log_internal_error))

    return serve.deployment(ZRewardScorer)


def build_app(
    bundle_dir: str | None = None,
    num_replicas: int = 1,
    max_batch_size: int = 16,
    batch_wait_timeout_s: float = 0.005,
    *,
    scorer_factory: Callable[[], Any] | None = None,
    api_key: str | None = None,
    max_ongoing_requests: int | None = None,
    ray_actor_options: dict | None = None,
    **limits: Any,
) -> Any:
    """A bound Ray Serve application; run it with ``serve.run(app, route_prefix=...)``.

    Args:
        bundle_dir: the export bundle each replica loads (``Scorer(bundle_dir)``).
        num_replicas: replicas (processes) of the deployment.
        max_batch_size, batch_wait_timeout_s: ``@serve.batch`` settings per replica.
        scorer_factory: instead of ``bundle_dir``, a picklable zero-argument callable that builds
            the scorer inside the replica (tests pass a fake).
        api_key: if set, ``POST /v1/score`` needs ``Authorization: Bearer KEY`` or ``X-API-Key``
            (401 otherwise), as on the HTTP server.
        max_ongoing_requests: requests a replica accepts at once (default ``4 * max_batch_size``,
            so that full batches can form); Serve queues the rest in its proxies.
        ray_actor_options: e.g. ``{"num_gpus": 1}``.
        limits: :class:`~zreward_fast.runtime.http_schema.RequestLimits` fields
            (``max_body_bytes``, ``max_items``, ``max_image_pixels``, ``max_prompt_chars``).
    """
    if (bundle_dir is None) == (scorer_factory is None):
        raise ValueError("give exactly one of bundle_dir and scorer_factory")
    if scorer_factory is not None and not callable(scorer_factory):
        raise TypeError("scorer_factory must be a zero-argument callable")
    positive_int("num_replicas", num_replicas)
    positive_int("max_batch_size", max_batch_size)
    if isinstance(batch_wait_timeout_s, bool) or not isinstance(batch_wait_timeout_s, (int, float)) or batch_wait_timeout_s < 0:
        raise ValueError(f"batch_wait_timeout_s must be a number >= 0, got {batch_wait_timeout_s!r}")
    checked = RequestLimits(**limits)  # fail here, not in every replica
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ValueError("api_key must be a non-empty string or None")
    deployment = _make_deployment(max_batch_size, float(batch_wait_timeout_s)).options(
        name="ZRewardScorer",
        num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing_requests or 4 * max_batch_size,
        ray_actor_options=ray_actor_options or {"num_cpus": 1},
    )
    return deployment.bind(None if bundle_dir is None else str(bundle_dir), scorer_factory, dataclasses.asdict(checked), api_key)
