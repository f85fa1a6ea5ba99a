"""Qwen-Image-Edit inference with named LoRA adapters, for `generate` and `compare`: the shared SamplerRenderer (our
sampler, the pipeline's loop with several --ctrl_img; diffusers or ComfyUI/kohya LoRA files)."""

from __future__ import annotations

from extensions.qwen_image_edit.model import QwenImageEdit, QwenImageEditPlus
from toolkit.render.inference import register_renderer
from toolkit.render.sampler_renderer import SamplerRenderer


class QwenEditRenderer(SamplerRenderer):
    """Qwen-Image-Edit(-Plus) with named adapters."""


register_renderer(QwenImageEditPlus.name)(QwenEditRenderer)
register_renderer(QwenImageEdit.name)(QwenEditRenderer)
