"""Synthetic scenes made differentiable: scene parameters per prompt, a torch renderer with the
geometry of :func:`.synthetic.render`, and the known scores as continuous functions of the
parameters. The generator of :mod:`.generator` draws its scenes with these.

**Parameters** (:class:`SceneParams`, one scene per prompt, ``N`` object slots, unused slots
masked): per object a colour distribution over the 8 :data:`COLOURS` and a shape distribution
over the 4 :data:`SHAPES` (the drawn colour is the expected palette colour, the drawn mask the
mixture of the four shape masks), a presence ``a`` in [0, 1] (its opacity), a float height ``h``
in [0, 1] (units of 0.3*S above the ground), a shadow side ``s`` in [-1, 1] (+1 right, correct;
-1 left, towards the light) and a shadow opacity ``o``; per scene a blur sigma (pixels), a noise
std (0..1 scale), a contrast wash ``t`` in [0, 6/7], a crowding ``c`` in [0, 4] (synthetic's
composition steps, made continuous) and a free residual image, low resolution (32x32), bounded
to +-0.1 by tanh, upsampled bilinearly and added last.

**Renderer** (:func:`render_scene`): the geometry of :func:`synthetic.render` (ground from
``int(0.75*S)``, radius and centres from ``synthetic.row_layout``, moved left and
packed by the crowding as synthetic does it, shadow ellipse on the ground line at ``cx + 0.6r``
when right, ``cx - 1.6r`` when left, interpolated linearly in ``s``). At whole-step parameters the
image is within ~0.007 mean absolute difference of ``synthetic.render`` (noise aside). Shape masks
are sigmoids of signed distances (edge width ~0.35 px) read by ``grid_sample`` from canonical
distance textures, so they are differentiable in the object's position. Objects and shadows are
alpha-composited left to right like PIL draws them; then a separable Gaussian blur with a
per-image sigma, then a fixed per-image N(0,1) pattern scaled by the noise std, then the
residual, then a clamp to [0, 1].

**Known scores** (:func:`known_scores`), 0..4, each clipped at 0, following the task's rules:

- alignment: 4 - sum over objects of ``a * (0.5 (1 - P[wanted colour]) + 0.5 (1 - P[wanted
  shape])) + (1 - a) * 1.0`` (a missing object costs 1; a swap of two objects that differ in
  colour costs 2 x 0.5 = 1 as the rule says; extra objects cannot be drawn except by the residual);
- realism: 4 - 0.25 * blur/0.6 - 0.25 * sqrt(noise^2 + rms(residual)^2) * 255/7, so one synthetic
  step (blur 0.6 *and* noise 7/255) costs 0.5;
- aesthetics: 4 - 0.5 * c - 0.5 * 7t (composition and contrast steps);
- plausibility: 4 - sum over objects of ``h + o (1 - s)/2 + 0.5 (1 - o)`` (floating costs 1,
  a shadow towards the light 1, a missing shadow 0.5), independent of presence.

**The residual is the hacking channel**: it never raises a known score; its energy counts as noise
against realism (added in quadrature to the noise std). Anything a reward pays for the residual
is therefore a gap between reward and known scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .synthetic import (
    BACKGROUND, BLUR_PER_STEP, COLOURS, GROUND as GROUND_COLOUR, MAX_CONTRAST, MAX_SCORE, PROMPT_COLOURS, SHAPES,
    SHADOW as SHADOW_COLOUR, WASH_PER_STEP, Group, SceneObject, describe, row_layout,
)
from .synthetic import NOISE_PER_STEP as _NOISE_PER_STEP_255

MAX_OBJECTS = 6  # the most objects a prompt may hold (generator_prompts draws at most 4 by default)
PALETTE_NAMES = tuple(COLOURS)
NOISE_PER_STEP = _NOISE_PER_STEP_255 / 255.0  # noise std per realism step, on the 0..1 scale
MAX_WASH = MAX_CONTRAST * WASH_PER_STEP  # synthetic._washed caps the wash at MAX_CONTRAST steps
RESIDUAL_BOUND = 0.1
EDGE_PX = 0.35  # soft-edge width of the masks, in pixels
_TEXTURE = 257  # canonical signed-distance textures, over [-2, 2]^2 in units of the radius


# ---------------------------------------------------------------------------- prompts
@dataclass
class EncodedPrompts:
    """The prompts as tensors: wanted colour/shape indices per slot, the slot mask, the text."""

    objects: list[list[SceneObject]]
    texts: list[str]
    colour_idx: Tensor  # [P, N] long (0 in unused slots)
    shape_idx: Tensor  # [P, N] long
    mask: Tensor  # [P, N] float, 1 where the slot holds an object
    features: Tensor  # [P, N * (8 + 4 + 1)]

    @property
    def count(self) -> Tensor:
        return self.mask.sum(1)


def prompt_groups(objects: Sequence[SceneObject]) -> list[Group]:
    """Runs of equal objects, left to right, as the synthetic data's groups."""
    runs: list[list[Any]] = []
    for o in objects:
        if runs and (runs[-1][0], runs[-1][1]) == (o.colour, o.shape):
            runs[-1][2] += 1
        else:
            runs.append([o.colour, o.shape, 1])
    if any(n > 3 for _, _, n in runs):
        raise ValueError("a group holds at most three objects")
    return [Group(c, s, n) for c, s, n in runs]


