"""Per-layer fallback for the int8 CPU modes, chosen by measured sensitivity.

onnxruntime's dynamic int8 gives each activation tensor one scale (uint8, asymmetric) and each weight
row one (int8, symmetric). A layer whose input carries a few large channels loses most of its
resolution to them: the MLP's ``down_proj`` reads ``silu(gate) * up``, attention's ``o_proj`` a gated
output. Measured at 0.8B width (4 layers, vision depth 2, random weights, 16 images; README,
"Quantization at real width"): with one layer at a time quantized so, the four ``down_proj`` moved
the mean score by 0.023-0.056 each and every other layer by at most 0.023 (most under 0.005); all
30 together by 0.082; keeping the two worst in float, 0.046.

:func:`choose_fallback` reproduces that scheme in PyTorch (the same scales, fake-quantized) on
calibration images, ranks the candidate layers by their own output error (one forward pass with
hooks: ``||y_q - y|| / ||y||``, the field's usual per-layer proxy), then finds the fewest of the
top-ranked layers to keep in float for the emulated end-to-end error to fall to ``target`` (doubling,
then bisecting their count: one forward pass a try). The export hands the choice to
:func:`~zreward_fast.export.quantize.policy.select_quantizable_nodes` (``keep``), and the bundle's
parity gate then judges the real graph.

``int8-weight`` (``MatMulNBits``) is emulated the same way with its own scheme (:data:`SCHEMES`):
weights in blocks of 32 input features, one symmetric scale each, and at its accuracy level 4 the
activations too (int8, per block, quantized at run time; both schemes match onnxruntime's kernel
to float summation order, tested). Its error has no outlier to find; it is rounding noise of both
signs spread over every layer, so its fallback buys less per layer than int8-dynamic's (0.8B
width, random weights: 15 of 32 layers kept took the parity from 0.058 to 0.025; score rows
probed: keeping the top 1 to 16 never brought the emulated 0.033 under 80% of itself, so none was
kept; README).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import WEIGHT_BLOCK_SIZE
from .policy import MAX_HEAD_ROWS, MIN_QUANT_ELEMENTS, excluded_by_name, layer_key

#: the emulated error a fallback aims at, as a fraction of the parity gate's mean |delta mu|: the
#: emulation leaves out onnxruntime's own rounding, and the gate is judged on other images
TARGET_FRACTION = 0.4
#: at most this share of the candidate layers is kept in float (past it the int8 graph is mostly fp32)
MAX_FRACTION = 0.5
#: when even that misses the target, the fewest layers whose error is within this factor of the
#: best it reached: at 0.8B width the four ``down_proj`` took the emulated error from 0.091 to 0.035,
#: twelve more layers only to 0.027 (the floor of int8 rounding everywhere else)
REACHABLE_SLACK = 1.25


def fake_quant_activation(x: torch.Tensor) -> torch.Tensor:
    """``DynamicQuantizeLinear`` then dequantized: uint8, one scale and zero point for the tensor,
    its range widened to hold 0, round half to even."""
    lo, hi = x.amin().clamp(max=0), x.amax().clamp(min=0)
    scale = ((hi - lo) / 255).clamp_min(1e-30)
    zero = torch.round(-lo / scale).clamp(0, 255)
    return (torch.round(x / scale + zero).clamp(0, 255) - zero) * scale


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 with one scale per output feature (a row of ``nn.Linear.weight``), dequantized."""
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-30)
    return torch.round(w / scale).clamp(-127, 127) * scale


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x``'s last dimension in blocks of ``block`` (the last one zero-padded): [..., blocks, block]."""
    pad = (-x.shape[-1]) % block
    return F.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, block)


def fake_quant_weight_blocks(w: torch.Tensor, bits: int = 8, block: int = WEIGHT_BLOCK_SIZE) -> torch.Tensor:
    """``MatMulNBitsQuantizer``'s symmetric round-to-nearest of ``nn.Linear`` weights, dequantized:
    one scale per ``block`` input features, the block's value of largest magnitude mapped to
    -2^(bits-1) exactly (onnxruntime's signed scale ``vmax / -128`` at 8 bits)."""
    wb = _blocks(w, block)
    vmax = wb.gather(-1, wb.abs().argmax(-1, keepdim=True))
    scale = vmax / -(2 ** (bits - 1))
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(wb / scale).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale
    return q.reshape(*w.shape[:-1], -1)[..., : w.shape[-1]]


def fake_quant_activation_blocks(x: torch.Tensor, block: int = WEIGHT_BLOCK_SIZE) -> torch.Tensor:
    """``MatMulNBits``' activations at accuracy level 4 (int8 arithmetic), dequantized: symmetric
    int8 per ``block`` features, scale ``amax / 127``, rounded half away from zero (MLAS's)."""
    xb = _blocks(x, block)
    scale = xb.abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    v = xb / scale
    q = torch.sign(v) * torch.floor(v.abs() + 0.5) * scale
    return q.reshape(*x.shape[:-1], -1)[..., : x.shape[-1]]


#: mode -> (weight, activation) fake quantization: how each CPU int8 mode is emulated in PyTorch
SCHEMES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "int8-dynamic": (fake_quant_weight, fake_quant_activation),
    "int8-weight": (functools.partial(fake_quant_weight_blocks, bits=8), fake_quant_activation_blocks),
}


def candidate_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The linear layers of the decoder and vision blocks that the int8 CPU modes quantize: the
    policy's name and shape rules, on PyTorch module paths."""
    out = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or layer_key(name) is None or excluded_by_name(name):
            continue
        if mod.weight.numel() < MIN_QUANT_ELEMENTS or mod.weight.shape[0] <= MAX_HEAD_ROWS:
            continue
        out.append((name, mod))
    return out


