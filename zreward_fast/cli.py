"""The ``zreward-fast`` command line."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .dimensions import DIMENSIONS


def _print_scores(scores: dict, levels: Sequence[float]) -> None:
    head = "  ".join(f"{x:>5g}" for x in levels)
    print(f"{'dimension':<13} {'mean':>6} {'std':>6}   p({head})")
    for dim, r in scores.items():
        probs = "  ".join(f"{p:5.3f}" for p in r.probs)
        print(f"{dim:<13} {r.mean:6.3f} {r.std:6.3f}   {probs}")


def cmd_score(args: argparse.Namespace) -> int:
    if args.bundle is not None:
        print("error: --bundle needs the ONNX runtime, which is not built yet; use --model DIR", file=sys.stderr)
        return 2
    from .imaging import ImageError, load_image
    from .modeling import ZRewardModel

    try:
        image = load_image(args.image)
    except ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        model = ZRewardModel.from_pretrained(args.model, device=args.device)
        (scores,) = model.score([image], [args.prompt], dimensions=args.dimensions)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"scores": {d: r.to_dict() for d, r in scores.items()}}))
    else:
        _print_scores(scores, model.scale.levels)
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from .modeling import ZRewardModel
    from .testing import tiny_model

    model, processor = tiny_model(seed=args.seed, image_size=args.image_size)
    ZRewardModel(model, processor).save_pretrained(args.out)
    print(f"wrote a tiny random Qwen3.5 reward model to {args.out}")
    return 0


def _load_model(model_dir: str | None, tiny_seed: int):
    from .modeling import ZRewardModel
    from .testing import tiny_model

    if model_dir:
        return ZRewardModel.from_pretrained(model_dir)
    model, processor = tiny_model(seed=tiny_seed)
    return ZRewardModel(model, processor)


def cmd_train(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.algorithm == "risd":
        from .training.risd import RISDConfig as Config, RISDTrainer as Trainer
    else:
        from .training.gdso import GDSOConfig as Config, GDSOTrainer as Trainer
    overrides = {"max_steps": args.max_steps} if args.max_steps is not None else {}
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    try:
        config = Config.from_file(args.config, **overrides)
        trainer = Trainer(_load_model(config.model_dir, config.tiny_seed), config)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.resume_from:
        trainer.load_checkpoint(args.resume_from)
    state = trainer.train()
    out = f"{config.output_dir}/final"
    trainer.save_pretrained(out)
    losses = [h["loss"] for h in state.history if "loss" in h]
    summary = {"steps": state.step, "skipped_batches": state.skipped_batches,
               "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None, "saved": out}
    if trainer.eval_records:
        summary["eval"] = trainer.evaluate()
    if trainer.accelerator.is_main_process:
        print(json.dumps(summary, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zreward-fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="score one image against its prompt on every dimension")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="directory of a saved ZRewardModel (model + processor)")
    src.add_argument("--bundle", help="directory of an exported bundle (ONNX runtime)")
    s.add_argument("--image", required=True, help="image file (PNG, JPEG, WebP, ...)")
    s.add_argument("--prompt", required=True, help="the generation prompt")
    s.add_argument("--dimensions", nargs="+", choices=DIMENSIONS, default=None)
    s.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=cmd_score)

    tr = sub.add_parser("train", help="train a teacher with GDSO or a student with RISD")
    tr.add_argument("algorithm", choices=["gdso", "risd"])
    tr.add_argument("--config", required=True, help="YAML or JSON file of GDSOConfig / RISDConfig fields")
    tr.add_argument("--max-steps", type=int, default=None)
    tr.add_argument("--output-dir", default=None)
    tr.add_argument("--resume-from", default=None, help="a checkpoint directory written by the trainer")
    tr.set_defaults(func=cmd_train)

    t = sub.add_parser("tiny", help="write a tiny random model (for tests and the demo; no download)")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--image-size", type=int, default=64)
    t.set_defaults(func=cmd_tiny)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
