"""Full fine-tuning (network: null / train.full_finetune) and training stages on the tiny model, on CPU."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import FluxKontextPipeline, FluxTransformer2DModel
from safetensors.torch import load_file

import run
from jobs import get_job
from tests.helpers import REPO, merge, tiny_config_dict, write_config
from toolkit.config.loader import load_job_dict
from toolkit.errors import ConfigError
from toolkit.state.train_state import list_states

FULL = {"network": None, "train.steps": 4, "save.save_every": 2, "save.max_step_saves_to_keep": 10,
        "train.lr": 1e-3, "sample.prompts": []}


def _config(folder: Path, model_dir: Path, data_dir: Path, **overrides) -> Path:
    cfg = merge(tiny_config_dict(folder / "out", model_dir, data_dir), {**FULL, **overrides})
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(folder / "cfg.yaml", cfg)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return FluxTransformer2DModel.from_pretrained(str(folder)).state_dict()


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == [], f"{len(different)} tensors differ, e.g. {different[:2]}"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir, demo_data_dir):
    """4 full fine-tune steps, states and step folders every 2 (read-only: tests copy it)."""
    folder = tmp_path_factory.mktemp("full")
    assert run.main([str(_config(folder, tiny_model_dir, demo_data_dir))]) == 0
    logging.getLogger().handlers.clear()
    return folder / "out" / "tiny"


def test_full_finetune_changes_base_weights_and_the_folder_reloads_them(full_run, tiny_model_dir):
    final = full_run / "transformer"
    assert (final / "config.json").is_file() and (final / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(full_run.glob("*.safetensors")), "a full fine-tune writes no LoRA file"
    assert sorted(p.name for p in full_run.glob("transformer_*")) == ["transformer_000000002"]
    base = _weights(tiny_model_dir / "transformer")
    tuned = _weights(final)
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert len(changed) > len(base) // 2, f"only {len(changed)} of {len(base)} tensors changed"
    # The saved file holds exactly what the loaded model holds (save.dtype float32 in the tiny config).
    _assert_same(tuned, load_file(str(final / "diffusion_pytorch_model.safetensors")))
    info = json.loads((final / "training.json").read_text())
    assert info["step"] == 4 and info["base_model"] == str(tiny_model_dir)
    # What the issue asks: the base pipeline with the fine-tuned transformer swapped in.
    pipe = FluxKontextPipeline.from_pretrained(str(tiny_model_dir),
                                               transformer=FluxTransformer2DModel.from_pretrained(str(final)))
    _assert_same(pipe.transformer.state_dict(), tuned)


def test_full_finetune_state_holds_every_weight_and_resumes_to_the_same_transformer(full_run, tmp_path):
    copy = tmp_path / "out" / "tiny"
    shutil.copytree(full_run, copy)
    states = list_states(copy)
    assert [s for s, _ in states] == [2, 4]
    trainable = load_file(str(states[0][1] / "lora.safetensors"))
    assert set(trainable) == set(_weights(full_run / "transformer")), "the state holds the whole transformer"
    # Lose everything after step 2, then run the same config again: it resumes from step 2.
    shutil.rmtree(states[1][1])
    shutil.rmtree(copy / "transformer")
    config = tmp_path / "cfg.yaml"
    config.write_text((full_run.parent.parent / "cfg.yaml").read_text().replace(str(full_run.parent.parent),
                                                                                str(tmp_path)))
    assert run.main([str(config)]) == 0
    logging.getLogger().handlers.clear()
    assert [s for s, _ in list_states(copy)] == [2, 4], "the run resumed at step 2 and saved step 4 again"
    _assert_same(_weights(copy / "transformer"), _weights(full_run / "transformer"))


def test_rotation_keeps_the_newest_step_folders(tmp_path, tiny_model_dir, demo_data_dir):
    config = _config(tmp_path, tiny_model_dir, demo_data_dir, **{"train.steps": 5, "save.save_every": 1,
                                                                 "save.max_step_saves_to_keep": 2})
    assert run.main([str(config)]) == 0
    logging.getLogger().handlers.clear()
    run_dir = tmp_path / "out" / "tiny"
    assert sorted(p.name for p in run_dir.glob("transformer_*")) == ["transformer_000000003", "transformer_000000004"]
    assert not list(run_dir.glob(".transformer*")), "no temporary folder is left behind"
    assert (run_dir / "transformer" / "config.json").is_file()


def test_train_full_finetune_key_equals_network_null(tmp_path, tiny_model_dir, demo_data_dir):
    cfg = merge(tiny_config_dict(tmp_path, tiny_model_dir, demo_data_dir), {"train.full_finetune": True})
    del cfg["config"]["process"][0]["network"]
    job = load_job_dict(cfg, "test")
    from toolkit.train.stages import is_full_finetune
    assert is_full_finetune(job.config.process[0])
    assert not is_full_finetune(load_job_dict(tiny_config_dict(tmp_path, tiny_model_dir, demo_data_dir),
                                              "t").config.process[0])


@pytest.mark.parametrize("overrides, expected", [
    ({"network": None, "model.quantize": True}, "config.process[0].model.quantize: a full fine-tune"),
    ({"train.full_finetune": True, "network": {"linear": 8}}, "config.process[0].network: a full fine-tune"),
    ({"network": None, "save.format": "comfy"}, "config.process[0].save.format: 'comfy' is a LoRA key layout"),
    ({"network": None, "train.train_unet": False}, "config.process[0].train.train_unet: false with a full"),
    ({"network": None, "save.push_to_hub": True, "save.hf_repo_id": "me/x"},
     "config.process[0].save.push_to_hub: the Hub upload publishes LoRA files"),
    ({"model.transformer_path": "[process:0]"}, "in the first process: there is no earlier process"),
    ({"model.transformer_path": "[process:x]"}, "is not a reference; write '[process:N]'"),
])
def test_what_cannot_combine_is_a_config_error(tmp_path, tiny_model_dir, demo_data_dir, overrides, expected):
    cfg = merge(tiny_config_dict(tmp_path, tiny_model_dir, demo_data_dir), overrides)
    with pytest.raises(ConfigError, match=None) as err:
        load_job_dict(cfg, "test")
    assert expected in str(err.value)


def test_a_missing_transformer_folder_fails_before_the_model_loads(tmp_path, tiny_model_dir, demo_data_dir,
                                                                   monkeypatch):
    cfg = merge(tiny_config_dict(tmp_path / "out", tiny_model_dir, demo_data_dir),
                {"model.transformer_path": str(tmp_path / "nowhere")})
    job = get_job(write_config(tmp_path / "cfg.yaml", cfg))
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr(job.processes[0].arch_cls, "load", must_not_load)
    with pytest.raises(ConfigError, match=r"config.process\[0\].model.transformer_path: .*nowhere is not a folder"):
        job.run()


def test_two_stage_example_runs_and_stage_2_trains_on_stage_1s_transformer(tmp_path, tiny_model_dir, demo_data_dir,
                                                                           monkeypatch):
    from jobs.process.BaseSDTrainProcess import BaseSDTrainProcess

    text = (REPO / "config" / "examples" / "train_flux_kontext_two_stage_tiny.yaml").read_text()
    text = text.replace('"models/tiny-flux-kontext"', f'"{tiny_model_dir}"').replace(
        '"data/demo/', f'"{demo_data_dir}/').replace('training_folder: "output"', f'training_folder: "{tmp_path}"')
    config = tmp_path / "two_stage.yaml"
    config.write_text(text)
    bases: dict[int, dict] = {}
    setup = BaseSDTrainProcess.setup

    def spy(self, *args, **kwargs):  # the frozen base each stage really trains on
        ctx = setup(self, *args, **kwargs)
        bases[self.index] = {k.replace("base_layer.", ""): v.detach().clone()
                             for k, v in ctx.model.transformer.state_dict().items() if "lora_" not in k}
        return ctx

    monkeypatch.setattr(BaseSDTrainProcess, "setup", spy)
    assert run.main([str(config)]) == 0
    logging.getLogger().handlers.clear()
    stage1 = tmp_path / "tiny_two_stage_full" / "transformer"
    lora = tmp_path / "tiny_two_stage_lora" / "tiny_two_stage_lora.safetensors"
    assert (stage1 / "config.json").is_file() and lora.is_file()
    assert all(".lora_A." in k or ".lora_B." in k for k in load_file(str(lora)))
    _assert_same(bases[1], _weights(stage1))  # stage 2's base is stage 1's result ...
    original = _weights(tiny_model_dir / "transformer")
    assert any(not torch.equal(bases[1][k], original[k]) for k in original)  # ... not the original base


def test_a_reference_to_a_lora_process_is_an_error(tmp_path):
    text = (REPO / "config" / "examples" / "train_flux_kontext_two_stage_tiny.yaml").read_text()
    raw = yaml.safe_load(text.replace("network: null", "network: {linear: 4}"))
    with pytest.raises(ConfigError, match=r"config.process\[1\].model.transformer_path: config.process\[0\] is not "
                                          "a full fine-tune"):
        load_job_dict(raw, "test")


def test_training_processes_must_not_share_a_run_folder(tmp_path):
    raw = yaml.safe_load((REPO / "config" / "examples" / "train_flux_kontext_two_stage_tiny.yaml").read_text())
    del raw["config"]["process"][1]["name"]
    raw["config"]["process"][0]["name"] = "[name]"
    with pytest.raises(ConfigError, match=r"config.process\[1\].name: this process would write into the run folder"):
        load_job_dict(raw, "test")


def test_lora_state_dict_from_a_consolidated_state_dict_equals_the_live_one(tiny_model_dir):
    """Under FSDP the LoRA is cut from the consolidated transformer state dict; it must be the same tensors."""
    from toolkit.adapters.lora import add_lora, lora_state_dict, make_lora_config

    transformer = FluxTransformer2DModel.from_pretrained(str(tiny_model_dir / "transformer"))
    add_lora(transformer, make_lora_config(4, 4, ["to_q", "to_k"], 0.0))
    _assert_same(lora_state_dict(transformer, transformer.state_dict()), lora_state_dict(transformer))


@pytest.mark.distributed
def test_two_processes_full_finetune_equals_one_process_and_saves_once(tmp_path, tiny_model_dir, demo_data_dir):
    """Full weights are all-reduced like a LoRA: 2 processes x batch 1 == 1 process x batch 2 after one SGD step
    (same samples, noise and timesteps per sample); then a 2-process run writes one transformer folder and states."""
    import runpy

    from tests.launch import SCRIPTS, accelerate_launch, ddp_config, explain

    pairs = tmp_path / "pairs"  # two items of one bucket: the global batch of 2 is the same in both runs
    for sub in ("target", "control"):
        (pairs / sub).mkdir(parents=True)
        for name in ("a", "b"):
            shutil.copy(demo_data_dir / sub / "pair_000.png", pairs / sub / f"{name}.png")
            if sub == "target":
                (pairs / sub / f"{name}.txt").write_text(f"[trigger] invert {name}")
    common = {"network": None, "sample.prompts": [], "train.optimizer": "sgd", "train.lr": 0.1,
              "train.max_grad_norm": 0.0, "train.steps": 1}
    single = write_config(tmp_path / "single.yaml", merge(
        tiny_config_dict(tmp_path / "out1", tiny_model_dir, pairs), {**common, "train.batch_size": 2}))
    runpy.run_path(str(SCRIPTS / "one_step.py"))["main"](str(single), tmp_path / "single.safetensors")
    proc = accelerate_launch(SCRIPTS / "one_step.py", ddp_config(tmp_path, tiny_model_dir, pairs, "ddp", **common),
                             tmp_path / "ddp.safetensors")
    assert proc.returncode == 0, explain(proc)
    one, two = load_file(str(tmp_path / "single.safetensors")), load_file(str(tmp_path / "ddp.safetensors"))
    base = _weights(tiny_model_dir / "transformer")
    assert one.keys() == two.keys() == base.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-6
    assert max((one[k] - base[k]).abs().max().item() for k in one) > 1e-4, "the step must change the weights"

    config = ddp_config(tmp_path, tiny_model_dir, demo_data_dir, "full2", **{**FULL, "train.steps": 2})
    proc = accelerate_launch(REPO / "run.py", config)
    assert proc.returncode == 0, explain(proc)
    run_dir = tmp_path / "out" / "full2"
    assert "world size 2" in proc.stdout + proc.stderr and "full fine-tune" in proc.stdout + proc.stderr
    assert sorted(p.name for p in run_dir.iterdir() if "transformer" in p.name) == ["transformer"]
    assert json.loads((run_dir / "state" / "000000002" / "trainer.json").read_text())["world_size"] == 2
    tuned = _weights(run_dir / "transformer")
    assert any(not torch.equal(tuned[k], base[k]) for k in base)
