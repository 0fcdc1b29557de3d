"""Fused LM head + GRPO token loss: Triton (interpreter on CPU) vs the torch reference."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import zreward_fast.kernels as zk
from kernel_checks import assert_rejects, compiled_triton_or_skip, rel_err, triton_path
from zreward_fast import reference
from zreward_fast.kernels.grpo import GRPOLaunchConfig, GRPOTokenLossFunction

# Small blocks: several V blocks per row and chunks that do not divide N.
SMALL = GRPOLaunchConfig(chunk_rows=7, block_v=64, num_warps=4)
grpo_token_loss_triton = triton_path(zk.grpo_token_loss)
CLIP = 0.2


def make_inputs(B, T, H, V, *, old=True, ref=True, temperature=1.0, dtype=torch.float32, device="cpu", seed=0):
    """Random GRPO inputs with masked tokens, a fully masked row, and ratios outside the clip range."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    # LM-head-like scale: logits O(1), so distributions are neither flat nor one-hot.
    weight = torch.randn(V, H, generator=g) * (1.5 / math.sqrt(H))
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.25).float()
    mask[:, :2] = 1.0
    mask[1] = 0.0  # a fully masked row: adds 0 to the mean over B
    adv = torch.randn(B, generator=g)
    adv[0], adv[-1] = abs(adv[0]) + 0.5, -abs(adv[-1]) - 0.5  # both signs
    with torch.no_grad():
        lp = reference.grpo_token_loss(hidden, weight, ids, mask, adv, temperature=temperature)[1]
    # log-ratios lp - old in [-0.6, 0.6] (ratios 0.55 ... 1.8), +-0.5 at t = 0, 1: the clipped
    # branch is active for tokens of every row, whatever the advantage's sign.
    u = torch.rand(B, T, generator=g) * 1.2 - 0.6
    u[:, 0], u[:, 1] = 0.5, -0.5
    old_lp = lp - u if old else None
    ref_lp = lp + 0.5 * torch.randn(B, T, generator=g) if ref else None
    to = lambda t: t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(hidden), to(weight), dev(ids), dev(mask), dev(adv), dev(old_lp), dev(ref_lp)


def run(fn, hidden, weight, ids, mask, adv, old, ref, beta=0.04, temperature=1.0, **kw):
    loss, lp = fn(hidden, weight, ids, mask, adv, old, ref, clip_eps=CLIP, beta=beta, temperature=temperature, **kw)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    return loss, lp, gh, gw


def assert_matches(out, ref_out, atol_out=1e-5, atol_grad=1e-4):
    names = ("loss", "token_logprobs", "grad hidden", "grad weight")
    for name, a, b in zip(names, out, ref_out):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.isfinite(a).all(), f"{name} has non-finite entries"
        atol = atol_out if name in ("loss", "token_logprobs") else atol_grad
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


def clipped_active(lp, old, mask, adv):
    """Tokens where the clipped branch is the min and the ratio lies outside the range (zero grad)."""
    r = torch.exp(lp - old)
    A = adv[:, None]
    outside = (r < 1 - CLIP) | (r > 1 + CLIP)
    return outside & (r.clamp(1 - CLIP, 1 + CLIP) * A < r * A) & (mask > 0)


SHAPES = [(4, 24, 64, 1000), (3, 7, 48, 301)]


@pytest.mark.parametrize("shape", SHAPES, ids=["realistic", "odd"])
@pytest.mark.parametrize("old, ref", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["old+ref", "old", "ref", "none"])
@pytest.mark.parametrize("beta, temperature", [(0.04, 0.7), (0.0, 1.0)], ids=["beta.04-t.7", "beta0-t1"])
def test_triton_matches_reference(shape, old, ref, beta, temperature):
    inputs = make_inputs(*shape, old=old, ref=ref, temperature=temperature)
    out_ref = run(reference.grpo_token_loss, *inputs, beta=beta, temperature=temperature)
    out_tri = run(grpo_token_loss_triton, *inputs, beta=beta, temperature=temperature)
    assert_matches(out_tri, out_ref)
    assert out_tri[2].abs().sum() > 0 and out_tri[3].abs().sum() > 0
    if old:
        hidden, weight, ids, mask, adv, old_lp, _ = inputs
        active = clipped_active(out_ref[1], old_lp, mask, adv)
        # Clipping really is exercised, for both signs of the advantage.
        assert (active & (adv[:, None] > 0)).any() and (active & (adv[:, None] < 0)).any()


