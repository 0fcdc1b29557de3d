#!/usr/bin/env python
"""Benchmark the GDSO group losses, forward + backward, side by side in one run.

Rows (same inputs, same random upstream grads on loss, loss_pt and loss_pw for all):
  eager          torch eager reference (zreward_fast.reference.gdso_loss)
  compile        torch.compile of the reference
  triton         the fused kernels through the public, validating zreward_fast.kernels.gdso_loss
                 (validation reads a few flags back from the device: one host sync per call)
  triton-kernel  the fused kernels without validation (gdso_loss(..., validate=False)): 2 launches forward,
                 1 backward, no host sync

On a GPU: per-iteration times from CUDA events after warm-up (a step this small is bound by
launch and Python overhead, which the events include, as they would in training). On CPU: wall
times of eager and compile only. The Triton kernels only run on CPU under the interpreter: there
the triton row is a correctness smoke run at the same shape (in a child process), never a
timing. CPU times on a small shared machine swing with other load: compare p10 as well.

    python bench/bench_gdso_loss.py                  # CPU defaults (P=64 G=8 K=9 fp32)
    python bench/bench_gdso_loss.py --device cuda    # GPU defaults (P=64 G=8 K=9 bf16)

Writes gdso_loss.csv and gdso_loss.png to --out-dir (default bench/results/<device-name>/, the
directory naming of bench_score_head.py).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import (  # noqa: E402
    DTYPES, SHORT, Timer, max_abs_diff, add_output_args, add_roofline, add_speedups, graph_rows, pick_impls, print_table, results_dir,
    start_kernel_bench, time_row, write_results,
)
from common import device_name as _device_name  # noqa: E402
CSV_FIELDS = ["impl", "P", "G", "K", "dtype", "device", "ms_median", "ms_p10", "ms_p90", "speedup_vs_eager", "note"]
HP = dict(alpha_pt=1.0, alpha_pw=1.0, lambda_pt=0.5, lambda_pw=0.5, eps=1e-4)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--P", type=int, default=64, help="instances (prompt x dimension)")
    p.add_argument("--G", type=int, default=8, help="rollouts per side (>= 2)")
    p.add_argument("--K", type=int, default=9, help="score levels")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp32 cpu, bf16 cuda")
    p.add_argument("--repeats", type=int, default=None, help="timed iterations (default: 20 cpu, 200 cuda)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations (default: 3 cpu, 20 cuda)")
    p.add_argument("--impls", default="all", help="comma list of eager,compile,triton,triton-kernel")
    p.add_argument("--no-interpret", action="store_true",
                   help="CPU: skip the Triton interpreter correctness smoke")
    add_output_args(p)
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # the interpreter child
    a = p.parse_args(argv)
    gpu = a.device.startswith("cuda")
    a.dtype = DTYPES[a.dtype or ("bf16" if gpu else "fp32")]
    a.repeats = a.repeats or (200 if gpu else 20)
    a.warmup = a.warmup if a.warmup is not None else (20 if gpu else 3)
    if a.G < 2:
        p.error("--G must be >= 2")
    return a


def make_inputs(P, G, K, dtype, device, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    z = (1.5 * torch.randn(P, 2, G, K, generator=g)).to(device, dtype).requires_grad_()
    levels = torch.linspace(0.0, 4.0, K, device=device)
    targets = (4.0 * torch.rand(P, 2, generator=g)).to(device, dtype)
    grads = [torch.randn((), generator=g).to(device) for _ in range(3)]
    return z, targets, levels, grads


def interpreter_smoke(P, G, K) -> str:
    """Run `_smoke` in a child process with TRITON_INTERPRET=1; returns its one-line note.

    A child, because the interpreter is chosen when triton is first imported: the timing process
    stays a plain one, as on a machine without the interpreter.
    """
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--smoke", "--P", str(P), "--G", str(G), "--K", str(K)]
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "interpreter smoke: timed out"
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("interpreter")]
    if res.returncode or not lines:
        tail = (res.stderr.strip().splitlines() or ["?"])[-1][:160]
        return f"interpreter smoke failed (rc={res.returncode}): {tail}"
    return lines[-1]


def _smoke(P, G, K) -> int:
    sys.path.insert(0, str(ROOT))
    import torch

    import zreward_fast.kernels as zk
    from zreward_fast import reference

    if not zk.use_triton("cpu") or zk._gdso_kernels is None:
        print("interpreter smoke skipped: Triton interpreter not active")
        return 0
    z, t, lv, grads = make_inputs(P, G, K, torch.float32, "cpu")
    res = []
    for fn in (zk.gdso_loss, reference.gdso_loss):
        out = fn(z, t, lv, **HP)
        res.append((out, torch.autograd.grad(list(out[:3]), z, grads)[0]))
    (o1, g1), (o2, g2) = res
    eo = max_abs_diff(o1, o2)
    eg = (g1 - g2).abs().max().item()
    print(f"interpreter correctness smoke at P={P} G={G} K={K} fp32 (not a timing): "
          f"max|out-ref|={eo:.1e} max|grad-ref|={eg:.1e}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        return _smoke(args.P, args.G, args.K)
    # compiled kernels on a GPU; on CPU no interpreter in this (timing) process
    gpu = start_kernel_bench(args.device, interpret=False)
    import torch

    import zreward_fast.kernels as zk
    from zreward_fast import reference

    device_name = _device_name(args.device)
    dtype = getattr(torch, args.dtype)
    short = SHORT[args.dtype]
    dev = args.device
    P, G, K = args.P, args.G, args.K
    impls = pick_impls(args.impls, ["eager", "compile", "triton", "triton-kernel"])
    out_dir = results_dir(args.out_dir, dev)
    timer = Timer(dev)

    print(f"GDSO loss fwd+bwd  P={P} G={G} K={K} {short} on {device_name}  torch {torch.__version__}", flush=True)
    z, t, lv, grads = make_inputs(P, G, K, dtype, dev)
    with torch.no_grad():
        ref_out = reference.gdso_loss(z, t, lv, **HP)

    def step(fn):
        out = fn(z, t, lv, **HP)
        torch.autograd.grad(list(out[:3]), z, grads)
        return out

    rows: list[dict] = []
    fns = {}  # impl -> its timed step, for the graph-replay rows
    for impl in impls:
        row = dict(impl=impl, P=P, G=G, K=K, dtype=short, device=device_name)
        if impl == "eager":
            fn = reference.gdso_loss
        elif impl == "compile":
            fn = torch.compile(reference.gdso_loss)
        elif impl in ("triton", "triton-kernel"):
            if zk._gdso_kernels is None:
                row["note"] = "skipped: Triton (or zreward_fast.kernels.gdso) not importable"
            elif not gpu:
                row["note"] = "skipped: Triton needs a GPU"
                if impl == "triton" and not args.no_interpret:
                    row["note"] = interpreter_smoke(P, G, K)
            if "note" in row:
                rows.append(row)
                print(f"  {impl:14s} {row['note']}", flush=True)
                continue
            fn = zk.gdso_loss if impl == "triton" else partial(zk.gdso_loss, validate=False)
        else:
            raise SystemExit(f"unknown impl {impl!r}")
        rows.append(row)
        if time_row(row, lambda fn=fn: step(fn), ref_out, timer, args.repeats, args.warmup, width=14):
            fns[impl] = lambda fn=fn: step(fn)
    if gpu and not args.no_graph:  # the public op syncs once a call to validate: not capturable
        graph_rows(rows, fns, ["eager", "compile", "triton-kernel"], timer, args.repeats)

    add_speedups(rows, "eager", "speedup_vs_eager")
    # the op's floor: the [P, 2, G, K] logits read and their grad written, the pairwise |mu_i - mu_j|
    # terms (2 G^2 per instance) and the K-level softmaxes; microseconds: these calls are launch-bound
    elt = torch.empty((), dtype=dtype).element_size()
    add_roofline(rows, 2 * elt * P * 2 * G * K + 4 * P * 2, P * (2 * G * K * 10 + 2 * G * G * 4))
    print_table(rows, note=True)
    write_results(rows, out_dir, "gdso_loss", CSV_FIELDS, f"GDSO loss fwd+bwd: P={P} G={G} K={K} {short}, {device_name}",
                  color=lambda r: "#4C72B0" if r["impl"] in ("eager", "compile") else "#55A868")
    return 0


if __name__ == "__main__":
    sys.exit(main())
