"""``export_bundle``: a trained student -> a verified, optionally quantized bundle.

Steps: export fp32 ``vision.onnx`` and ``decoder.onnx``; quantize them (int8 dynamic for CPU, int8
static QDQ or fp8 QDQ calibrated on images); add ``tokenizer.json`` and the manifest (sha256 of
every file); score held-out synthetic pairs with the PyTorch model and with the bundle through the
torch-free runtime; store the parity report in the manifest. A bundle that misses its parity
thresholds is not written unless ``force`` is set; the error names the numbers that failed.
"""
from __future__ import annotations

import gc
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import __version__
from ..fileio import staged_directory
from ..modeling import ZRewardModel
from ..models.gated_deltanet import check_gdn_form
from ..runtime.bundle import (EXTERNAL_DATA_THRESHOLD, FALLBACK_MODES, FALLBACKS, MODELOPT_MODES, QUANT_TOOLS,
                              SMOOTHED_MODES, SMOOTHINGS, resolve_quant_mode)
from .parity import REFERENCE_NAME, held_out_pairs

#: calibration images the fallback is measured on (one forward pass each try, at most ~log2 of the
#: candidate layers tries)
FALLBACK_IMAGES = 8


# images per batch of the parity check: activations, not weights, set the peak at real widths (a
# 448x448 batch of 32 took 4.7 GB in onnxruntime at 0.8B width, a batch of 2 about 0.7 GB), so the
# batch shrinks as hidden width x image tokens grow: 2 at 0.8B width and 448x448, 16 for small models
PARITY_BATCH_BUDGET = 2 * 1024 * 256  # hidden x image tokens x images of about 0.7 GB at 0.8B width
MAX_PARITY_BATCH = 16