def test_small_blocks_and_uneven_chunks():
    inputs = make_inputs(3, 7, 48, 301)
    for cfg in (SMALL, GRPOLaunchConfig(chunk_rows=1, block_v=512, num_warps=4), GRPOLaunchConfig(chunk_rows=1000, block_v=16)):
        assert_matches(run(grpo_token_loss_triton, *inputs, temperature=0.7, cfg=cfg),
                       run(reference.grpo_token_loss, *inputs, temperature=0.7))


def test_non_contiguous_inputs():
    hidden, weight, ids, mask, adv, old, ref = make_inputs(3, 7, 48, 301)
    h_nc = torch.stack([hidden.detach()] * 2, -1).flatten(2)[..., ::2].requires_grad_()  # stride 2 in H
    w_nc = weight.detach().T.contiguous().T.requires_grad_()  # column-major head
    assert not h_nc.is_contiguous() and w_nc.stride() == (1, 301) and torch.equal(h_nc, hidden)
    out = run(grpo_token_loss_triton, h_nc, w_nc, ids.T.contiguous().T, mask, adv, old, ref, temperature=0.7)
    assert_matches(out, run(reference.grpo_token_loss, hidden, weight, ids, mask, adv, old, ref, temperature=0.7))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning")
def test_masked_tokens_contribute_nothing():
    hidden, weight, ids, mask, adv, old, ref = make_inputs(3, 7, 48, 301)
    base = run(grpo_token_loss_triton, hidden, weight, ids, mask, adv, old, ref)
    # Extreme old/ref log-probs and token ids at masked positions change nothing but their lp.
    off = mask == 0
    old2, ref2, ids2 = old.clone(), ref.clone(), ids.clone()
    old2[off], ref2[off], ids2[off] = -1e4, 1e4, 0
    out = run(grpo_token_loss_triton, hidden, weight, ids2, mask, adv, old2, ref2)
    assert torch.isfinite(out[0])
    torch.testing.assert_close(out[0], base[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[2], base[2], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[3], base[3], atol=1e-6, rtol=0)
    assert torch.equal(out[1][~off], base[1][~off])
    # The fully masked row: no gradient reaches its hidden states; its lp are still returned.
    assert torch.equal(base[2][1], torch.zeros_like(base[2][1]))
    assert torch.isfinite(base[1][1]).all() and (base[1][1] < 0).all()


def test_all_masked_and_empty():
    hidden, weight, ids, mask, adv, old, ref = make_inputs(3, 7, 48, 301)
    out = run(grpo_token_loss_triton, hidden, weight, ids, torch.zeros_like(mask), adv, old, ref)
    assert out[0].item() == 0.0 and not out[2].any() and not out[3].any()
    h0 = torch.randn(2, 0, 48, requires_grad=True)
    loss, lp = grpo_token_loss_triton(h0, weight, ids[:2, :0], mask[:2, :0], adv[:2])
    ref_loss, _ = reference.grpo_token_loss(h0, weight, ids[:2, :0], mask[:2, :0], adv[:2])
    assert loss.item() == ref_loss.item() == 0.0 and lp.shape == (2, 0)


def test_upstream_grad_scales_and_composes():
    inputs = make_inputs(3, 7, 48, 301)
    hidden, weight = inputs[:2]
    loss, lp = grpo_token_loss_triton(*inputs, temperature=0.7)
    assert not lp.requires_grad and lp.grad_fn is None
    total = -2.5 * loss + (hidden ** 2).sum() * 1e-3
    gh, gw = torch.autograd.grad(total, (hidden, weight))
    rl, _ = reference.grpo_token_loss(*inputs, temperature=0.7)
    rgh, rgw = torch.autograd.grad(-2.5 * rl + (hidden ** 2).sum() * 1e-3, (hidden, weight))
    torch.testing.assert_close(gh, rgh, atol=1e-4, rtol=0)
    torch.testing.assert_close(gw, rgw, atol=1e-4, rtol=0)


def test_no_grad_and_frozen_head():
    hidden, weight, ids, mask, adv, old, ref = make_inputs(3, 7, 48, 301)
    ref_loss, ref_lp = reference.grpo_token_loss(hidden, weight, ids, mask, adv, old, ref)
    with torch.no_grad():
        loss, lp = grpo_token_loss_triton(hidden, weight, ids, mask, adv, old, ref)
    torch.testing.assert_close(loss, ref_loss.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    # Frozen LM head (e.g. LoRA): only hidden gets a gradient.
    w = weight.detach()
    loss, _ = grpo_token_loss_triton(hidden, w, ids, mask, adv, old, ref)
    (gh,) = torch.autograd.grad(loss, (hidden,))
    (rgh,) = torch.autograd.grad(reference.grpo_token_loss(hidden, w, ids, mask, adv, old, ref)[0], (hidden,))
    torch.testing.assert_close(gh, rgh, atol=1e-4, rtol=0)
    # Frozen hidden states: only the head gets a gradient.
    h = hidden.detach()
    (gw,) = torch.autograd.grad(grpo_token_loss_triton(h, weight, ids, mask, adv, old, ref)[0], (weight,))
    (rgw,) = torch.autograd.grad(reference.grpo_token_loss(h, weight, ids, mask, adv, old, ref)[0], (weight,))
    torch.testing.assert_close(gw, rgw, atol=1e-4, rtol=0)


def test_fp32_weight_grad_option_and_determinism():
    inputs = make_inputs(4, 24, 64, 1000)
    out_ref = run(reference.grpo_token_loss, *inputs)
    a = run(grpo_token_loss_triton, *inputs, cfg=GRPOLaunchConfig(chunk_rows=16, block_v=256, fp32_weight_grad=True))
    b = run(grpo_token_loss_triton, *inputs, cfg=GRPOLaunchConfig(chunk_rows=16, block_v=256, fp32_weight_grad=True))
    assert_matches(a, out_ref)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_through_interpreter(dtype):
    # The interpreter path upcasts 16-bit inputs to fp32; grads come back in the input dtype.
    inputs = make_inputs(3, 7, 48, 301, dtype=dtype)
    out_ref = run(reference.grpo_token_loss, *inputs, temperature=0.7)
    out_tri = run(zk.grpo_token_loss, *inputs, temperature=0.7)
    assert out_tri[0].dtype == out_tri[1].dtype == torch.float32
    assert out_tri[2].dtype == out_tri[3].dtype == dtype
    for a, b in zip(out_tri, out_ref):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2)


def test_chunk_rows_policy():
    cfg = GRPOLaunchConfig()
    c = cfg.rows(16 * 768, 248320)
    assert c % 128 == 0 and c * 248320 * 4 <= cfg.max_chunk_bytes and (16 * 768) % c == 0
    assert cfg.rows(100, 248320) == 100  # never more rows than tokens
    assert GRPOLaunchConfig(max_chunk_bytes=1000 * 4 * 1000).rows(5000, 1000) == 896  # 2 balanced chunks of <= 1000
    assert GRPOLaunchConfig(chunk_rows=7).rows(3, 10) == 3


# ---------------------------------------------------------------------------- memory: no [B*T, V]


class _RecordSizes(TorchDispatchMode):
    """Records shape and bytes of every tensor any aten op returns (allocations, views, results).

    Bytes, not numel: the Triton interpreter moves buffers through uint8 views of their storage.
    """

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, tuple[int, ...], int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append((str(func), tuple(t.shape), t.numel() * t.element_size()))
        return out


def _largest(fn, inputs, **kw) -> tuple[int, list]:
    with _RecordSizes() as rec:
        run(fn, *inputs, **kw)
    return max(rec.sizes, key=lambda s: s[2]), rec.sizes


def test_fused_path_never_allocates_full_logits():
    B, T, H, V = 8, 40, 32, 500  # N = 320 tokens, chunks of 16 rows
    inputs = make_inputs(B, T, H, V)
    C = 16
    biggest, sizes = _largest(grpo_token_loss_triton, inputs, cfg=GRPOLaunchConfig(chunk_rows=C, block_v=256))
    full = B * T * V * 4  # the fp32 [B*T, V] logits
    assert biggest[2] < full / 4, f"a [B*T, V]-sized tensor was created: {biggest}"
    assert biggest[2] <= 4 * max(C * V, V * H, B * T * H), biggest  # chunk block, LM head grad, hidden grad
    assert any(s == (C, V) for _, s, _ in sizes)  # the chunk block was seen: the recorder works
    # The reference forms the full logits, so this check can fail.
    ref_biggest, _ = _largest(reference.grpo_token_loss, inputs)
    assert ref_biggest[2] >= full and math.prod(ref_biggest[1]) == B * T * V


# ---------------------------------------------------------------------------- dispatch


def test_public_dispatches_to_triton_under_interpreter(monkeypatch):
    assert zk.use_triton("cpu") and zk._grpo_kernels is not None
    calls = []
    real = GRPOTokenLossFunction.apply
    monkeypatch.setattr(GRPOTokenLossFunction, "apply", lambda *a: calls.append(a[7:10]) or real(*a))
    inputs = make_inputs(3, 7, 48, 301)
    out = run(zk.grpo_token_loss, *inputs, temperature=0.7)
    assert len(calls) == 1 and calls[0] == (CLIP, 0.04, 0.7)  # clip_eps, beta, temperature
    assert_matches(out, run(reference.grpo_token_loss, *inputs, temperature=0.7))


def test_validate_false_skips_the_checks(monkeypatch):
    inputs = make_inputs(3, 7, 48, 301)
    want = run(zk.grpo_token_loss, *inputs)
    monkeypatch.setattr(zk, "validate_grpo", lambda *a, **k: pytest.fail("validated"))
    assert_matches(run(zk.grpo_token_loss, *inputs, validate=False, launch_config=SMALL), want)


def test_public_uses_reference_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not zk.use_triton("cpu")
    monkeypatch.setattr(GRPOTokenLossFunction, "apply", lambda *a: pytest.fail("Triton used"))
    inputs = make_inputs(3, 7, 48, 301)
    assert_matches(run(zk.grpo_token_loss, *inputs), run(reference.grpo_token_loss, *inputs))


# ---------------------------------------------------------------------------- bad input


def _good():
    hidden, weight, ids, mask, adv, old, ref = make_inputs(2, 5, 16, 50)
    return dict(hidden=hidden, weight=weight, token_ids=ids, mask=mask, advantages=adv,
                old_logprobs=old, ref_logprobs=ref)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(token_ids=torch.full((2, 5), 50)), ValueError, r"token_ids must be in \[0, V=50\).*max 50"),
        (dict(token_ids=torch.full((2, 5), -1)), ValueError, r"token_ids must be in \[0, V=50\).*min -1"),
        (dict(token_ids=torch.zeros(2, 5)), TypeError, r"token_ids must be an integer tensor"),
        (dict(mask=torch.full((2, 5), 0.5)), ValueError, r"mask must hold only 0 and 1"),
        (dict(mask=torch.ones(2, 4)), ValueError, r"mask must be a \[B, T\] = \[2, 5\]"),
        (dict(advantages=torch.zeros(3)), ValueError, r"advantages must be a float \[B\] = \[2\]"),
        (dict(advantages=torch.zeros(2, 1)), ValueError, r"advantages must be a float \[B\]"),
        (dict(hidden=torch.randn(2, 5, 17)), ValueError, r"must share H.*\(2, 5, 17\).*\(50, 16\)"),
        (dict(hidden=torch.randn(10, 16)), ValueError, r"hidden must be 3-D"),
        (dict(old_logprobs=torch.zeros(2, 4)), ValueError, r"old_logprobs must be \[B, T\] = \[2, 5\]"),
        (dict(clip_eps=-0.1), ValueError, r"clip_eps must be >= 0"),
        (dict(temperature=0.0), ValueError, r"temperature must be a finite number > 0"),
    ],
)
def test_bad_input(change, exc, match):
    assert_rejects(zk.grpo_token_loss, _good(), change, exc, match)


