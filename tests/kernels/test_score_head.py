"""Fused score-token head: Triton (interpreter on CPU) vs the torch reference, and validation."""
from __future__ import annotations

import math

import pytest
import torch

import zreward_fast.kernels as zk
from kernel_checks import (
    assert_all_close, assert_grad_only_on_rows, assert_rejects, compiled_triton_or_skip, rel_err, triton_path,
)
from zreward_fast import reference
from zreward_fast.kernels.fused_score_head import ScoreHeadFunction
from zreward_fast.kernels.score_rows import ScoreRowsLaunchConfig

FIELDS = ("logits", "log_probs", "probs", "mean", "var", "entropy")
# Small blocks: several programs along N and H (and two weight-grad splits) at test shapes.
SMALL = ScoreRowsLaunchConfig(block_n=16, block_h=32, dw_block_n=16, dw_block_h=32, n_split=2)
score_head_triton = triton_path(zk.score_head)


def make_inputs(n, h, v, k, *, bias=True, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    # LM-head-like scale: logits O(1), so distributions are neither flat nor one-hot.
    weight = torch.randn(v, h, generator=g) * (1.5 / math.sqrt(h))
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    ids = torch.randperm(v, generator=g)[:k]
    levels = torch.linspace(0.0, 4.0, k)
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return to(hidden), to(weight), ids.to(device), levels.to(device), to(b)


def upstream_grads(out, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g).to(o.device) for o in out]


def run(fn, hidden, weight, ids, levels, bias, temperature, grads, **kw):
    out = fn(hidden, weight, ids, levels, bias, temperature, **kw)
    loss = sum((o * g).sum() for o, g in zip(out, grads))
    params = [t for t in (hidden, weight, bias) if t is not None]
    return out, torch.autograd.grad(loss, params)


def check(fn, hidden, weight, ids, levels, bias, temperature=0.7, ref_inputs=None, grad_dtype=None, grad_tol=1e-4,
          **kw):
    """``fn`` against the reference (on ``ref_inputs`` if given: the same values, other layout):
    fp32 outputs within 1e-5, gradients within ``grad_tol`` (relative too for 16-bit inputs)."""
    ref_args = ref_inputs or (hidden, weight, ids, levels, bias)
    grads = upstream_grads(reference.score_head(*ref_args, temperature))
    out_ref, g_ref = run(reference.score_head, *ref_args, temperature, grads)
    out, g = run(fn, hidden, weight, ids, levels, bias, temperature, grads, **kw)
    assert_all_close(out, out_ref, 1e-5, dtype=torch.float32, names=FIELDS)
    assert_all_close(g, g_ref, grad_tol, rtol=grad_tol if grad_dtype else 0.0, dtype=grad_dtype or hidden.dtype,
                     names=("grad hidden", "grad weight", "grad bias"))


