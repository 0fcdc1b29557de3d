#!/usr/bin/env python
"""Benchmark the score-token head, forward + backward, side by side in one run.

Rows (same inputs, same random upstream grads for all six outputs):
  eager-full-logits   torch eager on full-vocabulary logits: hidden @ W.T [N, V] -> K columns
  eager-gathered      torch eager on the K gathered rows (zreward_fast.reference.score_head)
  compile-gathered    torch.compile of the reference
  triton              the fused kernel through the public, validating zreward_fast.kernels.score_head
  triton-kernel       the fused kernel without validation (score_head(..., validate=False); GPU only)

On a GPU: times from CUDA events, peak memory = torch.cuda.max_memory_allocated above what the
inputs already hold. On CPU: wall times; peak memory is not tracked (left empty). The Triton
kernels only run on CPU under the interpreter (--interpret): that row is a correctness smoke run
at a tiny shape, never a timing.

    python bench/bench_score_head.py                      # CPU defaults
    python bench/bench_score_head.py --device cuda        # GPU defaults (N=H=4096, V=248320, bf16)

Writes score_head.csv and score_head.png to --out-dir (default bench/results/<device-name>/).
"""
from __future__ import annotations

import argparse
import math
import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import (  # noqa: E402
    SHORT, Timer, add_output_args, add_roofline, add_score_rows_args, add_speedups, device_name, fill_score_rows_defaults,
    graph_rows, max_abs_diff, pick_impls, print_table, results_dir, start_kernel_bench, time_row, variant_style,
    write_results,
)
CSV_FIELDS = ["impl", "N", "H", "V", "K", "dtype", "device", "ms_median", "ms_p10", "ms_p90",
              "peak_mem_mb", "speedup_vs_gathered_eager", "weight_grad", "note"]
SPEEDUP = "speedup_vs_gathered_eager"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_score_rows_args(p)
    p.add_argument("--bias", action="store_true", help="give the head a bias")
    p.add_argument("--weight-grad", choices=["yes", "no", "both"], default=None,
                   help="whether the LM head weight needs grad (its [V, H] grad is mostly a memset); "
                        "default: both on cuda, yes on cpu")
    p.add_argument("--impls", default="all",
                   help="comma list of eager-full-logits,eager-gathered,compile-gathered,triton,triton-kernel")
    p.add_argument("--interpret", action="store_true",
                   help="CPU: run the Triton kernels under TRITON_INTERPRET=1 at a tiny shape (smoke, not perf)")
    add_output_args(p)
    a = p.parse_args(argv)
    gpu = fill_score_rows_defaults(a)
    a.weight_grad = a.weight_grad or ("both" if gpu else "yes")
    return a


def make_inputs(n, h, v, k, dtype, device, bias, weight_grad, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * (1.5 / math.sqrt(h))).to(device, dtype)
    weight.requires_grad_(weight_grad)
    b = (torch.randn(v, generator=g) * 0.5).to(device, dtype).requires_grad_() if bias else None
    ids = torch.randperm(v, generator=g)[:k].to(device)
    levels = torch.linspace(0.0, 4.0, k, device=device)
    return hidden, weight, ids, levels, b


def eager_full_logits(hidden, weight, token_ids, levels, bias=None, temperature=1.0):
    """What a plain model does: full-vocabulary logits, then pick the K score columns."""
    import torch

    from zreward_fast.reference import ScoreHeadOutput

    logits = hidden @ weight.T  # [N, V]
    if bias is not None:
        logits = logits + bias
    z = logits[:, token_ids].float() / temperature
    log_probs = torch.log_softmax(z, -1)
    probs = log_probs.exp()
    mean = (probs * levels).sum(-1)
    var = (probs * (levels - mean[:, None]).square()).sum(-1)
    entropy = -(probs * log_probs).sum(-1)
    return ScoreHeadOutput(z, log_probs, probs, mean, var, entropy)


