"""The model card (``README.md``) every exported bundle carries, hub or not: what the model
scores, on which scale, how it was quantized, how close it stays to the PyTorch model, its
benchmark if it was evaluated, and how to use it."""
from __future__ import annotations

from typing import Any

from ..runtime.bundle import MANIFEST_NAME

CARD_NAME = "README.md"


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def model_card(manifest: dict, model_info: dict[str, Any], benchmark: dict | None = None, name: str = "bundle") -> str:
    """Markdown with hub front matter. ``model_info``: base model, architecture and sizes of the
    exported model; ``benchmark``: an :func:`~zreward_fast.evaluation.evaluate` report, if any."""
    dims = list(manifest.get("dimensions", []))
    levels = manifest.get("scale", {}).get("levels", [])
    quant = manifest.get("quantization", {})
    parity = manifest.get("parity", {})
    overall = parity.get("overall", {})
    base = model_info.get("base_model") or None
    size = manifest.get("image", {}).get("size", "?")
    front = ["---", "library_name: zreward-fast", "pipeline_tag: image-text-to-text",
             "tags: [reward-model, text-to-image, onnx, zreward-fast]"]
    if base:
        front.append(f"base_model: {base}")
    lines = front + ["---", "", f"# {name}: a Z-Reward student bundle", "",
                     "Scores an image against its generation prompt on each dimension, as a distribution over the "
                     "score levels (mean, std and probabilities), in one forward pass of the multi-query student. "
                     "Runs on onnxruntime with no torch (`zreward_fast.runtime.Scorer`).", "",
                     "| | |", "| --- | --- |",
                     f"| dimensions | {', '.join(dims)} |",
                     f"| score levels | {', '.join(_fmt(x) for x in levels)} |",
                     f"| base model | {base or 'not recorded'} |",
                     f"| architecture | {model_info.get('architecture', '?')} |",
                     f"| parameters | {model_info.get('parameters', '?')} |",
                     f"| image bucket | {size} x {size} (any image is resized to it) |",
                     f"| quantization | {quant.get('mode', 'none')} |",
                     f"| Gated DeltaNet form | {manifest.get('gdn', '?')} |",
                     f"| ONNX opset | {manifest.get('opset', '?')} |",
                     f"| written by | {manifest.get('created_by', '?')} |", ""]
    if parity:
        lines += ["## Parity with the PyTorch model", "",
                  f"Measured at export on {parity.get('images', '?')} held-out images "
                  f"({parity.get('held_out', 'synthetic pairs')}):", "",
                  "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in overall.items()]
        failures = parity.get("failures") or []
        lines += ["", f"Thresholds: {parity.get('thresholds', {})}. "
                  + (f"**Missed: {'; '.join(failures)}** (exported with --force)." if failures else "All met."), ""]
    if benchmark:
        from ..evaluation import format_table

        lines += ["## Benchmark", "",
                  f"`zreward_fast.evaluation` on the synthetic benchmark (seed {benchmark.get('seed', '?')}, "
                  f"{benchmark.get('pairs', '?')} pairs, {benchmark.get('conflicts', '?')} conflict pairs; "
                  "docs/evaluation.md of zreward-fast):", "", format_table({name: benchmark}), ""]
    lines += ["## Usage", "", "```python", "from zreward_fast.runtime import Scorer",
              f'scorer = Scorer("{name}")            # verifies every file\'s sha256 against {MANIFEST_NAME}',
              'scores = scorer.score(["image.png"], ["two red squares left of a blue circle"])',
              f'scores[0]["{dims[0] if dims else "realism"}"].mean', "",
              "from zreward_fast.integrations import reward_fn   # for RL trainers",
              f'fn = reward_fn("{name}", risk=0.5)', "```", "", "```bash",
              f"zreward-fast score --bundle {name} --image image.png --prompt \"a red circle\"",
              f"zreward-fast serve --bundle {name} --port 8000", "```", ""]
    return "\n".join(lines)


def model_info(rm: Any) -> dict[str, Any]:
    """Base model, architecture and parameter count of a :class:`~zreward_fast.ZRewardModel`."""
    cfg = rm.model.config
    params = sum({id(p): p.numel() for p in rm.model.parameters()}.values())
    text = getattr(cfg, "text_config", cfg)
    from ..hub import is_repo_id

    name = getattr(cfg, "_name_or_path", "") or ""
    return {"base_model": name if is_repo_id(name) else None,  # a local path says nothing to a reader
            "architecture": f"{(getattr(cfg, 'architectures', None) or [type(rm.model).__name__])[0]} "
                            f"(hidden {getattr(text, 'hidden_size', '?')}, {getattr(text, 'num_hidden_layers', '?')} layers)",
            "parameters": f"{params / 1e6:.1f}M"}
