"""Qwen-Image-Edit-Plus (2509 / 2511; several control images) and Qwen-Image-Edit (one): each control image is seen
by Qwen2.5-VL inside the prompt and as VAE reference tokens. Importing the package registers both architectures."""

from extensions.qwen_image_edit.model import QwenImageEdit, QwenImageEditPlus
from extensions.qwen_image_edit.generate import QwenEditRenderer  # registers the renderer of both

__all__ = ["QwenEditRenderer", "QwenImageEdit", "QwenImageEditPlus"]
