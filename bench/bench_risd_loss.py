#!/usr/bin/env python
"""Benchmark the RISD distillation loss, forward + backward, side by side in one run.

Rows (same inputs, same teacher, loss reduced by --reduction, grads of hidden, weight and bias):
  eager-full-logits   torch eager on full-vocabulary logits: hidden @ W.T [N, V] -> K columns,
                      log_softmax, KL (what a plain model + loss does)
  eager-gathered      torch eager on the K gathered rows (zreward_fast.reference.risd_loss):
                      the baseline every speedup is relative to
  compile-gathered    torch.compile of the reference
  triton              the fused kernel through the public, validating zreward_fast.kernels.risd_loss
                      (validation syncs with the host once per call)
  triton-kernel       the fused kernel without validation (risd_loss(..., validate=False))

Two weight layouts, marked in the `weight` column:
  head    weight is the full LM head [V, H] and needs grad: its [V, H] gradient (mostly a
          memset: 2 GB at V=248320, H=4096, bf16) costs about the same for every implementation
  k-rows  weight is just the K score rows (V = K, token_ids = arange(K)), trained as their own
          parameter as the RISD trainer does (docs/architecture.md); eager-full-logits is the
          same computation there and is not run

On a GPU: times from CUDA events after warm-up, peak memory = torch.cuda.max_memory_allocated
above what the inputs already hold. On CPU: wall times; peak memory is not tracked. The Triton
kernels only run on CPU under the interpreter: that row is a correctness smoke at a tiny shape,
never a timing.

    python bench/bench_risd_loss.py                      # CPU defaults (+ interpreter smoke)
    python bench/bench_risd_loss.py --device cuda        # GPU defaults (N=H=4096, V=248320, bf16)

Writes risd_loss.csv and risd_loss.png to --out-dir (default bench/results/<device-name>/, the
same directory name as bench_score_head.py uses).
"""
from __future__ import annotations

import argparse
import math
import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    SHORT, Timer, add_output_args, add_roofline, add_score_rows_args, add_speedups, device_name, fill_score_rows_defaults,
    graph_rows, max_abs_diff, pick_impls, print_table, results_dir, start_kernel_bench, time_row, variant_style,
    write_results,
)

CSV_FIELDS = ["impl", "N", "H", "V", "K", "weight", "dtype", "device", "ms_median", "ms_p10", "ms_p90",
              "peak_mem_mb", "speedup_vs_gathered_eager", "note"]
