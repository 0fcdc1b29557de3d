"""Prompt formats of the student (one pass, multi-query) and the teacher (reason, then score).

Torch-free: the runtime builds the same text with ``tokenizers`` alone. The templates are plain
``str.format`` strings, stored with the processor and in export bundles, so every side builds
byte-identical prompts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from .dimensions import DIMENSION_DESCRIPTIONS, query_token

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
END_OF_TEXT = "<|endoftext|>"

# The chat-format special tokens a Qwen3.5 tokenizer carries (the tiny tokenizer adds them too).
CHAT_SPECIAL_TOKENS: tuple[str, ...] = (END_OF_TEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

DEFAULT_SYSTEM = "You are a reward model. Rate the generated image against its prompt."

STUDENT_TEMPLATE = (
    "<|im_start|>system\n{system}<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|>{image}<|vision_end|>Prompt: {prompt}<|im_end|>\n"
    "<|im_start|>assistant\n{queries}"
)

TEACHER_TEMPLATE = (
    "<|im_start|>system\n{system}<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|>{image}<|vision_end|>Prompt: {prompt}\n"
    "Rate the image on {description}. Think it through, then give the score.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@dataclass(frozen=True)
class PromptFormat:
    """The text around the image, the prompt and the query tokens."""

    system: str = DEFAULT_SYSTEM
    student: str = STUDENT_TEMPLATE
    teacher: str = TEACHER_TEMPLATE

    def __post_init__(self) -> None:
        for field, needed in (("student", ("{image}", "{prompt}", "{queries}")), ("teacher", ("{image}", "{prompt}"))):
            text = getattr(self, field)
            missing = [n for n in needed if n not in text]
            if missing:
                raise ValueError(f"PromptFormat.{field} lacks the placeholders {missing}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PromptFormat":
        unknown = set(d) - {"system", "student", "teacher"}
        if unknown:
            raise ValueError(f"unknown PromptFormat fields {sorted(unknown)}")
        return cls(**d)


def check_prompt(prompt: str, max_chars: int | None = None) -> str:
    """A user prompt must be text and must not smuggle in special tokens."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if max_chars is not None and len(prompt) > max_chars:
        raise ValueError(f"prompt is {len(prompt)} characters; the limit is {max_chars}")
    if "<|" in prompt and "|>" in prompt:
        raise ValueError("prompt contains special-token markup ('<|...|>'), which is not allowed in a prompt")
    return prompt


def image_placeholder(num_image_tokens: int) -> str:
    return IMAGE_PAD * num_image_tokens


def student_text(
    prompt: str, dimensions: Sequence[str], num_image_tokens: int, fmt: PromptFormat = PromptFormat()
) -> str:
    """The student's one-pass prompt: the image, the prompt, then one query token per dimension."""
    queries = "".join(query_token(d) for d in dimensions)
    return fmt.student.format(
        system=fmt.system, image=image_placeholder(num_image_tokens), prompt=prompt, queries=queries
    )


def teacher_text(prompt: str, dimension: str, num_image_tokens: int, fmt: PromptFormat = PromptFormat()) -> str:
    """The teacher's prompt for one dimension; the reasoning is generated after it."""
    return fmt.teacher.format(
        system=fmt.system,
        image=image_placeholder(num_image_tokens),
        prompt=prompt,
        description=DIMENSION_DESCRIPTIONS[dimension],
    )


def teacher_scoring_suffix(reasoning: str, dimension: str) -> str:
    """After the generated reasoning, the dimension's query token, where the score is read."""
    return f"{reasoning}\nScore: {query_token(dimension)}"


def student_query_positions(rows: Sequence[Sequence[int]], dimensions: Sequence[str], query_token_ids: dict[str, int],
                            image_token_id: int, num_image_tokens: int, first_index: int = 0) -> list[list[int]]:
    """Token ids of tokenized student prompts -> each row's query position per dimension.

    The one check of a student sequence, shared by the processor, the runtime and the engine: the
    bucket's number of image tokens and exactly one query token per dimension. Errors name the
    prompt (rows count from ``first_index``)."""
    out = []
    for i, row in enumerate(rows, first_index):
        n_img = sum(1 for t in row if t == image_token_id)
        if n_img != num_image_tokens:
            raise ValueError(f"prompt {i}: {n_img} image tokens in the text; the bucket needs {num_image_tokens}")
        positions = []
        for d in dimensions:
            hits = [j for j, t in enumerate(row) if t == query_token_ids[d]]
            if len(hits) != 1:
                raise ValueError(f"prompt {i}: expected one {query_token(d)} token, found {len(hits)}")
            positions.append(hits[0])
        out.append(positions)
    return out