# ---------------------------------------------------------------------------- GPU (bench/gpu_check.sh)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 512, 1024, 32000), (3, 77, 1000, 4001)], ids=["big", "odd"])
@pytest.mark.parametrize("fp32_weight_grad", [False, True], ids=["wgrad-bf16-acc", "wgrad-fp32-acc"])
def test_gpu_bf16_matches_reference(shape, fp32_weight_grad):
    compiled_triton_or_skip(zk._grpo_kernels)
    inputs = make_inputs(*shape, dtype=torch.bfloat16, device="cuda")
    # Reference on the upcast inputs: the fused path should be as close to it as bf16 allows.
    up = [t.detach().float().requires_grad_() for t in inputs[:2]]
    out_ref = run(reference.grpo_token_loss, *up, *inputs[2:], temperature=0.7)
    B, T = shape[:2]
    cfg = GRPOLaunchConfig(chunk_rows=1000 if B * T > 1000 else 64, fp32_weight_grad=fp32_weight_grad)  # uneven chunks
    out = run(grpo_token_loss_triton, *inputs, temperature=0.7, cfg=cfg)
    assert out[2].dtype == out[3].dtype == torch.bfloat16
    assert abs(out[0].item() - out_ref[0].item()) < 2e-3
    torch.testing.assert_close(out[1], out_ref[1], atol=5e-2, rtol=0)
    for name, a, b in zip(("hidden", "weight"), out[2:], out_ref[2:]):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 2e-2, name


