"""End to end: a ZRewardModel exported to a bundle and scored by the torch-free runtime."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import zreward_fast as zf
from zreward_fast import ZRewardModel
from zreward_fast.cli import main
from zreward_fast.export.api import ExportParityError, export_bundle, held_out_pairs
from zreward_fast.export.parity import PARITY_TIE_TOL
from zreward_fast.runtime import BundleError, Scorer
from zreward_fast.runtime.openvino_backend import openvino_available
from zreward_fast.testing import tiny_model


@pytest.fixture(scope="module")
def rm():
    return ZRewardModel(*tiny_model(seed=0)).eval()


@pytest.fixture(scope="module")
def fp32_bundle(rm, tmp_path_factory):
    return export_bundle(rm, tmp_path_factory.mktemp("b") / "fp32", num_pairs=50, progress=False)


@pytest.fixture
def reuse_graphs(fp32_bundle, monkeypatch):
    """export_bundle with the ONNX export replaced by a copy of the fp32 bundle's graphs (exported
    from the same `rm`, decomposed GDN): for tests of what happens around the export, which then
    still runs the tokenizer, manifest, parity and staging for real, about 10 s less each."""
    import shutil

    import zreward_fast.export.onnx_export as onnx_export

    def copy(name):
        def export(rm, path, *args, **kwargs):
            shutil.copy2(fp32_bundle.path / name, path)
            return [Path(path)]
        return export

    monkeypatch.setattr(onnx_export, "export_vision", copy("vision.onnx"))
    monkeypatch.setattr(onnx_export, "export_decoder", copy("decoder.onnx"))


@pytest.fixture(scope="module")
def student(trained_student):
    return trained_student


def _means(results, dims=zf.DIMENSIONS):
    return np.array([[r[d].mean for d in dims] for r in results])


def test_fp32_bundle_matches_pytorch(rm, fp32_bundle):
    report = fp32_bundle.parity
    assert report["overall"]["max_abs_dmu"] <= 1e-3 and not fp32_bundle.failures
    images, prompts, _ = held_out_pairs(6)
    scorer = Scorer(fp32_bundle.path)
    got, want = scorer.score(images, prompts), rm.score(images, prompts)
    assert np.abs(_means(got) - _means(want)).max() <= 1e-3
    for g, w in zip(got, want):
        for d in zf.DIMENSIONS:
            np.testing.assert_allclose(g[d].probs, w[d].probs, atol=1e-4)
    single = scorer.score(images[:2], prompts[:2], dimensions=["realism"])
    assert [list(r) for r in single] == [["realism"]] * 2


def test_manifest_carries_everything_the_runtime_needs(fp32_bundle):
    m = json.loads((fp32_bundle.path / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["gdn"] == "decomposed" and m["quantization"]["mode"] == "none"
    # README: the model card; parity_reference.npy: the fp32 model's scores a lower precision is checked against
    assert set(m["files"]) == {"vision.onnx", "decoder.onnx", "tokenizer.json", "README.md", "parity_reference.npy"}
    assert m["dimensions"] == list(zf.DIMENSIONS) and m["scale"]["levels"][-1] == 4.0
    assert "{queries}" in m["prompt"]["format"]["student"] and m["image"]["size"] == 64
    assert m["parity"]["pairs"] == 50 and "mean_abs_dmu" in m["parity"]["overall"]


def test_int8_bundle_of_a_trained_student_keeps_preferences(student, tmp_path):
    res = export_bundle(student, tmp_path / "int8", quantize="int8", num_pairs=200, progress=False, force=True)
    overall = res.parity["overall"]
    print("int8 parity on 200 held-out pairs:", json.dumps(overall))
    assert res.parity["pairs"] == 200
    assert overall["mean_abs_dmu"] <= 0.05
    # pooled over the pairs the reference prefers by more than PARITY_TIE_TOL (each compared on the
    # dimension it was degraded on); most pairs must be compared, or the bar would say nothing
    assert res.parity["tie_tol"] == PARITY_TIE_TOL
    assert sum(b["pairs_compared"] for b in res.parity["dimensions"].values()) >= 150, res.parity["dimensions"]
    assert overall["pair_agreement_pooled"] >= 0.98, res.failures
    assert not res.failures


def test_fp8_and_static_int8_bundles_are_produced_with_parity(rm, tmp_path):
    """Each QDQ mode once, by the quantizer `auto` picks (fp8: ModelOpt where installed) and, for
    int8-static, by ModelOpt when it is installed (make install's dev extra); the manifest names it."""
    from zreward_fast.export.quantize import modelopt_available

    modelopt = modelopt_available()
    for mode, tool in (("fp8", "auto"), ("int8-static", "modelopt" if modelopt else "onnxruntime")):
        res = export_bundle(rm, tmp_path / mode, quantize=mode, num_pairs=20, progress=False, force=True,
                            quant_tool=tool)
        q = res.manifest["quantization"]
        assert q["mode"] == mode and "synthetic" in q["calibration"]
        expected = "modelopt" if modelopt else "onnxruntime"
        assert {g["tool"] for g in q["graphs"].values()} == {expected}, q["graphs"]
        assert np.isfinite(res.parity["overall"]["mean_abs_dmu"])
        assert Scorer(res.path).score(*held_out_pairs(1)[:2])
    with pytest.raises(ValueError, match="quant_tool must be one of"):
        export_bundle(rm, tmp_path / "x", quantize="fp8", quant_tool="trt")
    # ModelOpt asked for a mode it does not write: refused, not quietly onnxruntime's
    for mode in ("int8", "int8-weight", "none"):
        with pytest.raises(ValueError, match="quant_tool='modelopt' quantizes"):
            export_bundle(rm, tmp_path / "x", quantize=mode, quant_tool="modelopt")
    assert not (tmp_path / "x").exists()


def test_decomposed_and_contrib_bundles_agree(rm, fp32_bundle, tmp_path):
    dec = export_bundle(rm, tmp_path / "contrib", gdn="contrib", num_pairs=20, progress=False)
    assert dec.manifest["gdn"] == "contrib"
    images, prompts, _ = held_out_pairs(4)
    a = _means(Scorer(fp32_bundle.path).score(images, prompts))
    b = _means(Scorer(dec.path).score(images, prompts))
    assert np.abs(a - b).max() <= 1e-4


@pytest.mark.heavy  # two exports of the trained student: ~2.5 min, `make test` stays under its budget
def test_weight_only_bundles_pass_parity_and_run_matmulnbits(student, tmp_path):
    """int8/int4 weight-only bundles of a trained student: MatMulNBits in the graphs, parity kept."""
    import onnx

    for mode, limit, agreement in (("int8-weight", 0.02, 0.98), ("int4-weight", 0.05, 0.9)):
        res = export_bundle(student, tmp_path / mode, quantize=mode, num_pairs=100, progress=False, force=True)
        overall = res.parity["overall"]
        assert res.manifest["quantization"]["mode"] == mode and overall["mean_abs_dmu"] <= limit, (mode, overall)
        assert sum(b["pairs_compared"] for b in res.parity["dimensions"].values()) >= 75, res.parity["dimensions"]
        assert overall["pair_agreement_pooled"] >= agreement, (mode, overall)
        assert mode != "int8-weight" or not res.failures  # int8 weight-only passes the gate itself
        ops = {n.op_type for n in onnx.load(str(res.path / "decoder.onnx"), load_external_data=False).graph.node}
        assert "MatMulNBits" in ops and "MatMulInteger" not in ops


@pytest.mark.skipif(not openvino_available(), reason="openvino is not installed")
def test_openvino_backend_scores_like_onnxruntime(rm, fp32_bundle, tmp_path):
    """Scorer(backend="openvino"): the same bundle, preprocessing and checks, OpenVINO's CPU plugin
    running the graphs; fp32 scores equal onnxruntime's, also from threads and in parallel runs."""
    from concurrent.futures import ThreadPoolExecutor

    images, prompts, _ = held_out_pairs(6)
    ref = Scorer(fp32_bundle.path).score(images, prompts)
    ov = Scorer(fp32_bundle.path, backend="openvino")
    assert ov.active_providers == ["OpenVINO:CPU:f32"] and "backend='openvino'" in repr(ov)
    got = ov.score(images, prompts, batch_size=5)  # two batches of different sizes: dynamic shapes
    assert np.abs(_means(got) - _means(ref)).max() <= 1e-4
    assert np.abs(np.array([[r[d].probs for d in r] for r in got]) -
                  np.array([[r[d].probs for d in r] for r in ref])).max() <= 1e-4
    with ThreadPoolExecutor(3) as pool:  # an infer request per thread
        for res in pool.map(lambda i: ov.score(images[i::3], prompts[i::3]), range(3)):
            assert len(res) == 4
    par_scorer = Scorer(fp32_bundle.path, backend="openvino", parallel_runs=2)
    # the parts run as two OpenVINO streams over all the threads, not two requests queued on one
    assert par_scorer._decoder.streams == 2 and par_scorer._decoder._compiled.get_property("NUM_STREAMS") == 2
    par = par_scorer.score(images, prompts)
    assert np.abs(_means(par) - _means(ref)).max() <= 1e-4
    # a weight-only int8 bundle (com.microsoft::MatMulNBits) runs too
    q = export_bundle(rm, tmp_path / "w8", quantize="int8-weight", num_pairs=10, progress=False, force=True,
                      fallback="none")
    a, b = Scorer(q.path).score(images, prompts), Scorer(q.path, backend="openvino").score(images, prompts)
    assert np.abs(_means(a) - _means(b)).max() <= 0.01


@pytest.mark.skipif(not openvino_available(), reason="openvino is not installed")
def test_eval_runs_a_bundle_on_the_backend_and_precision_it_names(fp32_bundle, tmp_path, capsys):
    """`eval --bundle DIR --backend openvino --precision P`: what a user checks before serving at bf16."""
    from zreward_fast.evaluation import evaluate

    ort = evaluate(fp32_bundle.path, seed=3, pairs=8, conflicts=0)
    ov = evaluate(fp32_bundle.path, seed=3, pairs=8, conflicts=0, backend="openvino")
    for d, v in ort["dimensions"].items():  # the same graphs at f32: the same figures
        assert ov["dimensions"][d]["plcc"] == pytest.approx(v["plcc"], abs=1e-3), d
    assert main(["eval", "--bundle", str(fp32_bundle.path), "--pairs", "8", "--conflicts", "0", "--backend",
                 "openvino", "--precision", "bf16", "--json", str(tmp_path / "r.json")]) == 0
    assert f"| {fp32_bundle.path.name} (openvino bf16) |" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["pairs"] == 8
    # a model runs in PyTorch, a bundle is no teacher: both refused with a message, not a traceback
    assert main(["eval", "--model", str(tmp_path), "--backend", "openvino"]) == 2
    assert "--backend and --precision" in capsys.readouterr().err
    assert main(["eval", "--bundle", str(fp32_bundle.path), "--teacher"]) == 2
    assert "a reasoning teacher is a model directory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="precision is OpenVINO's"):
        evaluate(fp32_bundle.path, pairs=4, precision="bf16")  # onnxruntime runs the graphs as exported


def test_a_precision_is_checked_at_load_against_the_reference_the_bundle_ships(rm, fp32_bundle, tmp_path,
                                                                                 monkeypatch, recwarn):
    """The export stores the fp32 model's scores on its held-out pairs; Scorer(check_parity=...)
    scores the first PARITY_CHECK_PAIRS of them at load: by default only at a precision below the
    export's (OpenVINO bf16), which the bundle's own report does not cover."""
    import shutil

    import zreward_fast.export.parity as parity
    from zreward_fast.runtime import ParityError
    from zreward_fast.runtime.bundle import write_manifest
    from zreward_fast.runtime.scorer import PARITY_CHECK_PAIRS

    ref = np.load(fp32_bundle.path / parity.REFERENCE_NAME)
    assert parity.REFERENCE_NAME in fp32_bundle.manifest["files"] and ref.shape == (100, 4, len(rm.scale.levels))
    images, prompts, _ = held_out_pairs(3)  # the reference is the PyTorch model's scores of these pairs
    assert np.abs(_means(rm.score(images, prompts)) - (ref[:6] * np.array(rm.scale.levels)).sum(-1)).max() <= 1e-5
    assert Scorer(fp32_bundle.path).parity is None  # f32 on onnxruntime: the export's report covers it
    checked = Scorer(fp32_bundle.path, check_parity=True).parity
    assert checked["pairs"] == PARITY_CHECK_PAIRS and not checked["failures"]
    assert checked["overall"]["max_abs_dmu"] <= 1e-3 and checked["thresholds"] == fp32_bundle.parity["thresholds"]
    scorer = Scorer(fp32_bundle.path)
    full = scorer.measure_parity()  # every pair the bundle ships, its figures beside the export report's
    assert full["pairs"] == 50 and not full["failures"]
    assert abs(full["overall"]["mean_abs_dmu"] - fp32_bundle.parity["overall"]["mean_abs_dmu"]) <= 1e-4
    with pytest.raises(ValueError, match="num_pairs must be a positive int"):
        scorer.measure_parity(0)

    # a bundle without the file (exported before it existed): warned at bf16, refused when asked for
    old = tmp_path / "old"
    shutil.copytree(fp32_bundle.path, old)

    def rehash():  # the manifest rewritten for what the test left in the directory
        write_manifest(old, {k: v for k, v in json.loads((old / "manifest.json").read_text()).items() if k != "files"})
    (old / parity.REFERENCE_NAME).unlink()
    rehash()
    with pytest.raises(BundleError, match="ships no reference scores"):
        Scorer(old, check_parity=True)
    with pytest.raises(BundleError, match="ships no reference scores"):
        Scorer(old).measure_parity()
    # a reference of the wrong shape is refused, not compared
    np.save(old / parity.REFERENCE_NAME, np.full((7, 4, 9), 0.1, np.float32))
    rehash()
    with pytest.raises(BundleError, match="not finite distributions"):
        Scorer(old, check_parity=True)
    (old / parity.REFERENCE_NAME).write_bytes(b"not an array")
    rehash()
    with pytest.raises(BundleError, match="not a numpy array file"):
        Scorer(old, check_parity=True)
    if not openvino_available():
        return
    assert Scorer(fp32_bundle.path, backend="openvino", check_parity=True).parity["overall"]["max_abs_dmu"] <= 1e-3
    (old / parity.REFERENCE_NAME).unlink()
    rehash()
    assert Scorer(old, backend="openvino", precision="bf16").parity is None
    assert any("ships no reference scores" in str(w.message) for w in recwarn.list)
    assert Scorer(fp32_bundle.path, backend="openvino", precision="bf16", check_parity=False).parity is None
    # bf16 is checked by default, against the reduced-precision gate (here one no float path can pass)
    monkeypatch.setattr(parity, "REDUCED_PRECISION_THRESHOLDS", {"mean_abs_dmu": 0.0})
    measured = Scorer(fp32_bundle.path, backend="openvino", precision="bf16", check_parity=False).measure_parity(4)
    assert measured["pairs"] == 4 and measured["failures"] and measured["thresholds"] == {"mean_abs_dmu": 0.0}
    with pytest.raises(ParityError, match=r"openvino at bf16 fails the parity gate on 16 held-out pairs.*mean \|Δμ\|"):
        Scorer(fp32_bundle.path, backend="openvino", precision="bf16")


def test_backend_arguments_are_checked(fp32_bundle):
    with pytest.raises(ValueError, match="backend must be one of"):
        Scorer(fp32_bundle.path, backend="tensorrt")
    with pytest.raises(ValueError, match="openvino back end takes none"):
        Scorer(fp32_bundle.path, backend="openvino", providers=["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="precision is OpenVINO's"):
        Scorer(fp32_bundle.path, precision="bf16")
    if openvino_available():
        with pytest.raises(ValueError, match="precision must be one of"):
            Scorer(fp32_bundle.path, backend="openvino", precision="int8")
        from zreward_fast.runtime.openvino_backend import OpenVINOSession

        with pytest.raises(ValueError, match="streams must be a positive int"):
            OpenVINOSession(fp32_bundle.path / "decoder.onnx", streams=0)


def test_external_data_path(rm, tmp_path):
    res = export_bundle(rm, tmp_path / "ext", num_pairs=10, external_data_threshold=1024, progress=False)
    files = set(json.loads((res.path / "manifest.json").read_text())["files"])
    assert {"vision.onnx.data", "decoder.onnx.data"} <= files
    assert res.parity["overall"]["max_abs_dmu"] <= 1e-3


def test_bundle_tampering_and_format_errors(fp32_bundle, tmp_path):
    import shutil

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(fp32_bundle.path, dst)
        return dst

    b = copy("tampered")
    data = bytearray((b / "decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="tampered|sha256"):
        Scorer(b)
    b = copy("missing")
    (b / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="missing"):
        Scorer(b)
    b = copy("version")
    m = json.loads((b / "manifest.json").read_text())
    m["format_version"] = 99
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format.version"):
        Scorer(b)


def test_symlinks_are_refused_and_what_runs_is_what_was_verified(fp32_bundle, rm, tmp_path):
    """Issue 12: a symlink in a bundle (to a file or a directory, inside or outside) does not
    load; the Scorer runs its private, verified copy, so changing the bundle afterwards changes
    nothing, and the copy goes with the Scorer."""
    import gc
    import os
    import shutil

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(fp32_bundle.path, dst)
        return dst

    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    b = copy("file-link")
    os.symlink(outside, b / "notes.json")
    with pytest.raises(BundleError, match="symlink"):
        Scorer(b)
    b = copy("dir-link")
    os.symlink(tmp_path, b / "more")
    with pytest.raises(BundleError, match="symlink"):
        Scorer(b)
    b = copy("graph-link")
    (b / "decoder.onnx").rename(tmp_path / "real-decoder.onnx")
    os.symlink(tmp_path / "real-decoder.onnx", b / "decoder.onnx")
    with pytest.raises(BundleError, match="symlink"):
        Scorer(b)

    b = copy("swapped")
    scorer = Scorer(b)
    private = scorer._load_dir
    assert private != b and oct(private.stat().st_mode & 0o777) == "0o700"
    images, prompts, _ = held_out_pairs(2)
    before = _means(scorer.score(images[:2], prompts[:2]))
    (b / "decoder.onnx").write_bytes(b"not a graph any more")
    after = _means(Scorer.score(scorer, images[:2], prompts[:2]))
    np.testing.assert_array_equal(before, after)
    del scorer
    gc.collect()
    assert not private.exists()
    with pytest.raises(BundleError, match="tampered"):
        Scorer(b, copy=False)


def test_model_without_score_tokens_is_refused(tmp_path):
    from zreward_fast.testing import tiny_config, tiny_tokenizer
    from transformers import Qwen3_5ForConditionalGeneration
    from zreward_fast.prompting import CHAT_SPECIAL_TOKENS

    tok = tiny_tokenizer()
    vocab = tok.get_vocab()
    model = Qwen3_5ForConditionalGeneration(tiny_config(len(tok), {t: vocab[t] for t in CHAT_SPECIAL_TOKENS}))
    model.save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="add_score_tokens"):
        export_bundle(tmp_path / "plain", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_parity_failure_refuses_unless_forced(rm, reuse_graphs, tmp_path):
    strict = {"none": {"max_abs_dmu": 0.0, "pair_agreement": 1.01}}
    with pytest.raises(ExportParityError, match="pair") as e:
        export_bundle(rm, tmp_path / "strict", num_pairs=5, thresholds=strict, progress=False)
    assert e.value.failures and not (tmp_path / "strict").exists()
    res = export_bundle(rm, tmp_path / "forced", num_pairs=5, thresholds=strict, force=True, progress=False)
    assert res.failures and json.loads((res.path / "manifest.json").read_text())["parity"]["failures"]


def test_interrupted_export_leaves_the_old_bundle(rm, fp32_bundle, reuse_graphs, tmp_path, monkeypatch):
    """Issue 12: the new bundle is staged beside the destination and renamed in; an export that
    dies while moving it leaves the old bundle whole (it still verifies) and no staging."""
    import shutil

    from zreward_fast.runtime.bundle import verify_bundle

    out = tmp_path / "bundle"
    shutil.copytree(fp32_bundle.path, out)
    before = (out / "manifest.json").read_text()

    move, moved = shutil.move, []

    def dies_halfway(src, dst, **kw):
        if tmp_path not in Path(dst).parents:  # the work directory's own moves
            return move(src, dst, **kw)
        if moved:
            raise OSError("killed while moving the bundle in")
        moved.append(move(src, dst, **kw))

    monkeypatch.setattr("zreward_fast.export.api.shutil.move", dies_halfway)
    with pytest.raises(OSError, match="killed"):
        export_bundle(rm, out, num_pairs=5, progress=False, overwrite=True)
    verify_bundle(out)
    assert (out / "manifest.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_runtime_scores_a_real_bundle_without_torch(fp32_bundle, rm):
    images, prompts, _ = held_out_pairs(1)
    img_path = Path(fp32_bundle.path).parent / "img.png"
    images[0].save(img_path)
    want = rm.score([images[0]], [prompts[0]])[0]["realism"].mean
    code = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('torch', 'transformers'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from zreward_fast.runtime import Scorer
r = Scorer({str(fp32_bundle.path)!r}).score([{str(img_path)!r}], [{prompts[0]!r}])
assert 'torch' not in sys.modules and 'transformers' not in sys.modules
print(r[0]['realism'].mean)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert abs(float(out.stdout.strip().splitlines()[-1]) - want) <= 1e-3


def test_cli_export_and_score_bundle(tmp_path, capsys):
    assert main(["tiny", "--out", str(tmp_path / "model")]) == 0
    capsys.readouterr()
    assert main(["export", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "bundle"), "--pairs", "5"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert summary["quantization"] == "none" and summary["failures"] == []
    images, prompts, _ = held_out_pairs(1)
    images[0].save(tmp_path / "img.png")
    assert main(["score", "--bundle", str(tmp_path / "bundle"), "--image", str(tmp_path / "img.png"),
                 "--prompt", prompts[0], "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)["scores"]
    assert list(scores) == list(zf.DIMENSIONS)
    assert main(["export", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "bundle"), "--pairs", "5"]) == 2
    assert "exists" in capsys.readouterr().err


def test_every_bundle_carries_its_model_card(rm, fp32_bundle, reuse_graphs, tmp_path):
    """README.md (issue 14): dimensions, scale, quantization, the parity numbers as the manifest
    holds them, the benchmark table when one is given, a usage snippet; listed and hashed in the
    manifest like every other file, so a changed card fails verification."""
    from zreward_fast.evaluation import evaluate
    from zreward_fast.runtime.bundle import verify_bundle

    card = (fp32_bundle.path / "README.md").read_text()
    manifest = fp32_bundle.manifest
    assert "README.md" in manifest["files"] and card.startswith("---\nlibrary_name: zreward-fast")
    assert "alignment, realism, aesthetics, plausibility" in card and "| quantization | none |" in card
    assert f"| mean_abs_dmu | {manifest['parity']['overall']['mean_abs_dmu']:.4f} |" in card
    assert "## Benchmark" not in card and "Scorer(\"fp32\")" in card
    report = evaluate(rm, seed=3, pairs=8, conflicts=2, size=64)
    res = export_bundle(rm, tmp_path / "carded", num_pairs=5, progress=False, benchmark=report)
    card = (res.path / "README.md").read_text()
    assert "## Benchmark" in card and f"| carded | {report['hpa']:.2f} |" in card
    verify_bundle(res.path)
    (res.path / "README.md").write_text(card + "\nedited\n")
    with pytest.raises(BundleError, match="README.md"):
        verify_bundle(res.path)
