"""LoRA layouts: diffusers <-> ComfyUI/kohya conversion is exact and loads in diffusers; training saves either."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from PIL import Image
from safetensors.torch import load_file, save_file

import run
from extensions.flux_kontext.lora_keys import FLUX_CONVENTIONS
from extensions.flux_kontext.model import LORA_TARGETS
from toolkit.adapters.lora import adapter_metadata, add_lora, lora_state_dict, make_lora_config, read_lora_metadata
from toolkit.adapters.lora_convert import convert_file, detect_format, peft_metadata, read_lora, to_comfy, to_diffusers

RANK, ALPHA = 4, 8  # alpha != rank: a wrong scale anywhere shows


def _random_lora(pipe, targets=LORA_TARGETS, seed=0):
    config = make_lora_config(RANK, ALPHA, targets)
    add_lora(pipe.transformer, config)
    g = torch.Generator().manual_seed(seed)
    for name, param in pipe.transformer.named_parameters():
        if "lora_B" in name:  # B starts at zero; a random B makes the LoRA change the output
            param.data = torch.randn(param.shape, generator=g) * 0.3
    return config


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, tiny_model_dir):
    """A diffusers-layout LoRA for the tiny model whose alpha != rank lives only in `lora_adapter_metadata`, as
    diffusers' scripts (and this trainer before it folded the scale into lora_B) write it: conversion must keep
    such a scale exactly."""
    pipe = FluxKontextPipeline.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    config = _random_lora(pipe)
    path = tmp_path_factory.mktemp("lora") / "lora.safetensors"
    header = {"format": "pt", "lora_adapter_metadata": json.dumps(adapter_metadata(config), default=str),
              "kontext_trainer.step": "7"}
    save_file(lora_state_dict(pipe.transformer), str(path), metadata=header)
    return path


def test_round_trip_diffusers_comfy_diffusers_gives_identical_tensors(lora_file, tmp_path):
    state, header = read_lora(lora_file)
    comfy, comfy_header = to_comfy(state, header, FLUX_CONVENTIONS)
    assert detect_format(comfy) == "comfy" and "lora_adapter_metadata" not in comfy_header
    assert comfy_header["kontext_trainer.step"] == "7"
    # q, k, v fuse into BFL's qkv: ranks stack, ups sit on the block diagonal, alpha keeps alpha/rank.
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert comfy[qkv + ".lora_down.weight"].shape == (3 * RANK, 32)
    assert comfy[qkv + ".lora_up.weight"].shape == (3 * 32, 3 * RANK)
    assert float(comfy[qkv + ".alpha"]) == 3 * ALPHA
    assert comfy["lora_unet_single_blocks_1_linear1.lora_up.weight"].shape == (3 * 32 + 128, 4 * RANK)
    assert float(comfy["lora_unet_double_blocks_0_img_attn_proj.alpha"]) == ALPHA

    back, back_header = to_diffusers(comfy, comfy_header, FLUX_CONVENTIONS)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    meta = peft_metadata(back_header)
    assert meta["transformer.r"] == RANK and meta["transformer.lora_alpha"] == ALPHA

    # The same through the files and the command line.
    comfy_path, back_path = tmp_path / "comfy.safetensors", tmp_path / "back.safetensors"
    assert run.main(["convert-lora", str(lora_file), str(comfy_path), "--to", "comfy"]) == 0
    assert run.main(["convert-lora", str(comfy_path), str(back_path), "--to", "diffusers"]) == 0
    again = load_file(str(back_path))
    assert set(again) == set(state) and all(torch.equal(again[k], state[k]) for k in state)


def test_lora_on_part_of_a_fused_module_round_trips(tiny_model_dir):
    pipe = FluxKontextPipeline.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    _random_lora(pipe, targets=["to_q", "to_v"])  # no to_k: the qkv LoRA gets a zero block for it
    state = {k: v.clone() for k, v in lora_state_dict(pipe.transformer).items()}
    header = {"lora_adapter_metadata": json.dumps({"transformer.r": RANK, "transformer.lora_alpha": ALPHA})}
    comfy, _ = to_comfy(state, header, FLUX_CONVENTIONS)
    up = comfy["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert not up[32:64].any()
    back, _ = to_diffusers(comfy, {}, FLUX_CONVENTIONS)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def _delta_times(a, b, scale, probe):
    """(B @ A * scale) @ probe without forming the (out x in) update."""
    return (b.double() @ (a.double() @ probe)) * scale


def test_diffusers_kohya_converter_reads_our_comfy_layout_at_flux_dims():
    """diffusers' own loader path for kohya Flux LoRAs (hard-coded to FLUX.1's real sizes) gives the same updates."""
    hidden, mlp, rank, alpha = 3072, 12288, 2, 4.0
    g = torch.Generator().manual_seed(0)
    shapes = {"transformer_blocks.0.attn.to_q": (hidden, hidden), "transformer_blocks.0.attn.to_k": (hidden, hidden),
              "transformer_blocks.0.attn.to_v": (hidden, hidden), "transformer_blocks.0.ff.net.2": (hidden, mlp),
              "single_transformer_blocks.0.attn.to_q": (hidden, hidden),
              "single_transformer_blocks.0.attn.to_k": (hidden, hidden),
              "single_transformer_blocks.0.attn.to_v": (hidden, hidden),
              "single_transformer_blocks.0.proj_mlp": (mlp, hidden)}
    state = {}
    for module, (out_features, in_features) in shapes.items():
        state[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=g)
        state[f"transformer.{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=g)
    header = {"lora_adapter_metadata": json.dumps({"transformer.r": rank, "transformer.lora_alpha": alpha})}
    comfy, _ = to_comfy(state, header, FLUX_CONVENTIONS)
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(comfy))  # diffusers bakes alpha/rank into the weights
    assert set(theirs) == set(state)
    for module, (_, in_features) in shapes.items():
        a, b = f"transformer.{module}.lora_A.weight", f"transformer.{module}.lora_B.weight"
        probe = torch.randn(in_features, 3, generator=g, dtype=torch.float64)
        torch.testing.assert_close(_delta_times(theirs[a], theirs[b], 1.0, probe),
                                   _delta_times(state[a], state[b], alpha / rank, probe))


def test_comfy_file_loads_into_the_pipeline_and_renders_like_the_diffusers_file(lora_file, tmp_path,
                                                                                  tiny_model_dir, demo_data_dir):
    from extensions.flux_kontext.generate import FluxKontextRenderer
    from toolkit.config.schema import ModelConfig
    from toolkit.render.sampling import SampleRequest

    comfy_path = convert_file(lora_file, tmp_path / "comfy.safetensors", "comfy", FLUX_CONVENTIONS)
    renderer = FluxKontextRenderer.load(ModelConfig(name_or_path=str(tiny_model_dir), arch="flux_kontext",
                                                    max_sequence_length=16), torch.device("cpu"), torch.float32)
    renderer.add_lora(lora_file, "diffusers_file")  # through pipe.load_lora_weights
    renderer.add_lora(comfy_path, "comfy_file")  # through our converter and transformer.load_lora_adapter
    control = Image.open(demo_data_dir / "sample_control" / "sample_000.png").convert("RGB").resize((64, 64))
    request = SampleRequest(index=0, prompt="inv3rt invert", ctrl_img=demo_data_dir, seed=3, width=64, height=64,
                            guidance_scale=2.5, steps=2)

    def render(adapter):
        renderer.use_lora(adapter)
        return np.asarray(renderer.render([request], [control])[0], dtype=np.int16)

    base, from_diffusers, from_comfy = render(None), render("diffusers_file"), render("comfy_file")
    assert np.abs(from_diffusers - base).max() > 10, "the LoRA changed nothing"
    assert np.abs(from_comfy - from_diffusers).max() <= 1


def test_training_saves_comfy_layout_with_ecosystem_metadata(tmp_path, tiny_model_dir, demo_data_dir, monkeypatch):
    from jobs import get_job
    from tests.helpers import merge, tiny_config_dict, write_config

    secret = "hf_SECRETtokenVALUE0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    cfg = merge(tiny_config_dict(tmp_path / "out", tiny_model_dir, demo_data_dir),
                {"train.steps": 2, "save.format": "comfy", "sample.prompts": [], "trigger_word": secret})
    final = get_job(write_config(tmp_path / "cfg.yaml", cfg)).run()[0]
    state = load_file(str(final))
    assert detect_format(state) == "comfy" and "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in state
    meta = read_lora_metadata(final)
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["modelspec.title"] == "tiny"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4" and meta["ss_steps"] == "2"
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.resolution"] == "64x64"
    assert meta["kontext_trainer.step"] == "2"
    assert all(secret not in value for value in meta.values())
    back, _ = to_diffusers(state, meta, FLUX_CONVENTIONS)
    assert all(k.startswith("transformer.") for k in back)


def test_kohya_lora_trained_fused_loads_with_the_right_updates(tiny_model_dir):
    """sd-scripts trains qkv as ONE dense LoRA (shared down) and may mix ranks and alphas: every update survives."""
    g = torch.Generator().manual_seed(2)
    kohya = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(3, 32, generator=g),
             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(96, 3, generator=g),
             "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(6.0),
             "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(2, 32, generator=g),
             "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(32, 2, generator=g),
             "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(1.0)}
    state, header = to_diffusers(kohya, {}, FLUX_CONVENTIONS)
    pipe = FluxKontextPipeline.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    pipe.transformer.load_lora_adapter(state, prefix="transformer", adapter_name="k", metadata=peft_metadata(header))

    def update(module):
        layer = pipe.transformer.get_submodule(module)
        return layer.lora_B["k"].weight @ layer.lora_A["k"].weight * layer.scaling["k"]

    qkv = kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] @ \
        kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"] * 6.0 / 3
    for j, part in enumerate(("to_q", "to_k", "to_v")):
        torch.testing.assert_close(update(f"transformer_blocks.0.attn.{part}"), qkv[32 * j:32 * (j + 1)])
    proj = kohya["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"] @ \
        kohya["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"] * 1.0 / 2
    torch.testing.assert_close(update("transformer_blocks.0.attn.to_out.0"), proj)
