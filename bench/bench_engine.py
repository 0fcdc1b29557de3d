#!/usr/bin/env python
"""GPU scoring engine benchmark: transformers eager vs TorchEngine bf16 vs TorchEngine fp8, one run.

The student has the Qwen3.5-9B shape (text: hidden 4096, 32 layers with every 4th full attention,
16 heads / 4 KV heads of 256, MLP 12288, Gated DeltaNet 16 key / 32 value heads of 128, vocab
248320; vision: depth 27, hidden 1152, 16 heads, MLP 4304, patch 16, merge 2), built directly on
the GPU with random bf16 weights (nothing is downloaded; timing does not depend on the values).
Each call scores 448x448 images with ~64-token prompts (262 positions) on all four dimensions.

Rows, measured side by side:
  transformers-eager   ZRewardModel.score (Hugging Face forward; flash-linear-attention if installed)
  engine-bf16          TorchEngine: static buckets, CUDA graphs, fla GDN kernels, SDPA
  engine-fp8           the same with e4m3 linears through torch._scaled_mm (sm_89+ only)

Reports batch-1 latency (median, p99) and images/s at batch 16 and 64, each row's mean |delta mu|
against transformers on the same batch and against the same weights run in fp32 (which separates an
engine's error from bf16 rounding that a 32-layer random model amplifies), and writes engine.csv and
engine.png to --out-dir; ``--profile`` adds engine_profile.txt (the bf16 engine's kernels, batch 1 and 16).

    python bench/bench_engine.py [--quick] [--out-dir DIR]

Needs CUDA: on a machine without a GPU it says so and exits 0. ``--cpu-smoke`` runs the plumbing on
the tiny test model on the CPU (fp32, fp8 emulated): a check that the script works, not timings.
Budget: about 3 minutes on an H100 (``--quick``: about 1.5), capped by --max-seconds per measurement.
"""
from __future__ import annotations

import argparse
import csv
import gc
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import pyplot, save_figure  # noqa: E402

