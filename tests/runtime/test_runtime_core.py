"""The torch-free runtime without real exported graphs: positions, preprocessing, bundles, Scorer.

The Scorer tests run on a fake bundle whose graphs are small hand-made ONNX models with the
contract's input and output names (docs/bundle.md); the real graphs are tested with the exporter.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from zreward_fast.export.manifest import manifest_from_processor
from zreward_fast.imaging import ImageError
from zreward_fast.processing import ZRewardProcessor
from zreward_fast.runtime import BundleError, Scorer, load_manifest, mrope_position_ids, verify_bundle, write_manifest
from zreward_fast.runtime.preprocess import RuntimePreprocessor

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a red cat", "two dogs under a bright blue sky, with strong contrast and a long shadow", "sun"]


# ---------------------------------------------------------------------------------- fixtures
def _images(tmp: Path) -> list:
    rng = np.random.default_rng(0)
    pil = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = tmp / "img.png"
    Image.fromarray(rng.integers(0, 256, (80, 33, 3), dtype=np.uint8)).save(path)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (31, 90, 3), dtype=np.uint8)).save(buf, format="PNG")
    return [pil, arr, path, buf.getvalue()]


def _fake_graphs(out: Path, manifest: dict, vocab: int, hidden: int = 8, batch: int | None = None, length: int | None = None) -> None:
    """vision: merge-window reshape + matmul; decoder: embeddings + image mean + positions, gathered
    at the query positions, then a linear score head. Rows are independent, as in the real model."""
    img, k = manifest["image"], len(manifest["scale"]["levels"])
    p = (img["size"] // img["patch_size"]) ** 2
    dp = 3 * img["temporal_patch_size"] * img["patch_size"] ** 2
    m2 = img["merge_size"] ** 2
    n = p // m2
    rng = np.random.default_rng(1)
    b = batch if batch else "B"
    seq = length if length else "L"

    def const(name, a):
        return numpy_helper.from_array(np.asarray(a), name)

    vision = helper.make_graph(
        [helper.make_node("Reshape", ["pixel_values", "shape"], ["merged"]),
         helper.make_node("MatMul", ["merged", "w"], ["image_features"])],
        "vision",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [b, p, dp])],
        [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, [b, n, hidden])],
        [const("shape", np.array([0, n, m2 * dp], np.int64)),
         const("w", rng.normal(0, 0.02, (m2 * dp, hidden)).astype(np.float32))],
    )
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["tok"]),
        helper.make_node("ReduceMean", ["image_features", "ax1"], ["img"], keepdims=1),
        helper.make_node("Cast", ["position_ids"], ["posf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["posf", "ax0"], ["possum"], keepdims=0),
        helper.make_node("Mul", ["possum", "pscale"], ["pos2"]),
        helper.make_node("Unsqueeze", ["pos2", "ax2"], ["pos3"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "ax2"], ["mask3"]),
        helper.make_node("Add", ["tok", "img"], ["h1"]),
        helper.make_node("Add", ["h1", "pos3"], ["h2"]),
        helper.make_node("Mul", ["h2", "mask3"], ["h"]),
        helper.make_node("Unsqueeze", ["query_positions", "ax2"], ["qidx"]),
        helper.make_node("GatherND", ["h", "qidx"], ["rows"], batch_dims=1),
        helper.make_node("MatMul", ["rows", "head"], ["logits"]),
        helper.make_node("LogSoftmax", ["logits"], ["log_probs"], axis=-1),
        helper.make_node("Exp", ["log_probs"], ["probs"]),
        helper.make_node("Mul", ["probs", "levels"], ["weighted"]),
        helper.make_node("ReduceSum", ["weighted", "axm1"], ["means"], keepdims=0),
    ]
    decoder = helper.make_graph(
        nodes,
        "decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [b, seq]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [b, seq]),
         helper.make_tensor_value_info("position_ids", TensorProto.INT64, [3, b, seq]),
         helper.make_tensor_value_info("image_features", TensorProto.FLOAT, [b, n, hidden]),
         helper.make_tensor_value_info("query_positions", TensorProto.INT64, [b, "D"])],
        [helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, [b, "D", k]),
         helper.make_tensor_value_info("means", TensorProto.FLOAT, [b, "D"])],
        [const("emb", rng.normal(0, 1, (vocab, hidden)).astype(np.float32)),
         const("head", rng.normal(0, 1, (hidden, k)).astype(np.float32)),
         const("levels", np.asarray(manifest["scale"]["levels"], np.float32)),
         const("pscale", np.float32(0.01)),
         const("ax0", np.array([0], np.int64)), const("ax1", np.array([1], np.int64)),
         const("ax2", np.array([2], np.int64)), const("axm1", np.array([-1], np.int64))],
    )
    for graph, name in ((vision, "vision.onnx"), (decoder, "decoder.onnx")):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 9
        onnx.checker.check_model(model)
        onnx.save(model, str(out / name))


def _make_bundle(out: Path, processor, **graph_kw) -> dict:
    out.mkdir(parents=True)
    tok_dir = out.parent / (out.name + "-tok")
    processor.tokenizer.save_pretrained(tok_dir)  # also writes files a bundle does not hold
    shutil.copy(tok_dir / "tokenizer.json", out / "tokenizer.json")
    manifest = manifest_from_processor(processor)
    manifest.update(graphs={"vision": "vision.onnx", "decoder": "decoder.onnx"}, gdn="contrib", opset=18,
                    quantization={"mode": "none"}, parity={})
    _fake_graphs(out, manifest, vocab=len(processor.tokenizer), **graph_kw)
    return write_manifest(out, manifest)


@pytest.fixture(scope="module")
def bundle(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "b"
    _make_bundle(out, tiny[1])
    return out


@pytest.fixture(scope="module")
def scorer(bundle) -> Scorer:
    return Scorer(bundle, intra_op_num_threads=1)


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


# ---------------------------------------------------------------------------------- positions
@pytest.mark.parametrize("image_size", [64, 448])
def test_mrope_positions_match_transformers(tiny, image_size, tmp_path):
    model, processor = tiny
    proc = processor if image_size == 64 else ZRewardProcessor(processor.tokenizer, image_size=image_size)
    imgs = [np.zeros((image_size, image_size, 3), np.uint8)] * 3
    batch = proc(imgs, PROMPTS)
    assert len(set(batch.attention_mask.sum(1).tolist())) == 3  # three lengths, right padded
    with torch.no_grad():
        ref, _ = model.model.get_rope_index(
            batch.input_ids, mm_token_type_ids=batch.mm_token_type_ids, image_grid_thw=batch.image_grid_thw,
            attention_mask=batch.attention_mask,
        )
    side = image_size // 32
    got = mrope_position_ids(batch.input_ids.numpy(), batch.attention_mask.numpy(), proc.image_token_id, (side, side))
    assert got.dtype == np.int64 and got.shape == tuple(ref.shape)
    np.testing.assert_array_equal(got, ref.numpy())  # real positions and the zeros at padding alike
    mask = batch.attention_mask.numpy().astype(bool)
    assert (got[:, ~mask] == 0).all()
    # The image block: t constant, h and w walk the grid; text continues after max(grid).
    row = batch.input_ids[0].numpy()
    img_pos = np.flatnonzero(row == proc.image_token_id)
    start = img_pos[0]
    np.testing.assert_array_equal(got[1, 0, img_pos] - start, np.repeat(np.arange(side), side))
    np.testing.assert_array_equal(got[2, 0, img_pos] - start, np.tile(np.arange(side), side))
    assert got[0, 0, img_pos[-1] + 1] == start + side


def test_mrope_positions_reject_bad_blocks():
    ids = np.array([[1, 9, 9, 9, 2]])
    with pytest.raises(ValueError, match="3 image tokens; a 2x2 grid needs 4"):
        mrope_position_ids(ids, np.ones_like(ids), 9, (2, 2))
    with pytest.raises(ValueError, match="attention_mask shape"):
        mrope_position_ids(ids, np.ones((1, 4), np.int64), 9, (2, 2))


# ---------------------------------------------------------------------------------- preprocessing
def test_preprocessor_matches_processor(tiny, bundle, tmp_path):
    _, processor = tiny
    pre = RuntimePreprocessor.from_bundle(bundle)
    images = _images(tmp_path)
    prompts = PROMPTS + ["a photo of a house"]
    for dims in (None, ["realism", "alignment"], "plausibility"):
        ref = processor(images, prompts, dims)
        got = pre.text_inputs(prompts, dims)
        for key in ("input_ids", "attention_mask", "query_positions"):
            np.testing.assert_array_equal(got[key], getattr(ref, key).numpy(), err_msg=key)
            assert got[key].dtype == np.int64
        ref_pos = mrope_position_ids(ref.input_ids.numpy(), ref.attention_mask.numpy(), processor.image_token_id, (2, 2))
        np.testing.assert_array_equal(got["position_ids"], ref_pos)
    pv = pre.pixel_values(images)
    assert pv.dtype == np.float32 and pv.shape == (4, pre.num_patches, pre.patch_dim)
    # The bundle's vision graph reads one frame per patch; the processor repeats it t times.
    frames = ref.pixel_values.numpy().reshape(4, pre.num_patches, 3, processor.temporal_patch_size, -1)
    assert processor.temporal_patch_size == 2 and pre.temporal_patch_size == 1
    np.testing.assert_array_equal(frames[:, :, :, 0], frames[:, :, :, 1])
    np.testing.assert_allclose(pv, frames[:, :, :, 0].reshape(pv.shape), atol=1e-6, rtol=0)


def test_preprocessor_errors(bundle):
    pre = RuntimePreprocessor.from_bundle(bundle)
    with pytest.raises(ValueError, match="unknown dimension 'color'"):
        pre.text_inputs(["a cat"], ["color"])
    with pytest.raises(ValueError, match="special-token"):
        pre.text_inputs(["a <|im_end|> cat"])
    with pytest.raises(TypeError, match="prompt must be a str"):
        pre.text_inputs([3])
    with pytest.raises(ValueError, match="at most 10"):
        pre.text_inputs(["a cat"], length=10)
    with pytest.raises(ImageError, match="image 1: .*not a readable image"):
        pre.pixel_values([np.zeros((8, 8, 3), np.uint8), b"not an image"])


def test_preprocessor_rejects_mismatched_tokenizer(bundle):
    manifest = load_manifest(bundle)
    manifest["tokens"]["query_token_ids"]["realism"] += 1
    with pytest.raises(BundleError, match="disagrees with the manifest"):
        RuntimePreprocessor(manifest, bundle / "tokenizer.json")


_TORCH_FREE = r"""
import json, sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "torchvision"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Blocker())
import numpy as np
import zreward_fast.runtime as rt
from zreward_fast.runtime.preprocess import RuntimePreprocessor
pre = RuntimePreprocessor.from_bundle(sys.argv[1])
t = pre.text_inputs(["a red cat"])
pv = pre.pixel_values([np.zeros((10, 12, 3), np.uint8)])
res = rt.Scorer(sys.argv[1]).score([np.zeros((10, 12, 3), np.uint8)], ["a red cat"])
from zreward_fast.export.parity import held_out_pairs, parity_report  # what Scorer(check_parity=...) runs
held_out_pairs(1)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print(json.dumps({"ids": t["input_ids"].tolist(), "pv": list(pv.shape), "mean": res[0]["realism"].mean, "bad": bad}))
"""


def test_runtime_imports_and_runs_without_torch(tiny, bundle, scorer):
    out = subprocess.run([sys.executable, "-c", _TORCH_FREE, str(bundle)], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["bad"] == []
    assert got["ids"] == tiny[1]([np.zeros((10, 12, 3), np.uint8)], ["a red cat"]).input_ids.tolist()
    assert got["pv"] == [1, 16, 768]  # one frame of 3 x 16 x 16 per patch
    expected = scorer.score([np.zeros((10, 12, 3), np.uint8)], ["a red cat"])[0]["realism"].mean
    assert got["mean"] == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------------- bundles
def test_bundle_verifies(bundle):
    manifest = verify_bundle(bundle)
    assert set(manifest["files"]) == {"vision.onnx", "decoder.onnx", "tokenizer.json"}
    text = (bundle / "manifest.json").read_text()
    assert json.loads(text) == manifest and text == json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def _edit_manifest(root: Path, fn) -> None:
    m = json.loads((root / "manifest.json").read_text())
    fn(m)
    (root / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "break_it, match",
    [
        (lambda r: (r / "tokenizer.json").write_bytes(bytes([(r / "tokenizer.json").read_bytes()[0] ^ 1])
                                                      + (r / "tokenizer.json").read_bytes()[1:]),
         r"tokenizer.json: tampered: sha256"),
        (lambda r: (r / "decoder.onnx").unlink(), r"decoder.onnx is missing"),
        (lambda r: (r / "notes.txt").write_text("hi"), r"not listed in manifest.json: \['notes.txt'\]"),
        (lambda r: _edit_manifest(r, lambda m: m.update(format_version=2)), r"unknown format version 2"),
        (lambda r: _edit_manifest(r, lambda m: m.update(format="other")), r"format is 'other'"),
        (lambda r: (r / "manifest.json").write_text("{not json"), r"malformed manifest.json"),
        (lambda r: (r / "manifest.json").write_text("[]"), r"malformed manifest.json"),
        (lambda r: (r / "manifest.json").unlink(), r"manifest.json is missing"),
        (lambda r: _edit_manifest(r, lambda m: m.pop("tokens")), r"missing section 'tokens'"),
        (lambda r: _edit_manifest(r, lambda m: m["graphs"].pop("decoder")), r"names no decoder graph"),
        (lambda r: _edit_manifest(r, lambda m: m["files"].pop("tokenizer.json")), r"tokenizer.json is missing from the manifest"),
        (lambda r: _edit_manifest(r, lambda m: m["files"].update({"../x": {"sha256": "0", "bytes": 1}})),
         r"not a plain relative path"),
    ],
    ids=["tampered", "missing", "extra", "version", "format", "json", "not-object", "no-manifest", "section",
         "no-graph", "no-tokenizer", "escape"],
)
def test_bad_bundles_refused(bundle, tmp_path, break_it, match):
    root = _copy(bundle, tmp_path)
    break_it(root)
    with pytest.raises(BundleError, match=match):
        verify_bundle(root)
    with pytest.raises(BundleError):
        Scorer(root)


# ---------------------------------------------------------------------------------- Scorer
def _check_results(results, scorer, dims):
    levels = np.asarray(scorer.scale.levels)
    for row in results:
        assert list(row) == list(dims)
        for r in row.values():
            p = np.asarray(r.probs)
            assert len(p) == len(levels) and (p >= 0).all() and p.sum() == pytest.approx(1.0, abs=1e-9)
            assert r.mean == pytest.approx(float(p @ levels), abs=1e-5)
            assert r.std == pytest.approx(float(np.sqrt(p @ (levels - r.mean) ** 2)), abs=1e-6)


def test_scorer_scores(scorer, tmp_path):
    assert scorer.dimensions == ("alignment", "realism", "aesthetics", "plausibility")
    assert scorer.manifest["format_version"] == 1 and scorer.scale.num_levels == 9
    scorer.warmup()
    images = _images(tmp_path)
    prompts = PROMPTS + ["a photo of a house"]
    res = scorer.score(images, prompts, batch_size=3)
    assert len(res) == 4
    _check_results(res, scorer, scorer.dimensions)
    means = [r["alignment"].mean for r in res]
    assert len(set(np.round(means, 6))) == 4  # inputs reach the graphs
    one = [scorer.score([im], [p])[0] for im, p in zip(images, prompts)]  # batching changes nothing
    for a, b in zip(res, one):
        for d in a:
            assert a[d].mean == pytest.approx(b[d].mean, abs=1e-5)
    sub = scorer.score(images[0], "a red cat", dimensions=["plausibility", "alignment"])
    _check_results(sub, scorer, ["plausibility", "alignment"])
    _check_results(scorer.score(images[0], "a red cat", "alignment"), scorer, ["alignment"])
    assert scorer.score([], []) == []


def test_scorer_thread_safe(scorer, tmp_path):
    images = _images(tmp_path)
    prompts = PROMPTS + ["a photo of a house"]
    expected = scorer.score(images, prompts)
    results, errors = [None] * 8, []

    def work(i):
        try:
            results[i] = [scorer.score(images, prompts, batch_size=1 + i % 3) for _ in range(3)]
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for per_thread in results:
        for res in per_thread:
            for a, b in zip(res, expected):
                for d in a:
                    assert a[d].mean == pytest.approx(b[d].mean, abs=1e-5)
                    np.testing.assert_allclose(a[d].probs, b[d].probs, atol=1e-6)


def test_scorer_parallel_runs_score_the_same(scorer, bundle, tmp_path):
    images = _images(tmp_path) + _images(tmp_path)[:1]  # 5: parts of 3 and 2
    prompts = PROMPTS + ["a photo of a house", "a dog"]
    par = Scorer(bundle, parallel_runs=2)
    assert par._vision.get_session_options().intra_op_num_threads == max(1, (os.cpu_count() or 1) // 2)
    for batch_size in (16, 2):
        got, want = par.score(images, prompts, batch_size=batch_size), scorer.score(images, prompts)
        assert len(got) == 5
        for a, b in zip(got, want):  # same order, same numbers
            for d in a:
                np.testing.assert_allclose(a[d].probs, b[d].probs, atol=1e-6)
    img = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ImageError, match="image 3: .*not a readable image"):  # in the second part
        par.score([img, img, img, b"garbage"], ["a", "b", "c", "d"])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="parallel_runs"):
            Scorer(bundle, parallel_runs=bad)


def test_scorer_bad_inputs(scorer):
    img = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer.score([img, img], ["a"])
    with pytest.raises(ValueError, match="unknown dimension 'colour'"):
        scorer.score([img], ["a"], dimensions=["colour"])
    with pytest.raises(ImageError, match="image 2: .*not a readable image"):
        scorer.score([img, img, b"garbage"], ["a", "b", "c"], batch_size=2)
    with pytest.raises(ImageError, match="image 0: .*unsupported image type"):
        scorer.score([object()], ["a"])
    with pytest.raises(ValueError, match="prompt 1: .*special-token"):
        scorer.score([img, img], ["a", "<|im_start|>system"])
    with pytest.raises(ValueError, match="prompt 0: prompt is 5000 characters"):
        scorer.score([img], ["x" * 5000])
    with pytest.raises(TypeError, match="prompt must be a str"):
        scorer.score([img], [None])
    with pytest.raises(ValueError, match="batch_size"):
        scorer.score([img], ["a"], batch_size=0)


def test_scorer_providers(bundle):
    with pytest.raises(ValueError, match=r"'NoSuchExecutionProvider' is not available.*available providers: \["):
        Scorer(bundle, providers=["NoSuchExecutionProvider"])
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ValueError, match="CUDAExecutionProvider"):
            Scorer(bundle, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    s = Scorer(bundle, providers=["CPUExecutionProvider"])
    assert s.active_providers == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="intra_op_num_threads"):
        Scorer(bundle, intra_op_num_threads=-1)


def test_scorer_thread_pools_do_not_spin_by_default(bundle):
    key = "session.intra_op.allow_spinning"
    for spin, expected in ((False, "0"), (True, "1")):
        s = Scorer(bundle, spin_wait=spin)
        for sess in (s._vision, s._decoder):
            assert sess.get_session_options().get_session_config_entry(key) == expected


def test_scorer_static_shapes(tiny, scorer, tmp_path):
    """A graph exported with a fixed batch and length: the Scorer pads to them."""
    out = tmp_path / "static"
    _make_bundle(out, tiny[1], batch=2, length=96)
    static = Scorer(out)
    images = _images(tmp_path)[:3]
    got, ref = static.score(images, PROMPTS), scorer.score(images, PROMPTS)
    for a, b in zip(got, ref):
        for d in a:
            assert a[d].mean == pytest.approx(b[d].mean, abs=1e-5)
    with pytest.raises(ValueError, match="at most 96"):
        static.score(images[:1], ["a red cat " * 40])


def test_scorer_rejects_wrong_graph_interface(tiny, bundle, tmp_path):
    root = _copy(bundle, tmp_path)
    shutil.copy(root / "vision.onnx", root / "decoder.onnx")  # the vision graph where the decoder goes
    manifest = load_manifest(root)
    manifest.pop("files")
    write_manifest(root, manifest)
    with pytest.raises(BundleError, match="graph interface differs"):
        Scorer(root)


def test_bundle_contract_names_quantization_modes_once():
    """The modes the exporter, the quantizer and the CLI accept are runtime.bundle's (issue 11)."""
    from zreward_fast.cli import build_parser
    from zreward_fast.export import quantize
    from zreward_fast.runtime.bundle import QUANT_ALIASES, QUANT_MODES, resolve_quant_mode

    assert resolve_quant_mode("int8") == "int8-dynamic" and resolve_quant_mode("fp8") == "fp8"
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        resolve_quant_mode("int4")
    assert set(quantize.MODES) == set(QUANT_MODES) - {"none"}
    export = build_parser()._subparsers._group_actions[0].choices["export"]
    (action,) = [a for a in export._actions if a.dest == "quantize"]
    assert set(action.choices) == set(QUANT_MODES) | set(QUANT_ALIASES)