@pytest.mark.parametrize("shape", [(64, 256, 1000, 9), (37, 96, 301, 9)], ids=["realistic", "odd"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("cfg", [None, SMALL], ids=["default_cfg", "small_blocks"])
def test_triton_matches_reference(shape, with_bias, temperature, cfg):
    check(score_head_triton, *make_inputs(*shape, bias=with_bias), temperature, cfg=cfg)


def test_grad_rows_outside_score_tokens_are_exactly_zero():
    hidden, weight, ids, levels, bias = make_inputs(37, 96, 301, 9)
    out = score_head_triton(hidden, weight, ids, levels, bias, 0.7, cfg=SMALL)
    loss = sum((o * g).sum() for o, g in zip(out, upstream_grads(out)))
    assert_grad_only_on_rows(*torch.autograd.grad(loss, (weight, bias)), ids)


@pytest.mark.parametrize("n, k", [(37, 2), (37, 5), (37, 17), (1, 9), (5, 3)])  # BLOCK_K 16/16/32; one row block
def test_other_k_and_tiny_n(n, k):
    check(score_head_triton, *make_inputs(n, 96, 301, k), cfg=SMALL)


@pytest.mark.parametrize("used", ["mean", "var", "entropy", "probs", "log_probs", "logits"])
def test_single_output_grad(used):
    # Only one output feeds the loss: the others' grads reach backward as None.
    hidden, weight, ids, levels, bias = make_inputs(37, 96, 301, 9)
    (g_ref,), (g_tri,) = [
        torch.autograd.grad(getattr(fn(hidden, weight, ids, levels, bias, 0.7), used).square().sum(), (hidden,))
        for fn in (reference.score_head, lambda *a: score_head_triton(*a, cfg=SMALL))
    ]
    torch.testing.assert_close(g_tri, g_ref, atol=1e-4, rtol=0)


def test_properties():
    hidden, weight, ids, levels, bias = make_inputs(64, 256, 1000, 9)
    out = score_head_triton(hidden, weight, ids, levels, bias, 0.7)
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(64), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.log_probs.exp(), out.probs, atol=1e-6, rtol=0)
    assert (out.mean >= levels[0]).all() and (out.mean <= levels[-1]).all()
    assert (out.var >= 0).all() and (out.var <= (levels[-1] - levels[0]) ** 2 / 4 + 1e-6).all()
    assert (out.entropy >= -1e-6).all() and (out.entropy <= math.log(9) + 1e-6).all()


def test_public_score_head_dispatches_to_triton_under_interpreter(monkeypatch):
    assert zk.use_triton("cpu") and zk.use_triton(torch.device("cpu"))
    calls = []
    real = ScoreHeadFunction.apply
    monkeypatch.setattr(ScoreHeadFunction, "apply", lambda *a: calls.append(1) or real(*a))
    hidden, weight, ids, levels, bias = make_inputs(37, 96, 301, 9)
    out = zk.score_head(hidden, weight, ids, levels.tolist(), bias, 0.7)  # levels as floats
    assert calls == [1]
    assert isinstance(out, zk.ScoreHeadOutput) and out._fields == FIELDS
    assert_all_close(out, reference.score_head(hidden, weight, ids, levels, bias, 0.7), 1e-5, names=FIELDS)


def test_validate_false_skips_the_checks_and_launch_config_reaches_the_kernel(monkeypatch):
    hidden, weight, ids, levels, bias = make_inputs(37, 96, 301, 9)
    want = zk.score_head(hidden, weight, ids, levels, bias, 0.7)
    monkeypatch.setattr(zk, "validate_score_head", lambda *a: pytest.fail("validated"))
    seen, real = [], ScoreHeadFunction.apply
    monkeypatch.setattr(ScoreHeadFunction, "apply", lambda *a: seen.append(a[-1]) or real(*a))
    got = zk.score_head(hidden, weight, ids, levels, bias, 0.7, validate=False, launch_config=SMALL)
    assert seen == [SMALL]
    assert_all_close(got, want, 1e-5, names=FIELDS)
    with pytest.raises(pytest.fail.Exception, match="validated"):
        zk.score_head(hidden, weight, ids, levels, bias, 0.7)


def test_public_score_head_uses_reference_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not zk.use_triton("cpu")
    monkeypatch.setattr(ScoreHeadFunction, "apply", lambda *a: pytest.fail("Triton used"))
    hidden, weight, ids, levels, bias = make_inputs(8, 32, 50, 9)
    out = zk.score_head(hidden, weight, ids, levels, bias)
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(8))


def test_bf16_reference_path_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden, weight, ids, levels, bias = make_inputs(37, 96, 301, 9, dtype=torch.bfloat16)
    out = zk.score_head(hidden, weight, ids, levels, bias, 0.7)
    assert all(o.dtype == torch.float32 for o in out)
    loss = sum((o * g).sum() for o, g in zip(out, upstream_grads(out)))
    gh, gw, gb = torch.autograd.grad(loss, (hidden, weight, bias))
    assert gh.dtype == gw.dtype == gb.dtype == torch.bfloat16
    assert all(torch.isfinite(t).all() for t in (*out, gh, gw, gb))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_through_interpreter(dtype):
    # The interpreter path upcasts 16-bit inputs to fp32; grads come back in the input dtype.
    check(zk.score_head, *make_inputs(37, 96, 301, 9, dtype=dtype), grad_dtype=dtype, grad_tol=1e-2)


def test_non_contiguous_inputs():
    hidden, weight, ids, levels, bias = make_inputs(37, 96, 301, 9)
    h_nc = torch.stack([hidden.detach()] * 2, -1).flatten(1)[:, ::2].requires_grad_()  # stride (192, 2)
    w_nc = weight.detach().T.contiguous().T.requires_grad_()  # stride (1, V): column-major head
    assert h_nc.stride() == (192, 2) and w_nc.stride() == (1, 301) and torch.equal(h_nc, hidden)
    check(score_head_triton, h_nc, w_nc, ids, levels, bias, ref_inputs=(hidden, weight, ids, levels, bias), cfg=SMALL)


