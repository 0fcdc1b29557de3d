"""CPU runtime benchmark: a student scored by transformers eager fp32, by its ONNX bundles
(onnxruntime: fp32, int8 dynamic, int8 weight-only) and by OpenVINO on the same bundles, measured
side by side in one run.

    python bench/bench_cpu_runtime.py [--repeats 20] [--out-dir bench/results/<cpu>]
    python bench/bench_cpu_runtime.py --size 0.8B [--layers 24] --repeats 5   # a real Qwen3.5 width

The student is random: by default ``zreward_fast.testing.small_model`` (hidden 512, 8 layers,
224x224), with ``--size`` a published Qwen3.5 size at its real widths and 448x448
(``real_model``; ``--layers`` defaults to the size's full depth). Timing does not depend on the
weights. Reports batch-1 latency (median, p90) and batch-8 throughput as ratios to transformers
eager, each implementation's load time and the resident memory its loading added, each
bundle's parity against the PyTorch model, and the CPU's model and its bf16/int8 instruction
flags on every row (precision decides rows as much as the engine does). ``--openvino-modes``
takes ``MODE`` (OpenVINO at f32, the precision of the bundle's parity report) or
``MODE:PRECISION`` (``none:bf16``: the fp32 graphs at OpenVINO's bf16); ``--torch-bf16`` adds
transformers eager in bf16 (``model.to(torch.bfloat16)``), the peer a user with a bf16 CPU would
try. Rows that run at a precision no bundle's report covers get their parity measured here, on the
same held-out pairs as the export's report. The ``-Nruns`` rows score the decomposed bundles with
``Scorer(parallel_runs=N)`` (N = cores): each batch split into N parts run concurrently, one
thread each. ``--stem`` names the output files (default ``cpu_runtime``, or ``cpu_runtime_<size>``).
At real sizes every row in one process does not fit a 24 GB machine: ``--isolate`` exports in one
child process and runs each row in its own, round-robin beside its own transformers eager fp32
(ratios to that baseline; its times are in the ``baseline_*`` columns). ``--bundle-dir DIR``
keeps the exports (real sizes: 10-30 minutes each) and reuses them in a later run of the same
student; ``--openvino-parallel`` gives each OpenVINO row a ``-Nruns`` row as well.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.pop("TRITON_INTERPRET", None)  # the torch path must be plain eager, not the interpreter

from common import device_name, pyplot, quantile, save_figure  # noqa: E402


PAUSE_S = 0.05
#: parts of the -Nruns rows (Scorer(parallel_runs=...)): one a core
RUNS = max(2, os.cpu_count() or 1)
#: the instruction-set flags (/proc/cpuinfo) that decide which precisions a CPU runs fast
PRECISION_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def cpu_flags() -> str:
    """The CPU's :data:`PRECISION_FLAGS` it has, space-separated (Linux; "" elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return " ".join(f for f in PRECISION_FLAGS if f in have)


def openvino_rows(entries: list[str]) -> list[tuple[str, str]]:
    """``MODE`` or ``MODE:PRECISION`` -> (mode, precision); f32 when no precision is named."""
    from zreward_fast.runtime.openvino_backend import PRECISIONS

    rows = []
    for e in entries:
        mode, _, precision = e.partition(":")
        precision = precision or "f32"
        if precision not in PRECISIONS:
            raise SystemExit(f"error: --openvino-modes {e!r}: precision must be one of {list(PRECISIONS)}")
        rows.append((mode, precision))
    return rows


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