SPEEDUP = "speedup_vs_gathered_eager"
IMPLS = ["eager-full-logits", "eager-gathered", "compile-gathered", "triton", "triton-kernel"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_score_rows_args(p)
    p.add_argument("--reduction", default="mean", choices=["mean", "sum", "none"],
                   help="'none' is back-propagated with random per-row grads")
    p.add_argument("--bias", action="store_true", help="give the head a bias")
    p.add_argument("--weight", choices=["head", "k-rows", "both"], default="both",
                   help="full LM head [V, H] with grad, the K score rows only (V=K), or both")
    p.add_argument("--impls", default="all", help="comma list of " + ",".join(IMPLS))
    p.add_argument("--interpret", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU: run the Triton kernels under TRITON_INTERPRET=1 at a tiny shape "
                        "(correctness smoke, not performance); default on for cpu")
    add_output_args(p)
    a = p.parse_args(argv)
    gpu = fill_score_rows_defaults(a)
    a.interpret = (not gpu) if a.interpret is None else (a.interpret and not gpu)
    return a


def make_inputs(n, h, v, k, dtype, device, bias, weight_mode, seed=0):
    """hidden, weight, token_ids, teacher_probs (fp32, rows sum to 1), bias; all grads wanted."""
    import torch

    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    if weight_mode == "k-rows":
        v = k
    weight = (torch.randn(v, h, generator=g) * (1.5 / math.sqrt(h))).to(device, dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.5).to(device, dtype).requires_grad_() if bias else None
    ids = (torch.arange(k) if weight_mode == "k-rows" else torch.randperm(v, generator=g)[:k]).to(device)
    teacher = torch.softmax(torch.randn(n, k, generator=g) * 2.0, -1).to(device)
    return hidden, weight, ids, teacher, b


def eager_full_logits(hidden, weight, token_ids, teacher_probs, bias=None, temperature=1.0, reduction="mean"):
    """What a plain model + loss does: full-vocabulary logits, then pick the K score columns."""
    import torch

    logits = hidden @ weight.T  # [N, V]
    if bias is not None:
        logits = logits + bias
    log_qs = torch.log_softmax(logits[:, token_ids].float() / temperature, -1)
    qt = teacher_probs.float()
    kl = torch.where(qt > 0, qt * (torch.log(qt.clamp_min(1e-38)) - log_qs), torch.zeros_like(log_qs)).sum(-1)
    return kl.mean() if reduction == "mean" else kl.sum() if reduction == "sum" else kl


def main(argv=None) -> int:
    args = parse_args(argv)
    gpu = start_kernel_bench(args.device, interpret=bool(args.interpret))
    import torch

    import zreward_fast.kernels as zk
    from zreward_fast import reference

    dtype = getattr(torch, args.dtype)
    dev = args.device
    impls = pick_impls(args.impls, IMPLS)
    dname = device_name(dev)
    out_dir = results_dir(args.out_dir, dev)
    timer = Timer(dev)
    short = SHORT[args.dtype]
    modes = ["head", "k-rows"] if args.weight == "both" else [args.weight]
    rows: list[dict] = []
    by_impl = {"eager-full-logits": eager_full_logits, "eager-gathered": reference.risd_loss,
               "compile-gathered": torch.compile(reference.risd_loss), "triton": zk.risd_loss,
               "triton-kernel": partial(zk.risd_loss, validate=False)}

    print(f"RISD loss fwd+bwd ({args.reduction})  N={args.N} H={args.H} V={args.V} K={args.K} {short} "
          f"on {dname}  torch {torch.__version__}", flush=True)
    for mode in modes:
        hidden, weight, ids, teacher, bias = make_inputs(args.N, args.H, args.V, args.K, dtype, dev, args.bias, mode)
        v = weight.shape[0]
        params = [t for t in (hidden, weight, bias) if t is not None]
        with torch.no_grad():
            ref_loss = reference.risd_loss(hidden, weight, ids, teacher, bias, args.temperature, args.reduction)
        g = torch.Generator().manual_seed(1)
        grad = torch.rand(ref_loss.shape, generator=g).to(dev) if args.reduction == "none" else None

        def step(fn):
            loss = fn(hidden, weight, ids, teacher, bias, args.temperature, args.reduction)
            torch.autograd.grad(loss, params, grad)
            return loss

        print(f" weight={mode} (V={v})", flush=True)
        start, fns = len(rows), {}
        for impl in impls:
            if (impl == "eager-full-logits" and mode == "k-rows") or (impl == "triton-kernel" and not gpu):
                continue  # V = K: the full logits are the gathered ones; the smoke covers both Triton rows
            row = dict(impl=impl, N=args.N, H=args.H, V=v, K=args.K, weight=mode, dtype=short, device=dname)
            rows.append(row)
            if impl.startswith("triton") and not gpu:
                row["note"] = "skipped: Triton needs a GPU (the interpreter is not a timing)"
                if args.interpret and mode == modes[0]:
                    row.update(interpreter_smoke(zk, reference, torch))
                print(f"  {impl:18s} {row['note']}", flush=True)
            elif time_row(row, lambda fn=by_impl[impl]: step(fn), ref_loss, timer, args.repeats, args.warmup):
                fns[impl] = lambda fn=by_impl[impl]: step(fn)
        if gpu and not args.no_graph:  # the public op checks each teacher batch with a host sync: not capturable
            graph_rows(rows, fns, ["eager-gathered", "compile-gathered", "triton-kernel"], timer, args.repeats, start)
        del hidden, weight, bias, teacher, params, ref_loss, fns
        if gpu:
            torch.cuda.empty_cache()

    # speedup relative to eager-gathered with the same weight layout
    add_speedups(rows, "eager-gathered", SPEEDUP, same=("weight",))
    # the op's floor: as the score head's, plus the teacher's [N, K] fp32 probabilities
    elt = torch.empty((), dtype=dtype).element_size()
    add_roofline(rows, elt * (3 * args.N * args.H + 3 * args.K * args.H) + 4 * args.N * args.K,
                 6 * args.N * args.H * args.K)
    print_table(rows, keys=("impl", "weight", "V"), speedup_key=SPEEDUP)
    write_results(rows, out_dir, "risd_loss", CSV_FIELDS,
                  f"RISD loss fwd+bwd ({args.reduction}): N={args.N} H={args.H} V={args.V} K={args.K} {short}, {dname}",
                  speedup_key=SPEEDUP, **variant_style("weight", "head", "weight"))
    return 0


def interpreter_smoke(zk, reference, torch) -> dict:
    """Triton kernels under the interpreter vs the reference at a tiny shape: correctness only."""
    if not zk.use_triton("cpu") or zk._risd_kernels is None:
        return {"note": "skipped: Triton interpreter not active"}
    n, h, v, k = 64, 256, 1000, 9
    e_loss = e_grad = 0.0
    for mode in ("head", "k-rows"):
        hidden, weight, ids, teacher, bias = make_inputs(n, h, v, k, torch.float32, "cpu", True, mode)
        for red in ("mean", "sum", "none"):
            res = []
            for fn in (zk.risd_loss, reference.risd_loss):
                loss = fn(hidden, weight, ids, teacher, bias, 0.7, red)
                g = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1))
                res.append((loss, torch.autograd.grad(loss, (hidden, weight, bias), g)))
            (l1, g1), (l2, g2) = res
            e_loss = max(e_loss, (l1 - l2).abs().max().item())
            e_grad = max(e_grad, max_abs_diff(g1, g2))
    return {"note": f"interpreter correctness smoke at N={n} H={h} V={v} and V=K, K={k}, fp32, 3 reductions "
                    f"(not a timing): max|loss-ref|={e_loss:.1e} max|grad-ref|={e_grad:.1e}"}


if __name__ == "__main__":
    sys.exit(main())
