"""Scorer: a verified export bundle served with onnxruntime (or OpenVINO), with no torch in the process.

One call runs the vision graph on the bucket patches, then the decoder graph (prefill, score head
at the query positions), and reads each dimension's distribution from its log-probs. The object is
safe to share between threads: onnxruntime's ``InferenceSession.run`` is thread-safe, the
tokenizer is only read, and ``score`` keeps all per-call state in locals.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..checks import pair_inputs, positive_int
from ..dimensions import resolve_dimensions
from ..scale import ScoreResult, ScoreScale
from .bundle import BACKENDS, DECODER_INPUTS, DECODER_OUTPUTS, VISION_INPUTS, VISION_OUTPUTS, BundleError, verify_bundle
from .preprocess import RuntimePreprocessor

#: held-out pairs scored at load by Scorer(check_parity=...): 32 images, 4 pairs a dimension
PARITY_CHECK_PAIRS = 16


class ParityError(ValueError):
    """Scores that moved past the parity gate at the precision they are computed in."""


# An exporter may prune an input the traced graph never reads (e.g. attention_mask with right
# padding and causal attention); those are fed only when the graph declares them.
_OPTIONAL_INPUTS = ("attention_mask", "position_ids")


def _check_providers(providers: Sequence[Any] | None) -> list[Any]:
    """Provider names (or ``(name, options)`` pairs) that this onnxruntime build has."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [providers]
    providers = list(providers)
    if not providers:
        raise ValueError(f"providers is empty; available providers: {available}")
    for p in providers:
        name = p[0] if isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[1], dict) else p
        if not isinstance(name, str):
            raise TypeError(f"a provider is a name or a (name, options) pair, got {p!r}")
        if name not in available:
            raise ValueError(
                f"execution provider {name!r} is not available in this onnxruntime build "
                f"({ort.__version__}); available providers: {available}"
            )
    return providers


