"""`make demo`: build a tiny reward model, save it, score generated images through the CLI.

The model is random (training lands with the GDSO/RISD trainers), so the scores are random too;
what the demo shows is the path: a Qwen3.5 VLM with score tokens, the fixed-bucket processor,
the fused score head, `from_pretrained` and the `zreward-fast score` command.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def draw_images(out: Path) -> list[tuple[str, Path]]:
    rng = np.random.default_rng(0)
    items = []
    base = Image.new("RGB", (256, 256), (235, 235, 245))
    d = ImageDraw.Draw(base)
    d.ellipse((70, 60, 190, 180), fill=(220, 30, 30))
    d.rectangle((0, 200, 256, 256), fill=(90, 160, 90))
    items.append(("a red circle above green grass", base))
    noisy = np.asarray(base, np.float32) + rng.normal(0, 60, (256, 256, 3))
    items.append(("a red circle above green grass", Image.fromarray(noisy.clip(0, 255).astype(np.uint8))))
    items.append(("a red circle above green grass", base.filter(ImageFilter.GaussianBlur(6))))
    blue = Image.new("RGB", (300, 200), (20, 20, 60))
    ImageDraw.Draw(blue).rectangle((100, 50, 200, 150), fill=(40, 80, 230))
    items.append(("a blue square at night", blue))
    paths = []
    for i, (prompt, img) in enumerate(items):
        p = out / f"image_{i}.webp"
        img.save(p)
        paths.append((prompt, p))
    return paths


def main() -> int:
    exe = [sys.executable, "-m", "zreward_fast.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([*exe, "tiny", "--out", str(tmp / "model"), "--seed", "0"], check=True)
        rows = []
        for prompt, path in draw_images(tmp):
            t = time.perf_counter()
            res = subprocess.run(
                [*exe, "score", "--model", str(tmp / "model"), "--image", str(path), "--prompt", prompt, "--json"],
                check=True, capture_output=True, text=True,
            )
            rows.append((path.name, prompt, json.loads(res.stdout)["scores"], time.perf_counter() - t))
    dims = list(rows[0][2])
    print()
    print("NOTE: the model is a tiny RANDOM Qwen3.5 (no training yet): these scores are random.")
    print(f"{'image':<12} {'prompt':<32} " + " ".join(f"{d[:12]:>12}" for d in dims) + "   cli s")
    for name, prompt, scores, secs in rows:
        cells = " ".join(f"{scores[d]['mean']:6.2f}±{scores[d]['std']:<5.2f}" for d in dims)
        print(f"{name:<12} {prompt:<32} {cells}   {secs:5.1f}")
    print("(mean ± std of each dimension's distribution over the 9 levels 0.0 .. 4.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