def _num(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def rss_gb() -> float:
    """This process's resident memory now (GB), from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def plan(args, ov_rows: list[tuple[str, str]]) -> list[tuple[str, str, str, str]]:
    """The rows besides transformers eager fp32, in load order: (name, kind, gdn, mode) with kind
    ``torch-bf16``, ``ort``, ``ort-runs`` or ``openvino:<precision>``."""
    parallel_modes = set(args.modes if args.parallel_modes is None else args.parallel_modes)
    out = [("transformers-eager-bf16", "torch-bf16", "", "")] if args.torch_bf16 else []
    for gdn in args.gdn:
        for mode in args.modes:
            label = "fp32" if mode == "none" else mode
            out.append((f"onnx-{label}-{gdn}", "ort", gdn, mode))
            if gdn == "decomposed" and not args.no_parallel_runs and mode in parallel_modes:
                # The same bundle, each batch split into one part per core run concurrently
                # (Scorer(parallel_runs=...)): throughput over batch-1 latency.
                out.append((f"onnx-{label}-{gdn}-{RUNS}runs", "ort-runs", gdn, mode))
            for ov_mode, precision in ov_rows:
                if gdn == "decomposed" and ov_mode == mode:  # f32: the precision of the bundle's report
                    name = f"openvino-{label}" + ("" if precision == "f32" else f"-{precision}")
                    out.append((name, f"openvino:{precision}", gdn, mode))
                    if args.openvino_parallel:
                        out.append((f"{name}-{RUNS}runs", f"openvino-runs:{precision}", gdn, mode))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=100, help="held-out pairs for each bundle's parity report")
    ap.add_argument("--size", default=None, help="a Qwen3.5 size (0.8B, 2B, ...): its real widths at 448x448")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers with --size (default: full depth)")
    ap.add_argument("--vision-depth", type=int, default=None, help="vision blocks with --size (default: full)")
    ap.add_argument("--gdn", nargs="+", default=["contrib", "decomposed"], choices=["contrib", "decomposed"],
                    help="Gated DeltaNet forms of the onnxruntime rows (OpenVINO runs the decomposed one)")
    ap.add_argument("--modes", nargs="+", default=["none", "int8-dynamic", "int8-weight"],
                    help="bundle quantization modes")
    ap.add_argument("--openvino-modes", nargs="*", default=["none", "int8-weight"],
                    help="MODE or MODE:PRECISION (f32, bf16, f16) whose decomposed bundle OpenVINO also runs "
                         "(none given: no OpenVINO rows; it gains nothing on int8-dynamic's MatMulInteger "
                         "graphs, issue 13)")
    ap.add_argument("--torch-bf16", action="store_true",
                    help="add transformers eager in bf16 (a second copy of the model, in bf16)")
    ap.add_argument("--no-parallel-runs", action="store_true",
                    help="leave out the -Nruns rows (a second session per bundle: memory at real sizes)")
    ap.add_argument("--parallel-modes", nargs="*", default=None,
                    help="modes that get a -Nruns row (default: every mode)")
    ap.add_argument("--openvino-parallel", action="store_true",
                    help="each OpenVINO row also gets a -Nruns row (Scorer(parallel_runs=N, backend='openvino'))")
    ap.add_argument("--isolate", action="store_true",
                    help="real sizes: export in one child process, then each row in its own child process "
                         "round-robin beside its own transformers eager baseline (its ratios are to that one)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # --isolate's children: export or a row
    ap.add_argument("--bundle-dir", default=None,
                    help="export the bundles here and keep them; bundles already here from the same student "
                         "(same --size, --layers, --vision-depth, --pairs) are reused, not exported again")
    ap.add_argument("--stem", default=None)
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    out_dir = Path(args.out_dir or Path(__file__).parent / "results" / device_name("cpu"))
    stem = args.stem or ("cpu_runtime" if not args.size else f"cpu_runtime_{args.size}")
    if args.isolate and args.child is None:
        return run_isolated(args, out_dir, stem)

    import torch

    from zreward_fast import ZRewardModel
    from zreward_fast.export.api import export_bundle, held_out_pairs, parity_batch, scored_probs
    from zreward_fast.export.parity import PARITY_TIE_TOL, parity_report
    from zreward_fast.qwen3_5_sizes import size_spec
    from zreward_fast.runtime import Scorer
    from zreward_fast.runtime.bundle import load_manifest
    from zreward_fast.runtime.openvino_backend import openvino_available
    from zreward_fast.testing import real_model, small_model
    from zreward_fast.training.synthetic import make_sample

    if args.size:
        spec = size_spec(args.size)
        layers = args.layers or spec["text"]["num_hidden_layers"]
        depth = args.vision_depth or spec["vision"]["depth"]
        model, processor = real_model(args.size, layers=layers, vision_depth=depth)
        what = f"Qwen3.5-{args.size} width, {layers} layers, vision depth {depth}, 448x448"
        size = 448
    else:
        model, processor = small_model(seed=0)
        what, size = "small student (hidden 512, 8 layers, 224x224)", 224
    rm = ZRewardModel(model, processor).eval()
    params = sum(p.numel() for p in rm.model.parameters())
    samples = [make_sample(100 + i, size) for i in range(args.batch)]
    images, prompts = [s.image for s in samples], [s.prompt for s in samples]
    ov_rows = openvino_rows(args.openvino_modes) if openvino_available() else []
    flags = cpu_flags()
    print(f"{what}: {params / 1e6:.0f}M parameters; OpenVINO rows: {ov_rows}; CPU flags: {flags}", flush=True)
    dims = list(rm.dimensions)
    pair_images, pair_prompts, pairs = held_out_pairs(args.pairs)  # the same pairs as each export's report
    ref_probs = None

    def measured_parity(scorer) -> dict:
        """The parity report of ``scorer`` against the fp32 PyTorch model, on the export's pairs."""
        nonlocal ref_probs
        batch = parity_batch(rm)
        with torch.inference_mode():
            if ref_probs is None:
                ref_probs = scored_probs(rm, pair_images, pair_prompts, dims, batch)
            test = scored_probs(scorer, pair_images, pair_prompts, dims, batch)
        return parity_report(ref_probs, test, rm.scale.levels, dims, pairs, tie_tol=PARITY_TIE_TOL)["overall"]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # Every implementation has score(images, prompts): the model itself and each bundle's Scorer.
        impls: dict[str, tuple] = {"transformers-eager-fp32": (rm, None, 0.0, 0.0)}

        def load(name: str, make, parity) -> None:
            before, t = rss_gb(), time.perf_counter()
            scorer = make()
            with torch.inference_mode():
                scorer.score(images[:1], prompts[:1])  # lazy allocation and kernel selection count as loading
            load_s, load_gb = time.perf_counter() - t, rss_gb() - before
            parity = parity if parity is not None else measured_parity(scorer)
            impls[name] = (scorer, parity, load_s, load_gb)
            # printed as it goes: a run killed later (memory, at real sizes) still leaves these
            print(f"loaded {name}: {load_s:.1f} s, +{load_gb:.2f} GB, mean |dmu| {parity['mean_abs_dmu']:.4f}, "
                  f"pooled agreement {_num(parity['pair_agreement_pooled']):.3f}; RSS {rss_gb():.1f} GB", flush=True)

        # Gated DeltaNet as onnxruntime's contrib ops and decomposed into standard ops (the default;
        # chunked, matrix products): on CPU the decomposed form is the faster one.
        # every bundle is exported before any is loaded: an export's transient peak never meets the
        # loaded sessions (real sizes); --isolate's row children read the export child's bundles
        root = Path(args.bundle_dir or tmp)
        if args.child in (None, "export"):
            reuse = check_bundle_dir(root, {"student": what, "pairs": args.pairs})
        bundles: dict[tuple[str, str], tuple[Path, dict]] = {}
        for gdn in args.gdn:
            for mode in args.modes:
                path = root / f"{mode}-{gdn}"
                if args.child not in (None, "export"):
                    report = load_manifest(path)["parity"]
                elif reuse and (path / "manifest.json").is_file():
                    print(f"reusing the bundle {path}", flush=True)
                    report = load_manifest(path)["parity"]
                else:
                    report = export_bundle(rm, path, quantize=mode, gdn=gdn, num_pairs=args.pairs, force=True,
                                           progress=False).parity
                bundles[gdn, mode] = (path, report["overall"])
        if args.child == "export":
            return 0
        for name, kind, gdn, mode in plan(args, ov_rows):
            if args.child is not None and name != args.child:
                continue
            if kind == "torch-bf16":  # after the exports: their peaks never meet this second copy
                load(name, lambda: copy.deepcopy(rm).to(torch.bfloat16), None)
                continue
            path, parity = bundles[gdn, mode]
            if kind == "ort":
                load(name, lambda: Scorer(path, copy=False), parity)
            elif kind == "ort-runs":
                load(name, lambda: Scorer(path, copy=False, parallel_runs=RUNS), parity)
            else:  # openvino:<precision> or openvino-runs:<precision>
                engine, precision = kind.split(":", 1)
                runs = RUNS if engine == "openvino-runs" else 1
                # check_parity=False: the bench measures every row's parity itself, on the export's pairs
                load(name, lambda: Scorer(path, copy=False, backend="openvino", precision=precision,
                                          parallel_runs=runs, check_parity=False),
                     parity if precision == "f32" else None)
        with torch.inference_mode():
            def calls(b: int) -> dict:
                return {k: (lambda s=v[0]: s.score(images[:b], prompts[:b])) for k, v in impls.items()}

            lat = interleaved(calls(1), args.repeats)
            thr = interleaved(calls(args.batch), max(3, args.repeats // 2))
        tkey = f"b{args.batch}_images_per_s"
        for name, (scorer, parity, load_s, load_gb) in impls.items():
            rows.append({
                "impl": name, "device": device_name("cpu"), "cpu_flags": flags, "threads": torch.get_num_threads(),
                "b1_ms_median": 1e3 * statistics.median(lat[name]), "b1_ms_p90": 1e3 * quantile(lat[name], 0.9),
                tkey: args.batch / statistics.median(thr[name]),
                "load_s": load_s, "load_rss_gb": load_gb,
                "mean_abs_dmu": parity["mean_abs_dmu"] if parity else 0.0,
                # the worst dimension's pairwise agreement, and pooled over all (the parity gate's)
                # (None -> nan: a random model may leave no untied pair to compare)
                "pair_agreement": _num(parity["pair_agreement"]) if parity else 1.0,
                "pair_agreement_pooled": _num(parity["pair_agreement_pooled"]) if parity else 1.0,
            })
    base = rows[0]  # this process's transformers eager fp32
    for r in rows:
        r["b1_speedup"] = base["b1_ms_median"] / r["b1_ms_median"]
        r["throughput_ratio"] = r[tkey] / base[tkey]
        r["baseline_b1_ms"], r["baseline_images_per_s"] = base["b1_ms_median"], base[tkey]
    if args.child is not None:
        (root / f"rows-{args.child}.json").write_text(json.dumps({"what": what, "rows": rows}))
        return 0
    write_results(rows, tkey, what, out_dir, stem)
    return 0


def run_isolated(args, out_dir: Path, stem: str) -> int:
    """``--isolate``: the exports in one child process, then each row in its own child beside its own
    transformers eager fp32 (peak memory: the model twice and one row, not every row at once).
    Rows of different children are not timed round-robin against each other, so each row's
    ratios are to the eager baseline timed beside it (``baseline_*`` columns)."""
    from zreward_fast.runtime.openvino_backend import openvino_available

    ov_rows = openvino_rows(args.openvino_modes) if openvino_available() else []
    names = [n for n, *_ in plan(args, ov_rows)]
    if not names:
        raise SystemExit("error: --isolate with no rows besides transformers eager")
    argv = [a for a in sys.argv[1:] if a != "--isolate"]
    rows: list[dict] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-cpu-runtime-") as tmp:
        root = args.bundle_dir or tmp
        for child in ["export", *names]:
            print(f"--isolate: {child}", flush=True)
            code = subprocess.run([sys.executable, __file__, *argv, "--child", child, "--bundle-dir", root]).returncode
            if code and child == "export":
                raise SystemExit(f"error: the export child failed (exit {code})")
            if code:  # a row that fails (memory, an engine's error) is left out; the other rows still count
                print(f"--isolate: {child} failed (exit {code}); its row is left out", flush=True)
                failed.append(child)
                continue
            if child == "export":
                continue
            got = json.loads((Path(root) / f"rows-{child}.json").read_text())
            what = got["what"]
            rows += [r for r in got["rows"] if not rows or r["impl"] != "transformers-eager-fp32"]
    if not rows:
        raise SystemExit(f"error: every row failed: {', '.join(failed)}")
    write_results(rows, f"b{args.batch}_images_per_s", what + " (one process a row)", out_dir, stem)
    if failed:
        print(f"rows that failed, left out of {stem}.csv: {', '.join(failed)}")
    return 1 if failed else 0


def check_bundle_dir(root: Path, student: dict) -> bool:
    """Whether the bundles in ``root`` may be reused: they come from ``student`` (the model and the
    pairs of their parity reports, recorded in ``bench-student.json`` on first use). Bundles from
    another student would carry another model's parity, so they are refused, not overwritten."""
    stamp = root / "bench-student.json"
    if stamp.is_file():
        had = json.loads(stamp.read_text())
        if had != student:
            raise SystemExit(f"error: --bundle-dir {root} holds bundles of {had}, not of {student}")
        return True
    if root.is_dir() and any((p / "manifest.json").is_file() for p in root.iterdir() if p.is_dir()):
        raise SystemExit(f"error: --bundle-dir {root} holds bundles of an unknown student (no {stamp.name})")
    root.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(student))
    return False


def write_results(rows: list[dict], tkey: str, what: str, out_dir: Path, stem: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    _plot(rows, tkey, out_dir / f"{stem}.png", what)
    print(f"{what}, CPU {rows[0]['device']} ({rows[0]['cpu_flags']}), torch threads {rows[0]['threads']}")
    print(f"{'impl':38s} {'b1 ms':>8s} {'b1 x':>6s} {tkey:>18s} {'thr x':>6s} {'load s':>7s} {'+GB':>5s} "
          f"{'mean|dmu|':>10s} {'pairs ok':>9s}")
    for r in rows:
        print(f"{r['impl']:38s} {r['b1_ms_median']:8.1f} {r['b1_speedup']:6.2f} {r[tkey]:18.2f} "
              f"{r['throughput_ratio']:6.2f} {r['load_s']:7.1f} {r['load_rss_gb']:5.2f} {r['mean_abs_dmu']:10.4f} "
              f"{r['pair_agreement_pooled']:9.3f}")
    print(f"wrote {path}")


def _plot(rows, tkey, path, what):
    plt = pyplot()

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    names = [r["impl"] for r in rows]
    ax[0].bar(names, [r["b1_ms_median"] for r in rows], color="#4c72b0")
    ax[0].set_ylabel("batch-1 latency (ms)")
    ax[1].bar(names, [r[tkey] for r in rows], color="#55a868")
    ax[1].set_ylabel(tkey.replace("_", " "))
    for a in ax:
        a.tick_params(axis="x", rotation=60, labelsize=7)
    save_figure(fig, path, f"{what} on CPU: transformers eager vs ONNX bundles")


if __name__ == "__main__":
    sys.exit(main())