def prompt_text(objects: Sequence[SceneObject]) -> str:
    """The prompt's text, worded as the synthetic data words it ("two red squares left of a blue
    circle")."""
    return describe(prompt_groups(objects))


def encode_prompts(prompts: Sequence[Sequence[SceneObject]], max_objects: int = MAX_OBJECTS) -> EncodedPrompts:
    """Encode object lists (left to right) for the generator and the known scores."""
    p = len(prompts)
    if p == 0:
        raise ValueError("no prompts")
    colour_idx = torch.zeros(p, max_objects, dtype=torch.long)
    shape_idx = torch.zeros(p, max_objects, dtype=torch.long)
    mask = torch.zeros(p, max_objects)
    for i, objs in enumerate(prompts):
        if not 1 <= len(objs) <= max_objects:
            raise ValueError(f"prompt {i} has {len(objs)} objects; 1..{max_objects} are supported")
        for j, o in enumerate(objs):
            if o.colour not in COLOURS or o.shape not in SHAPES:
                raise ValueError(f"unknown object {o}")
            colour_idx[i, j] = PALETTE_NAMES.index(o.colour)
            shape_idx[i, j] = SHAPES.index(o.shape)
            mask[i, j] = 1.0
    feats = torch.cat(
        [F.one_hot(colour_idx, len(COLOURS)) * mask[..., None], F.one_hot(shape_idx, len(SHAPES)) * mask[..., None],
         mask[..., None]], dim=-1,
    ).float()
    return EncodedPrompts(
        [list(o) for o in prompts], [prompt_text(o) for o in prompts], colour_idx, shape_idx, mask, feats.flatten(1)
    )


def generator_prompts(seed: int, n: int, max_objects: int = 4) -> list[list[SceneObject]]:
    """``n`` object lists: 1-3 groups of distinct (colour, shape), 1-2 objects each, colours from
    :data:`PROMPT_COLOURS`, at most ``max_objects`` objects (counts trimmed from the last group)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 4))
        pairs = [(c, s) for c in PROMPT_COLOURS for s in SHAPES]
        chosen = [pairs[int(i)] for i in rng.choice(len(pairs), size=k, replace=False)]
        counts = [int(rng.integers(1, 3)) for _ in chosen]
        while sum(counts) > max_objects:
            counts[max(i for i, c in enumerate(counts) if c > 1)] -= 1
        out.append([SceneObject(s, c) for (c, s), m in zip(chosen, counts) for _ in range(m)])
    return out


# ---------------------------------------------------------------------------- parameters
@dataclass
class SceneParams:
    """Constrained scene parameters (see the module docstring); all may carry gradients."""

    colour: Tensor  # [P, N, 8] probabilities over COLOURS
    shape: Tensor  # [P, N, 4] probabilities over SHAPES
    presence: Tensor  # [P, N] in [0, 1]
    height: Tensor  # [P, N] in [0, 1], units of 0.3*S
    shadow_side: Tensor  # [P, N] in [-1, 1], +1 = right (away from the light)
    shadow_opacity: Tensor  # [P, N] in [0, 1]
    blur: Tensor  # [P] Gaussian sigma in pixels
    noise: Tensor  # [P] noise std, 0..1 scale
    wash: Tensor  # [P] contrast wash t in [0, 6/7]
    crowd: Tensor  # [P] crowding towards the left, >= 0
    residual: Tensor  # [P, 3, R, R] in [-0.1, 0.1]

    def detach(self) -> "SceneParams":
        return SceneParams(**{f.name: getattr(self, f.name).detach() for f in fields(self)})


def perfect_params(enc: EncodedPrompts, residual_size: int = 32) -> SceneParams:
    """The clean scene: the wanted objects on the ground, right shadows, no degradation."""
    p, n = enc.mask.shape
    zeros, ones = torch.zeros(p, n), torch.ones(p, n)
    return SceneParams(
        colour=F.one_hot(enc.colour_idx, len(COLOURS)).float(), shape=F.one_hot(enc.shape_idx, len(SHAPES)).float(),
        presence=ones.clone(), height=zeros.clone(), shadow_side=ones.clone(), shadow_opacity=ones.clone(),
        blur=torch.zeros(p), noise=torch.zeros(p), wash=torch.zeros(p), crowd=torch.zeros(p),
        residual=torch.zeros(p, 3, residual_size, residual_size),
    )


# ---------------------------------------------------------------------------- renderer
def _polygon_sdf(points: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance to a closed polygon (negative inside, even-odd rule)."""
    p = np.stack([u, v], -1)
    dist = np.full(u.shape, np.inf)
    inside = np.zeros(u.shape, bool)
    for a, b in zip(points, np.roll(points, -1, axis=0)):
        e, w = b - a, p - a
        t = np.clip((w @ e) / (e @ e), 0.0, 1.0)
        dist = np.minimum(dist, np.linalg.norm(w - t[..., None] * e, axis=-1))
        crosses = (a[1] > v) != (b[1] > v)
        x_at = a[0] + (v - a[1]) * (b[0] - a[0]) / np.where(b[1] == a[1], 1e-12, b[1] - a[1])
        inside ^= crosses & (u < x_at)
    return np.where(inside, -dist, dist)