def test_empty_batch():
    hidden, weight, ids, levels, bias = make_inputs(0, 32, 50, 9)
    out = zk.score_head(hidden, weight, ids, levels, bias)
    assert [tuple(o.shape) for o in out] == [(0, 9)] * 3 + [(0,)] * 3
    loss = sum(o.sum() for o in out)
    gh, gw, gb = torch.autograd.grad(loss, (hidden, weight, bias))
    assert gh.shape == (0, 32) and not gw.any() and not gb.any()


def test_backward_is_deterministic():
    hidden, weight, ids, levels, bias = make_inputs(64, 256, 1000, 9)
    grads = upstream_grads(reference.score_head(hidden, weight, ids, levels, bias))
    _, g1 = run(score_head_triton, hidden, weight, ids, levels, bias, 1.0, grads, cfg=SMALL)
    _, g2 = run(score_head_triton, hidden, weight, ids, levels, bias, 1.0, grads, cfg=SMALL)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


# ---------------------------------------------------------------------------- bad input


def _good():
    hidden, weight, ids, levels, bias = make_inputs(4, 32, 50, 9)
    return dict(hidden=hidden, weight=weight, token_ids=ids, levels=levels, bias=bias, temperature=1.0)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(hidden=torch.randn(2, 4, 32)), ValueError, r"hidden must be 2-D, got shape \(2, 4, 32\)"),
        (dict(hidden=torch.randn(4, 31)), ValueError, r"must share H.*\(4, 31\).*\(50, 32\)"),
        (dict(weight=torch.randn(50)), ValueError, r"weight must be 2-D"),
        (dict(hidden=torch.ones(4, 32, dtype=torch.int64)), TypeError, r"hidden must have dtype float32.*int64"),
        (dict(weight=torch.randn(50, 32, dtype=torch.float64)), TypeError, r"weight must have dtype.*float64"),
        (dict(token_ids=torch.arange(9.0)), TypeError, r"token_ids must have an integer dtype, got torch.float32"),
        (dict(token_ids=torch.arange(9).view(3, 3)), ValueError, r"token_ids must be 1-D"),
        (dict(token_ids=torch.tensor([3]), levels=[1.0]), ValueError, r"K >= 2"),
        (dict(token_ids=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, -1])), ValueError, r"in \[0, V=50\).*min -1"),
        (dict(token_ids=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 50])), ValueError, r"in \[0, V=50\).*max 50"),
        (dict(token_ids=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 3])), ValueError, r"duplicate score tokens"),
        (dict(levels=[0.0, 1, 2, 3, 5, 4, 6, 7, 8]), ValueError, r"levels must be strictly increasing"),
        (dict(levels=[0.0, 1, 1, 3, 4, 5, 6, 7, 8]), ValueError, r"levels must be strictly increasing"),
        (dict(levels=torch.linspace(0, 4, 8)), ValueError, r"levels must be 1-D of length K=9.*\(8,\)"),
        (dict(levels=[0.0, 1, 2, 3, float("nan"), 5, 6, 7, 8]), ValueError, r"levels must be finite"),
        (dict(levels=torch.arange(9)), TypeError, r"levels must be a floating-point tensor"),
        (dict(levels="012345678"), TypeError, r"levels must be a tensor or a sequence"),
        (dict(temperature=0.0), ValueError, r"temperature must be a finite number > 0, got 0.0"),
        (dict(temperature=-1.0), ValueError, r"temperature must be a finite number > 0"),
        (dict(temperature=float("inf")), ValueError, r"temperature must be a finite number > 0"),
        (dict(temperature="1"), TypeError, r"temperature must be a real number"),
        (dict(bias=torch.randn(49)), ValueError, r"bias must be \[V\] = \[50\].*\(49,\)"),
        (dict(bias=torch.randn(50, 1)), ValueError, r"bias must be 1-D"),
    ],
)
def test_bad_input(change, exc, match):
    assert_rejects(zk.score_head, _good(), change, exc, match)