CSV_FIELDS = ["impl", "device", "dtype", "positions", "seq_bucket", "gdn", "b1_ms_median", "b1_ms_p99",
              "b16_images_per_s", "b64_images_per_s", "b1_speedup", "b16_speedup", "b64_speedup",
              "mean_abs_dmu_vs_eager", "mean_abs_dmu_vs_fp32", "warmup_s", "note"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, no batch 64")
    p.add_argument("--impls", default="eager,bf16,fp8", help="comma list of eager,bf16,fp8")
    p.add_argument("--positions", type=int, default=262, help="sequence length to aim the prompts at")
    p.add_argument("--seq-buckets", default="128,256,384,512", help="the engine's sequence buckets")
    p.add_argument("--max-seconds", type=float, default=20.0, help="cap on the timed loop of one measurement")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: checks the script, not timings")
    p.add_argument("--no-fp32-ref", action="store_true",
                   help="skip the fp32 reference scores (the model cast to fp32 in place once: 2x its bf16 memory)")
    p.add_argument("--profile", action="store_true",
                   help="also profile the bf16 engine (no CUDA graphs) at batch 1 and 16: engine_profile.txt")
    a = p.parse_args(argv)
    a.impls = [x.strip() for x in a.impls.split(",") if x.strip()]
    unknown = set(a.impls) - {"eager", "bf16", "fp8"}
    if unknown:
        p.error(f"unknown impls {sorted(unknown)}")
    a.seq_buckets = tuple(int(x) for x in a.seq_buckets.split(","))
    a.batches = (1, 16) if a.quick else (1, 16, 64)
    a.b1_repeats = 10 if a.quick else 30
    a.batch_repeats = 3 if a.quick else 6
    return a


def build_student(cpu_smoke: bool):
    """The 9B-shaped student with random bf16 weights, built on the GPU (or the tiny one on CPU)."""
    import torch
    from transformers import Qwen3_5ForConditionalGeneration

    from zreward_fast import ZRewardModel, add_score_tokens
    from zreward_fast.processing import ZRewardProcessor
    from zreward_fast.prompting import CHAT_SPECIAL_TOKENS
    from zreward_fast.testing import real_config, spread_score_rows, tiny_model, tiny_tokenizer

    if cpu_smoke:
        return ZRewardModel(*tiny_model(0))
    tokenizer = tiny_tokenizer()
    add_score_tokens(tokenizer)  # tokenizer only: the model keeps its 248320-row vocabulary
    vocab = tokenizer.get_vocab()
    config = real_config("9B", special_ids={t: vocab[t] for t in CHAT_SPECIAL_TOKENS})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3_5ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    spread_score_rows(model, config.text_config.hidden_size)  # spread-out scores, as the test models'
    processor = ZRewardProcessor(tokenizer, image_size=448)
    return ZRewardModel(model.eval(), processor)


def make_inputs(rm, n: int, positions: int, seed: int = 0):
    """n random bucket-sized images and prompts grown until the student text has ``positions`` tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    size = rm.processor.image_size
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    words = ("a photo of a red circle above a blue square with a green tree and a yellow star on the left "
             "under a dark sky with one white moon and two black cats").split()
    prompt, i = "a", 0
    proc = rm.processor
    while len(proc.tokenize([proc.student_text(prompt)])[0]) < positions and i < 10_000:
        prompt += " " + words[i % len(words)]
        i += 1
    length = len(proc.tokenize([proc.student_text(prompt)])[0])
    return images, [prompt] * n, length


def timed(fn, repeats: int, warmup: int, max_seconds: float) -> list[float]:
    for _ in range(warmup):
        fn()
    out: list[float] = []
    deadline = time.perf_counter() + max_seconds
    for _ in range(repeats):
        t = time.perf_counter()
        fn()  # score() returns host values: the GPU work is finished when it returns
        out.append(time.perf_counter() - t)
        if time.perf_counter() > deadline and len(out) >= 2:
            break
    return out


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, math.ceil(0.99 * len(xs)) - 1)]


def measure(name: str, score, args, images, prompts, ref_means=None, extra=None, fp32_means=None) -> tuple[dict, object]:
    import numpy as np
    import torch

    from zreward_fast import DIMENSIONS

    row = {"impl": name, "note": "", **(extra or {})}
    try:
        lat = timed(lambda: score(images[:1], prompts[:1], 1), args.b1_repeats, 3, args.max_seconds)
        row["b1_ms_median"], row["b1_ms_p99"] = 1e3 * statistics.median(lat), 1e3 * p99(lat)
        for b in args.batches[1:]:
            t = timed(lambda: score(images[:b], prompts[:b], b), args.batch_repeats, 1, args.max_seconds)
            row[f"b{b}_images_per_s"] = b / statistics.median(t)
        res = score(images[:16], prompts[:16], 16)
        means = np.array([[r[d].mean for d in DIMENSIONS] for r in res])
        if ref_means is not None:
            row["mean_abs_dmu_vs_eager"] = float(np.abs(means - ref_means).mean())
        if fp32_means is not None:
            row["mean_abs_dmu_vs_fp32"] = float(np.abs(means - fp32_means).mean())
    except RuntimeError as e:  # out of memory, non-finite scores, a kernel failure: keep the other rows
        kind = "OOM" if isinstance(e, torch.cuda.OutOfMemoryError) else type(e).__name__
        row["note"] = f"{kind}: {(str(e).splitlines() or [''])[0][:160]}"
        means = None
    print(f"  {name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                                    if k != "impl"), flush=True)
    return row, means


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("bench_engine.py needs a CUDA GPU (torch sees none); nothing to measure here. "
              "Run it on a GPU machine (bench/gpu_check.sh), or --cpu-smoke to check the script.")
        return 0
    from bench_score_head import device_name

    from zreward_fast.engine import TorchEngine, load_fla
    from zreward_fast.engine.fp8 import scaled_mm_supported

    device = "cpu" if args.cpu_smoke else "cuda"
    dev_name = device_name(device)
    out_dir = Path(args.out_dir or Path(__file__).parent / "results" / dev_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    fla = load_fla()
    print(f"device {dev_name}, torch {torch.__version__}, fla {'yes' if fla else 'no'}", flush=True)

    t0 = time.perf_counter()
    rm = build_student(args.cpu_smoke)
    params = sum(p.numel() for p in rm.model.parameters()) / 1e9
    images, prompts, length = make_inputs(rm, max(args.batches), args.positions)
    seq_bucket = next((s for s in args.seq_buckets if s >= length), None)
    if seq_bucket is None:
        print(f"prompts of {length} positions exceed the largest --seq-buckets {args.seq_buckets[-1]}")
        return 2
    print(f"student {params:.2f}B params built in {time.perf_counter() - t0:.1f}s; {length} positions "
          f"(seq bucket {seq_bucket}); batches {args.batches}", flush=True)
    common = {"device": dev_name, "positions": length}
    rows, ref_means = [], None
    ctx = torch.inference_mode()
    # bf16 against bf16 mixes two rounding paths: the fp32 scores of the same weights (bf16 -> fp32
    # -> bf16 is exact, so the model is cast in place and back) say which one the error belongs to.
    fp32_means = None if args.no_fp32_ref else fp32_reference(rm, images[:16], prompts[:16])

    if "eager" in args.impls:
        with ctx:
            row, ref_means = measure("transformers-eager", lambda i, p, b: rm.score(i, p, batch_size=b), args, images,
                                     prompts, extra={**common, "dtype": str(rm.model.dtype).replace("torch.", ""),
                                                     "gdn": "fla" if fla else "torch"}, fp32_means=fp32_means)
        if ref_means is not None:
            row["mean_abs_dmu_vs_eager"] = 0.0
        rows.append(row)

    for impl in ("bf16", "fp8"):
        if impl not in args.impls:
            continue
        if impl == "fp8" and not (args.cpu_smoke or scaled_mm_supported("cuda")):
            rows.append({"impl": "engine-fp8", **common, "note": "skipped: fp8 needs sm_89+"})
            continue
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        t = time.perf_counter()
        # fp8 replaces the model's linears in place: it runs last, after every bf16 measurement.
        eng = TorchEngine.from_model(rm, batch_buckets=args.batches, seq_buckets=args.seq_buckets, fp8=impl == "fp8")
        try:
            eng.warmup(batch_buckets=args.batches, seq_buckets=(seq_bucket,))
        except RuntimeError as e:
            rows.append({"impl": f"engine-{impl}", **common, "note": f"warm-up failed: {str(e).splitlines()[0][:160]}"})
            print(f"  engine-{impl}: warm-up failed: {e}", flush=True)
            del eng
            continue
        warm = time.perf_counter() - t
        print(f"  engine-{impl}: built and warmed up (graphs {eng.graphs_captured}) in {warm:.1f}s", flush=True)
        row, _ = measure(f"engine-{impl}", lambda i, p, b: eng.score(i, p, batch_size=b), args, images, prompts,
                         ref_means, extra={**common, "dtype": "fp8-e4m3" if impl == "fp8" else str(eng.dtype).replace("torch.", ""),
                                           "seq_bucket": seq_bucket, "gdn": eng.gdn_backend, "warmup_s": warm},
                         fp32_means=fp32_means)
        rows.append(row)
        del eng
        if impl == "bf16" and args.profile:
            profile_engine(rm, args, images, prompts, out_dir / "engine_profile.txt")

    base = rows[0] if rows and rows[0]["impl"] == "transformers-eager" else None
    for r in rows:
        if base is None:
            break
        if r.get("b1_ms_median") and base.get("b1_ms_median"):
            r["b1_speedup"] = base["b1_ms_median"] / r["b1_ms_median"]
        for b in (16, 64):
            k = f"b{b}_images_per_s"
            if r.get(k) and base.get(k):
                r[f"b{b}_speedup"] = r[k] / base[k]
    path = out_dir / "engine.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows({k: (f"{r[k]:.4g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in CSV_FIELDS} for r in rows)
    _plot(rows, out_dir / "engine.png", f"{params:.2f}B student, {length} positions, {dev_name}")
    print(f"\n{'impl':20s} {'b1 ms':>8s} {'p99':>8s} {'b16 img/s':>10s} {'b64 img/s':>10s} {'b1 x':>6s} "
          f"{'b16 x':>6s} {'mean|dmu|':>10s} {'vs fp32':>8s}")
    fmt = lambda v, spec: format(v, spec) if isinstance(v, float) else "-"  # noqa: E731
    for r in rows:
        print(f"{r['impl']:20s} {fmt(r.get('b1_ms_median'), '8.2f')} {fmt(r.get('b1_ms_p99'), '8.2f')} "
              f"{fmt(r.get('b16_images_per_s'), '10.1f')} {fmt(r.get('b64_images_per_s'), '10.1f')} "
              f"{fmt(r.get('b1_speedup'), '6.2f')} {fmt(r.get('b16_speedup'), '6.2f')} "
              f"{fmt(r.get('mean_abs_dmu_vs_eager'), '10.4f')} {fmt(r.get('mean_abs_dmu_vs_fp32'), '8.4f')} "
              f"{r.get('note', '')}")
    print(f"targets (docs/architecture.md): batch 1 <= 12 ms; batch 16 >= 150 images/s bf16, >= 230 fp8\nwrote {path}")
    return 0


def fp32_reference(rm, images, prompts):
    """[n, D] means of the model's own weights in fp32 (cast in place, then back to its dtype)."""
    import numpy as np
    import torch

    from zreward_fast import DIMENSIONS

    dtype = rm.model.dtype
    t = time.perf_counter()
    with torch.inference_mode():
        rm.model.float()
        try:
            res = rm.score(images, prompts, batch_size=len(images))
        finally:
            rm.model.to(dtype)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"  fp32 reference scores of {len(images)} images in {time.perf_counter() - t:.1f}s", flush=True)
    return np.array([[r[d].mean for d in DIMENSIONS] for r in res])


