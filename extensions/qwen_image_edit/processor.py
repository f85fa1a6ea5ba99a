"""The Qwen2-VL processor without its video half, loadable where torchvision is missing.

transformers 5.23 makes Qwen2VLProcessor require a video processor, and Qwen2VLVideoProcessor needs torchvision,
which does not import beside the CPU torch we use. The edit pipelines only ever pass images, so the video processor
is left out; with torchvision installed the folder still loads with the plain Qwen2VLProcessor.
"""

from __future__ import annotations

from typing import Any

from transformers import Qwen2Tokenizer, Qwen2VLImageProcessorPil, Qwen2VLProcessor

PROCESSOR_FOLDER = "processor"


class ImagesOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor whose video_processor may be None (images and text only)."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)

    def save_pretrained(self, save_directory: Any, **kwargs: Any) -> list[str]:
        """The tokenizer and image processor files, as the real processor/ folder holds them (no video config)."""
        files = list(self.tokenizer.save_pretrained(save_directory))
        files += self.image_processor.save_pretrained(save_directory)
        return files


def images_only_processor(tokenizer: Any, image_processor: Any = None) -> ImagesOnlyQwen2VLProcessor:
    return ImagesOnlyQwen2VLProcessor(image_processor=image_processor or Qwen2VLImageProcessorPil(),
                                      tokenizer=tokenizer, video_processor=None)


def load_processor(source: str) -> ImagesOnlyQwen2VLProcessor:
    """The processor of a Qwen-Image-Edit folder or Hub id: its tokenizer and (PIL) image processor."""
    return images_only_processor(Qwen2Tokenizer.from_pretrained(source, subfolder=PROCESSOR_FOLDER),
                                 Qwen2VLImageProcessorPil.from_pretrained(source, subfolder=PROCESSOR_FOLDER))
