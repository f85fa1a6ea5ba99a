"""Several control images on the tiny pipeline: our sampler loop, and the shipped example config trained with two
control folders (latent cache on), sampled with two --ctrl_img, and resumed exactly."""

from __future__ import annotations

import math
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import run
from extensions.flux_kontext.generate import FluxKontextRenderer
from extensions.flux_kontext.multi_control import render_multi_control
from jobs.process.BaseSDTrainProcess import BaseSDTrainProcess
from tests.helpers import REPO
from toolkit.config.schema import ModelConfig
from tools.demo_data import build_demo_dataset
from toolkit.render.sampling import SampleRequest

EXAMPLE = REPO / "config" / "examples" / "train_lora_flux_kontext_multi_control_tiny.yaml"


def test_sampler_loop_is_the_pipeline_for_one_control_and_appends_two(tiny_model_dir, transformer_calls, tmp_path):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), arch="flux_kontext", max_sequence_length=16)
    renderer = FluxKontextRenderer.load(cfg, torch.device("cpu"), torch.float32)
    model = renderer.model
    rng = np.random.default_rng(0)
    first, second = (Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2))
    first.save(tmp_path / "a.png")
    second.save(tmp_path / "b.png")
    request = SampleRequest(index=0, prompt="invert", ctrl_img=tmp_path / "a.png", seed=5, width=64, height=64,
                            guidance_scale=2.5, steps=2)
    (by_pipeline,) = model.sample([request], [first])  # one control: FluxKontextPipeline itself
    embeds, pooled, _ = model.encode_captions(["invert"])
    by_loop = render_multi_control(model.pipe, [first], embeds, pooled, 64, 64, 2, 2.5,
                                   torch.Generator("cpu").manual_seed(5))
    assert np.array_equal(np.asarray(by_pipeline), np.asarray(by_loop))
    transformer_calls.clear()
    (both,) = model.sample([request], [[first, second]])
    assert both.size == (64, 64)
    # 64 px -> 8x8 latents -> 16 tokens per image: target, control 1, control 2 with frames 0, 1, 2.
    assert transformer_calls == [(48, Counter({0: 16, 1: 16, 2: 16}))] * 2
    # generate / compare: a request with a second --ctrl_img renders the same way through the LoRA renderer.
    transformer_calls.clear()
    two = replace(request, extra_ctrl_imgs=(tmp_path / "b.png",))
    (rendered,) = renderer.render([two], [first])
    assert transformer_calls == [(48, Counter({0: 16, 1: 16, 2: 16}))] * 2
    assert np.array_equal(np.asarray(rendered), np.asarray(both))


def _example_config(tmp_path: Path, model_dir: Path, data_dir: Path) -> Path:
    """The shipped example, pointed at test folders, shortened to 4 steps with a state every 2."""
    raw = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    process = raw["config"]["process"][0]
    dataset = process["datasets"][0]
    assert isinstance(dataset["control_path"], list) and len(dataset["control_path"]) == 2
    text = yaml.safe_dump(raw).replace("data/demo_multi", str(data_dir)).replace("models/tiny-flux-kontext",
                                                                                 str(model_dir))
    raw = yaml.safe_load(text)
    process = raw["config"]["process"][0]
    process["training_folder"] = str(tmp_path / "out")
    process["log_every"] = 1
    process["train"].update(steps=4, skip_first_sample=True)
    process["save"].update(save_every=2, max_step_saves_to_keep=10)
    process["sample"].update(sample_every=4, sample_steps=1)
    process["model"]["max_sequence_length"] = 16
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_example_trains_with_two_controls_samples_caches_and_resumes(tmp_path, tiny_model_dir, transformer_calls,
                                                                      monkeypatch, capsys):
    data = build_demo_dataset(tmp_path / "data", num_pairs=4, seed=0, num_controls=2)
    config = _example_config(tmp_path, tiny_model_dir, data)
    losses: list[float] = []
    original_loss = BaseSDTrainProcess.compute_loss

    def recording_loss(self, ctx, batch):
        assert "control_latents" in batch and "control_2_latents" in batch and "control" not in batch  # cached
        loss = original_loss(self, ctx, batch)
        losses.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(BaseSDTrainProcess, "compute_loss", recording_loss)
    assert run.main([str(config)]) == 0
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    # Training and sampling alike: the target's tokens, then as many tokens of each control (every control image
    # is cut and resized to its target's bucket), frames 0, 1, 2; buckets of 15 and 16 tokens at 64 px.
    assert {frames[0] for _, frames in transformer_calls} == {15, 16}
    assert all(set(frames) == {0, 1, 2} and frames[0] == frames[1] == frames[2] and seq == 3 * frames[0]
               for seq, frames in transformer_calls)
    run_dir = tmp_path / "out" / "tiny_kontext_multi_control"
    sheet = Image.open(run_dir / "samples" / "000000004_sheet.png")
    assert (run_dir / "samples" / "000000004_00.png").is_file() and sheet.width == 3 * 128  # control, control 2, sample
    assert "cache: " in capsys.readouterr().err

    final = run_dir / "tiny_kontext_multi_control.safetensors"
    reference = load_file(str(final))
    assert reference and all(torch.isfinite(t).all() for t in reference.values())
    final.unlink()
    shutil.rmtree(run_dir / "state" / "000000004")
    losses.clear()
    assert run.main([str(config)]) == 0
    assert "resuming from" in capsys.readouterr().err and len(losses) == 2
    resumed = load_file(str(final))
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


@pytest.mark.distributed
def test_two_processes_train_and_sample_with_two_controls_and_a_shared_disk_cache(tmp_path, tiny_model_dir):
    from tests.launch import accelerate_launch, explain

    data = build_demo_dataset(tmp_path / "data", num_pairs=4, seed=0, num_controls=2)
    config = _example_config(tmp_path, tiny_model_dir, data)
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    process = raw["config"]["process"][0]
    process["datasets"][0].update(cache_latents=False, cache_latents_to_disk=True, cache_dir=str(tmp_path / "cache"))
    process["train"].update(steps=2, batch_size=1, distributed_training=True)
    prompt = process["sample"]["prompts"][0]
    process["sample"].update(sample_every=2, prompts=[prompt, prompt + " --seed 9"])  # one prompt per rank
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")

    proc = accelerate_launch(REPO / "run.py", config)
    assert proc.returncode == 0, explain(proc)
    run_dir = tmp_path / "out" / "tiny_kontext_multi_control"
    assert (run_dir / "tiny_kontext_multi_control.safetensors").is_file()
    assert sorted(p.name for p in (run_dir / "samples").glob("000000002_0*.png")) == ["000000002_00.png",
                                                                                   "000000002_01.png"]
    entries = [load_file(str(p)) for p in (tmp_path / "cache").glob("latents-*.safetensors")]
    assert len(entries) == 4  # each item encoded once, by one of the ranks
    assert all(set(e) == {"target_latents", "control_latents", "control_2_latents"} for e in entries)