def profile_engine(rm, args, images, prompts, path: Path) -> None:
    """torch.profiler tables of the bf16 engine without CUDA graphs (so each kernel shows), batch 1
    and batch 16: where the time goes, for the next change."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from zreward_fast.engine import TorchEngine

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    eng = TorchEngine.from_model(rm, batch_buckets=args.batches, seq_buckets=args.seq_buckets, use_cuda_graphs=False)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    parts = []
    for b in (1, 16):
        eng.score(images[:b], prompts[:b], batch_size=b)  # warm (the bucket's kernels compiled)
        with profile(activities=acts, record_shapes=False) as prof:
            for _ in range(3):
                eng.score(images[:b], prompts[:b], batch_size=b)
        parts.append(f"=== batch {b}, 3 calls, sorted by {sort}\n"
                     + prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=60))
    del eng
    path.write_text("\n\n".join(parts) + "\n")
    print(f"  profile of the bf16 engine written to {path}", flush=True)


def _plot(rows: list[dict], path: Path, title: str) -> None:
    plt = pyplot()

    rows = [r for r in rows if r.get("b1_ms_median")]
    if not rows:
        return
    names = [r["impl"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    ax[0].bar(names, [r["b1_ms_median"] for r in rows], color="#4c72b0")
    ax[0].set_ylabel("batch-1 latency, median (ms)")
    width = 0.38
    for i, b in enumerate((16, 64)):
        vals = [r.get(f"b{b}_images_per_s") or 0.0 for r in rows]
        ax[1].bar([j + (i - 0.5) * width for j in range(len(rows))], vals, width, label=f"batch {b}")
    ax[1].set_xticks(range(len(rows)), names)
    ax[1].set_ylabel("images / s (all 4 dimensions)")
    ax[1].legend()
    for a in ax:
        a.tick_params(axis="x", rotation=12)
    save_figure(fig, path, title)


if __name__ == "__main__":
    sys.exit(main())
