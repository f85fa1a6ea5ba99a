"""FLUX.2 [dev] (arch flux2, Flux2Pipeline with Mistral 3) on the tiny [dev] model: training inputs and samples equal
the pipeline's, and its tiny example trains (cached latents and captions), samples, saves a LoRA that loads in
Flux2Pipeline and in ComfyUI's layout, and runs in 2 processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import run
from tests.helpers import REPO, merge, write_config
from tests.qwen_helpers import batch_of, control_image
from tests.test_flux2_math import MAX_LENGTH, capture_transformer_call, load_flux2
from toolkit.render.sampling import SampleRequest, load_control

EXAMPLE = REPO / "config" / "examples" / "train_lora_flux2_dev_tiny.yaml"
NAME = "tiny_flux2_dev_demo"


@pytest.fixture(scope="module")
def dev(tiny_flux2_dev_dir):
    return load_flux2(tiny_flux2_dev_dir, arch="flux2")


def test_denoiser_and_sampler_equal_the_pipeline(dev) -> None:
    controls = [control_image(64, 64, seed=1), control_image(96, 64, seed=2)]
    seen, out = capture_transformer_call(dev.pipe, image=controls, prompt="make it red", width=64, height=64)
    encoded = dev.encode_batch(batch_of([control_image(64, 64, 9)], [[controls[0]]], ["make it red"]))
    assert torch.equal(encoded.prompt_embeds, seen["encoder_hidden_states"])  # Mistral, the pipeline's method
    n = encoded.x0.shape[1]
    inputs = dev.denoiser_inputs(encoded, seen["hidden_states"][:, :n], seen["timestep"], guidance=1.0)
    assert torch.equal(inputs["guidance"], seen["guidance"])
    inputs.update(reference_tokens=seen["hidden_states"][:, n:],
                  img_ids=seen["img_ids"][0])  # the pipeline's two references (ours: one, same target ids)
    assert torch.equal(dev.denoiser_inputs(encoded, inputs["hidden_states"], seen["timestep"], 1.0)["img_ids"],
                       seen["img_ids"][0, :2 * n])
    with torch.no_grad():
        assert torch.equal(dev.denoiser()(**inputs), out[:, :n])

    request = SampleRequest(index=0, prompt="make it red", ctrl_img=None, seed=5, width=64, height=64,
                            guidance_scale=4.0, steps=2)
    ours = dev.sample([request], [controls])[0]
    theirs = dev.pipe(image=controls, prompt="make it red", width=64, height=64, num_inference_steps=2,
                      guidance_scale=4.0, generator=torch.Generator().manual_seed(5),
                      max_sequence_length=MAX_LENGTH).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def example(folder: Path, model_dir: Path, data_dir: Path, **overrides) -> Path:
    text = EXAMPLE.read_text(encoding="utf-8")
    text = text.replace('"models/tiny-flux2-dev"', f'"{model_dir}"')
    text = text.replace('"data/demo/', f'"{data_dir}/').replace(" data/demo/", f" {data_dir}/")
    cfg = merge(yaml.safe_load(text), {"training_folder": str(folder / "output"), "log_every": 1, **overrides})
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(folder / "dev.yaml", cfg)


def test_example_trains_and_its_lora_loads_in_the_pipeline_in_both_layouts(tmp_path, tiny_flux2_dev_dir,
                                                                           demo_data_dir) -> None:
    from diffusers import Flux2Pipeline

    from toolkit.adapters.lora_convert import detect_format

    steps = 2
    config = example(tmp_path, tiny_flux2_dev_dir, demo_data_dir, **{
        "train.steps": steps, "train.lr": 5e-2, "save.save_every": 1000, "sample.sample_every": steps,
        "train.skip_first_sample": True, "save.format": "comfy", "sample.sample_steps": 2})
    assert run.main([str(config)]) == 0
    run_dir = tmp_path / "output" / NAME
    final = run_dir / f"{NAME}.safetensors"
    assert detect_format(load_file(str(final))) == "comfy"  # ComfyUI / BFL names

    pipe = Flux2Pipeline.from_pretrained(tiny_flux2_dev_dir, dtype=torch.float32)
    control = load_control(demo_data_dir / "sample_control" / "sample_000.png", 64, 64)

    def render() -> np.ndarray:
        image = pipe(image=[control], prompt="inv3rt invert the colors", guidance_scale=4.0, width=64, height=64,
                     num_inference_steps=2, generator=torch.Generator().manual_seed(42), max_sequence_length=64,
                     output_type="np").images[0]
        return image * 255

    without = render()
    pipe.load_lora_weights(str(final))  # diffusers converts the ComfyUI layout itself
    with_lora = render()
    assert np.abs(with_lora - without).max() > 2, "the LoRA changed nothing"
    trainer_sample = np.asarray(Image.open(run_dir / "samples" / f"{steps:09d}_00.png").convert("RGB"), dtype=float)
    assert np.abs(trainer_sample - with_lora).max() <= 0.51


@pytest.mark.distributed
def test_example_runs_in_two_processes(tmp_path, tiny_flux2_dev_dir, demo_data_dir) -> None:
    from tests.launch import accelerate_launch, explain

    config = example(tmp_path, tiny_flux2_dev_dir, demo_data_dir, **{
        "train.steps": 2, "save.save_every": 1000, "sample.sample_every": 2, "train.skip_first_sample": True})
    proc = accelerate_launch(REPO / "run.py", config)
    assert proc.returncode == 0, explain(proc)
    run_dir = tmp_path / "output" / NAME
    assert load_file(str(run_dir / f"{NAME}.safetensors"))
    assert (run_dir / "samples" / "000000002_00.png").is_file()