def parity_batch(rm: Any) -> int:
    """Images per batch of the reference and parity scoring for ``rm`` (see PARITY_BATCH_BUDGET)."""
    cfg = rm.model.config
    hidden = int(getattr(getattr(cfg, "text_config", cfg), "hidden_size"))
    per_image = hidden * int(rm.processor.num_image_tokens)
    return max(1, min(MAX_PARITY_BATCH, PARITY_BATCH_BUDGET // per_image))


class ExportParityError(RuntimeError):
    """The exported bundle scores too differently from the PyTorch model."""

    def __init__(self, failures: list[str], report: dict) -> None:
        super().__init__("bundle misses its parity thresholds (use --force to write it anyway): " + "; ".join(failures))
        self.failures, self.report = failures, report


@dataclass
class ExportResult:
    path: Path
    manifest: dict
    parity: dict
    failures: list[str]


def _progress(iterable, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=not enabled)


def calibration_images(calib_dir: str | Path | None, count: int = 32, seed: int = 777) -> tuple[list, list[str]]:
    """Images (and prompts) for static calibration: a directory of images, or synthetic ones."""
    if calib_dir is not None:
        root = Path(calib_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"calibration directory not found: {root}")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        if not files:
            raise ValueError(f"no images (png, jpg, webp, bmp) in {root}")
        prompts_file = root / "prompts.json"
        names = json.loads(prompts_file.read_text()) if prompts_file.is_file() else {}
        return [str(f) for f in files[:count]], [names.get(f.name, "a picture") for f in files[:count]]
    from ..training.synthetic import make_sample

    samples = [make_sample(seed + i) for i in range(count)]
    return [s.image for s in samples], [s.prompt for s in samples]


def scored_probs(scorer: Any, images: Sequence, prompts: Sequence[str], dims: Sequence[str], batch: int,
                 desc: str | None = None) -> np.ndarray:
    """``[N, D, K]`` score distributions of ``images`` from anything with ``score(images, prompts,
    dims, batch_size=...)`` (a ``ZRewardModel`` or a runtime ``Scorer``), ``batch`` images at a
    time, with a progress bar when ``desc`` names one: what :func:`parity_report` compares."""
    results = []
    for i in _progress(range(0, len(images), batch), desc or "", desc is not None):
        results += scorer.score(images[i : i + batch], prompts[i : i + batch], dims, batch_size=batch)
    return np.array([[r[d].probs for d in dims] for r in results], dtype=np.float64)


def export_bundle(
    model: ZRewardModel | str | Path,
    out_dir: str | Path,
    quantize: str = "none",
    calib_dir: str | Path | None = None,
    gdn: str = "decomposed",
    force: bool = False,
    num_pairs: int = 200,
    thresholds: dict | None = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    opset: int = 18,
    overwrite: bool = False,
    progress: bool = True,
    benchmark: dict | None = None,
    fallback: str = "auto",
    smooth: str = "auto",
    quant_tool: str = "auto",
) -> ExportResult:
    """Export ``model`` (a :class:`ZRewardModel` or a saved model directory) to a bundle, with its
    model card (``README.md``: ``benchmark`` is an :func:`~zreward_fast.evaluation.evaluate` report
    to show in it).

    ``fallback="auto"`` (int8-dynamic, int8-weight): the layers most sensitive to the mode's
    rounding (int8-dynamic: its per-tensor activation scales; int8-weight: its weight blocks) stay
    in float, as many as it takes for the emulated error to fall to 40% of the parity gate,
    measured on calibration images (``calib_dir``, else synthetic ones; never the parity pairs);
    ``"none"`` quantizes every candidate. The choice is in the manifest
    (``quantization.fallback``). ``smooth="auto"`` (int8-dynamic, int8-static): each MLP's
    activation outliers are first moved into its weights (SmoothQuant, power-of-two scales from the
    same calibration images; the float model's outputs are unchanged and the caller's model gets its
    weights back bit-exactly); the scales' summary is in ``quantization.smoothing``.
    ``quant_tool`` picks the quantizer of the QDQ modes (int8-static, fp8): ``"modelopt"`` (NVIDIA
    ModelOpt's ONNX PTQ), ``"onnxruntime"``, or ``"auto"`` (``quantize.AUTO_TOOL``)."""
    from ..runtime import Scorer
    from ..runtime.bundle import update_manifest, write_manifest
    from .manifest import manifest_from_processor
    from .model_card import CARD_NAME, model_card, model_info
    from .onnx_export import export_decoder, export_vision, free_weights
    from .parity import DEFAULT_THRESHOLDS, PARITY_TIE_TOL, check_thresholds, parity_report
    from .quantize.smoothing import smoothed, smoothing_scales

    mode = resolve_quant_mode(quantize)
    check_gdn_form(gdn)
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    if smooth not in SMOOTHINGS:
        raise ValueError(f"smooth must be one of {SMOOTHINGS}, got {smooth!r}")
    if quant_tool not in QUANT_TOOLS:
        raise ValueError(f"quant_tool must be one of {QUANT_TOOLS}, got {quant_tool!r}")
    if quant_tool == "modelopt" and mode not in MODELOPT_MODES:  # never silently onnxruntime's instead
        raise ValueError(f"quant_tool='modelopt' quantizes {MODELOPT_MODES}, not {mode!r}: "
                         "use quant_tool='auto' or 'onnxruntime'")
    if num_pairs < 1:
        raise ValueError("num_pairs must be >= 1")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty")
    owned = isinstance(model, (str, Path))
    rm = ZRewardModel.from_pretrained(model) if owned else model
    rm = rm.eval().float()
    thresholds = (thresholds or DEFAULT_THRESHOLDS)[mode]
    dims, levels = list(rm.dimensions), np.array(rm.scale.levels)

    # The reference scores come first: the model is then only needed for the export, and a model
    # loaded here is released before the bundle is loaded for the parity check (peak RAM: one copy
    # of the weights at a time, not two).
    images, prompts, pairs = held_out_pairs(num_pairs)
    batch = parity_batch(rm)
    ref = scored_probs(rm, images, prompts, dims, batch, "reference scores" if progress else None)
    choice = smoothing = None
    do_smooth = smooth == "auto" and mode in SMOOTHED_MODES
    do_fallback = fallback == "auto" and mode in FALLBACK_MODES
    if do_smooth or do_fallback:
        calib_images, calib_prompts = calibration_images(calib_dir, count=FALLBACK_IMAGES)
    if do_smooth:
        for _ in _progress([calib_dir], "int8 smoothing", progress):
            smoothing = smoothing_scales(rm, calib_images, calib_prompts, batch=batch)
    if do_fallback:
        from .quantize.sensitivity import TARGET_FRACTION, choose_fallback

        with smoothed(rm.model, smoothing):  # the fallback is chosen for the model the graphs will hold
            for _ in _progress([calib_dir], "int8 sensitivity", progress):
                choice = choose_fallback(rm, calib_images, calib_prompts,
                                         TARGET_FRACTION * thresholds["mean_abs_dmu"], batch=batch, mode=mode)

    work = Path(tempfile.mkdtemp(prefix="zreward-export-"))
    try:
        fp32, bundle = work / "fp32", work / "bundle"
        fp32.mkdir()
        bundle.mkdir()
        steps = _progress(["vision", "decoder"], "export", progress)
        with smoothed(rm.model, smoothing):  # the float graphs the quantizers read are the smoothed model
            for name in steps:
                if name == "vision":
                    export_vision(rm, fp32 / "vision.onnx", opset=opset,
                                  external_data_threshold_bytes=external_data_threshold)
                else:
                    export_decoder(rm, fp32 / "decoder.onnx", gdn=gdn, opset=opset,
                                   external_data_threshold_bytes=external_data_threshold)
        rm.processor.tokenizer.save_pretrained(work / "tok")
        manifest = manifest_from_processor(rm.processor)
        info = model_info(rm)
        if owned:  # loaded here: its weights go before the bundle is loaded (one copy at a time)
            free_weights(rm)
            del rm
            gc.collect()
        manifest.update({"format": "zreward-fast-bundle", "format_version": 1, "created_by": f"zreward-fast {__version__}",
                         "graphs": {"vision": "vision.onnx", "decoder": "decoder.onnx"}, "gdn": gdn, "opset": opset})
        if mode == "none":
            for f in fp32.iterdir():
                shutil.move(str(f), bundle / f.name)  # a rename: no second copy of the weights on disk
            manifest["quantization"] = {"mode": "none"}
        else:
            shutil.copy2(work / "tok" / "tokenizer.json", fp32 / "tokenizer.json")
            write_manifest(fp32, dict(manifest, quantization={"mode": "none"}))
            manifest["quantization"] = _quantize(fp32, bundle, mode, calib_dir, external_data_threshold, progress,
                                                 choice.keep if choice else None, quant_tool)
            if choice is not None:
                manifest["quantization"]["fallback"] = choice.report()
            if smoothing is not None:
                manifest["quantization"]["smoothing"] = smoothing.report()
            shutil.rmtree(fp32)
        shutil.copy2(work / "tok" / "tokenizer.json", bundle / "tokenizer.json")
        # the reference scores ship with the bundle: a runtime precision below the export's (OpenVINO
        # bf16) is checked against them at load (Scorer(check_parity=...), docs/bundle.md)
        np.save(bundle / REFERENCE_NAME, ref.astype(np.float32), allow_pickle=False)
        manifest["opset"] = _graph_opset(bundle / "decoder.onnx")  # quantizers may raise it (fp8: 19)
        manifest = write_manifest(bundle, manifest)

        test = scored_probs(Scorer(bundle), images, prompts, dims, batch, "parity" if progress else None)
        report = parity_report(ref, test, levels, dims, {d: pairs[d] for d in dims if d in pairs},
                               tie_tol=PARITY_TIE_TOL)
        failures = check_thresholds(report, thresholds)
        report.update({"thresholds": thresholds, "failures": failures, "images": len(images), "pairs": num_pairs,
                       "held_out": "synthetic clean/degraded pairs (zreward_fast.training.synthetic)"})
        manifest["parity"] = report
        (bundle / CARD_NAME).write_text(model_card(manifest, info, benchmark, out.name), encoding="utf-8")
        manifest = update_manifest(bundle, manifest, [CARD_NAME])
        if failures and not force:
            raise ExportParityError(failures, report)
        # the finished bundle is copied beside the destination first (the work directory may be on
        # another filesystem), then renamed into place: a crash never leaves half a bundle at ``out``
        with staged_directory(out) as staged:
            for f in bundle.iterdir():  # same filesystem: renames; otherwise one file at a time
                shutil.move(str(f), staged / f.name)
        return ExportResult(out, manifest, report, failures)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _graph_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _quantize(fp32: Path, bundle: Path, mode: str, calib_dir, external_threshold: int, progress: bool,
              keep: dict | None = None, tool: str = "auto") -> dict:
    """Quantize both graphs; static modes calibrate on images run through the fp32 bundle."""
    from .quantize import CALIBRATED_MODES, ArrayCalibrationReader, quantize_bundle_graph

    readers: dict[str, Any] = {"vision": None, "decoder": None}
    calibration = None
    if mode in CALIBRATED_MODES:
        from ..runtime.preprocess import RuntimePreprocessor
        from ..runtime.scorer import Scorer

        images, prompts = calibration_images(calib_dir)
        calibration = str(calib_dir) if calib_dir is not None else f"{len(images)} synthetic images"
        scorer = Scorer(fp32)
        pre: RuntimePreprocessor = scorer.preprocessor
        vision_feeds, decoder_feeds = [], []
        for i in _progress(range(0, len(images), 4), "calibration inputs", progress):
            px = pre.pixel_values(images[i : i + 4])
            text = pre.text_inputs(prompts[i : i + 4], scorer.dimensions)
            feats = scorer.image_features(px)
            vision_feeds.append({"pixel_values": px})
            decoder_feeds.append({
                "input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
                "position_ids": text["position_ids"], "image_features": feats,
                "query_positions": text["query_positions"],
            })
        readers = {"vision": ArrayCalibrationReader(vision_feeds), "decoder": ArrayCalibrationReader(decoder_feeds)}
    reports = {}
    for name in ("vision", "decoder"):
        src = fp32 / f"{name}.onnx"
        external = (fp32 / f"{name}.onnx.data").exists() or src.stat().st_size > external_threshold
        reports[name] = quantize_bundle_graph(src, bundle / f"{name}.onnx", mode, readers[name], external_data=external,
                                              keep=keep, tool=tool if mode in MODELOPT_MODES else "auto")
    return {"mode": mode, "calibration": calibration, "graphs": reports}
