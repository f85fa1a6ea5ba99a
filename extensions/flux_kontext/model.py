"""FLUX.1 Kontext behind toolkit.arch.Architecture: diffusers components, the Kontext training forward, sampling."""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from toolkit import kontext
from toolkit.arch import Architecture, register_architecture
from toolkit.sampling import SampleRequest

log = logging.getLogger(__name__)

# Attention and MLP linears of both block kinds; not the embedders nor the final projection (top-level proj_out).
LORA_TARGETS = (r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj"
                r"|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|proj_mlp|proj_out)")
# Layers kept in full precision when the base is quantized (small, and errors there hurt most).
QUANTIZE_EXCLUDE = ["proj_out", "x_embedder", "context_embedder", "norm_out.linear"]
TEXT_CACHE_ENTRIES = 128  # in-memory caption embeddings; T5 at 512 tokens x 4096 x bf16 is 4 MiB each
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class EncodedBatch:
    """Frozen-encoder outputs for one micro-batch: packed latents and text embeddings."""

    x0: torch.Tensor  # (B, N, 64) packed target latents
    control: torch.Tensor  # (B, M, 64) packed control latents
    target_hw: tuple[int, int]  # latent grid of the target
    control_hw: tuple[int, int]
    prompt_embeds: torch.Tensor  # (B, L, D) T5
    pooled: torch.Tensor  # (B, P) CLIP
    text_ids: torch.Tensor  # (L, 3) zeros


