"""Quantization parity at a real Qwen3.5 width: each quantization mode on three kinds of weights.

    python bench/bench_quantization.py [--size 0.8B] [--layers 4] [--vision-depth 2] [--pairs 24]
        [--modes int8-dynamic int8-weight int4-weight] [--weights random outliers probed]
        [--tools onnxruntime modelopt] [--openvino-precisions bf16] [--tag NAME]

The student is random at the size's real widths (``zreward_fast.testing.real_model``, reduced
depth, 448x448). ``outliers`` gives it the outlier features of trained checkpoints
(``testing.add_outlier_channels``: 4 hidden channels 30x larger at every projection's input);
``probed`` fits its K score rows to the known scores of synthetic images on the frozen random
features (a linear probe), so that held-out pairs have real margins and the gate's pairwise
agreement counts most of them (a random model ties nearly every pair). ``trained`` trains the
whole student (vision and embeddings frozen, as ``RISDTrainer`` does) for ``--train-steps`` steps
of RISD on the known scores of synthetic images (``testing.train_briefly``): a stand-in for a
trained checkpoint, whose activations and margins random weights do not have. Each row is one
``export_bundle`` with its parity report against the PyTorch model; the CSV is the record.
``--tools`` runs the QDQ modes (int8-static, fp8) once per quantizer: onnxruntime's and NVIDIA
ModelOpt's ONNX PTQ, on the same node selection and calibration images. ``--openvino-precisions``
adds a row per bundle and OpenVINO precision (``bf16`` where the CPU has it): the same graphs at
that precision, measured on the same pairs against the same PyTorch scores
(``Scorer.measure_parity``); the ``engine`` column tells them from the export's own report.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.pop("TRITON_INTERPRET", None)

from common import device_name, plot_bars, write_results  # noqa: E402

FIELDS = ("size", "weights", "mode", "tool", "engine", "fallback_kept", "mean_abs_dmu", "max_abs_dmu", "pair_agreement_pooled", "pairs_compared",
          "failures", "seconds", "bundle_mb")


def probe_score_rows(rm, images: int, steps: int = 300, lr: float = 1e-3, seed: int = 4242) -> float:
    """Fit ``rm``'s K score rows (nothing else) to soft targets at the known scores of ``images``
    synthetic images, on frozen features; returns the held-out PLCC of the means (last quarter)."""
    import numpy as np
    import torch

    from zreward_fast import DIMENSIONS
    from zreward_fast.reference import risd_loss
    from zreward_fast.training.data import soft_targets
    from zreward_fast.training.synthetic import samples

    size = rm.processor.image_size
    drawn = list(samples(images, seed=seed, size=size))
    feats, targets = [], []
    with torch.no_grad():
        for i in range(0, images, 4):
            chunk = drawn[i : i + 4]
            batch = rm.processor([s.image for s in chunk], [s.prompt for s in chunk], DIMENSIONS)
            h = rm.hidden_states(batch)
            pos = batch.query_positions
            feats.append(h.gather(1, pos.unsqueeze(-1).expand(-1, -1, h.shape[-1])).reshape(-1, h.shape[-1]))
            targets += [soft_targets(s.scores[d], rm.scale) for s in chunk for d in DIMENSIONS]
    x, t = torch.cat(feats).float(), torch.tensor(targets)
    head, ids = rm.lm_head, rm.score_token_ids
    w = head.weight.detach()[ids].clone().float().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    k, n_train = torch.arange(len(ids)), int(0.75 * len(x))
    for _ in range(steps):
        loss = risd_loss(x[:n_train], w, k, t[:n_train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    levels = torch.tensor(rm.scale.levels)
    with torch.no_grad():
        head.weight[ids] = w.to(head.weight.dtype)
        mu = (torch.softmax(x[n_train:] @ w.T, -1) * levels).sum(-1)
        known = (t[n_train:] * levels).sum(-1)
    return float(np.corrcoef(mu.numpy(), known.numpy())[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="0.8B")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vision-depth", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=0, help="embedding rows (0: the real 248,320)")
    ap.add_argument("--pairs", type=int, default=24, help="held-out pairs of each parity report")
    ap.add_argument("--modes", nargs="+", default=["int8-dynamic", "int8-weight", "int4-weight"])
    ap.add_argument("--weights", nargs="+", default=["random", "outliers", "probed"],
                    choices=["random", "outliers", "probed", "trained"])
    ap.add_argument("--tools", nargs="+", default=["auto"], choices=["auto", "onnxruntime", "modelopt"],
                    help="quantizers of the QDQ modes (int8-static, fp8); other modes always use onnxruntime's")
    ap.add_argument("--fallback", default="auto", choices=["auto", "none"],
                    help="export_bundle's per-layer float fallback (int8-dynamic, int8-weight)")
    ap.add_argument("--openvino-precisions", nargs="*", default=[], choices=["f32", "bf16", "f16"],
                    help="also score each bundle on OpenVINO at these precisions (its parity on the same pairs)")
    ap.add_argument("--tag", default="", help="appended to the results' file names")
    ap.add_argument("--probe-images", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=60, help="RISD steps of the trained weights")
    ap.add_argument("--train-lr", type=float, default=1e-4, help="learning rate of the trained weights")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from zreward_fast import ZRewardModel
    from zreward_fast.export import export_bundle
    from zreward_fast.export.quantize import MODELOPT_MODES
    from zreward_fast.runtime import Scorer
    from zreward_fast.testing import add_outlier_channels, real_model, train_briefly

    torch.set_num_threads(os.cpu_count() or 1)
    out_dir = args.out_dir or Path(__file__).parent / "results" / device_name("cpu")
    rows = []
    for weights in args.weights:
        model, processor = real_model(args.size, layers=args.layers, vision_depth=args.vision_depth,
                                      vocab_size=args.vocab or None)
        if weights == "outliers":
            print("outlier channels:", add_outlier_channels(model, count=4, gain=30.0), flush=True)
        rm = ZRewardModel(model, processor).eval()
        if weights == "probed":
            print(f"probe: held-out PLCC {probe_score_rows(rm, args.probe_images):.3f}", flush=True)
        if weights == "trained":
            t = time.perf_counter()
            print("trained:", train_briefly(rm, args.train_steps, lr=args.train_lr), f"{time.perf_counter() - t:.0f} s", flush=True)
        runs = [(m, t) for m in args.modes for t in (args.tools if m in MODELOPT_MODES else ["auto"])]
        for mode, tool in runs:
            work = Path(tempfile.mkdtemp(prefix="bench-quant-"))
            try:  # bundles are GBs at real width: never leave them behind
                t = time.perf_counter()
                res = export_bundle(rm, work / "b", quantize=mode, num_pairs=args.pairs, force=True, progress=False,
                                    quant_tool=tool, fallback=args.fallback)
                seconds = time.perf_counter() - t
                used = sorted({g["tool"] for g in res.manifest["quantization"].get("graphs", {}).values()}) or ["-"]
                base = {"size": args.size, "weights": weights, "mode": mode, "tool": "+".join(used),
                        "fallback_kept": len(res.manifest["quantization"].get("fallback", {}).get("kept", {})),
                        "seconds": seconds,
                        "bundle_mb": sum(f.stat().st_size for f in res.path.iterdir()) / 2**20}
                reports = [("onnxruntime", res.parity)]
                for precision in args.openvino_precisions:
                    scorer = Scorer(res.path, copy=False, backend="openvino", precision=precision, check_parity=False)
                    reports.append((f"openvino-{precision}", scorer.measure_parity()))
                    del scorer
                for engine, report in reports:
                    o = report["overall"]
                    row = {**base, "engine": engine, "mean_abs_dmu": o["mean_abs_dmu"], "max_abs_dmu": o["max_abs_dmu"],
                           "pair_agreement_pooled": o["pair_agreement_pooled"],
                           "pairs_compared": sum(b["pairs_compared"] for b in report["dimensions"].values()),
                           "failures": len(report["failures"])}  # each against its gate (the reduced one below f32)
                    rows.append(row)
                    print(row, flush=True)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        del rm, model
    out_dir.mkdir(parents=True, exist_ok=True)
    write_results(rows, out_dir, f"quantization_{args.size}{args.tag}", FIELDS,
                  f"Qwen3.5-{args.size} width, {args.layers} layers: mean |dmu| by mode and weights",
                  plot=plot_bars, key="mean_abs_dmu", ylabel="mean |delta mu| vs PyTorch",
                  label=lambda r: f"{r['weights']}\n{r['mode']}\n{r['tool']}\n{r['engine']}")


if __name__ == "__main__":
    main()
