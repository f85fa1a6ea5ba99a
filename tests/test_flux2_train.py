"""The shipped FLUX.2 [klein] example trains through run.py on the tiny model with two control folders, resumes bit
for bit, runs in 2 processes like 1, trains on plain images from caches, and its LoRA loads in Flux2KleinPipeline,
changes its output and gives the trainer's own sample image."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import run
from tests.helpers import REPO, merge, write_config

EXAMPLE = REPO / "config" / "examples" / "train_lora_flux2_klein_tiny.yaml"
NAME = "tiny_flux2_klein_demo"


def example(folder: Path, model_dir: Path, data_dir: Path, dataset: dict | None = None, **overrides) -> Path:
    """The shipped example with its model, data and output moved to the test folders; `dataset` updates its dataset
    (a None value removes the key)."""
    text = EXAMPLE.read_text(encoding="utf-8")
    text = text.replace('"models/tiny-flux2-klein"', f'"{model_dir}"')
    text = text.replace('"data/demo_multi/', f'"{data_dir}/').replace(" data/demo_multi/", f" {data_dir}/")
    cfg = merge(yaml.safe_load(text), {"training_folder": str(folder / "output"), "log_every": 1, **overrides})
    entry = cfg["config"]["process"][0]["datasets"][0]
    for key, value in (dataset or {}).items():
        entry.pop(key) if value is None else entry.update({key: value})
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(folder / "flux2.yaml", cfg)


def test_example_lora_loads_in_the_pipeline_and_equals_the_trainer_sample(tmp_path, tiny_flux2_dir, flux2_data):
    from diffusers import Flux2KleinPipeline

    steps = 3
    config = example(tmp_path, tiny_flux2_dir, flux2_data, **{
        "train.steps": steps, "train.lr": 5e-2, "save.save_every": 1000, "sample.sample_every": steps,
        "train.skip_first_sample": True, "sample.sample_steps": 2})
    assert run.main([str(config)]) == 0
    run_dir = tmp_path / "output" / NAME
    final = run_dir / f"{NAME}.safetensors"
    state = load_file(str(final))
    assert state and all(k.startswith(("transformer.transformer_blocks.", "transformer.single_transformer_blocks."))
                         for k in state)
    for layer in (".attn.to_qkv_mlp_proj.", ".ff.linear_in.", ".ff_context.linear_out.", ".attn.add_q_proj."):
        assert any(layer in k for k in state), layer

    from toolkit.render.sampling import load_control

    # Resized to the sample's area as the trainer's sampler does (as training sees them: at the target's size);
    # the pipeline itself would take them at their own size.
    controls = [load_control(flux2_data / sub / "sample_000.png", 64, 64) for sub in ("sample_control",
                                                                                       "sample_control_2")]
    pipe = Flux2KleinPipeline.from_pretrained(tiny_flux2_dir, dtype=torch.float32)

    def render() -> np.ndarray:
        image = pipe(image=controls, prompt="inv3rt invert the colors", guidance_scale=1.0, width=64, height=64,
                     num_inference_steps=2, generator=torch.Generator().manual_seed(42), max_sequence_length=64,
                     output_type="np").images[0]
        return image * 255  # 8-bit scale, before rounding

    without = render()
    pipe.load_lora_weights(str(final))
    with_lora = render()
    assert np.abs(with_lora - without).max() > 2, "the LoRA changed nothing"
    trainer_sample = np.asarray(Image.open(run_dir / "samples" / f"{steps:09d}_00.png").convert("RGB"), dtype=float)
    assert np.abs(trainer_sample - with_lora).max() <= 0.51
    assert np.abs(trainer_sample - without).max() > 2


def test_example_resumes_bit_identically(tmp_path, tiny_flux2_dir, flux2_data, capsys):
    from tests.example_configs import scalars

    config = example(tmp_path, tiny_flux2_dir, flux2_data, **{
        "train.steps": 2, "save.save_every": 1, "sample.prompts": []})
    assert run.main([str(config)]) == 0
    run_dir = tmp_path / "output" / NAME
    final = run_dir / f"{NAME}.safetensors"
    reference = load_file(str(final))
    losses = scalars(run_dir / "logs", "train/loss")
    assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())

    final.unlink()
    shutil.rmtree(run_dir / "state" / "000000002")
    capsys.readouterr()
    assert run.main([str(config)]) == 0  # step 2 again, from the state of step 1 (optimizer, RNG, data position)
    assert "resuming from" in capsys.readouterr().err
    resumed = load_file(str(final))
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_plain_images_train_from_cached_latents_and_text(tmp_path, tiny_flux2_dir, flux2_data):
    """No control_path: text-to-image training (no reference tokens), latents and prompt embeddings cached, the
    text encoder unloaded, and a sample without --ctrl_img with true CFG (its empty negative prompt was kept)."""
    config = example(tmp_path, tiny_flux2_dir, flux2_data, {"control_path": None, "cache_latents": True}, **{
        "train.steps": 2, "save.save_every": 1000, "train.cache_text_embeddings": True, "sample.sample_every": 2,
        "train.skip_first_sample": True, "sample.prompts": ["[trigger] a picture"], "sample.guidance_scale": 2.0})
    assert run.main([str(config)]) == 0
    run_dir = tmp_path / "output" / NAME
    assert any(v.abs().max() > 0 for k, v in load_file(str(run_dir / f"{NAME}.safetensors")).items()
               if ".lora_B." in k)
    assert (run_dir / "samples" / "000000002_00.png").is_file()


@pytest.mark.distributed
def test_two_processes_batch_1_equal_one_process_batch_2(tmp_path, tiny_flux2_dir, flux2_data):
    """One SGD step (lr 1, no clipping): LoRA B starts at 0, so after the step it IS the gradient; two ranks of one
    item each must all-reduce to the single process's batch of two (tests/dist_scripts/one_step.py)."""
    from tests.launch import SCRIPTS, accelerate_launch, explain, lora_tensors

    common = {"sample.prompts": [], "train.optimizer": "sgd", "train.lr": 1.0, "train.max_grad_norm": 0.0,
              "train.steps": 1}
    no_dropout = {"caption_dropout_rate": 0.0}
    single = example(tmp_path / "one", tiny_flux2_dir, flux2_data, no_dropout, **{**common, "train.batch_size": 2})
    ddp = example(tmp_path / "two", tiny_flux2_dir, flux2_data, no_dropout, **{
        **common, "train.batch_size": 1, "train.distributed_training": True})
    runpy.run_path(str(SCRIPTS / "one_step.py"))["main"](str(single), tmp_path / "single.safetensors")
    proc = accelerate_launch(SCRIPTS / "one_step.py", ddp, tmp_path / "ddp.safetensors")
    assert proc.returncode == 0, explain(proc)
    seen = [json.loads((tmp_path / f"ddp.safetensors.rank{r}.json").read_text()) for r in range(2)]
    assert [(s["world_size"], s["ddp"], s["frozen_synced"]) for s in seen] == [(2, "DistributedDataParallel", [])] * 2
    one, two = lora_tensors(tmp_path / "single.safetensors"), lora_tensors(tmp_path / "ddp.safetensors")
    assert one.keys() == two.keys() and one
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-6, worst
    assert max(one[k].abs().max().item() for k in one if ".lora_B." in k) > 1e-3
