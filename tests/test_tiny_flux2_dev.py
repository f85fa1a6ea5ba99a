"""The tiny FLUX.2 [dev] folder loads in diffusers' Flux2Pipeline, encodes prompts with the real chat format,
edits with a reference image, and rebuilds byte-identically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_tiny_model import tree_digest
from tools.tiny_flux2_dev import build_tiny_flux2_dev_pipeline


@pytest.fixture(scope="module")
def pipe(tiny_flux2_dev_dir: Path):
    from diffusers import Flux2Pipeline

    return Flux2Pipeline.from_pretrained(tiny_flux2_dev_dir, dtype=torch.float32)


def test_chat_template_renders_mistral_small_format_with_real_special_ids(pipe) -> None:
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    tok = pipe.tokenizer
    text = tok.apply_chat_template(format_input(["make it red"], system_message="SYS"), tokenize=False)[0]
    assert text == "<s>[SYSTEM_PROMPT]SYS[/SYSTEM_PROMPT][INST]make it red[/INST]"
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<s>", "[INST]", "[/INST]", "[IMG]", "<pad>", "[SYSTEM_PROMPT]")}
    assert ids == {"<s>": 1, "[INST]": 3, "[/INST]": 4, "[IMG]": 10, "<pad>": 11, "[SYSTEM_PROMPT]": 17}
    assert pipe.text_encoder.config.image_token_index == 10
    assert pipe.text_encoder.config.text_config.pad_token_id == tok.pad_token_id
    # Every special token is one id (the template's markers never split into bytes).
    encoded = tok(text, add_special_tokens=False).input_ids
    assert encoded[:2] == [1, 17] and encoded[-1] == 4


def test_text_encoder_reaches_the_deepest_hidden_state_the_pipeline_reads(pipe) -> None:
    # Flux2Pipeline's default text_encoder_out_layers are (10, 20, 30): the tiny text model has exactly 30 layers.
    assert pipe.text_encoder.config.text_config.num_hidden_layers == 30
    hidden = pipe.text_encoder.config.text_config.hidden_size
    assert pipe.transformer.config.joint_attention_dim == 3 * hidden
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels


def test_pipeline_edits_a_64px_reference_image(pipe) -> None:
    reference = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8))
    edited = pipe(image=reference, prompt="make it red", height=64, width=64, num_inference_steps=2,
                  max_sequence_length=64, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert edited.shape == (64, 64, 3) and np.isfinite(edited).all()


def test_latent_statistics_are_not_the_identity(pipe) -> None:
    assert pipe.vae.bn.running_mean.abs().max() > 0
    assert not torch.allclose(pipe.vae.bn.running_var, torch.ones_like(pipe.vae.bn.running_var))


def test_folder_names_the_real_classes(tiny_flux2_dev_dir: Path) -> None:
    index = json.loads((tiny_flux2_dev_dir / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2Pipeline"
    assert index["text_encoder"] == ["transformers", "Mistral3ForConditionalGeneration"]
    assert index["transformer"] == ["diffusers", "Flux2Transformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLFlux2"]
    processor = json.loads((tiny_flux2_dev_dir / "tokenizer" / "processor_config.json").read_text())
    assert (processor["processor_class"], processor["patch_size"], processor["spatial_merge_size"]) == \
        ("PixtralProcessor", 14, 2)
    # The image half of the processor (PixtralProcessor itself needs torchvision) loads from the same folder.
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    images = PixtralImageProcessorPil.from_pretrained(tiny_flux2_dev_dir / "tokenizer")
    assert images.patch_size == {"height": 14, "width": 14}


def test_rebuild_is_byte_identical_and_seed_matters(tiny_flux2_dev_dir: Path, tmp_path: Path) -> None:
    assert tree_digest(build_tiny_flux2_dev_pipeline(tmp_path / "again", seed=0)) == tree_digest(tiny_flux2_dev_dir)
    other = tree_digest(build_tiny_flux2_dev_pipeline(tmp_path / "other", seed=1))
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert other[weights] != tree_digest(tiny_flux2_dev_dir)[weights]


def test_cli_builds_flux2(tmp_path: Path) -> None:
    from tools.tiny_model import main

    main(["--arch", "flux2", "--out", str(tmp_path / "cli")])
    assert (tmp_path / "cli" / "model_index.json").is_file()
