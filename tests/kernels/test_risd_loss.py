"""Fused RISD loss: Triton (interpreter on CPU) vs the torch reference, and validation."""
from __future__ import annotations

import math

import pytest
import torch

import zreward_fast.kernels as zk
from kernel_checks import (
    assert_all_close, assert_grad_only_on_rows, assert_rejects, compiled_triton_or_skip, rel_err, triton_path,
)
from zreward_fast import reference
from zreward_fast.kernels.risd import RISDLossFunction
from zreward_fast.kernels.score_rows import ScoreRowsLaunchConfig

# Small blocks: several programs along N and H (and two weight-grad splits) at test shapes.
SMALL = ScoreRowsLaunchConfig(block_n=16, block_h=32, dw_block_n=16, dw_block_h=32, n_split=2)
risd_loss_triton = triton_path(zk.risd_loss)
REDUCTIONS = ("mean", "sum", "none")


def make_inputs(n, h, v, k, *, bias=True, dtype=torch.float32, device="cpu", seed=0, zeros=0.0):
    """LM-head-like inputs and a teacher with a fraction `zeros` of exact-zero probabilities.

    The teacher stays fp32 (a bf16 row can miss a sum of 1 by more than the validator's 1e-3).
    """
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    # Logits O(1), so the student's distributions are neither flat nor one-hot.
    weight = torch.randn(v, h, generator=g) * (1.5 / math.sqrt(h))
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    ids = torch.randperm(v, generator=g)[:k]
    teacher = torch.softmax(torch.randn(n, k, generator=g) * 2.0, -1)
    if zeros:
        drop = torch.rand(n, k, generator=g) < zeros
        drop[torch.arange(n), teacher.argmax(-1)] = False  # every row keeps some mass
        teacher = torch.where(drop, torch.zeros_like(teacher), teacher)
        teacher = teacher / teacher.sum(-1, keepdim=True)
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return to(hidden), to(weight), ids.to(device), teacher.to(device), to(b)


def upstream(loss, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(loss.shape, generator=g) * 2 - 0.5).to(loss.device)  # mixed signs, not all 1


def run(fn, hidden, weight, ids, teacher, bias, temperature, reduction, grad=None, **kw):
    loss = fn(hidden, weight, ids, teacher, bias, temperature, reduction, **kw)
    params = [t for t in (hidden, weight, bias) if t is not None]
    grad = upstream(loss) if grad is None else grad
    return loss, torch.autograd.grad(loss, params, grad), grad


def check(hidden, weight, ids, teacher, bias, temperature, reduction, fn=risd_loss_triton, grad_atol=1e-4, **kw):
    """Triton vs reference: loss within 1e-5, gradients within 1e-4; returns (loss, grads)."""
    loss_ref, g_ref, grad = run(reference.risd_loss, hidden, weight, ids, teacher, bias, temperature, reduction)
    loss, g_tri, _ = run(fn, hidden, weight, ids, teacher, bias, temperature, reduction, grad, **kw)
    assert loss.dtype == torch.float32 and loss.shape == loss_ref.shape
    assert torch.isfinite(loss).all(), "loss has unwritten/non-finite entries"
    # A sum over N rows of O(1) terms: allow its fp32 rounding (1e-6 relative) on top of 1e-5.
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-6 if reduction == "sum" else 0)
    assert_all_close(g_tri, g_ref, grad_atol, dtype=hidden.dtype, names=("grad hidden", "grad weight", "grad bias"))
    return loss, g_tri


