"""Qwen-Image-Edit-Plus (2509 / 2511): several control images, seen by Qwen2.5-VL and as VAE reference tokens."""

from extensions.qwen_image_edit.model import QwenImageEditPlus

__all__ = ["QwenImageEditPlus"]
