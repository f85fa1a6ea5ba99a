"""BFL's original module names for diffusers' Flux2Transformer2DModel linears: the kohya/ComfyUI LoRA layout of FLUX.2.

We train peft LoRAs on diffusers' module names and save them as diffusers does (`transformer.<module>.lora_A/B`);
ComfyUI keeps FLUX.2 in BFL's layout and maps `lora_unet_<BFL name with dots as underscores>` (and
`diffusion_model.<BFL name>`) onto its state-dict keys, so a LoRA for ComfyUI must use BFL's names. The
correspondence is the one of diffusers' single-file converter (convert_flux2_transformer_checkpoint_to_diffusers)
and its FLUX.2 LoRA converters:
- each double block's q, k, v of a stream are ONE BFL linear (`img_attn.qkv`, `txt_attn.qkv`): the generic
  converter (toolkit.adapters.lora_convert) stacks the parts' lora_A and puts their lora_B on the block diagonal,
  which is exact, and diffusers' kohya FLUX.2 converter cuts such a "sparse" up apart again;
- the single blocks are already fused in diffusers (`attn.to_qkv_mlp_proj` = BFL `linear1`), 1:1;
- the SwiGLU MLPs keep BFL's (gate, up) row order in diffusers (`ff.linear_in` = `img_mlp.0`), 1:1;
- FLUX.2 modulates from three model-level linears (`double_stream_modulation_img/txt.lin`,
  `single_stream_modulation.lin`), not per block as FLUX.1;
- the final adaLN stores (shift, scale) in BFL and (scale, shift) in diffusers: its rows swap halves.
[klein] 4B / 9B use the same transformer class and names (without guidance_in, which then simply never matches).
"""

from __future__ import annotations

from toolkit.adapters.lora_convert import FusedModule, LoraConventions, register_conventions

_D, _S = "transformer_blocks.{i}", "single_transformer_blocks.{i}"


def _one(original: str, diffusers: str, swap: bool = False) -> FusedModule:
    return FusedModule(original, (diffusers,), swap_halves=swap)


FLUX2_MODULES = (
    FusedModule("double_blocks.{i}.img_attn.qkv", (f"{_D}.attn.to_q", f"{_D}.attn.to_k", f"{_D}.attn.to_v")),
    FusedModule("double_blocks.{i}.txt_attn.qkv",
                (f"{_D}.attn.add_q_proj", f"{_D}.attn.add_k_proj", f"{_D}.attn.add_v_proj")),
    _one("double_blocks.{i}.img_attn.proj", f"{_D}.attn.to_out.0"),
    _one("double_blocks.{i}.txt_attn.proj", f"{_D}.attn.to_add_out"),
    _one("double_blocks.{i}.img_mlp.0", f"{_D}.ff.linear_in"),
    _one("double_blocks.{i}.img_mlp.2", f"{_D}.ff.linear_out"),
    _one("double_blocks.{i}.txt_mlp.0", f"{_D}.ff_context.linear_in"),
    _one("double_blocks.{i}.txt_mlp.2", f"{_D}.ff_context.linear_out"),
    _one("single_blocks.{i}.linear1", f"{_S}.attn.to_qkv_mlp_proj"),
    _one("single_blocks.{i}.linear2", f"{_S}.attn.to_out"),
    _one("double_stream_modulation_img.lin", "double_stream_modulation_img.linear"),
    _one("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear"),
    _one("single_stream_modulation.lin", "single_stream_modulation.linear"),
    _one("img_in", "x_embedder"),
    _one("txt_in", "context_embedder"),
    _one("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
    _one("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
    _one("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1"),
    _one("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2"),
    _one("final_layer.linear", "proj_out"),
    _one("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True),
)

_IMPLEMENTATION = "https://github.com/black-forest-labs/flux2"
# Architecture name -> conventions. base_model_version is ai-toolkit's for the same arch (its
# get_base_model_version), so tools keyed on it recognise our files; modelspec names follow "flux-1-dev".
FLUX2_CONVENTIONS = {
    arch: LoraConventions(modules=FLUX2_MODULES, modelspec_architecture=modelspec,
                          modelspec_implementation=_IMPLEMENTATION, base_model_version=arch)
    for arch, modelspec in (("flux2", "flux-2-dev"), ("flux2_klein_4b", "flux-2-klein-4b"),
                            ("flux2_klein_9b", "flux-2-klein-9b"))
}


def register() -> None:
    """Register the FLUX.2 LoRA file conventions for arch names flux2, flux2_klein_4b and flux2_klein_9b
    (idempotent: registering the same objects again is a no-op)."""
    for arch, conventions in FLUX2_CONVENTIONS.items():
        register_conventions(arch, conventions)


__all__ = ["FLUX2_CONVENTIONS", "FLUX2_MODULES", "register"]
