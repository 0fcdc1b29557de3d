"""The HTTP contract of ``POST /v1/score``, shared by the FastAPI server and the Ray Serve deployment.

Torch-free and framework-free (no FastAPI, no Ray): it turns a raw request body into images and
prompts, and results or exceptions into response bodies, so that both front ends answer the same
input with the same bytes and status.

Request (JSON object, ``Content-Type: application/json``, UTF-8)::

    {"prompt": str, "image": str, "dimensions": [str, ...]?}            -> {"scores": SCORES}
    {"items": [{"prompt": str, "image": str}, ...], "dimensions": [...]?} -> {"results": [{"scores": SCORES}, ...]}

    SCORES = {dimension: {"mean": float, "std": float, "probs": [K floats]}}

``image`` is base64 (standard alphabet, padded; whitespace and a ``data:image/...;base64,`` prefix
are tolerated) of a PNG, JPEG or WebP file. ``dimensions`` defaults to all of the scorer's, in its
order. Unknown fields are refused (400 ``unknown_field``) rather than ignored: a misspelt
``"dimension"`` would otherwise silently score every dimension.

Errors are ``{"error": {"code": str, "message": str}}``:

=====  =====================================================================================
400    ``invalid_json``, ``invalid_encoding`` (not UTF-8), ``unsupported_media_type``,
       ``invalid_content_length``, ``invalid_request`` (wrong types or shape),
       ``missing_field``, ``unknown_field``, ``too_many_items``, ``invalid_base64``,
       ``invalid_image`` (not an image, corrupt, truncated, zero size),
       ``unsupported_image_format``, ``image_too_large`` (pixel limit, checked on the header
       before decoding), ``prompt_too_long``, ``invalid_prompt``, ``unknown_dimension``,
       ``invalid_input`` (refused by the scorer itself with ``ValueError``/``TypeError``)
401    ``unauthorized``           413  ``body_too_large``      429  ``queue_full``
503    ``not_ready``, ``shutting_down``                         504  ``timeout``
500    ``internal_error`` (a bug or a failing model; never bad input)
=====  =====================================================================================
"""
from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import math
import re
from dataclasses import dataclass
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from PIL import Image, UnidentifiedImageError

from .. import imaging
from ..checks import positive_int
from ..prompting import check_prompt
from .batcher import BatcherClosedError, QueueFullError, RequestTimeoutError

ALLOWED_IMAGE_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP"})  # MPO: the JPEG flavour phones write
_TOP_FIELDS = frozenset({"prompt", "image", "items", "dimensions"})
_ITEM_FIELDS = frozenset({"prompt", "image"})


class HTTPError(Exception):
    """An error answer: HTTP status, machine-readable code and a human message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> dict:
        return error_body(self.code, self.message)

    def __repr__(self) -> str:
        return f"HTTPError({self.status}, {self.code!r}, {self.message!r})"


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def bad_request(code: str, message: str) -> HTTPError:
    return HTTPError(400, code, message)


@dataclass(frozen=True)
class RequestLimits:
    """Input limits; every one is checked before the expensive step it protects."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_items: int = 16
    max_image_pixels: int = 4096 * 4096
    max_prompt_chars: int = 2000

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_items", "max_image_pixels", "max_prompt_chars"):
            positive_int(name, getattr(self, name))


@dataclass
class ScoreRequest:
    """A validated request: decoded images (RGB PIL) and prompts, in order."""

    images: list
    prompts: list[str]
    dimensions: tuple[str, ...] | None  # None: the scorer's default (all, in its order)
    batched: bool  # came as {"items": [...]}: answer {"results": [...]}


# ---------------------------------------------------------------------------- headers and body
def check_api_key(headers: Any, api_key: str | None) -> None:
    """``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` must match (constant-time); 401 if not."""
    if api_key is None:
        return
    given = None
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer":
            given = token.strip()
    if given is None:
        given = headers.get("x-api-key")
    if given is None or not hmac.compare_digest(given.encode("utf-8", "replace"), api_key.encode("utf-8")):
        raise HTTPError(401, "unauthorized", "missing or wrong API key (Authorization: Bearer KEY or X-API-Key)")


def response_headers(err: HTTPError) -> dict[str, str]:
    """Headers that go with an error: how to authenticate, when to retry."""
    if err.status == 401:
        return {"WWW-Authenticate": "Bearer"}
    if err.status in (429, 503):
        return {"Retry-After": "1"}
    return {}


