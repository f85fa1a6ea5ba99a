"""FLUX's original (BFL) module names for diffusers' FluxTransformer2DModel linears: the kohya/ComfyUI LoRA layout.

Same correspondence as ComfyUI's comfy.utils.flux_to_diffusers and diffusers' kohya Flux converter. BFL fuses
q/k/v of each double-block stream into one `qkv` linear, and q/k/v plus the MLP input of each single block into
`linear1` (MLP width 4 x hidden, FLUX's fixed mlp_ratio).
"""

from __future__ import annotations

from toolkit.adapters.lora_convert import FusedModule, LoraConventions, register_conventions

_D, _S = "transformer_blocks.{i}", "single_transformer_blocks.{i}"


def _one(original: str, diffusers: str, swap: bool = False) -> FusedModule:
    return FusedModule(original, (diffusers,), swap_halves=swap)


FLUX_MODULES = (
    FusedModule("double_blocks.{i}.img_attn.qkv", (f"{_D}.attn.to_q", f"{_D}.attn.to_k", f"{_D}.attn.to_v")),
    FusedModule("double_blocks.{i}.txt_attn.qkv",
                (f"{_D}.attn.add_q_proj", f"{_D}.attn.add_k_proj", f"{_D}.attn.add_v_proj")),
    _one("double_blocks.{i}.img_attn.proj", f"{_D}.attn.to_out.0"),
    _one("double_blocks.{i}.txt_attn.proj", f"{_D}.attn.to_add_out"),
    _one("double_blocks.{i}.img_mlp.0", f"{_D}.ff.net.0.proj"),
    _one("double_blocks.{i}.img_mlp.2", f"{_D}.ff.net.2"),
    _one("double_blocks.{i}.txt_mlp.0", f"{_D}.ff_context.net.0.proj"),
    _one("double_blocks.{i}.txt_mlp.2", f"{_D}.ff_context.net.2"),
    _one("double_blocks.{i}.img_mod.lin", f"{_D}.norm1.linear"),
    _one("double_blocks.{i}.txt_mod.lin", f"{_D}.norm1_context.linear"),
    FusedModule("single_blocks.{i}.linear1",
                (f"{_S}.attn.to_q", f"{_S}.attn.to_k", f"{_S}.attn.to_v", f"{_S}.proj_mlp"), part_ratios=(1, 1, 1, 4)),
    _one("single_blocks.{i}.linear2", f"{_S}.proj_out"),
    _one("single_blocks.{i}.modulation.lin", f"{_S}.norm.linear"),
    _one("img_in", "x_embedder"),
    _one("txt_in", "context_embedder"),
    _one("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    _one("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    _one("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    _one("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    _one("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    _one("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    _one("final_layer.linear", "proj_out"),
    _one("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True),
)

# Kontext [dev] is a FLUX.1-dev model: kohya's sai_model_spec has no Kontext entry and tools key on "flux-1-dev".
FLUX_CONVENTIONS = LoraConventions(modules=FLUX_MODULES, modelspec_architecture="flux-1-dev",
                                   modelspec_implementation="https://github.com/black-forest-labs/flux",
                                   base_model_version="flux1")

register_conventions("flux_kontext", FLUX_CONVENTIONS)
