"""What Qwen-Image-Edit-Plus conditions on, made from control images exactly as QwenImageEditPlusPipeline makes it.

Each control image plays two parts:
- resized to about CONDITION_IMAGE_SIZE pixels, it goes through Qwen2.5-VL's vision tower inside the prompt
  ("Picture N: <|vision_start|><|image_pad|><|vision_end|>" before the instruction), so the text embedding sees it;
- resized to about `reference_area` pixels (the pipeline's VAE_IMAGE_SIZE, about 1024x1024), its VAE latents are
  packed into reference tokens that follow the noisy target tokens in the transformer's sequence.
Training and sampling both call `encode_conditioning`, so the model learns from what it is given at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (CONDITION_IMAGE_SIZE, VAE_IMAGE_SIZE,
                                                                         calculate_dimensions)
from PIL import Image

from extensions.qwen_image_edit.packing import normalize_latents, pack_latents

__all__ = ["CONDITION_IMAGE_SIZE", "VAE_IMAGE_SIZE", "Conditioning", "encode_conditioning", "encode_pixels",
           "encode_references", "pipeline_inputs", "reference_size", "to_pil"]


@dataclass
class Conditioning:
    """One prompt with its control images, ready for the transformer (batch 1)."""

    prompt_embeds: torch.Tensor  # (1, L, D): Qwen2.5-VL's last hidden states after the 64 system-prompt tokens
    prompt_mask: Optional[torch.Tensor]  # (1, L) or None when every position is valid (the pipeline's convention)
    references: torch.Tensor  # (1, M, 4 * z_dim): every control image's packed latents, in order
    reference_hws: list[tuple[int, int]]  # latent (H, W) of each control image


def reference_size(image_size: tuple[int, int], area: int) -> tuple[int, int]:
    """(width, height) about `area` pixels with the image's aspect ratio, multiples of 32 (the pipeline's rule)."""
    width, height = calculate_dimensions(area, image_size[0] / image_size[1])
    return int(width), int(height)


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """A (3, H, W) image in [-1, 1] back to 8-bit RGB (exact for images that were 8-bit, as dataset images are)."""
    array = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


@torch.no_grad()
def encode_pixels(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> normalised latents (B, z_dim, H/8, W/8), the posterior mode as the pipeline uses."""
    latents = vae.encode(pixels.unsqueeze(2)).latent_dist.mode()
    return normalize_latents(latents, vae.config.latents_mean, vae.config.latents_std)[:, :, 0]


def pipeline_inputs(pipe: Any, controls: Sequence[Image.Image], reference_area: int,
                     condition_area: Optional[int]) -> tuple[list[Image.Image], list[torch.Tensor]]:
    """(images for the VL prompt, VAE input pixels) as the pipeline makes them. With condition_area None (the first
    Qwen-Image-Edit) one resized image serves both, and the VAE input is made from it."""
    condition_images, pixels = [], []
    for image in controls:
        width, height = reference_size(image.size, reference_area)
        if condition_area is None:
            image = pipe.image_processor.resize(image, height, width)
            condition_images.append(image)
        else:
            c_width, c_height = reference_size(image.size, condition_area)
            condition_images.append(pipe.image_processor.resize(image, c_height, c_width))
        pixels.append(pipe.image_processor.preprocess(image, height, width))
    return condition_images, pixels


@torch.no_grad()
def encode_conditioning(pipe: Any, prompt: str, controls: Sequence[Image.Image], reference_area: int,
                        device: torch.device, dtype: torch.dtype,
                        condition_area: Optional[int] = CONDITION_IMAGE_SIZE) -> Conditioning:
    """Prompt embedding with the control images inside it, and their reference tokens."""
    condition_images, pixels = pipeline_inputs(pipe, controls, reference_area, condition_area)
    # No control image (control dropout): the prompt without any "Picture N", and no reference tokens.
    embeds, mask = pipe.encode_prompt(prompt, image=condition_images or None, device=device)
    latents = encode_references(pipe.vae, pixels, device, embeds.dtype)
    references = [pack_latents(x) for x in latents] or [torch.zeros(1, 0, 4 * pipe.vae.config.z_dim, device=device)]
    return Conditioning(embeds.to(dtype), mask, torch.cat(references, dim=1).to(dtype),
                        [tuple(x.shape[-2:]) for x in latents])


@torch.no_grad()
def encode_references(vae: Any, pixels: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype
                      ) -> list[torch.Tensor]:
    """Each control image's VAE input pixels (pipeline_inputs) -> its normalised latents (1, z_dim, h, w)."""
    return [encode_pixels(vae, image_pixels.to(device, dtype)) for image_pixels in pixels]
