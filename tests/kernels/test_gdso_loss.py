"""Fused GDSO losses: Triton (interpreter on CPU) vs the torch reference, ties, and validation."""
from __future__ import annotations

import pytest
import torch

import zreward_fast.kernels as zk
from kernel_checks import assert_rejects, compiled_triton_or_skip, rel_err, triton_path
from zreward_fast import reference
from zreward_fast.kernels.gdso import GDSOLaunchConfig
from zreward_fast.scale import ScoreScale

FIELDS = ("loss", "loss_pt", "loss_pw", "rewards", "advantages", "mean")
HP = dict(alpha_pt=0.7, alpha_pw=1.3, lambda_pt=0.3, lambda_pw=0.7, eps=1e-3)  # non-default
gdso_loss_triton = triton_path(zk.gdso_loss)
UNEVEN = [0.0, 1.0, 1.5, 3.0, 4.0, 6.0, 10.0]  # K=7, R=10


def make_inputs(P, G, K, *, levels=None, dtype=torch.float32, device="cpu", seed=0):
    """Logits whose rollouts spread over the scale (realistic: rollouts disagree).

    Each rollout's distribution peaks near its own centre, plus noise: the reward std within a
    group is then O(0.1), so fp32 rounding of the rewards (~1e-7) stays well below 1e-5 in the
    advantages (which divide by that std).
    """
    g = torch.Generator().manual_seed(seed)
    s = torch.linspace(0.0, 4.0, K) if levels is None else torch.as_tensor(levels, dtype=torch.float32)
    lo, hi = s[0].item(), s[-1].item()
    centre = lo + (hi - lo) * torch.rand(P, 2, G, 1, generator=g)
    z = -2.0 * ((s - centre) / (hi - lo) * (K - 1)).square() / (K - 1) + 1.5 * torch.randn(P, 2, G, K, generator=g)
    targets = lo + (hi - lo) * torch.rand(P, 2, generator=g)
    return z.to(device, dtype).requires_grad_(), targets.to(device, dtype), s.to(device)


def upstream(seed=1, device="cpu"):
    return torch.randn(3, generator=torch.Generator().manual_seed(seed)).to(device)


def run(fn, z, t, lv, w, **hp):
    out = fn(z, t, lv, **hp)
    (grad,) = torch.autograd.grad(w[0] * out.loss + w[1] * out.loss_pt + w[2] * out.loss_pw, z)
    return out, grad


def assert_outputs_match(out, out_ref, atol=1e-5):
    assert isinstance(out, reference.GDSOOutput) and out._fields == FIELDS
    for name, a, b in zip(FIELDS, out, out_ref):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name} has unwritten/non-finite entries"
        if name != "advantages":
            torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")
    # Advantages divide the rewards' fp32 rounding (~1e-7; the kernel and the reference are each
    # that far from the exact value) by the group's std + eps: atol holds as is for groups with
    # std >= 0.02 and grows with the conditioning below that (G=3 draws can give std ~0.005).
    std = out_ref.rewards.std(-1, keepdim=True)
    scale = (0.02 / (std + 1e-4)).clamp(1.0, 1e3)
    err = (out.advantages - out_ref.advantages).abs()
    assert (err <= atol * scale).all(), f"advantages: max error {err.max():.3g}, max scaled {(err / scale).max():.3g}"


def assert_matches(out, grad, out_ref, grad_ref, atol=1e-5, gatol=1e-4):
    assert_outputs_match(out, out_ref, atol)
    assert grad.shape == grad_ref.shape and grad.dtype == grad_ref.dtype
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, grad_ref, atol=gatol, rtol=0, msg=lambda m: f"grad: {m}")


