"""Image loading and the fixed-bucket policy, in numpy and PIL (torch-free: the runtime uses it).

Every image is converted to RGB and resized (bicubic, aspect not kept) to one square bucket whose
side is a multiple of ``patch_size * merge_size``, so the vision tower always sees the same grid:
one shape for export, no data-dependent splits, batches without padding.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 8192 x 8192: larger inputs are refused, not decoded


class ImageError(ValueError):
    """An input that is not a usable image (corrupt, empty, too large, wrong type)."""


def load_image(image: Any, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open a PIL image, a path, encoded bytes or an HWC/HW array as an RGB PIL image."""
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        img = _open_bytes(path.read_bytes(), str(path), max_pixels)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        img = _open_bytes(bytes(image), "image bytes", max_pixels)
    elif isinstance(image, np.ndarray):
        img = _from_array(image)
    else:
        raise ImageError(
            f"unsupported image type {type(image).__name__}: give a PIL image, a path, bytes or a numpy array"
        )
    w, h = img.size
    if w == 0 or h == 0:
        raise ImageError(f"image has zero size ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
    if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "LA") else img.convert("RGB")
    return img


def _open_bytes(data: bytes, what: str, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageError(f"{what} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size  # header only: check before decoding anything
            if w * h > max_pixels:
                raise ImageError(f"{what} is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
            img.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{what} is not a readable image: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageError(f"{what} is corrupt or truncated: {e}") from e
    return img


def _from_array(a: np.ndarray) -> Image.Image:
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ImageError(f"an image array must be HxW or HxWxC with C in (1, 3, 4), got shape {a.shape}")
    if a.dtype == np.uint8:
        pass
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageError("image array has NaN or infinite values")
        if a.size and (a.min() < 0.0 or a.max() > 1.0):
            raise ImageError("a float image array must lie in [0, 1]")
        a = np.round(a * 255.0).astype(np.uint8)
    else:
        raise ImageError(f"image array dtype must be uint8 or float, got {a.dtype}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(a[:, :, :3]))


def resize_to_bucket(img: Image.Image, size: int) -> Image.Image:
    if img.size == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.BICUBIC)


def to_chw_float(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> float32 CHW array in [0, 1]."""
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0


def load_bucket_array(images: Sequence[Any], size: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Images -> float32 [B, 3, size, size] in [0, 1], resized by the bucket policy."""
    return np.stack([to_chw_float(resize_to_bucket(load_image(x, max_pixels), size)) for x in images])


def patchify_numpy(
    pixels: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    patch_size: int,
    merge_size: int,
    temporal_patch_size: int,
) -> np.ndarray:
    """[B, 3, S, S] in [0, 1] -> normalised patches [B * S/p * S/p, 3 * t * p * p].

    The row order groups each ``merge_size x merge_size`` window together, as the Qwen vision
    tower's patch merger expects (the layout of transformers' Qwen2-VL image processor).
    """
    b, c, h, w = pixels.shape
    x = (pixels - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
    gh, gw = h // patch_size, w // patch_size
    x = x.reshape(b, c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    x = x.transpose(0, 2, 5, 3, 6, 1, 4, 7)  # b, gh/m, gw/m, m, m, c, p, p
    x = np.broadcast_to(x[:, :, :, :, :, :, None], (*x.shape[:6], temporal_patch_size, patch_size, patch_size))
    return np.ascontiguousarray(x).reshape(b * gh * gw, c * temporal_patch_size * patch_size * patch_size)
