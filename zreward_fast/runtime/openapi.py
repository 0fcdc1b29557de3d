"""The OpenAPI description of ``POST /v1/score`` (pydantic models), for ``/openapi.json`` and ``/docs``.

Documentation only: the endpoint keeps parsing the raw body itself (``http_schema``: limits
checked before parsing, strict fields, the same bytes from FastAPI and Ray Serve), and these
models describe that contract to clients and code generators.
"""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


class ScoreItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(description="the generation prompt of the image")
    image: str = Field(description="base64 of a PNG, JPEG or WebP file (a data:image/...;base64, prefix is accepted)")


class ScoreRequest(BaseModel):
    """One image (``prompt`` and ``image``) or a batch (``items``); ``dimensions`` defaults to all."""

    model_config = ConfigDict(extra="forbid")
    prompt: Optional[str] = Field(None, description="one image's prompt (with image)")
    image: Optional[str] = Field(None, description="one image, base64 (with prompt)")
    items: Optional[list[ScoreItem]] = Field(None, description="a batch, at most the server's --max-items")
    dimensions: Optional[list[str]] = Field(None, description="dimensions to score, in the model's order by default")


class DimensionScore(BaseModel):
    mean: float = Field(description="expected score under the distribution")
    std: float = Field(description="standard deviation of the distribution")
    probs: list[float] = Field(description="probability of each score level (sums to 1)")


class ScoreResult(BaseModel):
    scores: dict[str, DimensionScore]


class BatchScoreResult(BaseModel):
    results: list[ScoreResult]


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable: invalid_image, too_many_items, queue_full, ...")
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


ERRORS = {400: "bad input (the code says which)", 401: "missing or wrong API key", 413: "body too large",
          429: "queue full (see Retry-After)", 503: "not ready or shutting down (see Retry-After)", 504: "timed out"}


def score_route_docs() -> dict:
    """Keyword arguments for the FastAPI route of ``POST /v1/score``."""
    return {
        "summary": "Score images against their prompts on every dimension",
        "openapi_extra": {"requestBody": {"required": True, "content": {
            "application/json": {"schema": ScoreRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}},
        "responses": {200: {"description": "one image: {scores}; a batch: {results: [{scores}, ...]}",
                            "content": {"application/json": {"schema": {"anyOf": [
                                {"$ref": "#/components/schemas/ScoreResult"},
                                {"$ref": "#/components/schemas/BatchScoreResult"}]}}}},
                      **{code: {"model": ErrorBody, "description": text} for code, text in ERRORS.items()}},
    }


def add_schemas(schema: dict) -> dict:
    """Put the request and response models in ``components.schemas`` of a generated schema."""
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (ScoreRequest, ScoreResult, BatchScoreResult, ErrorBody):
        full = model.model_json_schema(ref_template="#/components/schemas/{model}")
        comps.update(full.pop("$defs", {}))
        comps[model.__name__] = full
    return schema
