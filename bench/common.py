"""What every benchmark script shares: the results-folder name of a device, dtype names, timing,
quantiles, speedups, the CSV, the printed table and the plot. Each script defines only its cases."""
from __future__ import annotations

import argparse
import csv
import gc
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]


def device_name(device: str) -> str:
    """A folder-safe name for the device: the GPU's name, or "cpu-<model>-<cores>c"."""
    if device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = "cpu-" + (_cpu_model() or platform.machine())
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def start_kernel_bench(device: str, interpret: bool) -> bool:
    """Before triton's first import: ``TRITON_INTERPRET`` set (1: the interpreter, a correctness
    check, never a timing; 0: the compiled kernels) and the repository on ``sys.path``. Exits with
    status 2 when CUDA is asked for and absent. Returns whether ``device`` is a GPU."""
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    sys.path.insert(0, str(ROOT))
    import torch

    gpu = device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        print(f"error: --device {device} but torch.cuda.is_available() is False", file=sys.stderr)
        raise SystemExit(2)
    return gpu


def add_score_rows_args(p: argparse.ArgumentParser) -> None:
    """The shape, dtype and timing options of the benchmarks over the K score rows of an LM head
    (score head, RISD loss); ``None`` defaults are filled per device by each script."""
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--N", type=int, default=None, help="positions (default: 1024 cpu, 4096 cuda)")
    p.add_argument("--H", type=int, default=None, help="hidden size (default: 1024 cpu, 4096 cuda)")
    p.add_argument("--V", type=int, default=None, help="vocabulary (default: 32000 cpu, 248320 cuda)")
    p.add_argument("--K", type=int, default=9, help="score tokens")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp32 cpu, bf16 cuda")
    p.add_argument("--repeats", type=int, default=None, help="timed iterations (default: 5 cpu, 50 cuda)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations (default: 1 cpu, 5 cuda)")
    p.add_argument("--temperature", type=float, default=1.0)


def fill_score_rows_defaults(a: argparse.Namespace) -> bool:
    """Fill the per-device defaults of :func:`add_score_rows_args`; returns whether it is a GPU run."""
    gpu = a.device.startswith("cuda")
    a.N = a.N or (4096 if gpu else 1024)
    a.H = a.H or (4096 if gpu else 1024)
    a.V = a.V or (248320 if gpu else 32000)
    a.dtype = DTYPES[a.dtype or ("bf16" if gpu else "fp32")]
    a.repeats = a.repeats or (50 if gpu else 5)
    a.warmup = a.warmup if a.warmup is not None else (5 if gpu else 1)
    return gpu


def add_output_args(p: argparse.ArgumentParser, graph: bool = True) -> None:
    """``--out-dir`` and, for the kernel benchmarks, ``--no-graph``."""
    if graph:
        p.add_argument("--no-graph", action="store_true",
                       help="GPU: skip the CUDA-graph replay rows (the capturable rows timed again without launch gaps)")
    p.add_argument("--out-dir", default=None, help="default: bench/results/<device-name>/")


def pick_impls(spec: str, known: Sequence[str]) -> list[str]:
    """``"all"`` or a comma list of implementations, each one of ``known``."""
    impls = list(known) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = sorted(set(impls) - set(known))
    if unknown:
        raise SystemExit(f"unknown impl(s) {unknown}; choose from {list(known)}")
    return impls


def results_dir(out_dir: str | None, device: str) -> Path:
    """``--out-dir``, or ``bench/results/<device name>``, created."""
    path = Path(out_dir) if out_dir else ROOT / "bench" / "results" / device_name(device)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}-{os.cpu_count()}c"
    except OSError:
        pass
    return ""


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile of ``xs`` (q in [0, 1])."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ----------------------------------------------------------------------------- dtypes
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


