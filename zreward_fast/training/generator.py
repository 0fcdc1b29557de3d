"""The reward as a differentiable supervisor: a tiny scene generator trained through a reward.

A prompt-conditioned generator draws the synthetic scenes of :mod:`.synthetic` (coloured shapes
on the ground, light from the left) with a differentiable torch renderer, and its *known* scores
on the four dimensions are computed from its parameters by continuous versions of the rules that
label the synthetic data. Training it against a reward model (gradients through the reward into
the generator, ReFL/DRaFT style) and logging reward, known scores and their gap shows how much of
the reward's rise is real and how much is hacking.

Design
------
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

**Network** (:class:`SceneGenerator`): the prompt is encoded per slot (colour one-hot, shape
one-hot, present; 6 x 13 numbers); an MLP (78 -> 64 -> raw parameters) outputs the scene
parameters, added to a fixed bias that sets a degraded start (blur and noise 3 steps, wash 2
steps, crowding 1, objects at 0.85 presence floating 0.25, shadow side 0.5 at 0.8 opacity) and a
fixed skip
``1.5 * one-hot(wanted)`` on the colour and shape logits (about 40% / 60% on the right colour /
shape: muddy colours and blended shapes). The residual is a free per-prompt parameter (zeros).
Prompts hold at most :data:`MAX_OBJECTS` objects; :func:`generator_prompts` draws at most 4, so the
degraded start leaves every known score above 0 (the clip at 0 would stop its gradient).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dimensions import DIMENSIONS
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

RewardFn = Callable[..., tuple[Tensor, Tensor]]


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


# ---------------------------------------------------------------------------- generator
_SLOT_RAW = 8 + 4 + 4  # colour logits, shape logits, presence, height, shadow side, shadow opacity
_GLOBAL_RAW = 4  # blur, noise, wash, crowd


def _logit(x: float) -> float:
    return math.log(x / (1 - x))


class SceneGenerator(nn.Module):
    """Prompt-conditioned generator of scene parameters for a fixed list of prompts.

    ``forward()`` returns the :class:`SceneParams` of every prompt; :meth:`render` draws them.
    """

    def __init__(self, prompts: Sequence[Sequence[SceneObject]], size: int = 128, hidden: int = 64,
                 residual_size: int = 32, seed: int = 0, skip_gain: float = 1.5) -> None:
        super().__init__()
        self.enc = encode_prompts(prompts)
        self.size = size
        p, n = self.enc.mask.shape
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(self.enc.features.shape[1], hidden), nn.SiLU(),
                                 nn.Linear(hidden, n * _SLOT_RAW + _GLOBAL_RAW))
        with torch.no_grad():
            for lin in (self.net[0], self.net[2]):
                lin.weight.normal_(0.0, 1.0 / math.sqrt(lin.in_features), generator=g)
                lin.bias.zero_()
            self.net[2].weight.mul_(0.05)  # start near the degraded bias, with a little spread
        # the degraded start (see the module docstring), in raw (pre-constraint) units
        slot_bias = torch.zeros(_SLOT_RAW)
        slot_bias[12:] = torch.tensor([_logit(0.85), _logit(0.25), math.atanh(0.5), _logit(0.8)])
        glob = torch.tensor([_logit(3 * BLUR_PER_STEP / 4.8), _logit(3 / 8), _logit((2 / 7) / MAX_WASH), _logit(1 / 4)])
        self.register_buffer("bias", torch.cat([slot_bias.repeat(n), glob]), persistent=False)
        onehots = torch.cat([F.one_hot(self.enc.colour_idx, 8), F.one_hot(self.enc.shape_idx, 4)], -1).float()
        self.register_buffer("skip", skip_gain * onehots, persistent=False)  # [P, N, 12]
        self.residual_raw = nn.Parameter(torch.zeros(p, 3, residual_size, residual_size))
        self.register_buffer("noise", noise_pattern(p, size, seed), persistent=False)

    @property
    def texts(self) -> list[str]:
        return self.enc.texts

    def forward(self) -> SceneParams:
        p, n = self.enc.mask.shape
        raw = self.net(self.enc.features) + self.bias
        slots = raw[:, : n * _SLOT_RAW].view(p, n, _SLOT_RAW)
        slots = torch.cat([slots[..., :12] + self.skip, slots[..., 12:]], -1)
        glob = raw[:, n * _SLOT_RAW :]
        return SceneParams(
            colour=slots[..., :8].softmax(-1), shape=slots[..., 8:12].softmax(-1),
            presence=torch.sigmoid(slots[..., 12]), height=torch.sigmoid(slots[..., 13]),
            shadow_side=torch.tanh(slots[..., 14]), shadow_opacity=torch.sigmoid(slots[..., 15]),
            blur=4.8 * torch.sigmoid(glob[:, 0]), noise=8 * NOISE_PER_STEP * torch.sigmoid(glob[:, 1]),
            wash=MAX_WASH * torch.sigmoid(glob[:, 2]), crowd=4.0 * torch.sigmoid(glob[:, 3]),
            residual=RESIDUAL_BOUND * torch.tanh(self.residual_raw),
        )

    def render(self, params: SceneParams) -> Tensor:
        return render_scene(params, self.enc, self.size, self.noise)

    def known(self, params: SceneParams) -> Tensor:
        return known_scores(params, self.enc)


# ---------------------------------------------------------------------------- rewards
class OracleReward:
    """The known scores as the reward (std zeros): the baseline trained on the truth directly.

    It reads the scene parameters, not the pixels, so :func:`train_generator` skips rendering."""

    wants_params = True
    needs_pixels = False

    def __call__(self, pixels: Tensor | None, prompts: Sequence[str], *, params: SceneParams,
                 enc: EncodedPrompts) -> tuple[Tensor, Tensor]:
        mean = known_scores(params, enc)
        return mean, torch.zeros_like(mean)


oracle_reward = OracleReward()


def model_reward(rm: Any, freeze: bool = True) -> RewardFn:
    """Wrap a :class:`ZRewardModel` as a reward: ``(pixels, texts) -> (mean [B, 4], std [B, 4])``.

    With ``freeze`` the model's parameters stop requiring gradients (only the generator trains,
    and the backward pass skips the model's weight gradients)."""
    if freeze:
        rm.requires_grad_(False)

    def reward(pixels: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        return rm.reward_stats(pixels, list(prompts), DIMENSIONS)

    return reward


def aggregate(mean: Tensor, std: Tensor, aggregation: str = "mean", risk_k: float = 1.0) -> Tensor:
    """[B] objective: the dimensions' means averaged, or (``"risk"``) of mean - k * std."""
    if aggregation == "mean":
        return mean.mean(1)
    if aggregation == "risk":
        return (mean - risk_k * std).mean(1)
    raise ValueError(f"aggregation must be 'mean' or 'risk', got {aggregation!r}")


# ---------------------------------------------------------------------------- training
OPTIMIZERS = ("adam", "sgd", "normalized-sgd")  # train_generator's choices


def train_generator(
    reward: RewardFn,
    prompts: Sequence[Sequence[SceneObject]],
    steps: int = 100,
    lr: float = 0.03,
    aggregation: str = "mean",
    risk_k: float = 1.0,
    seed: int = 0,
    log_every: int = 10,
    size: int = 128,
    generator: SceneGenerator | None = None,
    optimizer: str = "adam",
) -> dict[str, Any]:
    """Train a :class:`SceneGenerator` to maximise the aggregated ``reward``; its history.

    The history holds, per logged step (step 0 is before any update, the last step after all):
    ``objective`` (what was maximised), ``reward`` (the reward's dimension means averaged, 0..4),
    ``reward_std``, ``reward_dims``, ``known`` (the known scores averaged), ``known_dims`` and
    ``gap`` = reward - known (hacking, when it grows), plus ``seconds`` for the whole run and the
    trained ``generator``. ``seed`` sets the generator's initial weights and noise pattern.

    ``optimizer``: ``"adam"``, ``"sgd"`` or ``"normalized-sgd"`` (each step moves the parameters by
    ``lr`` along the gradient's direction, whatever its size). Against a learned reward prefer the
    last: Adam gives every parameter a step of the same size, so parameters the reward barely sees
    (their gradient mostly the reward model's noise) move as fast as the ones it judges, a random
    walk that costs known score from the first steps; plain SGD keeps the direction but a small
    reward model's gradients are tiny (its means move by 0.01 across a whole scene change).
    """
    gen = generator or SceneGenerator(prompts, size=size, seed=seed)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    params_list = list(gen.parameters())
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(params_list, lr=lr)
    texts = gen.texts
    hist: dict[str, Any] = {
        "aggregation": aggregation, "risk_k": risk_k, "texts": texts, "step": [], "objective": [], "reward": [],
        "reward_std": [], "reward_dims": {d: [] for d in DIMENSIONS}, "known": [],
        "known_dims": {d: [] for d in DIMENSIONS}, "gap": [],
    }
    start = time.perf_counter()

    def evaluate() -> tuple[Tensor, Tensor, Tensor, SceneParams]:
        params = gen()
        pixels = gen.render(params) if getattr(reward, "needs_pixels", True) else None
        extra = {"params": params, "enc": gen.enc} if getattr(reward, "wants_params", False) else {}
        mean, std = reward(pixels, texts, **extra)
        return mean, std, aggregate(mean, std, aggregation, risk_k), params

    def log(step: int, mean: Tensor, std: Tensor, obj: Tensor, params: SceneParams) -> None:
        with torch.no_grad():
            known = gen.known(params.detach())
        hist["step"].append(step)
        hist["objective"].append(float(obj.mean()))
        hist["reward"].append(float(mean.mean()))
        hist["reward_std"].append(float(std.mean()))
        hist["known"].append(float(known.mean()))
        for j, d in enumerate(DIMENSIONS):
            hist["reward_dims"][d].append(float(mean[:, j].mean()))
            hist["known_dims"][d].append(float(known[:, j].mean()))
        hist["gap"].append(hist["reward"][-1] - hist["known"][-1])

    for step in range(steps):
        mean, std, obj, params = evaluate()
        if step % log_every == 0:
            log(step, mean.detach(), std.detach(), obj.detach(), params)
        opt.zero_grad(set_to_none=True)
        (-obj.mean()).backward()
        if optimizer == "normalized-sgd":
            grads = [p.grad for p in params_list if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads).clamp_min(1e-12)
            for g in grads:
                g.div_(norm)
        opt.step()
    with torch.no_grad():
        mean, std, obj, params = evaluate()
    log(steps, mean, std, obj, params)
    hist["seconds"] = time.perf_counter() - start
    hist["generator"] = gen
    return hist


def compare_aggregations(
    reward: RewardFn,
    prompts: Sequence[Sequence[SceneObject]] | None = None,
    steps: int = 100,
    lr: float = 0.03,
    risk_k: float = 1.0,
    seed: int = 0,
    n_prompts: int = 8,
    log_every: int = 10,
    size: int = 128,
    optimizer: str = "adam",
) -> dict[str, dict[str, Any]]:
    """Train from the same start against ``reward`` averaged (``"mean"``), against it risk-averse
    (``"risk"``) and against the known scores (``"oracle"``), with the same optimizer and learning
    rate; the three histories."""
    prompts = prompts if prompts is not None else generator_prompts(seed, n_prompts)
    common = dict(steps=steps, lr=lr, seed=seed, log_every=log_every, size=size, optimizer=optimizer)
    return {
        "mean": train_generator(reward, prompts, aggregation="mean", **common),
        "risk": train_generator(reward, prompts, aggregation="risk", risk_k=risk_k, **common),
        "oracle": train_generator(oracle_reward, prompts, aggregation="mean", **common),
    }


def plot_generator_history(histories: dict[str, dict[str, Any]], path: str) -> None:
    """Reward, known score and their gap over training steps, one line per run, as an image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name, h in histories.items():
        line = axes[0].plot(h["step"], h["reward"], label=name)[0]
        axes[1].plot(h["step"], h["known"], label=name, color=line.get_color())
        axes[2].plot(h["step"], h["gap"], label=name, color=line.get_color())
    titles = ("reward (mean of dimensions)", "known score (mean of dimensions)", "gap = reward - known")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = [
    "EncodedPrompts", "MAX_OBJECTS", "OPTIMIZERS", "OracleReward", "SceneGenerator", "SceneParams", "aggregate",
    "compare_aggregations", "encode_prompts", "gaussian_blur", "generator_prompts", "known_scores",
    "model_reward", "noise_pattern", "oracle_reward", "perfect_params", "plot_generator_history",
    "prompt_groups", "prompt_text", "render_scene", "train_generator",
]
