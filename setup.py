"""zreward-fast: the fast path for Z-Reward-style multi-dimensional reward models."""
from setuptools import find_packages, setup

CORE = [
    # torch itself is installed first, pinned, by the Makefile and CI (torch==2.13.0, a CPU
    # build on the dev machines); a range here would pull a CUDA build where none is installed.
    "torch>=2.6",
    "transformers>=5.5,<6",
    "tokenizers>=0.21",
    "safetensors>=0.4",
    "numpy>=1.26",
    "pillow>=10.0",
    "tqdm>=4.66",
]

MODELOPT = ["nvidia-modelopt>=0.40", "onnx-graphsurgeon>=0.5", "onnxslim>=0.1.70", "polygraphy>=0.49",
            "onnxconverter-common>=1.14", "lief>=0.14", "cppimport>=22.8"]
EXTRAS = {
    # Triton runs the fused kernels (on CPU through TRITON_INTERPRET=1); without it the
    # torch reference is used.
    "kernels": ["triton>=3.2"],
    "train": ["triton>=3.2", "accelerate>=1.0", "scipy>=1.11", "pyyaml>=6.0"],
    "export": ["onnx>=1.17", "onnxruntime>=1.22", "onnxscript>=0.2"],
    "serve": ["onnxruntime>=1.22", "tokenizers>=0.21", "fastapi>=0.110", "uvicorn>=0.29",
              "prometheus-client>=0.20", "httpx>=0.27"],
    "ray": ["ray[serve]>=2.30", "pandas>=2.0"],  # Ray Data needs pandas
    "openvino": ["openvino>=2025.0"],  # Scorer(backend="openvino")
    # NVIDIA ModelOpt's ONNX PTQ (export --tool modelopt: int8-static and fp8 QDQ for TensorRT): the
    # package without its [onnx] extra, which would pull onnxruntime-gpu and cupy, plus the ONNX
    # tools its quantizer imports
    "modelopt": MODELOPT,
    "data": ["pyarrow>=14"],  # Parquet manifests, tables and score outputs
    "bench": ["matplotlib>=3.8", "liger-kernel>=0.5"],
    "dev": ["pytest>=8.0", "triton>=3.2", "matplotlib>=3.8", "accelerate>=1.0", "scipy>=1.11", "pyyaml>=6.0",
            "onnx>=1.17", "onnxruntime>=1.22", "onnxscript>=0.2", "fastapi>=0.110", "uvicorn>=0.29",
            "prometheus-client>=0.20", "httpx>=0.27", "ray[serve]>=2.30", "pyarrow>=14", "pandas>=2.0",
            "openvino>=2025.0", *MODELOPT],
}
EXTRAS["all"] = sorted({dep for deps in EXTRAS.values() for dep in deps})

setup(
    name="zreward-fast",
    version="0.1.0",
    description="Fused kernels, export and a torch-free runtime for Z-Reward-style reward models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["zreward_fast", "zreward_fast.*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["zreward-fast=zreward_fast.cli:main"]},
)