# (N, H, V, K) and the launch config: default blocks at the realistic shape, small ones at the odd.
SHAPES = {
    "realistic": ((64, 256, 1000, 9), None),
    "odd": ((37, 96, 301, 9), SMALL),
    "odd_k5": ((37, 96, 301, 5), SMALL),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_triton_matches_reference(shape, with_bias, temperature, reduction):
    dims, cfg = SHAPES[shape]
    check(*make_inputs(*dims, bias=with_bias), temperature, reduction, cfg=cfg)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_teacher_with_exact_zeros(reduction):
    # 0 log 0 = 0: about half the teacher entries are exactly 0; loss and grads stay finite.
    hidden, weight, ids, teacher, bias = make_inputs(37, 96, 301, 9, zeros=0.5)
    assert (teacher == 0).float().mean() > 0.3
    check(hidden, weight, ids, teacher, bias, 0.7, reduction, cfg=SMALL)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_one_hot_teacher(reduction):
    hidden, weight, ids, _, bias = make_inputs(37, 96, 301, 9)
    target = torch.randint(0, 9, (37,), generator=torch.Generator().manual_seed(5))
    teacher = torch.nn.functional.one_hot(target, 9).float()
    loss, _ = check(hidden, weight, ids, teacher, bias, 1.0, reduction, cfg=SMALL)
    # KL to a one-hot teacher is the cross-entropy of the student at the target.
    z = hidden.detach() @ weight.detach()[ids].T + bias.detach()[ids]
    ce = torch.nn.functional.cross_entropy(z, target, reduction=reduction)
    torch.testing.assert_close(loss, ce, atol=1e-5, rtol=0)


def test_teacher_equals_student():
    hidden, weight, ids, _, bias = make_inputs(37, 96, 301, 9)
    with torch.no_grad():
        teacher = reference.score_head(hidden, weight, ids, torch.arange(9.0), bias, 0.7).probs
    loss, grads = check(hidden, weight, ids, teacher, bias, 0.7, "none", cfg=SMALL)
    assert loss.abs().max() < 1e-6
    assert all(g.abs().max() < 1e-5 for g in grads)  # fp32 rounding of qS - qT, summed over rows


def test_grad_rows_outside_score_tokens_are_exactly_zero():
    hidden, weight, ids, teacher, bias = make_inputs(37, 96, 301, 9)
    loss = risd_loss_triton(hidden, weight, ids, teacher, bias, 0.7, "mean", cfg=SMALL)
    assert_grad_only_on_rows(*torch.autograd.grad(loss, (weight, bias)), ids)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_k_score_rows_as_own_parameter(reduction):
    # The RISD trainer's layout: weight is just the K score rows (V = K), ids a permutation.
    hidden, _, _, teacher, _ = make_inputs(37, 96, 9, 9)
    g = torch.Generator().manual_seed(7)
    weight = (torch.randn(9, 96, generator=g) / 8).requires_grad_()
    bias = torch.randn(9, generator=g).requires_grad_()
    for ids in (torch.arange(9), torch.randperm(9, generator=g)):
        check(hidden, weight, ids, teacher, bias, 0.7, reduction, cfg=SMALL)


def test_public_risd_loss_dispatches_to_triton_under_interpreter(monkeypatch):
    assert zk.use_triton("cpu") and zk._risd_kernels is not None
    calls = []
    real = RISDLossFunction.apply
    monkeypatch.setattr(RISDLossFunction, "apply", lambda *a: calls.append(1) or real(*a))
    hidden, weight, ids, teacher, bias = make_inputs(37, 96, 301, 9)
    for i, reduction in enumerate(REDUCTIONS):
        check(hidden, weight, ids, teacher, bias, 0.7, reduction, fn=zk.risd_loss)
        assert len(calls) == i + 1
    assert zk.risd_loss(hidden, weight, ids, teacher).shape == ()  # defaults: T=1, mean


def test_public_risd_loss_uses_reference_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not zk.use_triton("cpu")
    monkeypatch.setattr(RISDLossFunction, "apply", lambda *a: pytest.fail("Triton used"))
    hidden, weight, ids, teacher, bias = make_inputs(8, 32, 50, 9)
    torch.testing.assert_close(zk.risd_loss(hidden, weight, ids, teacher, bias),
                               reference.risd_loss(hidden, weight, ids, teacher, bias))


def test_validate_false_skips_the_checks(monkeypatch):
    hidden, weight, ids, teacher, bias = make_inputs(37, 96, 301, 9)
    want = zk.risd_loss(hidden, weight, ids, teacher, bias, 0.7, "none")
    monkeypatch.setattr(zk, "validate_risd", lambda *a, **k: pytest.fail("validated"))
    got = zk.risd_loss(hidden, weight, ids, teacher, bias, 0.7, "none", validate=False, launch_config=SMALL)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # other blocks: other fp32 rounding


def test_upstream_grad_of_none_broadcast_and_scaled():
    # (loss_none * 3).sum() hands backward an expanded (stride 0) grad; mean * 2.5 a scalar one.
    hidden, weight, ids, teacher, bias = make_inputs(37, 96, 301, 9)
    for reduction, post in (("none", lambda l: (l * 3.0).sum()), ("mean", lambda l: l * 2.5), ("sum", lambda l: -l)):
        res = []
        for fn in (reference.risd_loss, lambda *a: risd_loss_triton(*a, cfg=SMALL)):
            res.append(torch.autograd.grad(post(fn(hidden, weight, ids, teacher, bias, 0.7, reduction)),
                                           (hidden, weight, bias)))
        assert_all_close(*res, 1e-4)


@pytest.mark.parametrize("need", ["hidden", "weight", "bias"])
def test_single_input_needs_grad(need):
    hidden, weight, ids, teacher, bias = make_inputs(37, 96, 301, 9)
    tensors = {"hidden": hidden.detach(), "weight": weight.detach(), "bias": bias.detach()}
    tensors[need].requires_grad_()
    args = (tensors["hidden"], tensors["weight"], ids, teacher, tensors["bias"], 0.7, "sum")
    (g_ref,) = torch.autograd.grad(reference.risd_loss(*args), (tensors[need],))
    (g_tri,) = torch.autograd.grad(risd_loss_triton(*args, cfg=SMALL), (tensors[need],))
    torch.testing.assert_close(g_tri, g_ref, atol=1e-4, rtol=0)


def test_teacher_probs_get_no_gradient():
    hidden, weight, ids, teacher, bias = make_inputs(37, 96, 301, 9)
    teacher = teacher.clone().requires_grad_()
    loss = risd_loss_triton(hidden, weight, ids, teacher, bias, 0.7)
    gt, gh = torch.autograd.grad(loss, (teacher, hidden), allow_unused=True)
    assert gt is None and gh is not None


def test_non_contiguous_inputs():
    hidden, weight, ids, teacher, bias = make_inputs(37, 96, 301, 9)
    h_nc = torch.stack([hidden.detach()] * 2, -1).flatten(1)[:, ::2].requires_grad_()  # stride (192, 2)
    w_nc = weight.detach().T.contiguous().T.requires_grad_()  # stride (1, V): column-major head
    t_nc = teacher.T.contiguous().T  # stride (1, N)
    assert h_nc.stride() == (192, 2) and w_nc.stride() == (1, 301) and t_nc.stride() == (1, 37)
    loss_ref, g_ref, grad = run(reference.risd_loss, hidden, weight, ids, teacher, bias, 0.7, "none")
    loss, g_tri, _ = run(risd_loss_triton, h_nc, w_nc, ids, t_nc, bias, 0.7, "none", grad, cfg=SMALL)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=0)
    assert_all_close(g_tri, g_ref, 1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_through_interpreter(dtype):
    # The interpreter path upcasts 16-bit inputs to fp32; grads come back in the input dtype.
    hidden, weight, ids, teacher, bias = make_inputs(37, 96, 301, 9, dtype=dtype)
    loss_ref, g_ref, grad = run(reference.risd_loss, hidden, weight, ids, teacher, bias, 0.7, "mean")
    loss, g_tri, _ = run(zk.risd_loss, hidden, weight, ids, teacher, bias, 0.7, "mean", grad)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=0)
    assert_all_close(g_tri, g_ref, 1e-2, rtol=1e-2, dtype=dtype)


