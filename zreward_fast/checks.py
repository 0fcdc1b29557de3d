"""Argument checks shared by the scoring front ends (torch-free: the runtime imports it)."""
from __future__ import annotations

from typing import Any, Sequence


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is an int >= 1 (not a bool), else a ``ValueError`` naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def pair_inputs(images: Sequence[Any] | Any, prompts: Sequence[str] | str) -> tuple[list[Any], list[str]]:
    """``score()``'s images and prompts as two equal-length lists.

    A single prompt string with a single (non-list) image is one pair. Images must otherwise come
    as a list or tuple (a batched tensor is not split silently: pass ``list(tensor)``).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
        if not isinstance(images, (list, tuple)):
            images = [images]
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a list or tuple of images, got {type(images).__name__}")
    images, prompts = list(images), list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    return images, prompts
