"""OpenVINO as a runtime back end: the bundle's ONNX graphs compiled by OpenVINO's CPU plugin.

:class:`OpenVINOSession` gives a compiled graph the part of onnxruntime's ``InferenceSession``
interface the :class:`~zreward_fast.runtime.Scorer` uses (``run``, ``get_inputs``,
``get_outputs``, ``get_providers``), so preprocessing, the bundle check, the output checks and
the parity gate are the same code for both back ends. OpenVINO reads the ONNX files as they are
(the decomposed Gated DeltaNet is standard ops; ``com.microsoft`` ops such as ``MatMulNBits`` are
read by its ONNX front end where it knows them).

Precision: OpenVINO's CPU plugin computes in bf16 by default on CPUs that have it (AVX512-BF16,
AMX), which moved an untrained 9B-width student's means by up to 0.65 (issue 13). The default here
is ``"f32"``, the precision the bundle's parity report was measured in; ``precision="bf16"`` is
the fast path on such CPUs, and the ``Scorer`` checks it at load against the reference scores the
bundle ships (``Scorer(check_parity=...)``, docs/bundle.md).
"""
from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path
from typing import Any, Sequence

#: OpenVINO ``INFERENCE_PRECISION_HINT`` values :class:`OpenVINOSession` accepts
PRECISIONS = ("f32", "bf16", "f16")


def openvino_available() -> bool:
    """Whether the ``openvino`` package is installed (without importing it)."""
    return importlib.util.find_spec("openvino") is not None


class _Port:
    """A graph input or output as onnxruntime's ``NodeArg`` shows it: ``name`` and ``shape`` (an int
    per fixed axis, a string per dynamic one)."""

    def __init__(self, port: Any) -> None:
        self.name = port.get_any_name()
        self.shape = [d.get_length() if d.is_static else "?" for d in port.get_partial_shape()]


class OpenVINOSession:
    """One ONNX graph compiled by OpenVINO for ``device`` ("CPU"), run like an onnxruntime session.

    ``num_threads`` caps OpenVINO's inference threads in all (its default: all cores). Safe to call
    from several threads: each thread runs its own infer request on the shared compiled model.
    ``streams`` is OpenVINO's ``NUM_STREAMS``: how many infer requests run at once, each on its own
    share of the threads. With one stream (the default) concurrent requests wait for each other;
    ``Scorer(parallel_runs=N)`` asks for N streams, OpenVINO's own way to run parts side by side.
    """

    def __init__(self, path: str | os.PathLike, device: str = "CPU", precision: str = "f32",
                 num_threads: int | None = None, streams: int = 1) -> None:
        try:
            import openvino as ov
        except ImportError as e:
            raise ImportError("the OpenVINO back end needs the openvino package: pip install openvino") from e
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision}
        if num_threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(num_threads)
        if not isinstance(streams, int) or isinstance(streams, bool) or streams < 1:
            raise ValueError(f"streams must be a positive int, got {streams!r}")
        config["NUM_STREAMS"] = streams
        core = ov.Core()
        self.path = Path(path)
        self.device = device
        self.precision, self.streams = precision, streams
        self._compiled = core.compile_model(core.read_model(str(self.path)), device, config)
        self._inputs = [_Port(p) for p in self._compiled.inputs]
        self._outputs = [_Port(p) for p in self._compiled.outputs]
        self._local = threading.local()

    def get_inputs(self) -> list[_Port]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Port]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return [f"OpenVINO:{self.device}:{self.precision}"]

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, Any]) -> list[Any]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        results = request.infer(feeds)
        by_name = {port.get_any_name(): value for port, value in results.items()}
        # copies: the request's output buffers are reused by its next inference
        return [by_name[n].copy() for n in (output_names or [o.name for o in self._outputs])]
