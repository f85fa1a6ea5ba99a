"""A LoraRenderer for architectures that render through their own `sample()` (several `--ctrl_img`), with LoRA
files in the diffusers layout or in ComfyUI/kohya's (`lora_unet_*`, converted back with the architecture's
registered conventions)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from PIL import Image

from toolkit.adapters.lora_convert import detect_format, get_conventions, peft_metadata, read_lora, to_diffusers
from toolkit.arch import Architecture, get_architecture
from toolkit.errors import UserError
from toolkit.render.inference import LoraRenderer
from toolkit.render.sampling import SampleRequest, load_controls

__all__ = ["SamplerRenderer"]

log = logging.getLogger(__name__)


class SamplerRenderer(LoraRenderer):
    """Base model plus named peft adapters on model.transformer; images come from the architecture's sampler."""

    def __init__(self, model: Architecture) -> None:
        self.model = model
        self.adapters: list[str] = []

    @classmethod
    def load(cls, model_cfg: Any, device: torch.device, dtype: torch.dtype) -> "SamplerRenderer":
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
    def render(self, requests: Sequence[SampleRequest], controls: Sequence[Optional[Image.Image]]
               ) -> list[Image.Image]:
        # `controls` holds each request's first control image (None: no control); further --ctrl_img files are
        # loaded here.
        return self.model.sample(requests, [[] if c is None else [c, *load_controls(r)[1:]]
                                            for r, c in zip(requests, controls)])
