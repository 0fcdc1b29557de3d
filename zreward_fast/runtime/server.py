"""The HTTP server (``zreward-fast serve``): FastAPI on uvicorn in front of a :class:`DynamicBatcher`.

Endpoints (the HTTP contract; request, response and error shapes are documented in
:mod:`zreward_fast.runtime.http_schema`):

- ``POST /v1/score``: one pair or ``items``; answers ``{"scores": ...}`` or ``{"results": [...]}``.
- ``GET /healthz``: the process is alive (200 ``{"status": "ok"}``).
- ``GET /readyz``: the model is loaded and warmed up (200 ``{"status": "ready"}``, else 503).
- ``GET /metrics``: Prometheus text format, from a registry of this app alone.

A request goes through stages, each timed in ``zreward_stage_latency_seconds{stage}``: ``decode``
(body -> JSON -> base64 -> checked and decoded images, in a thread pool so the event loop never
parses images), ``queue_wait`` and ``inference`` (in the batcher), ``total``. Limits are checked
before the work they protect: auth, readiness and Content-Type first, then the declared and the
streamed body size, then items and prompt length, then each image's header (format, pixel
count) before its pixels are decoded. Bad input is always a 4xx JSON error; a 500 means a bug or
a broken model.

Security defaults: binds 127.0.0.1; an API key (``Authorization: Bearer KEY`` or ``X-API-Key``)
protects ``/v1/score`` and ``/metrics`` when configured (the probes stay open for orchestrators).
Shutdown (SIGTERM/SIGINT) stops accepting, finishes requests in flight (up to
``shutdown_timeout_s``), then drains and stops the batcher.
"""
from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..checks import positive_int
from .batcher import BatcherError, BatchInfo, DynamicBatcher
from .http_schema import (
    HTTPError, RequestLimits, check_api_key, check_content_type, decode_request, error_body, error_for_exception, read_body,
    render_outcomes, response_headers, scorer_bucket,
)

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ENDPOINTS = frozenset({"/v1/score", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"})
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass
class ServerConfig:
    """Limits, batching and lifecycle settings of one server.

    The defaults suit one model replica on loopback: raise ``max_body_bytes`` together with
    ``max_items`` for large batched requests. ``max_image_pixels`` bounds the decoded size of one
    image (3 bytes a pixel while it is decoded).
    """

    api_key: str | None = field(default=None, repr=False)
    max_body_bytes: int = 16 * 1024 * 1024
    max_items: int = 16
    max_image_pixels: int = 4096 * 4096
    max_prompt_chars: int = 2000
    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 256
    num_workers: int = 1
    request_timeout_s: float = 30.0
    decode_threads: int = 4
    # bytes of request bodies being read, parsed and decoded at once: a request that would pass it
    # gets 429 before its body is read (one request is always admitted): parsing and decoding
    # multiply a body's size in memory, so this bounds the server's memory under hostile bodies
    max_decoding_bytes: int = 64 * 1024 * 1024
    warmup: bool = True  # run scorer.warmup() at start-up; /readyz is 503 until it is done
    resize_in_decoder: bool = True  # resize to the scorer's bucket in the decode threads
    shutdown_timeout_s: float = 30.0
    # a request's headers and body must arrive within this (else 408 and the connection closes):
    # slow clients cannot hold connections (runtime/protocol.py)
    read_timeout_s: float = 10.0
    keep_alive_s: float = 5.0  # an idle kept-alive connection closes after this
    max_connections: int = 1000  # past it uvicorn answers 503 to new requests

    def __post_init__(self) -> None:
        self.limits()  # validates the four limits
        for name in ("max_batch_size", "max_queue", "num_workers", "decode_threads", "max_decoding_bytes",
                     "max_connections"):
            positive_int(name, getattr(self, name))
        for name in ("request_timeout_s", "shutdown_timeout_s", "read_timeout_s", "keep_alive_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")
        if isinstance(self.max_wait_ms, bool) or not isinstance(self.max_wait_ms, (int, float)) or not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be a number >= 0, got {self.max_wait_ms!r}")
        if self.max_items > self.max_queue:
            raise ValueError(f"max_items ({self.max_items}) must not exceed max_queue ({self.max_queue})")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ValueError("api_key must be a non-empty string or None")

    def limits(self) -> RequestLimits:
        return RequestLimits(self.max_body_bytes, self.max_items, self.max_image_pixels, self.max_prompt_chars)

    def uvicorn_options(self) -> dict[str, Any]:
        """What uvicorn needs of this config: the read deadline, keep-alive, connection limit and
        graceful-shutdown timeout."""
        from .protocol import deadline_protocol

        return {"http": deadline_protocol(self.read_timeout_s), "timeout_keep_alive": max(1, math.ceil(self.keep_alive_s)),
                "limit_concurrency": self.max_connections,
                "timeout_graceful_shutdown": max(1, math.ceil(self.shutdown_timeout_s))}


_TRIM_AFTER_BYTES = 1 << 20  # bodies this large leave parse garbage worth handing back to the OS


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_memory() -> None:
    """Hand freed heap memory back to the OS: glibc keeps what a large parse freed in its arenas
    (issue 12 saw a server stay at ~680 MB, from 138, after hostile bodies). No-op off glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class _Metrics:
    """Prometheus metrics in a registry of their own (several apps can live in one process)."""

    def __init__(self, max_batch_size: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("zreward_http_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "code"], registry=r)
        self.queue_depth = Gauge("zreward_queue_depth", "Requests waiting for a batch", registry=r)
        self.ready = Gauge("zreward_ready", "1 when the model is loaded and warmed up", registry=r)
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch_size} - {n for n in (2, 4, 8, 16, 32, 64, 128, 256) if n > max_batch_size})
        self.batch_size = Histogram("zreward_batch_size", "Requests per model batch", buckets=sizes, registry=r)
        self.latency = Histogram("zreward_stage_latency_seconds",
                                 "Latency per stage: decode, queue_wait, inference (per batch), total",
                                 ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.abandoned = Counter("zreward_abandoned_items", "Queued items dropped because their client disconnected",
                                 registry=r)
        self.batch_failures = Counter("zreward_batch_retries", "Batches that failed whole and were retried one by one",
                                      registry=r)

    def on_batch(self, info: BatchInfo) -> None:
        self.batch_size.observe(info.size)
        self.latency.labels("inference").observe(info.inference_s)
        wait = self.latency.labels("queue_wait")
        for w in info.queue_wait_s:
            wait.observe(w)
        if info.retried:
            self.batch_failures.inc()


class _State:
    """Everything one app owns: scorer, batcher, decode threads, readiness, metrics."""

    def __init__(self, scorer: Any, config: ServerConfig) -> None:
        for attr in ("score", "dimensions"):
            if not hasattr(scorer, attr):
                raise TypeError(f"scorer must have .score and .dimensions; {type(scorer).__name__} lacks .{attr}")
        self.scorer = scorer
        self.config = config
        self.limits = config.limits()
        self._decoding_bytes = 0  # reserved by requests being read or decoded (event loop only)
        self.dimensions = tuple(scorer.dimensions)
        self.bucket = scorer_bucket(scorer) if config.resize_in_decoder else None
        self.metrics = _Metrics(config.max_batch_size)
        self.batcher: DynamicBatcher | None = None
        self.decode_pool: ThreadPoolExecutor | None = None
        self.ready = threading.Event()
        self.closing = False
        self.warmup_error: str | None = None
        self.metrics.queue_depth.set_function(lambda: self.batcher.queue_depth if self.batcher else 0)
        self.metrics.ready.set_function(lambda: 1.0 if self.ready.is_set() and not self.closing else 0.0)

    def start(self) -> None:
        c = self.config
        self.batcher = DynamicBatcher(
            self.scorer.score, max_batch_size=c.max_batch_size, max_wait_ms=c.max_wait_ms, max_queue=c.max_queue,
            num_workers=c.num_workers, default_timeout=c.request_timeout_s, on_batch=self.metrics.on_batch,
        )
        self.decode_pool = ThreadPoolExecutor(c.decode_threads, thread_name_prefix="zreward-decode")
        if c.warmup and hasattr(self.scorer, "warmup"):
            threading.Thread(target=self._warmup, name="zreward-warmup", daemon=True).start()
        else:
            self.ready.set()

    def _warmup(self) -> None:
        t = time.perf_counter()
        try:
            self.scorer.warmup()
        except Exception as e:
            self.warmup_error = f"warm-up failed: {type(e).__name__}: {e}"
            logger.exception("scorer warm-up failed; the server stays not ready")
            return
        logger.info("scorer warmed up in %.2f s; ready", time.perf_counter() - t)
        self.ready.set()

    def stop(self) -> None:
        self.closing = True
        if self.batcher is not None:
            self.batcher.close(drain=True, timeout=self.config.shutdown_timeout_s)
        if self.decode_pool is not None:
            self.decode_pool.shutdown(wait=True)

    def _admit_body(self, content_length: str | None) -> int:
        """Reserve a body's bytes of the decoding budget, or 429 at once (runs on the event loop)."""
        try:
            need = min(int(content_length), self.limits.max_body_bytes) if content_length else self.limits.max_body_bytes
        except ValueError:
            need = self.limits.max_body_bytes  # read_body answers the bad header
        need = max(need, 1)
        if self._decoding_bytes and self._decoding_bytes + need > self.config.max_decoding_bytes:
            raise HTTPError(429, "busy", "too many request bytes are being decoded; retry shortly")
        self._decoding_bytes += need
        return need

    def _decode(self, body: bytes) -> Any:
        try:
            return decode_request(body, self.limits, self.dimensions, self.bucket)
        finally:
            if len(body) >= _TRIM_AFTER_BYTES:
                release_memory()

    def check_auth(self, request: Request) -> None:
        check_api_key(request.headers, self.config.api_key)

    def check_ready(self) -> None:
        if self.closing:
            raise HTTPError(503, "shutting_down", "the server is shutting down")
        if self.warmup_error is not None:  # the details, with paths, are in the log
            raise HTTPError(503, "not_ready", "warm-up failed; the details are in the server log")
        if not self.ready.is_set() or self.batcher is None:
            raise HTTPError(503, "not_ready", "the model is loading or warming up")
        if not self.batcher.workers_alive:
            raise HTTPError(503, "not_ready", "the scoring workers are not running; see the server log")

    async def read_body(self, request: Request) -> bytes:
        return await read_body(request.headers, request.stream(), self.limits.max_body_bytes, ClientDisconnect)

    async def score(self, request: Request) -> Response:
        self.check_auth(request)
        self.check_ready()
        check_content_type(request.headers.get("content-type"))
        need = self._admit_body(request.headers.get("content-length"))
        loop = asyncio.get_running_loop()
        try:
            body = await self.read_body(request)
            t = time.perf_counter()
            req = await loop.run_in_executor(self.decode_pool, self._decode, body)
            del body
            self.metrics.latency.labels("decode").observe(time.perf_counter() - t)
        finally:
            self._decoding_bytes -= need
        scoring = asyncio.ensure_future(
            self.batcher.asubmit_many(req.images, req.prompts, req.dimensions, return_exceptions=True))
        left = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({scoring, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
        if not scoring.done():  # the client left: its items leave the queue instead of being scored
            scoring.cancel()
            self.metrics.abandoned.inc(len(req.images))
            raise HTTPError(499, "client_disconnected", "the client closed the connection")
        try:
            outs = scoring.result()
        except BatcherError as e:  # queue full (429), timed out (504), closing (503)
            raise error_for_exception(e) from None
        return JSONResponse(render_outcomes(outs, req.batched, lambda e: logger.error("scoring failed", exc_info=e)))


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (its body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _error_response(err: HTTPError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=response_headers(err))


class _MetricsMiddleware:
    """Counts every HTTP answer by endpoint and status (499: the client left before any answer)."""

    def __init__(self, app: Any, metrics: _Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [499]

        async def send_and_record(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except asyncio.CancelledError:
            # uvicorn cancels requests still running when the graceful-shutdown timeout ends, and
            # would answer them with a plain-text 500: they get the contract's JSON 503 instead
            if status[0] != 499:
                raise  # the response had started: nothing else can be sent
            err = HTTPError(503, "shutting_down", "the server shut down before this request was scored")
            response = _error_response(err)
            await response(scope, receive, send_and_record)
        except Exception:
            status[0] = 500
            raise
        finally:
            path = scope.get("path", "")
            self.metrics.requests.labels(path if path in _ENDPOINTS else "other", str(status[0])).inc()


def create_app(scorer: Any, config: ServerConfig | None = None) -> FastAPI:
    """A FastAPI app serving ``scorer`` (``Scorer`` or anything with its duck type).

    The batcher and decode threads start with the app's lifespan (uvicorn runs it) and stop with
    it; ``scorer.warmup()`` runs in the background at start-up when ``config.warmup`` is set.
    """
    config = config if config is not None else ServerConfig()
    if not isinstance(config, ServerConfig):
        raise TypeError(f"config must be a ServerConfig, got {type(config).__name__}")
    state = _State(scorer, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, state.stop)

    app = FastAPI(title="zreward-fast", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.zreward = state
    app.add_middleware(_MetricsMiddleware, metrics=state.metrics)

    @app.exception_handler(StarletteHTTPException)
    async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s", request.url.path, exc_info=exc)
        return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)

    from fastapi.openapi.docs import get_swagger_ui_html

    from .openapi import add_schemas, score_route_docs

    @app.post("/v1/score", **score_route_docs())
    async def score(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            return await state.score(request)
        except HTTPError as e:
            return _error_response(e)
        except Exception as e:  # a bug or a broken model, never bad input
            logger.error("unexpected error while scoring", exc_info=e)
            return _error_response(HTTPError(500, "internal_error", "internal server error"))
        finally:
            state.metrics.latency.labels("total").observe(time.perf_counter() - t0)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        try:
            state.check_ready()
        except HTTPError as e:
            return _error_response(e)
        return JSONResponse({"status": "ready"})

    def refused(request: Request) -> Response | None:
        """The 401 answer when the API key is set and missing or wrong, else None."""
        try:
            state.check_auth(request)
        except HTTPError as e:
            return _error_response(e)
        return None

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if (denied := refused(request)) is not None:
            return denied
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # the OpenAPI schema and Swagger UI, behind the API key when one is set
    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> Response:
        if (denied := refused(request)) is not None:
            return denied
        if app.openapi_schema is None:
            app.openapi_schema = add_schemas(app.openapi())
        return JSONResponse(app.openapi_schema)

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> Response:
        if (denied := refused(request)) is not None:
            return denied
        return get_swagger_ui_html(openapi_url="/openapi.json", title="zreward-fast API")

    return app


def run_server(
    bundle_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    providers: list | None = None,
    parallel_runs: int = 1,
    backend: str = "onnxruntime",
    precision: str = "f32",
    check_parity: bool | None = None,
    log_level: str = "info",
    **config: Any,
) -> None:
    """Load the bundle's :class:`Scorer`, then serve it until SIGTERM/SIGINT.

    ``parallel_runs`` is the Scorer's (each batch split into that many concurrent parts: more
    images/s on a multi-core CPU, at some cost in single-request latency), as are ``backend``
    (``"onnxruntime"`` or ``"openvino"``), ``precision`` (OpenVINO's) and ``check_parity`` (a
    precision below the export's is checked against the bundle's reference scores before serving).

    ``config`` takes the fields of :class:`ServerConfig`; ``api_key`` defaults to the
    ``ZREWARD_API_KEY`` environment variable (so the key need not appear on a command line).
    The port opens once the bundle is loaded; /readyz turns 200 after the warm-up.
    """
    import uvicorn

    from zreward_fast.runtime import Scorer

    if config.get("api_key") is None and os.environ.get("ZREWARD_API_KEY"):
        config["api_key"] = os.environ["ZREWARD_API_KEY"]
    cfg = ServerConfig(**config)
    if host not in _LOOPBACK and cfg.api_key is None:
        logger.warning("serving on %s without an API key: anyone who can reach the port can use the model", host)
    scorer = Scorer(bundle_dir, providers=providers, parallel_runs=parallel_runs, backend=backend, precision=precision,
                    check_parity=check_parity)
    logger.info("loaded %r; config %s", scorer, {k: v for k, v in asdict(cfg).items() if k != "api_key"})
    app = create_app(scorer, cfg)
    uvicorn.run(app, host=host, port=port, log_level=log_level, lifespan="on", **cfg.uvicorn_options())
