"""The Qwen2-VL processor without its video half, loadable where torchvision is missing.

transformers 5.23 makes Qwen2VLProcessor require a video processor, and Qwen2VLVideoProcessor needs torchvision,
which does not import beside the CPU torch we use. The edit pipelines only ever pass images, so the video processor
is left out (toolkit.caption.vlm.images_only_processor, shared with the caption job); with torchvision installed the
folder still loads with the plain Qwen2VLProcessor.
"""

from __future__ import annotations

from typing import Any

from transformers import Qwen2Tokenizer, Qwen2VLImageProcessorPil

from toolkit.caption import vlm

PROCESSOR_FOLDER = "processor"


def images_only_processor(tokenizer: Any, image_processor: Any = None) -> Any:
    """A Qwen2VLProcessor without video processor; save_pretrained writes the tokenizer and image processor files,
    as the real processor/ folder holds them."""
    return vlm.images_only_processor("Qwen2VLProcessor", tokenizer, image_processor or Qwen2VLImageProcessorPil())


def load_processor(source: str) -> Any:
    """The processor of a Qwen-Image-Edit folder or Hub id: its tokenizer and (PIL) image processor."""
    return images_only_processor(Qwen2Tokenizer.from_pretrained(source, subfolder=PROCESSOR_FOLDER),
                                 Qwen2VLImageProcessorPil.from_pretrained(source, subfolder=PROCESSOR_FOLDER))
