"""A client of a running ``zreward-fast serve``, behind the same ``score()`` as a local ``Scorer``.

Requests follow the server's JSON contract (:mod:`zreward_fast.runtime.http_schema`): batches of
at most ``max_items`` items, each image encoded as PNG (lossless, the default) or JPEG, sent
``concurrency`` at a time. ``429 queue_full`` and ``503 not_ready``/``shutting_down`` are retried
with exponential backoff, waiting at least what the server's ``Retry-After`` asks; connection
errors and timeouts are retried the same way. Any other error, or the last failed retry, raises
:class:`ServerError` with the server's code and message. No pickle anywhere: JSON both ways.
"""
from __future__ import annotations

import base64
import io
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from ..checks import pair_inputs, positive_int
from ..imaging import load_image
from ..scale import ScoreResult

RETRY_STATUSES = frozenset({429, 503})
IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG"}


class ServerError(RuntimeError):
    """The server refused a request (or kept refusing it until the retries ran out)."""

    def __init__(self, status: int | None, code: str, message: str, attempts: int = 1) -> None:
        super().__init__(f"{code} (HTTP {status}) after {attempts} attempt(s): {message}")
        self.status, self.code, self.message, self.attempts = status, code, message, attempts


def encode_image(image: Any, image_format: str = "png", quality: int = 95) -> str:
    """Base64 of ``image`` (anything :func:`~zreward_fast.imaging.load_image` opens) as PNG or JPEG."""
    fmt = IMAGE_FORMATS.get(image_format)
    if fmt is None:
        raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")
    buf = io.BytesIO()
    load_image(image).save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return base64.b64encode(buf.getvalue()).decode("ascii")


def retry_after_s(value: str | None) -> float:
    """Seconds from a ``Retry-After`` header (delta-seconds form; an HTTP date or junk counts as 0)."""
    try:
        return max(0.0, float(value)) if value is not None else 0.0
    except ValueError:
        return 0.0


class HTTPScorer:
    """Scores through ``POST {url}/v1/score`` of a running server.

    Args:
        url: the server's base address, e.g. ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer`` when the server requires one.
        max_items: items per request; at most the server's ``--max-items``.
        concurrency: requests in flight at once (the server batches them together).
        image_format: ``"png"`` (lossless: the scores equal a local scorer's) or ``"jpeg"`` (smaller).
        retries: further attempts after a 429, a 503 or a connection error.
        backoff_s: the first retry's wait, doubled each time (with jitter), capped at ``max_backoff_s``.
        timeout_s: the timeout of one request.
    """

    def __init__(self, url: str, api_key: str | None = None, max_items: int = 16, concurrency: int = 4,
                 image_format: str = "png", jpeg_quality: int = 95, retries: int = 5, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, timeout_s: float = 120.0, transport: Any = None) -> None:
        import httpx

        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        self.url = url.rstrip("/")
        self.max_items = positive_int("max_items", max_items)
        self.concurrency = positive_int("concurrency", concurrency)
        self.image_format, self.jpeg_quality = image_format, jpeg_quality
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s, transport=transport)
        self.dimensions: tuple[str, ...] | None = None  # learnt from the first answer

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "HTTPScorer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HTTPScorer({self.url!r}, max_items={self.max_items}, concurrency={self.concurrency})"

    def score(self, images: Sequence[Any] | Any, prompts: Sequence[str] | str,
              dimensions: Sequence[str] | str | None = None, batch_size: int | None = None) -> list[dict[str, ScoreResult]]:
        """One ``{dimension: ScoreResult}`` per image, in order (``batch_size`` caps ``max_items``)."""
        images, prompts = pair_inputs(images, prompts)
        if not images:
            return []
        dims = [dimensions] if isinstance(dimensions, str) else (list(dimensions) if dimensions is not None else None)
        per = min(self.max_items, positive_int("batch_size", batch_size)) if batch_size is not None else self.max_items
        chunks = [(images[i : i + per], prompts[i : i + per]) for i in range(0, len(images), per)]

        def send(chunk: tuple[list, list]) -> list[dict[str, ScoreResult]]:
            items = [{"prompt": p, "image": encode_image(im, self.image_format, self.jpeg_quality)} for im, p in zip(*chunk)]
            body: dict[str, Any] = {"items": items}
            if dims is not None:
                body["dimensions"] = dims
            return self._results(self._post(body), len(items))

        if len(chunks) == 1 or self.concurrency == 1:
            parts = [send(c) for c in chunks]
        else:
            with ThreadPoolExecutor(min(self.concurrency, len(chunks)), thread_name_prefix="zreward-http") as pool:
                parts = list(pool.map(send, chunks))
        return [r for part in parts for r in part]

    def _post(self, body: dict) -> dict:
        import httpx

        for attempt in range(self.retries + 1):
            wait = min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
            try:
                resp = self._client.post("/v1/score", json=body)
            except (httpx.TransportError, httpx.TimeoutException) as e:
                err = ServerError(None, "connection_error", f"{type(e).__name__}: {e}", attempt + 1)
            else:
                if resp.status_code == 200:
                    return resp.json()
                err = self._error(resp, attempt + 1)
                if resp.status_code not in RETRY_STATUSES:
                    raise err
                wait = max(wait, retry_after_s(resp.headers.get("retry-after")))
            if attempt == self.retries:
                raise err
            time.sleep(wait)
        raise AssertionError("unreachable")

    @staticmethod
    def _error(resp: Any, attempts: int) -> ServerError:
        try:
            e = resp.json()["error"]
            return ServerError(resp.status_code, str(e["code"]), str(e["message"]), attempts)
        except Exception:  # not the server's JSON (a proxy's page): keep the start of the text
            return ServerError(resp.status_code, "http_error", resp.text[:200], attempts)

    def _results(self, answer: dict, n: int) -> list[dict[str, ScoreResult]]:
        results = answer.get("results")
        if not isinstance(results, list) or len(results) != n:
            raise ServerError(200, "invalid_response", f"expected {n} results, got {str(answer)[:200]}")
        out = [{d: ScoreResult(float(s["mean"]), float(s["std"]), tuple(float(p) for p in s["probs"]))
                for d, s in r["scores"].items()} for r in results]
        if out and self.dimensions is None:
            self.dimensions = tuple(out[0])
        return out
