"""Qwen-Image-Edit-Plus (2509 / 2511; several control images) and Qwen-Image-Edit (one): each control image is seen
by Qwen2.5-VL inside the prompt and as VAE reference tokens. Importing the package registers both architectures."""

from extensions.qwen_image_edit.model import QwenImageEdit, QwenImageEditPlus
from extensions.qwen_image_edit.generate import QwenEditRenderer  # registers the renderer of both
from extensions.qwen_image_edit.hub_card import QWEN_EDIT_CARD, QWEN_EDIT_PLUS_CARD  # registers the card facts
from extensions.qwen_image_edit.lora_keys import QWEN_MODULES  # registers the ComfyUI LoRA layout of both

__all__ = ["QWEN_EDIT_CARD", "QWEN_EDIT_PLUS_CARD", "QWEN_MODULES", "QwenEditRenderer", "QwenImageEdit",
           "QwenImageEditPlus"]
