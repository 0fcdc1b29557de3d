"""fp8 (e4m3) linear layers for the torch engine: per-output-channel weight scales and per-token
dynamic activation scales.

Why these choices: a weight row's range is fixed, so one scale per output channel, computed once,
costs nothing at run time; activations differ from token to token (image tokens vs text, the query
tokens), so each token (row of the input) gets its own scale from its own ``max |x|``. Per-token
scales also keep the rows of a batch independent: padding rows and padded positions cannot change
a real token's result, which the engine's bucket padding relies on.

Two ways to compute, with the same quantized values:

* CUDA, compute capability 8.9 or newer: ``torch._scaled_mm`` with row-wise scales (fp8 tensor
  cores, bf16 output). **Only runs on a GPU** (checked by the ``gpu``-marked tests).
* CPU (and older GPUs, for tests only): an exact emulation. Activations and weights are quantized
  to ``float8_e4m3fn`` with the same scales, dequantized, and multiplied in fp32. This is what the
  CPU tests check; it is slow and exists so the quantization logic is testable without a GPU.

What stays in high precision (see :func:`quantize_linears`): norms, the Gated DeltaNet gates
(``in_proj_a``/``in_proj_b``, ``A_log``, ``dt_bias``) and its ``out_proj`` (its input is SiLU-gated
and RMS-normalised per head, with outliers that e4m3's 3 mantissa bits handle badly), the causal
conv, the patch embedding, the vision patch merger (the bridge into the text model's space), the
embeddings and the score head.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FP8_MAX", "Fp8Linear", "QuantizeReport", "QUANTIZED_LINEARS", "quantize_linears", "quantize_rows", "scaled_mm_supported"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
_MIN_SCALE = 1e-12  # an all-zero row gets this scale (its values quantize to 0 either way)

#: Leaf names of the linear layers that are quantized: text attention, the Gated DeltaNet input
#: projections, the text MLP, and the vision blocks' attention and MLP.
QUANTIZED_LINEARS: frozenset[str] = frozenset({
    "q_proj", "k_proj", "v_proj", "o_proj",  # full attention
    "in_proj_qkv", "in_proj_z",  # Gated DeltaNet inputs (not in_proj_a / in_proj_b: the gates)
    "gate_proj", "up_proj", "down_proj",  # text MLP
    "qkv", "proj", "linear_fc1", "linear_fc2",  # vision blocks (attn.qkv, attn.proj, mlp.fc1/fc2)
})
#: Path components under which nothing is quantized.
_KEEP_UNDER = ("merger", "patch_embed", "lm_head", "embed_tokens")


def scaled_mm_supported(device: torch.device | str) -> bool:
    """Whether ``torch._scaled_mm`` with fp8 e4m3 inputs and row-wise scales can run on ``device``
    (CUDA sm_89+, torch 2.5+)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return _cuda_scaled_mm_supported(device.index if device.index is not None else -1)


@functools.lru_cache(maxsize=None)
def _cuda_scaled_mm_supported(index: int) -> bool:
    if not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 5):
        return False  # row-wise scales came with torch 2.5
    dev = torch.device("cuda", torch.cuda.current_device() if index < 0 else index)
    return torch.cuda.get_device_capability(dev) >= (8, 9)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row e4m3 quantization of ``x [M, N]``: ``(q [M, N] e4m3, scale [M, 1] fp32)``
    with ``x ~= q * scale`` and ``scale = max_j |x[i, j]| / 448``."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(_MIN_SCALE)
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


