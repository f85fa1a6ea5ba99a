"""save.format comfy for Qwen-Image-Edit: the kohya/ComfyUI layout (lora_unet_<diffusers name>) converts both ways
exactly, and QwenImageEditPlusPipeline.load_lora_weights reads the comfy file with the diffusers file's effect."""

from __future__ import annotations

import json

import numpy as np
import torch
from diffusers import QwenImageEditPlusPipeline
from safetensors.torch import save_file

import run
from extensions.qwen_image_edit.lora_keys import QWEN_MODULES
from extensions.qwen_image_edit.model import LORA_TARGETS
from extensions.qwen_image_edit.processor import load_processor
from tests.qwen_helpers import control_image
from tests.test_qwen_math import small_reference_area
from toolkit.adapters.lora import adapter_metadata, add_lora, lora_state_dict, make_lora_config
from toolkit.adapters.lora_convert import detect_format, get_conventions, peft_metadata, read_lora, to_comfy

RANK, ALPHA = 4, 2  # alpha != rank: a scale lost anywhere shows


def _pipe(folder):
    return QwenImageEditPlusPipeline.from_pretrained(folder, processor=load_processor(str(folder)),
                                                     dtype=torch.float32)


def _lora_file(pipe, path, targets):
    config = make_lora_config(RANK, ALPHA, targets)
    add_lora(pipe.transformer, config)
    g = torch.Generator().manual_seed(0)
    for name, param in pipe.transformer.named_parameters():
        if "lora_B" in name:  # B starts at zero; a random B makes the LoRA change the output
            param.data = torch.randn(param.shape, generator=g) * 0.3
    header = {"format": "pt", "lora_adapter_metadata": json.dumps(adapter_metadata(config), default=str)}
    save_file(lora_state_dict(pipe.transformer), str(path), metadata=header)
    return path


def test_comfy_layout_round_trips_and_loads_in_the_pipeline_like_the_diffusers_file(tmp_path, tiny_qwen_dir,
                                                                                  monkeypatch):
    small_reference_area(monkeypatch)  # the pipeline's ~1024x1024 references take minutes on a CPU
    # The default targets plus the modulation and top-level linears: every name the layout lists.
    targets = LORA_TARGETS + r"|.*transformer_blocks\.\d+\.(img_mod\.1|txt_mod\.1)|img_in|txt_in|proj_out"
    lora = _lora_file(_pipe(tiny_qwen_dir), tmp_path / "lora.safetensors", targets)
    state, header = read_lora(lora)
    comfy, _ = to_comfy(state, header, get_conventions("qwen_image_edit_plus"))
    assert detect_format(comfy) == "comfy" and all(m.parts == (m.original,) for m in QWEN_MODULES)  # none fused
    for name in ("transformer_blocks_0_attn_add_q_proj", "transformer_blocks_1_img_mlp_net_0_proj",
                 "transformer_blocks_0_img_mod_1", "img_in"):
        assert float(comfy[f"lora_unet_{name}.alpha"]) == ALPHA and comfy[f"lora_unet_{name}.lora_down.weight"] \
            .shape[0] == RANK

    comfy_path, back_path = tmp_path / "comfy.safetensors", tmp_path / "back.safetensors"
    assert run.main(["convert-lora", str(lora), str(comfy_path), "--to", "comfy", "--arch", "qwen_image_edit_plus"]) == 0
    assert run.main(["convert-lora", str(comfy_path), str(back_path), "--to", "diffusers",
                     "--arch", "qwen_image_edit_plus"]) == 0
    back, back_header = read_lora(back_path)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert peft_metadata(back_header)["transformer.lora_alpha"] == ALPHA

    pipe = _pipe(tiny_qwen_dir)
    controls = [control_image(64, 48, seed) for seed in (1, 2)]

    def render() -> np.ndarray:
        return pipe(image=controls, prompt="make it blue", true_cfg_scale=1.0, width=64, height=48,
                    num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="np").images[0]

    base = render()
    pipe.load_lora_weights(str(lora), adapter_name="diffusers_file")
    from_diffusers = render()
    pipe.delete_adapters("diffusers_file")
    pipe.load_lora_weights(str(comfy_path), adapter_name="comfy_file")
    from_comfy = render()
    assert np.abs(from_diffusers - base).max() * 255 > 2, "the LoRA changed nothing"
    np.testing.assert_allclose(from_comfy, from_diffusers, atol=1e-5)


def test_generate_loads_the_comfy_file_like_the_diffusers_file(tmp_path, tiny_qwen_dir, monkeypatch):
    """run.py generate / compare (QwenEditRenderer) read save.format comfy files too."""
    from extensions.qwen_image_edit.generate import QwenEditRenderer
    from toolkit.adapters.lora_convert import convert_file
    from toolkit.config.schema import ModelConfig
    from toolkit.render.sampling import SampleRequest

    small_reference_area(monkeypatch)
    lora = _lora_file(_pipe(tiny_qwen_dir), tmp_path / "lora.safetensors", LORA_TARGETS)
    comfy = convert_file(lora, tmp_path / "comfy.safetensors", "comfy", get_conventions("qwen_image_edit_plus"))
    renderer = QwenEditRenderer.load(ModelConfig(name_or_path=str(tiny_qwen_dir), arch="qwen_image_edit_plus",
                                                 match_target_res=True), torch.device("cpu"), torch.float32)
    renderer.add_lora(lora, "diffusers_file")
    renderer.add_lora(comfy, "comfy_file")
    request = SampleRequest(index=0, prompt="make it blue", ctrl_img=tmp_path, seed=3, width=64, height=48,
                            guidance_scale=1.0, steps=2)

    def render(adapter):
        renderer.use_lora(adapter)
        return np.asarray(renderer.model.sample([request], [[control_image(64, 48, 1)]])[0], dtype=np.int16)

    base, from_diffusers, from_comfy = render(None), render("diffusers_file"), render("comfy_file")
    assert np.abs(from_diffusers - base).max() > 2, "the LoRA changed nothing"
    assert np.abs(from_comfy - from_diffusers).max() <= 1
