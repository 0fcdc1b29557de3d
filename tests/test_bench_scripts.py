"""The kernel benchmark scripts run end to end on the CPU at tiny shapes (the Triton rows under the
interpreter), so a GPU session of bench/gpu_check.sh never spends its minutes on a script error."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--repeats", "1", "--warmup", "0"]
SCRIPTS = {
    "score_head": ["--interpret", "--impls", "eager-gathered,triton", "--N", "32", "--H", "64", "--V", "256"],
    "risd_loss": ["--interpret", "--impls", "eager-gathered,triton", "--N", "32", "--H", "64", "--V", "256"],
    "gdso_loss": ["--impls", "eager,triton", "--P", "4", "--G", "4", "--K", "9"],
    "grpo_loss": ["--impls", "eager,triton", "--B", "2", "--T", "8", "--H", "32", "--V", "256"],
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_kernel_benchmark_runs_and_writes_its_rows(name, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # each script sets its own
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, str(ROOT / "bench" / f"bench_{name}.py"), *SCRIPTS[name], *TINY, "--out-dir", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    with open(tmp_path / f"{name}.csv") as f:
        rows = list(csv.DictReader(f))
    impls = {row["impl"] for row in rows}
    assert "triton" in impls and len(rows) >= 2, rows
    timed = [row for row in rows if row["impl"] != "triton"]
    assert timed and all(float(row["ms_median"]) > 0 for row in timed), timed
    # the Triton row is the interpreter's correctness check against the reference, not a timing
    smoke = [row["note"] for row in rows if row["impl"] == "triton" and "correctness smoke" in row["note"]]
    errors = [float(x) for note in smoke for x in re.findall(r"\|=([0-9.eE+-]+)", note)]
    assert smoke and errors and max(errors) < 1e-3, smoke


def test_gpu_check_script_parses():
    r = subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.heavy  # 47 s: CI's second step (`make test-heavy`) keeps `make test` within its budget
def test_gpu_check_dry_run_runs_every_step_on_the_cpu(tmp_path):
    """`gpu_check.sh --dry-run`: every step of the device run (the GPU tests collected and skipped,
    the four kernel benchmarks at tiny shapes, the engine's CPU smoke and profile, the summary, the
    archive a device call brings back) with this machine's python, so a typo or a missing import
    never costs device time."""
    import tarfile

    out, archive = tmp_path / "out", tmp_path / "gpu_check.tgz"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "STEPS")}
    env.update(OUT=str(out), ARCHIVE=str(archive), OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "dry run" in r.stdout and "all steps passed" in r.stdout
    for step in ("env", "gpu_tests", "gpu_engine_tests", "bench_score_head", "bench_gdso_loss", "bench_risd_loss",
                 "bench_grpo_loss", "bench_engine"):
        assert f"=== [{step}] rc=0" in r.stdout, step
    files = ("gpu_tests.txt", "gpu_engine_tests.txt", "score_head.csv", "gdso_loss.csv", "risd_loss.csv",
             "grpo_loss.csv", "engine.csv", "engine_profile.txt", "summary.csv")
    for f in files:
        assert (out / f).is_file(), f
    with tarfile.open(archive) as tar:  # everything in one file, the wheels' site left out
        names = tar.getnames()
    assert {f"out/{f}" for f in files} <= set(names) and not any("site" in n for n in names), names
    # the GPU tests were found (collected) and skipped here, none failed
    for f in ("gpu_tests.txt", "gpu_engine_tests.txt"):
        tests = (out / f).read_text()
        assert "skipped" in tests.lower() and "failed" not in tests and "error" not in tests.lower(), tests[-2000:]
    # the engine's rows carry the fp32 reference column
    assert "mean_abs_dmu_vs_fp32" in (out / "engine.csv").read_text().splitlines()[0]


def test_roofline_floor_is_the_slower_of_bytes_and_flops():
    sys.path.insert(0, str(ROOT / "bench"))
    from common import add_roofline, roofline_ms

    assert roofline_ms(4.8e12, 0) == pytest.approx(1000.0)  # one second of HBM traffic
    assert roofline_ms(0, 790e12) == pytest.approx(1000.0)  # one second of bf16 tensor-core work
    # the GRPO target shape (B*T = 12288 tokens, H 4096, V 248320, bf16): compute-bound, ~95 ms
    bt, h, v = 16 * 768, 4096, 248320
    assert roofline_ms(2 * (3 * v * h + 3 * bt * h), 6 * bt * h * v) == pytest.approx(6 * bt * h * v / 790e9)
    rows = [{"impl": "a", "ms_median": 2.0}, {"impl": "b", "note": "failed"}]
    add_roofline(rows, 4.8e9, 0)  # a 1 ms floor
    assert rows[0]["x_floor"] == pytest.approx(2.0) and "x_floor" not in rows[1] and rows[1]["floor_ms"] == 1.0


def test_cpu_runtime_bench_parses_openvino_rows_and_names_cpu_flags():
    # run apart: the script drops TRITON_INTERPRET from the environment on import
    code = """
