"""What the kernel tests share: the bad-input check, the skip for tests that need the compiled
kernels, the error measure the GPU tolerances are stated in, and the element-wise comparison."""
from __future__ import annotations

from types import ModuleType
from typing import Any, Callable, Sequence

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


def assert_all_close(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], atol: float, rtol: float = 0.0,
                     dtype: torch.dtype | None = None, names: Sequence[str] | None = None) -> None:
    """Each tensor of ``got`` has its twin's shape (and ``dtype`` when given), is finite (an unwritten
    output fails) and lies within ``atol + rtol * |want|`` of it, compared in fp32."""
    assert len(got) == len(want), (len(got), len(want))
    for i, (a, b) in enumerate(zip(got, want)):
        name = names[i] if names else f"[{i}]"
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert dtype is None or a.dtype == dtype, (name, a.dtype)
        assert torch.isfinite(a).all(), f"{name} has unwritten/non-finite entries"
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def assert_grad_only_on_rows(grad_weight: torch.Tensor, grad_bias: torch.Tensor, ids: torch.Tensor) -> None:
    """The LM head's weight and bias gradients are exactly zero outside the rows ``ids`` and not
    zero on them (the fused ops touch only the score rows)."""
    other = torch.ones(grad_weight.shape[0], dtype=torch.bool)
    other[ids] = False
    assert torch.equal(grad_weight[other], torch.zeros_like(grad_weight[other]))
    assert torch.equal(grad_bias[other], torch.zeros_like(grad_bias[other]))
    assert (grad_weight[ids].abs().sum(1) > 0).all() and (grad_bias[ids] != 0).all()


def triton_path(op: Callable) -> Callable:
    """``op`` (a public kernel op) on its Triton path without validation, ``cfg`` its launch config:
    what the kernel tests compare with the reference. Fails unless the Triton kernels serve the first
    argument's device, so that a test never compares the reference with itself."""

    def run(*args: Any, cfg: Any = None, **kwargs: Any) -> Any:
        import zreward_fast.kernels as zk

        assert zk.use_triton(args[0].device), f"the Triton kernels do not serve {args[0].device}"
        return op(*args, validate=False, launch_config=cfg, **kwargs)

    return run
