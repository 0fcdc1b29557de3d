"""Qwen3.5 M-RoPE position ids on the host, in numpy.

The decoder graph takes ``position_ids [3, B, L]`` as an input rather than computing them: the
rule is data-dependent (where the image block sits in each row), which would otherwise put a loop
into the ONNX graph. This reproduces transformers' ``Qwen3_5Model.get_rope_index`` for images:

- only tokens with ``attention_mask == 1`` get positions, counted over the unmasked tokens in
  order (padding gets 0);
- a text token advances all three axes (t, h, w) together by one;
- an image block of a merged ``grid_h x grid_w`` grid starting at position ``s`` gets
  ``(s, s + row, s + col)`` in row-major order, and the text after it continues at
  ``s + max(grid_h, grid_w)``.
"""
from __future__ import annotations

import numpy as np


def mrope_position_ids(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    image_token_id: int,
    grid_hw: tuple[int, int],
) -> np.ndarray:
    """M-RoPE positions ``[3, B, L]`` int64 for rows holding image blocks of one merged grid.

    ``grid_hw`` is the grid after the patch merger (``(S / 32, S / 32)`` for an ``S x S`` bucket).
    Every run of consecutive image tokens is one image and must hold ``grid_h * grid_w`` tokens.
    """
    ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {ids.shape}")
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    gh, gw = (int(x) for x in grid_hw)
    if gh <= 0 or gw <= 0:
        raise ValueError(f"grid_hw must be positive, got {grid_hw}")
    n_img = gh * gw
    # One image block's offsets from its start position: t = 0, h = row, w = col (row-major).
    rows, cols = np.divmod(np.arange(n_img, dtype=np.int64), gw)
    block = np.stack([np.zeros(n_img, np.int64), rows, cols])  # [3, n_img]
    advance = max(gh, gw)

    b, length = ids.shape
    out = np.zeros((3, b, length), dtype=np.int64)
    for i in range(b):
        keep = np.flatnonzero(mask[i] != 0)
        is_img = ids[i, keep] == image_token_id
        n = keep.size
        pos = np.empty((3, n), dtype=np.int64)
        # Runs of equal modality: boundaries where is_img changes.
        edges = np.flatnonzero(np.diff(is_img.astype(np.int8))) + 1
        starts = np.concatenate(([0], edges)) if n else np.zeros(0, np.int64)
        ends = np.concatenate((edges, [n])) if n else np.zeros(0, np.int64)
        current = 0
        for s, e in zip(starts, ends):
            if is_img[s]:
                if e - s != n_img:
                    raise ValueError(
                        f"row {i}: an image block has {e - s} image tokens; a {gh}x{gw} grid needs {n_img}"
                    )
                pos[:, s:e] = block + current
                current += advance
            else:
                pos[:, s:e] = np.arange(e - s, dtype=np.int64) + current
                current += e - s
        out[:, i, keep] = pos
    return out
