"""The four reward dimensions and their query tokens. Torch-free."""
from __future__ import annotations

from typing import Iterable, Sequence

DIMENSIONS: tuple[str, ...] = ("alignment", "realism", "aesthetics", "plausibility")

DIMENSION_DESCRIPTIONS: dict[str, str] = {
    "alignment": "text-image alignment: does the image show what the prompt asks for",
    "realism": "realism: is the image free of noise, blur and generation artefacts",
    "aesthetics": "aesthetics: composition, colour and contrast",
    "plausibility": "physical plausibility: are objects supported, are shadows and geometry possible",
}


def query_token(dimension: str) -> str:
    """The dimension's query token, e.g. ``<|dim_alignment|>``."""
    return f"<|dim_{dimension}|>"


def resolve_dimensions(
    dimensions: str | Iterable[str] | None, allowed: Sequence[str] = DIMENSIONS
) -> tuple[str, ...]:
    """Validate a dimension selection; ``None`` means all of ``allowed`` in order."""
    if dimensions is None:
        return tuple(allowed)
    if isinstance(dimensions, str):
        dimensions = (dimensions,)
    dims = tuple(dimensions)
    if not dims:
        raise ValueError("at least one dimension is needed")
    for d in dims:
        if not isinstance(d, str) or d not in allowed:
            raise ValueError(f"unknown dimension {d!r}; known dimensions are {list(allowed)}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"dimensions repeat: {list(dims)}")
    return dims