def scheme(mode: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """``mode``'s (weight, activation) fake quantization; a clear error for a mode not emulated."""
    if mode not in SCHEMES:
        raise ValueError(f"the fallback emulates {sorted(SCHEMES)}, not {mode!r}")
    return SCHEMES[mode]


@contextlib.contextmanager
def fake_quantized(modules: Sequence[nn.Linear], mode: str = "int8-dynamic") -> Iterator[None]:
    """Run ``modules`` as ``mode`` would (:data:`SCHEMES`) while inside: the weight swapped for its
    fake-quantized copy for the call only (one layer's copy in memory at a time), the input
    fake-quantized."""
    fq_weight, fq_act = scheme(mode)
    saved: dict[int, torch.Tensor] = {}

    def before(m, args):
        saved[id(m)] = m.weight.data
        m.weight.data = fq_weight(saved[id(m)])
        return (fq_act(args[0]), *args[1:])

    def after(m, args, out):
        m.weight.data = saved.pop(id(m))

    handles = [h for m in modules for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m in modules:  # a call that raised midway leaves its weight swapped
            if id(m) in saved:
                m.weight.data = saved.pop(id(m))


@dataclass
class FallbackChoice:
    """What :func:`choose_fallback` measured and chose."""

    keep: dict[tuple[str, int, str], str]  # layer_key -> reason (the local error), for select_quantizable_nodes
    ranking: list[tuple[str, float]]  # (module path, local relative output error), most sensitive first
    searched: dict[int, float]  # layers kept in float -> emulated mean |delta mu|
    target: float
    images: int
    mode: str = "int8-dynamic"

    def report(self) -> dict[str, Any]:
        kept = len(self.keep)
        return {
            "method": f"{self.mode} emulated in PyTorch; layers ranked by their own output error",
            "target_mean_abs_dmu": self.target, "images": self.images, "candidates": len(self.ranking),
            "kept": {name: round(err, 5) for name, err in self.ranking[:kept]},
            "emulated_mean_abs_dmu": {str(k): round(v, 5) for k, v in sorted(self.searched.items())},
            "emulated_all_quantized": round(self.searched[0], 5),
            "emulated_chosen": round(self.searched[kept], 5),
            "ranking": [[name, round(err, 5)] for name, err in self.ranking],
        }


def _means(rm: Any, images: Sequence[Any], prompts: Sequence[str], batch: int) -> np.ndarray:
    res = rm.score(images, prompts, batch_size=batch)
    return np.array([[r[d].mean for d in rm.dimensions] for r in res])


def fewest_to_keep(error: Callable[[int], float], target: float, limit: int) -> int:
    """The smallest k in [0, limit] with ``error(k) <= target``, found by doubling k then bisecting
    (about 2 log2(limit) calls of ``error``, which it assumes falls as k grows; where it does not,
    the k found still meets the target), or ``limit`` when none does."""
    if error(0) <= target:
        return 0
    lo, k = 0, 1
    while k < limit and error(k) > target:
        lo, k = k, 2 * k
    hi = min(k, limit)
    if error(hi) > target:
        return limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if error(mid) <= target else (mid, hi)
    return hi


@torch.no_grad()
def choose_fallback(
    rm: Any, images: Sequence[Any], prompts: Sequence[str], target: float,
    max_fraction: float = MAX_FRACTION, batch: int = 8, mode: str = "int8-dynamic",
) -> FallbackChoice:
    """The fewest most-sensitive layers of ``rm`` (a :class:`~zreward_fast.ZRewardModel` in fp32) to
    keep in float for ``mode``'s emulated mean |delta mu| (:data:`SCHEMES`) on ``images`` to reach
    ``target``, among at most ``max_fraction`` of the candidates; where that misses the target, the
    fewest whose error is within :data:`REACHABLE_SLACK` of the best any count searched reached."""
    fq_weight, fq_act = scheme(mode)
    cands = candidate_linears(rm.model)
    ref = _means(rm, images, prompts, batch)
    if not cands:
        return FallbackChoice({}, [], {0: 0.0}, target, len(images), mode)

    errors: dict[str, float] = {}

    def probe(name):
        def hook(m, args, out):
            yq = F.linear(fq_act(args[0]), fq_weight(m.weight), m.bias)
            err = float((yq - out).float().norm() / out.float().norm().clamp_min(1e-30))
            errors[name] = max(errors.get(name, 0.0), err)
        return hook

    handles = [m.register_forward_hook(probe(n)) for n, m in cands]
    try:
        _means(rm, images, prompts, batch)
    finally:
        for h in handles:
            h.remove()
    order = sorted(cands, key=lambda c: -errors.get(c[0], 0.0))
    searched: dict[int, float] = {}

    def emulated(k: int) -> float:
        if k not in searched:
            with fake_quantized([m for _, m in order[k:]], mode):
                searched[k] = float(np.abs(_means(rm, images, prompts, batch) - ref).mean())
        return searched[k]

    limit = max(1, int(max_fraction * len(order)))
    chosen = fewest_to_keep(emulated, target, limit)
    if emulated(chosen) > target:  # unreachable: settle near the best reachable, not at the limit
        emulated(limit)
        # the best of every count tried: keeping more layers does not always help (0.8B width with the
        # MLPs smoothed: 8 kept 0.030, 16 kept 0.034)
        chosen = fewest_to_keep(emulated, REACHABLE_SLACK * min(searched.values()), limit)
    ranking = [(n, errors.get(n, 0.0)) for n, _ in order]
    keep = {layer_key(n): f"{err:.4f}" for n, err in ranking[:chosen]}
    return FallbackChoice(keep, ranking, searched, target, len(images), mode)
