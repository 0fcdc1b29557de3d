"""Procedural images whose four dimension scores are known by construction.

A scene is a few coloured shapes standing on the ground under a light from the left. Each
dimension has its own degradation, drawn independently, so one image carries four known scores
on the half-point scale (0.0 .. 4.0, 4.0 = perfect):

- **alignment**: the prompt names each object's count, colour and shape; every mismatch drawn
  (a wrong colour, a wrong shape, a missing or extra object) costs one point;
- **realism**: Gaussian noise, blur and blocky artefacts, half a point per step;
- **aesthetics**: composition (objects balanced around the centre or crammed into a corner) and
  contrast (washed out towards the background colour), half a point per step;
- **plausibility**: objects floating above the ground and shadows falling towards the light, one
  point per impossible object.

Everything is deterministic in the seed. Images are drawn at ``size`` (default 128) with PIL.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..dimensions import DIMENSIONS

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (150, 60, 190), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
PROMPT_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
FOREIGN_COLOURS = ("white", "black")  # never named in prompts: drawn only as mismatches
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
MAX_SCORE = 4.0


@dataclass
class SceneObject:
    shape: str
    colour: str


@dataclass
class Scene:
    """What the prompt asks for, and the degradation levels actually drawn."""

    wanted: list[SceneObject]
    drawn: list[SceneObject]
    noise_steps: int = 0  # realism
    composition_steps: int = 0  # aesthetics
    contrast_steps: int = 0
    floating: int = 0  # plausibility: objects above the ground
    wrong_shadows: int = 0
    background: tuple[int, int, int] = (200, 215, 235)
    seed: int = 0

    def prompt(self) -> str:
        groups: dict[tuple[str, str], int] = {}
        for o in self.wanted:
            groups[(o.colour, o.shape)] = groups.get((o.colour, o.shape), 0) + 1
        parts = [f"{NUMBER_WORDS[n]} {c} {s}{'s' if n > 1 else ''}" for (c, s), n in groups.items()]
        text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"a picture of {text} on the ground"

    def scores(self) -> dict[str, float]:
        mismatches = _mismatches(self.wanted, self.drawn)
        return {
            "alignment": max(0.0, MAX_SCORE - 1.0 * mismatches),
            "realism": max(0.0, MAX_SCORE - 0.5 * self.noise_steps),
            "aesthetics": max(0.0, MAX_SCORE - 0.5 * (self.composition_steps + self.contrast_steps)),
            "plausibility": max(0.0, MAX_SCORE - 1.0 * (self.floating + self.wrong_shadows)),
        }


@dataclass
class SyntheticSample:
    image: Image.Image
    prompt: str
    scores: dict[str, float]
    scene: Scene = field(repr=False)


def _mismatches(wanted: list[SceneObject], drawn: list[SceneObject]) -> int:
    """Wanted objects not drawn plus drawn objects not wanted, as multisets (a wrong colour or
    shape counts once, like a missing or an extra object)."""
    left = [(o.shape, o.colour) for o in wanted]
    matched = 0
    for o in drawn:
        key = (o.shape, o.colour)
        if key in left:
            left.remove(key)
            matched += 1
    return max(len(wanted), len(drawn)) - matched


def random_scene(rng: np.random.Generator, target: dict[str, float] | None = None) -> Scene:
    """A scene whose degradations realise ``target`` scores (random half-point targets if None).

    Realism and aesthetics are realised exactly; alignment and plausibility move in whole points
    (a half-point target rounds down), and plausibility can lose at most two points per object.
    The labels are always :meth:`Scene.scores` of what was drawn.
    """
    target = dict(target or {})
    for d in DIMENSIONS:
        if d not in target:
            target[d] = float(rng.integers(0, 9)) / 2.0
    for d, v in target.items():
        if d not in DIMENSIONS:
            raise ValueError(f"unknown dimension {d!r}")
        if not 0.0 <= v <= MAX_SCORE or (v * 2) != int(v * 2):
            raise ValueError(f"{d} target must be a half-point score in [0, 4], got {v}")
    n = int(rng.integers(1, 4))
    wanted = [SceneObject(str(rng.choice(SHAPES)), str(rng.choice(PROMPT_COLOURS))) for _ in range(n)]
    drawn = _apply_mismatches(rng, wanted, int(MAX_SCORE - math.floor(target["alignment"])))
    realism = int(round((MAX_SCORE - target["realism"]) * 2))
    aest = int(round((MAX_SCORE - target["aesthetics"]) * 2))
    comp = int(rng.integers(0, min(aest, 4) + 1))
    plaus = min(int(MAX_SCORE - math.floor(target["plausibility"])), 2 * len(drawn))
    floating = min(plaus, len(drawn))
    return Scene(
        wanted=wanted, drawn=drawn, noise_steps=realism, composition_steps=comp, contrast_steps=aest - comp,
        floating=floating, wrong_shadows=plaus - floating, seed=int(rng.integers(0, 2**31 - 1)),
    )


def _apply_mismatches(rng: np.random.Generator, wanted: list[SceneObject], k: int) -> list[SceneObject]:
    """Draw ``wanted`` with exactly ``k`` mismatches: substitutions or removals of distinct objects,
    then extra objects. Substitutes and extras use colours no prompt names, so they never match."""
    drawn = [SceneObject(o.shape, o.colour) for o in wanted]
    n = len(drawn)
    changed = [int(i) for i in rng.permutation(n)[: min(k, n)]]
    removals = set()
    for i in changed:
        if k <= n and rng.random() < 0.3:
            removals.add(i)
        else:
            drawn[i] = SceneObject(str(rng.choice(SHAPES)), str(rng.choice(FOREIGN_COLOURS)))
    drawn = [o for i, o in enumerate(drawn) if i not in removals]
    for _ in range(max(0, k - n)):
        drawn.append(SceneObject(str(rng.choice(SHAPES)), str(rng.choice(FOREIGN_COLOURS))))
    return drawn


def render(scene: Scene, size: int = 128) -> Image.Image:
    rng = np.random.default_rng(scene.seed)
    s = size
    img = Image.new("RGB", (s, s), scene.background)
    d = ImageDraw.Draw(img)
    ground = int(s * 0.75)
    d.rectangle((0, ground, s, s), fill=(120, 150, 90))
    n = max(len(scene.drawn), 1)
    r = s / (4.5 + n)
    for i, obj in enumerate(scene.drawn):
        if scene.composition_steps:  # crowd towards the top-left corner
            squeeze = 1.0 / (1 + scene.composition_steps)
            cx = r + (i + 0.5) * (s - 2 * r) / n * squeeze
        else:
            cx = (i + 1) * s / (n + 1)
        float_up = i < scene.floating
        base_y = ground - (s * 0.3 if float_up else 0)
        cy = base_y - r
        wrong_shadow = i < scene.wrong_shadows
        # light comes from the left: shadows fall to the right, on the ground under the object
        sx = cx - 1.6 * r if wrong_shadow else cx + 0.6 * r
        d.ellipse((sx - r, ground - 0.25 * r, sx + r, ground + 0.25 * r), fill=(70, 90, 55))
        colour = _washed(COLOURS[obj.colour], scene.background, scene.contrast_steps)
        _shape(d, obj.shape, cx, cy, r, colour)
    if scene.noise_steps:
        img = _degrade(img, scene.noise_steps, rng)
    return img


def _washed(c, bg, steps: int):
    t = min(steps, 6) / 7.0
    return tuple(int(round((1 - t) * a + t * b)) for a, b in zip(c, bg))


def _shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        d.polygon(pts, fill=colour)


def _degrade(img: Image.Image, steps: int, rng: np.random.Generator) -> Image.Image:
    """Realism steps: blur, then noise, then blocky artefacts, stronger with each step."""
    blur = 0.6 * steps
    img = img.filter(ImageFilter.GaussianBlur(blur))
    a = np.asarray(img, np.float32)
    a = a + rng.normal(0.0, 7.0 * steps, a.shape)
    if steps >= 4:  # blocky artefacts: coarse resampling
        s = img.size[0]
        small = Image.fromarray(a.clip(0, 255).astype(np.uint8)).resize((max(s // steps, 4),) * 2, Image.Resampling.NEAREST)
        a = 0.5 * a + 0.5 * np.asarray(small.resize((s, s), Image.Resampling.NEAREST), np.float32)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def make_sample(seed: int, size: int = 128, target: dict[str, float] | None = None) -> SyntheticSample:
    """One image, its prompt and its four scores; the same seed gives the same sample."""
    rng = np.random.default_rng(seed)
    scene = random_scene(rng, target)
    return SyntheticSample(render(scene, size), scene.prompt(), scene.scores(), scene)


def samples(n: int, seed: int = 0, size: int = 128) -> Iterator[SyntheticSample]:
    for i in range(n):
        yield make_sample(seed * 1_000_003 + i, size)


def degraded_pair(seed: int, dimension: str, size: int = 128, drop: float = 2.0) -> tuple[SyntheticSample, SyntheticSample]:
    """A clean sample and the same scene degraded by ``drop`` points on one dimension only."""
    if dimension not in DIMENSIONS:
        raise ValueError(f"unknown dimension {dimension!r}")
    rng = np.random.default_rng(seed)
    clean_target = {d: MAX_SCORE for d in DIMENSIONS}
    clean_scene = random_scene(rng, clean_target)
    bad_target = dict(clean_target, **{dimension: MAX_SCORE - drop})
    bad_scene = random_scene(np.random.default_rng(seed), bad_target)
    # same prompt and objects: the degraded scene keeps the clean one's wanted list and seed
    bad_scene.wanted = [SceneObject(o.shape, o.colour) for o in clean_scene.wanted]
    if dimension != "alignment":
        bad_scene.drawn = [SceneObject(o.shape, o.colour) for o in clean_scene.drawn]
    else:
        bad_scene.drawn = _apply_mismatches(np.random.default_rng(seed + 1), clean_scene.wanted, int(drop))
    bad_scene.seed = clean_scene.seed
    clean = SyntheticSample(render(clean_scene, size), clean_scene.prompt(), clean_scene.scores(), clean_scene)
    bad = SyntheticSample(render(bad_scene, size), bad_scene.prompt(), bad_scene.scores(), bad_scene)
    return clean, bad
