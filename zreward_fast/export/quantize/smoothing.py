"""SmoothQuant-style scaling before int8: activation outliers moved into the weights.

``int8-dynamic`` gives each activation tensor one scale, so a few large channels take most of its
256 steps. The layers it hurts most read ``silu(gate) * up`` (the MLP's ``down_proj``: README,
"Quantization at real width"). That product is linear in ``up``, so each of its channels ``j`` can
be divided by ``s_j`` (``up_proj``'s row ``j`` divided by it) and ``down_proj``'s column ``j``
multiplied by it without changing the layer (Xiao et al., SmoothQuant, 2023):
``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)``, from the largest activations seen on calibration
images, with alpha 0.5.

The decoder's norms can get the same treatment (``norms=True``; SmoothQuant's own case: the few
hidden channels real checkpoints carry at tens of times the rest): ``input_layernorm``'s gain
divided by ``s``, the columns of the layers reading it (q/k/v, or the Gated DeltaNet's input
projections) multiplied by it; ``post_attention_layernorm`` and the MLP's gate and up projections
likewise. The export does not (yet): see :func:`smoothing_scales`.

Here each ``s_j`` is rounded to a power of two: scaling by one is exact in floating point, so the
float model computes bit-identical outputs while smoothed and gets its weights back bit-exactly
afterwards (:func:`smoothed`): the export smooths the caller's model in place, for the export only.
A Qwen3.5 norm's gain is ``1 + weight``, so a smoothed norm's weight is rounded once (outputs
move by fp32 rounding) and restored from a copy (one vector a norm).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn

#: SmoothQuant's migration strength: how much of an outlier's range moves into the weights
ALPHA = 0.5
#: scales stay within 2^-MAX_LOG2 .. 2^MAX_LOG2 (fp32 weights stay far from overflow and subnormals)
MAX_LOG2 = 16


def gated_mlps(model: nn.Module) -> list[tuple[str, nn.Linear, nn.Linear]]:
    """``(path, up_proj, down_proj)`` of every gated MLP (``down(act(gate(x)) * up(x))``) in ``model``."""
    out = []
    for name, mod in model.named_modules():
        parts = [getattr(mod, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
        if all(type(p) is nn.Linear for p in parts):
            _, up, down = parts
            if up.weight.shape[0] == down.weight.shape[1]:
                out.append((name, up, down))
    return out


#: the norms whose gain is ``1 + weight`` (Qwen3.5's zero-centred RMSNorm): the ones smoothed
GAIN_OFFSET_NORMS = ("Qwen3_5RMSNorm",)
#: the linear layers that read a decoder layer's input norm: full attention's, or Gated DeltaNet's
_INPUT_NORM_READERS = ("q_proj", "k_proj", "v_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")


def norm_readers(model: nn.Module) -> list[tuple[str, nn.Module, list[nn.Linear]]]:
    """``(path, norm, the linear layers reading its output)`` of each decoder layer's two norms."""
    out = []
    for name, mod in model.named_modules():
        mixer = getattr(mod, "self_attn", None)
        mixer = mixer if mixer is not None else getattr(mod, "linear_attn", None)
        mlp = getattr(mod, "mlp", None)
        norms = [getattr(mod, n, None) for n in ("input_layernorm", "post_attention_layernorm")]
        if mixer is None or mlp is None or any(type(n).__name__ not in GAIN_OFFSET_NORMS for n in norms):
            continue
        first = [m for m in (getattr(mixer, p, None) for p in _INPUT_NORM_READERS) if type(m) is nn.Linear]
        out += [(f"{name}.input_layernorm", norms[0], first),
                (f"{name}.post_attention_layernorm", norms[1], [mlp.gate_proj, mlp.up_proj])]
    return out


