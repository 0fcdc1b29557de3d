"""TensorRT engines from the bundle graphs (strongly typed: precision comes from the graph).

A strongly typed network takes every tensor's type from the ONNX graph: fp32 stays fp32, a
bf16/fp16 graph runs in that type, and the int8/fp8 Q/DQ pairs written by
:mod:`zreward_fast.export.quantize` decide exactly which layers run quantized. No builder precision
flag is set, so TensorRT cannot silently drop the norms, GDN gates or score head to low precision.

:func:`profile_shapes` needs only ``onnx`` (it is tested anywhere); :func:`build_engine` imports
TensorRT (10.x Python API) when called.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import onnx
from onnx import TensorProto

Shape = tuple[int, ...]
Range = tuple[int, int, int]

_SEQ_NAME = re.compile(r"seq|^len|length|^l$|^t$|^s$|time", re.IGNORECASE)


class TensorRTNotInstalledError(ImportError):
    """TensorRT's Python package is not importable here."""


class TensorRTBuildError(RuntimeError):
    """TensorRT could not parse the graph or build the engine."""


def _check_range(name: str, r: Any) -> Range:
    try:
        lo, opt, hi = (int(x) for x in r)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (min, opt, max) integers, got {r!r}") from None
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"{name} must satisfy 1 <= min <= opt <= max, got ({lo}, {opt}, {hi})")
    return lo, opt, hi


def profile_shapes(
    onnx_path: str | Path,
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 32,
    seq_len: tuple[int, int, int] | None = None,
    *,
    other_dims: Mapping[str, tuple[int, int, int]] | None = None,
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Optimization-profile shapes ``{input: (min, opt, max)}`` for every input with a dynamic axis.

    Dynamic axes are read from the graph. Each input's first dynamic axis is the batch (the bundle
    contract: ``[B, L]``, ``[3, B, L]``, ``[B, N, H]``; exporters do not always give the batch one
    symbol across inputs). The sequence is the later dynamic axis whose symbol is named like one
    (``seq``, ``len``, ``L``, ...) or else the one shared by most inputs; an unnamed later axis is
    the sequence when it is its input's second dynamic axis. Any other dynamic axis, such as the
    decoder's number of queries (``query_positions`` ``[B, D]``), takes its range from
    ``other_dims`` (by symbol or ``"input:axis"``, e.g. ``{"query_positions:1": (1, 4, 4)}``), which
    also overrides any axis; without one a ``ValueError`` names it. Static inputs are not listed.
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX graph not found: {path}")
    batch = _check_range("batch (min_batch, opt_batch, max_batch)", (min_batch, opt_batch, max_batch))
    seq = _check_range("seq_len", seq_len) if seq_len is not None else None
    others = {k: _check_range(f"other_dims[{k!r}]", v) for k, v in (other_dims or {}).items()}

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    inputs: list[tuple[str, list[int | str | None]]] = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if not vi.type.HasField("tensor_type"):
            raise ValueError(f"input {vi.name!r} is not a tensor")
        dims: list[int | str | None] = []
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or None)
        inputs.append((vi.name, dims))

    # The batch is every input's first dynamic axis (the bundle contract: [B, ...], [3, B, L]);
    # exporters do not always give it one symbol across inputs. The sequence is a later axis.
    later: list[str] = []
    for _, dims in inputs:
        dyn = [d for d in dims if not isinstance(d, int)]
        later += [d for d in dyn[1:] if isinstance(d, str) and d not in others]
    seq_sym = next((d for d in sorted(set(later)) if _SEQ_NAME.search(d)), None)
    if seq_sym is None and later:
        counts = {d: sum(d in dims for _, dims in inputs) for d in set(later)}
        top = max(counts.values())
        best = [d for d, c in counts.items() if c == top]
        if len(best) == 1 and (top >= 2 or len(counts) == 1):
            seq_sym = best[0]

    out: dict[str, tuple[Shape, Shape, Shape]] = {}
    unresolved: list[str] = []
    seq_users: list[str] = []
    for name, dims in inputs:
        if all(isinstance(d, int) for d in dims):
            continue
        lo, opt, hi = [], [], []
        n_dynamic = 0
        for axis, d in enumerate(dims):
            key = f"{name}:{axis}"
            r: Range | None
            if isinstance(d, int):
                r = (d, d, d)
            elif key in others or (d is not None and d in others):
                r = others[key] if key in others else others[d]
            elif n_dynamic == 0:
                r = batch
            elif (d is not None and d == seq_sym) or (d is None and n_dynamic == 1):
                seq_users.append(name)
                r = seq
            else:
                unresolved.append(f"{key} ({d or 'unnamed'})")
                r = None
            if not isinstance(d, int):
                n_dynamic += 1
            if r is None:
                continue
            lo.append(r[0])
            opt.append(r[1])
            hi.append(r[2])
        if len(lo) == len(dims):
            out[name] = (tuple(lo), tuple(opt), tuple(hi))
    if unresolved:
        raise ValueError(
            "dynamic axes that are neither batch nor sequence: " + ", ".join(unresolved)
            + "; give their ranges in other_dims={'symbol' or 'input:axis': (min, opt, max)}"
        )
    if seq_users and seq is None:
        raise ValueError(
            f"inputs {sorted(set(seq_users))} have a dynamic sequence axis ({seq_sym or 'unnamed'}): "
            "pass seq_len=(min, opt, max)"
        )
    return out


