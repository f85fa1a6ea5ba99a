"""FLUX.2 inference with named LoRA adapters, for `generate` and `compare`: the shared SamplerRenderer (our sampler,
several --ctrl_img, diffusers or BFL/ComfyUI LoRA files through extensions/flux2/lora_keys.py)."""

from __future__ import annotations

from extensions.flux2.model import Flux2Dev, Flux2Klein, Flux2Klein9B
from toolkit.render.inference import register_renderer
from toolkit.render.sampler_renderer import SamplerRenderer


class Flux2Renderer(SamplerRenderer):
    """FLUX.2 [klein] / [dev] with named adapters; text-to-image when a request has no control image."""


for _arch in (Flux2Klein, Flux2Klein9B, Flux2Dev):
    register_renderer(_arch.name)(Flux2Renderer)
