"""Qwen-Image-Edit-Plus (2509 / 2511) behind toolkit.arch.Architecture: one or more control images per target.

The training conditioning is the pipeline's (conditioning.py): every control image is seen by Qwen2.5-VL inside the
prompt and, as VAE reference tokens, by the transformer after the noisy target tokens; img_shapes lists the target's
token grid then each reference's, which is all the transformer's RoPE (and 2511's zero_cond_t) needs. The
transformer takes sigma in [0, 1] as its timestep (the pipeline passes scheduler timesteps / 1000), the same t the
trainer's flow-matching objective uses: x_t = (1 - t) x0 + t noise, target noise - x0, as the Euler scheduler steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImageTransformer2DModel
from PIL import Image

from extensions.qwen_image_edit.caching import QwenCaching, batch_items, stack_padded
from extensions.qwen_image_edit.conditioning import (CONDITION_IMAGE_SIZE, VAE_IMAGE_SIZE, Conditioning,
                                                     encode_conditioning, encode_pixels)
from extensions.qwen_image_edit.packing import img_shapes, pack_latents
from extensions.qwen_image_edit.processor import load_processor
from extensions.qwen_image_edit.quantize import TRANSFORMER_EXCLUDE
from extensions.qwen_image_edit.sampling import render
from toolkit import model_folder
from toolkit.arch import Architecture, eval_mode, register_architecture
from toolkit.data.dataset import control_names
from toolkit.errors import ArchitectureError
from toolkit.render.sampling import SampleRequest

log = logging.getLogger(__name__)

# Attention (image and text streams) and MLP linears of every transformer block; the modulation linears
# (img_mod / txt_mod) stay frozen, as in the usual Qwen-Image LoRAs.
LORA_TARGETS = (r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj"
                r"|to_add_out)|img_mlp\.net\.(0\.proj|2)|txt_mlp\.net\.(0\.proj|2))")


def lora_targets_for(num_layers: int) -> str:
    """LORA_TARGETS without the last block's text-stream output layers (attn.to_add_out, txt_mlp): the transformer
    drops the text stream after its last block, so they get no gradient (and DDP stops on unused parameters)."""
    last = num_layers - 1
    return (r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj)"
            r"|img_mlp\.net\.(0\.proj|2))"
            rf"|.*transformer_blocks\.(?!{last}\.)\d+\.(attn\.to_add_out|txt_mlp\.net\.(0\.proj|2))")




@dataclass
class EncodedBatch:
    x0: torch.Tensor  # (B, N, 64) packed normalised target latents
    references: torch.Tensor  # (B, M, 64) packed reference latents of every control image, in order
    target_hw: tuple[int, int]  # latent (H, W) of the target
    reference_hws: list[tuple[int, int]]  # latent (H, W) of each control image
    prompt_embeds: torch.Tensor  # (B, L, D) Qwen2.5-VL hidden states, zero-padded to the longest
    prompt_mask: torch.Tensor  # (B, L) 1 for real tokens


class QwenEditDenoiser(torch.nn.Module):
    """transformer([x_t ; references]) sliced back to the target tokens. The module DDP wraps, and the one our
    sampler calls."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, reference_tokens, encoder_hidden_states, encoder_hidden_states_mask, timestep,
                img_shapes):
        n_target = hidden_states.shape[1]
        out = self.transformer(hidden_states=torch.cat([hidden_states, reference_tokens], dim=1), timestep=timestep,
                               guidance=None, encoder_hidden_states=encoder_hidden_states,
                               encoder_hidden_states_mask=encoder_hidden_states_mask, img_shapes=img_shapes,
                               attention_kwargs={}, return_dict=False)[0]
        return out[:, :n_target]