class Scorer:
    """Scores images against prompts with an export bundle.

    Args:
        bundle_dir: a directory written by ``zreward-fast export`` (see ``docs/bundle.md``), or the
            hub repo id of one (``revision`` pins it; ``zreward_fast.hub``); it is verified (format,
            checksums, completeness) before anything is loaded.
        providers: onnxruntime execution providers in priority order, e.g.
            ``["CUDAExecutionProvider", "CPUExecutionProvider"]``; default CPU only.
        intra_op_num_threads: threads per graph run (onnxruntime's default when ``None``).
        spin_wait: let onnxruntime's worker threads busy-wait for work between runs. Off by
            default: the vision and decoder sessions have a thread pool each and run back to
            back, so one pool spinning takes the cores from the other (measured on 2 cores: ~6%
            slower at batch 8, ~20% at batch 1 with spinning).
        parallel_runs: split each batch into this many parts and run them concurrently, each on
            its own share of the cores (``intra_op_num_threads`` defaults to cores / runs). On
            CPU, onnxruntime's intra-op threads parallelise a graph of many small ops poorly; one
            thread per part does better (measured on 2 cores with 2 runs: 18-26% more images/s at
            batch 8). A single image is one part, so batch-1 latency gets fewer threads: keep 1
            (the default) for latency, use the core count for throughput. On OpenVINO the parts run
            as that many streams (``NUM_STREAMS``).
        copy: verify the bundle while copying it into a private temporary directory (removed
            with the scorer) and load from that copy, so a bundle changed after its check cannot
            run; costs the bundle's size on ``TMPDIR``. ``False`` verifies and loads in place.
        revision: a branch, tag or commit of a hub repo id.
        local_files_only: a hub repo id is read from the hub cache only, never downloaded.
        backend: ``"onnxruntime"`` (the default) or ``"openvino"``: the same graphs compiled by
            OpenVINO's CPU plugin (``zreward_fast.runtime.openvino_backend``; ``pip install
            openvino``), with the same preprocessing and checks. ``providers`` and ``spin_wait``
            are onnxruntime's; ``intra_op_num_threads`` caps OpenVINO's threads too.
        precision: OpenVINO only: ``"f32"`` (default, the precision of the bundle's parity
            report) or ``"bf16"``/``"f16"`` (faster where the CPU has them; checked at load, below).
        check_parity: at load, score the first ``PARITY_CHECK_PAIRS`` of the export's held-out
            pairs and compare them with the fp32 PyTorch model's scores the bundle ships
            (``parity_reference.npy``, docs/bundle.md); past the gate (mean |Δμ| <= 0.05 and >= 98%
            of the pairs kept in order at a reduced precision; the bundle's own thresholds at f32)
            raise :class:`ParityError`. ``None`` (default): only at a precision below the one the
            bundle was exported and checked in (``bf16``, ``f16``), which its parity report does not
            cover; ``True``: always; ``False``: never. The report is ``scorer.parity`` (``None``
            when not checked); :meth:`measure_parity` measures it on more pairs without raising.
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike,
        providers: Sequence[Any] | None = None,
        intra_op_num_threads: int | None = None,
        spin_wait: bool = False,
        parallel_runs: int = 1,
        copy: bool = True,
        revision: str | None = None,
        local_files_only: bool = False,
        backend: str = "onnxruntime",
        precision: str = "f32",
        check_parity: bool | None = None,
    ) -> None:
        import onnxruntime as ort

        from ..hub import cache_repo_dir, resolve

        # Cheap argument checks first: verifying hashes a bundle of possibly many GB.
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "openvino" and providers is not None:
            raise ValueError("providers are onnxruntime execution providers; the openvino back end takes none")
        self.backend, self.precision = backend, precision
        if backend == "openvino":
            from .openvino_backend import PRECISIONS, openvino_available

            if precision not in PRECISIONS:
                raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
            if not openvino_available():
                raise ImportError("backend='openvino' needs the openvino package: pip install openvino")
        elif precision != "f32":
            raise ValueError("precision is OpenVINO's inference precision; onnxruntime runs the graphs as exported")
        self.providers = _check_providers(providers)
        opts = ort.SessionOptions()
        if intra_op_num_threads is not None:
            if not isinstance(intra_op_num_threads, int) or isinstance(intra_op_num_threads, bool) or intra_op_num_threads < 0:
                raise ValueError(f"intra_op_num_threads must be a non-negative int, got {intra_op_num_threads!r}")
            opts.intra_op_num_threads = intra_op_num_threads
        self.parallel_runs = positive_int("parallel_runs", parallel_runs)
        if parallel_runs > 1 and intra_op_num_threads is None:
            opts.intra_op_num_threads = max(1, (os.cpu_count() or 1) // parallel_runs)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
        self._threads = opts.intra_op_num_threads or None
        self.bundle_dir = resolve(bundle_dir, revision, local_files_only)  # a directory, or a hub repo id (zreward_fast.hub)
        # verified while copied into a private directory, loaded from there: what runs is what was
        # checked, even if the bundle changes afterwards (copy=False: in place, no extra disk)
        self._private = tempfile.mkdtemp(prefix="zreward-bundle-") if copy else None
        if self._private is not None:
            weakref.finalize(self, shutil.rmtree, self._private, ignore_errors=True)
        try:
            self.manifest: dict = verify_bundle(self.bundle_dir, copy_to=self._private,
                                                links_within=cache_repo_dir(self.bundle_dir))
        except BaseException:
            if self._private is not None:
                shutil.rmtree(self._private, ignore_errors=True)
            raise
        self._load_dir = Path(self._private) if self._private is not None else self.bundle_dir
        self.preprocessor = RuntimePreprocessor.from_bundle(self._load_dir, self.manifest)
        graphs = self.manifest["graphs"]
        self._vision = self._session(graphs["vision"], opts, VISION_INPUTS, VISION_OUTPUTS)
        self._decoder = self._session(graphs["decoder"], opts, DECODER_INPUTS, DECODER_OUTPUTS)
        self._decoder_inputs = frozenset(i.name for i in self._decoder.get_inputs())
        # Graphs exported with a static batch or length: pad to it instead of failing in onnxruntime.
        self._fixed_batch = _static_dim(self._vision, "pixel_values", 0) or _static_dim(self._decoder, "input_ids", 0)
        self._fixed_length = _static_dim(self._decoder, "input_ids", 1)
        self._pool = (
            ThreadPoolExecutor(parallel_runs, thread_name_prefix="zreward-run") if parallel_runs > 1 else None
        )
        self.parity: dict | None = None
        if check_parity or (check_parity is None and self.precision != "f32"):
            self.parity = self._check_parity(required=bool(check_parity))

    def _check_parity(self, required: bool) -> dict | None:
        """:meth:`measure_parity` on ``PARITY_CHECK_PAIRS`` pairs (see ``check_parity``); raises
        :class:`ParityError` when it fails the gate, and warns instead of raising when the bundle
        ships no reference and the check was not asked for."""
        from ..export.parity import REFERENCE_NAME

        if REFERENCE_NAME not in self.manifest["files"] and not required:
            warnings.warn(self._no_reference_message(), stacklevel=3)
            return None
        report = self.measure_parity(PARITY_CHECK_PAIRS)
        if report["failures"]:
            raise ParityError(f"{self.bundle_dir} on {self.backend} at {self.precision} fails the parity gate on "
                              f"{report['pairs']} held-out pairs against the fp32 model: "
                              f"{'; '.join(report['failures'])}. Serve it at f32 (precision='f32'), or "
                              "accept these scores knowingly with check_parity=False (serve --no-parity-check)")
        return report

    def _no_reference_message(self) -> str:
        from ..export.parity import REFERENCE_NAME

        return (f"{self.bundle_dir}: the bundle ships no reference scores ({REFERENCE_NAME}: exported by an "
                f"older zreward-fast), so {self.backend} at {self.precision} cannot be checked against the model; "
                "re-export it, or measure it with `zreward-fast eval --bundle DIR --backend ... --precision ...`")

    def measure_parity(self, num_pairs: int | None = None) -> dict:
        """The parity report of this scorer (its back end and precision) against the fp32 PyTorch
        model's scores the bundle ships (``parity_reference.npy``), on the first ``num_pairs`` of
        the export's held-out pairs (default: all it ships). Beside the export report's figures it
        holds ``thresholds`` (the bundle's own at f32, the reduced-precision gate below it),
        ``failures`` (the gate's, not raised) and ``pairs``. Raises :class:`BundleError` when the
        bundle ships no reference or a malformed one."""
        from ..export.parity import (PARITY_TIE_TOL, REDUCED_PRECISION_THRESHOLDS, REFERENCE_NAME, check_thresholds,
                                     held_out_pairs, parity_report)

        if REFERENCE_NAME not in self.manifest["files"]:
            raise BundleError(self._no_reference_message())
        dims, levels = self.dimensions, self.scale.levels
        try:
            ref = np.load(self._load_dir / REFERENCE_NAME, allow_pickle=False)
        except (ValueError, OSError) as e:  # not an .npy array (its hash matched: a hand-made bundle)
            raise BundleError(f"{self.bundle_dir}: {REFERENCE_NAME} is not a numpy array file: {e}") from e
        if ref.ndim != 3 or ref.shape[0] % 2 or ref.shape[1:] != (len(dims), len(levels)) or not np.isfinite(ref).all():
            raise BundleError(f"{self.bundle_dir}: {REFERENCE_NAME} holds {ref.shape} {ref.dtype}, not finite "
                              f"distributions [2 * pairs, {len(dims)}, {len(levels)}]")
        shipped = ref.shape[0] // 2
        n = shipped if num_pairs is None else min(positive_int("num_pairs", num_pairs), shipped)
        images, prompts, pairs = held_out_pairs(n)
        test = np.array([[r[d].probs for d in dims] for r in self.score(images, prompts, dims, batch_size=4)])
        report = parity_report(ref[: 2 * n].astype(np.float64), test, levels, dims,
                               {d: pairs[d] for d in dims if d in pairs}, tie_tol=PARITY_TIE_TOL)
        exported = self.manifest.get("parity", {}).get("thresholds")
        thresholds = exported if self.precision == "f32" and exported else REDUCED_PRECISION_THRESHOLDS
        report.update({"thresholds": dict(thresholds), "failures": check_thresholds(report, thresholds), "pairs": n})
        return report

    def _session(self, name: str, opts: Any, inputs: Sequence[str], outputs: Sequence[str]) -> Any:
        import onnxruntime as ort

        path = self._load_dir / name
        try:
            if self.backend == "openvino":
                from .openvino_backend import OpenVINOSession

                # parallel parts run as OpenVINO streams, each on its share of the threads: on one
                # stream concurrent requests wait for each other (parallel_runs=2 was the slower row)
                threads = self._threads * self.parallel_runs if self._threads else None
                sess = OpenVINOSession(path, precision=self.precision, num_threads=threads,
                                       streams=self.parallel_runs)
            else:
                sess = ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)
        except Exception as e:  # onnxruntime and OpenVINO raise their own exception types
            raise BundleError(f"{path}: {self.backend} cannot load the graph: {e}") from e
        got_in = {i.name for i in sess.get_inputs()}
        got_out = {o.name for o in sess.get_outputs()}
        required = set(inputs) - set(_OPTIONAL_INPUTS)
        if not required <= got_in <= set(inputs) or not set(outputs) <= got_out:
            raise BundleError(
                f"{path}: graph interface differs from the bundle contract: inputs {sorted(got_in)} "
                f"(expected {sorted(inputs)}), outputs {sorted(got_out)} (expected {sorted(outputs)})"
            )
        return sess

    # ------------------------------------------------------------------ properties
    @property
    def dimensions(self) -> tuple[str, ...]:
        return self.preprocessor.dimensions

    @property
    def scale(self) -> ScoreScale:
        return self.preprocessor.scale

    @property
    def active_providers(self) -> list[str]:
        """Providers the sessions actually run on (onnxruntime may fall back; OpenVINO's device and
        precision for that back end)."""
        return list(self._decoder.get_providers())

    # ------------------------------------------------------------------ scoring
    def score(
        self,
        images: Sequence[Any] | Any,
        prompts: Sequence[str] | str,
        dimensions: Sequence[str] | str | None = None,
        batch_size: int = 16,
    ) -> list[dict[str, ScoreResult]]:
        """Score each image against its prompt; one ``{dimension: ScoreResult}`` per image.

        Images may be PIL images, HWC arrays, paths or encoded bytes. A single prompt string with a
        single image scores one pair. Raises ``ValueError``/``TypeError`` for bad input (the
        offending index is named) before or without running the graphs on it.
        """
        images, prompts = pair_inputs(images, prompts)
        if not prompts:
            return []
        positive_int("batch_size", batch_size)
        dims = resolve_dimensions(dimensions, self.dimensions)
        # Cheap checks of every prompt first, so a bad prompt fails before any compute.
        for i, p in enumerate(prompts):
            try:
                self.preprocessor.student_texts([p], dims)
            except (TypeError, ValueError) as e:
                raise type(e)(f"prompt {i}: {e}") from e
        if self._fixed_batch:
            batch_size = min(batch_size, self._fixed_batch)
        if self._pool is not None:  # parts of about batch_size / parallel_runs, run concurrently
            batch_size = math.ceil(min(batch_size, len(prompts)) / self.parallel_runs)
        starts = range(0, len(prompts), batch_size)

        def part(start: int) -> list[dict[str, ScoreResult]]:
            pixel_values = self.preprocessor.pixel_values(images[start : start + batch_size], first_index=start)
            log_probs, means = self._run(pixel_values, prompts[start : start + batch_size], dims)
            return self._results(log_probs, means, dims)

        parts = map(part, starts) if self._pool is None or len(starts) == 1 else self._pool.map(part, starts)
        return [r for rs in parts for r in rs]

    def _run(self, pixel_values: np.ndarray, prompts: list[str], dims: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        n = len(prompts)
        text = self.preprocessor.text_inputs(prompts, dims, length=self._fixed_length)
        if self._fixed_batch and n < self._fixed_batch:
            # Static-batch graph: repeat the last row to fill it; the extra rows are dropped.
            pad = self._fixed_batch - n
            pixel_values = _pad_rows(pixel_values, pad, axis=0)
            text = {k: _pad_rows(v, pad, axis=1 if k == "position_ids" else 0) for k, v in text.items()}
        (features,) = self._vision.run(list(VISION_OUTPUTS), {"pixel_values": pixel_values})
        feeds = {
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "position_ids": text["position_ids"],
            "image_features": np.asarray(features, dtype=np.float32),
            "query_positions": text["query_positions"],
        }
        feeds = {k: v for k, v in feeds.items() if k in self._decoder_inputs}
        log_probs, means = self._decoder.run(list(DECODER_OUTPUTS), feeds)
        log_probs, means = np.asarray(log_probs)[:n], np.asarray(means)[:n]
        k = self.scale.num_levels
        if log_probs.shape != (n, len(dims), k) or means.shape != (n, len(dims)):
            raise RuntimeError(
                f"decoder returned log_probs {log_probs.shape} and means {means.shape}; expected "
                f"{(n, len(dims), k)} and {(n, len(dims))}"
            )
        if not (np.isfinite(log_probs).all() and np.isfinite(means).all()):
            raise RuntimeError("decoder returned non-finite scores (NaN or inf)")
        return log_probs, means

    def _results(self, log_probs: np.ndarray, means: np.ndarray, dims: tuple[str, ...]) -> list[dict[str, ScoreResult]]:
        levels = np.asarray(self.scale.levels, dtype=np.float64)
        probs = np.exp(log_probs.astype(np.float64))
        probs /= probs.sum(-1, keepdims=True)  # remove float32 rounding: probabilities sum to 1
        out = []
        for i in range(probs.shape[0]):
            row = {}
            for j, d in enumerate(dims):
                mu = float(means[i, j])
                var = float(np.sum(probs[i, j] * (levels - mu) ** 2))
                row[d] = ScoreResult(mu, math.sqrt(max(var, 0.0)), tuple(float(p) for p in probs[i, j]))
            out.append(row)
        return out

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        """Run only the vision graph: ``[B, P, D]`` patches -> ``[B, N, hidden]`` features
        (the exporter calibrates the decoder on these)."""
        (features,) = self._vision.run(list(VISION_OUTPUTS), {"pixel_values": pixel_values})
        return np.asarray(features, dtype=np.float32)

    def warmup(self) -> None:
        """Run one dummy batch so that lazy allocation and kernel selection happen before traffic."""
        gray = np.full((self.preprocessor.image_size, self.preprocessor.image_size, 3), 128, dtype=np.uint8)
        self.score([gray], ["warmup"])

    def __repr__(self) -> str:
        return (f"Scorer({str(self.bundle_dir)!r}, backend={self.backend!r}, providers={self.active_providers}, "
                f"dimensions={list(self.dimensions)})")


def _static_dim(session: Any, name: str, axis: int) -> int | None:
    """The input's size along ``axis`` when the graph fixes it, else ``None`` (dynamic)."""
    for i in session.get_inputs():
        if i.name == name and len(i.shape) > axis and isinstance(i.shape[axis], int) and i.shape[axis] > 0:
            return int(i.shape[axis])
    return None


def _pad_rows(a: np.ndarray, pad: int, axis: int) -> np.ndarray:
    """Append ``pad`` copies of the last batch row along ``axis``."""
    last = np.take(a, [-1], axis=axis)
    return np.concatenate([a, np.repeat(last, pad, axis=axis)], axis=axis)
