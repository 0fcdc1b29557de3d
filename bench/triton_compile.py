"""Compile every Triton kernel ahead of time for sm_80 and sm_90 on this machine, no GPU needed.

The interpreter (the CPU tests) never compiles a kernel, so a kernel that does not compile for a
real GPU (a bad constexpr, a type the backend refuses, a layout ptxas rejects) would first fail in
the rare minutes of a lent GPU. This script finds that here:

1. **record** (this process, ``TRITON_INTERPRET=1`` so no CUDA driver is needed): every public
   Triton entry point runs forward and backward with bf16 inputs and the launch configurations the
   dispatchers pick on a GPU (the modules' ``INTERPRET`` switched off, so the drivers take their GPU
   paths), each kernel launch recorded (argument types, constexprs, warps, stages) instead of run;
2. **compile** (a child with ``TRITON_INTERPRET=0``): each recorded launch through Triton's own
   compiler for each target (``triton.compile`` with ``GPUTarget``; the wheel's bundled ptxas), then
   ``ptxas -v`` on the PTX for registers, spills and shared memory.

Writes ``triton_compile.csv`` (one row per kernel launch and target) to ``--out-dir`` (default
``bench/results/<machine>/``) and exits non-zero if any launch fails to compile.

    python bench/triton_compile.py [--targets 80,90] [--out-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import results_dir  # noqa: E402

MODULES = ("fused_score_head", "risd", "gdso", "grpo", "score_rows")
CSV_FIELDS = ["kernel", "target", "num_warps", "num_stages", "constexprs", "registers", "spill_stores",
              "spill_loads", "shared_bytes", "compile_s", "error"]
# the shapes of the launches: small (recording runs the drivers' torch code on the CPU) but every
# constexpr as at the performance targets' shapes (K=9 levels, G=8 rollouts, block sizes from cfg)
N, H, V, K, P, G, B, T = 256, 512, 4096, 9, 64, 8, 4, 64


def _record() -> list[dict]:
    """Run every entry point with launches recorded, not executed (must run before triton is
    imported elsewhere in this process, with TRITON_INTERPRET=1)."""
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    sys.path.insert(0, str(ROOT))
    import zreward_fast.kernels.utils as ku
    from zreward_fast.kernels import fused_score_head, gdso, grpo, risd, score_rows

    for mod in (ku, fused_score_head, gdso, grpo, risd, score_rows):
        mod.INTERPRET = False  # the drivers' GPU paths: no fp32 copies, GPU launch configs
    launches: list[dict] = []

    def run(self, *args, grid, warmup, **kwargs):  # noqa: ANN001, ANN202 - InterpretedFunction.run
        launches.append({"module": self.fn.__module__, "kernel": self.fn.__name__,
                         "args": dict(zip(self.arg_names, args)), "kwargs": kwargs})

    InterpretedFunction.run = run
    bf16, f32 = torch.bfloat16, torch.float32
    g = torch.Generator().manual_seed(0)

    def leaf(*shape, dtype=bf16):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(True)

    ids = torch.arange(K) * 7
    levels = torch.linspace(0, 4, K)
    rows_cfg = score_rows.ScoreRowsLaunchConfig(n_split=8)  # a GPU's own config; n_split: no SM count here
    # The ops' autograd Functions straight (the public ops dispatch by device: CPU tensors would get
    # the reference with the interpreter off)
    out = fused_score_head.ScoreHeadFunction.apply(leaf(N, H), leaf(V, H), ids, levels, None, 1.0, rows_cfg)
    (out[3].sum() + out[4].sum() + out[5].sum()).backward()  # mean, var, entropy
    teacher = torch.softmax(torch.randn(N, K, generator=g), -1)
    risd.RISDLossFunction.apply(leaf(N, H), leaf(V, H), ids, teacher, leaf(V), 1.0, "mean", rows_cfg).backward()
    hp = dict(alpha_pt=1.0, alpha_pw=1.0, lambda_pt=0.5, lambda_pw=0.5, eps=1e-4)
    res = gdso.gdso_loss_triton(leaf(P, 2, G, K), torch.rand(P, 2, generator=g) * 4, levels, hp, gdso.GDSOLaunchConfig())
    res.loss.backward()
    tok = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    adv = torch.randn(B, generator=g)
    old, ref = torch.randn(B, T, generator=g).to(f32), torch.randn(B, T, generator=g).to(f32)
    loss, _ = grpo.GRPOTokenLossFunction.apply(leaf(B, T, H), leaf(V, H), tok, mask, adv, old, ref, 0.2, 0.04, 1.0,
                                               grpo.GRPOLaunchConfig(block_v=8192, num_warps=16), True)
    loss.backward()
    return [_describe(x) for x in launches]


def _describe(launch: dict) -> dict:
    """A launch as JSON: each argument's Triton type (or its constexpr value), warps and stages."""
    import torch

    types = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
             torch.int32: "i32", torch.bool: "i1", torch.uint8: "u8", torch.int8: "i8"}
    args = {}
    for name, v in launch["args"].items():
        if isinstance(v, torch.Tensor):
            args[name] = {"type": "*" + types[v.dtype]}
        elif v is None or isinstance(v, str):
            args[name] = {"value": v}
        elif isinstance(v, bool):
            args[name] = {"type": "i1", "value": v}
        elif isinstance(v, int):
            args[name] = {"type": "i32" if -2**31 <= v < 2**31 else "i64", "value": v}
        elif isinstance(v, float):
            args[name] = {"type": "fp32", "value": v}
        else:  # a dtype or another object passed as a constexpr
            args[name] = {"value": str(v)}
    kw = dict(launch["kwargs"])
    options = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
    for name, v in kw.items():
        args[name] = {"value": v}
    return {"module": launch["module"], "kernel": launch["kernel"], "args": args, "options": options}


