"""Image loading and the fixed-bucket policy, in numpy and PIL (torch-free: the runtime uses it).

Every image is converted to RGB and resized (bicubic, aspect not kept) to one square bucket whose
side is a multiple of ``patch_size * merge_size``, so the vision tower always sees the same grid:
one shape for export, no data-dependent splits, batches without padding.

Decoding, the same for the CLI, training, ``ZRewardModel``, the runtime and the server: only
PNG, JPEG, WebP, BMP and GIF (its first frame) are opened (no Pillow plugin that runs external
programs, such as EPS through Ghostscript); the EXIF orientation is applied; 16-bit grayscale is
scaled to 8 bits; transparent pixels are composited onto white (``BACKGROUND``, what transformers'
``convert_to_rgb`` does for the Qwen-VL processors).
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 8192 x 8192: larger inputs are refused, not decoded
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # Pillow plugins; JPEG also opens MPO (phones)
BACKGROUND = (255, 255, 255)  # what transparent pixels become
_ORIENTATION = 0x0112  # the EXIF tag
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grayscale (older Pillow opens it as "I")


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
    if img.getexif().get(_ORIENTATION, 1) not in (0, 1):  # exif_transpose copies even when nothing turns
        img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit grayscale scaled (65535 -> 255, not clipped to white), alpha and palette
    transparency composited onto ``BACKGROUND``."""
    if img.mode in _SIXTEEN_BIT:
        a = np.asarray(img).astype(np.float64) / 257.0
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba).convert("RGB")
    return img.convert("RGB")


def _open_bytes(data: bytes, what: str, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageError(f"{what} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            w, h = img.size  # header only: check before decoding anything
            if w * h > max_pixels:
                raise ImageError(f"{what} is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
            img.load()
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError(f"{what} is not a readable image: not a PNG, JPEG, WebP, BMP or GIF (the formats accepted), "
                         f"or its header is corrupt ({e})") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
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
    return Image.fromarray(np.ascontiguousarray(a), "RGBA" if a.shape[2] == 4 else "RGB")  # to_rgb composites alpha


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
