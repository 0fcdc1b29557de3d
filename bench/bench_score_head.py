#!/usr/bin/env python
"""Benchmark the score-token head, forward + backward, side by side in one run.

Rows (same inputs, same random upstream grads for all six outputs):
  eager-full-logits   torch eager on full-vocabulary logits: hidden @ W.T [N, V] -> K columns
  eager-gathered      torch eager on the K gathered rows (zreward_fast.reference.score_head)
  compile-gathered    torch.compile of the reference
  triton              the fused kernel through the public, validating zreward_fast.kernels.score_head
  triton-kernel       the fused kernel without validation (GPU only)

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
import csv
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import device_name, quantile  # noqa: E402
CSV_FIELDS = ["impl", "N", "H", "V", "K", "dtype", "device", "ms_median", "ms_p10", "ms_p90",
              "peak_mem_mb", "speedup_vs_gathered_eager", "weight_grad", "note"]
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--N", type=int, default=None, help="positions (default: 1024 cpu, 4096 cuda)")
    p.add_argument("--H", type=int, default=None, help="hidden size (default: 1024 cpu, 4096 cuda)")
    p.add_argument("--V", type=int, default=None, help="vocabulary (default: 32000 cpu, 248320 cuda)")
    p.add_argument("--K", type=int, default=9, help="score tokens")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp32 cpu, bf16 cuda")
    p.add_argument("--repeats", type=int, default=None, help="timed iterations (default: 5 cpu, 50 cuda)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations (default: 1 cpu, 5 cuda)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--bias", action="store_true", help="give the head a bias")
    p.add_argument("--weight-grad", choices=["yes", "no", "both"], default=None,
                   help="whether the LM head weight needs grad (its [V, H] grad is mostly a memset); "
                        "default: both on cuda, yes on cpu")
    p.add_argument("--impls", default="all",
                   help="comma list of eager-full-logits,eager-gathered,compile-gathered,triton,triton-kernel")
    p.add_argument("--interpret", action="store_true",
                   help="CPU: run the Triton kernels under TRITON_INTERPRET=1 at a tiny shape (smoke, not perf)")
    p.add_argument("--out-dir", default=None)
    a = p.parse_args(argv)
    gpu = a.device.startswith("cuda")
    a.N = a.N or (4096 if gpu else 1024)
    a.H = a.H or (4096 if gpu else 1024)
    a.V = a.V or (248320 if gpu else 32000)
    a.dtype = DTYPES[a.dtype or ("bf16" if gpu else "fp32")]
    a.repeats = a.repeats or (50 if gpu else 5)
    a.warmup = a.warmup if a.warmup is not None else (5 if gpu else 1)
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


class Timer:
    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.cuda = device.startswith("cuda")

    def time(self, fn, repeats: int, warmup: int) -> tuple[list[float], float | None]:
        torch = self.torch
        for _ in range(warmup):
            fn()
        peak = None
        if self.cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return times, peak


def main(argv=None) -> int:
    args = parse_args(argv)
    gpu = args.device.startswith("cuda")
    if args.interpret and not gpu:
        # Must precede the first import of the kernel module (triton.jit reads it then).
        os.environ["TRITON_INTERPRET"] = "1"
    elif gpu:
        os.environ.setdefault("TRITON_INTERPRET", "0")
    sys.path.insert(0, str(ROOT))
    import torch

    import zreward_fast.kernels as zk
    from zreward_fast import reference

    if gpu and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    dev = args.device
    impls_all = ["eager-full-logits", "eager-gathered", "compile-gathered", "triton"] + (["triton-kernel"] if gpu else [])
    impls = impls_all if args.impls == "all" else [s.strip() for s in args.impls.split(",")]
    out_dir = Path(args.out_dir) if args.out_dir else ROOT / "bench" / "results" / device_name(dev)
    out_dir.mkdir(parents=True, exist_ok=True)
    timer = Timer(dev)
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[args.dtype]
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

        for impl in impls:
            row = base_row(impl)
            fn = None
            if impl == "eager-full-logits":
                fn = eager_full_logits
            elif impl == "eager-gathered":
                fn = reference.score_head
            elif impl == "compile-gathered":
                fn = torch.compile(reference.score_head)
            elif impl in ("triton", "triton-kernel"):
                if not gpu:
                    row["note"] = "skipped: Triton needs a GPU (--interpret runs a CPU smoke test instead)"
                    if args.interpret and impl == "triton":
                        row.update(interpreter_smoke(zk, reference, torch))
                    rows.append(row)
                    print(f"  {impl:18s} {row['note']}", flush=True)
                    continue
                if impl == "triton":
                    fn = zk.score_head
                else:
                    from zreward_fast.kernels.fused_score_head import score_head_triton

                    fn = score_head_triton
            else:
                raise SystemExit(f"unknown impl {impl!r}")
            try:
                t0 = time.perf_counter()
                out = step(fn)  # first call: compiles/autotunes; also the correctness check
                first_s = time.perf_counter() - t0
                err = max((a.float() - b.float()).abs().max().item() for a, b in zip(out, ref_out))
                times, peak = timer.time(lambda: step(fn), args.repeats, args.warmup)
            except Exception as e:  # noqa: BLE001 - record the failure and move on
                msg = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
                row["note"] = msg
                rows.append(row)
                print(f"  {impl:18s} {msg}", flush=True)
                continue
            row.update(ms_median=statistics.median(times), ms_p10=quantile(times, 0.1),
                       ms_p90=quantile(times, 0.9), peak_mem_mb=peak,
                       note=f"max|out-ref|={err:.1e}; first call {first_s:.1f}s")
            rows.append(row)
            print(f"  {impl:18s} {row['ms_median']:10.3f} ms", flush=True)
        del hidden, weight, bias, grads, ref_out
        if gpu:
            torch.cuda.empty_cache()

    for r in rows:  # speedup relative to eager-gathered with the same weight-grad setting
        base = next((b for b in rows if b["impl"] == "eager-gathered" and b["weight_grad"] == r["weight_grad"]
                     and b.get("ms_median")), None)
        if base and r.get("ms_median"):
            r["speedup_vs_gathered_eager"] = base["ms_median"] / r["ms_median"]

    csv_path = out_dir / "score_head.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in CSV_FIELDS})
    png_path = out_dir / "score_head.png"
    try:
        plot(rows, png_path, f"score head fwd+bwd: N={args.N} H={args.H} V={args.V} K={args.K} {short}, "
                             f"{device_name(dev)}")
    except ImportError as e:  # e.g. a GPU machine's python without matplotlib: the CSV is what counts
        print(f"no plot: {e}")
        png_path = None
    print_table(rows)
    print(f"wrote {csv_path}" + (f" and {png_path}" if png_path else ""))
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
    eo = max((a - b).abs().max().item() for a, b in zip(o1, o2))
    eg = max((a - b).abs().max().item() for a, b in zip(g1, g2))
    return {"note": f"interpreter correctness smoke at N={n} H={h} V={v} K={k} fp32 (not a timing): "
                    f"max|out-ref|={eo:.1e} max|grad-ref|={eg:.1e}"}


def _fmt(x):
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.4g}"
    return x


def print_table(rows: list[dict]) -> None:
    print(f"\n{'impl':18s} {'wgrad':5s} {'ms':>10s} {'p10':>9s} {'p90':>9s} {'peak MB':>9s} {'speedup':>8s}")
    for r in rows:
        if r.get("ms_median") is None:
            print(f"{r['impl']:18s} {r['weight_grad']:5s} {'-':>10s}  {r.get('note', '')}")
            continue
        peak = f"{r['peak_mem_mb']:9.1f}" if r.get("peak_mem_mb") is not None else f"{'n/a':>9s}"
        sp = f"{r['speedup_vs_gathered_eager']:7.2f}x" if r.get("speedup_vs_gathered_eager") else f"{'':8s}"
        print(f"{r['impl']:18s} {r['weight_grad']:5s} {r['ms_median']:10.3f} {r['ms_p10']:9.3f} {r['ms_p90']:9.3f} {peak} {sp}")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.get("ms_median") is not None]
    has_mem = any(r.get("peak_mem_mb") is not None for r in timed)
    fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(11 if has_mem else 7, 4.2), squeeze=False)
    labels = [f"{r['impl']}\n(W grad {r['weight_grad']})" for r in timed]
    colors = ["#4C72B0" if r["weight_grad"] == "yes" else "#DD8452" for r in timed]
    ax = axes[0][0]
    med = [r["ms_median"] for r in timed]
    err = [[m - r["ms_p10"] for m, r in zip(med, timed)], [r["ms_p90"] - m for m, r in zip(med, timed)]]
    bars = ax.bar(range(len(timed)), med, yerr=err, color=colors, capsize=3)
    ax.set_yscale("log")
    ax.set_ylabel("fwd+bwd time, ms (median, p10-p90)")
    for b, r in zip(bars, timed):
        txt = f"{r['ms_median']:.3g}"
        if r.get("speedup_vs_gathered_eager"):
            txt += f"\n{r['speedup_vs_gathered_eager']:.2f}x"
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), txt, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(timed)), labels, rotation=30, ha="right", fontsize=7)
    if has_mem:
        ax2 = axes[0][1]
        ax2.bar(range(len(timed)), [r.get("peak_mem_mb") or 0 for r in timed], color=colors)
        ax2.set_ylabel("peak extra memory, MB")
        ax2.set_xticks(range(len(timed)), labels, rotation=30, ha="right", fontsize=7)
    skipped = [f"{r['impl']}: {r.get('note', '')}" for r in rows if r.get("ms_median") is None]
    if skipped:
        fig.text(0.01, 0.01, "\n".join(s[:140] for s in skipped), fontsize=6, va="bottom")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04 * len(skipped), 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
