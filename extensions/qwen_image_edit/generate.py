"""Qwen-Image-Edit(-Plus) inference with named LoRA adapters, for `generate` and `compare`
(toolkit.render.inference.LoraRenderer)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from extensions.qwen_image_edit.model import QwenImageEdit, QwenImageEditPlus
from toolkit.adapters.lora_convert import detect_format, get_conventions, peft_metadata, read_lora, to_diffusers
from toolkit.arch import get_architecture
from toolkit.errors import UserError
from toolkit.render.inference import LoraRenderer, register_renderer
from toolkit.render.sampling import SampleRequest, load_controls

log = logging.getLogger(__name__)


class QwenEditRenderer(LoraRenderer):
    """Base model plus named adapters; images come from our sampler (the pipeline's loop, several controls)."""

    def __init__(self, model: QwenImageEditPlus) -> None:
        self.model = model
        self.adapters: list[str] = []

    @classmethod
    def load(cls, model_cfg: Any, device: torch.device, dtype: torch.dtype) -> "QwenEditRenderer":
        model = get_architecture(model_cfg.arch).load(model_cfg, device, dtype)
        model.transformer.eval()
        return cls(model)

    def add_lora(self, path: Path, name: str) -> None:
        state, header = read_lora(Path(path))
        layout = detect_format(state)
        if layout == "comfy":  # save.format comfy, ComfyUI / kohya files: back to diffusers names, exactly
            state, header = to_diffusers(state, header, get_conventions(self.model.name))
        elif layout != "diffusers":
            raise UserError(f"{path}: not a diffusers (transformer.<module>.lora_A/B) nor a ComfyUI/kohya "
                            f"(lora_unet_*) LoRA file; {self.model.name} loads those two")
        with warnings.catch_warnings():
            # peft warns for every adapter after the first; several named adapters are the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            # The model-level loader works on a quantized transformer too (FACTS.md) and reads alpha != rank.
            self.model.transformer.load_lora_adapter(state, prefix="transformer", adapter_name=name,
                                                     metadata=peft_metadata(header))
        self.adapters.append(name)
        log.info("LoRA %s loaded as %r", path, name)

    @torch.no_grad()
    def render(self, requests: Sequence[SampleRequest], controls: Sequence[Image.Image]) -> list[Image.Image]:
        # `controls` holds each request's first control image; further --ctrl_img files are loaded here.
        return self.model.sample(requests, [[c, *load_controls(r)[1:]] for r, c in zip(requests, controls)])


register_renderer(QwenImageEditPlus.name)(QwenEditRenderer)
register_renderer(QwenImageEdit.name)(QwenEditRenderer)