import sys
sys.path.insert(0, "bench")
import bench_cpu_runtime as b
assert b.openvino_rows(["none", "int8-weight:bf16"]) == [("none", "f32"), ("int8-weight", "bf16")]
try:
    b.openvino_rows(["none:fp64"])
except SystemExit as e:
    assert "fp64" in str(e) and "bf16" in str(e), e
else:
    raise AssertionError("an unknown precision was accepted")
flags = b.cpu_flags().split()
assert set(flags) <= set(b.PRECISION_FLAGS), flags
from argparse import Namespace
args = Namespace(modes=["none", "int8-weight"], parallel_modes=[], gdn=["decomposed"], torch_bf16=False,
                 no_parallel_runs=False, openvino_parallel=True)
names = [(n, k) for n, k, *_ in b.plan(args, [("int8-weight", "bf16")])]
r = b.RUNS
assert names == [("onnx-fp32-decomposed", "ort"), ("onnx-int8-weight-decomposed", "ort"),
                 ("openvino-int8-weight-bf16", "openvino:bf16"),
                 (f"openvino-int8-weight-bf16-{r}runs", "openvino-runs:bf16")], names
# --bundle-dir: stamped on first use, reused by the same student, refused for another one
import json, pathlib, tempfile
root = pathlib.Path(tempfile.mkdtemp()) / "bundles"
student = {"student": "small", "pairs": 4}
assert b.check_bundle_dir(root, student) is False and json.loads((root / "bench-student.json").read_text()) == student
assert b.check_bundle_dir(root, student) is True
for other in ({"student": "small", "pairs": 8}, None):
    try:
        if other is None:  # a bundle with no stamp beside it: origin unknown
            (root / "bench-student.json").unlink()
            (root / "none-decomposed").mkdir()
            (root / "none-decomposed" / "manifest.json").write_text("{}")
            other = student
        b.check_bundle_dir(root, other)
    except SystemExit as e:
        assert "--bundle-dir" in str(e), e
    else:
        raise AssertionError(f"bundles of another student were reused: {other}")
# --isolate: a row child that fails is reported and left out, the rest written; a failed export stops
import subprocess
calls, written = [], []
def fake_run(cmd):
    child, root = cmd[cmd.index("--child") + 1], pathlib.Path(cmd[cmd.index("--bundle-dir") + 1])
    calls.append(child)
    if child == "onnx-fp32-decomposed":
        rows = [{"impl": "transformers-eager-fp32"}, {"impl": child}]
        (root / f"rows-{child}.json").write_text(json.dumps({"what": "w", "rows": rows}))
    return subprocess.CompletedProcess(cmd, 0 if child in ("export", "onnx-fp32-decomposed") else 1)
b.subprocess.run = fake_run
b.write_results = lambda rows, *rest: written.append([r["impl"] for r in rows])
args.openvino_modes, args.openvino_parallel, args.batch, args.bundle_dir = [], False, 8, None
assert b.run_isolated(args, pathlib.Path("unused"), "s") == 1
assert calls == ["export", "onnx-fp32-decomposed", "onnx-int8-weight-decomposed"], calls
assert written == [["transformers-eager-fp32", "onnx-fp32-decomposed"]], written
b.subprocess.run = lambda cmd: subprocess.CompletedProcess(cmd, 137)
try:
    b.run_isolated(args, pathlib.Path("unused"), "s")
except SystemExit as e:
    assert "export child failed" in str(e), e
else:
    raise AssertionError("a failed export was not an error")
print("ok", flags)
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.splitlines()[-1].startswith("ok"), res.stdout + res.stderr


@pytest.mark.heavy  # about a minute: one export child and one row child, each building the student
def test_cpu_runtime_bench_isolate_runs_each_row_in_its_own_process(tmp_path):
    args = ["--repeats", "1", "--batch", "2", "--pairs", "2", "--gdn", "decomposed", "--modes", "none",
            "--openvino-modes", "--no-parallel-runs", "--isolate", "--out-dir", str(tmp_path), "--stem", "iso",
            "--bundle-dir", str(tmp_path / "bundles")]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def bench() -> str:
        res = subprocess.run([sys.executable, "bench/bench_cpu_runtime.py", *args], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res.stdout

    out = bench()
    assert "--isolate: export" in out and "--isolate: onnx-fp32-decomposed" in out and "reusing" not in out
    rows = list(csv.DictReader((tmp_path / "iso.csv").open()))
    assert [r["impl"] for r in rows] == ["transformers-eager-fp32", "onnx-fp32-decomposed"]
    onnx = rows[1]
    # its ratio is to the eager baseline timed beside it in its own process
    assert float(onnx["throughput_ratio"]) == pytest.approx(
        float(onnx["b2_images_per_s"]) / float(onnx["baseline_images_per_s"]), rel=1e-3)
    assert float(onnx["mean_abs_dmu"]) < 1e-3  # the fp32 bundle's own parity report, read from its manifest
    assert (tmp_path / "iso.png").is_file()
    # a second run of the same student reuses the kept export, with its parity report
    assert "reusing the bundle" in bench()
    again = list(csv.DictReader((tmp_path / "iso.csv").open()))[1]
    assert again["mean_abs_dmu"] == onnx["mean_abs_dmu"]
