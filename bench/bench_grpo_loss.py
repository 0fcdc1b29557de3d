#!/usr/bin/env python
"""Benchmark the GRPO token loss fused with the LM head, forward + backward, side by side.

Rows (same inputs; loss = GRPO clipped-ratio + k3 KL, docs/architecture.md):
  eager           torch eager zreward_fast.reference.grpo_token_loss (the spec: upcasts hidden and
                  W to fp32, fp32 [B*T, V] logits; fp32 GEMMs, TF32 off as torch's default)
  eager-native    the same math with the LM-head GEMM in the input dtype, logits upcast after it
                  (what a plain trainer does; only for 16-bit dtypes, identical to eager in fp32)
  compile         torch.compile of the reference
  compile-native  torch.compile of eager-native (16-bit dtypes only)
  liger           Liger-Kernel's LigerFusedLinearGRPOLoss (GPU only, if importable), mapped to
                  the same semantics: loss_type="grpo", token-level ratios, epsilon_low =
                  epsilon_high = clip_eps, the same beta / temperature / old / ref log-probs
  triton          the fused kernel through the public, validating zreward_fast.kernels API
                  (default chunking); triton-c<C> rows: the kernel with C-token chunks (--chunk)

speedup_vs_eager is relative to eager-native for 16-bit dtypes (a trainer's eager step, as in
the anchors of docs/architecture.md), else to eager; the baseline row says so in its note.

On a GPU: times from CUDA events after warm-up; peak extra memory = torch.cuda.max_memory_allocated
during one step minus what was allocated before it (the returned grads included: grad W alone is
V*H in the weight's dtype). Each impl is guarded: an OOM or error is recorded in its note. On
CPU: wall times, no memory column, and the Triton row is only an interpreter correctness smoke
test at a tiny shape, never a timing.

    python bench/bench_grpo_loss.py                       # CPU defaults (B4 T128 H256 V8192 fp32)
    python bench/bench_grpo_loss.py --device cuda         # GPU defaults (B16 T768 H4096 V248320 bf16)

Writes grpo_loss.csv and grpo_loss.png to --out-dir (default bench/results/<device-name>/).
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import (  # noqa: E402
    DTYPES, SHORT, Timer, max_abs_diff, add_roofline, add_speedups, device_name, error_note, pick_impls, print_table, results_dir,
    start_kernel_bench, timing_fields, write_results, add_output_args,
)
CSV_FIELDS = ["impl", "B", "T", "H", "V", "dtype", "device", "ms_median", "ms_p10", "ms_p90",
              "peak_extra_mb", "speedup_vs_eager", "note"]
ALL_IMPLS = ["eager", "eager-native", "compile", "compile-native", "liger", "triton"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--B", type=int, default=None, help="rollouts (default: 4 cpu, 16 cuda)")
    p.add_argument("--T", type=int, default=None, help="tokens per rollout (default: 128 cpu, 768 cuda)")
    p.add_argument("--H", type=int, default=None, help="hidden size (default: 256 cpu, 4096 cuda)")
    p.add_argument("--V", type=int, default=None, help="vocabulary (default: 8192 cpu, 248320 cuda)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp32 cpu, bf16 cuda")
    p.add_argument("--repeats", type=int, default=None, help="timed iterations (default: 5 cpu, 10 cuda)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations after the first call (default 1)")
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="per impl: fewer repeats (>= 3) when the first call shows they would take longer")
    p.add_argument("--chunk", default="auto",
                   help="comma list of Triton chunk sizes in tokens; 'auto' = the public API's default")
    p.add_argument("--impls", default="all", help="comma list of " + ",".join(ALL_IMPLS))
    p.add_argument("--clip-eps", type=float, default=0.2)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--weight-grad", choices=["yes", "no"], default="yes",
                   help="whether the LM head needs a gradient (no: a frozen head, e.g. LoRA)")
    add_output_args(p, graph=False)
    a = p.parse_args(argv)
    gpu = a.device.startswith("cuda")
    a.B = a.B or (16 if gpu else 4)
    a.T = a.T or (768 if gpu else 128)
    a.H = a.H or (4096 if gpu else 256)
    a.V = a.V or (248320 if gpu else 8192)
    a.dtype = DTYPES[a.dtype or ("bf16" if gpu else "fp32")]
    a.repeats = a.repeats or (10 if gpu else 5)
    a.warmup = a.warmup if a.warmup is not None else 1
    return a


def native_grpo_token_loss(hidden, weight, token_ids, mask, advantages, old_logprobs=None, ref_logprobs=None,
                           clip_eps=0.2, beta=0.04, temperature=1.0):
    """reference.grpo_token_loss with the LM-head GEMM in the input dtype (logits upcast after it)."""
    import torch

    from zreward_fast.reference import grpo_loss_from_logprobs

    logits = (hidden @ weight.T).float() / temperature
    lp = torch.log_softmax(logits, dim=-1).gather(-1, token_ids[..., None].long()).squeeze(-1)
    return grpo_loss_from_logprobs(lp, mask, advantages, old_logprobs, ref_logprobs, clip_eps, beta), lp.detach()


def make_inputs(B, T, H, V, dtype, device, temperature, weight_grad, seed=0):
    """hidden, weight, ids, mask (random lengths in [T/2, T]), advantages, old and ref log-probs.

    old/ref are the true log-probs perturbed, so ratios spread over ~[0.74, 1.35] and the clip
    is active for part of the tokens, as in a real GRPO step.
    """
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    kw = dict(device=device, generator=g)
    hidden = torch.randn(B, T, H, **kw).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, **kw) * (1.5 / math.sqrt(H))).to(dtype).requires_grad_(weight_grad)
    ids = torch.randint(0, V, (B, T), **kw)
    lengths = torch.randint(T // 2, T + 1, (B,), **kw)
    mask = (torch.arange(T, device=device)[None, :] < lengths[:, None]).float()
    adv = torch.randn(B, **kw)
    with torch.no_grad():  # true log-probs, chunked: never the full [B*T, V] at once
        h2, i2 = hidden.reshape(-1, H), ids.reshape(-1)
        lp = torch.empty(B * T, device=device)
        for s in range(0, B * T, 1024):
            z = (h2[s:s + 1024] @ weight.T).float() / temperature
            lp[s:s + 1024] = z.log_softmax(-1).gather(-1, i2[s:s + 1024, None]).squeeze(-1)
            del z
        lp = lp.view(B, T)
    old = lp - (torch.rand(B, T, **kw) * 0.6 - 0.3)
    ref = lp + 0.1 * torch.randn(B, T, **kw)
    return hidden, weight, ids, mask, adv, old, ref


def main(argv=None) -> int:
    args = parse_args(argv)
    # the compiled kernels on a GPU, the interpreter (smoke test only) on CPU
    gpu = start_kernel_bench(args.device, interpret=not args.device.startswith("cuda"))
    import torch

    import zreward_fast.kernels as zk
    from zreward_fast import reference

    dtype = getattr(torch, args.dtype)
    dev = args.device
    short = SHORT[args.dtype]
    dname = device_name(dev)
    impls = pick_impls(args.impls, ALL_IMPLS)
    chunks = [c.strip() for c in args.chunk.split(",") if c.strip()]
    out_dir = results_dir(args.out_dir, dev)
    timer = Timer(dev)
    B, T, H, V = args.B, args.T, args.H, args.V
    hp = dict(clip_eps=args.clip_eps, beta=args.beta, temperature=args.temperature)
    wg = args.weight_grad == "yes"
    rows: list[dict] = []

    print(f"GRPO token loss fwd+bwd  B={B} T={T} H={H} V={V} {short} on {dname}  torch {torch.__version__}"
          f"  (W grad: {args.weight_grad})", flush=True)
    t0 = time.perf_counter()
    hidden, weight, ids, mask, adv, old, ref = make_inputs(B, T, H, V, dtype, dev, args.temperature, wg)
    params = [hidden, weight] if wg else [hidden]
    grad_mb = sum(p.numel() * p.element_size() for p in params) / 2**20
    timer.sync()
    print(f"  inputs ready in {time.perf_counter() - t0:.1f}s; the returned grads alone are {grad_mb:.0f} MB",
          flush=True)
    base_out: dict = {}  # loss, lp, grad hidden of the eager reference, for the error columns

    def step(fn):
        loss, lp = fn(hidden, weight, ids, mask, adv, old, ref, **hp)
        grads = torch.autograd.grad(loss, params)
        return loss, lp, grads

    def liger_fn():
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        mod = LigerFusedLinearGRPOLoss(beta=args.beta, use_ref_model=True, epsilon_low=args.clip_eps,
                                       epsilon_high=args.clip_eps, loss_type="grpo",
                                       temperature=args.temperature)

        def fn(hidden, weight, ids, mask, adv, old, ref, **_):
            loss, _metrics = mod(hidden, weight, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
            return loss, None

        return fn

    def base_row(impl):
        return dict(impl=impl, B=B, T=T, H=H, V=V, dtype=short, device=dname)

    plan: list[tuple[str, object, str]] = []  # (row name, fn factory, note prefix)
    for impl in impls:
        if impl in ("eager-native", "compile-native") and dtype == torch.float32:
            continue  # identical to eager / compile in fp32
        if impl == "eager":
            plan.append((impl, lambda: reference.grpo_token_loss, "reference (fp32 upcast GEMMs)"))
        elif impl == "eager-native":
            plan.append((impl, lambda: native_grpo_token_loss, f"GEMM in {short}, fp32 logits"))
        elif impl == "compile":
            plan.append((impl, lambda: torch.compile(reference.grpo_token_loss), "torch.compile(reference)"))
        elif impl == "compile-native":
            plan.append((impl, lambda: torch.compile(native_grpo_token_loss), f"torch.compile, GEMM in {short}"))
        elif impl == "liger":
            plan.append((impl, liger_fn, "Liger loss_type=grpo, chunk_size=1 (default); no token_logprobs out"))
        elif impl == "triton":
            for c in chunks:
                if c == "auto":
                    plan.append(("triton", lambda: zk.grpo_token_loss, "public API (validates), default chunking"))
                else:
                    def factory(c=int(c)):
                        from zreward_fast.kernels.grpo import GRPOLaunchConfig

                        return partial(zk.grpo_token_loss, validate=False, launch_config=GRPOLaunchConfig(chunk_rows=c))

                    plan.append((f"triton-c{int(c)}", factory, f"kernel, chunks of {int(c)} tokens"))

    for name, factory, prefix in plan:
        row = base_row(name)
        if name.startswith("triton") and not gpu:
            row["note"] = "CPU: Triton runs only under the interpreter; " + interpreter_smoke(zk, reference, torch)
            rows.append(row)
            print(f"  {name:16s} {row['note']}", flush=True)
            continue
        if name == "liger" and not gpu:
            row["note"] = "skipped: Liger-Kernel row is GPU only"
            rows.append(row)
            print(f"  {name:16s} {row['note']}", flush=True)
            continue
        out = None
        try:
            fn = factory()
            t1 = time.perf_counter()
            out = step(fn)  # first call: compiles / autotunes; also the correctness check
            timer.sync()
            first_s = time.perf_counter() - t1
            note = [prefix, f"first call {first_s:.1f}s"]
            if name == "eager":
                base_out.update(loss=out[0].item(), lp=out[1].detach(), gh=out[2][0].detach())
            elif base_out:
                note.append(f"|dloss| vs eager {abs(out[0].item() - base_out['loss']):.1e}")
                if out[1] is not None:
                    note.append(f"max|dlp| {(out[1].float() - base_out['lp']).abs().max().item():.1e}")
                gh = out[2][0].float()
                rel = ((gh - base_out["gh"].float()).norm() / base_out["gh"].float().norm().clamp_min(1e-30)).item()
                note.append(f"rel err grad_h {rel:.1e}")
            del out
            out = None
            t1 = time.perf_counter()
            for _ in range(args.warmup):
                step(fn)
            timer.sync()
            per_s = (time.perf_counter() - t1) / args.warmup if args.warmup else first_s
            peak = timer.peak_extra_mb(lambda: step(fn))
            reps = max(3, min(args.repeats, int(args.max_seconds / max(per_s, 1e-3))))
            times = timer.times(lambda: step(fn), reps)
            if name.startswith("triton") and gpu:
                from zreward_fast.kernels import grpo as grpo_mod

                cfg = grpo_mod.GRPOLaunchConfig.default(hidden.device) if name == "triton" else \
                    grpo_mod.GRPOLaunchConfig(chunk_rows=int(name[len("triton-c"):]))
                c = cfg.rows(B * T, V)
                note.append(f"C={c} ({math.ceil(B * T / c)} chunks), fp32-out logits GEMM: {grpo_mod.FP32_OUT_GEMM}")
        except Exception as e:  # noqa: BLE001 - record the failure (OOM included) and move on
            out = None
            row["note"] = f"{prefix}; failed: {error_note(e)}"
            rows.append(row)
            print(f"  {name:16s} {row['note']}", flush=True)
            _free(torch, gpu)
            continue
        row.update(**timing_fields(times), peak_extra_mb=peak, note="; ".join(note) + f"; {len(times)} timed runs")
        rows.append(row)
        mem = f"{peak:10.0f} MB" if peak is not None else ""
        print(f"  {name:16s} {row['ms_median']:10.2f} ms {mem}", flush=True)
        del fn
        _free(torch, gpu)

    # Speedup baseline: eager-native for 16-bit inputs (a trainer's eager step, like the docs/architecture.md
    # section 7 anchor), else the eager reference.
    base = next((r for name in ("eager-native", "eager") for r in rows
                 if r["impl"] == name and r.get("ms_median")), None)
    if base:
        base["note"] += "; speedup baseline"
    if base:
        add_speedups(rows, base["impl"], "speedup_vs_eager")
    # the op's floor: the [B*T, H] x [H, V] logits GEMM forward and its two backward GEMMs (grad_h,
    # grad_W), the LM head read twice and its grad written, the hidden read twice and its grad written
    elt = torch.empty((), dtype=dtype).element_size()
    add_roofline(rows, elt * (3 * V * H + 3 * B * T * H) + 4 * 4 * B * T, 6 * B * T * H * V)
    print_table(rows, speedup_key="speedup_vs_eager", mem_key="peak_extra_mb")
    write_results(rows, out_dir, "grpo_loss", CSV_FIELDS,
                  f"GRPO token loss fwd+bwd: B={B} T={T} H={H} V={V} {short}, W grad {args.weight_grad}, {dname}",
                  mem_key="peak_extra_mb")
    return 0


def _free(torch, gpu: bool) -> None:
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()


def interpreter_smoke(zk, reference, torch) -> str:
    """Triton kernel under the interpreter vs the reference at a tiny shape: correctness only."""
    if not zk.use_triton("cpu") or zk._grpo_kernels is None:
        return "skipped: Triton interpreter not active"
    B, T, H, V = 2, 16, 64, 1000
    hidden, weight, ids, mask, adv, old, ref = make_inputs(B, T, H, V, torch.float32, "cpu", 0.7, True)
    res = []
    for fn in (zk.grpo_token_loss, reference.grpo_token_loss):
        loss, lp = fn(hidden, weight, ids, mask, adv, old, ref, clip_eps=0.2, beta=0.04, temperature=0.7)
        res.append((loss, lp, torch.autograd.grad(loss, (hidden, weight))))
    (l1, lp1, g1), (l2, lp2, g2) = res
    eg = max_abs_diff(g1, g2)
    return (f"interpreter correctness smoke at B={B} T={T} H={H} V={V} fp32 (not a timing): "
            f"|dloss|={abs(l1.item() - l2.item()):.1e} max|dlp|={(lp1 - lp2).abs().max().item():.1e} "
            f"max|dgrad|={eg:.1e}")


if __name__ == "__main__":
    sys.exit(main())
