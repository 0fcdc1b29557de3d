"""The TensorRT helpers that run without TensorRT: optimisation profiles from a graph's symbolic
dimensions, and the clear error when TensorRT is absent (export/tensorrt.py)."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from onnx_graphs import HAVE_ONNX, PATCH, export_graph, needs_onnx

nn = torch.nn
if HAVE_ONNX:
    from zreward_fast.export import tensorrt as ztrt

class DecoderLike(nn.Module):
    """Inputs shaped like decoder.onnx: [B, L] ids, [3, B, L] positions, [B, N, H] features, [B, D] queries."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 16)

    def forward(self, input_ids, position_ids, image_features, query_positions):
        h = self.embed(input_ids) + position_ids.sum(0, keepdim=False).unsqueeze(-1).float()
        h = self.fc(h) + image_features.mean(1, keepdim=True)
        return torch.gather(h.sum(-1), 1, query_positions)


@pytest.fixture(scope="module")
def decoder_like(tmp_path_factory):
    d = tmp_path_factory.mktemp("trt")
    args = (torch.randint(0, 50, (2, 7)), torch.randint(0, 7, (3, 2, 7)), torch.randn(2, 4, 16),
            torch.tensor([[5, 6], [5, 6]]))
    names = ("input_ids", "position_ids", "image_features", "query_positions")
    axes = {"input_ids": {0: "batch", 1: "seq"}, "position_ids": {1: "batch", 2: "seq"},
            # as the dynamo exporter may do: the batch under another symbol in one input
            "image_features": {0: "s28"}, "query_positions": {0: "batch", 1: "queries"}}
    return export_graph(DecoderLike(), args, d / "decoder.onnx", False, names=names, dyn_axes=axes)


@needs_onnx
def test_profile_shapes(decoder_like):
    shapes = ztrt.profile_shapes(decoder_like, 1, 4, 16, seq_len=(8, 64, 256), other_dims={"queries": (1, 4, 4)})
    assert shapes == {
        "input_ids": ((1, 8), (4, 64), (16, 256)),
        "position_ids": ((3, 1, 8), (3, 4, 64), (3, 16, 256)),
        "image_features": ((1, 4, 16), (4, 4, 16), (16, 4, 16)),
        "query_positions": ((1, 1), (4, 4), (16, 4)),
    }
    with pytest.raises(ValueError, match="query_positions:1 \\(queries\\)"):
        ztrt.profile_shapes(decoder_like, seq_len=(8, 64, 256))
    with pytest.raises(ValueError, match="seq_len"):
        ztrt.profile_shapes(decoder_like, other_dims={"query_positions:1": (1, 4, 4)})
    with pytest.raises(ValueError, match="min <= opt <= max"):
        ztrt.profile_shapes(decoder_like, 8, 4, 16, seq_len=(8, 64, 256), other_dims={"queries": (1, 4, 4)})


@needs_onnx
def test_profile_shapes_vision_like(mimic_graphs):
    # dynamo-exported graph: symbols come from torch.export.Dim names
    shapes = ztrt.profile_shapes(mimic_graphs[True], 1, 8, 32, seq_len=(16, 256, 1024))
    assert shapes == {"x": ((1, 16, PATCH), (8, 256, PATCH), (32, 1024, PATCH))}


@needs_onnx
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_build_engine_without_tensorrt(mimic_graphs, tmp_path):
    with pytest.raises(ImportError, match="TensorRT is not installed"):
        ztrt.build_engine(mimic_graphs[False], tmp_path / "x.engine", seq_len=(1, 8, 16))
    assert issubclass(ztrt.TensorRTNotInstalledError, ImportError)


@needs_onnx
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs TensorRT (a GPU machine)")
def test_build_engine_with_tensorrt(mimic_graphs, tmp_path):
    import tensorrt as trt

    engine = ztrt.build_engine(mimic_graphs[False], tmp_path / "mimic.engine", 1, 2, 4, seq_len=(1, 8, 16),
                               workspace_gb=1.0)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    assert runtime.deserialize_cuda_engine(engine.read_bytes()) is not None
