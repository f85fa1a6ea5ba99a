"""FLUX Kontext token layout as pure tensor functions: 2x2 latent packing and position ids.

Shapes: B batch, C latent channels (16), H x W latent grid (image / 8), N = H/2 * W/2 tokens of C*4 features.

    x0      = pack(vae_latents(target))                  (B, N, 64)
    ctrl    = pack(vae_latents(control))                 (B, M, 64)
    pred    = transformer([x_t ; ctrl], ids=[ids(0) ; ids(1)])[:, :N]
    (several controls: [x_t ; ctrl_1 ; ctrl_2 ...] with ids [ids(0) ; ids(1) ; ids(2) ...]; loss on x_t only)

The control tokens go AFTER the noisy target tokens, with position-id first coordinate 1, exactly as diffusers'
FluxKontextPipeline does at inference, so a LoRA trained here behaves the same there.
"""

from __future__ import annotations

import torch


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4): each 2x2 latent patch becomes one token (FLUX's layout)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even, got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of pack_latents for a latent grid of `height` x `width`: (B, N, C*4) -> (B, C, H, W)."""
    b, n, d = tokens.shape
    if n != (height // 2) * (width // 2):
        raise ValueError(f"{n} tokens do not fit a {height}x{width} latent grid")
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def position_ids(latent_height: int, latent_width: int, frame: int, device=None) -> torch.Tensor:
    """(H/2 * W/2, 3) ids [frame, row, col] of packed tokens; frame 0 = target, k >= 1 = the k-th control image."""
    rows = torch.arange(latent_height // 2, device=device, dtype=torch.float32)
    cols = torch.arange(latent_width // 2, device=device, dtype=torch.float32)
    grid_r, grid_c = torch.meshgrid(rows, cols, indexing="ij")
    frame_col = torch.full_like(grid_r, float(frame))
    return torch.stack([frame_col, grid_r, grid_c], dim=-1).reshape(-1, 3)


def kontext_position_ids(target_hw: tuple[int, int], *control_hws: tuple[int, int], device=None) -> torch.Tensor:
    """Ids of the joint sequence [target ; control 1 ; control 2 ; ...] for the latent grids of the target and of
    each control image: frame 0 for the target, frame k for the k-th control, rows and columns from 0 in each.

    With one control this is exactly diffusers' FluxKontextPipeline layout (its image ids have frame 1); with none,
    the target's ids alone (the pipeline's text-to-image layout, ``image=None``)."""
    grids = [position_ids(*target_hw, frame=0, device=device)]
    grids += [position_ids(*hw, frame=k, device=device) for k, hw in enumerate(control_hws, start=1)]
    return torch.cat(grids, dim=0)