class KontextDenoiser(torch.nn.Module):
    """transformer([x_t ; control]) sliced to the target tokens. The module DDP wraps: call it, not the transformer."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, control_tokens, encoder_hidden_states, pooled_projections, timestep, guidance,
                img_ids, txt_ids):
        n_target = hidden_states.shape[1]
        out = self.transformer(hidden_states=torch.cat([hidden_states, control_tokens], dim=1),
                               encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                               timestep=timestep, guidance=guidance, img_ids=img_ids, txt_ids=txt_ids,
                               return_dict=False)[0]
        return out[:, :n_target]


@register_architecture
class FluxKontext(Architecture):
    name = "flux_kontext"
    default_lora_targets = LORA_TARGETS

    def __init__(self, pipe: FluxKontextPipeline, model_cfg: Any, device: torch.device, dtype: torch.dtype):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.device, self.dtype = device, dtype
        self.source = model_cfg.name_or_path
        self.max_sequence_length = model_cfg.max_sequence_length
        self._denoiser = KontextDenoiser(self.transformer)
        self._text_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        pipe.set_progress_bar_config(disable=True)

    # -- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def check_source(cls, name_or_path: str) -> list[str]:
        path = Path(name_or_path).expanduser()
        if path.exists():
            if not (path / "model_index.json").is_file():
                return [f"model.name_or_path: {path} is not a diffusers FLUX Kontext folder (no model_index.json)"]
            return []
        if not _HUB_ID.match(name_or_path):
            return [f"model.name_or_path: {name_or_path} is neither an existing folder nor a Hub id (org/name)"]
        return []

    @classmethod
    def load(cls, model_cfg: Any, device: torch.device, dtype: torch.dtype) -> "FluxKontext":
        log.info("loading %s (%s) on %s", model_cfg.name_or_path, dtype, device)
        # HF_TOKEN is read from the environment by huggingface_hub; it is never passed through our logs or config.
        local = Path(model_cfg.name_or_path).expanduser()
        source = str(local) if local.exists() else model_cfg.name_or_path
        pipe = FluxKontextPipeline.from_pretrained(source, dtype=dtype)
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            module.requires_grad_(False)
            module.eval()
        if model_cfg.quantize:
            _quantize_transformer(pipe.transformer)
        pipe.to(device)
        return cls(pipe, model_cfg, device, dtype)

    # -- training ---------------------------------------------------------------------------------------------
    def denoiser(self) -> torch.nn.Module:
        return self._denoiser

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled VAE latents, using the posterior mean as the Kontext pipeline does."""
        latents = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mode()
        return (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_captions(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """T5 sequence + CLIP pooled embeddings; each distinct caption is encoded once (bounded LRU cache)."""
        missing = sorted({c for c in captions if c not in self._text_cache})
        if missing:
            embeds, pooled, _ = self.pipe.encode_prompt(prompt=missing, prompt_2=None, device=self.device,
                                                        num_images_per_prompt=1,
                                                        max_sequence_length=self.max_sequence_length)
            for i, caption in enumerate(missing):
                self._text_cache[caption] = (embeds[i], pooled[i])
        for caption in captions:
            self._text_cache.move_to_end(caption)
        rows = [self._text_cache[c] for c in captions]
        while len(self._text_cache) > TEXT_CACHE_ENTRIES:
            self._text_cache.popitem(last=False)
        embeds = torch.stack([r[0] for r in rows])
        text_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=embeds.dtype)
        return embeds, torch.stack([r[1] for r in rows]), text_ids

    def encode_batch(self, batch: dict) -> EncodedBatch:
        target = self.encode_images(batch["target"])
        control = self.encode_images(batch["control"])
        embeds, pooled, text_ids = self.encode_captions(batch["caption"])
        return EncodedBatch(x0=kontext.pack_latents(target).to(self.dtype),
                            control=kontext.pack_latents(control).to(self.dtype),
                            target_hw=tuple(target.shape[-2:]), control_hw=tuple(control.shape[-2:]),
                            prompt_embeds=embeds.to(self.dtype), pooled=pooled.to(self.dtype), text_ids=text_ids)

    def clean_latents(self, encoded: EncodedBatch) -> torch.Tensor:
        return encoded.x0

    def make_inputs(self, encoded: EncodedBatch, noise: torch.Tensor, t: torch.Tensor, guidance: float
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        b = encoded.x0.shape[0]
        noise = noise.to(self.device, encoded.x0.dtype)
        inputs = {
            "hidden_states": kontext.noisy_latents(encoded.x0, noise, t.to(self.device)),
            "control_tokens": encoded.control,
            "encoder_hidden_states": encoded.prompt_embeds,
            "pooled_projections": encoded.pooled,
            "timestep": t.to(self.device, self.dtype),
            "guidance": torch.full((b,), float(guidance), device=self.device, dtype=torch.float32)
            if self.transformer.config.guidance_embeds else None,
            "img_ids": kontext.kontext_position_ids(encoded.target_hw, encoded.control_hw, self.device),
            "txt_ids": encoded.text_ids,
        }
        return inputs, kontext.flow_target(encoded.x0, noise)

    # -- sampling ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, requests: Sequence[SampleRequest], controls: Sequence[Image.Image]) -> list[Image.Image]:
        was_training = self.transformer.training
        self.transformer.eval()
        try:
            return [self._render(r, c) for r, c in zip(requests, controls)]
        finally:
            self.transformer.train(was_training)

    def _render(self, request: SampleRequest, control: Image.Image) -> Image.Image:
        generator = torch.Generator("cpu").manual_seed(request.seed)  # CPU noise: same image on any device
        out = self.pipe(image=control, prompt=request.prompt, height=request.height, width=request.width,
                        num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                        # without max_area the pipeline rescales every request to 1024x1024 pixels
                        max_area=request.width * request.height, generator=generator,
                        max_sequence_length=self.max_sequence_length,
                        _auto_resize=False, output_type="pil")
        return out.images[0]


def _quantize_transformer(transformer: torch.nn.Module, qtype: str = "qfloat8") -> None:
    """8-bit frozen base weights with optimum-quanto; LoRA is added on top later, never fused in."""
    from optimum import quanto

    quanto.quantize(transformer, weights=getattr(quanto, qtype), exclude=QUANTIZE_EXCLUDE)
    quanto.freeze(transformer)
    transformer.requires_grad_(False)  # freeze() turns requires_grad back on (FACTS.md)
