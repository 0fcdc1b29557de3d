"""Boundary validation shared by the kernel dispatchers.

Kernels index memory with the values they are given (token ids gather rows of the LM head), so
bad input must be rejected here, with a message naming the argument and what was seen, rather
than producing garbage or an illegal memory access inside a kernel.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float_tensor(name: str, t: object, ndim: int) -> torch.Tensor:
    """A tensor of one of the supported floating dtypes, with `ndim` dimensions."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def check_temperature(temperature: object) -> float:
    if isinstance(temperature, torch.Tensor) and temperature.numel() == 1:
        temperature = temperature.item()  # a 0-d tensor is a common way to pass a scalar
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    t = float(temperature)
    if not math.isfinite(t) or t <= 0.0:
        raise ValueError(f"temperature must be a finite number > 0, got {t}")
    return t


def as_levels(levels: object, k: int, device: torch.device) -> torch.Tensor:
    """Levels as a contiguous fp32 [K] tensor on `device` (values checked by `check_values`)."""
    if isinstance(levels, torch.Tensor):
        if not levels.is_floating_point():
            raise TypeError(f"levels must be a floating-point tensor, got {levels.dtype}")
        lv = levels.detach()
    elif isinstance(levels, Sequence) and not isinstance(levels, (str, bytes)):
        try:
            lv = torch.tensor([float(x) for x in levels], dtype=torch.float32)
        except (TypeError, ValueError) as e:
            raise TypeError(f"levels must be a sequence of numbers: {e}") from None
    else:
        raise TypeError(f"levels must be a tensor or a sequence of floats, got {type(levels).__name__}")
    if lv.dim() != 1 or lv.shape[0] != k:
        raise ValueError(f"levels must be 1-D of length K={k} (one per score token), got shape {tuple(lv.shape)}")
    return lv.to(device=device, dtype=torch.float32).contiguous()


def check_token_ids(token_ids: object, device: torch.device) -> torch.Tensor:
    """K >= 2 integer ids on `device` (values checked by `check_values`)."""
    if not isinstance(token_ids, torch.Tensor):
        raise TypeError(f"token_ids must be a torch.Tensor, got {type(token_ids).__name__}")
    if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
        raise TypeError(f"token_ids must have an integer dtype, got {token_ids.dtype}")
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D [K], got shape {tuple(token_ids.shape)}")
    k = token_ids.shape[0]
    if k < 2:
        raise ValueError(f"token_ids must hold K >= 2 score tokens, got K={k}")
    if token_ids.device != device:
        raise ValueError(f"token_ids is on {token_ids.device} but hidden is on {device}")
    return token_ids


def check_values(token_ids: torch.Tensor, vocab: int, levels: torch.Tensor) -> None:
    """Value checks of ids (in range, unique) and levels (finite, increasing): one host sync."""
    ids = token_ids.detach().long()
    srt = ids.sort().values
    flags = torch.stack([
        srt[0], srt[-1], (srt[1:] == srt[:-1]).any().long(),
        torch.isfinite(levels).all().long(), (levels[1:] > levels[:-1]).all().long(),
    ])
    lo, hi, dup, finite, increasing = flags.tolist()
    # A kernel would read outside the LM head otherwise.
    if lo < 0 or hi >= vocab:
        raise ValueError(f"token_ids must be in [0, V={vocab}), got min {lo} and max {hi}: {ids.tolist()}")
    if dup:
        raise ValueError(f"token_ids must not contain duplicate score tokens, got {ids.tolist()}")
    if not finite:
        raise ValueError(f"levels must be finite, got {levels.tolist()}")
    if not increasing:
        raise ValueError(f"levels must be strictly increasing, got {levels.tolist()}")


def validate_score_head(
    hidden: object,
    weight: object,
    token_ids: object,
    levels: object,
    bias: object,
    temperature: object,
) -> tuple[torch.Tensor, float]:
    """Check every argument of `score_head`; returns (levels as fp32 on device, temperature)."""
    hidden = check_float_tensor("hidden", hidden, 2)
    weight = check_float_tensor("weight", weight, 2)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"hidden [N, H] and weight [V, H] must share H, got hidden {tuple(hidden.shape)} "
            f"and weight {tuple(weight.shape)}"
        )
    device = hidden.device
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {device}")
    if bias is not None:
        bias = check_float_tensor("bias", bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"bias must be [V] = [{weight.shape[0]}] like weight's rows, got {tuple(bias.shape)}"
            )
        if bias.device != device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {device}")
    t = check_temperature(temperature)
    ids = check_token_ids(token_ids, device)
    lv = as_levels(levels, ids.shape[0], device)
    check_values(ids, weight.shape[0], lv)
    return lv, t
