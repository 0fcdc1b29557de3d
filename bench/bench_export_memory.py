"""Peak RAM and time of ``export_bundle`` at a real Qwen3.5 width (issue 13: export memory).

    python bench/bench_export_memory.py [--size 9B] [--layers 4] [--vision-depth 2] [--vocab 8192]
        [--quantize none int8] [--out-dir bench/results/<cpu>]

A random student at the size's real widths (``zreward_fast.testing.real_model``, reduced depth,
448x448) is saved once; each export then runs in a fresh process (``python -m zreward_fast.cli
export``, as a user runs it), whose peak resident memory the kernel reports (``ru_maxrss`` of the
child). The ratio is that peak over the fp32 weights' bytes; the baseline row is the same process
importing everything and exiting, so the interpreter's own share is visible.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.pop("TRITON_INTERPRET", None)

from common import device_name, plot_bars, write_results  # noqa: E402

FIELDS = ("impl", "size", "layers", "vocab", "params_m", "weights_gb", "peak_gb", "peak_over_weights", "seconds",
          "mean_abs_dmu", "pooled_agreement")
IMPORTS = "import torch, onnx, onnxruntime, transformers, zreward_fast.export, zreward_fast.runtime"


def child_peak(cmd: list[str]) -> tuple[float, float, str]:
    """(peak RSS in GB, seconds, output) of ``cmd`` run in a child process: the kernel's ``ru_maxrss``
    of that child alone (``wait4``), not of every child so far."""
    with tempfile.TemporaryFile(mode="w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}):\n{output[-3000:]}")
    return usage.ru_maxrss / 2**20, seconds, output


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="9B")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vision-depth", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192, help="embedding rows (0: the real 248,320)")
    ap.add_argument("--quantize", nargs="+", default=["none", "int8"])
    ap.add_argument("--pairs", type=int, default=16, help="held-out pairs of the parity check (export --pairs)")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()

    # the model is built and saved in a child too: a child's ru_maxrss starts at the parent's RSS
    # when it forks, so the parent must stay small (it imports neither torch nor the package)
    work = Path(tempfile.mkdtemp(prefix="export-memory-"))
    try:  # the saved model and bundles are GBs at real width: never leave them behind
        build = (
            "from zreward_fast import ZRewardModel; from zreward_fast.testing import real_model; "
            f"m, p = real_model({args.size!r}, layers={args.layers}, vision_depth={args.vision_depth}, "
            f"vocab_size={args.vocab or None}); ZRewardModel(m, p).save_pretrained({str(work / 'model')!r}); "
            "print('PARAMS', sum({id(t): t.numel() for t in m.parameters()}.values()))"
        )
        _, _, output = child_peak([sys.executable, "-c", build])
        params = int(output.split("PARAMS")[-1].split()[0])
        weights_gb = params * 4 / 2**30
        print(f"{args.size} width, {args.layers} layers, vocab {args.vocab or 248320}: {params / 1e6:.0f}M parameters, "
              f"{weights_gb:.2f} GB fp32; saved to {work / 'model'}", flush=True)

        common = dict(size=args.size, layers=args.layers, vocab=args.vocab or 248320, params_m=params / 1e6,
                      weights_gb=weights_gb)
        peak, seconds, _ = child_peak([sys.executable, "-c", IMPORTS])
        rows = [dict(common, impl="imports only", peak_gb=peak, peak_over_weights=peak / weights_gb, seconds=seconds)]
        print(f"imports only: peak {peak:.2f} GB", flush=True)
        for mode in args.quantize:
            out = work / f"bundle-{mode}"
            cmd = [sys.executable, "-m", "zreward_fast.cli", "export", "--model", str(work / "model"), "--out", str(out),
                   "--quantize", mode, "--pairs", str(args.pairs), "--force"]
            peak, seconds, _ = child_peak(cmd)
            parity = json.loads((out / "manifest.json").read_text())["parity"]
            rows.append(dict(common, impl=f"export {mode}", peak_gb=peak, peak_over_weights=peak / weights_gb,
                             seconds=seconds, mean_abs_dmu=parity["overall"]["mean_abs_dmu"],
                             pooled_agreement=parity["overall"].get("pair_agreement_pooled")))
            print(f"export {mode}: peak {peak:.2f} GB ({peak / weights_gb:.2f}x the fp32 weights), {seconds:.0f} s, "
                  f"mean |dmu| {parity['overall']['mean_abs_dmu']:.4f}", flush=True)

    finally:
        shutil.rmtree(work, ignore_errors=True)

    out_dir = args.out_dir or Path(__file__).resolve().parent / "results" / device_name("cpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"export_memory_{args.size}"
    title = (f"export_bundle peak RAM, Qwen3.5-{args.size} width, {args.layers} layers, "
             f"{weights_gb:.2f} GB fp32 weights ({device_name('cpu')})")
    write_results(rows, out_dir, stem, FIELDS, title, plot=plot_bars, key="peak_gb", ylabel="peak RSS of the process, GB")


if __name__ == "__main__":
    main()
