"""The Qwen3.5 math of `zreward_fast.models`: the chunked gated delta rule against its step-by-step
definition, and the layering (the engine builds on `models`, not on `export`)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from zreward_fast.models.gated_deltanet import chunk_gated_delta_rule, gdn_gates, naive_gated_delta_rule


def _inputs(length: int, hk: int = 2, hv: int = 4, dk: int = 8, dv: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, length, hk, dk, generator=g) for _ in range(2))
    v = torch.randn(2, length, hv, dv, generator=g)
    a, b = torch.randn(2, length, hv, generator=g), torch.randn(2, length, hv, generator=g)
    decay, beta = gdn_gates(a, b, torch.randn(hv, generator=g) * 0.5, torch.randn(hv, generator=g))
    return q, k, v, decay, beta


@pytest.mark.parametrize("length", [1, 16, 37])  # one step, one whole chunk, a ragged third chunk
@pytest.mark.parametrize("qk_l2norm", [True, False])
def test_chunked_rule_equals_the_recurrence(length, qk_l2norm):
    q, k, v, decay, beta = _inputs(length)
    if not qk_l2norm:  # unnormalised keys make the state grow: keep the update stable
        q, k = q * 0.3, k * 0.3
    want = naive_gated_delta_rule(q, k, v, decay, beta, qk_l2norm=qk_l2norm)
    got = chunk_gated_delta_rule(q, k, v, decay, beta, qk_l2norm=qk_l2norm)
    assert got.shape == (2, length, 4, 6)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_recurrence_by_hand_for_one_head():
    """Two steps of S_t = e^g S + beta k (v - e^g S^T k)^T, o_t = S_t^T q_t / sqrt(dk), by hand."""
    q = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # [B=1, L=2, H=1, dk=2]
    k = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]]])
    v = torch.tensor([[[[2.0]], [[4.0]]]])  # dv = 1
    g = torch.log(torch.tensor([[[0.5], [0.5]]]))
    beta = torch.tensor([[[1.0], [0.5]]])
    # t=0: S = 0.5*0 + 1*[1,0]^T (2 - 0) -> S = [[2],[0]]; o = S^T q / sqrt(2) = 2/sqrt(2)
    # t=1: S' = 0.5 S = [[1],[0]]; error = 4 - 1 = 3; S = [[1 + 0.5*3],[0]] = [[2.5],[0]]; o = S^T [0,1] = 0
    out = naive_gated_delta_rule(q, k, v, g, beta, qk_l2norm=False)
    torch.testing.assert_close(out.flatten(), torch.tensor([2.0 / 2**0.5, 0.0]))
    torch.testing.assert_close(chunk_gated_delta_rule(q, k, v, g, beta, qk_l2norm=False).flatten(), out.flatten())


def test_the_engine_imports_nothing_from_export():
    code = ("import sys, zreward_fast.engine.torch_engine; "
            "bad = sorted(m for m in sys.modules if m.startswith('zreward_fast.export')); print(bad); assert not bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
