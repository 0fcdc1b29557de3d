"""What every kernel module shares: the interpreter switch and its casts, the dot precision, block
sizes and the GPU's SM count."""
from __future__ import annotations

import functools
import os

import torch
import triton

# triton.jit picks the interpreter at decoration time, i.e. when a kernel module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def interp_cast(t: torch.Tensor | None) -> torch.Tensor | None:
    """The interpreter cannot do bf16/fp16 arithmetic: it gets fp32 copies (CPU tests only)."""
    if INTERPRET and t is not None and t.dtype != torch.float32:
        return t.float()
    return t


def dot_precision(*tensors: torch.Tensor | None) -> str:
    """fp32 inputs keep full fp32 products; bf16/fp16 values are exact in tf32, so tensor cores give
    the same products with fp32 accumulation."""
    return "ieee" if any(t is not None and t.dtype == torch.float32 for t in tensors) else "tf32"


def block_k(k: int) -> int:
    """The K (score levels) tile: tl.dot needs every side >= 16; the softmax masks the padding."""
    return max(16, triton.next_power_of_2(k))


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