# ----------------------------------------------------------------------------- timing
class Timer:
    """CUDA events on a GPU, perf_counter on the CPU; times in ms."""

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def peak_extra_mb(self, fn) -> float | None:
        """Peak memory one call allocates beyond what was allocated before it (GPU only)."""
        if not self.cuda:
            return None
        torch = self.torch
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak / 2**20

    def times(self, fn, repeats: int) -> list[float]:
        torch = self.torch
        res = []
        self.sync()
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn()
                end.record()
                end.synchronize()
                res.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                out = fn()
                res.append((time.perf_counter() - t0) * 1e3)
            del out
        return res

    def graph_times(self, fn, repeats: int, inner: int = 20) -> list[float]:
        """CUDA only: ``fn`` captured once in a CUDA graph (after warm-up calls on a side stream, as
        torch's whole-network capture does), then ``repeats`` timings of ``inner`` back-to-back
        replays each, per replay: the GPU time of the work without Python or launch gaps (the way
        to time launch-bound ops). ``fn`` must not synchronise with the host."""
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        graph.replay()
        torch.cuda.synchronize()
        res = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                graph.replay()
            end.record()
            end.synchronize()
            res.append(start.elapsed_time(end) / inner)
        del out, graph
        return res

    def time(self, fn, repeats: int, warmup: int) -> tuple[list[float], float | None]:
        """``warmup`` untimed calls, the peak extra memory of one call, then ``repeats`` timed ones."""
        for _ in range(warmup):
            fn()
        peak = self.peak_extra_mb(fn)
        return self.times(fn, repeats), peak


# The floor every GPU figure is read against: an H200's HBM bandwidth and dense bf16 tensor-core
# rate (docs/architecture.md, Performance targets; the device notes measured 4.3 TB/s and 788 TFLOP/s).
H200_BYTES_PER_S = 4.8e12
H200_BF16_FLOPS_PER_S = 790e12


def roofline_ms(bytes_moved: float, flops: float, bandwidth: float = H200_BYTES_PER_S,
                peak_flops: float = H200_BF16_FLOPS_PER_S) -> float:
    """The physical floor of one call on an H200, in ms: the longer of moving its compulsory bytes
    and doing its FLOPs (no launch overhead, no reuse beyond what the op needs)."""
    return 1e3 * max(bytes_moved / bandwidth, flops / peak_flops)


def add_roofline(rows: list[dict], bytes_moved: float, flops: float) -> None:
    """``floor_ms`` (the op's H200 floor at this shape) and ``x_floor`` (measured / floor) on every row."""
    floor = roofline_ms(bytes_moved, flops)
    for r in rows:
        r["floor_ms"] = floor
        if r.get("ms_median"):
            r["x_floor"] = r["ms_median"] / floor


def error_note(e: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, for a row's note."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit] if lines else ''}"


def time_row(row: dict, step, ref, timer: Timer, repeats: int, warmup: int, width: int = 18):
    """Time ``step()`` into ``row``: its first call (compiles, autotunes) is checked against ``ref``
    (a tensor or a sequence of them; the max |difference| goes in the note), then ``warmup`` untimed
    and ``repeats`` timed calls. A failure goes in the note instead of stopping the run. Returns
    ``step``, or None when it failed."""
    try:
        t0 = time.perf_counter()
        out = step()
        first_s = time.perf_counter() - t0
        outs, refs = (out, ref) if isinstance(out, (tuple, list)) else ((out,), (ref,))
        err = max_abs_diff([a.float() for a in outs], [b.float() for b in refs])
        times, peak = timer.time(step, repeats, warmup)
    except Exception as e:  # noqa: BLE001 - record the failure and move on
        row["note"] = "failed: " + error_note(e)
        print(f"  {row['impl']:{width}s} {row['note']}", flush=True)
        return None
    row.update(**timing_fields(times), peak_mem_mb=peak, note=f"max|out-ref|={err:.1e}; first call {first_s:.1f}s")
    print(f"  {row['impl']:{width}s} {row['ms_median']:10.4f} ms", flush=True)
    return step


def timing_fields(times: list[float]) -> dict:
    return {"ms_median": statistics.median(times), "ms_p10": quantile(times, 0.1), "ms_p90": quantile(times, 0.9)}


GRAPH_SUFFIX = "+graph"  # a row timed by CUDA graph replay (Timer.graph_times)


def graph_rows(rows: list[dict], fns: dict, impls: Sequence[str], timer: Timer, repeats: int, start: int = 0) -> None:
    """Append, for each of ``impls`` whose plain row (in ``rows[start:]``) was timed (``fns[impl]``: its
    no-argument step), a copy of that row named '<impl>+graph' and timed by CUDA graph replay, or a
    note on why not."""
    for impl in impls:
        if impl not in fns:
            continue
        base = next(r for r in rows[start:] if r["impl"] == impl and r.get("ms_median") is not None)
        row = {k: v for k, v in base.items() if k not in ("ms_median", "ms_p10", "ms_p90", "note")}
        row.update(impl=impl + GRAPH_SUFFIX, **{k: None for k in ("peak_mem_mb", "peak_extra_mb") if k in base})
        try:
            row.update(**timing_fields(timer.graph_times(fns[impl], repeats)),
                       note="CUDA graph replay: GPU time, no Python or launch gaps")
            print(f"  {row['impl']:22s} {row['ms_median']:10.4f} ms", flush=True)
        except Exception as e:  # noqa: BLE001 - an op that cannot be captured keeps its plain row
            row["note"] = "graph capture failed: " + error_note(e, 140)
            print(f"  {row['impl']:22s} {row['note']}", flush=True)
        rows.append(row)


def add_speedups(rows: list[dict], base_impl: str, key: str, same: Sequence[str] = ()) -> None:
    """rows[key] = the base row's median / this row's, the base being ``base_impl`` with the same
    values of the ``same`` fields (a graph-replay row against the base's graph-replay row)."""
    for r in rows:
        want = base_impl + (GRAPH_SUFFIX if r["impl"].endswith(GRAPH_SUFFIX) else "")
        base = next((b for b in rows if b["impl"] == want and b.get("ms_median")
                     and all(b.get(f) == r.get(f) for f in same)), None)
        if base and r.get("ms_median"):
            r[key] = base["ms_median"] / r["ms_median"]


# ----------------------------------------------------------------------------- results
def fmt(x):
    """A CSV cell: floats to 4 significant digits, None empty."""
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.4g}"
    return x