def test_half_teacher_probs():
    # A 16-bit teacher (exactly representable rows: one-hot and halves) is read as fp32.
    hidden, weight, ids, _, bias = make_inputs(37, 96, 301, 9)
    teacher = torch.zeros(37, 9)
    teacher[::2, 3] = 1.0
    teacher[1::2, 0] = teacher[1::2, 8] = 0.5
    for dtype in (torch.bfloat16, torch.float16):
        check(hidden, weight, ids, teacher.to(dtype), bias, 0.7, "none", fn=zk.risd_loss)


def test_empty_batch():
    hidden, weight, ids, teacher, bias = make_inputs(0, 32, 50, 9)
    assert zk.risd_loss(hidden, weight, ids, teacher, bias, reduction="none").shape == (0,)
    loss = zk.risd_loss(hidden, weight, ids, teacher, bias, reduction="sum")
    assert loss.item() == 0.0
    gh, gw, gb = torch.autograd.grad(loss, (hidden, weight, bias))
    assert gh.shape == (0, 32) and not gw.any() and not gb.any()


def test_backward_is_deterministic():
    hidden, weight, ids, teacher, bias = make_inputs(64, 256, 1000, 9)
    _, g1, grad = run(risd_loss_triton, hidden, weight, ids, teacher, bias, 1.0, "none", cfg=SMALL)
    _, g2, _ = run(risd_loss_triton, hidden, weight, ids, teacher, bias, 1.0, "none", grad, cfg=SMALL)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


