"""What the vision-language model is shown, and how its answer becomes one caption line.

With pairs the model sees every control image, then the target, each introduced by a short label, then the
instruction; the images are handed to the processor in that same order (``images_in_order``).
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

__all__ = ["build_messages", "clean_caption", "images_in_order"]

_THINKING = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
# A line that only announces the answer ("Sure, here is the instruction:") or a label before it ("Instruction: ...").
_PREAMBLE = re.compile(r"^(sure|certainly|of course|okay|ok|here('s| is| are))\b[^:\n]*:\s*", re.IGNORECASE)
_LABEL = re.compile(r"^(edit(ing)? instruction|instruction|caption|description|answer|prompt)\s*[:\-]\s*",
                    re.IGNORECASE)
_LIST_MARK = re.compile(r"^(\s*([-*\u2022]|\d+[.)])\s+)")
_QUOTES = "\"'\u201c\u201d\u2018\u2019`"


def _label(index: int, count: int) -> str:
    return "Original image:" if count == 1 else f"Input image {index + 1}:"


def build_messages(num_controls: int, prompt: str) -> list[dict[str, Any]]:
    """One user turn in the chat format of transformers' processors: each control image (labelled), the target
    (labelled "Edited image"), then ``prompt``. Without controls: the image, then ``prompt``."""
    content: list[dict[str, Any]] = []
    for index in range(num_controls):
        content += [{"type": "text", "text": _label(index, num_controls)}, {"type": "image"}]
    if num_controls:
        content.append({"type": "text", "text": "Edited image:"})
    content += [{"type": "image"}, {"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


def images_in_order(controls: Sequence[Any], image: Any) -> list[Any]:
    """The images in the order their placeholders appear in ``build_messages``: controls, then the image."""
    return [*controls, image]


def clean_caption(text: str, trigger_word: Optional[str] = None) -> str:
    """One caption line from a model's answer: thinking blocks, announcements ("Sure, here is..."), labels
    ("Instruction:"), list marks, markdown emphasis and surrounding quotes removed; the first line with text kept;
    whitespace collapsed; ``trigger_word`` put in front. Empty when the answer has no text."""
    text = _THINKING.sub("", text)
    lines = [line.strip() for line in text.splitlines()]
    lines = [_PREAMBLE.sub("", line).strip() for line in lines]
    line = next((line for line in lines if line.strip(_QUOTES + "*_#: ")), "")
    line = _LIST_MARK.sub("", line)
    line = _LABEL.sub("", line).replace("**", "").replace("__", "").strip()
    while len(line) >= 2 and line[0] in _QUOTES and line[-1] in _QUOTES:
        line = line[1:-1].strip()
    line = " ".join(line.split())
    if line and trigger_word and not line.startswith(trigger_word):
        line = f"{trigger_word} {line}"
    return line