def test_value_checks_run_once_per_unchanged_ids_and_levels(monkeypatch):
    """The ids' and levels' value checks (a host sync) are skipped for the same, unchanged tensors a
    model passes every call, and run again when either is a new tensor or was written in place."""
    from zreward_fast.kernels import _validate

    calls = []
    check = _validate.check_values
    monkeypatch.setattr(_validate, "check_values", lambda *a: (calls.append(1), check(*a))[1])
    args = _good()
    ids, levels = args["token_ids"], torch.as_tensor(args["levels"], dtype=torch.float32)
    args["levels"] = levels
    for _ in range(3):
        zk.score_head(**args)
    assert len(calls) == 1
    last, mid = int(ids[-1]), float(levels[4])
    ids[-1] = ids[0]  # in place: the version counter moves, and the duplicate is caught
    with pytest.raises(ValueError, match="duplicate score tokens"):
        zk.score_head(**args)
    ids[-1] = last
    zk.score_head(**args)
    levels[4] = float("nan")
    with pytest.raises(ValueError, match="levels must be finite"):
        zk.score_head(**args)
    levels[4] = mid
    zk.score_head(**{**args, "token_ids": ids.clone()})  # a new tensor with the same values
    zk.score_head(**{**args, "levels": args["levels"].tolist()})  # a list: checked every call
    zk.score_head(**{**args, "levels": args["levels"].tolist()})
    assert len(calls) == 7
    with torch.inference_mode():  # inference tensors have no version counter: checked every call
        frozen = ids.clone()
        zk.score_head(**{**args, "token_ids": frozen})
        zk.score_head(**{**args, "token_ids": frozen})
    assert len(calls) == 9


# ---------------------------------------------------------------------------- GPU (bench/gpu_check.sh)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4096, 4096, 32000, 9), (1000, 1000, 4001, 17)])
def test_gpu_triton_matches_reference(dtype, shape):
    compiled_triton_or_skip(zk._score_head_kernels)
    assert zk.use_triton("cuda")
    hidden, weight, ids, levels, bias = make_inputs(*shape, dtype=dtype, device="cuda")
    out_ref = reference.score_head(hidden, weight, ids, levels, bias, 0.7)
    grads = upstream_grads(out_ref)
    out_ref, g_ref = run(reference.score_head, hidden, weight, ids, levels, bias, 0.7, grads)
    out_tri, g_tri = run(zk.score_head, hidden, weight, ids, levels, bias, 0.7, grads)
    atol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for name, a, b in zip(FIELDS, out_tri, out_ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")
    for name, a, b in zip(("hidden", "weight", "bias"), g_tri, g_ref):
        assert a.dtype == dtype, name
        assert rel_err(a, b) < (2e-2 if dtype == torch.bfloat16 else 1e-4), name


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    compiled_triton_or_skip(zk._score_head_kernels)
    hidden, weight, ids, levels, bias = make_inputs(4096, 4096, 32000, 9, dtype=torch.bfloat16, device="cuda")
    grads = upstream_grads(reference.score_head(hidden, weight, ids, levels, bias))
    _, g1 = run(zk.score_head, hidden, weight, ids, levels, bias, 1.0, grads)
    _, g2 = run(zk.score_head, hidden, weight, ids, levels, bias, 1.0, grads)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


@pytest.mark.gpu
def test_gpu_compiled_reference_matches_eager():
    hidden, weight, ids, levels, bias = make_inputs(512, 1024, 8000, 9, dtype=torch.bfloat16, device="cuda")
    grads = upstream_grads(reference.score_head(hidden, weight, ids, levels, bias))
    compiled = torch.compile(reference.score_head)
    out_c, g_c = run(compiled, hidden, weight, ids, levels, bias, 0.7, grads)
    out_e, g_e = run(reference.score_head, hidden, weight, ids, levels, bias, 0.7, grads)
    for a, b in zip(out_c, out_e):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=0)
    for a, b in zip(g_c, g_e):
        assert rel_err(a, b) < 2e-2


def test_no_kernel_module_shadows_a_public_function():
    import importlib
    import types

    for name in ("fused_score_head", "score_rows", "utils", "gdso", "grpo", "risd"):
        importlib.import_module(f"zreward_fast.kernels.{name}")
    for fn in zk.__all__:
        assert not isinstance(getattr(zk, fn), types.ModuleType), fn
