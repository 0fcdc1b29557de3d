"""The Qwen3.5 student's math, written once for every path that re-implements it outside
transformers: the ONNX export (``export/``) and the GPU engine (``engine/``) build on these modules
with their own back ends (masked matmul attention and decomposed or contrib Gated DeltaNet for the
graphs; SDPA and flash-linear-attention for the engine)."""
