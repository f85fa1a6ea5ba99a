"""Weights for the tiny AutoencoderKL that really reconstruct images: each latent pixel holds the mean colour of its
8x8 block, and the decoder paints every block in that colour.

The random-weight tiny VAE decodes any latent to noise, so a render can never look like its target and edit metrics
(PSNR, SSIM) cannot move however well the transformer learns. These weights are set by construction, not fitted:
no data, no threads, identical bytes on every build. Only the architecture stays (the preset's blocks, 16 latent
channels, scale factor 8), so FluxKontextPipeline loads the folder as usual.

How the signal passes through AutoencoderKL unchanged:
- every ResNet block and the mid-block attention add a residual branch: its last layer (conv2, to_out) is zero, so
  the block is the identity;
- each encoder downsampler is a 2x2 mean (taps [0:2, 0:2] of its stride-2 conv); each decoder upsampler is nearest
  neighbour followed by an identity conv;
- the GroupNorm + SiLU before each conv_out would normalise the colours away. Each colour travels as a pair of
  channels (+s*c, -s*c) filling one group of two: the group mean is exactly 0 and, with s tiny, its variance is far
  below the norm's eps, so the norm only multiplies by 1/sqrt(eps); conv_out then takes silu(a) - silu(-a) = a,
  which is exact for any a.
The 3 colours spread over the 16 latent channels through columns of a 16x16 Hadamard matrix, so each scaled latent
channel is +-R +-G +-B: about unit variance for uniform colours, and a colour inversion is the latent negated.
The log-variance is -30 (the clamp of DiagonalGaussianDistribution): sampling a latent equals its mean.
"""

from __future__ import annotations

from typing import Any

PAIR_SCALE = 1e-5  # s above: s**2 * E[c**2] <= 1e-10, four orders below the GroupNorm eps 1e-6
_COLOURS = 3
_LATENT_COLUMNS = (1, 2, 4)  # Hadamard columns (not column 0, all ones: a channel would see only R+G+B)


def _hadamard(n: int):
    import torch

    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _zero_residual_branches(module) -> None:
    """ResNet blocks and attention become the identity: their last layer outputs 0."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    for block in module.modules():
        if isinstance(block, ResnetBlock2D):
            assert block.conv_shortcut is None, "the block-mean VAE needs equal channels in every block"
            block.conv2.weight.zero_()
            block.conv2.bias.zero_()
        elif isinstance(block, Attention):
            block.to_out[0].weight.zero_()
            block.to_out[0].bias.zero_()


def _pair_channels(conv, source: Any, bias: Any = None) -> None:
    """conv writes +s*source[k] to channel 2k and -s*source[k] to channel 2k+1 (1x1, at the kernel centre);
    source: (colours, in_channels) weights."""
    conv.weight.zero_()
    conv.bias.zero_()
    centre = conv.weight.shape[-1] // 2
    for k in range(source.shape[0]):
        for sign, channel in ((1.0, 2 * k), (-1.0, 2 * k + 1)):
            conv.weight[channel, :, centre, centre] = sign * PAIR_SCALE * source[k]
            if bias is not None:
                conv.bias[channel] = sign * PAIR_SCALE * bias[k]


def _unpair(conv, out_weights: Any, norm_eps: float, rows: int, bias: Any = None) -> None:
    """conv reads silu(a) - silu(-a) = a from each channel pair after the GroupNorm (which scaled s*c to
    s*c/sqrt(eps)) and writes out_weights @ c (+ bias) to its first `rows` output channels."""
    conv.weight.zero_()
    conv.bias.zero_()
    centre = conv.weight.shape[-1] // 2
    undo = norm_eps ** 0.5 / PAIR_SCALE
    for k in range(out_weights.shape[1]):
        conv.weight[:rows, 2 * k, centre, centre] = undo * out_weights[:, k]
        conv.weight[:rows, 2 * k + 1, centre, centre] = -undo * out_weights[:, k]
    if bias is not None:
        conv.bias[:rows] = bias


def make_block_mean_vae(vae) -> None:
    """Overwrite the weights of a tiny AutoencoderKL (16 channels in every block, 16 latent channels, 4 blocks,
    no quant convs) in place; see the module docstring."""
    import torch

    enc, dec, cfg = vae.encoder, vae.decoder, vae.config
    latents = cfg.latent_channels
    assert enc.conv_in.out_channels >= 2 * _COLOURS and not cfg.use_quant_conv and not cfg.use_post_quant_conv
    mix = _hadamard(latents)[:, list(_LATENT_COLUMNS)]  # (16, 3): scaled latent = mix @ colour
    with torch.no_grad():
        _zero_residual_branches(vae)
        _pair_channels(enc.conv_in, torch.eye(_COLOURS))
        for block in enc.down_blocks:
            for down in block.downsamplers or ():
                down.conv.weight.zero_()
                down.conv.bias.zero_()
                for channel in range(down.conv.out_channels):
                    down.conv.weight[channel, channel, 0:2, 0:2] = 0.25
        # raw latent = scaled / scaling_factor + shift_factor (the pipeline's decode convention)
        _unpair(enc.conv_out, mix / cfg.scaling_factor, enc.conv_norm_out.eps, latents,
                bias=torch.full((latents,), float(cfg.shift_factor)))
        enc.conv_out.bias[latents:] = -30.0  # log-variance: the clamp, so a sample is the mean
        # colour = mix.T @ scaled / 16 (mix has orthogonal columns of squared norm 16)
        unmix = mix.T * cfg.scaling_factor / latents
        _pair_channels(dec.conv_in, unmix, bias=-unmix.sum(1) * float(cfg.shift_factor))
        for block in dec.up_blocks:
            for up in block.upsamplers or ():
                up.conv.weight.zero_()
                up.conv.bias.zero_()
                for channel in range(up.conv.out_channels):
                    up.conv.weight[channel, channel, 1, 1] = 1.0
        _unpair(dec.conv_out, torch.eye(_COLOURS), dec.conv_norm_out.eps, _COLOURS)


__all__ = ["make_block_mean_vae"]
