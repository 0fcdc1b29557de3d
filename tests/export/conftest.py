"""The Qwen3.5-like graph both exporters write, shared by the quantization and TensorRT tests."""
from __future__ import annotations

import pytest
import torch
from onnx_graphs import PATCH, Mimic, export_graph


@pytest.fixture(scope="module")
def mimic_graphs(tmp_path_factory):
    torch.manual_seed(0)
    m = Mimic()
    x = torch.randn(2, 5, PATCH)
    d = tmp_path_factory.mktemp("mimic")
    b, s = torch.export.Dim("batch"), torch.export.Dim("seq")
    return {
        True: export_graph(m, (x,), d / "dynamo.onnx", True, dyn_axes={"x": {0: b, 1: s}}),
        False: export_graph(m, (x,), d / "torchscript.onnx", False, dyn_axes={"x": {0: "batch", 1: "seq"}}),
    }
