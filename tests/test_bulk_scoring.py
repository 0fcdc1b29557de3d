"""`zreward-fast score --images DIR | --manifest FILE | --table FILE --out FILE` (issue 14, part 2):
one row per image, unreadable images reported per row, a killed run resumed with every image scored
exactly once, JSONL/CSV/Parquet outputs, pair manifests' HPA."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")

from zreward_fast import bulk_scoring as bs  # noqa: E402
from zreward_fast.cli import main  # noqa: E402
from zreward_fast.dimensions import DIMENSIONS  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tiny_sources):
    return tiny_sources[1]


@pytest.fixture(scope="module")
def scorer(bundle):
    from zreward_fast.runtime import Scorer

    return Scorer(bundle)


def _folder(root: Path, n: int = 12, corrupt: bool = True) -> dict[str, str]:
    """``n`` images in nested folders with a prompts.jsonl, and one corrupt file; {key: prompt}."""
    rng = np.random.default_rng(0)
    prompts = {}
    for i in range(n):
        key = f"{'a' if i % 2 else 'b/c'}/img{i:03d}.png"
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24 + i, 30, 3), dtype=np.uint8)).save(root / key)
        prompts[key] = f"{i + 1} red squares"
    if corrupt:
        (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        prompts["broken.png"] = "a broken file"
    with (root / "prompts.jsonl").open("w") as f:
        for k, p in prompts.items():
            f.write(json.dumps({"image": k, "prompt": p}) + "\n")
    return prompts


def test_folder_rows_equal_the_scorer_and_a_corrupt_image_is_one_error_row(tmp_path, bundle, scorer, capsys):
    prompts = _folder(tmp_path / "imgs")
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--bundle", str(bundle), "--images", str(tmp_path / "imgs"), "--out", str(out),
                 "--batch-size", "5", "--workers", "2", "--plot", str(tmp_path / "hist.png")]) == 0
    rows = bs.read_rows(out)
    assert sorted(r["image"] for r in rows) == sorted(prompts)
    bad = [r for r in rows if "error" in r]
    assert [r["image"] for r in bad] == ["broken.png"] and "corrupt" in bad[0]["error"]
    good = [r for r in rows if "error" not in r]
    want = scorer.score([str(tmp_path / "imgs" / r["image"]) for r in good], [r["prompt"] for r in good])
    for r, w in zip(good, want):
        assert r["prompt"] == prompts[r["image"]]
        for d in DIMENSIONS:
            assert abs(r[f"{d}_mean"] - w[d].mean) < 1e-6 and len(r[f"{d}_probs"]) == 9
    printed = capsys.readouterr().out
    assert "13 images: 12 scored, 1 unreadable, 0 already in" in printed and "aesthetics" in printed
    assert (tmp_path / "hist.png").stat().st_size > 1000
    # a second run refuses to overwrite without --resume; with it, nothing is left to score
    assert main(["score", "--bundle", str(bundle), "--images", str(tmp_path / "imgs"), "--out", str(out)]) == 2
    assert main(["score", "--bundle", str(bundle), "--images", str(tmp_path / "imgs"), "--out", str(out), "--resume"]) == 0
    assert "0 scored, 0 unreadable, 13 already in" in capsys.readouterr().out
    assert len(bs.read_rows(out)) == 13


_SLOW_CLI = """
import sys, time
from zreward_fast.runtime import Scorer
score = Scorer.score
def slow(self, *a, **k):
    time.sleep(0.15)  # the harness slows the scorer so that the kill lands midway
    return score(self, *a, **k)