def _ptxas_info(ptx: str, cc: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(cc)
    path = ptxas.path if hasattr(ptxas, "path") else ptxas[0]
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
        r = subprocess.run([path, "-v", f"--gpu-name={arch}", str(src), "-o", str(src.with_suffix(".cubin"))],
                           capture_output=True, text=True)
    text = r.stdout + r.stderr
    if r.returncode:
        raise RuntimeError(f"ptxas: {text.strip()[-500:]}")
    num = lambda rx: int(m.group(1)) if (m := re.search(rx, text)) else 0  # noqa: E731
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads")}


def _compile(launches: list[dict], targets: list[int]) -> list[dict]:
    """In a process with TRITON_INTERPRET=0: each launch for each target."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, str(ROOT))
    rows, seen = [], set()
    for launch in launches:
        fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
        constexpr_names = {p.name for p in fn.params if p.is_constexpr}
        signature, constexprs = {}, {}
        for name, a in launch["args"].items():
            if name in constexpr_names or "type" not in a:
                signature[name], constexprs[name] = "constexpr", a.get("value")
            else:
                signature[name] = a["type"]
        key = (launch["kernel"], json.dumps(signature, sort_keys=True), json.dumps(constexprs, sort_keys=True, default=str),
               json.dumps(launch["options"], sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        for cc in targets:
            row = {"kernel": launch["kernel"], "target": f"sm_{cc}", **{k: launch["options"].get(k, "") for k in
                                                                         ("num_warps", "num_stages")},
                   "constexprs": " ".join(f"{k}={v}" for k, v in constexprs.items() if k.isupper()), "error": ""}
            t0 = time.perf_counter()
            try:
                kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                        target=GPUTarget("cuda", cc, 32), options=dict(launch["options"]))
                row.update(_ptxas_info(kernel.asm["ptx"], cc), shared_bytes=kernel.metadata.shared)
            except Exception as e:  # noqa: BLE001 - the report says which launch failed and why
                row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
            row["compile_s"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            status = row["error"] or f"{row['registers']} regs, {row['spill_stores']} B spilled, {row['shared_bytes']} B smem"
            print(f"{row['kernel']:<34} {row['target']}  warps {row['num_warps']!s:>2}  {status}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--targets", default="80,90", help="compute capabilities, comma separated")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--compile-from", default=None, help=argparse.SUPPRESS)  # the child: recorded launches
    args = p.parse_args(argv)
    targets = [int(t) for t in args.targets.split(",")]
    if args.compile_from:
        rows = _compile(json.loads(Path(args.compile_from).read_text()), targets)
        Path(args.compile_from).with_suffix(".rows.json").write_text(json.dumps(rows))
        return 0
    os.environ["TRITON_INTERPRET"] = "1"
    launches = _record()
    out_dir = results_dir(args.out_dir, "cpu")
    with tempfile.TemporaryDirectory() as d:
        rec = Path(d) / "launches.json"
        rec.write_text(json.dumps(launches))
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        r = subprocess.run([sys.executable, __file__, "--compile-from", str(rec), "--targets", args.targets], env=env)
        if r.returncode:
            return r.returncode
        rows = json.loads(rec.with_suffix(".rows.json").read_text())
    import csv

    with open(out_dir / "triton_compile.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    failed = [r for r in rows if r["error"]]
    spilled = [r for r in rows if not r["error"] and (r["spill_stores"] or r["spill_loads"])]
    print(f"{len(rows)} compilations ({len({r['kernel'] for r in rows})} kernels, targets {targets}): "
          f"{len(failed)} failed, {len(spilled)} spill; {out_dir / 'triton_compile.csv'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
