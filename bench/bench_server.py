#!/usr/bin/env python
"""Serving benchmark: requests/s and p50/p99 latency at 1, 8 and 32 concurrent clients.

Rows, same scorer, same image (a JPEG of --image-size pixels, decoded by whoever scores it):
  direct   N threads calling scorer.score([image], [prompt]) themselves: no batching, no HTTP
  batcher  N threads through an in-process DynamicBatcher: batching, no HTTP
  http     N client threads (httpx) -> POST /v1/score on the server (uvicorn, in a child process
           so clients and server do not share a GIL): batching + HTTP + JSON + base64. The
           server decodes (and resizes) images in its decode threads while the model runs;
           the direct and batcher rows decode inside score(), in series with the model.

    python bench/bench_server.py --bundle BUNDLE_DIR [--device cuda]   # the real Scorer
    python bench/bench_server.py --fake --out-dir /tmp/bench_server     # the fake scorer (smoke)

--fake uses zreward_fast.runtime.testing.FakeScorer with a latency model (--fake-latency-ms per
call + --fake-item-ms per image, one call at a time like one accelerator): its numbers show the
serving overheads and the batching gain, not a model's speed. The clients run on the same machine
as the server and take CPU from it; on a small machine the http row at high concurrency is partly
a client measurement.

Writes server.csv and server.png to --out-dir (default bench/results/<device-name>/).
"""
from __future__ import annotations

import argparse
import base64
import csv
import multiprocessing as mp
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import pyplot, save_figure  # noqa: E402

CSV_FIELDS = ["mode", "concurrency", "requests", "errors", "seconds", "rps", "p50_ms", "p99_ms", "mean_batch",
              "scorer", "device", "note"]
MODES = ("direct", "batcher", "http")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help="export bundle directory (the real Scorer)")
    src.add_argument("--fake", action="store_true", help="the fake scorer (smoke run, no model)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (onnxruntime providers for --bundle; names the results dir)")
    p.add_argument("--concurrency", default="1,8,32", help="comma list of client counts")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of " + ",".join(MODES))
    p.add_argument("--seconds", type=float, default=5.0, help="timed seconds per row")
    p.add_argument("--warmup-s", type=float, default=1.0, help="untimed seconds before each row")
    p.add_argument("--image-size", type=int, default=448, help="side of the test JPEG")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--parallel-runs", type=int, default=1, help="Scorer(parallel_runs=...) for --bundle")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--fake-latency-ms", type=float, default=10.0, help="--fake: cost of one call")
    p.add_argument("--fake-item-ms", type=float, default=2.0, help="--fake: extra cost per image")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = set(args.modes) - set(MODES)
    if bad:
        p.error(f"unknown modes {sorted(bad)}")
    if any(c < 1 for c in args.concurrency):
        p.error("concurrency values must be >= 1")
    return args


def build_scorer(bundle: str | None, device: str, fake_latency_ms: float, fake_item_ms: float, parallel_runs: int = 1):
    if bundle is None:
        from zreward_fast.runtime.testing import FakeScorer

        return FakeScorer(latency_s=fake_latency_ms / 1000, latency_per_item_s=fake_item_ms / 1000, exclusive=True)
    from zreward_fast.runtime import Scorer

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
    return Scorer(bundle, providers=providers, parallel_runs=parallel_runs)


def _serve(port: int, bundle: str | None, device: str, fake_latency_ms: float, fake_item_ms: float,
           max_batch_size: int, max_wait_ms: float, parallel_runs: int = 1) -> None:
    """Child process: the HTTP server on loopback."""
    import uvicorn

    from zreward_fast.runtime.server import ServerConfig, create_app

    scorer = build_scorer(bundle, device, fake_latency_ms, fake_item_ms, parallel_runs)
    cfg = ServerConfig(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=4096, max_body_bytes=64 << 20)
    uvicorn.run(create_app(scorer, cfg), host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _summary(lat: list[float], errors: int, seconds: float) -> dict:
    lat_ms = sorted(x * 1000 for x in lat)
    q = statistics.quantiles(lat_ms, n=100, method="inclusive") if len(lat_ms) > 1 else lat_ms * 99
    return {"requests": len(lat_ms), "errors": errors, "seconds": round(seconds, 3),
            "rps": round(len(lat_ms) / seconds, 2) if seconds > 0 else 0.0,
            "p50_ms": round(q[49], 3) if lat_ms else None, "p99_ms": round(q[98], 3) if lat_ms else None}


def run_threads(call, concurrency: int, seconds: float, warmup_s: float) -> dict:
    """N threads calling ``call()`` in a loop; latencies of the calls that start in the timed window."""
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    t_start = time.perf_counter() + warmup_s
    t_stop = t_start + seconds

    def loop() -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= t_stop:
                return
            try:
                call()
                ok = True
            except Exception:
                ok = False
            t1 = time.perf_counter()
            if t0 >= t_start:
                with lock:
                    if ok:
                        lat.append(t1 - t0)
                    else:
                        errors[0] += 1

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _summary(lat, errors[0], max(time.perf_counter() - t_start, 1e-9))


def run_http(url: str, body: bytes, concurrency: int, seconds: float, warmup_s: float) -> dict:
    """N client threads, one keep-alive httpx.Client each (httpx's AsyncClient showed second-long
    tails at 32 connections here, a client artefact)."""
    import httpx

    local = threading.local()

    def call() -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=120)
        r = local.client.post(url, content=body, headers={"content-type": "application/json"})
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")

    return run_threads(call, concurrency, seconds, warmup_s)