Scorer.score = slow
from zreward_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_run_resumes_and_scores_every_image_exactly_once(tmp_path, bundle):
    prompts = _folder(tmp_path / "imgs", n=40, corrupt=False)
    out = tmp_path / "scores.jsonl"
    args = ["score", "--bundle", str(bundle), "--images", str(tmp_path / "imgs"), "--out", str(out), "--batch-size", "2"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CLI, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    end = time.monotonic() + 120
    while (not out.is_file() or out.read_text().count("\n") < 6) and time.monotonic() < end:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = out.read_text().count("\n")
    assert 6 <= before < 40, before  # killed midway
    with out.open("a") as f:
        f.write('{"image": "a/img001.png", "prom')  # a torn last line, as a kill mid-write leaves
    assert main([*args, "--resume"]) == 0
    keys = [r["image"] for r in bs.read_rows(out)]
    assert sorted(keys) == sorted(prompts) and len(keys) == len(set(keys)) == 40


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_csv_and_parquet_outputs_hold_the_same_rows(tmp_path, bundle, suffix):
    _folder(tmp_path / "imgs", n=5, corrupt=True)
    ref, out = tmp_path / "ref.jsonl", tmp_path / f"scores{suffix}"
    for o in (ref, out):
        assert main(["score", "--bundle", str(bundle), "--images", str(tmp_path / "imgs"), "--out", str(o)]) == 0
    want = {r["image"]: r for r in bs.read_rows(ref)}
    got = bs.read_rows(out)
    assert len(got) == 6 and not (tmp_path / f"scores{suffix}.partial.jsonl").exists()
    for r in got:
        w = want[r["image"]]
        assert ("error" in r) == ("error" in w)
        for d in DIMENSIONS:
            if "error" not in w:
                assert abs(r[f"{d}_mean"] - w[f"{d}_mean"]) < 1e-9 and r[f"{d}_probs"] == w[f"{d}_probs"]


def test_one_prompt_for_a_folder_and_a_prompts_csv(tmp_path, bundle):
    root = tmp_path / "imgs"
    _folder(root, n=3, corrupt=False)
    (root / "prompts.jsonl").unlink()
    assert main(["score", "--bundle", str(bundle), "--images", str(root), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert main(["score", "--bundle", str(bundle), "--images", str(root), "--prompt", "a cat",
                 "--out", str(tmp_path / "one.jsonl")]) == 0
    assert {r["prompt"] for r in bs.read_rows(tmp_path / "one.jsonl")} == {"a cat"}
    (root / "prompts.csv").write_text("image,prompt\na/img001.png,a dog\nb/c/img000.png,a bird\n")
    with pytest.raises(ValueError, match="1 image.s. have no prompt"):
        bs.folder_items(root)
    (root / "prompts.csv").write_text("image,prompt\na/img001.png,a dog\nb/c/img000.png,a bird\nb/c/img002.png,x\n")
    assert {i.key: i.prompt for i in bs.folder_items(root)}["a/img001.png"] == "a dog"


def test_pair_manifest_prints_hpa_and_a_table_scores_its_rows(tmp_path, bundle, capsys):
    from zreward_fast.training.data import read_manifest, write_synthetic_dataset

    paths = write_synthetic_dataset(tmp_path / "data", n=8, seed=3, size=48, kinds=("pairs", "scored"))
    pairs = paths["pairs"]
    assert main(["score", "--bundle", str(bundle), "--manifest", str(pairs), "--out", str(tmp_path / "p.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert "HPA on the manifest's pairs: " in printed and "overall" in printed
    records = read_manifest(pairs, "pairs")
    rows = bs.read_rows(tmp_path / "p.jsonl")
    assert len(rows) == len({img for r in records for img in r.images})
    hpa = bs.pair_hpa(rows, records, pairs.parent.resolve())
    means = {str(Path(r["image"])): r for r in rows}
    hits = []
    for p in records:  # the same HPA, counted here from the rows by image path
        a, b = (means[os.path.relpath(img, pairs.parent)][f"{p.dimension}_mean"] for img in p.images)
        if p.scores[0] != p.scores[1]:
            hits.append(0.5 if a == b else float((a > b) == (p.scores[0] > p.scores[1])))
    assert abs(hpa["overall"] - sum(hits) / len(hits)) < 1e-12 and set(hpa) - {"overall"} <= set(DIMENSIONS)
    # a Parquet table with image and prompt columns, image paths relative to the table
    import pyarrow as pa
    import pyarrow.parquet as pq

    scored = read_manifest(paths["scored"], "scored")
    table = tmp_path / "data" / "table.parquet"
    rel = [os.path.relpath(r.image, table.parent) for r in scored]
    pq.write_table(pa.table({"image": rel, "prompt": [r.prompt for r in scored]}), table)
    assert main(["score", "--bundle", str(bundle), "--table", str(table), "--out", str(tmp_path / "t.jsonl")]) == 0
    assert sorted(r["image"] for r in bs.read_rows(tmp_path / "t.jsonl")) == sorted(Path(x).as_posix() for x in rel)


def test_bad_arguments_are_clear_errors(tmp_path, bundle, capsys):
    _folder(tmp_path / "imgs", n=2, corrupt=False)
    assert main(["score", "--bundle", str(bundle), "--images", str(tmp_path / "imgs")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["score", "--bundle", str(bundle), "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o.txt")]) == 2
    assert "must end in one of" in capsys.readouterr().err
    assert main(["score", "--bundle", str(bundle), "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["score", "--bundle", str(bundle), "--prompt", "x"]) == 2
    assert "--image" in capsys.readouterr().err


def test_ray_data_run_gives_the_single_process_rows(tmp_path, bundle):
    """`--ray local`: two Ray workers, each with its own Scorer, stream the rows to the output; the
    rows equal the single-process run's, error row included."""
    pytest.importorskip("ray.data")
    prompts = _folder(tmp_path / "imgs", n=10)
    ref, out = tmp_path / "ref.jsonl", tmp_path / "ray.jsonl"
    assert main(["score", "--bundle", str(bundle), "--images", str(tmp_path / "imgs"), "--out", str(ref)]) == 0
    assert main(["score", "--bundle", str(bundle), "--images", str(tmp_path / "imgs"), "--out", str(out),
                 "--ray", "local", "--workers", "2", "--batch-size", "3"]) == 0
    want = {r["image"]: r for r in bs.read_rows(ref)}
    got = bs.read_rows(out)
    assert sorted(r["image"] for r in got) == sorted(want) == sorted(prompts)
    for r in got:
        w = want[r["image"]]
        assert set(r) == set(w)
        for d in DIMENSIONS:
            if "error" not in w:
                assert abs(r[f"{d}_mean"] - w[f"{d}_mean"]) < 1e-6
