"""CPU runtime benchmark: a small student scored by transformers eager fp32, by the fp32 ONNX
bundle and by the int8 bundle (onnxruntime, CPU), measured side by side in one run.

    python bench/bench_cpu_runtime.py [--repeats 20] [--out-dir bench/results/<cpu>]

The student is random (``zreward_fast.testing.small_model``: hidden 512, 8 layers, 224x224
bucket); timing does not depend on the weights. Reports batch-1 latency and batch-8 throughput,
as ratios to transformers eager, and each bundle's parity against the PyTorch model. The
``-Nruns`` rows score the decomposed bundles with ``Scorer(parallel_runs=N)`` (N = cores): each
batch split into N parts run concurrently, one thread each.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.pop("TRITON_INTERPRET", None)  # the torch path must be plain eager, not the interpreter

from common import device_name, quantile  # noqa: E402


PAUSE_S = 0.05


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin (one call of each per round) so
    that drift in the machine's speed (shared cores) hits every implementation alike. A pause
    before each call lets the previous runtime's thread pool stop spinning (onnxruntime's workers
    busy-wait after a run and would otherwise steal the cores from the next call)."""
    for fn in fns.values():
        fn()  # warm-up
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(PAUSE_S)
            t = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=100, help="held-out pairs for each bundle's parity report")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()

    import torch

    from zreward_fast import ZRewardModel
    from zreward_fast.export.api import export_bundle
    from zreward_fast.runtime import Scorer
    from zreward_fast.testing import small_model
    from zreward_fast.training.synthetic import make_sample

    out_dir = Path(args.out_dir or Path(__file__).parent / "results" / device_name("cpu"))
    out_dir.mkdir(parents=True, exist_ok=True)
    rm = ZRewardModel(*small_model(seed=0)).eval()
    samples = [make_sample(100 + i, 224) for i in range(args.batch)]
    images, prompts = [s.image for s in samples], [s.prompt for s in samples]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # Every implementation has score(images, prompts): the model itself and each bundle's Scorer.
        impls = {"transformers-eager-fp32": (rm, None)}
        # Gated DeltaNet as onnxruntime's contrib ops and decomposed into standard ops (the default;
        # chunked, matrix products): on CPU the decomposed form is the faster one.
        for mode, gdn in (("none", "contrib"), ("int8", "contrib"), ("none", "decomposed"), ("int8", "decomposed")):
            res = export_bundle(rm, Path(tmp) / f"{mode}-{gdn}", quantize=mode, gdn=gdn, num_pairs=args.pairs,
                                force=True, progress=False)
            name = ("onnx-fp32" if mode == "none" else "onnx-int8-dynamic") + f"-{gdn}"
            impls[name] = (Scorer(res.path), res.parity["overall"])
            if gdn == "decomposed":
                # The same bundle, each batch split into one part per core run concurrently
                # (Scorer(parallel_runs=...)): throughput over batch-1 latency.
                runs = max(2, os.cpu_count() or 1)
                impls[f"{name}-{runs}runs"] = (Scorer(res.path, parallel_runs=runs), res.parity["overall"])
        with torch.inference_mode():
            def calls(b: int) -> dict:
                return {k: (lambda s=s: s.score(images[:b], prompts[:b])) for k, (s, _) in impls.items()}

            lat = interleaved(calls(1), args.repeats)
            thr = interleaved(calls(args.batch), max(3, args.repeats // 2))
        for name, (_, parity) in impls.items():
            rows.append({
                "impl": name, "device": device_name("cpu"), "threads": torch.get_num_threads(),
                "b1_ms_median": 1e3 * statistics.median(lat[name]), "b1_ms_p90": 1e3 * quantile(lat[name], 0.9),
                f"b{args.batch}_images_per_s": args.batch / statistics.median(thr[name]),
                "mean_abs_dmu": parity["mean_abs_dmu"] if parity else 0.0,
                "pair_agreement": parity["pair_agreement"] if parity else 1.0,
            })
    base = rows[0]
    tkey = f"b{args.batch}_images_per_s"
    for r in rows:
        r["b1_speedup"] = base["b1_ms_median"] / r["b1_ms_median"]
        r["throughput_ratio"] = r[tkey] / base[tkey]
    path = out_dir / "cpu_runtime.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    _plot(rows, tkey, out_dir / "cpu_runtime.png")
    print(f"small student (hidden 512, 8 layers, 224x224), CPU {rows[0]['device']}, torch threads {rows[0]['threads']}")
    print(f"{'impl':38s} {'b1 ms':>8s} {'b1 x':>6s} {tkey:>18s} {'thr x':>6s} {'mean|dmu|':>10s} {'pairs ok':>9s}")
    for r in rows:
        print(f"{r['impl']:38s} {r['b1_ms_median']:8.1f} {r['b1_speedup']:6.2f} {r[tkey]:18.1f} "
              f"{r['throughput_ratio']:6.2f} {r['mean_abs_dmu']:10.4f} {r['pair_agreement']:9.3f}")
    print(f"wrote {path}")
    return 0


def _plot(rows, tkey, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    names = [r["impl"] for r in rows]
    ax[0].bar(names, [r["b1_ms_median"] for r in rows], color="#4c72b0")
    ax[0].set_ylabel("batch-1 latency (ms)")
    ax[1].bar(names, [r[tkey] for r in rows], color="#55a868")
    ax[1].set_ylabel(tkey.replace("_", " "))
    for a in ax:
        a.tick_params(axis="x", rotation=15)
    fig.suptitle("small student on CPU: transformers eager vs ONNX bundles")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
