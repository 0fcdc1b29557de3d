"""`make demo`: the whole product on one CPU machine in a few minutes.

1. synthetic data: procedurally drawn images whose four scores are known by construction;
2. a tiny Qwen3.5 student trained with RISD on teacher distributions. No reasoning teacher is
   trained here (too slow for a CPU demo): the targets are distributions derived from the
   synthetic ground truth (`soft_targets`: peaked at the known score);
3. export to an int8 ONNX bundle, with its parity report against the PyTorch student;
4. `zreward-fast serve` on loopback; held-out clean and degraded images scored over HTTP;
5. the benchmark table (docs/evaluation.md) of the served student on held-out pairs with known
   gaps and conflict pairs, scored through the server, and the request latency.
"""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

TRAIN_SAMPLES = int(os.environ.get("DEMO_TRAIN_SAMPLES", 800))
TRAIN_STEPS = int(os.environ.get("DEMO_TRAIN_STEPS", 600))
BENCH_PAIRS = int(os.environ.get("DEMO_BENCH_PAIRS", 128))
BENCH_SEED = 2026
SIZE = 128


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict, float]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), time.perf_counter() - t
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), time.perf_counter() - t


def png_b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class HTTPScorer:
    """The served bundle behind ``score(images, prompts, dimensions)``, for ``evaluate``."""

    def __init__(self, url: str) -> None:
        self.url, self.latencies = url, []

    def score(self, images, prompts, dimensions):
        from zreward_fast.runtime.server import ServerConfig
        from zreward_fast.scale import ScoreResult

        items = [{"prompt": p, "image": png_b64(img)} for img, p in zip(images, prompts)]
        per_request = ServerConfig().max_items  # the served default: a larger request is refused (400)
        out = []
        for start in range(0, len(items), per_request):
            status, body, secs = post(self.url, {"items": items[start : start + per_request],
                                                 "dimensions": list(dimensions)})
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {body}")
            self.latencies.append(secs)
            out += [{d: ScoreResult(v["mean"], v["std"], tuple(v["probs"])) for d, v in r["scores"].items()}
                    for r in body["results"]]
        return out


def main() -> int:
    import torch

    from zreward_fast import ZRewardModel
    from zreward_fast.export.api import export_bundle
    from zreward_fast.testing import demo_model
    from zreward_fast.training.data import read_manifest, write_synthetic_dataset
    from zreward_fast.training.risd import RISDConfig, RISDTrainer
    from zreward_fast.evaluation import evaluate, format_dimensions, format_table

    torch.manual_seed(0)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        log(f"drawing {TRAIN_SAMPLES} synthetic training images ({SIZE}x{SIZE}) with known scores")
        data = write_synthetic_dataset(tmp / "data", TRAIN_SAMPLES, seed=5, size=SIZE, kinds=("risd",))
        log(f"training a tiny Qwen3.5 student with RISD for {TRAIN_STEPS} steps "
            "(targets: distributions derived from the synthetic ground truth, not a trained teacher)")
        rm = ZRewardModel(*demo_model(seed=0))
        cfg = RISDConfig(batch_size=16, learning_rate=5e-4, max_steps=TRAIN_STEPS, train_vision=True, seed=0,
                         output_dir=str(tmp / "risd"))
        trainer = RISDTrainer(rm, cfg, train_records=read_manifest(data["risd"], "risd"))
        state = trainer.train()
        losses = [h["loss"] for h in state.history if "loss" in h]
        log(f"RISD loss {statistics.mean(losses[:20]):.3f} (first 20 steps) -> {statistics.mean(losses[-20:]):.3f} (last 20)")
        trainer.save_pretrained(tmp / "student")

        log("exporting an int8 bundle (dynamic per-channel) with a parity report on 200 held-out pairs")
        result = export_bundle(tmp / "student", tmp / "bundle", quantize="int8", num_pairs=200, force=True)
        parity = result.parity["overall"]
        if result.failures:
            log(f"parity thresholds missed (written with force): {result.failures}")

        port = free_port()
        log(f"starting `zreward-fast serve` on 127.0.0.1:{port}")
        server = subprocess.Popen(
            [sys.executable, "-m", "zreward_fast.cli", "serve", "--bundle", str(tmp / "bundle"), "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.time() + 120
            while True:
                try:
                    with urllib.request.urlopen(base + "/readyz", timeout=2) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, OSError):
                    pass
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"server did not become ready: {server.stderr.read() if server.stderr else ''}")
                time.sleep(0.3)
            log(f"server ready; scoring {BENCH_PAIRS} held-out benchmark pairs (known gaps 0.5-2 points on one "
                f"dimension) and {BENCH_PAIRS // 4} conflict pairs over HTTP")
            http = HTTPScorer(base + "/v1/score")
            report = evaluate(http, seed=BENCH_SEED, pairs=BENCH_PAIRS, size=SIZE, progress=True)
            latencies = http.latencies
            with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
                metrics = r.read().decode()
        finally:
            server.terminate()
            server.wait(timeout=30)

    print()
    print("zreward-fast demo: tiny RISD student (targets derived from synthetic ground truth), int8 ONNX bundle, HTTP")
    print(f"held-out synthetic benchmark (seed {BENCH_SEED}, docs/evaluation.md), scored through the server:")
    print(format_table({"student int8 bundle over HTTP": report}))
    print()
    print(format_dimensions(report))
    lat = sorted(latencies)
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    print(f"HTTP latency per request (up to 16 images): p50 {1e3 * statistics.median(lat):.1f} ms, p99 {1e3 * p99:.1f} ms "
          f"over {len(lat)} requests")
    print(f"int8 bundle parity vs PyTorch: mean |dmu| {parity['mean_abs_dmu']:.4f}, "
          f"pairwise agreement {parity['pair_agreement']:.3f}")
    served = [ln for ln in metrics.splitlines() if ln.startswith("zreward_http_requests_total") and "score" in ln]
    batches = [ln for ln in metrics.splitlines() if ln.startswith(("zreward_batch_size_sum", "zreward_batch_size_count"))]
    if served:
        print("server metrics: " + "; ".join(served[:3] + batches))
    print(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