# ---------------------------------------------------------------------------- bad input


def _good():
    hidden, weight, ids, teacher, bias = make_inputs(4, 32, 50, 9)
    return dict(hidden=hidden, weight=weight, token_ids=ids, teacher_probs=teacher, bias=bias,
                temperature=1.0, reduction="mean")


def _teacher(fill):
    t = torch.full((4, 9), 1.0 / 9)
    fill(t)
    return t


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(teacher_probs=torch.full((4, 8), 1 / 8)), ValueError,
         r"teacher_probs must be \[N, K\] = \[4, 9\], got \(4, 8\)"),
        (dict(teacher_probs=torch.full((5, 9), 1 / 9)), ValueError,
         r"teacher_probs must be \[N, K\] = \[4, 9\], got \(5, 9\)"),
        (dict(teacher_probs=torch.full((9,), 1 / 9)), ValueError, r"teacher_probs must be 2-D"),
        (dict(teacher_probs=torch.ones(4, 9, dtype=torch.int64)), TypeError, r"teacher_probs must have dtype"),
        (dict(teacher_probs=_teacher(lambda t: t[1, :2].copy_(torch.tensor([-0.1, 1 / 9 + 0.1 + 1 / 9])))),
         ValueError, r"teacher_probs must be >= 0"),
        (dict(teacher_probs=torch.full((4, 9), 0.1)), ValueError, r"each row of teacher_probs must sum to 1"),
        (dict(teacher_probs=torch.zeros(4, 9)), ValueError, r"each row of teacher_probs must sum to 1"),
        (dict(teacher_probs=_teacher(lambda t: t.__setitem__((2, 3), float("nan")))), ValueError,
         r"teacher_probs contain NaN or infinite values"),
        (dict(teacher_probs=_teacher(lambda t: t.__setitem__((0, 0), float("inf")))), ValueError,
         r"teacher_probs contain NaN or infinite values"),
        (dict(reduction="avg"), ValueError, r"reduction must be 'mean', 'sum' or 'none', got 'avg'"),
        (dict(reduction=None), ValueError, r"reduction must be"),
        (dict(token_ids=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 50])), ValueError, r"in \[0, V=50\).*max 50"),
        (dict(token_ids=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, -1])), ValueError, r"in \[0, V=50\).*min -1"),
        (dict(token_ids=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 3])), ValueError, r"duplicate score tokens"),
        (dict(token_ids=torch.arange(9.0)), TypeError, r"token_ids must have an integer dtype"),
        (dict(hidden=torch.randn(4, 31)), ValueError, r"must share H"),
        (dict(bias=torch.randn(49)), ValueError, r"bias must be \[V\] = \[50\]"),
        (dict(temperature=0.0), ValueError, r"temperature must be a finite number > 0"),
    ],
)
def test_bad_input(change, exc, match):
    assert_rejects(zk.risd_loss, _good(), change, exc, match)


