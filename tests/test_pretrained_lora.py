"""network.pretrained_lora: checked before any model loads, loaded with the file's exact update (diffusers or
ComfyUI/kohya keys, any alpha), clear errors on rank / module mismatches, resume keeps the trained weights, and a
2-process run starts from it too."""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import load_file, save_file

import run
from extensions.flux_kontext import FluxKontext
from jobs import get_job
from tests.example_configs import assert_same_final_lora, example_config, resume_from_copy
from tests.helpers import merge, tiny_config_dict, write_config
from tests.launch import accelerate_launch, explain
from toolkit.adapters.network import load_pretrained
from toolkit.config import load_job_config
from toolkit.errors import ConfigError, UserError
from toolkit.adapters.lora import add_lora, lora_state_dict, make_lora_config, save_lora
from toolkit.adapters.lora_convert import find_conventions, to_comfy

EXAMPLE = "train_lora_flux_kontext_pretrained_tiny"
NAME = "tiny_kontext_from_lora"


def _model(cfg_dir):
    from toolkit.config.schema import ModelConfig

    model_cfg = ModelConfig(name_or_path=str(cfg_dir), arch="flux_kontext", max_sequence_length=16)
    return FluxKontext.load(model_cfg, torch.device("cpu"), torch.float32)


def _deltas(transformer) -> dict[str, torch.Tensor]:
    """B @ A * scale of every LoRA layer: the update the adapter adds."""
    return {name: (m.lora_B["default"].weight @ m.lora_A["default"].weight * m.scaling["default"]).detach()
            for name, m in transformer.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, tiny_model_dir):
    """A random rank-4 LoRA with alpha 8 (scale 2) saved in both layouts, and its deltas."""
    folder = tmp_path_factory.mktemp("pretrained")
    model = _model(tiny_model_dir)
    config = make_lora_config(4, 8, FluxKontext.default_lora_targets)
    add_lora(model.transformer, config)
    torch.manual_seed(3)
    for p in model.transformer.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    paths = {"diffusers": folder / "diffusers.safetensors", "comfy": folder / "comfy.safetensors"}
    state = lora_state_dict(model.transformer)
    save_lora(paths["diffusers"], state, config, "float32")
    save_lora(paths["comfy"], state, config, "float32",
              convert=functools.partial(to_comfy, conventions=find_conventions("flux_kontext")))
    assert next(iter(load_file(str(paths["comfy"])))).startswith("lora_unet_")
    return dict(paths=paths, deltas=_deltas(model.transformer), folder=folder)


@pytest.mark.parametrize("layout", ["diffusers", "comfy"])
def test_loads_the_exact_update_at_another_alpha(lora_files, tiny_model_dir, layout):
    model = _model(tiny_model_dir)
    config = make_lora_config(4, 4, FluxKontext.default_lora_targets)  # this run: scale 1, the file: scale 2
    add_lora(model.transformer, config)
    load_pretrained(model.transformer, str(lora_files["paths"][layout]), config, find_conventions("flux_kontext"))
    got = _deltas(model.transformer)
    assert got.keys() == lora_files["deltas"].keys()
    for name, delta in lora_files["deltas"].items():
        torch.testing.assert_close(got[name], delta, rtol=1e-5, atol=1e-6, msg=name)
    assert all(p.requires_grad for n, p in model.transformer.named_parameters() if "lora_" in n)


def test_rank_and_module_mismatches_name_shapes_and_modules(lora_files, tiny_model_dir):
    model = _model(tiny_model_dir)
    config = make_lora_config(8, 8, FluxKontext.default_lora_targets)
    add_lora(model.transformer, config)
    with pytest.raises(UserError, match=r"LoRA shapes of \S+ do not match this network: the file has lora_A "
                                        r"\(4, \d+\), lora_B \(\d+, 4\) \(rank 4\); network.linear gives lora_A "
                                        r"\(8, \d+\), lora_B \(\d+, 8\) \(rank 8\)"):
        load_pretrained(model.transformer, str(lora_files["paths"]["diffusers"]), config, None)
    fewer = _model(tiny_model_dir)
    config = make_lora_config(4, 4, ["to_q"])
    add_lora(fewer.transformer, config)
    with pytest.raises(UserError, match=r"modules do not match this network: it has weights for \d+ module\(s\) "
                                        r"this network does not train \(e.g. .*to_k.*\): add them to "
                                        r"network.target_modules"):
        load_pretrained(fewer.transformer, str(lora_files["paths"]["diffusers"]), config, None)