CASES = {
    "realistic": (64, 8, 9, None),
    "odd_paper": (5, 3, 9, ScoreScale.paper().levels),
    "odd_uneven": (5, 3, 7, UNEVEN),
    "g2_k2": (3, 2, 2, [1.0, 5.0]),
    "g17_k33": (4, 17, 33, None),  # BLOCK_G 32, BLOCK_K 64
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("hp", [HP, {}], ids=["custom_hp", "default_hp"])
def test_triton_matches_reference(case, hp):
    P, G, K, levels = CASES[case]
    z, t, lv = make_inputs(P, G, K, levels=levels)
    w = upstream()
    out, grad = run(gdso_loss_triton, z, t, lv, w, **hp)
    out_ref, grad_ref = run(reference.gdso_loss, z, t, lv, w, **hp)
    assert_matches(out, grad, out_ref, grad_ref)


@pytest.mark.parametrize("used", ["loss", "loss_pt", "loss_pw"])
def test_single_loss_grad(used):
    # Only one scalar feeds backward: the other two upstream grads arrive as None.
    z, t, lv = make_inputs(5, 3, 7, levels=UNEVEN)
    (g_ref,), (g_tri,) = [torch.autograd.grad(getattr(fn(z, t, lv, **HP), used) * 2.5, z)
                          for fn in (reference.gdso_loss, gdso_loss_triton)]
    torch.testing.assert_close(g_tri, g_ref, atol=1e-4, rtol=0)
    assert g_tri.abs().sum() > 0


def check_ties(device="cpu"):
    # Identical logits on both sides and equal targets: d[j, i, i] == 0 exactly, where torch's
    # abs backward uses sign(0) = 0. Targets half-way between two levels go to the lower bin.
    P, G, K = 6, 4, 9
    z, _, lv = make_inputs(P, G, K, device=device)
    z = torch.cat([z.detach()[:, :1], z.detach()[:, :1]], 1).requires_grad_()
    half = torch.tensor([0.25, 1.75, 3.75, 2.25, 0.75, 3.25], device=device)  # levels 0, 0.5, ..., 4
    t = torch.stack([half, half], 1)
    w = upstream(device=device)
    out, grad = run(zk.gdso_loss, z, t, lv, w, **HP)
    out_ref, grad_ref = run(reference.gdso_loss, z, t, lv, w, **HP)
    assert_matches(out, grad, out_ref, grad_ref)
    # Both sides' means are bitwise equal, so each d_ii is exactly zero in the kernel too.
    assert torch.equal(out.mean[:, 0], out.mean[:, 1])
    # The lower bin, independently of reference.nearest_level.
    lower = torch.floor(half / 0.5).long()
    assert torch.equal(reference.nearest_level(t, lv), torch.stack([lower, lower], 1))
    logp = torch.log_softmax(z.detach(), -1)
    l_pt = -logp.gather(-1, lower[:, None, None, None].expand(P, 2, G, 1)).sum((1, 2, 3)) / (2 * G)
    torch.testing.assert_close(out.loss_pt, l_pt.mean(), atol=1e-6, rtol=0)
    # Mutations caught here: sign(0) = 1 (shifts the pairwise grad by p (s - mu) / (G^2 R)) and
    # ties to the upper level.


def test_ties_sign_zero_and_half_way_targets():
    check_ties()


def test_half_way_targets_uneven_levels():
    z, _, lv = make_inputs(4, 3, 7, levels=UNEVEN)
    t = torch.tensor([[1.25, 2.25], [0.5, 5.0], [8.0, 3.5], [10.0, 0.0]])  # midpoints and ends
    w = upstream()
    out, grad = run(gdso_loss_triton, z, t, lv, w, **HP)
    out_ref, grad_ref = run(reference.gdso_loss, z, t, lv, w, **HP)
    assert reference.nearest_level(t, lv).tolist() == [[1, 2], [0, 4], [5, 3], [6, 0]]
    assert_matches(out, grad, out_ref, grad_ref)


def test_constant_group_gives_zero_advantages():
    # G=2 identical rollouts: std = 0, advantages = 0 / (0 + eps) = 0 exactly (not NaN).
    z, t, lv = make_inputs(3, 2, 9)
    z = z.detach()[:, :, :1].expand(3, 2, 2, 9).contiguous().requires_grad_()
    out = gdso_loss_triton(z, t, lv, **HP)
    assert torch.equal(out.advantages, torch.zeros(3, 2, 2))
    out_ref, grad_ref = run(reference.gdso_loss, z, t, lv, upstream(), **HP)
    assert_matches(*run(gdso_loss_triton, z, t, lv, upstream(), **HP), out_ref, grad_ref)


def test_properties():
    z, t, lv = make_inputs(64, 8, 9)
    out = gdso_loss_triton(z, t, lv, **HP)
    adv = out.advantages
    torch.testing.assert_close(adv.mean(-1), torch.zeros(64, 2), atol=1e-5, rtol=0)
    std = out.rewards.std(-1, keepdim=True)
    torch.testing.assert_close(adv.std(-1), (std / (std + HP["eps"])).squeeze(-1), atol=1e-5, rtol=0)
    assert (out.mean >= 0).all() and (out.mean <= 4).all()
    assert (out.loss_pt > 0) and (out.loss_pw >= 0)
    torch.testing.assert_close(out.loss, 0.7 * out.loss_pt + 1.3 * out.loss_pw, atol=1e-6, rtol=0)
    for name in ("rewards", "advantages", "mean"):
        assert not getattr(out, name).requires_grad, name
    assert out.loss.requires_grad and out.loss_pt.requires_grad and out.loss_pw.requires_grad


def test_no_grad_and_detached_inputs():
    z, t, lv = make_inputs(5, 3, 7, levels=UNEVEN)
    ref = reference.gdso_loss(z, t, lv, **HP)
    for zz, ctx in ((z, torch.no_grad()), (z.detach(), torch.enable_grad())):
        with ctx:
            out = gdso_loss_triton(zz, t, lv, **HP)
        assert not out.loss.requires_grad
        assert_outputs_match(out, ref)


def test_non_contiguous_logits_and_targets():
    z, t, lv = make_inputs(5, 3, 7, levels=UNEVEN)
    z_nc = z.detach().permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0).requires_grad_()  # K-major
    t_nc = t.T.contiguous().T
    assert not z_nc.is_contiguous() and not t_nc.is_contiguous() and torch.equal(z_nc, z)
    w = upstream()
    out, grad = run(gdso_loss_triton, z_nc, t_nc, lv, w, **HP)
    out_ref, grad_ref = run(reference.gdso_loss, z, t, lv, w, **HP)
    assert_matches(out, grad, out_ref, grad_ref)