class Fp8Linear(nn.Module):
    """A linear layer with e4m3 weights (one scale per output channel) and per-token activation
    scales computed at run time.

    ``emulate=None`` picks ``torch._scaled_mm`` on CUDA sm_89+ and the exact fp32 emulation
    elsewhere; ``emulate=True`` forces the emulation (the reference the GPU tests compare with).
    The output has the input's dtype; the bias (if any) is added in that dtype.
    """

    def __init__(
        self,
        weight_fp8: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        emulate: bool | None = None,
    ) -> None:
        super().__init__()
        if weight_fp8.dtype != FP8_DTYPE or weight_fp8.dim() != 2:
            raise ValueError(f"weight_fp8 must be a 2-D {FP8_DTYPE} tensor, got {weight_fp8.dtype} {tuple(weight_fp8.shape)}")
        if weight_scale.shape != (weight_fp8.shape[0],):
            raise ValueError(f"weight_scale must be [out_features] = [{weight_fp8.shape[0]}], got {tuple(weight_scale.shape)}")
        self.out_features, self.in_features = weight_fp8.shape
        self.register_buffer("weight", weight_fp8.contiguous())
        self.register_buffer("weight_scale", weight_scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.emulate = emulate

    @classmethod
    def from_linear(cls, linear: nn.Linear, emulate: bool | None = None) -> "Fp8Linear":
        """Quantize an ``nn.Linear``'s weight per output channel (its bias keeps its dtype)."""
        with torch.no_grad():
            q, scale = quantize_rows(linear.weight.detach())
        return cls(q, scale.squeeze(1), linear.bias, emulate=emulate)

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight the fp8 one stands for: ``weight * weight_scale`` per row."""
        return self.weight.float() * self.weight_scale[:, None]

    def _use_scaled_mm(self, x: torch.Tensor) -> bool:
        if self.emulate is not None:
            return not self.emulate
        return scaled_mm_supported(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Fp8Linear expects {self.in_features} input features, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        xq, xs = quantize_rows(x2)
        if self._use_scaled_mm(x):
            m = xq.shape[0]
            pad = (-m) % 16  # fp8 GEMMs want every side a multiple of 16
            if pad:
                xq = torch.cat([xq, xq.new_zeros(pad, xq.shape[1])])
                xs = torch.cat([xs, xs.new_ones(pad, 1)])
            out = torch._scaled_mm(
                xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale.view(1, -1), out_dtype=torch.bfloat16
            )
            out = (out[0] if isinstance(out, tuple) else out)[:m].to(x.dtype)
        else:
            out = ((xq.float() * xs) @ self.dequantized_weight().T).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*lead, self.out_features)

    def _apply(self, fn: Callable, recurse: bool = True) -> "Fp8Linear":
        # Module.to(dtype) / .half() would cast the fp8 weight (and round its fp32 scales): follow
        # device moves only, keeping every dtype.
        device = fn(torch.empty(0, device=self.weight.device)).device
        for name, t in list(self._buffers.items()):
            if t is not None:
                self._buffers[name] = t.to(device)
        return self

    def extra_repr(self) -> str:
        mode = {None: "auto", True: "emulated", False: "scaled_mm"}[self.emulate]
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {mode}"


@dataclass
class QuantizeReport:
    """What :func:`quantize_linears` did: the layers now in fp8, and the candidates it kept in
    high precision with the reason (shape, or an outlier ratio from calibration)."""

    quantized: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    outlier_ratios: dict[str, float] = field(default_factory=dict)


def _candidates(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    out = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear:  # exact type: subclasses may carry extra semantics
            continue
        parts = name.split(".")
        if parts[-1] not in QUANTIZED_LINEARS or any(p in _KEEP_UNDER for p in parts[:-1]):
            continue
        out.append((name, mod))
    return out


@torch.no_grad()
def quantize_linears(
    model: nn.Module,
    calibration: Callable[[nn.Module], Any] | None = None,
    max_outlier_ratio: float = 200.0,
    emulate: bool | None = None,
) -> QuantizeReport:
    """Replace the large linear layers of a Qwen3.5 student by :class:`Fp8Linear`, in place.

    Quantized: attention ``q/k/v/o_proj``, Gated DeltaNet ``in_proj_qkv``/``in_proj_z``, MLP
    ``gate/up/down_proj`` and the vision blocks' ``qkv``/``proj``/``linear_fc1``/``linear_fc2``.
    Everything else stays as it is (see the module docstring for why). A layer whose sides are not
    multiples of 16 (what fp8 GEMMs need) is kept too.

    ``calibration``, if given, is called once with ``model`` (e.g. ``lambda m: rm.score(images,
    prompts)``) while hooks record, for each candidate layer, the worst per-token ratio
    ``max |x| / rms(x)`` of its input. A per-token scale maps the token's largest value to 448, so a
    token whose typical values sit ``ratio`` times lower keeps fewer effective bits; layers above
    ``max_outlier_ratio`` stay in high precision. Without calibration no data is needed: the
    activation scales are computed per token at run time.
    """
    if not math.isfinite(max_outlier_ratio) or max_outlier_ratio <= 1:
        raise ValueError(f"max_outlier_ratio must be a finite number > 1, got {max_outlier_ratio}")
    report = QuantizeReport()
    cands = _candidates(model)
    if calibration is not None:
        ratios: dict[str, float] = {}

        def hook(name: str):
            def fn(_mod: nn.Module, args: tuple) -> None:
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                rms = x.square().mean(-1).sqrt().clamp_min(1e-12)
                r = float((x.abs().amax(-1) / rms).max()) if x.numel() else 0.0
                ratios[name] = max(ratios.get(name, 0.0), r)
            return fn

        handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in cands]
        try:
            calibration(model)
        finally:
            for h in handles:
                h.remove()
        report.outlier_ratios = ratios
    for name, mod in cands:
        if mod.in_features % 16 or mod.out_features % 16:
            report.kept[name] = f"shape {mod.out_features}x{mod.in_features} is not a multiple of 16"
            continue
        r = report.outlier_ratios.get(name)
        if r is not None and r > max_outlier_ratio:
            report.kept[name] = f"input outlier ratio {r:.0f} > {max_outlier_ratio:g}"
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], Fp8Linear.from_linear(mod, emulate=emulate))
        report.quantized.append(name)
    return report


def fp8_linear_reference(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """What an :class:`Fp8Linear` made from ``linear`` computes, written out (for tests)."""
    xq, xs = quantize_rows(x.reshape(-1, x.shape[-1]))
    wq, ws = quantize_rows(linear.weight.detach())
    out = F.linear(xq.float() * xs, wq.float() * ws, None if linear.bias is None else linear.bias.float())
    return out.reshape(*x.shape[:-1], -1)
