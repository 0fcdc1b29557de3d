"""Small torch modules named like Qwen3.5's (GDN layers, MLP, norms, patch embedding, score head)
and their ONNX export with either exporter: the graphs the quantization and TensorRT tests read."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

nn = torch.nn
HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript"))
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="needs onnx, onnxruntime and onnxscript (the export extra)")

H, PATCH = 128, 48


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class GDN(nn.Module):
    """Projections named as in Qwen3.5's Gated DeltaNet; gates 48 wide so that only names exclude them."""

    def __init__(self, h, heads=48):
        super().__init__()
        self.in_proj_qkv = nn.Linear(h, 3 * h, bias=False)
        self.in_proj_z = nn.Linear(h, h, bias=False)
        self.in_proj_a = nn.Linear(h, heads, bias=False)
        self.in_proj_b = nn.Linear(h, heads, bias=False)
        self.A_log = nn.Parameter(torch.zeros(heads))
        self.dt_bias = nn.Parameter(torch.ones(heads))
        self.norm = RMSNorm(h)
        self.out_proj = nn.Linear(h, h, bias=False)

    def forward(self, x):
        q, k, v = self.in_proj_qkv(x).chunk(3, -1)
        g = -self.A_log.exp() * nn.functional.softplus(self.in_proj_a(x) + self.dt_bias)
        beta = torch.sigmoid(self.in_proj_b(x))
        state = (q * k).sum(-1, keepdim=True)  # stands in for the recurrence
        o = self.norm(v * torch.tanh(state)) * nn.functional.silu(self.in_proj_z(x))
        return self.out_proj(o) + (g * beta).mean(-1, keepdim=True)


class MLP(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.gate_proj = nn.Linear(h, 2 * h, bias=False)
        self.up_proj = nn.Linear(h, 2 * h, bias=False)
        self.down_proj = nn.Linear(2 * h, h, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.input_layernorm = RMSNorm(h)
        self.linear_attn = GDN(h)
        self.post_attention_layernorm = RMSNorm(h)
        self.mlp = MLP(h)

    def forward(self, x):
        x = x + self.linear_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class PatchEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(PATCH, H)

    def forward(self, x):
        return self.proj(x)


class Mimic(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = PatchEmbed()
        self.layers = nn.ModuleList([Layer(H), Layer(H)])
        self.norm = RMSNorm(H)
        self.score = nn.Linear(H, 9, bias=False)

    def forward(self, x):
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return torch.log_softmax(self.score(self.norm(x)), -1)


def export_graph(module, args, path: Path, dynamo: bool, names=("x",), dyn_axes=None, **kw) -> Path:
    import warnings

    module = module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(module, args, str(path), dynamo=True, input_names=list(names), opset_version=18,
                              dynamic_shapes=dyn_axes, verbose=False, **kw)
        else:
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=list(names), opset_version=18,
                              dynamic_axes=dyn_axes, **kw)
    return path