@register_architecture
class QwenImageEditPlus(QwenCaching, Architecture):
    name = "qwen_image_edit_plus"
    default_lora_targets = LORA_TARGETS
    supports_match_target_res = True
    trains_without_controls = True  # zero control images: the prompt alone, no reference tokens (conditioning.py)
    pipeline_class: ClassVar[type] = QwenImageEditPlusPipeline
    #: pixels of the images Qwen2.5-VL sees; None: the reference-sized image (the first Qwen-Image-Edit)
    condition_area: ClassVar[Optional[int]] = CONDITION_IMAGE_SIZE
    max_controls: ClassVar[int] = 3  # "Picture 1" to "Picture 3": what Qwen-Image-Edit-2509 was trained with

    def __init__(self, pipe: Any, model_cfg: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.device, self.dtype = device, dtype
        self.match_target_res = model_cfg.match_target_res
        self._denoiser = QwenEditDenoiser(self.transformer)
        pipe.set_progress_bar_config(disable=True)

    def lora_targets(self) -> str:
        return lora_targets_for(self.transformer.config.num_layers)

    # -- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def check_source(cls, name_or_path: str) -> list[str]:
        return model_folder.folder_problems(name_or_path, "Qwen-Image-Edit", ("model_index.json", "processor"))

    @classmethod
    def load(cls, model_cfg: Any, device: torch.device, dtype: torch.dtype) -> "QwenImageEditPlus":
        log.info("loading %s (%s) on %s", model_cfg.name_or_path, dtype, device)
        source = model_folder.source(model_cfg)
        components: dict[str, Any] = {"processor": load_processor(source),
                                      **model_folder.transformer_override(QwenImageTransformer2DModel, model_cfg,
                                                                          source, dtype, device, TRANSFORMER_EXCLUDE)}
        pipe = cls.pipeline_class.from_pretrained(source, dtype=dtype, **components)
        model_folder.freeze_and_quantize(pipe, model_cfg, device, dtype, TRANSFORMER_EXCLUDE)
        return cls(pipe, model_cfg, device, dtype)

    # -- training ---------------------------------------------------------------------------------------------
    def denoiser(self) -> torch.nn.Module:
        return self._denoiser

    def reference_area(self, width: int, height: int) -> int:
        """Pixels of each reference image: the target's with match_target_res, else the pipeline's fixed size."""
        return width * height if self.match_target_res else VAE_IMAGE_SIZE

    def condition(self, prompt: str, controls: Sequence[Image.Image], width: int, height: int) -> Conditioning:
        if len(controls) > self.max_controls:
            raise ArchitectureError(f"{self.name} takes at most {self.max_controls} control image(s), got "
                                    f"{len(controls)}")
        return encode_conditioning(self.pipe, prompt, controls, self.reference_area(width, height), self.device,
                                   self.dtype, self.condition_area)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> normalised VAE latents (B, z_dim, H/8, W/8), the posterior mode."""
        return encode_pixels(self.vae, pixels.to(self.device, self.vae.dtype, non_blocking=True))

    @torch.no_grad()
    def encode_batch(self, batch: dict) -> EncodedBatch:
        """Target latents, and per sample its prompt with its control images and their reference tokens, made as
        the pipeline makes them (conditioning.py); latents and prompt embeddings the dataset took from a cache
        (caching.py) are used as they are."""
        names = control_names(batch) or control_names(batch, "_latents")
        if len(names) > self.max_controls:
            raise ArchitectureError(f"{self.name} takes at most {self.max_controls} control image(s), got "
                                    f"{len(names)}")
        items = batch_items(batch, ("target", *names))
        if "target_latents" in batch:
            target = batch["target_latents"].to(self.device, non_blocking=True)
            references = [batch[f"{n}_latents"].to(self.device, non_blocking=True) for n in names]
        else:
            target = self.encode_images(batch["target"])
            rows = self.reference_latents(items)
            references = [torch.stack([r[f"{n}_latents"] for r in rows]) for n in names]
        if "prompt_embeds" in batch:
            embeds, mask = batch["prompt_embeds"].to(self.device), batch["prompt_mask"].to(self.device)
        else:
            embeds, mask = stack_padded(self.encode_captions(batch["caption"], items))
        x0 = pack_latents(target)
        return EncodedBatch(x0=x0.to(self.dtype),
                            # no control image (control dropout): zero reference tokens
                            references=torch.cat([x0[:, :0], *(pack_latents(r) for r in references)],
                                                 dim=1).to(self.dtype),
                            target_hw=tuple(target.shape[-2:]), reference_hws=[tuple(r.shape[-2:]) for r in references],
                            prompt_embeds=embeds.to(self.dtype), prompt_mask=mask)

    def clean_latents(self, encoded: EncodedBatch) -> torch.Tensor:
        return encoded.x0

    def denoiser_inputs(self, encoded: EncodedBatch, x_t: torch.Tensor, t: torch.Tensor, guidance: float
                        ) -> dict[str, Any]:
        """`guidance` is unused: Qwen-Image has no guidance embedding (its sampler uses true CFG)."""
        return {
            "hidden_states": x_t,
            "reference_tokens": encoded.references,
            "encoder_hidden_states": encoded.prompt_embeds,
            "encoder_hidden_states_mask": encoded.prompt_mask,
            "timestep": t.to(self.device, self.dtype),
            "img_shapes": img_shapes(encoded.target_hw, encoded.reference_hws, x_t.shape[0]),
        }

    # -- sampling ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, requests: Sequence[SampleRequest],
               controls: Sequence[Union[Image.Image, Sequence[Image.Image]]],
               stop: Optional[Callable[[], bool]] = None) -> list[Image.Image]:
        """One image per request; guidance_scale > 1 is the pipeline's true CFG against an empty negative prompt.
        `stop()` is asked after every denoising step: true ends the loop early (the image is then unfinished)."""
        with eval_mode(self.transformer):
            return [self._render(r, c, stop) for r, c in zip(requests, controls)]

    def _render(self, request: SampleRequest, control: Union[Image.Image, Sequence[Image.Image]],
                stop: Optional[Callable[[], bool]] = None) -> Image.Image:
        images = [control] if isinstance(control, Image.Image) else list(control)
        cond = self.condition(request.prompt, images, request.width, request.height)
        negative: Optional[Conditioning] = None
        if request.guidance_scale > 1:
            negative = self.condition("", images, request.width, request.height)
        generator = torch.Generator("cpu").manual_seed(request.seed)  # CPU noise: the same image on any device
        return render(self.pipe, self._denoiser, cond, request.width, request.height, request.steps, generator,
                      true_cfg_scale=request.guidance_scale, negative=negative, stop=stop)


@register_architecture
class QwenImageEdit(QwenImageEditPlus):
    """The first Qwen-Image-Edit: one control image, seen by Qwen2.5-VL at the reference size (~1024x1024 px)."""

    name = "qwen_image_edit"
    pipeline_class = QwenImageEditPipeline
    trains_without_controls = False  # its prompt template always holds one image
    condition_area = None
    max_controls = 1