def _power_of_two_scales(amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``2^round(log2(amax^alpha / w_amax^(1 - alpha)))`` per channel; 1 where either is 0."""
    raw = amax.clamp_min(1e-12) ** alpha / w_amax.clamp_min(1e-12) ** (1 - alpha)
    log2 = torch.round(torch.log2(raw)).clamp(-MAX_LOG2, MAX_LOG2)
    log2[(amax == 0) | (w_amax == 0)] = 0  # a channel never seen, or unused: leave it alone
    return torch.exp2(log2)


@dataclass
class Smoothing:
    """Per-channel power-of-two scales of each MLP's ``down_proj`` input, and what they came from."""

    scales: dict[str, torch.Tensor]  # MLP path -> s [intermediate], powers of two
    alpha: float
    images: int
    norm_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # norm path -> s [hidden]

    def report(self) -> dict[str, Any]:
        log2 = [s.log2() for s in (*self.scales.values(), *self.norm_scales.values())]
        return {"method": "SmoothQuant, s a power of two: MLPs (up_proj rows / s, down_proj columns * s) and "
                          "decoder norms (gain / s, the columns of the layers reading them * s)",
                "alpha": self.alpha, "images": self.images, "mlps": len(self.scales), "norms": len(self.norm_scales),
                "log2_scale_range": [int(min(t.min() for t in log2)), int(max(t.max() for t in log2))] if log2 else []}


@torch.no_grad()
def smoothing_scales(rm: Any, images: Sequence[Any], prompts: Sequence[str], alpha: float = ALPHA,
                     batch: int = 4, norms: bool = False) -> Smoothing:
    """Scales for every gated MLP of ``rm`` (a ``ZRewardModel``) and, with ``norms``, every decoder
    norm, from the largest |activation| of each channel they scale while scoring ``images``.

    ``norms`` is off by default (the export's setting): on the tiny test student it lowered the
    emulated error of the layers reading the norms (0.046 -> 0.025 with outlier hidden channels) but
    raised the whole model's (0.032 -> 0.042; with an MLP outlier, 0.009 -> 0.028): their weights'
    columns grow, and int8's one scale per weight row then loses resolution on every row."""
    mlps = gated_mlps(rm.model)
    readers = norm_readers(rm.model) if norms else []
    amax: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        x = x.detach().float().abs().reshape(-1, x.shape[-1]).amax(0).cpu()
        amax[name] = x if name not in amax else torch.maximum(amax[name], x)

    handles = [down.register_forward_pre_hook(lambda m, args, name=name: record(name, args[0]))
               for name, _, down in mlps]
    handles += [norm.register_forward_hook(lambda m, args, out, name=name: record(name, out))
                for name, norm, _ in readers]
    try:
        rm.score(list(images), list(prompts), batch_size=batch)
    finally:
        for h in handles:
            h.remove()
    zeros = lambda n: torch.zeros(n)  # noqa: E731 - a module the images never reached
    scales = {name: _power_of_two_scales(amax.get(name, zeros(down.weight.shape[1])),
                                         down.weight.detach().float().abs().amax(0).cpu(), alpha)
              for name, _, down in mlps}
    norm_scales = {name: _power_of_two_scales(amax.get(name, zeros(norm.weight.shape[0])),
                                              torch.cat([m.weight.detach().float() for m in lin]).abs().amax(0).cpu(),
                                              alpha)
                   for name, norm, lin in readers}
    return Smoothing(scales, alpha, len(images), norm_scales)


@contextlib.contextmanager
def smoothed(model: nn.Module, smoothing: Smoothing | None) -> Iterator[None]:
    """Inside: each MLP's ``up_proj`` rows divided by its scales and ``down_proj`` columns multiplied
    by them, each norm's gain divided by its scales and its readers' columns multiplied by them, in
    place; on exit the weights are exactly what they were. None: no-op."""
    if smoothing is None:
        yield
        return
    mlps = {name: (up, down) for name, up, down in gated_mlps(model)}
    readers = {name: (norm, lin) for name, norm, lin in norm_readers(model)}
    undo: list = []

    def scale_columns(linears: Sequence[nn.Linear], s: torch.Tensor) -> None:
        for m in linears:
            m.weight.data.mul_(s.to(m.weight)[None, :])

    def scale_mlp(name: str, power: int) -> None:
        up, down = mlps[name]
        s = smoothing.scales[name].to(up.weight.device) ** power
        up.weight.data.div_(s.to(up.weight)[:, None])
        if up.bias is not None:
            up.bias.data.div_(s.to(up.bias))
        scale_columns([down], s)

    def unscale_norm(name: str, weight: torch.Tensor) -> None:
        norm, lin = readers[name]
        norm.weight.data.copy_(weight)
        scale_columns(lin, 1.0 / smoothing.norm_scales[name].to(norm.weight.device))

    try:
        for name in smoothing.scales:
            scale_mlp(name, 1)
            undo.append(lambda name=name: scale_mlp(name, -1))
        for name, s in smoothing.norm_scales.items():
            norm, lin = readers[name]
            saved = norm.weight.data.clone()
            s = s.to(norm.weight.device)
            norm.weight.data.copy_(((1.0 + norm.weight.data.float()) / s - 1.0).to(norm.weight))
            scale_columns(lin, s)
            undo.append(lambda name=name, saved=saved: unscale_norm(name, saved))
        yield
    finally:
        for step in reversed(undo):
            step()