def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt  # noqa: PLC0415 - optional, GPU machines only
    except ImportError as e:
        raise TensorRTNotInstalledError(
            "TensorRT is not installed (import tensorrt failed: "
            f"{e}). Install the TensorRT 10.x Python wheel (`pip install tensorrt`) on a machine "
            "with an NVIDIA GPU to build engines; the ONNX bundle itself runs with onnxruntime."
        ) from e
    return trt


def _has_float8_qdq(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    f8 = {TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E5M2FNUZ}
    return any(t.data_type in f8 for t in model.graph.initializer) or any(
        n.op_type == "QuantizeLinear" and any(a.name == "output_dtype" and a.i in f8 for a in n.attribute)
        for n in model.graph.node
    )


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 32,
    seq_len: tuple[int, int, int] | None = None,
    fp8: bool = False,
    workspace_gb: float = 8.0,
    *,
    other_dims: Mapping[str, tuple[int, int, int]] | None = None,
    verbose: bool = False,
) -> Path:
    """Build and serialize a strongly typed TensorRT engine from an ONNX graph; returns its path.

    One optimization profile covers every dynamic input (:func:`profile_shapes`: batch from the
    batch arguments, sequence from ``seq_len``). ``fp8=True`` asserts that the graph carries float8
    Q/DQ (from ``quantize_bundle_graph(..., mode="fp8")``): in a strongly typed network that, not a
    builder flag, is what makes the GEMMs run in fp8. External data next to the graph is read by
    the parser. Raises :class:`TensorRTNotInstalledError` (an ``ImportError``) without TensorRT and
    :class:`TensorRTBuildError` with the parser's messages when parsing or building fails.
    """
    trt = _import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX graph not found: {onnx_path}")
    if workspace_gb <= 0:
        raise ValueError(f"workspace_gb must be > 0, got {workspace_gb}")
    if fp8 and not _has_float8_qdq(onnx_path):
        raise ValueError(
            f"fp8=True but {onnx_path.name} has no float8 Q/DQ: quantize it first "
            "(quantize_bundle_graph(..., mode='fp8')); a strongly typed engine takes precision from the graph"
        )
    shapes = profile_shapes(onnx_path, min_batch, opt_batch, max_batch, seq_len, other_dims=other_dims)

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TensorRTBuildError(f"TensorRT could not parse {onnx_path}:\n  " + "\n  ".join(errors or ["(no message)"]))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name in shapes:
            lo, opt, hi = shapes[tensor.name]
            profile.set_shape(tensor.name, lo, opt, hi)
        elif any(d < 0 for d in tensor.shape):
            raise TensorRTBuildError(f"input {tensor.name!r} has dynamic shape {tuple(tensor.shape)} but no profile")
    config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    return engine_path


__all__ = ["TensorRTBuildError", "TensorRTNotInstalledError", "build_engine", "profile_shapes"]