def _shape_textures() -> Tensor:
    """[1, 4, T, T] signed distances (units of the radius) of the four shapes of radius 1 over
    [-2, 2]^2, in the order of SHAPES and with synthetic._shape's geometry (y grows downwards)."""
    g = np.linspace(-2.0, 2.0, _TEXTURE)
    v, u = np.meshgrid(g, g, indexing="ij")
    circle = np.hypot(u, v) - 1.0
    d = np.stack([np.abs(u) - 1.0, np.abs(v) - 1.0], -1)
    square = np.linalg.norm(np.maximum(d, 0.0), axis=-1) + np.minimum(d.max(-1), 0.0)
    triangle = _polygon_sdf(np.array([(0.0, -1.0), (-1.0, 1.0), (1.0, 1.0)]), u, v)
    star_pts = np.array([
        ((1.0 if k % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
         (1.0 if k % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)
    ])
    star = _polygon_sdf(star_pts, u, v)
    return torch.tensor(np.stack([circle, square, triangle, star])[None], dtype=torch.float32)


_TEXTURES: Tensor | None = None


def _textures() -> Tensor:
    global _TEXTURES
    if _TEXTURES is None:
        _TEXTURES = _shape_textures()
    return _TEXTURES


def _rgb(c: tuple[int, int, int]) -> Tensor:
    return torch.tensor(c, dtype=torch.float32) / 255.0


def _layout(params: SceneParams, enc: EncodedPrompts, size: int) -> tuple[Tensor, Tensor, Tensor, float]:
    """Object centres cx, cy [P, N], radius r [P, 1] and the ground line, in pixels; synthetic.render's
    layout, with its whole composition steps made continuous in the crowding ``c``."""
    n = enc.count.clamp_min(1)[:, None].float()  # [P, 1]
    r, first, spacing = row_layout(n, size, params.crowd[:, None], torch.minimum, torch.maximum)
    slot = torch.arange(enc.mask.shape[1], dtype=torch.float32)[None]
    cx = first + slot * spacing
    ground = float(int(size * 0.75))
    cy = ground - 0.3 * size * params.height - r
    return cx, cy, r, ground


def gaussian_blur(img: Tensor, sigma: Tensor, max_sigma: float = 4.8) -> Tensor:
    """Separable Gaussian blur with a per-image sigma [B] (differentiable in sigma), edges replicated."""
    b, c, h, w = img.shape
    half = int(math.ceil(3 * max_sigma))
    k = torch.arange(-half, half + 1, dtype=img.dtype)
    s2 = sigma.to(img.dtype).pow(2).clamp_min(0)[:, None] + 0.01  # sigma -> 0 gives a delta kernel
    kern = torch.exp(-0.5 * k[None] ** 2 / s2)
    kern = kern / kern.sum(1, keepdim=True)
    kern = kern.repeat_interleave(c, 0)  # [B*C, K]
    x = img.reshape(1, b * c, h, w)
    x = F.conv2d(F.pad(x, (half, half, 0, 0), mode="replicate"), kern[:, None, None, :], groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, half, half), mode="replicate"), kern[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)


def noise_pattern(n: int, size: int, seed: int = 0) -> Tensor:
    """A fixed N(0, 1) pattern [n, 3, size, size] per scene, scaled by the noise parameter."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def render_scene(params: SceneParams, enc: EncodedPrompts, size: int = 128, noise: Tensor | None = None) -> Tensor:
    """Images [P, 3, S, S] in [0, 1], differentiable in every parameter of ``params``."""
    p, n = enc.mask.shape
    cx, cy, r, ground = _layout(params, enc, size)
    x = torch.arange(size, dtype=torch.float32)  # PIL's convention: integer coordinates are pixel centres
    img = _rgb(BACKGROUND)[None, :, None, None].expand(p, 3, size, size)
    ground_mask = (x >= ground).float()[:, None]  # [S(y), 1]
    img = img * (1 - ground_mask) + _rgb(GROUND_COLOUR)[None, :, None, None] * ground_mask

    # shape masks: canonical distance textures read at (x - cx)/r, (y - cy)/r; the grid carries
    # the gradient to the positions
    u = (x[None, None] - cx[..., None]) / r[..., None]  # [P, N, S(x)]
    v = (x[None, None] - cy[..., None]) / r[..., None]  # [P, N, S(y)]
    grid = torch.stack(torch.broadcast_tensors(u[:, :, None, :] / 2, v[:, :, :, None] / 2), -1)
    sdf = F.grid_sample(_textures(), grid.reshape(1, p * n * size, size, 2), mode="bilinear",
                        padding_mode="border", align_corners=True)  # [1, 4, P*N*S, S]
    sdf = sdf.reshape(len(SHAPES), p, n, size, size).permute(1, 2, 0, 3, 4) * r[..., None, None, None]
    masks = torch.sigmoid(-sdf / EDGE_PX)  # [P, N, 4, S, S]
    obj_mask = (masks * params.shape[..., None, None]).sum(2)  # the soft mixture of the four shapes

    # shadow ellipses on the ground line, radii (r, 0.25r); first-order distance f / |grad f|
    sx = cx + r * (-0.5 + 1.1 * params.shadow_side)
    du = (x[None, None] - sx[..., None]) / r[..., None]  # [P, N, S(x)]
    dv = ((x - ground)[None, None] / (0.25 * r[..., None])).expand(p, n, size)  # [P, N, S(y)]
    f = du[:, :, None, :] ** 2 + dv[:, :, :, None] ** 2 - 1
    gx, gy = du / r[..., None], dv / (0.25 * r[..., None])  # half the gradient of f, per axis
    grad = 2 * torch.sqrt(gx[:, :, None, :] ** 2 + gy[:, :, :, None] ** 2 + 1e-6)
    shadow_mask = torch.sigmoid(-(f / grad) / EDGE_PX)

    palette = torch.stack([_rgb(c) for c in COLOURS.values()])  # [8, 3]
    colour = params.colour @ palette  # [P, N, 3]
    bg = _rgb(BACKGROUND)
    colour = (1 - params.wash[:, None, None]) * colour + params.wash[:, None, None] * bg
    live = enc.mask * params.presence  # an absent object has no shadow either
    shadow_rgb = _rgb(SHADOW_COLOUR)[None, :, None, None]
    for i in range(n):  # PIL draws each object's shadow, then the object, left to right
        a = (live[:, i] * params.shadow_opacity[:, i])[:, None, None, None] * shadow_mask[:, i, None]
        img = img * (1 - a) + shadow_rgb * a
        a = live[:, i, None, None, None] * obj_mask[:, i, None]
        img = img * (1 - a) + colour[:, i, :, None, None] * a

    img = gaussian_blur(img, params.blur)
    if noise is None:
        noise = noise_pattern(p, size)
    img = img + params.noise[:, None, None, None] * noise
    img = img + F.interpolate(params.residual, size=(size, size), mode="bilinear", align_corners=False)
    return img.clamp(0.0, 1.0)


# ---------------------------------------------------------------------------- known scores
def known_scores(params: SceneParams, enc: EncodedPrompts) -> Tensor:
    """[P, 4] known scores (order of DIMENSIONS), 0..4, differentiable in the parameters."""
    m = enc.mask
    p_colour = params.colour.gather(-1, enc.colour_idx[..., None])[..., 0]
    p_shape = params.shape.gather(-1, enc.shape_idx[..., None])[..., 0]
    a = params.presence
    align_cost = (a * (0.5 * (1 - p_colour) + 0.5 * (1 - p_shape)) + (1 - a) * 1.0) * m
    # realism: the residual's energy adds to the noise (it is the hacking channel, never a gain)
    noise_energy = (params.noise.pow(2) + params.residual.pow(2).flatten(1).mean(1)).clamp_min(1e-12).sqrt()
    real_cost = 0.25 * params.blur / BLUR_PER_STEP + 0.25 * noise_energy / NOISE_PER_STEP
    aest_cost = 0.5 * params.crowd + 0.5 * 7.0 * params.wash
    o = params.shadow_opacity
    plaus_cost = (params.height + o * (1 - params.shadow_side) / 2 + 0.5 * (1 - o)) * m
    cost = torch.stack([align_cost.sum(1), real_cost, aest_cost, plaus_cost.sum(1)], dim=1)
    return (MAX_SCORE - cost).clamp_min(0.0)
