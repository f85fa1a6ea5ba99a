"""The tiny FLUX Kontext folder loads in diffusers, generates, and rebuilds byte-identically."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from toolkit.errors import UserError
from tools.tiny_model import MARKER_NAME, PRESETS, build_tiny_pipeline


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder, keyed by its relative path."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path):
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_pipeline_generates_64px_image(pipe) -> None:
    control = Image.new("RGB", (64, 64), (200, 30, 30))
    result = pipe(
        image=control, prompt="make it red", height=64, width=64, max_area=64 * 64, _auto_resize=False,
        num_inference_steps=2, guidance_scale=2.5, max_sequence_length=32,
        generator=torch.Generator().manual_seed(0),
    )
    image = result.images[0]
    assert image.size == (64, 64)
    assert np.isfinite(np.asarray(image, dtype=np.float32)).all()


def test_encode_prompt_shapes(pipe) -> None:
    prompt_embeds, pooled, text_ids = pipe.encode_prompt("make it red", prompt_2=None, max_sequence_length=32)
    shapes = PRESETS["tiny"]
    assert prompt_embeds.shape == (1, 32, shapes["transformer"]["joint_attention_dim"])
    assert pooled.shape == (1, shapes["transformer"]["pooled_projection_dim"])
    assert text_ids.shape == (32, 3)


def test_transformer_is_kontext_dev_shaped(pipe) -> None:
    config = pipe.transformer.config
    assert config.guidance_embeds is True
    assert config.in_channels == 64
    assert pipe.vae_scale_factor == 8
    assert pipe.vae.config.latent_channels == 16
    assert (pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor) == (0.1159, 0.3611)
    assert sum(p.numel() for p in pipe.transformer.parameters()) < 150_000


def test_model_index_names_the_kontext_classes(tiny_model_dir: Path) -> None:
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxKontextPipeline"
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["tokenizer_2"] == ["transformers", "T5TokenizerFast"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_shapes_fit_together(preset: str) -> None:
    shapes = PRESETS[preset]
    transformer = shapes["transformer"]
    assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
    assert transformer["joint_attention_dim"] == shapes["t5"]["d_model"]
    assert transformer["pooled_projection_dim"] == shapes["clip"]["hidden_size"]
    assert len(shapes["vae"]["block_out_channels"]) == 4


PROMPTS = ["make it red", "Invert the COLORS, please!", "zebra xylophone 1234 ünïcödé 東京 🎨", ""]


def test_tokenizers_stay_inside_encoder_vocab(pipe) -> None:
    clip_ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    t5_ids = pipe.tokenizer_2(PROMPTS, padding="max_length", max_length=32, truncation=True).input_ids
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.tokenizer_2.model_max_length == 512
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size
    assert len(pipe.tokenizer_2) == pipe.text_encoder_2.config.vocab_size
    assert max(map(max, clip_ids)) < pipe.text_encoder.config.vocab_size
    assert max(map(max, t5_ids)) < pipe.text_encoder_2.config.vocab_size
    # Byte-level BPE never needs an unknown token; CLIP pools at the eos the config names.
    assert pipe.tokenizer.eos_token_id == pipe.text_encoder.config.eos_token_id != 2
    assert all(ids[0] == pipe.tokenizer.bos_token_id for ids in clip_ids)
    assert (pipe.tokenizer_2.pad_token_id, pipe.tokenizer_2.eos_token_id, pipe.tokenizer_2.unk_token_id) == (0, 1, 2)
    assert pipe.tokenizer_2("make it red").input_ids[-1] == 1


def test_rebuild_is_byte_identical_and_seed_matters(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_pipeline(tmp_path / "again", preset="tiny", seed=0)
    assert tree_digest(again) == tree_digest(tiny_model_dir)
    other = tree_digest(build_tiny_pipeline(tmp_path / "other", preset="tiny", seed=1))
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert other[weights] != tree_digest(tiny_model_dir)[weights]


def test_complete_build_is_reused_and_foreign_folder_is_kept(tmp_path: Path) -> None:
    out = build_tiny_pipeline(tmp_path / "model")
    marker_mtime = (out / MARKER_NAME).stat().st_mtime_ns
    assert build_tiny_pipeline(tmp_path / "model") == out
    assert (out / MARKER_NAME).stat().st_mtime_ns == marker_mtime
    with pytest.raises(UserError, match="--overwrite"):
        build_tiny_pipeline(out, seed=1)
    assert build_tiny_pipeline(out, seed=1, overwrite=True) == out
    assert json.loads((out / MARKER_NAME).read_text())["seed"] == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_unknown_preset_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown preset"):
        build_tiny_pipeline(tmp_path / "x", preset="huge")