def test_id_checks_run_once_per_unchanged_ids(monkeypatch):
    """Like the score head's: the same unchanged ids skip their value check (a host sync); the
    teacher distribution, new every step, is still checked on every call."""
    from zreward_fast.kernels import _validate

    calls = []
    check = _validate.check_values
    monkeypatch.setattr(_validate, "check_values", lambda *a: (calls.append(1), check(*a))[1])
    args = _good()
    zk.risd_loss(**args)
    zk.risd_loss(**args)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="teacher_probs contain NaN"):
        zk.risd_loss(**{**args, "teacher_probs": _teacher(lambda t: t.__setitem__((0, 0), float("nan")))})
    args["token_ids"][0] = args["token_ids"][1]
    with pytest.raises(ValueError, match="duplicate score tokens"):
        zk.risd_loss(**args)


# ---------------------------------------------------------------------------- GPU (bench/gpu_check.sh)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4096, 4096, 32000, 9), (1000, 1000, 4001, 17)])
def test_gpu_triton_matches_reference(shape, dtype, reduction):
    compiled_triton_or_skip(zk._risd_kernels)
    assert zk.use_triton("cuda")
    hidden, weight, ids, teacher, bias = make_inputs(*shape, dtype=dtype, device="cuda", zeros=0.3)
    loss_ref, g_ref, grad = run(reference.risd_loss, hidden, weight, ids, teacher, bias, 0.7, reduction)
    loss, g_tri, _ = run(zk.risd_loss, hidden, weight, ids, teacher, bias, 0.7, reduction, grad)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert rel_err(loss, loss_ref) < tol
    for name, a, b in zip(("hidden", "weight", "bias"), g_tri, g_ref):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert rel_err(a, b) < tol, name


@pytest.mark.gpu
def test_gpu_backward_is_deterministic_and_k_rows_mode():
    compiled_triton_or_skip(zk._risd_kernels)
    hidden, weight, ids, teacher, bias = make_inputs(4096, 4096, 9, 9, dtype=torch.bfloat16, device="cuda")
    _, g1, grad = run(zk.risd_loss, hidden, weight, ids, teacher, bias, 1.0, "mean")
    _, g2, _ = run(zk.risd_loss, hidden, weight, ids, teacher, bias, 1.0, "mean", grad)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    _, g_ref, _ = run(reference.risd_loss, hidden, weight, ids, teacher, bias, 1.0, "mean", grad)
    assert all(rel_err(a, b) < 2e-2 for a, b in zip(g1, g_ref))


@pytest.mark.gpu
def test_gpu_compiled_reference_matches_eager():
    hidden, weight, ids, teacher, bias = make_inputs(512, 1024, 8000, 9, dtype=torch.bfloat16, device="cuda")
    compiled = torch.compile(reference.risd_loss)
    loss_c, g_c, grad = run(compiled, hidden, weight, ids, teacher, bias, 0.7, "mean")
    loss_e, g_e, _ = run(reference.risd_loss, hidden, weight, ids, teacher, bias, 0.7, "mean", grad)
    torch.testing.assert_close(loss_c, loss_e, atol=2e-2, rtol=0)
    for a, b in zip(g_c, g_e):
        assert rel_err(a, b) < 2e-2
