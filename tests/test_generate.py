"""`run.py generate` and `type: generate`: base vs LoRA images, determinism, PNG parameters, contact sheet, errors."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import yaml
from diffusers import FluxKontextPipeline
from PIL import Image

import run
from extensions.flux_kontext.lora_keys import FLUX_CONVENTIONS
from extensions.flux_kontext.model import LORA_TARGETS
from toolkit.config import load_job_config
from toolkit.config.schema import GenerateProcessConfig
from toolkit.errors import ConfigError
from toolkit.adapters.lora import add_lora, lora_state_dict, make_lora_config, save_lora
from toolkit.adapters.lora_convert import convert_file
from toolkit.render.pngmeta import A1111_KEY, read_png_params
from toolkit.render.sampling import contact_sheet


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_model_dir):
    """The same random LoRA (alpha != rank) as a diffusers file and as a ComfyUI file."""
    folder = tmp_path_factory.mktemp("loras")
    pipe = FluxKontextPipeline.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    config = make_lora_config(4, 8, LORA_TARGETS)
    add_lora(pipe.transformer, config)
    g = torch.Generator().manual_seed(1)
    for name, param in pipe.transformer.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=g) * 0.3
    diffusers_file = save_lora(folder / "edit.safetensors", lora_state_dict(pipe.transformer), config, "float32")
    return diffusers_file, convert_file(diffusers_file, folder / "edit_comfy.safetensors", "comfy", FLUX_CONVENTIONS)


def _generate(out, model_dir, controls, *extra):
    argv = ["generate", "--model", str(model_dir), "--ctrl-img", str(controls), "--prompt", "inv3rt invert",
            "--width", "64", "--height", "64", "--steps", "2", "--seed", "5", "--max-sequence-length", "16",
            "--device", "cpu", "--out", str(out), *extra]
    assert run.main(argv) == 0


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_generate_base_and_loras_side_by_side(tmp_path, tiny_model_dir, demo_data_dir, loras):
    diffusers_file, comfy_file = loras
    controls = demo_data_dir / "sample_control"  # a folder: two images
    _generate(tmp_path / "a", tiny_model_dir, controls, "--lora", str(diffusers_file), "--lora", str(comfy_file),
              "--batch-size", "2")
    out = tmp_path / "a"
    base, with_lora, with_comfy = (_pixels(out / f"sample_000_p00_{c}.png") for c in ("base", "edit", "edit_comfy"))
    assert np.abs(with_lora - base).max() > 10, "the LoRA changed nothing"
    assert np.abs(with_comfy - with_lora).max() <= 1, "the ComfyUI layout renders differently"

    params = read_png_params(out / "sample_000_p00_edit.png")
    assert params["prompt"] == "inv3rt invert" and params["seed"] == 5 and params["steps"] == 2
    assert params["guidance_scale"] == 2.5 and params["lora"] == str(diffusers_file) and params["lora_scale"] == 1.0
    assert read_png_params(out / "sample_000_p00_base.png")["lora"] is None
    assert Image.open(out / "sample_000_p00_edit.png").text[A1111_KEY].startswith("inv3rt invert\n")

    # 2 rows (control images) x 4 columns (control | base | 2 LoRAs), 64 px images in 128 px cells, titled.
    assert Image.open(out / "contact_sheet.png").size == (4 * 128, 20 + 2 * (128 + 20))

    # Same seed, one image at a time this time: the same pixels.
    _generate(tmp_path / "b", tiny_model_dir, controls / "sample_000.png", "--lora", str(diffusers_file))
    assert np.abs(_pixels(tmp_path / "b" / "sample_000_p00_base.png") - base).max() <= 1
    assert np.abs(_pixels(tmp_path / "b" / "sample_000_p00_edit.png") - with_lora).max() <= 1


def test_lora_scale_zero_is_the_base_model(tmp_path, tiny_model_dir, demo_data_dir, loras):
    control = demo_data_dir / "sample_control" / "sample_001.png"
    _generate(tmp_path, tiny_model_dir, control, "--lora", str(loras[0]), "--lora-scale", "0")
    assert np.array_equal(_pixels(tmp_path / "sample_001_p00_base.png"), _pixels(tmp_path / "sample_001_p00_edit.png"))


def test_generate_yaml_process_is_strict(tmp_path, tiny_model_dir, demo_data_dir):
    data = {"job": "extension", "config": {"name": "gen", "process": [{
        "type": "generate", "model": {"name_or_path": str(tiny_model_dir), "arch": "flux_kontext"},
        "generate": {"prompts": ["x"], "ctrl_img": str(demo_data_dir / "sample_control"), "width": 64}}]}}
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_job_config(path)
    assert "config.process[0].generate.width: set width and height together" in str(caught.value)

    data["config"]["process"][0]["type"] = "generat"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_job_config(path)
    assert "config.process[0].type: " in str(caught.value) and "did you mean 'generate'" in str(caught.value)


def test_job_generate_makes_untyped_processes_generate(tmp_path, tiny_model_dir, demo_data_dir):
    process = {"model": {"name_or_path": str(tiny_model_dir), "arch": "flux_kontext"},
               "generate": {"prompts": ["x"], "ctrl_img": str(demo_data_dir / "sample_control")}}
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump({"job": "generate", "config": {"name": "gen", "process": [process]}}),
                    encoding="utf-8")
    job = load_job_config(path)
    assert job.job == "generate" and isinstance(job.config.process[0], GenerateProcessConfig)
    # Under job: extension the same process is read as a trainer and its generate key is unknown.
    path.write_text(yaml.safe_dump({"job": "extension", "config": {"name": "gen", "process": [process]}}),
                    encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_job_config(path)
    assert "config.process[0].generate: unknown key" in str(caught.value)


def test_missing_lora_file_fails_before_the_model_loads(tmp_path, tiny_model_dir, demo_data_dir, monkeypatch,
                                                        capsys):
    from extensions.flux_kontext import FluxKontext

    monkeypatch.setattr(FluxKontext, "load", classmethod(lambda *a, **k: pytest.fail("model loaded")))
    argv = ["generate", "--model", str(tiny_model_dir), "--ctrl-img", str(demo_data_dir / "sample_control"),
            "--prompt", "x", "--lora", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o")]
    assert run.main(argv) == 2
    assert "LoRA file(s) not found" in capsys.readouterr().err


def test_contact_sheet_takes_any_number_of_columns():
    img = Image.new("RGB", (64, 64))
    assert contact_sheet([(img, img, "a"), (img, img, "b")]).size == (256, 2 * 148)  # the training layout
    sheet = contact_sheet([(img, img, img, img, img, "a")], column_titles=["c", "1", "2", "3", "4"])
    assert sheet.size == (5 * 128, 20 + 148)


def test_loras_load_on_a_quantized_transformer(tmp_path, tiny_model_dir, demo_data_dir, loras):
    """pipe.load_lora_weights fails on quanto weights; both layouts go through transformer.load_lora_adapter."""
    diffusers_file, comfy_file = loras
    _generate(tmp_path, tiny_model_dir, demo_data_dir / "sample_control" / "sample_000.png", "--quantize",
              "--lora", str(diffusers_file), "--lora", str(comfy_file))
    base, with_lora, with_comfy = (_pixels(tmp_path / f"sample_000_p00_{c}.png") for c in ("base", "edit", "edit_comfy"))
    assert np.abs(with_lora - base).max() > 10
    assert np.abs(with_comfy - with_lora).max() <= 1