def test_small_reduction_blocks():
    # The mean over P runs in several steps of the reduction loop; several backward programs.
    z, t, lv = make_inputs(37, 3, 7, levels=UNEVEN)
    w = upstream()
    cfg = GDSOLaunchConfig(num_warps=2, block_p=16, bwd_block=64, bwd_num_warps=2)
    out, grad = run(lambda *a, **k: gdso_loss_triton(*a, **k, cfg=cfg), z, t, lv, w, **HP)
    out_ref, grad_ref = run(reference.gdso_loss, z, t, lv, w, **HP)
    assert_matches(out, grad, out_ref, grad_ref)


def test_backward_is_deterministic():
    z, t, lv = make_inputs(64, 8, 9)
    w = upstream()
    (o1, g1), (o2, g2) = run(gdso_loss_triton, z, t, lv, w, **HP), run(gdso_loss_triton, z, t, lv, w, **HP)
    assert all(torch.equal(a, b) for a, b in zip(o1, o2)) and torch.equal(g1, g2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_through_interpreter(dtype):
    # The interpreter path upcasts 16-bit inputs to fp32; the grad comes back in the input dtype.
    z, t, lv = make_inputs(5, 3, 7, levels=UNEVEN, dtype=dtype)
    w = upstream()
    out, grad = run(zk.gdso_loss, z, t, lv, w, **HP)
    out_ref, grad_ref = run(reference.gdso_loss, z, t, lv, w, **HP)
    assert grad.dtype == dtype
    assert_outputs_match(out, out_ref)
    torch.testing.assert_close(grad.float(), grad_ref.float(), atol=1e-3, rtol=1e-2)


def test_public_gdso_loss_dispatches_to_triton_under_interpreter(monkeypatch):
    assert zk.use_triton("cpu") and zk._gdso_kernels is not None
    calls = []
    real = zk._gdso_kernels.gdso_loss_triton
    monkeypatch.setattr(zk._gdso_kernels, "gdso_loss_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    z, t, lv = make_inputs(5, 3, 7, levels=UNEVEN)
    w = upstream()
    out, grad = run(zk.gdso_loss, z, t, UNEVEN, w, **HP)  # levels as floats
    assert calls == [1]
    out_ref, grad_ref = run(reference.gdso_loss, z, t, lv, w, **HP)
    assert_matches(out, grad, out_ref, grad_ref)


def test_validate_false_skips_the_checks(monkeypatch):
    z, t, lv = make_inputs(5, 3, 7, levels=UNEVEN)
    want = zk.gdso_loss(z, t, lv, **HP)
    monkeypatch.setattr(zk, "validate_gdso", lambda *a, **k: pytest.fail("validated"))
    got = zk.gdso_loss(z, t, lv, **HP, validate=False, launch_config=GDSOLaunchConfig())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_public_gdso_loss_uses_reference_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not zk.use_triton("cpu")
    monkeypatch.setattr(zk._gdso_kernels, "gdso_loss_triton", lambda *a, **k: pytest.fail("Triton used"))
    z, t, lv = make_inputs(5, 3, 7, levels=UNEVEN)
    out = zk.gdso_loss(z, t, lv)
    assert torch.isfinite(out.loss)


# ---------------------------------------------------------------------------- bad input


def _good():
    z, t, lv = make_inputs(4, 3, 9)
    return dict(score_logits=z, targets=t, levels=lv)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(score_logits=torch.randn(4, 2, 1, 9)), ValueError, r"G >= 2"),
        (dict(score_logits=torch.randn(4, 2, 3)), ValueError, r"score_logits must be 4-D, got shape \(4, 2, 3\)"),
        (dict(score_logits=torch.randn(4, 3, 3, 9)), ValueError, r"\[P, 2, G, K\] \(two sides.*\(4, 3, 3, 9\)"),
        (dict(score_logits=torch.zeros(4, 2, 3, 9, dtype=torch.int64)), TypeError, r"score_logits must have dtype"),
        (dict(targets=torch.rand(4)), ValueError, r"targets must be 2-D"),
        (dict(targets=torch.rand(3, 2)), ValueError, r"targets must be \[P, 2\] = \[4, 2\], got \(3, 2\)"),
        (dict(targets=torch.full((4, 2), 4.5)), ValueError, r"targets must lie within the scale \[0.0, 4.0\]"),
        (dict(targets=torch.full((4, 2), -0.1)), ValueError, r"targets must lie within the scale"),
        (dict(targets=torch.tensor([[1.0, float("nan")]] * 4)), ValueError, r"targets contain NaN"),
        (dict(levels=torch.linspace(0, 4, 8)), ValueError, r"levels must be 1-D of length K=9.*\(8,\)"),
        (dict(levels=[0.0, 1, 2, 3, 5, 4, 6, 7, 8]), ValueError, r"levels must be strictly increasing"),
        (dict(levels=[0.0, 1, 1, 3, 4, 5, 6, 7, 8]), ValueError, r"levels must be strictly increasing"),
        (dict(levels=[0.0, 1, 2, 3, float("nan"), 5, 6, 7, 8]), ValueError, r"levels must be finite"),
        (dict(eps=0.0), ValueError, r"eps must be > 0"),
        (dict(alpha_pt=float("nan")), ValueError, r"alpha_pt must be finite"),
    ],
)
def test_bad_input(change, exc, match):
    assert_rejects(zk.gdso_loss, _good(), change, exc, match)


