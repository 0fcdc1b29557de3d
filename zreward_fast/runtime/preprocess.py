"""Torch-free preprocessing: a bundle's manifest and ``tokenizer.json`` -> the graphs' inputs.

It rebuilds exactly what :class:`zreward_fast.processing.ZRewardProcessor` builds (tested to the
token and to 1e-6 on pixels): the same prompt text, tokenized with ``tokenizers`` without added
special tokens, right padded with the pad id, the same bucket resize and patch order. It reuses
the torch-free ``imaging`` and ``prompting`` modules rather than a copy of them, so the two sides
cannot drift apart.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import imaging
from ..dimensions import query_token, resolve_dimensions
from ..prompting import IMAGE_PAD, PromptFormat, check_prompt, student_query_positions, student_text
from ..scale import ScoreScale
from .bundle import TOKENIZER_NAME, BundleError, load_manifest
from .positions import mrope_position_ids


class RuntimePreprocessor:
    """Images and prompts -> ``pixel_values`` and the decoder's text inputs, from a manifest.

    Args:
        manifest: a bundle manifest (``docs/bundle.md``), e.g. from :func:`verify_bundle`.
        tokenizer: a ``tokenizers.Tokenizer`` or the path of a ``tokenizer.json``.
    """

    def __init__(self, manifest: dict, tokenizer: Any) -> None:
        from tokenizers import Tokenizer

        if isinstance(tokenizer, (str, os.PathLike)):
            try:
                tokenizer = Tokenizer.from_file(str(tokenizer))
            except Exception as e:  # tokenizers raises a bare Exception on a bad file
                raise BundleError(f"{tokenizer}: not a readable tokenizer.json ({e})") from e
        # No padding/truncation from the file: lengths and padding are ours to decide.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        try:
            img = manifest["image"]
            self.image_size = int(img["size"])
            self.patch_size = int(img["patch_size"])
            self.merge_size = int(img["merge_size"])
            self.temporal_patch_size = int(img["temporal_patch_size"])
            self.image_mean = tuple(float(x) for x in img["image_mean"])
            self.image_std = tuple(float(x) for x in img["image_std"])
            self.max_image_pixels = int(img.get("max_image_pixels", imaging.DEFAULT_MAX_IMAGE_PIXELS))
            resample = img.get("resample", "bicubic")
            self.scale = ScoreScale.from_dict(manifest["scale"])
            self.dimensions = resolve_dimensions(manifest["dimensions"])
            self.prompt_format = PromptFormat.from_dict(manifest["prompt"]["format"])
            mpc = manifest["prompt"].get("max_prompt_chars")
            self.max_prompt_chars = None if mpc is None else int(mpc)
            tok = manifest["tokens"]
            self.image_token_id = int(tok["image_token_id"])
            self.pad_token_id = int(tok["pad_token_id"])
            self.query_token_ids = {d: int(tok["query_token_ids"][d]) for d in self.dimensions}
            self.score_token_ids = tuple(int(x) for x in tok["score_token_ids"])
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"malformed manifest: {type(e).__name__}: {e}") from e
        if resample != "bicubic":
            raise BundleError(f"manifest image.resample is {resample!r}; this runtime implements 'bicubic' only")
        factor = self.patch_size * self.merge_size
        if self.image_size <= 0 or self.image_size % factor:
            raise BundleError(f"manifest image.size {self.image_size} is not a positive multiple of {factor}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or any(s <= 0 for s in self.image_std):
            raise BundleError(f"manifest image_mean/image_std need 3 values (std > 0): {self.image_mean}, {self.image_std}")
        if len(self.score_token_ids) != self.scale.num_levels:
            raise BundleError(
                f"manifest has {len(self.score_token_ids)} score token ids for {self.scale.num_levels} levels"
            )
        self._check_tokenizer()

    @classmethod
    def from_bundle(cls, bundle_dir: str | os.PathLike, manifest: dict | None = None) -> "RuntimePreprocessor":
        """From a bundle directory (its manifest is read, not verified, unless given)."""
        manifest = manifest if manifest is not None else load_manifest(bundle_dir)
        return cls(manifest, Path(bundle_dir) / TOKENIZER_NAME)

    def _check_tokenizer(self) -> None:
        """The tokenizer must map the special tokens to the manifest's ids, or scores are garbage."""
        expect = {IMAGE_PAD: self.image_token_id}
        expect.update({query_token(d): i for d, i in self.query_token_ids.items()})
        expect.update(dict(zip(self.scale.tokens, self.score_token_ids)))
        wrong = {t: (self.tokenizer.token_to_id(t), i) for t, i in expect.items() if self.tokenizer.token_to_id(t) != i}
        if wrong:
            raise BundleError(f"tokenizer.json disagrees with the manifest's token ids (token: (tokenizer, manifest)): {wrong}")

    # ------------------------------------------------------------------ geometry
    @property
    def merged_grid(self) -> tuple[int, int]:
        side = self.image_size // (self.patch_size * self.merge_size)
        return (side, side)

    @property
    def num_image_tokens(self) -> int:
        gh, gw = self.merged_grid
        return gh * gw

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    # ------------------------------------------------------------------ images
    def pixel_values(self, images: Sequence[Any], first_index: int = 0) -> np.ndarray:
        """Images (PIL, arrays, paths, bytes) -> float32 ``[B, P, 3*t*p*p]`` normalised patches.

        Raises :class:`zreward_fast.imaging.ImageError` (a ``ValueError``) naming the bad image by
        its index (counted from ``first_index``, for callers that batch a longer list).
        """
        images = list(images)
        if not images:
            raise ValueError("no images given")
        arrays = []
        for i, x in enumerate(images):
            try:
                img = imaging.load_image(x, self.max_image_pixels)
            except imaging.ImageError as e:
                raise imaging.ImageError(f"image {first_index + i}: {e}") from e
            arrays.append(imaging.to_chw_float(imaging.resize_to_bucket(img, self.image_size)))
        patches = imaging.patchify_numpy(
            np.stack(arrays), self.image_mean, self.image_std, self.patch_size, self.merge_size, self.temporal_patch_size
        )
        return patches.reshape(len(arrays), self.num_patches, self.patch_dim).astype(np.float32, copy=False)

    # ------------------------------------------------------------------ text
    def student_texts(self, prompts: Sequence[str], dimensions: Sequence[str]) -> list[str]:
        dims = resolve_dimensions(dimensions, self.dimensions)
        fmt, n = self.prompt_format, self.num_image_tokens
        return [student_text(check_prompt(p, self.max_prompt_chars), dims, n, fmt) for p in prompts]

    def text_inputs(
        self, prompts: Sequence[str], dimensions: Sequence[str] | str | None = None, length: int | None = None
    ) -> dict[str, np.ndarray]:
        """Prompts -> ``input_ids``, ``attention_mask`` ``[B, L]``, ``query_positions`` ``[B, D]`` and
        ``position_ids`` ``[3, B, L]``, all int64.

        ``length`` pads to a fixed ``L`` (for graphs exported with a static length); by default L is
        the longest row. Raises ``ValueError`` for unknown dimensions and bad or too-long prompts.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        dims = resolve_dimensions(dimensions, self.dimensions)
        texts = self.student_texts(prompts, dims)
        rows = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        longest = max(len(r) for r in rows)
        if length is None:
            length = longest
        elif longest > length:
            raise ValueError(f"a prompt tokenizes to {longest} tokens; this bundle's graph takes at most {length}")
        query_positions = np.array(student_query_positions(rows, dims, self.query_token_ids, self.image_token_id,
                                                           self.num_image_tokens), dtype=np.int64).reshape(len(rows), len(dims))
        input_ids = np.full((len(rows), length), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), length), dtype=np.int64)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = r
            attention_mask[i, : len(r)] = 1
        position_ids = mrope_position_ids(input_ids, attention_mask, self.image_token_id, self.merged_grid)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "query_positions": query_positions,
            "position_ids": position_ids,
        }
