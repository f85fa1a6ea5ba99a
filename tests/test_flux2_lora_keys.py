"""FLUX.2 LoRA layouts: our diffusers files <-> BFL/ComfyUI (kohya) names, checked against diffusers' own FLUX.2
checkpoint converter, round-tripped exactly, and loaded by Flux2Pipeline.load_lora_weights to the same output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import Flux2Pipeline, Flux2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from PIL import Image
from safetensors.torch import save_file

from extensions.flux2.lora_keys import FLUX2_CONVENTIONS, FLUX2_MODULES, register
from toolkit.adapters.lora import adapter_metadata, add_lora, lora_state_dict, make_lora_config
from toolkit.adapters.lora_convert import (convert_file, detect_format, get_conventions, peft_metadata, read_lora,
                                           to_comfy, to_diffusers)

RANK, ALPHA = 4, 8  # alpha != rank: a wrong scale anywhere shows
CONVENTIONS = FLUX2_CONVENTIONS["flux2"]
# What diffusers' kohya FLUX.2 converter maps (it drops modulation, guidance and final-adaLN LoRAs with a warning).
BLOCK_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
                 "ff_context.linear_out", "attn.to_qkv_mlp_proj", "attn.to_out")


def _linears(model, suffixes=None) -> list[str]:
    """Full names of the model's linears (all, or those in blocks ending with one of `suffixes`): exact names,
    since a suffix like `attn.to_out` would also match the double blocks' to_out ModuleList."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if suffixes is None:
        return names
    return [n for n in names if n.startswith(("transformer_blocks.", "single_transformer_blocks."))
            and n.split(".", 2)[2] in suffixes]


def _tiny_transformer() -> Flux2Transformer2DModel:
    torch.manual_seed(0)
    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                                   axes_dims_rope=(2, 2, 2, 2), timestep_guidance_channels=32)


def _randomise_lora(transformer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, param in transformer.named_parameters():
        if "lora_" in name:  # B starts at zero; random A and B make every part distinguishable
            param.data = torch.randn(param.shape, generator=g) * 0.3


def _lora(transformer, targets, seed=0):
    config = make_lora_config(RANK, ALPHA, targets)
    add_lora(transformer, config)
    _randomise_lora(transformer, seed)
    header = {"lora_adapter_metadata": json.dumps(adapter_metadata(config), default=str)}
    return {k: v.clone() for k, v in lora_state_dict(transformer).items()}, header


def test_bfl_names_match_diffusers_flux2_checkpoint_converter():
    """Weights laid out by our table (q/k/v stacked, final adaLN halves swapped) under BFL names convert back to the
    diffusers weights exactly with diffusers' own FLUX.2 single-file converter: names, fuse order and swap agree."""
    model = _tiny_transformer()
    weights = {k[:-len(".weight")]: v for k, v in model.state_dict().items() if k.endswith(".weight")}
    bfl, covered = {}, set()
    for module in FLUX2_MODULES:
        for i in ("0", "1") if "{i}" in module.original else (None,):
            parts = [p.replace("{i}", i) if i else p for p in module.parts]
            fused = torch.cat([weights[p] for p in parts])
            if module.swap_halves:
                fused = torch.cat(fused.chunk(2)[::-1])
            bfl[(module.original.replace("{i}", i) if i else module.original) + ".weight"] = fused
            covered.update(parts)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert covered == linears  # the table names every linear of the transformer, nothing else
    converted = convert_flux2_transformer_checkpoint_to_diffusers(bfl)
    assert set(converted) == {f"{n}.weight" for n in linears}
    for key, value in converted.items():
        assert torch.equal(value, weights[key[:-len(".weight")]]), key


def test_round_trip_diffusers_comfy_diffusers_is_exact():
    register()
    register()  # idempotent: the generic registry now knows all three FLUX.2 arch names
    assert get_conventions("flux2") is CONVENTIONS and get_conventions("flux2_klein_9b").base_model_version == \
        "flux2_klein_9b"
    model = _tiny_transformer()
    state, header = _lora(model, _linears(model))
    comfy, comfy_header = to_comfy(state, header, CONVENTIONS)
    assert detect_format(comfy) == "comfy"
    qkv = "lora_unet_double_blocks_1_txt_attn_qkv"
    assert comfy[qkv + ".lora_down.weight"].shape == (3 * RANK, 16)
    assert comfy[qkv + ".lora_up.weight"].shape == (3 * 16, 3 * RANK)
    assert float(comfy[qkv + ".alpha"]) == 3 * ALPHA
    for name in ("single_blocks_1_linear1", "double_stream_modulation_img_lin", "final_layer_adaLN_modulation_1",
                 "guidance_in_out_layer", "double_blocks_0_img_mlp_0"):
        assert float(comfy[f"lora_unet_{name}.alpha"]) == ALPHA
    back, back_header = to_diffusers(comfy, comfy_header, CONVENTIONS)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    meta = peft_metadata(back_header)
    assert meta["transformer.r"] == RANK and meta["transformer.lora_alpha"] == ALPHA


@pytest.fixture(scope="module")
def pipe(tiny_flux2_dev_dir):
    return Flux2Pipeline.from_pretrained(tiny_flux2_dev_dir, dtype=torch.float32)


def test_comfy_file_loads_in_flux2_pipeline_like_the_diffusers_file(pipe, tmp_path):
    state, header = _lora(pipe.transformer, _linears(pipe.transformer, BLOCK_LINEARS), seed=1)
    pipe.transformer.delete_adapters(pipe.transformer.active_adapters())
    ours = tmp_path / "lora.safetensors"
    save_file(state, str(ours), metadata=header)
    comfy = convert_file(ours, tmp_path / "comfy.safetensors", "comfy", CONVENTIONS)
    assert detect_format(read_lora(comfy)[0]) == "comfy"
    pipe.load_lora_weights(str(ours), adapter_name="diffusers_file")
    pipe.load_lora_weights(str(comfy), adapter_name="comfy_file")  # diffusers' kohya FLUX.2 converter
    reference = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8))

    def render(adapter):
        if adapter is None:
            pipe.disable_lora()
        else:
            pipe.enable_lora()
            pipe.set_adapters(adapter)
        return pipe(image=reference, prompt="make it red", height=64, width=64, num_inference_steps=2,
                    max_sequence_length=32, generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    base, from_diffusers, from_comfy = render(None), render("diffusers_file"), render("comfy_file")
    assert np.abs(from_diffusers - base).max() > 0.05, "the LoRA changed nothing"
    np.testing.assert_allclose(from_comfy, from_diffusers, atol=1e-4)