def _batch_metrics(base: str) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    s = c = 0.0
    for fam in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=10).text):
        for smp in fam.samples:
            if smp.name == "zreward_batch_size_sum":
                s = smp.value
            elif smp.name == "zreward_batch_size_count":
                c = smp.value
    return s, c


def main(argv=None) -> int:
    args = parse_args(argv)
    from bench_score_head import device_name

    from zreward_fast.runtime.batcher import DynamicBatcher
    from zreward_fast.runtime.testing import free_port, make_image_bytes

    dev = device_name(args.device)
    out_dir = Path(args.out_dir) if args.out_dir else ROOT / "bench" / "results" / dev
    out_dir.mkdir(parents=True, exist_ok=True)
    scorer_name = "fake" if args.fake else Path(args.bundle).name
    if args.parallel_runs > 1:
        scorer_name += f" ({args.parallel_runs} runs)"
    image = make_image_bytes(0, (args.image_size, args.image_size), "JPEG")
    prompt = "a red cube on a wooden table"
    note = (f"fake {args.fake_latency_ms}ms/call + {args.fake_item_ms}ms/item, serial" if args.fake else "")
    rows: list[dict] = []

    def add(mode: str, conc: int, res: dict, mean_batch: float | None) -> None:
        row = {"mode": mode, "concurrency": conc, **res, "mean_batch": None if mean_batch is None else round(mean_batch, 2),
               "scorer": scorer_name, "device": dev, "note": note}
        rows.append(row)
        print(f"{mode:8s} c={conc:<3d} {row['rps']:9.1f} req/s  p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  "
              f"batch {row['mean_batch']}  errors {row['errors']}", flush=True)

    if "direct" in args.modes or "batcher" in args.modes:
        scorer = build_scorer(args.bundle, args.device, args.fake_latency_ms, args.fake_item_ms, args.parallel_runs)
        if hasattr(scorer, "warmup"):
            scorer.warmup()
        for conc in args.concurrency:
            if "direct" in args.modes:
                add("direct", conc, run_threads(lambda: scorer.score([image], [prompt]), conc, args.seconds, args.warmup_s), 1.0)
            if "batcher" in args.modes:
                with DynamicBatcher(scorer.score, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                                    max_queue=4096) as b:
                    res = run_threads(lambda: b.submit(image, prompt), conc, args.seconds, args.warmup_s)
                    add("batcher", conc, res, b.stats().mean_batch_size)

    if "http" in args.modes:
        port = free_port()
        ctx = mp.get_context("spawn")
        proc = ctx.Process(target=_serve, args=(port, args.bundle, args.device, args.fake_latency_ms, args.fake_item_ms,
                                                args.max_batch_size, args.max_wait_ms, args.parallel_runs), daemon=True)
        proc.start()
        base = f"http://127.0.0.1:{port}"
        try:
            import httpx

            deadline = time.monotonic() + 600
            while True:
                if not proc.is_alive():
                    raise RuntimeError("the server process exited during start-up")
                try:
                    if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("the server did not become ready in 600 s")
                time.sleep(0.2)
            import json

            body = json.dumps({"prompt": prompt, "image": base64.b64encode(image).decode()}).encode()
            for conc in args.concurrency:
                s0, c0 = _batch_metrics(base)
                res = run_http(base + "/v1/score", body, conc, args.seconds, args.warmup_s)
                s1, c1 = _batch_metrics(base)
                add("http", conc, res, (s1 - s0) / (c1 - c0) if c1 > c0 else None)
        finally:
            proc.terminate()
            proc.join(30)

    csv_path = out_dir / "server.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    plot(rows, out_dir / "server.png", f"serving, {scorer_name} scorer on {dev}")
    print(f"wrote {csv_path} and {out_dir / 'server.png'}")
    return 0


def plot(rows: list[dict], path: Path, title: str) -> None:
    plt = pyplot()

    fig, (ax_rps, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"direct": "#4C72B0", "batcher": "#55A868", "http": "#DD8452"}
    for mode in MODES:
        rs = sorted((r for r in rows if r["mode"] == mode and r["requests"]), key=lambda r: r["concurrency"])
        if not rs:
            continue
        x = [r["concurrency"] for r in rs]
        ax_rps.plot(x, [r["rps"] for r in rs], "o-", color=colors[mode], label=mode)
        ax_lat.plot(x, [r["p50_ms"] for r in rs], "o-", color=colors[mode], label=f"{mode} p50")
        ax_lat.plot(x, [r["p99_ms"] for r in rs], "s--", color=colors[mode], alpha=0.7, label=f"{mode} p99")
    for ax, ylabel in ((ax_rps, "requests / s"), (ax_lat, "latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax_lat.set_yscale("log")
    save_figure(fig, path, title)


if __name__ == "__main__":
    sys.exit(main())
