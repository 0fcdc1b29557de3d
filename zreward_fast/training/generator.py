"""The reward as a differentiable supervisor: a tiny scene generator trained through a reward.

A prompt-conditioned generator draws the synthetic scenes of :mod:`.synthetic` (coloured shapes
on the ground, light from the left) with a differentiable torch renderer, and its *known* scores
on the four dimensions are computed from its parameters by continuous versions of the rules that
label the synthetic data (both in :mod:`.scene_render`, which documents the parameters, the
renderer, the known scores and the residual, the channel a generator can hack with). Training it against a reward model (gradients through the reward into
the generator, ReFL/DRaFT style) and logging reward, known scores and their gap shows how much of
the reward's rise is real and how much is hacking.

Design
------
**Network** (:class:`SceneGenerator`): the prompt is encoded per slot (colour one-hot, shape
one-hot, present; 6 x 13 numbers); an MLP (78 -> 64 -> raw parameters) outputs the scene
parameters, added to a fixed bias that sets a degraded start (blur and noise 3 steps, wash 2
steps, crowding 1, objects at 0.85 presence floating 0.25, shadow side 0.5 at 0.8 opacity) and a
fixed skip ``1.5 * one-hot(wanted)`` on the colour and shape logits (about 40% / 60% on the right colour /
shape: muddy colours and blended shapes). The residual is a free per-prompt parameter (zeros).
Prompts hold at most :data:`MAX_OBJECTS` objects; :func:`generator_prompts` draws at most 4, so the
degraded start leaves every known score above 0 (the clip at 0 would stop its gradient).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dimensions import DIMENSIONS
from .scene_render import (
    MAX_OBJECTS, MAX_WASH, NOISE_PER_STEP, RESIDUAL_BOUND, EncodedPrompts, SceneParams, encode_prompts,
    gaussian_blur, generator_prompts, known_scores, noise_pattern, perfect_params, prompt_groups, prompt_text,
    render_scene,
)
from .synthetic import BLUR_PER_STEP, SceneObject

RewardFn = Callable[..., tuple[Tensor, Tensor]]


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