def print_table(rows: list[dict], keys: Sequence[str] = ("impl",), speedup_key: str = "speedup_vs_eager",
                mem_key: str = "peak_mem_mb", note: bool = False) -> None:
    """One line a row: its key fields, median/p10/p90 ms, peak extra MB and speedup; a row without
    a timing prints its note instead."""
    width = {k: max([len(k)] + [len(str(r.get(k, ""))) for r in rows]) for k in keys}
    head = " ".join(f"{k:{width[k]}s}" for k in keys)
    floor = any(r.get("floor_ms") for r in rows)
    print(f"\n{head} {'ms':>10s} {'p10':>10s} {'p90':>10s} {'peak MB':>9s} {'speedup':>8s}"
          + (f" {'x H200 floor':>12s}" if floor else "") + ("  note" if note else ""))
    for r in rows:
        lead = " ".join(f"{str(r.get(k, '')):{width[k]}s}" for k in keys)
        if r.get("ms_median") is None:
            print(f"{lead} {'-':>10s}  {r.get('note', '')}")
            continue
        peak = f"{r[mem_key]:9.1f}" if r.get(mem_key) is not None else f"{'n/a':>9s}"
        sp = f"{r[speedup_key]:7.2f}x" if r.get(speedup_key) else f"{'':8s}"
        xf = f" {r['x_floor']:11.1f}x" if floor and r.get("x_floor") else (f" {'':12s}" if floor else "")
        print(f"{lead} {r['ms_median']:10.4g} {r['ms_p10']:10.4g} {r['ms_p90']:10.4g} {peak} {sp}{xf}"
              + (f"  {r.get('note', '')}" if note else ""))
    if floor:
        print(f"(x H200 floor: measured / {rows[0]['floor_ms']:.4g} ms, the op's bytes at 4.8 TB/s or its FLOPs at "
              f"790 TFLOP/s, whichever is longer)")


def variant_style(key: str, first, what: str) -> dict:
    """``label`` and ``color`` for :func:`plot_rows` when the rows come in two variants of
    ``row[key]``: the variant in each bar's label (``what value``), ``first`` blue, the other orange."""
    return dict(label=lambda r: f"{r['impl']}\n({what} {r[key]})",
                color=lambda r: "#4C72B0" if r[key] == first else "#DD8452")


def max_abs_diff(xs, ys) -> float:
    """The largest |x - y| over pairs of tensors."""
    return max((a - b).abs().max().item() for a, b in zip(xs, ys))


