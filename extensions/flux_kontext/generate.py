"""FLUX Kontext inference with named LoRA adapters, for `generate` and `compare` (toolkit.render.inference.LoraRenderer)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from PIL import Image

from extensions.flux_kontext.lora_keys import FLUX_CONVENTIONS
from extensions.flux_kontext.model import FluxKontext
from toolkit.errors import UserError
from toolkit.render.inference import LoraRenderer, register_renderer
from toolkit.adapters.lora_convert import detect_format, peft_metadata, read_lora, to_diffusers
from toolkit.render.sampling import SampleRequest, load_controls

log = logging.getLogger(__name__)


@register_renderer(FluxKontext.name)
class FluxKontextRenderer(LoraRenderer):
    def __init__(self, model: FluxKontext, quantized: bool) -> None:
        self.model = model
        self.pipe = model.pipe
        self.quantized = quantized
        self.adapters: list[str] = []

    @classmethod
    def load(cls, model_cfg: Any, device: torch.device, dtype: torch.dtype) -> "FluxKontextRenderer":
        model = FluxKontext.load(model_cfg, device, dtype)
        model.transformer.eval()
        return cls(model, quantized=model_cfg.quantize)

    def add_lora(self, path: Path, name: str) -> None:
        with warnings.catch_warnings():
            # peft warns for every adapter after the first; several named adapters are the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            layout = self._load(Path(path), name)
        self.adapters.append(name)
        log.info("LoRA %s loaded as %r (%s layout)", path, name, layout or "other")

    def _load(self, path: Path, name: str) -> Optional[str]:
        state, header = read_lora(path)
        layout = detect_format(state)
        if layout == "diffusers" and not self.quantized:
            # diffusers reads the file's adapter metadata (alpha != rank) itself.
            self.pipe.load_lora_weights(str(path), adapter_name=name)
        elif layout is None and not self.quantized:
            # Layouts we do not convert (XLabs, OneTrainer, ...): diffusers' own converters may know them.
            self.pipe.load_lora_weights(str(path), adapter_name=name)
        elif layout is None:
            raise UserError(f"{path}: LoRA layout not recognised; with a quantized model only diffusers and "
                            "ComfyUI/kohya files load (try without --quantize)")
        else:
            if layout == "comfy":
                state, header = to_diffusers(state, header, FLUX_CONVENTIONS)
            # pipe.load_lora_weights fails on a quantized transformer (FACTS.md); the model-level loader works.
            self.pipe.transformer.load_lora_adapter(state, prefix="transformer", adapter_name=name,
                                                    metadata=peft_metadata(header))
        return layout

    @torch.no_grad()
    def render(self, requests: Sequence[SampleRequest], controls: Sequence[Image.Image]) -> list[Image.Image]:
        if any(r.extra_ctrl_imgs for r in requests):  # several --ctrl_img: the pipeline takes one (multi_control.py)
            return self.model.sample(requests, [[c, *load_controls(r)[1:]] for r, c in zip(requests, controls)])
        first = requests[0]
        # One CPU generator per image: an image depends on its seed only, not on the batch or the device.
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
        # Through the model: the text encoders load on first use, on model.te_device.
        embeds, pooled, _ = self.model.encode_captions([r.prompt for r in requests])
        with self.model.vae_on_device():
            out = self.pipe(image=list(controls), prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                            height=first.height, width=first.width, num_inference_steps=first.steps,
                            guidance_scale=first.guidance_scale,
                            # without max_area the pipeline rescales every request to 1024x1024 pixels
                            max_area=first.width * first.height, generator=generators,
                            max_sequence_length=self.model.max_sequence_length, _auto_resize=False,
                            output_type="pil")
        return list(out.images)
