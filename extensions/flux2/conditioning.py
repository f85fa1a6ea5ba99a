"""FLUX.2 latents as transformer tokens, and their position ids, made by the pipeline's own methods.

Flux2KleinPipeline and Flux2Pipeline share these steps (they are copies of each other upstream):
- a VAE latent (B, 32, H, W) is patchified 2x2 into (B, 128, H/2, W/2) and normalised with the VAE's batch-norm
  running statistics (`_encode_vae_image`), then flattened row by row into tokens (`_pack_latents`);
- position ids have four axes (t, h, w, l): the noisy target has t = 0 (`_prepare_latent_ids`), the k-th reference
  image t = 10 + 10 k (`_prepare_image_ids`), text tokens (0, 0, 0, i) (`_prepare_text_ids`).
Training and sampling both go through these functions, so the model learns from what it is given at inference.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from diffusers import Flux2KleinPipeline

TokenGrid = tuple[int, int]  # (rows, columns) of tokens: the latent size / 2

_UPSTREAM = Flux2KleinPipeline  # the static helpers are identical in Flux2Pipeline


@torch.no_grad()
def encode_pixels(pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> normalised patchified latents (B, 128, H/16, W/16): the posterior mode, exactly as
    the pipeline encodes its reference images."""
    return pipe._encode_vae_image(image=pixels.to(pipe.vae.device, pipe.vae.dtype), generator=None)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h * w, C) tokens, row by row."""
    return _UPSTREAM._pack_latents(latents)


def position_ids(target: TokenGrid, references: Sequence[TokenGrid], device: torch.device) -> torch.Tensor:
    """(N + M, 4) ids of the noisy target's tokens then every reference image's, in sequence order."""
    target_ids = _UPSTREAM._prepare_latent_ids(torch.empty(1, 0, *target))[0]
    if not references:
        return target_ids.to(device)
    reference_ids = _UPSTREAM._prepare_image_ids([torch.empty(1, 0, *grid) for grid in references])[0]
    return torch.cat([target_ids, reference_ids]).to(device)


def text_ids(length: int, device: torch.device) -> torch.Tensor:
    """(L, 4) ids of a prompt embedding of `length` tokens."""
    return _UPSTREAM._prepare_text_ids(torch.empty(1, length, 0))[0].to(device)


def mask_weights(masks: torch.Tensor, target: TokenGrid, channels: int) -> torch.Tensor:
    """Pixel masks (B, 1, H, W) -> (B, N, channels) weights of the packed target tokens: nearest-sampled to the latent
    grid, scaled to mean 1 over the batch, patchified like the latents (channel c * 4 + p of a token is latent
    channel c at 2x2 position p, so the 4 values of a patch tile across the channels)."""
    grid = torch.nn.functional.interpolate(masks.float(), size=(2 * target[0], 2 * target[1]), mode="nearest")
    grid = grid / grid.mean().clamp_min(1e-6)
    patches = _UPSTREAM._patchify_latents(grid)  # (B, 4, h, w)
    return pack(patches.repeat(1, channels // 4, 1, 1))
