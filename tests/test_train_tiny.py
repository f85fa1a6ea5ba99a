"""A few real training steps on the tiny pipeline: the loss falls, only the LoRA changes, the files load in diffusers."""

from __future__ import annotations

import json

import numpy as np
import torch
from diffusers import FluxKontextPipeline
from PIL import Image
from safetensors.torch import load_file

from jobs import get_job
from tests.helpers import first_bucket_batch, fixed_inputs, merge, tiny_config_dict, write_config
from toolkit.train import flow_matching
from toolkit.adapters.lora import read_lora_metadata


def _job(tmp_path, model_dir, data_dir, **overrides):
    cfg = merge(tiny_config_dict(tmp_path / "out", model_dir, data_dir), overrides)
    return get_job(write_config(tmp_path / "cfg.yaml", cfg))


def test_training_run_writes_lora_samples_config_and_logs(tmp_path, tiny_model_dir, demo_data_dir):
    job = _job(tmp_path, tiny_model_dir, demo_data_dir, **{"train.steps": 4, "save.save_every": 2,
                                                            "save.max_step_saves_to_keep": 1,
                                                            "train.skip_first_sample": False,
                                                            "sample.sample_every": 2})
    final = job.run()[0]
    run_dir = tmp_path / "out" / "tiny"
    assert final == run_dir / "tiny.safetensors" and final.is_file()
    # save_every 2 of 4 steps -> step 2 only (the last step is the final file); keep 1
    assert sorted(p.name for p in run_dir.glob("tiny_*.safetensors")) == ["tiny_000000002.safetensors"]
    samples = sorted(p.name for p in (run_dir / "samples").glob("*.png"))
    assert samples == ["000000000_00.png", "000000000_sheet.png", "000000002_00.png", "000000002_sheet.png",
                       "000000004_00.png", "000000004_sheet.png"]
    assert Image.open(run_dir / "samples" / "000000004_00.png").size == (64, 64)
    assert (run_dir / "config.yaml").is_file()
    assert any((run_dir / "logs").glob("events.out.tfevents.*"))

    state = load_file(str(final))
    assert state and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in state)
    meta = read_lora_metadata(final)
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter["transformer.r"] == 4 and adapter["transformer.lora_alpha"] == 4
    assert meta["kontext_trainer.step"] == "4" and meta["kontext_trainer.base_model"] == str(tiny_model_dir)


def _fixed_batch(job):
    """A deterministic batch, timesteps and noise, to measure the loss before and after training."""
    from toolkit.data.dataset import PairedDataset
    from toolkit.data.pairs import discover_pairs

    process = job.processes[0]
    pairs = discover_pairs(process.cfg.datasets)
    return first_bucket_batch(PairedDataset(pairs, process.cfg.datasets, trigger_word=process.cfg.trigger_word,
                                            seed=0))


def _loss_on(model, batch, seed=0):
    inputs, target = fixed_inputs(model, batch, seed)
    with torch.no_grad():
        return flow_matching.flow_matching_loss(model.denoiser()(**inputs), target, torch.ones(2)).item()


def test_loss_falls_and_only_lora_changes(tmp_path, tiny_model_dir, demo_data_dir, monkeypatch):
    """Train 60 steps on the tiny pipeline and compare the loss on a fixed batch, and every base weight."""
    job = _job(tmp_path, tiny_model_dir, demo_data_dir, **{"train.steps": 60, "train.lr": 5e-3,
                                                            "save.save_every": 1000, "sample.prompts": []})
    process = job.processes[0]
    captured = {}
    original_train = type(process)._train

    def spy(self, rt, pairs, requests, outputs):
        # Wrap the real loop: record the state right after the LoRA is injected and right after training.
        original_load = self.arch_cls.load

        def load_and_remember(*args, **kwargs):
            model = original_load(*args, **kwargs)
            captured["model"] = model
            captured["base_before"] = {k: v.clone() for k, v in model.transformer.state_dict().items()}
            return model

        monkeypatch.setattr(self.arch_cls, "load", load_and_remember)
        batch = _fixed_batch(job)
        result = original_train(self, rt, pairs, requests, outputs)
        captured["batch"] = batch
        return result

    monkeypatch.setattr(type(process), "_train", spy)
    # Loss before training: a fresh copy of the model with a zero LoRA is the base model itself.
    from extensions.flux_kontext import FluxKontext

    fresh = FluxKontext.load(process.cfg.model, torch.device("cpu"), torch.float32)
    batch = _fixed_batch(job)
    loss_before = _loss_on(fresh, batch)
    job.run()
    model = captured["model"]
    loss_after = _loss_on(model, batch)
    assert loss_after < loss_before * 0.9, (loss_before, loss_after)

    after = model.transformer.state_dict()

    def injected_name(key):  # peft moves a wrapped layer's own weights under .base_layer
        return key if key in after else key.rsplit(".", 1)[0] + ".base_layer." + key.rsplit(".", 1)[1]

    changed_base = [k for k, v in captured["base_before"].items() if not torch.equal(v, after[injected_name(k)])]
    assert changed_base == []
    lora_b = [v for k, v in after.items() if ".lora_B." in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at zero and must have trained"


def test_saved_lora_loads_in_diffusers_and_matches_trainer_sampler(tmp_path, tiny_model_dir, demo_data_dir):
    job = _job(tmp_path, tiny_model_dir, demo_data_dir, **{"train.steps": 6, "train.lr": 1e-2,
                                                            "save.save_every": 1000,
                                                            "network.linear_alpha": 8})  # alpha != rank
    process = job.processes[0]
    final = job.run()[0]
    ctrl = demo_data_dir / "sample_control" / "sample_000.png"
    request = dict(image=Image.open(ctrl).convert("RGB").resize((64, 64)), prompt="inv3rt invert", height=64,
                   width=64, max_area=64 * 64, num_inference_steps=2, guidance_scale=2.5,
                   max_sequence_length=16, _auto_resize=False, output_type="np")

    def render(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(generator=torch.Generator().manual_seed(5), **request).images[0]

    base = FluxKontextPipeline.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    without = render(base)
    base.load_lora_weights(str(final))
    with_lora = render(base)
    assert np.abs(with_lora - without).max() > 1e-3, "the LoRA changed nothing"

    # The trainer's own sampler with the trained adapter in place gives the same image.
    from extensions.flux_kontext import FluxKontext
    from toolkit.adapters.lora import add_lora, make_lora_config
    from toolkit.adapters.network import load_pretrained

    ours = FluxKontext.load(process.cfg.model, torch.device("cpu"), torch.float32)
    config = make_lora_config(4, 8, FluxKontext.default_lora_targets)
    add_lora(ours.transformer, config)
    load_pretrained(ours.transformer, str(final), config, None)  # the file holds B * alpha / r (scale folded)
    ours.transformer.eval()
    assert np.abs(render(ours.full_pipe()) - with_lora).max() < 1e-4
