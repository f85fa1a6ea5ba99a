"""The kohya/ComfyUI LoRA layout of Qwen-Image(-Edit): `lora_unet_<diffusers module name with dots as underscores>`.

Qwen-Image's original checkpoint already uses diffusers' module names, and ComfyUI keeps them (its QwenImage
state dict is `diffusion_model.<diffusers name>`; comfy/lora.py maps `lora_unet_<name with underscores>` onto it), so
every linear is its own module here: nothing is fused, nothing reordered. diffusers' QwenImage loader reads this
layout back (`_convert_non_diffusers_qwen_lora_to_diffusers`, which restores the dots of exactly these names).
"""

from __future__ import annotations

from toolkit.adapters.lora_convert import FusedModule, LoraConventions, register_conventions

_B = "transformer_blocks.{i}"
# Every Linear of a QwenImageTransformerBlock, then the top-level ones.
_BLOCK_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                  "attn.add_v_proj", "attn.to_add_out", "img_mod.1", "txt_mod.1", "img_mlp.net.0.proj",
                  "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
_TOP_LINEARS = ("img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
                "time_text_embed.timestep_embedder.linear_2")

QWEN_MODULES = tuple(FusedModule(name, (name,)) for name in (*(f"{_B}.{n}" for n in _BLOCK_LINEARS), *_TOP_LINEARS))


def _conventions(architecture: str) -> LoraConventions:
    # modelspec names as musubi-tuner writes them for these models.
    return LoraConventions(modules=QWEN_MODULES, modelspec_architecture=architecture,
                           modelspec_implementation="https://github.com/QwenLM/Qwen-Image",
                           base_model_version="qwen_image")


register_conventions("qwen_image_edit_plus", _conventions("Qwen-Image-Edit-Plus"))
register_conventions("qwen_image_edit", _conventions("Qwen-Image-Edit"))
