"""TorchEngine: the RISD student served by PyTorch with static shapes, CUDA graphs and fused kernels.

Why: transformers' eager forward spends most of a batch-1 call launching small kernels and
handling variable shapes (packed vision sequences, masks, caches), and it scales badly past
batch 16 (docs/architecture.md, Performance targets). This engine runs the same weights with

* static shapes per (batch, sequence) bucket: a batch is padded to its bucket by repeating its last
  row, the text to the sequence bucket by right padding. The model is causal and every token mixer
  (attention, Gated DeltaNet, causal conv) only looks back, so padding after a row's last token
  cannot change the outputs at its query positions; repeated rows are dropped;
* on CUDA, one CUDA graph per bucket, captured after a warm-up and replayed with the inputs copied
  into preallocated buffers (the whole call, image patchify to score head, is one replay);
* the student of ``zreward_fast.models.qwen3_5`` (the modules the ONNX export builds on too: the
  vision tower for one fixed grid, the image merge by gather, M-RoPE from position ids) with its
  engine back ends: ``scaled_dot_product_attention`` for the full-attention and vision layers,
  flash-linear-attention's Gated DeltaNet and causal-conv kernels on CUDA when ``fla`` is
  importable (the decomposed chunked torch GDN otherwise), and the fused score head
  (:func:`zreward_fast.kernels.score_head`) on the query rows only;
* optionally fp8 linears (:mod:`zreward_fast.engine.fp8`).

What is tested where: on CPU (``tests/engine/test_engine.py``) the fp32 engine is checked against
:class:`~zreward_fast.modeling.ZRewardModel` across buckets, the fp8 emulation for parity, the
loading rules, bucket selection and :func:`zreward_fast.engine.make_scorer`. bf16 on CUDA, the CUDA
graphs, the ``fla`` kernels and fp8 through ``torch._scaled_mm`` **only run on a GPU**: the
``gpu``-marked tests and ``bench/bench_engine.py`` (run by ``bench/gpu_check.sh``).
"""
from __future__ import annotations

import bisect
import contextlib
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..checks import pair_inputs, positive_int
from ..dimensions import resolve_dimensions
from ..kernels import score_head
from ..modeling import ZRewardModel
from ..models.gated_deltanet import FlaKernels, load_fla
from ..models.qwen3_5 import Decoder, Vision
from ..processing import ZRewardProcessor
from ..prompting import student_query_positions
from ..runtime.positions import mrope_position_ids
from ..scale import ScoreResult, ScoreScale

DEFAULT_BATCH_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_SEQ_BUCKETS: tuple[int, ...] = (128, 256, 384, 512)
DEVICES = ("cuda", "cpu")
GDN_CHOICES = ("auto", "fla", "torch")


