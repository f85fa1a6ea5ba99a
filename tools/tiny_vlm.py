"""Build a random-weight vision-language model folder offline for the caption job's tests and tiny example:
`python -m tools.tiny_vlm --out models/tiny-qwen-vl`.

A tiny Qwen2_5_VLForConditionalGeneration (the same text and vision shapes and the same offline byte-level BPE
tokenizer as the tiny Qwen-Image-Edit text encoder, tools/tiny_qwen.py) saved with its processor and a ChatML chat
template of our own that places each image as `<|vision_start|><|image_pad|><|vision_end|>`, as Qwen-VL models do.
Its captions are nonsense: it exists to run the caption job's plumbing end to end on a CPU.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from tools.tiny_common import install_atomically

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER_NAME = "tiny_vlm_build.json"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _write(workdir: Path, seed: int) -> None:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from toolkit.caption.vlm import images_only_processor
    from tools.tiny_qwen import _text_encoder_config, build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(_text_encoder_config(tokenizer)).eval()
    model.generation_config.do_sample = False
    model.save_pretrained(workdir, safe_serialization=True)
    processor = images_only_processor("Qwen2_5_VLProcessor", tokenizer, Qwen2VLImageProcessorPil(),
                                      chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(workdir)


def build_tiny_vlm(out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Build (or reuse) the tiny random VL model folder; returns its absolute path."""
    marker = {"format_version": FORMAT_VERSION, "seed": seed}
    return install_atomically(out_dir, MARKER_NAME, marker, overwrite, lambda tmp: _write(tmp, seed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a random-weight Qwen2.5-VL folder offline (caption tests).")
    parser.add_argument("--out", required=True, type=Path, help="folder to write (created atomically)")
    parser.add_argument("--seed", default=0, type=int, help="weight seed; same seed gives identical files")
    parser.add_argument("--overwrite", action="store_true", help="replace whatever is at --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logger.info("tiny vision-language model ready at %s", build_tiny_vlm(args.out, args.seed, args.overwrite))


if __name__ == "__main__":
    main()
