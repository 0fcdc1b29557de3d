"""Summarise the benchmark CSVs of one run: a short table (printed) and summary.csv.

    python bench/summarize.py DIR      # reads DIR/{score_head,gdso_loss,grpo_loss,risd_loss}.csv
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

KERNELS = {
    "score_head": ("N", "H", "V", "K"),
    "risd_loss": ("N", "H", "V", "K", "weight"),
    "gdso_loss": ("P", "G", "K"),
    "grpo_loss": ("B", "T", "H", "V"),
}
MEM_COLS = ("peak_mem_mb", "peak_extra_mb")
SPEEDUP_COLS = ("speedup_vs_gathered_eager", "speedup_vs_eager")


def main(out_dir: str) -> int:
    out = Path(out_dir)
    rows = []
    for name, shape_cols in KERNELS.items():
        path = out / f"{name}.csv"
        if not path.is_file():
            continue
        for r in csv.DictReader(path.open()):
            mem = next((r[c] for c in MEM_COLS if r.get(c)), "")
            speed = next((r[c] for c in SPEEDUP_COLS if r.get(c)), "")
            rows.append({
                "kernel": name, "impl": r["impl"], "shape": " ".join(f"{c}={r[c]}" for c in shape_cols if c in r),
                "dtype": r.get("dtype", ""), "device": r.get("device", ""), "ms_median": r.get("ms_median", ""),
                "peak_mb": mem, "speedup": speed, "x_h200_floor": r.get("x_floor", ""), "note": r.get("note", ""),
            })
    engine = out / "engine.csv"
    if engine.is_file():  # the scoring engine: its own columns, printed as they are
        erows = list(csv.DictReader(engine.open()))
        if erows:
            cols = list(erows[0])[:9]
            print("engine: " + " | ".join(cols))
            for r in erows:
                print("engine: " + " | ".join(str(r[c])[:14] for c in cols))
    if not rows:
        if engine.is_file():
            return 0
        print(f"no benchmark CSVs in {out}")
        return 1
    with (out / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"{'kernel':11s} {'impl':18s} {'shape':40s} {'dtype':5s} {'ms':>9s} {'peak MB':>9s} {'speedup':>8s} "
          f"{'x H200 floor':>12s}")
    for r in rows:
        sp = f"{float(r['speedup']):.2f}x" if r["speedup"] else "-"
        xf = f"{float(r['x_h200_floor']):.1f}x" if r["x_h200_floor"] else "-"
        ms = r["ms_median"] or ("-" if r["note"].startswith(("skip", "interp", "CPU")) else "fail")
        print(f"{r['kernel']:11s} {r['impl']:18s} {r['shape'][:40]:40s} {r['dtype']:5s} {ms:>9s} "
              f"{r['peak_mb'] or '-':>9s} {sp:>8s} {xf:>12s}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