def check_content_type(value: str | None) -> None:
    """Only ``application/json`` (optionally ``; charset=utf-8``) is accepted."""
    if not value:
        raise bad_request("unsupported_media_type", "Content-Type must be application/json")
    media, _, params = value.partition(";")
    if media.strip().lower() != "application/json":
        raise bad_request("unsupported_media_type", f"Content-Type must be application/json, got {media.strip()!r}")
    for p in params.split(";"):
        name, _, val = p.partition("=")
        if name.strip().lower() == "charset" and val.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise bad_request("unsupported_media_type", f"the body must be UTF-8, got charset {val.strip()!r}")


def check_content_length(value: str | None, limit: int) -> int | None:
    """Refuse a declared body over the limit before reading any of it."""
    if value is None:
        return None
    try:
        n = int(value.strip())
    except ValueError:
        raise bad_request("invalid_content_length", f"Content-Length is not an integer: {value[:40]!r}") from None
    if n < 0:
        raise bad_request("invalid_content_length", f"Content-Length is negative: {n}")
    if n > limit:
        raise HTTPError(413, "body_too_large", f"body is {n} bytes; the limit is {limit}")
    return n


def body_too_large(limit: int) -> HTTPError:
    return HTTPError(413, "body_too_large", f"body exceeds the limit of {limit} bytes")


async def read_body(headers: Any, chunks: AsyncIterator[bytes], limit: int,
                    disconnected: type[BaseException] | tuple[type[BaseException], ...] = ()) -> bytes:
    """The request body, refused (413) on its Content-Length or as soon as the bytes read pass
    ``limit`` (chunked or lying Content-Length). ``disconnected`` is the framework's "client left
    mid-body" exception (starlette's ``ClientDisconnect``): a 400, not an unexpected 500."""
    check_content_length(headers.get("content-length"), limit)
    parts, size = [], 0
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise body_too_large(limit)
            parts.append(chunk)
    except disconnected:
        raise HTTPError(400, "client_disconnected", "the client closed the connection mid-body") from None
    return b"".join(parts)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# A JSON string (no backtracking: the alternatives are disjoint), replaced before values are counted.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def json_values_budget(limits: RequestLimits) -> int:
    """How many JSON values a well-formed request can hold: a few at the top, a prompt, an image and
    up to one list of dimensions per item (generous)."""
    return 64 + 32 * limits.max_items


def check_json_size(body: bytes, budget: int) -> None:
    """Refuse a body with more JSON values than ``budget`` before parsing it: every value after
    the first follows a ``,`` or an opening bracket, so counting those outside strings bounds
    them (every string is a value or a key). A 16 MiB body of tiny objects parses into half a GB of
    Python objects; this reads the bytes once and copies nothing."""
    total = body.count(b",") + body.count(b"[") + body.count(b"{")
    if total <= budget:  # the common case: no need to look inside strings
        return
    inside = 0
    for n, m in enumerate(_JSON_STRING.finditer(body), 1):
        if n > 2 * budget:  # more strings than values and keys can be
            break
        a, b = m.span()
        inside += body.count(b",", a, b) + body.count(b"[", a, b) + body.count(b"{", a, b)
    else:
        if total - inside <= budget:
            return
    raise bad_request("invalid_json", f"body is not a valid request: more than {budget} JSON values, the most a request holds")


