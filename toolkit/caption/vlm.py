"""A vision-language model of transformers (image-text-to-text) asked for one caption at a time.

transformers 5.23 makes the Qwen-VL processors require a video processor, which needs torchvision; it does not
import beside the CPU torch build used here. Captioning passes images only, so when the processor will not load as
it is, it is rebuilt from its tokenizer and (PIL) image processor without the video half.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from PIL import Image

from toolkit.errors import UserError

__all__ = ["VisionLanguageModel", "images_only_processor", "load_image"]

logger = logging.getLogger(__name__)

# Never quantized: the vision tower (small, and sensitive) and the output head.
QUANTIZE_EXCLUDE = ("*visual*", "*vision*", "lm_head")


def images_only_processor(class_name: str, tokenizer: Any, image_processor: Any,
                          chat_template: Optional[str] = None) -> Any:
    """An instance of transformers' processor ``class_name`` whose video processor may be None."""
    import transformers

    base = getattr(transformers, class_name)

    def check_argument_for_proper_class(self: Any, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and argument is None:
            return None
        return base.check_argument_for_proper_class(self, argument_name, argument)

    def save_pretrained(self: Any, save_directory: Any, **kwargs: Any) -> list[str]:
        files = list(self.tokenizer.save_pretrained(save_directory))
        files += self.image_processor.save_pretrained(save_directory)
        if self.chat_template:
            path = Path(save_directory) / "chat_template.jinja"
            path.write_text(self.chat_template, encoding="utf-8")
            files.append(str(path))
        return files

    cls = type(f"ImagesOnly{class_name}", (base,), {"check_argument_for_proper_class": check_argument_for_proper_class,
                                                     "save_pretrained": save_pretrained})
    return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=chat_template)


def _chat_template(source: str) -> Optional[str]:
    """The processor's chat template of a local folder or Hub id (chat_template.jinja, or the older .json)."""
    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
        if path:
            text = Path(path).read_text(encoding="utf-8")
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def _load_processor(source: str) -> Any:
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    try:
        return AutoProcessor.from_pretrained(source)
    except (ImportError, ValueError, TypeError) as exc:  # the video processor's torchvision import, mostly
        logger.debug("AutoProcessor failed for %s (%s); loading images only", source, exc)
    model_type = AutoConfig.from_pretrained(source).model_type
    class_name = PROCESSOR_MAPPING_NAMES.get(model_type)
    if class_name is None:
        raise UserError(f"caption.model_name_or_path: {source} ({model_type}) has no image processor here")
    tokenizer = AutoTokenizer.from_pretrained(source)
    template = _chat_template(source) or tokenizer.chat_template
    return images_only_processor(class_name, tokenizer, AutoImageProcessor.from_pretrained(source, backend="pil"),
                                 chat_template=template)


def load_image(path: Path, max_res: int) -> Image.Image:
    """RGB image, scaled down (aspect kept) to at most max_res * max_res pixels."""
    from PIL import ImageOps

    with Image.open(path) as raw:
        image = ImageOps.exif_transpose(raw).convert("RGB")
    area = image.width * image.height
    if area > max_res * max_res:
        scale = (max_res * max_res / area) ** 0.5
        image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))),
                             Image.Resampling.BICUBIC)
    return image


@dataclass
class VisionLanguageModel:
    """The model and its processor on one device; ``answer`` is greedy, so a caption is reproducible."""

    model: Any
    processor: Any
    device: torch.device

    @classmethod
    def load(cls, source: str, device: torch.device, dtype: torch.dtype, quantize: Optional[str] = None,
             low_vram: bool = False) -> "VisionLanguageModel":
        """``quantize``: a quanto weight type (qfloat8, qint8) for the language part; ``low_vram`` loads and
        quantizes on the CPU before moving to ``device``."""
        from transformers import AutoModelForImageTextToText

        processor = _load_processor(source)
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype)
        model.requires_grad_(False).eval()
        if not low_vram:
            model.to(device)
        if quantize:
            from optimum import quanto

            quanto.quantize(model, weights=getattr(quanto, quantize), exclude=list(QUANTIZE_EXCLUDE))
            quanto.freeze(model)
        return cls(model.to(device), processor, device)

    @torch.no_grad()
    def answer(self, messages: list[dict], images: Sequence[Image.Image], max_new_tokens: int) -> str:
        """The model's reply to one chat turn with ``images`` in placeholder order (special tokens removed)."""
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.processor(text=[text], images=list(images), return_tensors="pt").to(self.device)
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0]