def main(argv=None) -> int:
    args = parse_args(argv)
    gpu = start_kernel_bench(args.device, interpret=args.interpret and not args.device.startswith("cuda"))
    import torch

    import zreward_fast.kernels as zk
    from zreward_fast import reference

    dtype = getattr(torch, args.dtype)
    dev = args.device
    impls = pick_impls(args.impls, ["eager-full-logits", "eager-gathered", "compile-gathered", "triton"]
                       + (["triton-kernel"] if gpu else []))
    out_dir = results_dir(args.out_dir, dev)
    timer = Timer(dev)
    short = SHORT[args.dtype]
    rows: list[dict] = []
    wg_modes = {"yes": [True], "no": [False], "both": [True, False]}[args.weight_grad]

    print(f"score head fwd+bwd  N={args.N} H={args.H} V={args.V} K={args.K} {short} on {device_name(dev)}"
          f"  torch {torch.__version__}", flush=True)
    for wg in wg_modes:
        hidden, weight, ids, levels, bias = make_inputs(args.N, args.H, args.V, args.K, dtype, dev, args.bias, wg)
        params = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
        with torch.no_grad():
            ref_out = reference.score_head(hidden, weight, ids, levels, bias, args.temperature)
        g = torch.Generator().manual_seed(1)
        grads = [torch.randn(o.shape, generator=g).to(dev) for o in ref_out]

        def step(fn):
            out = fn(hidden, weight, ids, levels, bias, args.temperature)
            torch.autograd.grad(list(out), params, grads)
            return out

        def base_row(impl):
            return dict(impl=impl, N=args.N, H=args.H, V=args.V, K=args.K, dtype=short, device=device_name(dev),
                        weight_grad="yes" if wg else "no")

        start, fns = len(rows), {}
        by_impl = {"eager-full-logits": eager_full_logits, "eager-gathered": reference.score_head,
                   "compile-gathered": torch.compile(reference.score_head), "triton": zk.score_head,
                   "triton-kernel": partial(zk.score_head, validate=False)}
        for impl in impls:
            row = base_row(impl)
            rows.append(row)
            if impl.startswith("triton") and not gpu:
                row["note"] = "skipped: Triton needs a GPU (--interpret runs a CPU smoke test instead)"
                if args.interpret and impl == "triton":
                    row.update(interpreter_smoke(zk, reference, torch))
                print(f"  {impl:18s} {row['note']}", flush=True)
            elif time_row(row, lambda fn=by_impl[impl]: step(fn), ref_out, timer, args.repeats, args.warmup):
                fns[impl] = lambda fn=by_impl[impl]: step(fn)
        if gpu and not args.no_graph:  # the public op last: its id/level checks must be cached to capture
            graph_rows(rows, fns, ["eager-gathered", "compile-gathered", "triton-kernel", "triton"], timer,
                       args.repeats, start)
        del hidden, weight, bias, grads, ref_out, fns
        if gpu:
            torch.cuda.empty_cache()

    # speedup relative to eager-gathered with the same weight-grad setting
    add_speedups(rows, "eager-gathered", SPEEDUP, same=("weight_grad",))
    # the op's floor: hidden read twice and its grad written; the K rows read, their grad written
    elt = torch.empty((), dtype=dtype).element_size()
    add_roofline(rows, elt * (3 * args.N * args.H + 3 * args.K * args.H), 6 * args.N * args.H * args.K)
    print_table(rows, keys=("impl", "weight_grad"), speedup_key=SPEEDUP)
    write_results(rows, out_dir, "score_head", CSV_FIELDS,
                  f"score head fwd+bwd: N={args.N} H={args.H} V={args.V} K={args.K} {short}, {device_name(dev)}",
                  speedup_key=SPEEDUP, **variant_style("weight_grad", "yes", "W grad"))
    return 0


def interpreter_smoke(zk, reference, torch) -> dict:
    """Triton kernels under the interpreter vs the reference at a tiny shape: correctness only."""
    if not zk.use_triton("cpu"):
        return {"note": "skipped: Triton interpreter not active"}
    n, h, v, k = 64, 256, 1000, 9
    hidden, weight, ids, levels, bias = make_inputs(n, h, v, k, torch.float32, "cpu", True, True)
    res = []
    for fn in (zk.score_head, reference.score_head):
        out = fn(hidden, weight, ids, levels, bias, 0.7)
        g = torch.Generator().manual_seed(1)
        grads = [torch.randn(o.shape, generator=g) for o in out]
        res.append((out, torch.autograd.grad(list(out), (hidden, weight, bias), grads)))
    (o1, g1), (o2, g2) = res
    eo, eg = max_abs_diff(o1, o2), max_abs_diff(g1, g2)
    return {"note": f"interpreter correctness smoke at N={n} H={h} V={v} K={k} fp32 (not a timing): "
                    f"max|out-ref|={eo:.1e} max|grad-ref|={eg:.1e}"}


if __name__ == "__main__":
    sys.exit(main())