def parse_json(body: bytes, budget: int | None = None) -> Any:
    """Strict UTF-8 JSON (no NaN/Infinity), at most ``budget`` values; every failure is a 400."""
    if budget is not None:
        check_json_size(body, budget)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request("invalid_encoding", f"body is not valid UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise bad_request("invalid_json", "body is empty; expected a JSON object")
    try:
        return json.loads(text, parse_constant=_no_constants)
    except json.JSONDecodeError as e:
        raise bad_request("invalid_json", f"body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, RecursionError) as e:  # NaN, huge integers, absurd nesting
        raise bad_request("invalid_json", f"body is not valid JSON: {e}") from None


# ---------------------------------------------------------------------------- schema
def _type_name(x: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(x), "number" if isinstance(x, (int, float)) else type(x).__name__
    )


def _check_fields(obj: dict, allowed: frozenset, where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise bad_request(
            "unknown_field", f"{where} has unknown field(s) {unknown[:5]}; allowed fields are {sorted(allowed)}"
        )


def _prompt(x: Any, where: str, limits: RequestLimits) -> str:
    if not isinstance(x, str):
        raise bad_request("invalid_request", f"{where}.prompt must be a string, got {_type_name(x)}")
    if len(x) > limits.max_prompt_chars:
        raise bad_request("prompt_too_long", f"{where}.prompt is {len(x)} characters; the limit is {limits.max_prompt_chars}")
    try:
        return check_prompt(x)
    except (TypeError, ValueError) as e:
        raise bad_request("invalid_prompt", f"{where}.prompt: {e}") from None


def _dimensions(x: Any, known: Sequence[str]) -> tuple[str, ...] | None:
    if x is None:
        return None
    if not isinstance(x, list):
        raise bad_request("invalid_request", f"dimensions must be an array of strings, got {_type_name(x)}")
    if not x:
        raise bad_request("invalid_request", "dimensions must not be empty (leave it out for all dimensions)")
    for d in x:
        if not isinstance(d, str):
            raise bad_request("invalid_request", f"dimensions must be strings, got {_type_name(d)}")
        if d not in known:
            raise bad_request("unknown_dimension", f"unknown dimension {d[:100]!r}; known dimensions are {list(known)}")
    if len(set(x)) != len(x):
        raise bad_request("invalid_request", f"dimensions repeat: {x}")
    dims = tuple(x)
    return None if dims == tuple(known) else dims  # one batching group for "all dimensions"


def parse_request(obj: Any, limits: RequestLimits, known_dimensions: Sequence[str]) -> tuple[list[str], list[str], tuple[str, ...] | None, bool]:
    """Validate the JSON shape: ``(prompts, base64 images, dimensions, batched)``. Images are not decoded."""
    if not isinstance(obj, dict):
        raise bad_request("invalid_request", f"body must be a JSON object, got {_type_name(obj)}")
    _check_fields(obj, _TOP_FIELDS, "request")
    dims = _dimensions(obj.get("dimensions"), known_dimensions)
    if "items" in obj:
        if "prompt" in obj or "image" in obj:
            raise bad_request("invalid_request", "give either prompt and image, or items, not both")
        items = obj["items"]
        if not isinstance(items, list):
            raise bad_request("invalid_request", f"items must be an array, got {_type_name(items)}")
        if not items:
            raise bad_request("invalid_request", "items must not be empty")
        if len(items) > limits.max_items:
            raise bad_request("too_many_items", f"{len(items)} items; the limit is {limits.max_items} per request")
        entries = [(it, f"items[{i}]") for i, it in enumerate(items)]
        batched = True
    else:
        entries = [(obj, "request")]
        batched = False
    prompts, images = [], []
    for it, where in entries:
        if not isinstance(it, dict):
            raise bad_request("invalid_request", f"{where} must be an object, got {_type_name(it)}")
        if batched:
            _check_fields(it, _ITEM_FIELDS, where)
        for name in ("prompt", "image"):
            if name not in it:
                raise bad_request("missing_field", f"{where} lacks the field {name!r}")
        prompts.append(_prompt(it["prompt"], where, limits))
        if not isinstance(it["image"], str):
            raise bad_request("invalid_request", f"{where}.image must be a base64 string, got {_type_name(it['image'])}")
        images.append(it["image"])
    return prompts, images, dims, batched


# ---------------------------------------------------------------------------- images
def b64_to_bytes(s: str, where: str = "image") -> bytes:
    if s.startswith("data:"):
        header, sep, s = s.partition(",")
        if not sep or not header.endswith(";base64"):
            raise bad_request("invalid_base64", f"{where}: a data URL must be 'data:<type>;base64,<data>'")
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:  # line-wrapped base64 (MIME style): drop whitespace, still strict otherwise
        return base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request("invalid_base64", f"{where} is not valid base64: {e}") from None


def decode_image(data: bytes, max_pixels: int, bucket: int | None = None, where: str = "image") -> Image.Image:
    """Encoded PNG/JPEG/WebP bytes -> RGB PIL image, or a 400.

    The format and the pixel count are read from the header and checked before anything is
    decoded. ``bucket``: resize to the scorer's square bucket here (the same
    :func:`imaging.resize_to_bucket` the scorer would apply, so results are identical), which
    spreads the resize over the decode threads and keeps queued images small.
    """
    if not data:
        raise bad_request("invalid_image", f"{where} is empty")
    try:
        with Image.open(io.BytesIO(data), formats=imaging.ALLOWED_FORMATS) as probe:  # lazy: reads the header only
            fmt, (w, h) = probe.format, probe.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise bad_request("image_too_large", f"{where} exceeds the limit of {max_pixels} pixels ({e})") from None
    except UnidentifiedImageError:
        raise bad_request("invalid_image", f"{where} is not a PNG, JPEG or WebP image (or its header is corrupt)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise bad_request("invalid_image", f"{where} has an unreadable header: {e}") from None
    if fmt not in ALLOWED_IMAGE_FORMATS:
        raise bad_request("unsupported_image_format", f"{where} is {fmt}; send PNG, JPEG or WebP")
    if w <= 0 or h <= 0:
        raise bad_request("invalid_image", f"{where} has zero size ({w}x{h})")
    if w * h > max_pixels:
        raise bad_request("image_too_large", f"{where} is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
    try:
        img = imaging.load_image(data, max_pixels=max_pixels)
        if bucket:
            img = imaging.resize_to_bucket(img, bucket)
    except imaging.ImageError as e:
        raise bad_request("invalid_image", f"{where}: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise bad_request("invalid_image", f"{where} is corrupt: {e}") from None
    return img


def decode_request(
    body: bytes, limits: RequestLimits, known_dimensions: Sequence[str], bucket: int | None = None
) -> ScoreRequest:
    """Body bytes -> :class:`ScoreRequest`; raises :class:`HTTPError` (400/413) on any bad input.

    CPU-bound (JSON, base64, image decoding): servers run it in a thread pool.
    """
    if len(body) > limits.max_body_bytes:
        raise body_too_large(limits.max_body_bytes)
    prompts, b64s, dims, batched = parse_request(parse_json(body, json_values_budget(limits)), limits, known_dimensions)
    images = []
    for i, s in enumerate(b64s):
        where = f"items[{i}].image" if batched else "image"
        images.append(decode_image(b64_to_bytes(s, where), limits.max_image_pixels, bucket, where))
    return ScoreRequest(images, prompts, dims, batched)


def scorer_bucket(scorer: Any) -> int | None:
    """The scorer's square image bucket, if it tells (``image_size`` or ``preprocessor.image_size``)."""
    for obj in (scorer, getattr(scorer, "preprocessor", None)):
        size = getattr(obj, "image_size", None)
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return size
    return None


# ---------------------------------------------------------------------------- answers
def _result_json(result: Any) -> dict:
    out = {}
    for dim, r in result.items():
        d = r.to_dict() if hasattr(r, "to_dict") else dict(r)
        mean, std, probs = float(d["mean"]), float(d["std"]), [float(p) for p in d["probs"]]
        if not all(math.isfinite(v) for v in (mean, std, *probs)):
            raise RuntimeError(f"the scorer returned a non-finite score for {dim!r}")
        out[dim] = {"mean": mean, "std": std, "probs": probs}
    return out


def render_results(results: Sequence[Any], batched: bool) -> dict:
    """Scorer results (``{dimension: ScoreResult}`` each) -> the response body."""
    if batched:
        return {"results": [{"scores": _result_json(r)} for r in results]}
    return {"scores": _result_json(results[0])}


def render_outcomes(outcomes: Sequence[Any], batched: bool,
                    on_internal_error: Callable[[BaseException], None] | None = None) -> dict:
    """The response body for scored items, each a result or the exception that item raised: the
    first failed item's :class:`HTTPError` is raised instead (``on_internal_error`` sees a 5xx's cause)."""
    for i, out in enumerate(outcomes):
        if isinstance(out, BaseException):
            err = error_for_exception(out, f"items[{i}]" if batched else None)
            if err.status >= 500 and on_internal_error is not None:
                on_internal_error(out)
            raise err
    return render_results(outcomes, batched)


def error_for_exception(exc: BaseException, where: str | None = None) -> HTTPError:
    """Map a batcher or scorer exception to its answer; anything unexpected is a 500."""
    prefix = f"{where}: " if where else ""
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, QueueFullError):
        return HTTPError(429, "queue_full", str(exc))
    if isinstance(exc, RequestTimeoutError):
        return HTTPError(504, "timeout", str(exc))
    if isinstance(exc, BatcherClosedError):
        return HTTPError(503, "shutting_down", "the server is shutting down")
    if isinstance(exc, imaging.ImageError):
        return bad_request("invalid_image", prefix + str(exc))
    if isinstance(exc, (ValueError, TypeError)):  # the scorer refused this input
        return bad_request("invalid_input", prefix + str(exc))
    return HTTPError(500, "internal_error", "internal server error")