def test_public_op_rejects_bad_shapes():
    z, t, lv = make_inputs(4, 3, 9)
    with pytest.raises(ValueError, match="G >= 2"):
        zk.gdso_loss(z[:, :, :1], t, lv)
    with pytest.raises(ValueError, match=r"\[P, 2, G, K\]"):
        zk.gdso_loss(z[:, :1], t, lv)
    with pytest.raises(ValueError, match=r"targets must be \[P, 2\]"):
        zk.gdso_loss(z, t[:3], lv)


# ---------------------------------------------------------------------------- GPU (bench/gpu_check.sh)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["realistic", "odd_uneven", "g17_k33"])
def test_gpu_triton_matches_reference(dtype, case):
    compiled_triton_or_skip(zk._gdso_kernels)
    assert zk.use_triton("cuda")
    P, G, K, levels = CASES[case]
    z, t, lv = make_inputs(P, G, K, levels=levels, dtype=dtype, device="cuda")
    w = upstream(device="cuda")
    out, grad = run(zk.gdso_loss, z, t, lv, w, **HP)
    # Reference in fp32 on the upcast inputs.
    z32 = z.detach().float().requires_grad_()
    out_ref, grad_ref = run(reference.gdso_loss, z32, t.float(), lv, w, **HP)
    assert grad.dtype == dtype
    atol = 1e-4 if dtype == torch.float32 else 1e-3
    for name, a, b in zip(FIELDS, out, out_ref):
        assert torch.isfinite(a).all(), name
        # Advantages divide by the group std: compare them relative to their scale.
        tol = atol * 10 if name == "advantages" else atol
        torch.testing.assert_close(a, b, atol=tol, rtol=0, msg=lambda m: f"{name}: {m}")
    assert rel_err(grad, grad_ref) < (1e-4 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
def test_gpu_ties():
    # On the GPU too: sign(0) = 0 and half-way targets to the lower level (compiled reductions).
    compiled_triton_or_skip(zk._gdso_kernels)
    check_ties("cuda")


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    compiled_triton_or_skip(zk._gdso_kernels)
    z, t, lv = make_inputs(64, 8, 9, dtype=torch.bfloat16, device="cuda")
    w = upstream(device="cuda")
    (o1, g1), (o2, g2) = run(zk.gdso_loss, z, t, lv, w, **HP), run(zk.gdso_loss, z, t, lv, w, **HP)
    assert all(torch.equal(a, b) for a, b in zip(o1, o2)) and torch.equal(g1, g2)


@pytest.mark.gpu
def test_gpu_compiled_reference_matches_eager():
    z, t, lv = make_inputs(64, 8, 9, dtype=torch.bfloat16, device="cuda")
    w = upstream(device="cuda")
    compiled = torch.compile(reference.gdso_loss)
    out_c, g_c = run(compiled, z, t, lv, w, **HP)
    out_e, g_e = run(reference.gdso_loss, z, t, lv, w, **HP)
    for name, a, b in zip(FIELDS, out_c, out_e):
        tol = 1e-2 if name == "advantages" else 1e-4
        torch.testing.assert_close(a, b, atol=tol, rtol=0, msg=lambda m: f"{name}: {m}")
    assert rel_err(g_c, g_e) < 1e-3
