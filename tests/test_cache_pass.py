"""`run.py cache CONFIG` fills every latent and caption cache a training run uses; the run after it never loads or
calls the VAE and text encoders during training (the VAE loads for the sampling round only), and tools.bench shows
zero encoder time."""

from __future__ import annotations

import pytest

import run
from extensions.flux_kontext import FluxKontext
from extensions.flux_kontext.encoders import LazyEncoders
from jobs import cache_pass
from jobs.process.BaseSDTrainProcess import BaseSDTrainProcess
from tests.helpers import merge, tiny_config_dict, write_config
from toolkit.errors import ConfigError
from tools.bench import run_benchmark


def _config(tmp_path, model_dir, data_dir, **overrides):
    cfg = merge(tiny_config_dict(tmp_path / "out", model_dir, data_dir), {
        "train.steps": 2, "train.cache_text_embeddings": True, "save.save_every": 100,
        "model.vae_device": "cpu", "model.te_device": "cpu", "model.te_dtype": "bf16", **overrides})
    cfg["config"]["process"][0]["datasets"][0].update(cache_latents_to_disk=True, cache_dir=str(tmp_path / "cache"))
    return write_config(tmp_path / "cfg.yaml", cfg)


@pytest.fixture
def spies(monkeypatch):
    """Every encoder load and encode call, and what had loaded when sampling started."""
    seen = {"loaded": [], "encode": [], "at_sampling": None}
    original_loaded, original_sample = LazyEncoders._loaded, BaseSDTrainProcess._sample
    monkeypatch.setattr(LazyEncoders, "_loaded", lambda self, name, *a: (seen["loaded"].append(name),
                                                                         original_loaded(self, name, *a)))
    for method in ("encode_images", "_encode_prompts"):
        original = getattr(FluxKontext, method)
        monkeypatch.setattr(FluxKontext, method, lambda self, x, m=method, f=original: (seen["encode"].append(m),
                                                                                        f(self, x))[1])

    def sample(self, ctx, step):
        seen["at_sampling"] = list(seen["loaded"])
        return original_sample(self, ctx, step)
    monkeypatch.setattr(BaseSDTrainProcess, "_sample", sample)
    return seen


def test_cache_pass_then_training_loads_no_encoder(tmp_path, tiny_model_dir, demo_data_dir, spies, monkeypatch):
    config = str(_config(tmp_path, tiny_model_dir, demo_data_dir))
    reports = []
    monkeypatch.setattr(cache_pass, "cache_process", lambda p, f=cache_pass.cache_process: reports.append(f(p))
                        or reports[-1])
    assert run.main(["cache", config]) == 0
    assert set(spies["loaded"]) == {"vae", "text_encoder", "text_encoder_2"} and spies["encode"]
    # 8 items' latents + their captions + the sample prompt, all encoded here
    assert reports[0].encoded == reports[0].entries > 8 and reports[0].reused == 0
    assert not (tmp_path / "out" / "tiny" / "tiny.safetensors").exists()
    entries = list((tmp_path / "cache").glob("*.safetensors"))
    assert any(p.name.startswith("latents-") for p in entries) and any(p.name.startswith("text-") for p in entries)

    spies["loaded"].clear(), spies["encode"].clear()
    assert run.main(["cache", config]) == 0  # everything reused: nothing loads
    assert spies["loaded"] == [] and spies["encode"] == []
    assert reports[1].reused == reports[1].entries == reports[0].entries and reports[1].encoded == 0

    assert run.main([config]) == 0
    assert spies["at_sampling"] == []  # no encoder loaded while training
    assert spies["loaded"] == ["vae"] and spies["encode"] == []  # the VAE for the preview only; prompts were cached
    assert (tmp_path / "out" / "tiny" / "tiny.safetensors").exists()

    spies["loaded"].clear()
    result = run_benchmark(config, warmup=0, steps=1)  # the same real step, with its parts timed
    assert result["encoder_seconds"] == 0.0 and result["encoders_loaded"] == [] and spies["loaded"] == []
    assert result["breakdown_seconds"]["forward"] > 0


def test_cache_pass_refuses_memory_only_caches(tmp_path, tiny_model_dir, demo_data_dir):
    from jobs import get_job
    from jobs.cache_pass import cache_process

    config = _config(tmp_path, tiny_model_dir, demo_data_dir)
    process = get_job(config).processes[0]
    process.cfg.datasets[0].cache_latents_to_disk = False
    process.cfg.datasets[0].cache_latents = True
    with pytest.raises(ConfigError, match="in memory only"):
        cache_process(process)