@pytest.mark.parametrize("make,expected", [
    (lambda d: d / "missing.safetensors", "does not exist or is not a file"),
    (lambda d: (d / "junk.safetensors").write_bytes(b"not a safetensors file") and d / "junk.safetensors",
     "is not a readable .safetensors file"),
    (lambda d: save_file({"x.weight": torch.zeros(2)}, str(d / "plain.safetensors")) or d / "plain.safetensors",
     "holds no LoRA or LoKr weights"),
    (lambda d: save_file({"transformer.a.lokr_w1": torch.zeros(2, 2)}, str(d / "lokr.safetensors"))
     or d / "lokr.safetensors", "is a lokr file but network.type is 'lora'"),
])
def test_bad_file_fails_in_preflight_before_any_model_loads(tmp_path, tiny_model_dir, demo_data_dir, monkeypatch,
                                                            make, expected):
    path = make(tmp_path)
    cfg = merge(tiny_config_dict(tmp_path / "out", tiny_model_dir, demo_data_dir),
                {"network.pretrained_lora": str(path)})
    job = get_job(write_config(tmp_path / "c.yaml", cfg))
    monkeypatch.setattr(FluxKontext, "load", lambda *a, **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(ConfigError, match=f"network.pretrained_lora: {path} {expected}"):
        job.run()


def test_example_starts_from_the_file_and_resume_keeps_the_trained_weights(lora_files, tmp_path, tiny_model_dir,
                                                                         demo_data_dir):
    overrides = {"network.pretrained_lora": str(lora_files["paths"]["comfy"]), "network.linear": 4,
                 "network.linear_alpha": 4, "save.save_every": 2, "save.max_step_saves_to_keep": 5}
    config = example_config(EXAMPLE, tmp_path / "a", tiny_model_dir, demo_data_dir, steps=4, **overrides)
    assert load_job_config(config).config.process[0].network.pretrained_lora == str(lora_files["paths"]["comfy"])
    assert run.main([str(config)]) == 0
    run_dir = tmp_path / "a" / "output" / NAME
    resumed = resume_from_copy(EXAMPLE, run_dir, tmp_path / "b", tiny_model_dir, demo_data_dir, 4, 2, **overrides)
    assert_same_final_lora(run_dir, resumed)


@pytest.mark.distributed
def test_two_processes_start_from_the_file(lora_files, tmp_path, tiny_model_dir, demo_data_dir):
    """SGD at a tiny lr: the 2-process run ends where it started, at the pretrained LoRA (not at zero)."""
    cfg = merge(tiny_config_dict(tmp_path / "out", tiny_model_dir, demo_data_dir, name="ddp"),
                {"train.distributed_training": True, "train.batch_size": 1, "train.steps": 2,
                 "train.optimizer": "sgd", "train.lr": 1e-9, "network.linear_alpha": 8,
                 "network.pretrained_lora": str(lora_files["paths"]["diffusers"]), "sample.prompts": []})
    proc = accelerate_launch(run.__file__, write_config(tmp_path / "ddp.yaml", cfg))
    assert proc.returncode == 0, explain(proc)
    final, start = load_file(str(tmp_path / "out" / "ddp" / "ddp.safetensors")), \
        load_file(str(lora_files["paths"]["diffusers"]))
    assert final.keys() == start.keys()
    for key in start:
        torch.testing.assert_close(final[key], start[key], rtol=0, atol=1e-6, msg=key)