# --------------------------------------------------------------------------- engine modules
class _Patchify(nn.Module):
    """``pixels [B, 3, S, S]`` in [0, 1] -> normalised one-frame patches ``[B, P, 3 * p * p]``.

    The layout of :meth:`ZRewardProcessor.patchify` (tested equal) with one frame per patch: the
    vision tower (``ExportVision``) sums the patch embedding's temporal slices, as a still image
    repeats its frame. On the device and inside the CUDA graph, with mean/std as buffers: the
    processor builds them with ``torch.tensor(list, device=...)``, a host-to-device copy that a
    graph capture forbids.
    """

    def __init__(self, processor: ZRewardProcessor) -> None:
        super().__init__()
        self.p, self.m = processor.patch_size, processor.merge_size
        self.register_buffer("mean", torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b, c, h, w = pixels.shape
        p, m = self.p, self.m
        x = (pixels.float() - self.mean) / self.std
        gh, gw = h // p, w // p
        x = x.reshape(b, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        return x.reshape(b, gh * gw, c * p * p)


class _Student(nn.Module):
    """pixels, input_ids, position_ids, query_positions -> (probs [B*D, K], mean [B*D], var [B*D]).

    Shares every weight with the Hugging Face model (no copies); the K score rows of the LM head
    are the decoder's buffers.
    """

    def __init__(self, rm: ZRewardModel, fla: FlaKernels | None) -> None:
        super().__init__()
        self.patchify = _Patchify(rm.processor)
        self.vision = Vision(rm, attention="sdpa")
        # embeddings, M-RoPE, image merge, the layers, norm, score rows: fla's GDN kernels where
        # loaded, the decomposed torch form otherwise
        self.base = Decoder(rm, gdn="fla" if fla is not None else "decomposed", attention="sdpa", fla=fla)
        self.register_buffer("score_ids", torch.arange(self.base.score_weight.shape[0]), persistent=False)

    def forward(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor, query_positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        base = self.base
        feats = self.vision(self.patchify(pixels))
        x = base.merge_image_features(input_ids, base.embed_tokens(input_ids), feats)
        cos, sin = base.rotary(position_ids, x.dtype)
        for layer in base.layers:
            x = layer(x, cos, sin)
        x = base.norm(x)
        rows = torch.gather(x, 1, query_positions.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, D, H]
        # Validated once at build time (TorchEngine._setup): no per-call host sync, which a CUDA graph forbids.
        out = score_head(rows.reshape(-1, x.shape[-1]), base.score_weight, self.score_ids, base.levels,
                         base.score_bias, base.temperature, validate=False)
        return out.probs, out.mean, out.var


# --------------------------------------------------------------------------- buckets
def pick_bucket(size: int, buckets: Sequence[int], what: str) -> int:
    """The smallest bucket >= ``size``; a clear error naming the largest bucket otherwise."""
    i = bisect.bisect_left(buckets, size)
    if i == len(buckets):
        raise ValueError(
            f"{what} {size} exceeds the largest {what} bucket {buckets[-1]} (buckets {list(buckets)}): "
            f"pass a larger bucket in {'seq_buckets' if what == 'sequence length' else 'batch_buckets'}"
        )
    return buckets[i]


def _check_buckets(buckets: Sequence[int], name: str) -> tuple[int, ...]:
    try:
        out = tuple(sorted(int(b) for b in buckets))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a sequence of positive ints, got {buckets!r}") from e
    if not out or out[0] < 1 or len(set(out)) != len(out):
        raise ValueError(f"{name} must be distinct positive ints, got {buckets!r}")
    return out


class _Bucket:
    """Preallocated inputs (and on CUDA the graph and its outputs) of one (batch, seq) bucket."""

    def __init__(self, batch: int, seq: int, dmax: int, image_size: int, device: torch.device) -> None:
        self.batch, self.seq = batch, seq
        self.pixels = torch.zeros(batch, 3, image_size, image_size, dtype=torch.float32, device=device)
        self.input_ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(3, batch, seq, dtype=torch.long, device=device)
        self.query_positions = torch.zeros(batch, dmax, dtype=torch.long, device=device)
        self.graph: Any = None
        self.outputs: tuple[torch.Tensor, ...] | None = None

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        return self.pixels, self.input_ids, self.position_ids, self.query_positions


# --------------------------------------------------------------------------- loading
def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """A local directory with ``config.json`` and safetensors weights; pickle weights are refused."""
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a directory written by ZRewardModel.save_pretrained")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickled:
            raise ValueError(
                f"{path} holds only pickle weights ({', '.join(pickled[:3])}): TorchEngine loads safetensors only, "
                "since unpickling a checkpoint can run arbitrary code. Load it once where you trust it and "
                "re-save it with save_pretrained (safetensors is its default format)"
            )
        raise FileNotFoundError(f"{path} has no *.safetensors weights")
    return path


# --------------------------------------------------------------------------- the engine
class TorchEngine:
    """Scores images against prompts with the student in PyTorch; same results as the ONNX ``Scorer``.

    Args:
        model_dir: a local directory written by ``ZRewardModel.save_pretrained`` (safetensors only).
        device: ``"cuda"`` (bf16, CUDA graphs, fla kernels when importable) or ``"cpu"`` (fp32).
        dtype: compute dtype; default bf16 on CUDA, fp32 on CPU.
        batch_buckets, seq_buckets: the static shapes; a batch runs at the smallest bucket that
            holds it (larger batches are split at the largest batch bucket); a sequence longer
            than the largest sequence bucket is an error.
        use_cuda_graphs: capture one CUDA graph per bucket (ignored on CPU).
        fp8: e4m3 linear layers (:func:`~zreward_fast.engine.fp8.quantize_linears`); on CPU the
            exact emulation, meant for tests.
        gdn: Gated DeltaNet kernels: ``"auto"`` (fla on CUDA when importable, else torch),
            ``"fla"`` (required) or ``"torch"`` (the chunked form of ``models/gated_deltanet.py``; the only one on CPU).

    ``score`` is safe to call from several threads (calls are serialised: they share the buffers).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        device: str | torch.device = "cuda",
        dtype: torch.dtype | None = None,
        batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS,
        seq_buckets: Sequence[int] = DEFAULT_SEQ_BUCKETS,
        use_cuda_graphs: bool = True,
        fp8: bool = False,
        gdn: str = "auto",
        revision: str | None = None,
    ) -> None:
        from ..hub import resolve

        device, dtype = _check_device(device, dtype)
        path = check_model_dir(resolve(model_dir, revision))
        self.model_dir: Path | None = path
        self._setup(ZRewardModel.from_pretrained(path, torch_dtype=dtype, device=device), device, dtype,
                    batch_buckets=batch_buckets, seq_buckets=seq_buckets, use_cuda_graphs=use_cuda_graphs, fp8=fp8, gdn=gdn)

    @classmethod
    def from_model(cls, rm: ZRewardModel, dtype: torch.dtype | None = None, **options: Any) -> "TorchEngine":
        """An engine on an in-memory :class:`ZRewardModel` (on its device), sharing its weights.

        ``dtype`` converts the model in place when given; ``options`` are the constructor's
        (``batch_buckets``, ``seq_buckets``, ``use_cuda_graphs``, ``fp8``, ``gdn``), with its
        defaults. With ``fp8=True`` the model's linear layers are replaced in place, so the
        ``ZRewardModel`` then runs in fp8 too.
        """
        if dtype is not None:
            rm.model.to(dtype)
        device, dtype = _check_device(rm.device, dtype or rm.model.get_input_embeddings().weight.dtype)
        self = cls.__new__(cls)
        self.model_dir = None
        self._setup(rm, device, dtype, **options)
        return self

    def _setup(
        self, rm: ZRewardModel, device: torch.device, dtype: torch.dtype, *,
        batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS, seq_buckets: Sequence[int] = DEFAULT_SEQ_BUCKETS,
        use_cuda_graphs: bool = True, fp8: bool = False, gdn: str = "auto",
    ) -> None:
        self.device, self.dtype = device, dtype
        self.rm = rm.eval()
        self.processor: ZRewardProcessor = rm.processor
        self.batch_buckets = _check_buckets(batch_buckets, "batch_buckets")
        self.seq_buckets = _check_buckets(seq_buckets, "seq_buckets")
        if gdn not in GDN_CHOICES:
            raise ValueError(f"gdn must be one of {GDN_CHOICES}, got {gdn!r}")
        fla = load_fla() if device.type == "cuda" and gdn != "torch" else None
        if gdn == "fla" and fla is None:
            raise RuntimeError("gdn='fla' needs CUDA and an importable flash-linear-attention (pip install "
                               "flash-linear-attention); gdn='auto' falls back to the torch chunked form")
        self.fp8 = bool(fp8)
        self.quantize_report = None
        if self.fp8:
            from .fp8 import quantize_linears, scaled_mm_supported

            if device.type == "cuda" and not scaled_mm_supported(device):
                raise RuntimeError(f"fp8 needs a GPU of compute capability 8.9 or newer (torch._scaled_mm); "
                                   f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}")
            self.quantize_report = quantize_linears(rm.model)
        self.gdn_backend = "fla" if fla is not None else "torch"
        self.use_cuda_graphs = bool(use_cuda_graphs) and device.type == "cuda"
        self.student = _Student(rm, fla).to(device).eval()
        base = self.student.base
        # Validate the head's arguments once (ids, levels, temperature); calls skip the host sync.
        with torch.inference_mode():
            score_head(torch.zeros(1, base.score_weight.shape[1], dtype=dtype, device=device), base.score_weight,
                       self.student.score_ids, base.levels, base.score_bias, base.temperature)
        proc = self.processor
        self._merged_grid = (proc.grid_thw[1] // proc.merge_size, proc.grid_thw[2] // proc.merge_size)
        self._query_ids = {d: proc.query_token_ids[d] for d in proc.dimensions}
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._pool = None
        self._lock = threading.Lock()
        # On CUDA without fla, the torch GDN builds small index tensors with factory calls: a
        # default-device context keeps them on the GPU (a host-to-device copy breaks capture).
        self._device_ctx = (lambda: torch.device(device)) if device.type == "cuda" and fla is None else contextlib.nullcontext

    # ------------------------------------------------------------------ properties
    @property
    def dimensions(self) -> tuple[str, ...]:
        return self.processor.dimensions

    @property
    def scale(self) -> ScoreScale:
        return self.processor.scale

    @property
    def graphs_captured(self) -> list[tuple[int, int]]:
        """The (batch, seq) buckets that have a CUDA graph."""
        return sorted(k for k, b in self._buckets.items() if b.graph is not None)

    # ------------------------------------------------------------------ text
    def _tokenize(self, prompt: str, dims: tuple[str, ...], index: int) -> tuple[list[int], list[int]]:
        """Token ids of one student prompt and its query positions, checked against the buckets."""
        proc = self.processor
        try:
            ids = proc.tokenize([proc.student_text(prompt, dims)])[0]
        except (TypeError, ValueError) as e:
            raise type(e)(f"prompt {index}: {e}") from e
        (qpos,) = student_query_positions([ids], dims, self._query_ids, proc.image_token_id, proc.num_image_tokens, index)
        if len(ids) > self.seq_buckets[-1]:
            raise ValueError(
                f"prompt {index} tokenizes to {len(ids)} tokens (with {proc.num_image_tokens} image tokens), more than "
                f"the largest sequence bucket {self.seq_buckets[-1]}: shorten the prompt or pass larger seq_buckets"
            )
        return ids, qpos

    # ------------------------------------------------------------------ running
    def _bucket(self, batch: int, seq: int) -> _Bucket:
        key = (batch, seq)
        if key not in self._buckets:
            self._buckets[key] = _Bucket(batch, seq, len(self.dimensions), self.processor.image_size, self.device)
        return self._buckets[key]

    def _fill(self, bucket: _Bucket, pixels: torch.Tensor, rows: list[list[int]], qpos: list[list[int]]) -> None:
        """Copy one chunk into the bucket's buffers: rows repeated to the batch, text right-padded,
        query positions repeated to the widest dimension set (extra columns are dropped)."""
        n, bb, sb = len(rows), bucket.batch, bucket.seq
        order = list(range(n)) + [n - 1] * (bb - n)
        ids = np.full((bb, sb), self.processor.pad_token_id, dtype=np.int64)
        mask = np.zeros((bb, sb), dtype=np.int64)
        qp = np.zeros((bb, bucket.query_positions.shape[1]), dtype=np.int64)
        for i, j in enumerate(order):
            ids[i, : len(rows[j])] = rows[j]
            mask[i, : len(rows[j])] = 1
            qp[i] = qpos[j] + [qpos[j][0]] * (qp.shape[1] - len(qpos[j]))
        pos = mrope_position_ids(ids, mask, self.processor.image_token_id, self._merged_grid)
        bucket.input_ids.copy_(torch.from_numpy(ids))
        bucket.position_ids.copy_(torch.from_numpy(pos))
        bucket.query_positions.copy_(torch.from_numpy(qp))
        bucket.pixels[:n].copy_(pixels)
        if bb > n:
            bucket.pixels[n:].copy_(bucket.pixels[n - 1 : n].expand(bb - n, -1, -1, -1))

    def _capture(self, bucket: _Bucket) -> None:
        """Warm up on a side stream (Triton autotuning, cuBLAS workspaces), then capture."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), self._device_ctx():
            for _ in range(2):
                self.student(*bucket.inputs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            # One pool for every bucket: calls are serialised and each replay's outputs are copied
            # out before the next, so the graphs never need their intermediates at the same time.
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), self._device_ctx():
            outputs = self.student(*bucket.inputs)
        bucket.graph, bucket.outputs = graph, outputs

    def _execute(self, bucket: _Bucket, graphs: bool) -> tuple[torch.Tensor, ...]:
        if graphs and self.use_cuda_graphs:
            if bucket.graph is None:
                self._capture(bucket)
            bucket.graph.replay()
            return bucket.outputs
        with self._device_ctx():
            return self.student(*bucket.inputs)

    @torch.inference_mode()
    def _run(
        self, pixels: torch.Tensor, rows: list[list[int]], qpos: list[list[int]], ndims: int,
        graphs: bool = True, bucket_shape: tuple[int, int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(rows)
        if bucket_shape is None:
            bucket_shape = (pick_bucket(n, self.batch_buckets, "batch size"),
                            pick_bucket(max(len(r) for r in rows), self.seq_buckets, "sequence length"))
        bucket = self._bucket(*bucket_shape)
        self._fill(bucket, pixels, rows, qpos)
        probs, mean, var = self._execute(bucket, graphs)
        dmax, k = bucket.query_positions.shape[1], probs.shape[-1]
        probs = probs.view(bucket.batch, dmax, k)[:n, :ndims].float().cpu().numpy()
        mean = mean.view(bucket.batch, dmax)[:n, :ndims].float().cpu().numpy()
        var = var.view(bucket.batch, dmax)[:n, :ndims].float().cpu().numpy()
        return probs, mean, var

    def score(
        self,
        images: Sequence[Any] | Any,
        prompts: Sequence[str] | str,
        dimensions: Sequence[str] | str | None = None,
        batch_size: int | None = None,
    ) -> list[dict[str, ScoreResult]]:
        """Score each image against its prompt; one ``{dimension: ScoreResult}`` per image.

        Images may be PIL images, paths, bytes, HWC arrays or ``[3, H, W]`` tensors in [0, 1] (the
        processor's bucket policy applies). Prompts are checked (and their lengths against the
        sequence buckets) before anything runs. ``batch_size`` (default: the largest batch bucket)
        caps the rows per forward pass.
        """
        images, prompts = pair_inputs(images, prompts)
        if not prompts:
            return []
        limit = self.batch_buckets[-1]
        if batch_size is not None:
            limit = min(limit, positive_int("batch_size", batch_size))
        dims = resolve_dimensions(dimensions, self.dimensions)
        tokenized = [self._tokenize(p, dims, i) for i, p in enumerate(prompts)]
        results: list[dict[str, ScoreResult]] = []
        for start in range(0, len(prompts), limit):
            chunk = tokenized[start : start + limit]
            pixels = self.processor.to_pixels(images[start : start + limit])
            with self._lock:
                probs, mean, var = self._run(pixels, [c[0] for c in chunk], [c[1] for c in chunk], len(dims))
            if not (np.isfinite(probs).all() and np.isfinite(mean).all()):
                raise RuntimeError("the engine produced non-finite scores (NaN or inf)")
            for i in range(len(chunk)):
                results.append({
                    d: ScoreResult(float(mean[i, j]), float(np.sqrt(max(float(var[i, j]), 0.0))),
                                   tuple(float(p) for p in probs[i, j]))
                    for j, d in enumerate(dims)
                })
        return results

    def warmup(self, batch_buckets: Sequence[int] | None = None, seq_buckets: Sequence[int] | None = None) -> None:
        """Run (on CUDA with graphs: capture) the given buckets once with a dummy gray image, so
        the first real call pays no capture or autotuning. Default: every bucket on CUDA, the
        smallest one on CPU (there is nothing to capture there)."""
        if batch_buckets is None:
            batch_buckets = self.batch_buckets if self.device.type == "cuda" else self.batch_buckets[:1]
        if seq_buckets is None:
            seq_buckets = self.seq_buckets if self.device.type == "cuda" else self.seq_buckets[:1]
        gray = np.full((self.processor.image_size, self.processor.image_size, 3), 128, dtype=np.uint8)
        ids, qpos = self._tokenize("warmup", self.dimensions, 0)
        pixels = self.processor.to_pixels([gray])
        for bb in batch_buckets:
            for sb in seq_buckets:
                if bb not in self.batch_buckets or sb not in self.seq_buckets:
                    raise ValueError(f"bucket ({bb}, {sb}) is not one of batch_buckets {self.batch_buckets} "
                                     f"x seq_buckets {self.seq_buckets}")
                if len(ids) > sb:
                    continue  # the dummy prompt does not fit this bucket; no real prompt of it would either
                with self._lock:
                    self._run(pixels, [ids], [qpos], len(self.dimensions), bucket_shape=(bb, sb))

    def __repr__(self) -> str:
        return (f"TorchEngine({str(self.model_dir) if self.model_dir else 'in-memory'!r}, device={self.device}, "
                f"dtype={self.dtype}, gdn={self.gdn_backend}, fp8={self.fp8}, graphs={self.use_cuda_graphs})")


def _check_device(device: str | torch.device, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}") from e
    if dev.type not in DEVICES:
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but torch sees no CUDA GPU (torch "
                               f"{torch.__version__}); use device='cpu' or the ONNX runtime")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return dev, dtype