def pyplot():
    """``matplotlib.pyplot`` on the Agg back end (files, no display); ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, title: str, fontsize: float | None = None, dpi: int = 120, rect=None) -> None:
    """Title, tight layout, write ``path`` and close the figure."""
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def plot_rows(rows: list[dict], path: Path, title: str, label=None, color=None,
              speedup_key: str = "speedup_vs_eager", mem_key: str = "peak_mem_mb") -> None:
    """Bars of the median time (p10-p90 whiskers, log scale, speedups written above), a second
    panel of peak extra memory when measured, and the untimed rows' notes underneath."""
    plt = pyplot()

    label = label or (lambda r: r["impl"])
    color = color or (lambda r: "#55A868" if r["impl"].startswith("triton") else "#4C72B0")
    timed = [r for r in rows if r.get("ms_median") is not None]
    has_mem = any(r.get(mem_key) is not None for r in timed)
    fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(11 if has_mem else 7, 4.2), squeeze=False)
    labels, colors = [label(r) for r in timed], [color(r) for r in timed]
    ax = axes[0][0]
    med = [r["ms_median"] for r in timed]
    err = [[m - r["ms_p10"] for m, r in zip(med, timed)], [r["ms_p90"] - m for m, r in zip(med, timed)]]
    bars = ax.bar(range(len(timed)), med, yerr=err, color=colors, capsize=3)
    ax.set_yscale("log")
    if med:
        ax.set_ylim(top=max(med) * 4)  # room for the labels above the tallest bar
    ax.set_ylabel("fwd+bwd time, ms (median, p10-p90)")
    for b, r in zip(bars, timed):
        txt = f"{r['ms_median']:.3g}" + (f"\n{r[speedup_key]:.2f}x" if r.get(speedup_key) else "")
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), txt, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(timed)), labels, rotation=30, ha="right", fontsize=7)
    if has_mem:
        ax2 = axes[0][1]
        mem = [r.get(mem_key) or 0 for r in timed]
        bars = ax2.bar(range(len(timed)), mem, color=colors)
        for b, m in zip(bars, mem):
            ax2.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{m:.3g}", ha="center", va="bottom", fontsize=7)
        ax2.set_ylabel("peak extra memory, MB")
        ax2.set_xticks(range(len(timed)), labels, rotation=30, ha="right", fontsize=7)
    skipped = [f"{label(r)}: {r.get('note', '')}".replace("\n", " ") for r in rows if r.get("ms_median") is None]
    if skipped:
        fig.text(0.01, 0.01, "\n".join(s[:160] for s in skipped), fontsize=6, va="bottom")
    save_figure(fig, path, title, fontsize=9, dpi=130, rect=(0, 0.04 * len(skipped), 1, 1))


def plot_bars(rows: list[dict], path: Path, title: str, key: str, ylabel: str, label=None) -> None:
    """One bar per row of ``row[key]`` (rows without it left out), the value written above."""
    plt = pyplot()

    label = label or (lambda r: r["impl"])
    shown = [r for r in rows if r.get(key) is not None]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    bars = ax.bar(range(len(shown)), [r[key] for r in shown], color="#4C72B0")
    for b, r in zip(bars, shown):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{r[key]:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(shown)), [label(r) for r in shown], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    save_figure(fig, path, title, fontsize=9, dpi=130)


def write_results(rows: list[dict], out_dir: Path, stem: str, fields: Sequence[str], title: str, plot=None,
                  **plot_kw) -> None:
    """``<stem>.csv`` (the record), ``<stem>.png`` when matplotlib imports (a GPU machine's python
    may lack it: the CSV is what counts). ``plot`` replaces :func:`plot_rows` (same arguments)."""
    csv_path = out_dir / f"{stem}.csv"
    with open(csv_path, "w", newline="") as f:
        fields = list(fields) + [k for k in ("floor_ms", "x_floor") if k not in fields and any(k in r for r in rows)]
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: fmt(r.get(k)) for k in fields})
    png_path: Path | None = out_dir / f"{stem}.png"
    try:
        (plot or plot_rows)(rows, png_path, title, **plot_kw)
    except ImportError as e:
        print(f"no plot: {e}")
        png_path = None
    print(f"wrote {csv_path}" + (f" and {png_path}" if png_path else ""))
