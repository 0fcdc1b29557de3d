"""Procedural images whose four dimension scores are known by construction, and a benchmark.

A scene is a few groups of coloured shapes standing on the ground under a light from the left,
laid out left to right in the order the prompt names them ("two red squares left of a blue
circle"). Each dimension has its own degradations, drawn independently, so one image carries four
known scores on the half-point scale (0.0 .. 4.0, 4.0 = perfect); docs/synthetic.md has the rules:

- **alignment** needs the prompt: every error draws a scene some other prompt would describe
  exactly. A wrong colour or a wrong shape costs half a point, a missing or an extra object one
  point, two groups drawn in swapped order one point. Substitutes never form a combination the
  prompt names, so no cheaper reading of the image exists;
- **realism**: blur, Gaussian noise and (from 4 steps) blocky artefacts, half a point per step;
- **aesthetics**: objects crowded towards the left and colours washed out towards the background,
  half a point per step of each;
- **plausibility**: an object floating above the ground or a shadow falling towards the light
  costs one point, an object with no shadow half a point.

Everything is deterministic in the seed. Training data (:func:`make_sample`, :func:`degraded_pair`)
come from integer seeds; the benchmark and the training pairs (:mod:`.pairs`) from seed streams of
their own, so a benchmark seed is never a training seed.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..dimensions import DIMENSIONS

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (150, 60, 190), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
PROMPT_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
NUMBER_WORDS = {2: "two", 3: "three"}
MAX_SCORE = 4.0
BACKGROUND = (200, 215, 235)
GROUND = (120, 150, 90)
SHADOW = (70, 90, 55)
BLUR_PER_STEP = 0.6  # realism: Gaussian blur radius (pixels) per step
NOISE_PER_STEP = 7.0  # realism: noise std (0..255) per step
WASH_PER_STEP = 1.0 / 7.0  # aesthetics: share of the way to the background per contrast step
GAPS = (0.5, 1.0, 1.5, 2.0)

ERROR_COSTS = {"colour": 0.5, "shape": 0.5, "missing": 1.0, "extra": 1.0, "order": 1.0}
MAX_EXTRAS = 2
MAX_COMPOSITION, MAX_CONTRAST = 4, 6



@dataclass
class SceneObject:
    shape: str
    colour: str

    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Group:
    """``count`` objects of one colour and shape, next to each other."""

    colour: str
    shape: str
    count: int

    def text(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        number = article if self.count == 1 else NUMBER_WORDS[self.count]
        return f"{number} {self.colour} {self.shape}{'s' if self.count > 1 else ''}"


@dataclass(frozen=True)
class AlignmentError:
    """One way the drawing departs from the prompt (costs in ``ERROR_COSTS``).

    ``group`` indexes the prompt's groups; ``index`` the object within its group (colour and
    shape errors); ``value`` the substitute colour or shape. ``order`` swaps groups ``group``
    and ``group + 1``.
    """

    kind: str
    group: int
    index: int = 0
    value: str = ""


def describe(groups: Sequence[Group]) -> str:
    """The prompt for ``groups``, left to right: "two red squares left of a blue circle"."""
    return " left of ".join(g.text() for g in groups)


@dataclass
class Scene:
    """What the prompt asks for, and the degradations actually drawn."""

    groups: list[Group]
    errors: list[AlignmentError] = field(default_factory=list)
    noise_steps: int = 0  # realism
    composition_steps: int = 0  # aesthetics
    contrast_steps: int = 0
    floating: int = 0  # plausibility: the first ``floating`` drawn objects float
    wrong_shadows: int = 0  # the first ``wrong_shadows`` objects' shadows fall towards the light
    missing_shadows: int = 0  # the next ``missing_shadows`` objects have none
    seed: int = 0

    def prompt(self) -> str:
        return describe(self.groups)

    @property
    def wanted(self) -> list[SceneObject]:
        return [SceneObject(g.shape, g.colour) for g in self.groups for _ in range(g.count)]

    @property
    def drawn(self) -> list[SceneObject]:
        """The objects drawn, left to right."""
        return [o for gi in self._order() for o in self._group_objects()[gi]]

    def _counts(self) -> list[int]:
        counts = [g.count for g in self.groups]
        for e in self.errors:
            counts[e.group] += {"missing": -1, "extra": 1}.get(e.kind, 0)
        return counts

    def _group_objects(self) -> list[list[SceneObject]]:
        objs = [[SceneObject(g.shape, g.colour) for _ in range(n)] for g, n in zip(self.groups, self._counts())]
        for e in self.errors:
            if e.kind == "colour":
                objs[e.group][e.index].colour = e.value
            elif e.kind == "shape":
                objs[e.group][e.index].shape = e.value
        return objs

    def _order(self) -> list[int]:
        order = list(range(len(self.groups)))
        for e in self.errors:
            if e.kind == "order":
                order[e.group], order[e.group + 1] = order[e.group + 1], order[e.group]
        return order

    def scores(self) -> dict[str, float]:
        deficit = {
            "alignment": sum(ERROR_COSTS[e.kind] for e in self.errors),
            "realism": 0.5 * self.noise_steps,
            "aesthetics": 0.5 * (self.composition_steps + self.contrast_steps),
            "plausibility": 1.0 * (self.floating + self.wrong_shadows) + 0.5 * self.missing_shadows,
        }
        return {d: max(0.0, MAX_SCORE - deficit[d]) for d in DIMENSIONS}

    def reasoning(self, dimension: str) -> str:
        """What a careful rater would note on ``dimension``: the facts behind its score."""
        if dimension == "alignment":
            return _alignment_facts(self)
        if dimension == "realism":
            return f"blur and noise level {self.noise_steps}." if self.noise_steps else "the image is sharp and clean."
        if dimension == "aesthetics":
            if not (self.composition_steps or self.contrast_steps):
                return "balanced composition and good contrast."
            return f"crowded to the left level {self.composition_steps}, washed out level {self.contrast_steps}."
        if dimension == "plausibility":
            drawn = self.drawn
            facts = [f"the {drawn[i].name()} floats above the ground" for i in range(self.floating)]
            facts += [f"the shadow of the {drawn[i].name()} is on the left" for i in range(self.wrong_shadows)]
            w = self.wrong_shadows
            facts += [f"the {drawn[i].name()} has no shadow" for i in range(w, w + self.missing_shadows)]
            return ("; ".join(facts) if facts else "every object is on the ground with its shadow") + "."
        raise ValueError(f"unknown dimension {dimension!r}")


def _alignment_facts(scene: Scene) -> str:
    facts = []
    for e in scene.errors:
        g = scene.groups[e.group]
        if e.kind == "colour":
            facts.append(f"one {g.colour} {g.shape} is {e.value}")
        elif e.kind == "shape":
            facts.append(f"one {g.colour} {g.shape} is a {e.value}")
        elif e.kind == "missing":
            facts.append(f"one {g.colour} {g.shape} is missing")
        elif e.kind == "extra":
            facts.append(f"one {g.colour} {g.shape} too many")
        else:
            h = scene.groups[e.group + 1]
            facts.append(f"the {h.colour} {h.shape} is left of the {g.colour} {g.shape}")
    return ("; ".join(facts) if facts else "it shows what the prompt asks for") + "."


@dataclass
class SyntheticSample:
    image: Image.Image
    prompt: str
    scores: dict[str, float]
    scene: Scene = field(repr=False)


# ---------------------------------------------------------------- drawing degradations
def _random_groups(rng: np.random.Generator) -> list[Group]:
    m = int(rng.integers(1, 4))
    combos: list[tuple[str, str]] = []
    while len(combos) < m:
        c = (str(rng.choice(PROMPT_COLOURS)), str(rng.choice(SHAPES)))
        if c not in combos:
            combos.append(c)
    top = 3 if m == 1 else 2
    return [Group(c, s, int(rng.integers(1, top + 1))) for c, s in combos]


def _half_options(scene: Scene) -> list[AlignmentError]:
    """Colour and shape errors still possible: one of each per original, present object."""
    named = {(g.colour, g.shape) for g in scene.groups}
    colours = [c for c in COLOURS if c not in {g.colour for g in scene.groups}]
    done = {(e.kind, e.group, e.index) for e in scene.errors}
    missing = [sum(e.kind == "missing" and e.group == gi for e in scene.errors) for gi in range(len(scene.groups))]
    out = []
    for gi, g in enumerate(scene.groups):
        for k in range(g.count - missing[gi]):
            if ("colour", gi, k) not in done:
                out.append(AlignmentError("colour", gi, k, colours[(gi + k) % len(colours)]))
            shapes = [s for s in SHAPES if s != g.shape and (g.colour, s) not in named]
            if ("shape", gi, k) not in done and shapes:
                out.append(AlignmentError("shape", gi, k, shapes[(gi + k) % len(shapes)]))
    return out


def _full_options(scene: Scene) -> list[AlignmentError]:
    out = []
    kinds = [(e.kind, e.group) for e in scene.errors]
    touched = {e.group for e in scene.errors if e.kind in ("colour", "shape")}
    extras = sum(k == "extra" for k, _ in kinds)
    for gi, g in enumerate(scene.groups):
        if extras < MAX_EXTRAS and ("missing", gi) not in kinds:
            out.append(AlignmentError("extra", gi))
        # one object missing from a group of 2+, never one that carries a colour or shape error
        if g.count >= 2 and ("missing", gi) not in kinds and ("extra", gi) not in kinds and gi not in touched:
            out.append(AlignmentError("missing", gi))
    if not any(k == "order" for k, _ in kinds):
        out += [AlignmentError("order", gi) for gi in range(len(scene.groups) - 1)]
    return out


def _add_alignment_errors(rng: np.random.Generator, scene: Scene, half_units: int) -> bool:
    """Add errors costing exactly ``half_units`` half-points; False if the scene cannot."""
    if half_units % 2:
        opts = _half_options(scene)
        if not opts:
            return False
        scene.errors.append(opts[int(rng.integers(len(opts)))])
        half_units -= 1
    while half_units > 0:
        halves, fulls = _half_options(scene), _full_options(scene)
        choices = fulls + ([None] if len(halves) >= 2 else [])
        if not choices:
            return False
        pick = choices[int(rng.integers(len(choices)))]
        if pick is None:  # two half-point errors on different objects
            first = halves[int(rng.integers(len(halves)))]
            scene.errors.append(first)
            rest = _half_options(scene)
            if not rest:
                return False
            scene.errors.append(rest[int(rng.integers(len(rest)))])
        else:
            scene.errors.append(pick)
        half_units -= 2
    return True


def _add_plausibility(rng: np.random.Generator, scene: Scene, half_units: int) -> bool:
    n = len(scene.drawn)
    if half_units % 2:
        if scene.wrong_shadows + scene.missing_shadows >= n:
            return False
        scene.missing_shadows += 1
        half_units -= 1
    while half_units > 0:
        opts = (["float"] if scene.floating < n else []) + (["shadow"] if scene.wrong_shadows + scene.missing_shadows < n else [])
        if not opts:
            return False
        if opts[int(rng.integers(len(opts)))] == "float":
            scene.floating += 1
        else:
            scene.wrong_shadows += 1
        half_units -= 2
    return True


def _add_aesthetics(rng: np.random.Generator, scene: Scene, half_units: int) -> bool:
    for _ in range(half_units):
        opts = (["comp"] if scene.composition_steps < MAX_COMPOSITION else []) + (
            ["contrast"] if scene.contrast_steps < MAX_CONTRAST else [])
        if not opts:
            return False
        if opts[int(rng.integers(len(opts)))] == "comp":
            scene.composition_steps += 1
        else:
            scene.contrast_steps += 1
    return True


def degrade(rng: np.random.Generator, scene: Scene, dimension: str, drop: float) -> Scene | None:
    """A copy of ``scene`` worse by exactly ``drop`` (a multiple of 0.5) on ``dimension`` only,
    or None when this scene has no room for it (too few objects, nothing left to degrade)."""
    half_units = int(round(drop * 2))
    if half_units != drop * 2 or half_units < 0:
        raise ValueError(f"drop must be a non-negative multiple of 0.5, got {drop}")
    if dimension not in DIMENSIONS:
        raise ValueError(f"unknown dimension {dimension!r}; known dimensions are {list(DIMENSIONS)}")
    out = copy.deepcopy(scene)
    before = scene.scores()[dimension]
    if before - drop < 0:
        return None
    if dimension == "alignment":
        ok = _add_alignment_errors(rng, out, half_units)
        # alignment errors change the objects drawn: the plausibility defects must still fit
        ok = ok and out.floating <= len(out.drawn) and out.wrong_shadows + out.missing_shadows <= len(out.drawn)
    elif dimension == "realism":
        out.noise_steps += half_units
        ok = True
    elif dimension == "aesthetics":
        ok = _add_aesthetics(rng, out, half_units)
    else:
        ok = _add_plausibility(rng, out, half_units)
    return out if ok else None


def random_scene(rng: np.random.Generator, target: dict[str, float] | None = None, max_tries: int = 100) -> Scene:
    """A scene whose degradations realise ``target`` scores exactly (random half-point scores for
    the dimensions it leaves out). The labels are always :meth:`Scene.scores` of what was drawn."""
    target = dict(target or {})
    for d, v in target.items():
        if d not in DIMENSIONS:
            raise ValueError(f"unknown dimension {d!r}; known dimensions are {list(DIMENSIONS)}")
        if not 0.0 <= v <= MAX_SCORE or (v * 2) != int(v * 2):
            raise ValueError(f"{d} target must be a half-point score in [0, 4], got {v}")
    for d in DIMENSIONS:
        if d not in target:
            target[d] = float(rng.integers(0, 9)) / 2.0
    for _ in range(max_tries):
        scene = Scene(groups=_random_groups(rng), seed=int(rng.integers(0, 2**31 - 1)))
        for d in DIMENSIONS:  # alignment first: it decides how many objects are drawn
            scene = degrade(rng, scene, d, MAX_SCORE - target[d]) if scene is not None else None
        if scene is not None:
            return scene
    raise RuntimeError(f"could not realise target {target} in {max_tries} scenes")


# ---------------------------------------------------------------- rendering
def row_layout(n: Any, size: int, crowding: Any, minimum: Callable = min, maximum: Callable = max) -> tuple:
    """Radius, first centre and spacing of a row of ``n`` objects: neighbours never overlap (so
    alignment stays readable), and crowding moves the row to the left edge and packs it tighter.
    Floats with the default ``min``/``max``; tensors with ``torch.minimum``/``torch.maximum``
    (the differentiable generator draws the same row with a continuous ``crowding``)."""
    spacing = size / (n + 1)
    r = minimum(size / (4.5 + n), 0.45 * spacing)
    first = 1.2 * r + (spacing - 1.2 * r) / (1.0 + crowding)
    return r, first, maximum(2.2 * r, spacing / (1.0 + 0.5 * crowding))


def render(scene: Scene, size: int = 128) -> Image.Image:
    rng = np.random.default_rng(scene.seed)
    s = size
    img = Image.new("RGB", (s, s), BACKGROUND)
    d = ImageDraw.Draw(img)
    ground = int(s * 0.75)
    d.rectangle((0, ground, s, s), fill=GROUND)
    drawn = scene.drawn
    r, first, spacing = row_layout(max(len(drawn), 1), s, scene.composition_steps)
    w = scene.wrong_shadows
    for i, obj in enumerate(drawn):
        cx = first + i * spacing
        base_y = ground - (s * 0.3 if i < scene.floating else 0)
        cy = base_y - r
        if not w <= i < w + scene.missing_shadows:
            # light comes from the left: shadows fall to the right, on the ground under the object
            sx = cx - 1.6 * r if i < w else cx + 0.6 * r
            d.ellipse((sx - r, ground - 0.25 * r, sx + r, ground + 0.25 * r), fill=SHADOW)
        colour = _washed(COLOURS[obj.colour], BACKGROUND, scene.contrast_steps)
        _shape(d, obj.shape, cx, cy, r, colour)
    if scene.noise_steps:
        img = _degrade_pixels(img, scene.noise_steps, rng)
    return img


def _washed(c, bg, steps: int):
    t = min(steps, MAX_CONTRAST) * WASH_PER_STEP
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


def _degrade_pixels(img: Image.Image, steps: int, rng: np.random.Generator) -> Image.Image:
    """Realism steps: blur, then noise, then blocky artefacts, stronger with each step."""
    img = img.filter(ImageFilter.GaussianBlur(BLUR_PER_STEP * steps))
    a = np.asarray(img, np.float32)
    a = a + rng.normal(0.0, NOISE_PER_STEP * steps, a.shape)
    if steps >= 4:  # blocky artefacts: coarse resampling
        s = img.size[0]
        small = Image.fromarray(a.clip(0, 255).astype(np.uint8)).resize((max(s // steps, 4),) * 2, Image.Resampling.NEAREST)
        a = 0.5 * a + 0.5 * np.asarray(small.resize((s, s), Image.Resampling.NEAREST), np.float32)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def _sample(scene: Scene, size: int) -> SyntheticSample:
    return SyntheticSample(render(scene, size), scene.prompt(), scene.scores(), scene)


# ---------------------------------------------------------------- training data
def make_sample(seed: int, size: int = 128, target: dict[str, float] | None = None) -> SyntheticSample:
    """One image, its prompt and its four scores; the same seed gives the same sample."""
    return _sample(random_scene(np.random.default_rng(seed), target), size)


def samples(n: int, seed: int = 0, size: int = 128) -> Iterator[SyntheticSample]:
    for i in range(n):
        yield make_sample(seed * 1_000_003 + i, size)


def degraded_pair(seed: int, dimension: str, size: int = 128, drop: float = 2.0) -> tuple[SyntheticSample, SyntheticSample]:
    """A clean sample and the same scene degraded by ``drop`` points on one dimension only."""
    rng = np.random.default_rng(seed)
    clean = random_scene(rng, {d: MAX_SCORE for d in DIMENSIONS})
    for _ in range(100):
        bad = degrade(rng, clean, dimension, drop)
        if bad is not None:
            return _sample(clean, size), _sample(bad, size)
        clean = random_scene(rng, {d: MAX_SCORE for d in DIMENSIONS})
    raise RuntimeError(f"could not degrade {dimension} by {drop}")
