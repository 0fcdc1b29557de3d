"""What the kernel tests share: the bad-input check, the skip for tests that need the compiled
kernels, and the error measure the GPU tolerances are stated in."""
from __future__ import annotations

from types import ModuleType
from typing import Any, Callable

import pytest
import torch


def compiled_triton_or_skip(kernels: ModuleType | None) -> None:
    """Skip unless ``kernels`` (a ``zreward_fast.kernels`` op module) runs compiled: conftest
    defaults TRITON_INTERPRET to 1, and GPU tolerances need the compiled kernels."""
    if kernels is None or kernels.INTERPRET:
        pytest.skip("needs compiled Triton kernels: run with TRITON_INTERPRET=0 (bench/gpu_check.sh does)")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` in the Frobenius norm, in float32."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def assert_rejects(op: Callable, good: dict[str, Any], change: dict[str, Any], exc: type, match: str) -> None:
    """``op`` on the valid arguments ``good`` with ``change`` applied raises ``exc`` matching ``match``."""
    with pytest.raises(exc, match=match):
        op(**{**good, **change})