@pytest.mark.gpu
def test_gpu_fp32_matches_reference_and_public_dispatch():
    compiled_triton_or_skip(zk._grpo_kernels)
    assert zk.use_triton("cuda")
    inputs = make_inputs(4, 300, 512, 8000, device="cuda")
    out_ref = run(reference.grpo_token_loss, *inputs, temperature=0.7)
    out = run(zk.grpo_token_loss, *inputs, temperature=0.7)
    for name, a, b in zip(("loss", "lp", "hidden", "weight"), out, out_ref):
        assert rel_err(a, b) < 1e-4 if name in ("hidden", "weight") else (a - b).abs().max() < 1e-4, name


@pytest.mark.gpu
def test_gpu_peak_memory_stays_chunk_sized():
    compiled_triton_or_skip(zk._grpo_kernels)
    B, T, H, V = 8, 512, 1024, 32000
    inputs = make_inputs(B, T, H, V, dtype=torch.bfloat16, device="cuda")
    cfg = GRPOLaunchConfig(chunk_rows=512)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run(grpo_token_loss_triton, *inputs, cfg=cfg)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    full_logits = B * T * V * 4
    chunk = 512 * V * 6  # fp32 logits + bf16 dlogits
    grads = (V * H + B * T * H) * 2
    assert extra < full_logits / 2 and extra <= chunk + grads + (64 << 20), extra


@pytest.mark.gpu
def test_gpu_compiled_reference_matches_eager():
    inputs = make_inputs(4, 256, 512, 8000, dtype=torch.bfloat16, device="cuda")
    compiled = torch.compile(reference.grpo_token_loss)
    out_c = run(compiled, *inputs, temperature=0.7)
    out_e = run(reference.grpo_token_loss, *inputs, temperature=0.7)
    assert abs(out_c[0].item() - out_e[0].item()) < 1e-3
    torch.testing.assert_close(out_c[1], out_e[1], atol=1e-3, rtol=0)
    for a, b in zip(out_c[2:], out_e[2:]):
        assert rel_err(a, b) < 2e-2
