"""The tiny Qwen-Image-Edit-Plus folder loads in diffusers, encodes prompts as the real one does, generates, and
rebuilds byte-identically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_tiny_model import tree_digest
from tools.tiny_qwen import SYSTEM_PROMPT, build_tiny_qwen_pipeline


@pytest.fixture(scope="module")
def pipe(tiny_qwen_dir: Path):
    from diffusers import QwenImageEditPlusPipeline

    from extensions.qwen_image_edit.processor import load_processor

    return QwenImageEditPlusPipeline.from_pretrained(tiny_qwen_dir, processor=load_processor(str(tiny_qwen_dir)),
                                                     dtype=torch.float32)


def test_system_prompt_is_the_64_tokens_the_pipeline_drops(pipe) -> None:
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert SYSTEM_PROMPT in prefix
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 64


def test_special_tokens_are_single_ids_known_to_the_text_encoder(pipe) -> None:
    config = pipe.text_encoder.config
    tok = pipe.tokenizer
    assert tok.convert_tokens_to_ids("<|image_pad|>") == config.image_token_id
    assert tok.convert_tokens_to_ids("<|vision_start|>") == config.vision_start_token_id
    ids = tok("Picture 1: <|vision_start|><|image_pad|><|vision_end|>").input_ids
    assert ids[-3:] == [config.vision_start_token_id, config.image_token_id, config.vision_end_token_id]


def test_prompt_encoding_sees_the_control_image(pipe) -> None:
    red = Image.new("RGB", (384, 384), (200, 30, 30))
    blue = Image.new("RGB", (384, 384), (20, 30, 200))
    with torch.no_grad():
        red_embeds, _ = pipe.encode_prompt("make it red", image=[red])
        blue_embeds, _ = pipe.encode_prompt("make it red", image=[blue])
    # 384x384 -> 392x392 in 14 px patches, 2x2 merged: 196 image tokens between the vision markers.
    assert red_embeds.shape[1] > 196
    assert not torch.equal(red_embeds, blue_embeds)


def test_pipeline_generates_64px_image(pipe) -> None:
    control = Image.new("RGB", (64, 64), (200, 30, 30))
    image = pipe(image=[control], prompt="make it red", height=64, width=64, num_inference_steps=2,
                 true_cfg_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all()


def test_folder_names_the_real_classes(tiny_qwen_dir: Path) -> None:
    index = json.loads((tiny_qwen_dir / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPlusPipeline"
    assert index["processor"] == ["transformers", "Qwen2VLProcessor"]
    assert index["text_encoder"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    scheduler = json.loads((tiny_qwen_dir / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["max_shift"], scheduler["max_image_seq_len"], scheduler["time_shift_type"]) == \
        (0.9, 8192, "exponential")


def test_2511_variant_sets_zero_cond_t(tmp_path: Path) -> None:
    folder = build_tiny_qwen_pipeline(tmp_path / "q2511", variant="2511")
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert config["zero_cond_t"] is True


def test_rebuild_is_byte_identical(tiny_qwen_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_qwen_pipeline(tmp_path / "again")
    assert tree_digest(again) == tree_digest(tiny_qwen_dir)


def test_cli_builds_qwen(tmp_path: Path) -> None:
    from tools.tiny_model import main

    main(["--arch", "qwen_image_edit_plus", "--out", str(tmp_path / "cli")])
    assert json.loads((tmp_path / "cli" / "model_index.json").read_text())["_class_name"] == \
        "QwenImageEditPlusPipeline"
