"""Does a reasoning teacher look at the image? Prints, for each saved teacher directory:

- greedy reasoning that matches the scene's written facts exactly, per dimension, on training images
  (the cold-start stream of ``reproduce`` seed 0) and on fresh ones;
- the teacher-forced argmax accuracy of the digit tokens of the realism and aesthetics reasonings
  (the noise, composition and contrast levels: the tokens that need the image);
- the share of reasoning tokens whose prediction changes when the image is blanked;
- the image-token features: mean norm, and the norm of the part every image shares.

Usage: python bench/teacher_perception.py TEACHER_DIR [TEACHER_DIR ...] [--images N]
(the numbers of README's "Why the teacher did not perceive"; 2 torch threads, about 1 minute a model).
"""
from __future__ import annotations

import argparse
import os

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from zreward_fast import ZRewardModel  # noqa: E402
from zreward_fast.training.synthetic import DIMENSIONS, samples  # noqa: E402
from zreward_fast.training.teacher import (  # noqa: E402
    default_engine, forced_batch, forward_hidden, prompt_inputs, reasoning_slices,
)

TRAIN_SEED, FRESH_SEED = 1, 123457  # reproduce's cold-start stream at seed 0 (seed * 7 + 1); an unused one
DIGITS = {str(k) for k in range(10)}


@torch.no_grad()
def exact_reasoning(rm: ZRewardModel, sams: list, dimension: str) -> float:
    """Share of images whose greedy reasoning is the scene's written facts, to the character."""
    tok = rm.processor.tokenizer
    inputs, _ = prompt_inputs(rm, [s.image for s in sams], [s.prompt for s in sams], [dimension] * len(sams))
    rows = default_engine(rm, 72, do_sample=False).generate(rm.model, inputs, 1)
    texts = [tok.decode(list(r[0])).replace("<|im_end|>", "").strip() for r in rows]
    return sum(t == s.scene.reasoning(dimension) for t, s in zip(texts, sams)) / len(sams)


@torch.no_grad()
def forced(rm: ZRewardModel, sams: list, dimension: str) -> tuple[float, float]:
    """(digit-token argmax accuracy with the true reasoning forced in, share of reasoning-token
    predictions a blank image changes)."""
    p = rm.processor
    batch = forced_batch(rm, [s.image for s in sams], [s.prompt for s in sams], [dimension] * len(sams),
                         [s.scene.reasoning(dimension) for s in sams])
    h, tokens, mask = reasoning_slices(forward_hidden(rm.model, batch), batch)
    pred = rm.lm_head(h).argmax(-1)
    is_digit = torch.tensor([[p.tokenizer.decode([int(t)]) in DIGITS for t in row] for row in tokens]) & mask.bool()
    digit_acc = float((pred == tokens)[is_digit].float().mean()) if is_digit.any() else float("nan")
    batch.inputs["pixel_values"] = torch.zeros_like(batch.inputs["pixel_values"])
    pred_blank = rm.lm_head(reasoning_slices(forward_hidden(rm.model, batch), batch)[0]).argmax(-1)
    return digit_acc, float((pred_blank != pred)[mask.bool()].float().mean())


@torch.no_grad()
def image_features(rm: ZRewardModel, sams: list) -> tuple[float, float]:
    """(mean norm of the image tokens, norm of their mean over every image and token)."""
    inputs, _ = prompt_inputs(rm, [s.image for s in sams], [s.prompt for s in sams], ["realism"] * len(sams))
    out = rm.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    e = getattr(out, "pooler_output", out)
    e = torch.cat(list(e)) if isinstance(e, (tuple, list)) else e
    return float(e.norm(dim=-1).mean()), float(e.mean(0).norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teachers", nargs="+")
    ap.add_argument("--images", type=int, default=24)
    args = ap.parse_args()
    torch.set_num_threads(2)
    train = list(samples(args.images, seed=TRAIN_SEED, size=128))
    fresh = list(samples(args.images, seed=FRESH_SEED, size=128))
    for path in args.teachers:
        rm = ZRewardModel.from_pretrained(path).eval()
        print(f"== {path}")
        for name, sams in (("training", train), ("fresh", fresh)):
            exact = {d: round(exact_reasoning(rm, sams, d), 2) for d in DIMENSIONS}
            print(f"greedy reasoning exact, {name} images ({len(sams)}): {exact}")
        for d in ("realism", "aesthetics"):
            acc, blank = forced(rm, train, d)
            print(f"{d}: digit tokens teacher-forced accuracy {acc:.2f}; a blank image changes {blank:.0%} of the predictions")
        norm, common = image_features(rm, train)
        print(f"image tokens: mean norm {norm:.2f}, shared part {common:.2f} ({common / norm:.0%})")


if __name__ == "__main__":
    main()
